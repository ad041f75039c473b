"""The harness of the attack and fault tests (issue 7): vpnd with test hooks, its statistics and
memory, counters on the server's TUN and underlay, the driver and the raw-socket senders.

Everything runs inside a `Topology` the test created (198.18.0.0/15 underlay, 198.19.0.0/24
tunnel); every process is started through `topo.popen` (ended by PID in `topo.close()`), every
file lives in the test's own folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from nacl.bindings import crypto_scalarmult_base

from tests.e2e import vpn, vpnd_harness
from tests.e2e.netns import Topology, wait_until
from vpncore.net.ctlsock import query
from vpncore.configfile import encode_key

REPO = Path(__file__).resolve().parents[2]
PORT = vpn.PORT
SERVER_TUN4 = vpn.SERVER_TUN4
SPOOF_NET = "198.18.128.0/17"      # spoofed attack sources (routed back to the attacker's namespace)


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def raw_keypair(rng: random.Random | None = None) -> tuple[bytes, bytes]:
    k = bytearray((rng.randbytes(32) if rng else os.urandom(32)))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k), crypto_scalarmult_base(bytes(k))


def keys_from_raw(private: bytes, public: bytes) -> vpn.Keys:
    return vpn.Keys(encode_key(private), encode_key(public))


# --- vpnd ---------------------------------------------------------------------------------------

@dataclass
class Vpnd:
    topo: Topology
    proc: subprocess.Popen
    socket: Path
    log: Path
    private: bytes
    public: bytes

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stats(self) -> dict:
        return query(str(self.socket), "stats", "vpnd", timeout=10)

    def drops(self) -> dict:
        """Today's drop counters by reason (summed over the days kept, which is at most two here)."""
        out: dict[str, int] = {}
        for day in self.stats()["days"].values():
            for k, v in day["drops"].items():
                out[k] = out.get(k, 0) + v
        return out

    def active(self) -> int:
        return self.stats()["active_sessions"]

    def gc_scan(self, patterns: list[bytes] = ()) -> dict:
        masked = ",".join(bytes(b ^ 0x5A for b in p).hex() for p in patterns)
        return query(str(self.socket), f"gc-scan {masked}", "vpnd", timeout=20)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "[no log]"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_vpnd(topo: Topology, workdir: Path, clients: list[vpn.Keys], *, fault_rate: float = 0.0,
               env: dict | None = None, extra: str = "", log_level: str = "info", name: str = "vpnd") -> Vpnd:
    """The real vpnd server in the server namespace, run by tests/e2e/vpnd_harness.py with its test
    hooks (gc-scan) and `fault_rate` of packets failing inside the pump; returns once it answers."""
    private, public = raw_keypair()
    cfg = vpn.write_server_config(Path(workdir) / f"{name}.toml", keys_from_raw(private, public), clients,
                                  log_level=log_level, extra=extra)
    sock = cfg.with_suffix(".sock")
    log = Path(workdir) / f"{name}.log"
    env = dict(env or {})
    envs = [f"{k}={v}" for k, v in env.items()]
    with open(log, "ab") as out:
        proc = topo.popen(topo.server, "env", *envs, *vpnd_harness.argv(cfg, fault_rate=fault_rate),
                          stdout=out, stderr=subprocess.STDOUT)
    d = Vpnd(topo, proc, sock, log, private, public)

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        try:
            d.stats()
        except Exception:
            return False
        return vpn._server_ready(topo, topo.server)
    if not wait_until(ready, 15) or proc.poll() is not None:
        raise AssertionError(f"vpnd did not start (status {proc.poll()})\n{d.log_tail()}")
    return d


def tun_rx_packets(topo: Topology, ifname: str = vpn.SERVER_IF) -> int:
    """Packets vpnd wrote into its TUN (the kernel counts them as received on the device)."""
    r = topo.run(topo.server, "ip", "-s", "-j", "link", "show", "dev", ifname)
    return json.loads(r.stdout)[0]["stats64"]["rx"]["packets"]


def udp_snmp(topo: Topology, ns: str) -> dict:
    """The kernel's UDP counters in `ns` (InDatagrams, RcvbufErrors, ...)."""
    lines = [ln.split() for ln in topo.run(ns, "cat", "/proc/net/snmp").stdout.splitlines() if ln.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


# --- nftables counters in the server namespace --------------------------------------------------

class NftCounters:
    """Named packet/byte counters on the server's underlay traffic (table `inet vpnattk`, in the
    server namespace only: it disappears with the namespace)."""

    def __init__(self, topo: Topology, rules: dict[str, tuple[str, str]]):
        """rules: name -> (hook, match), e.g. {"replies": ("output", "udp sport 51820 ip daddr 198.18.0.66")}."""
        self.topo = topo
        lines = ["table inet vpnattk {"]
        for hook in sorted({h for h, _ in rules.values()}):
            lines.append(f"  chain {hook} {{ type filter hook {hook} priority -300; policy accept;")
            for name, (h, match) in rules.items():
                if h == hook:
                    lines.append(f'    {match} counter comment "{name}"')
            lines.append("  }")
        lines.append("}")
        self._apply("\n".join(lines) + "\n")

    def _apply(self, script: str) -> None:
        r = subprocess.run(["ip", "netns", "exec", self.topo.server, "nft", "-f", "-"], input=script,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise AssertionError(f"nft failed: {r.stderr}\n{script}")

    def read(self) -> dict[str, dict]:
        out = json.loads(self.topo.run(self.topo.server, "nft", "-j", "list", "table", "inet", "vpnattk").stdout)
        counters = {}
        for item in out["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    counters[rule.get("comment", "?")] = expr["counter"]
        return counters


def block_server_output(topo: Topology) -> None:
    """Drop vpnd's UDP sends in the server's output hook: its sendto()/sendmsg() get EPERM."""
    script = ("table inet vpnattk_block {\n  chain output { type filter hook output priority 0; policy accept;\n"
              f"    udp sport {PORT} counter drop\n  }}\n}}\n")
    r = subprocess.run(["ip", "netns", "exec", topo.server, "nft", "-f", "-"], input=script,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def unblock_server_output(topo: Topology) -> int:
    """Remove the block; returns how many of vpnd's sends it refused."""
    out = json.loads(topo.run(topo.server, "nft", "-j", "list", "table", "inet", "vpnattk_block").stdout)
    refused = sum(e["counter"]["packets"] for item in out["nftables"] if "rule" in item
                  for e in item["rule"]["expr"] if "counter" in e)
    topo.run(topo.server, "nft", "delete", "table", "inet", "vpnattk_block")
    return refused


# --- the driver and the raw senders -------------------------------------------------------------

class Driver:
    """A `tests.e2e.attack_driver` process in a client namespace; `call()` one command."""

    def __init__(self, topo: Topology, ns: str, workdir: Path, server: Vpnd, key: bytes, src: str,
                 server_addr: str, name: str = "driver"):
        spec = Path(workdir) / f"{name}.json"
        spec.write_text(json.dumps({"server": [server_addr, PORT], "server_public": server.public.hex(),
                                    "key": key.hex(), "src": src}))
        self.err = open(Path(workdir) / f"{name}.stderr", "wb")
        self.proc = topo.popen(ns, sys.executable, "-m", "tests.e2e.attack_driver", str(spec),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                               cwd=str(REPO), env=child_env())
        self.topo = topo
        self._buf = b""

    def call(self, timeout: float = 60, **cmd) -> dict:
        assert self.proc.poll() is None, "the driver exited"
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"driver gave no answer to {cmd['cmd']} within {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"driver exited during {cmd['cmd']}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        answer = json.loads(line)
        assert "error" not in answer, answer
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(timeout=5, cmd="quit")
            except (AssertionError, OSError):
                pass
        self.topo.stop(self.proc)
        self.err.close()


def tool_spec(workdir: Path, name: str, spec: dict) -> Path:
    path = Path(workdir) / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def run_tool(topo: Topology, ns: str, workdir: Path, name: str, spec: dict, timeout: float = 120) -> dict:
    """Run `tests.e2e.attack_tools` in `ns` to completion; its JSON result."""
    path = tool_spec(workdir, name, spec)
    r = subprocess.run(topo._argv(ns, [sys.executable, "-m", "tests.e2e.attack_tools", str(path)]),
                       capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=child_env())
    assert r.returncode == 0, f"attack tool {name} failed: {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_tool(topo: Topology, ns: str, workdir: Path, name: str, spec: dict) -> subprocess.Popen:
    """Start `tests.e2e.attack_tools` in `ns` in the background (ended by `topo.close()` at worst)."""
    path = tool_spec(workdir, name, spec)
    return topo.popen(ns, sys.executable, "-m", "tests.e2e.attack_tools", str(path), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=child_env())


def stop_tool(proc: subprocess.Popen, timeout: float = 30) -> dict:
    """End a background attack tool (SIGTERM, by PID) and return what it sent."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    return tool_result(proc, timeout)


def tool_result(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"attack tool failed ({proc.returncode}): {err}"
    return json.loads(out.strip().splitlines()[-1])


def route_spoofed_back(topo: Topology, link_index: int) -> None:
    """Replies to the spoofed sources go back to the attacker's namespace (and die there)."""
    link = topo.links[link_index]
    topo.run(topo.server, "ip", "route", "add", SPOOF_NET, "via", link.client_ip4)


# --- real clients and transfers -----------------------------------------------------------------

_RECEIVER = textwrap.dedent("""
    import hashlib, socket, sys
    host, port, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(1)
    srv.settimeout(120)
    open(ready, "w").close()
    conn, _ = srv.accept()
    conn.settimeout(120)
    h, n = hashlib.sha256(), 0
    while True:
        b = conn.recv(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
    conn.close()
    print(n, h.hexdigest(), flush=True)
""")

_SENDER = textwrap.dedent("""
    import hashlib, random, socket, sys, time
    host, port, total, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rate = float(sys.argv[5])          # bytes per second, 0: as fast as TCP goes
    rng, h, sent = random.Random(seed), hashlib.sha256(), 0
    s = socket.create_connection((host, port), timeout=120)
    t0 = time.monotonic()
    while sent < total:
        if rate and sent > (time.monotonic() - t0) * rate:
            time.sleep(0.005)
            continue
        chunk = rng.randbytes(min(1 << 16, total - sent))
        s.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    print(sent, h.hexdigest(), round(time.monotonic() - t0, 3), flush=True)
""")


def expected_digest(total: int, seed: int) -> str:
    rng, h, n = random.Random(seed), hashlib.sha256(), 0
    while n < total:
        chunk = rng.randbytes(min(1 << 16, total - n))
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest()


class Transfer:
    """A TCP transfer with a SHA-256 check, client namespace -> a receiver on the server's tunnel
    address. `start()` returns at once; `finish()` checks both ends."""

    def __init__(self, topo: Topology, ns: str, workdir: Path, total: int, port: int, seed: int, rate: float = 0):
        self.topo, self.ns, self.total, self.port, self.seed, self.rate = topo, ns, total, port, seed, rate
        self.ready = Path(workdir) / f"receiver-{port}.ready"

    def start(self) -> "Transfer":
        self.receiver = self.topo.popen(self.topo.server, sys.executable, "-c", _RECEIVER, SERVER_TUN4,
                                        str(self.port), str(self.ready), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        assert wait_until(lambda: self.ready.exists() or self.receiver.poll() is not None, 10)
        assert self.receiver.poll() is None, self.receiver.stderr.read()
        self.sender = self.topo.popen(self.ns, sys.executable, "-c", _SENDER, SERVER_TUN4, str(self.port),
                                      str(self.total), str(self.seed), str(self.rate), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.t0 = time.monotonic()
        return self

    def running(self) -> bool:
        return self.sender.poll() is None

    def finish(self, timeout: float = 120) -> dict:
        out, err = self.sender.communicate(timeout=timeout)
        assert self.sender.returncode == 0, f"sender failed: {err}"
        rout, rerr = self.receiver.communicate(timeout=30)
        assert self.receiver.returncode == 0, f"receiver failed: {rerr}"
        sent_n, sent_digest, seconds = out.split()
        got_n, got_digest = rout.split()
        expected = expected_digest(self.total, self.seed)
        assert int(sent_n) == int(got_n) == self.total, (sent_n, got_n, self.total)
        assert sent_digest == got_digest == expected, "the transfer arrived corrupted"
        return {"bytes": self.total, "seconds": float(seconds), "mbit_s": round(self.total * 8 / float(seconds) / 1e6, 1)}


class Iperf:
    """iperf3 server on the server's tunnel address; `run()` one client measurement from `ns`."""

    def __init__(self, topo: Topology, port: int = 5201):
        self.topo, self.port = topo, port
        self.proc = topo.popen(topo.server, "iperf3", "-s", "-B", SERVER_TUN4, "-p", str(port),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert vpn.wait_tcp_listening(topo, topo.server, port), "iperf3 server did not start"

    def run(self, ns: str, seconds: float, *args: str) -> dict:
        r = self.topo.run(ns, "iperf3", "-c", SERVER_TUN4, "-p", str(self.port), "-t", str(seconds), "-J",
                          *args, check=False, timeout=seconds + 30)
        data = json.loads(r.stdout or "{}")
        assert r.returncode == 0 and "error" not in data, f"iperf3 failed: {data.get('error')} {r.stderr}"
        return data

    @staticmethod
    def tcp_mbit(data: dict) -> float:
        return data["end"]["sum_received"]["bits_per_second"] / 1e6

    def stop(self) -> None:
        self.topo.stop(self.proc)


def start_real_client(topo: Topology, ns: str, workdir: Path, keys: vpn.Keys, server: Vpnd, endpoint: str,
                      name: str) -> vpn.Daemon:
    return vpn.start_client(topo, ns, workdir, keys, encode_key(server.public), endpoint, name=name)


class ConnectWatch:
    """Polls a starting vpnclient's status from a thread (while the test measures something else)
    and notes when it is established with its addresses: seconds from `start()`."""

    def __init__(self, topo: Topology, client: vpn.Daemon, limit: float):
        import threading
        self.topo, self.client, self.limit = topo, client, limit
        self.connected_s: float | None = None
        self.last: dict = {}
        self.errors = 0
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while time.monotonic() - self.t0 < self.limit and self.client.proc.poll() is None:
            try:
                st = vpn.status(self.topo, self.client)
            except Exception:          # not answering yet: count, poll again (bounded by limit)
                self.errors += 1
                time.sleep(0.1)
                continue
            self.last = st
            if st.get("state") == "established" and len(st.get("addresses") or []) >= 2:
                self.connected_s = round(time.monotonic() - self.t0, 2)
                return
            time.sleep(0.1)

    def join(self) -> float | None:
        self._thread.join(self.limit + 40)
        return self.connected_s
