"""Run the real vpnd and vpnclient inside a `Topology`: keys, configs, start, wait, status, stop.

Used by the end-to-end tests and the demo (DESIGN §5). Every process is started through
`topology.popen` (so `Topology.close()` ends it, by PID); its stdout and stderr go to
`<workdir>/<name>.log`. Configs and control sockets live in the caller's `workdir`.

    server = start_server(topo, workdir, server_keys, [client_keys])
    client = start_client(topo, topo.client, workdir, client_keys, server_keys.public,
                          endpoint=f"{topo.link.server_ip4}:{PORT}")
    st = wait_connected(topo, client)            # vpnclient status --json, once established
    assert ping(topo, topo.client, SERVER_TUN4).returncode == 0
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.netns import Topology, link_exists, wait_until

BIN = os.path.dirname(sys.executable)
VPND = os.path.join(BIN, "vpnd")
VPNCLIENT = os.path.join(BIN, "vpnclient")

PORT = 51820
POOL4 = "198.19.0.0/24"
POOL6 = "2001:2:0:100::/64"
SERVER_TUN4 = "198.19.0.1"        # the server takes the first host of each pool
SERVER_TUN6 = "2001:2:0:100::1"
SERVER_IF = "vpnd0"
CLIENT_IF = "vpn0"


class VpnError(AssertionError):
    """A daemon did not start, connect or stop as expected (the message carries its log)."""


@dataclass(frozen=True)
class Keys:
    private: str
    public: str


@dataclass
class Daemon:
    """One running vpnd or `vpnclient up`."""

    name: str
    ns: str
    config: Path
    log: Path
    proc: subprocess.Popen
    interface: str
    socket: Path | None = None      # the client's control socket

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return f"[{self.name}: no log]"
        return f"[{self.name} log, last lines]\n" + "\n".join(text.splitlines()[-lines:])


# -- keys and configs ---------------------------------------------------------------------------

def _tool(*argv: str, stdin: str | None = None) -> str:
    r = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise VpnError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip()


def genkeys() -> Keys:
    """A key pair from the real `vpnd genkey` and `vpnd pubkey`."""
    private = _tool(VPND, "genkey")
    return Keys(private, _tool(VPND, "pubkey", stdin=private + "\n"))


def write_server_config(path: Path, keys: Keys, clients: list[Keys], *, log_level: str = "verbose",
                        extra: str = "", pool6: str = POOL6) -> Path:
    """A server config; `extra` is more [server] lines (e.g. 'client_to_client = true')."""
    peers = "".join(f'\n[[client]]\npublic_key = "{c.public}"\n' for c in clients)
    path.write_text(
        "[server]\n"
        f'private_key = "{keys.private}"\n'
        f'listen = ["0.0.0.0:{PORT}", "[::]:{PORT}"]\n'
        f'interface = "{SERVER_IF}"\n'
        f'address_pool4 = "{POOL4}"\n'
        f'address_pool6 = "{pool6}"\n'
        f'log_level = "{log_level}"\n'
        f'control_socket = "{path.with_suffix(".sock")}"\n' + extra + peers)
    path.chmod(0o600)
    return path


def write_client_config(path: Path, keys: Keys, server_public: str, endpoint: str, socket: Path,
                        *, interface: str = CLIENT_IF) -> Path:
    path.write_text(
        "[client]\n"
        f'private_key = "{keys.private}"\n'
        f'interface = "{interface}"\n'
        f'control_socket = "{socket}"\n'
        # never the host's /etc/resolv.conf or /var/lib/vpnclient: the test's own folder
        f'resolv_conf = "{path.with_suffix(".resolv.conf")}"\n'
        f'state_dir = "{path.parent / (path.stem + "-state")}"\n'
        "\n[server]\n"
        f'endpoint = "{endpoint}"\n'
        f'public_key = "{server_public}"\n')
    path.chmod(0o600)
    return path


# -- processes --------------------------------------------------------------------------------

def _spawn(topo: Topology, ns: str, log: Path, *argv: str) -> subprocess.Popen:
    with open(log, "ab") as out:   # the child keeps its own copy of the fd
        return topo.popen(ns, *argv, stdout=out, stderr=subprocess.STDOUT)


def server_tun6(pool6: str = POOL6) -> str:
    """The server's own tunnel address in an IPv6 pool (its first host)."""
    return str(next(ipaddress.ip_network(pool6).hosts()))


def _server_ready(topo: Topology, ns: str, pool6: str = POOL6) -> bool:
    r = topo.run(ns, "ip", "-o", "addr", "show", "dev", SERVER_IF, check=False)
    return r.returncode == 0 and f" {SERVER_TUN4}/" in r.stdout and f" {server_tun6(pool6)}/" in r.stdout


def start_server(topo: Topology, workdir: Path, keys: Keys | None = None, clients: list[Keys] = (),
                 *, config: Path | None = None, name: str = "vpnd", timeout: float = 10, extra: str = "",
                 pool6: str = POOL6, ns: str | None = None) -> Daemon:
    """Start `vpnd serve` in the server namespace; returns once its TUN has the pool addresses.

    Pass `config` to reuse an existing file (a restart), else `keys` and `clients` to write one.
    """
    workdir = Path(workdir)
    if config is None:
        config = write_server_config(workdir / f"{name}.toml", keys, list(clients), extra=extra, pool6=pool6)
    log = workdir / f"{name}.log"
    ns = ns or topo.server
    proc = _spawn(topo, ns, log, VPND, "serve", "--config", str(config))
    d = Daemon(name, ns, config, log, proc, SERVER_IF)
    if not wait_until(lambda: proc.poll() is not None or _server_ready(topo, ns, pool6), timeout) \
            or proc.poll() is not None:
        raise VpnError(f"vpnd did not come up within {timeout} s (exit status {proc.poll()})\n{d.log_tail()}")
    return d


def start_client(topo: Topology, ns: str, workdir: Path, keys: Keys, server_public: str, endpoint: str,
                 *, name: str | None = None, interface: str = CLIENT_IF) -> Daemon:
    """Start `vpnclient up` (foreground) in namespace `ns`; see `wait_connected`."""
    workdir = Path(workdir)
    name = name or f"client-{ns.rsplit('-', 1)[-1]}"
    socket = workdir / f"{name}.sock"
    config = write_client_config(workdir / f"{name}.toml", keys, server_public, endpoint, socket,
                                 interface=interface)
    log = workdir / f"{name}.log"
    proc = _spawn(topo, ns, log, VPNCLIENT, "up", "--config", str(config), "--log-level", "verbose")
    return Daemon(name, ns, config, log, proc, interface, socket)


def restart_client(topo: Topology, client: Daemon) -> Daemon:
    """Start `vpnclient up` again with the same config (after the previous one ended)."""
    assert client.proc.poll() is not None, "the previous vpnclient is still running"
    proc = _spawn(topo, client.ns, client.log, VPNCLIENT, "up", "--config", str(client.config),
                  "--log-level", "verbose")
    return Daemon(client.name, client.ns, client.config, client.log, proc, client.interface, client.socket)


def status(topo: Topology, client: Daemon) -> dict:
    """`vpnclient status --json` for a running client (VpnError if it fails)."""
    r = topo.run(client.ns, VPNCLIENT, "status", "--socket", str(client.socket), "--json", check=False)
    if r.returncode != 0:
        raise VpnError(f"vpnclient status failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout)


def wait_connected(topo: Topology, client: Daemon, timeout: float = 15, *, server: Daemon | None = None) -> dict:
    """Poll status until the state is established and both tunnel addresses are assigned."""
    last: dict = {}

    def ready() -> bool:
        nonlocal last
        if client.proc.poll() is not None:
            return True
        try:
            last = status(topo, client)
        except VpnError:
            return False
        return last.get("state") == "established" and len(last.get("addresses") or []) >= 2

    wait_until(ready, timeout, interval=0.1)
    if client.proc.poll() is None and last.get("state") == "established" and len(last["addresses"]) >= 2:
        return last
    logs = client.log_tail() + ("\n" + server.log_tail() if server else "")
    code = client.proc.poll()
    why = f"exited with status {code}" if code is not None else f"not connected within {timeout} s"
    raise VpnError(f"{client.name} {why} (last status {last or 'none'})\n{logs}")


def tunnel_ips(st: dict) -> tuple[str, str]:
    """(IPv4, IPv6) tunnel addresses, without prefix, from a status dict."""
    ifs = [ipaddress.ip_interface(a) for a in st["addresses"]]
    v4 = next(str(i.ip) for i in ifs if i.version == 4)
    v6 = next(str(i.ip) for i in ifs if i.version == 6)
    return v4, v6


def ping(topo: Topology, ns: str, addr: str, *, count: int = 1, wait: float = 1, interval: float = 0.2,
         size: int | None = None, source: str | None = None) -> subprocess.CompletedProcess:
    """Real `ping` from `ns`; check `.returncode == 0`. Bounded: count packets, `wait` s each."""
    argv = ["ping", "-n", "-c", str(count), "-W", str(wait), "-i", str(interval)]
    if size is not None:
        argv += ["-s", str(size)]
    if source is not None:
        argv += ["-I", source]
    return topo.run(ns, *argv, addr, check=False, timeout=count * (interval + wait) + 10)


def stop(topo: Topology, daemon: Daemon, timeout: float = 10) -> int | None:
    """SIGTERM by PID, wait, SIGKILL if needed; returns the exit status."""
    return topo.stop(daemon.proc, timeout)


def kill(daemon: Daemon) -> int:
    """SIGKILL by PID (a crash), and reap it."""
    if daemon.proc.poll() is None:
        os.kill(daemon.pid, signal.SIGKILL)
    return daemon.proc.wait(10)


def wait_exit(daemon: Daemon, timeout: float = 10) -> int | None:
    """The exit status once the process ends by itself, or None after `timeout` s."""
    try:
        return daemon.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def tun_exists(topo: Topology, daemon: Daemon) -> bool:
    return link_exists(daemon.interface, daemon.ns)


def wait_tcp_listening(topo: Topology, ns: str, port: int, timeout: float = 10) -> bool:
    """True once something in `ns` listens on TCP `port` (read with `ss`, no connection made)."""
    def listening() -> bool:
        r = topo.run(ns, "ss", "-Hltn", f"sport = :{port}", check=False)
        return r.returncode == 0 and bool(r.stdout.strip())
    return wait_until(listening, timeout)
