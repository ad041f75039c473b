"""End to end: accounts, plans and abuse controls (issue 5), with the real vpnd, vpnclient and nftables.

Every test runs in network namespaces it creates (underlay 198.18.0.0/15, tunnel pools
198.19.0.0/24 and 2001:2:0:100::/64). The accounts registry (SQLite), configs, control sockets and
logs live in a directory made by the `workdir` fixture and removed after the namespaces and
processes. Account changes go through the real `vpnd account|device` commands, which write the
registry; the running vpnd follows it by itself (issue 14).

(a) a free account's second device is refused at registration; an unregistered key is refused at
    the handshake while the first device stays up; swapping devices moves the session; per-account
    bytes per day
(b) suspension kicks the live session (change-to-effect time printed), refuses new handshakes;
    resume lets it back; removing a live device kicks it; a change by another writer arrives too;
    a removed or suspended account leaves no nftables chain and no per-day figures
(c) NAT and egress controls through a router to an internet host; the table goes with vpnd,
    and a table left by a vpnd killed with SIGKILL is replaced on the next start
(g) the per-account cap on new flows per second, updated by set-plan
(d) client to client: blocked by default, allowed when configured
(e) a 20 Mbit/s plan is enforced: at most 1.5 x that (TCP, iperf3, median of 3 x 3 s each way);
    within 20 % of it in tests/soak (make soak)
(f) the registry survives kill -9 in the middle of a write loop (needs no root)
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e import vpn
from tests.e2e.netns import PREFIX, Topology, require_root, wait_until
from tests.e2e.vpn import PORT, SERVER_TUN4, SERVER_TUN6
from vpncore.configfile import encode_key
from vpnd.registry import open_registry
from vpnd.stats import utc_day

pytestmark = pytest.mark.netns

TABLE = f"vpnd_{vpn.SERVER_IF}"
REFUSED = "vpnclient: the server refused this device: "


# -- fixtures and helpers ---------------------------------------------------------------------------

def _topology(workdir, clients):
    """A Topology; `workdir` is a parameter so that it is removed only after the topology closes."""
    require_root()
    topo = Topology(clients=clients)
    try:
        yield topo
    finally:
        topo.close()            # processes (by PID), then namespaces; before workdir goes


@pytest.fixture
def net1(workdir):
    yield from _topology(workdir, 1)


@pytest.fixture
def net2(workdir):
    yield from _topology(workdir, 2)


@dataclass
class Service:
    """A server config naming an accounts registry and a control socket, both inside `workdir`."""

    topo: Topology
    workdir: Path
    keys: vpn.Keys
    config: Path
    server: vpn.Daemon | None = None

    @property
    def socket(self) -> Path:
        return Path(tomllib.loads(self.config.read_text())["server"]["control_socket"])

    @property
    def registry(self) -> Path:
        return self.workdir / "accounts.db"

    def cli(self, *argv: str, ok: bool = True) -> subprocess.CompletedProcess:
        """`vpnd account|device ... --config` (run here: it reaches vpnd by its socket path)."""
        r = subprocess.run([vpn.VPND, *argv, "--config", str(self.config)], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        if ok:
            assert r.returncode == 0 and r.stderr == "", f"{argv}: {r.returncode} {r.stdout}{r.stderr}"
        return r

    def account(self, name: str, plan: str, *devices: vpn.Keys) -> None:
        self.cli("account", "add", name, "--plan", plan)
        for d in devices:
            self.cli("device", "add", name, d.public)

    def start(self, name: str = "vpnd") -> vpn.Daemon:
        self.server = vpn.start_server(self.topo, self.workdir, config=self.config, name=name)
        return self.server

    def stats(self) -> dict:
        r = subprocess.run([vpn.VPND, "stats", "--socket", str(self.socket), "--json"], capture_output=True,
                           text=True, timeout=10, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def today(self) -> dict:
        return self.stats()["days"].get(utc_day(), {"drops": {}, "accounts": {}, "connections": 0})

    def client(self, ns: str, keys: vpn.Keys, name: str, endpoint: str | None = None) -> vpn.Daemon:
        link = self.topo.links[self.topo.clients.index(ns)]
        return vpn.start_client(self.topo, ns, self.workdir, keys, self.keys.public,
                                endpoint or f"{link.server_ip4}:{PORT}", name=name)

    def logs(self, *daemons: vpn.Daemon) -> str:
        return "\n".join(d.log_tail(30) for d in (*daemons, self.server) if d is not None)


def _write_config(path: Path, keys: vpn.Keys, extra: str) -> Path:
    """vpn.write_server_config plus the registry; the control socket is one inside `workdir`."""
    head = 'accounts = "sqlite:accounts.db"\n'
    vpn.write_server_config(path, keys, [], extra=head + extra)
    if "control_socket" not in tomllib.loads(path.read_text())["server"]:   # the harness names none
        vpn.write_server_config(path, keys, [], extra=head + f'control_socket = "{path.with_suffix(".sock")}"\n'
                                + extra)
    return path


def make_service(topo: Topology, workdir: Path, extra: str = "", plans: str = "",
                 name: str = "vpnd.toml") -> Service:
    keys = vpn.genkeys()
    return Service(topo, workdir, keys, _write_config(workdir / name, keys, extra + plans))


def rewrite_config(svc: Service, extra: str = "", plans: str = "", name: str = "vpnd2.toml") -> None:
    """A new config for the same server key and registry (for a restart)."""
    svc.config = _write_config(svc.workdir / name, svc.keys, extra + plans)


def refusal_lines(d: vpn.Daemon) -> list[str]:
    return [line for line in d.log.read_text(errors="replace").splitlines() if "refused" in line]


def _ok(r: subprocess.CompletedProcess) -> bool:
    return r.returncode == 0


# -- (a) device limit -----------------------------------------------------------------------------------

def test_free_account_second_device_refused_first_stays_up(net2, workdir):
    topo = net2
    svc = make_service(topo, workdir)
    phone, laptop = vpn.genkeys(), vpn.genkeys()
    svc.account("alice", "free", phone)
    r = svc.cli("device", "add", "alice", laptop.public, ok=False)
    assert (r.returncode, r.stdout) == (1, "") and r.stderr == (
        "vpnd: error: account 'alice' has 1 device, as many as plan 'free' allows; remove one first "
        "('vpnd device remove')\n"), r.stderr
    svc.start()
    first = svc.client(topo.clients[0], phone, "phone")
    vpn.wait_connected(topo, first, server=svc.server)
    assert _ok(vpn.ping(topo, topo.clients[0], SERVER_TUN4, count=2)), svc.logs(first)

    second = svc.client(topo.clients[1], laptop, "laptop")     # not registered: its handshake is dropped
    assert wait_until(lambda: svc.today()["drops"].get("unknown-key", 0) >= 1, 20), svc.today()
    assert second.proc.poll() is None and vpn.status(topo, second)["state"] != "established"
    vpn.stop(topo, second)

    # The first device never noticed: still up, same process, still carrying traffic both ways.
    assert first.proc.poll() is None
    assert vpn.status(topo, first)["state"] == "established"
    r = vpn.ping(topo, topo.clients[0], SERVER_TUN4, count=3)
    assert _ok(r) and " 3 received" in r.stdout, r.stdout + svc.logs(first)
    assert _ok(vpn.ping(topo, topo.clients[0], SERVER_TUN6, count=1))
    day = svc.today()
    assert svc.stats()["active_sessions"] == 1
    assert day["connections"] >= 1
    # Bytes per account for the day (ping payloads both ways), and no other account appears.
    assert set(day["accounts"]) == {"alice"}, day
    assert day["accounts"]["alice"]["bytes_in"] > 3 * 64 and day["accounts"]["alice"]["bytes_out"] > 3 * 64

    # Swap the devices: the phone's session ends, the laptop connects.
    svc.cli("device", "remove", "alice", phone.public)
    assert vpn.wait_exit(first, 30) == 1
    assert refusal_lines(first)[-1] == REFUSED + "device removed from the account", first.log_tail()
    svc.cli("device", "add", "alice", laptop.public)
    again = vpn.restart_client(topo, second)
    vpn.wait_connected(topo, again, server=svc.server)
    assert _ok(vpn.ping(topo, topo.clients[1], SERVER_TUN4, count=1))


# -- (b) suspension -----------------------------------------------------------------------------------

def test_suspend_kicks_refuses_then_resume(net2, workdir):
    topo = net2
    svc = make_service(topo, workdir)
    alice_dev, bob_dev = vpn.genkeys(), vpn.genkeys()
    svc.account("alice", "plus", alice_dev)
    svc.account("bob", "free", bob_dev)
    svc.start()
    alice = svc.client(topo.clients[0], alice_dev, "alice")
    bob = svc.client(topo.clients[1], bob_dev, "bob")
    vpn.wait_connected(topo, alice, server=svc.server)
    vpn.wait_connected(topo, bob, server=svc.server)
    assert svc.stats()["active_sessions"] == 2
    assert _ok(vpn.ping(topo, topo.clients[0], SERVER_TUN4))
    server_pid = svc.server.pid

    exited_at: list[float] = []
    waiter = threading.Thread(target=lambda: (alice.proc.wait(), exited_at.append(time.monotonic())), daemon=True)
    waiter.start()
    r = svc.cli("account", "suspend", "alice")
    t_done = time.monotonic()
    assert r.stdout == "vpnd: account alice suspended\n", r.stdout
    dropped = wait_until(lambda: svc.stats()["active_sessions"] == 1, 30, interval=0.02)
    t_dropped = time.monotonic() - t_done        # an upper bound: each `vpnd stats` takes a while
    waiter.join(30)
    assert exited_at, f"the suspended client is still running\n{svc.logs(alice)}"
    t_exit = exited_at[0] - t_done
    print(f"\nsuspend: client exited {t_exit * 1000:.0f} ms after the command returned; server's "
          f"active_sessions seen dropping after {t_dropped * 1000:.0f} ms")
    assert dropped, f"active_sessions still {svc.stats()['active_sessions']} 30 s after suspend\n{svc.logs(alice)}"
    assert alice.proc.returncode == 1, f"exit {alice.proc.returncode}\n{svc.logs(alice)}"
    assert refusal_lines(alice) == [REFUSED + "account suspended"], alice.log_tail()

    # Nobody else was dropped, nothing restarted.
    assert svc.server.proc.poll() is None and svc.server.pid == server_pid
    assert bob.proc.poll() is None and vpn.status(topo, bob)["state"] == "established"
    assert _ok(vpn.ping(topo, topo.clients[1], SERVER_TUN4, count=2))

    # New handshakes of the suspended account are refused (the key is no longer accepted).
    unknown0 = svc.today()["drops"].get("unknown-key", 0)
    retry = vpn.restart_client(topo, alice)
    assert wait_until(lambda: svc.today()["drops"].get("unknown-key", 0) > unknown0, 5), \
        "the suspended device's handshake never reached the server"
    time.sleep(0.5)
    assert retry.proc.poll() is None
    st = vpn.status(topo, retry)
    assert st["state"] != "established" and st["addresses"] == [], st
    assert svc.stats()["active_sessions"] == 1
    vpn.stop(topo, retry)

    # Resume: the same device connects again.
    r = svc.cli("account", "resume", "alice")
    assert r.stdout == "vpnd: account alice resumed\n"
    back = vpn.restart_client(topo, retry)
    vpn.wait_connected(topo, back, server=svc.server)
    assert _ok(vpn.ping(topo, topo.clients[0], SERVER_TUN4))
    assert svc.stats()["active_sessions"] == 2

    # A change by another writer of the registry (as the device API is) reaches vpnd the same way.
    other = open_registry(f"sqlite://{svc.registry}")
    other.set_status("bob", "suspended")
    other.close()
    t0 = time.monotonic()
    assert vpn.wait_exit(bob, 30) == 1
    print(f"another writer's suspension: client exited {(time.monotonic() - t0) * 1000:.0f} ms after the commit")
    assert refusal_lines(bob) == [REFUSED + "account suspended"], bob.log_tail()
    assert back.proc.poll() is None and _ok(vpn.ping(topo, topo.clients[0], SERVER_TUN4))

    # Removing a live device ends its session the same way.
    svc.cli("device", "remove", "alice", alice_dev.public)
    assert vpn.wait_exit(back, 30) == 1
    assert refusal_lines(back)[-1] == REFUSED + "device removed from the account", back.log_tail()
    assert wait_until(lambda: svc.stats()["active_sessions"] == 0, 10)

    # Nothing stays of a suspended (bob) or removed (alice) account: no nftables chain or set of
    # theirs, no per-day figures.
    svc.cli("account", "remove", "alice")
    assert wait_until(lambda: "acct" not in topo.run(topo.server, "nft", "list", "table", "inet", TABLE).stdout,
                      30), topo.run(topo.server, "nft", "list", "table", "inet", TABLE).stdout
    assert svc.today()["accounts"] == {}, svc.today()


# -- (c) NAT and egress controls ------------------------------------------------------------------

ROUTER_LINK = ("198.18.50.1/24", "198.18.50.2/24")        # server side, router side
HOST_LINK = ("198.18.51.1/24", "198.18.51.2/24")          # router side, host side
ROUTER_IP, HOST_IP, SERVER_EGRESS_IP = "198.18.50.2", "198.18.51.2", "198.18.50.1"


class Internet:
    """Two more namespaces behind the server: server -- router -- host (the "internet")."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        sfx = topo.suffix
        self.router, self.host = f"{PREFIX}{sfx}-rtr", f"{PREFIX}{sfx}-hst"
        self.server_if, router_in = f"ve{sfx}s", f"ve{sfx}r"
        router_out, host_if = f"vh{sfx}r", f"vh{sfx}h"
        self._created: list[str] = []
        try:
            for ns in (self.router, self.host):
                subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=30)
                self._created.append(ns)
                topo.run(ns, "ip", "link", "set", "dev", "lo", "up")
            subprocess.run(["ip", "link", "add", "name", self.server_if, "netns", topo.server, "type", "veth",
                            "peer", "name", router_in, "netns", self.router], check=True, capture_output=True)
            subprocess.run(["ip", "link", "add", "name", router_out, "netns", self.router, "type", "veth",
                            "peer", "name", host_if, "netns", self.host], check=True, capture_output=True)
            for ns, ifname, cidr in ((topo.server, self.server_if, ROUTER_LINK[0]),
                                     (self.router, router_in, ROUTER_LINK[1]),
                                     (self.router, router_out, HOST_LINK[0]),
                                     (self.host, host_if, HOST_LINK[1])):
                topo.add_address(ns, ifname, cidr)
                topo.run(ns, "ip", "link", "set", "dev", ifname, "up")
            topo.run(self.router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            topo.run(topo.server, "ip", "route", "add", "default", "via", ROUTER_IP)
            topo.run(self.host, "ip", "route", "add", "default", "via", HOST_LINK[0].split("/")[0])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._created.clear()


@pytest.fixture
def internet(workdir):
    require_root()
    topo = Topology(clients=1)
    net = None
    try:
        net = Internet(topo)
        yield topo, net
    finally:
        try:
            topo.close()       # our processes first (some run in the router and host namespaces)
        finally:
            if net is not None:
                net.close()


_LISTEN = textwrap.dedent("""
    import json, select, socket, sys
    socks = []
    for port in map(int, sys.argv[2:]):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(128); socks.append(s)
    open(sys.argv[1], "w").close()
    while True:
        for s in select.select(socks, [], [])[0]:
            c, peer = s.accept()
            print(json.dumps({"port": s.getsockname()[1], "peer": peer[0]}), flush=True)
            c.sendall(b"hello from %d" % s.getsockname()[1]); c.close()
""")

_CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
        print("ok", s.recv(100).decode())
    except socket.timeout:
        print("timeout")
    except OSError as e:
        print("error", e.errno)
""")


def listen(topo: Topology, ns: str, workdir: Path, name: str, *ports: int) -> Path:
    """A TCP listener in `ns` that writes one JSON line per accepted connection to a file."""
    ready, out = workdir / f"{name}.ready", workdir / f"{name}.jsonl"
    with open(out, "w") as f:
        proc = topo.popen(ns, sys.executable, "-c", _LISTEN, str(ready), *map(str, ports), stdout=f,
                          stderr=subprocess.STDOUT)
    assert wait_until(lambda: ready.exists() or proc.poll() is not None, 10) and proc.poll() is None, \
        out.read_text()
    return out


def accepted(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]


def connect(topo: Topology, ns: str, host: str, port: int, timeout: float = 1.5) -> str:
    r = topo.run(ns, sys.executable, "-c", _CONNECT, host, str(port), str(timeout), timeout=timeout + 20)
    return r.stdout.strip()


def table_rules(topo: Topology) -> list[str] | None:
    """The rules of vpnd's table in the server namespace (counters and handles removed), or None."""
    r = topo.run(topo.server, "nft", "list", "table", "inet", TABLE, check=False)
    if r.returncode != 0:
        return None
    rules = []
    for line in r.stdout.splitlines():
        line = re.sub(r"counter packets \d+ bytes \d+", "counter", line.strip())
        if line.endswith(("drop", "masquerade")) or " drop comment " in line:
            rules.append(line)
    return rules


def tables(topo: Topology) -> str:
    return topo.run(topo.server, "nft", "list", "tables").stdout


def by_comment(rules: list[str] | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rules or []:
        m = re.search(r'comment "([^"]+)"', r)
        key = m.group(1) if m else ("masquerade" if r.endswith("masquerade") else r)
        out[key] = out.get(key, 0) + 1
    return out


def test_nat_egress_blocks_and_table_lifecycle(internet, workdir):
    topo, net = internet
    host_log = listen(topo, net.host, workdir, "host", 25, 443)
    router_log = listen(topo, net.router, workdir, "router", 443)
    # Without vpnd the host is reachable from the server itself (so a failure later is vpnd's rule).
    assert connect(topo, topo.server, HOST_IP, 25) == "ok hello from 25"
    assert connect(topo, topo.server, ROUTER_IP, 443) == "ok hello from 443"
    baseline = len(accepted(host_log)), len(accepted(router_log))

    svc = make_service(topo, workdir, extra=(
        f'egress_interface = "{net.server_if}"\n'
        'push_routes = ["198.18.51.0/24", "198.18.50.0/24"]\n'))
    dev = vpn.genkeys()
    svc.account("alice", "plus", dev)
    svc.start()
    client = svc.client(topo.client, dev, "client")
    st = vpn.wait_connected(topo, client, server=svc.server)
    assert "198.18.51.0/24" in st["routes"], st
    assert "dev vpn0" in topo.run(topo.client, "ip", "route", "get", HOST_IP).stdout

    # 443 to the host works, through the NAT: the host sees the server's router-side address.
    # (The router has no route to the tunnel pool, so without masquerade there would be no answer.)
    assert connect(topo, topo.client, HOST_IP, 443) == "ok hello from 443", svc.logs(client)
    # 25 to the same host is dropped, and so is anything to a network attached to the server.
    assert connect(topo, topo.client, HOST_IP, 25) == "timeout"
    assert connect(topo, topo.client, ROUTER_IP, 443) == "timeout"
    host_seen, router_seen = accepted(host_log)[baseline[0]:], accepted(router_log)[baseline[1]:]
    assert host_seen == [{"port": 443, "peer": SERVER_EGRESS_IP}], host_seen
    assert router_seen == [], router_seen
    drops = svc.today()["drops"]
    assert drops.get("egress-blocked-port", 0) >= 1 and drops.get("egress-server-network", 0) >= 1, drops

    rules = table_rules(topo)
    counts = by_comment(rules)
    assert counts == {"blocked-port": 1, "server-network": 2, "masquerade": 2, "flow-cap": 2, "inbound": 1}, rules
    assert any("tcp dport 25" in r for r in rules), rules
    assert any(ROUTER_LINK[0].replace(".1/", ".0/") in r and "10.0.0.0/8" in r for r in rules), rules
    base = sorted(r for r in rules if "flow-cap" not in r)

    # A crash (SIGKILL) leaves the table behind ...
    assert vpn.kill(svc.server) == -signal.SIGKILL
    vpn.stop(topo, client)
    assert table_rules(topo) == rules
    # ... and the next start replaces it: the same base rules once each, the dead run's per-account
    # flow-cap rules gone until a session asks for them again.
    svc.start(name="vpnd-after-crash")        # returns when the TUN is up: the table comes right after
    assert wait_until(lambda: sorted(table_rules(topo) or []) == base, 5), table_rules(topo)
    assert tables(topo).count(TABLE) == 1
    client = vpn.restart_client(topo, client)
    vpn.wait_connected(topo, client, server=svc.server)
    assert wait_until(lambda: by_comment(table_rules(topo)).get("flow-cap") == 2, 5), table_rules(topo)
    assert by_comment(table_rules(topo)) == counts
    assert connect(topo, topo.client, HOST_IP, 443) == "ok hello from 443"
    assert connect(topo, topo.client, HOST_IP, 25) == "timeout"
    assert [a for a in accepted(host_log)[baseline[0]:] if a["port"] == 25] == []

    # A clean stop removes every rule vpnd added.
    assert vpn.stop(topo, svc.server) == 0, svc.server.log_tail()
    assert TABLE not in tables(topo), tables(topo)
    assert table_rules(topo) is None


# -- new flows per second, per account -------------------------------------------------------------

_MANY = textwrap.dedent("""
    import select, socket, sys, time
    host, port, n, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    pending = []
    for _ in range(n):
        s = socket.socket(); s.setblocking(False); s.connect_ex((host, port)); pending.append(s)
    ok = err = 0
    deadline = time.monotonic() + wait
    while pending and time.monotonic() < deadline:
        for s in select.select([], pending, [], 0.05)[1]:
            pending.remove(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                ok += 1
            else:
                err += 1
    print(ok, len(pending), err)
""")


def test_new_flows_per_second_cap(internet, workdir):
    topo, net = internet
    listen(topo, net.host, workdir, "host", 443)
    svc = make_service(topo, workdir, extra=f'egress_interface = "{net.server_if}"\npush_routes = ["198.18.51.0/24"]\n',
                       plans="\n[plans.tight]\ndevices = 1\nnew_flows_per_second = 5\n")
    dev = vpn.genkeys()
    svc.account("alice", "tight", dev)
    svc.start()
    client = svc.client(topo.client, dev, "client")
    vpn.wait_connected(topo, client, server=svc.server)
    assert wait_until(lambda: by_comment(table_rules(topo)).get("flow-cap") == 2, 5), table_rules(topo)
    # 30 connections at once: about the burst (5) gets through, the other SYNs are dropped.
    r = topo.run(topo.client, sys.executable, "-c", _MANY, HOST_IP, "443", "30", "0.8", timeout=30)
    ok, pending, err = map(int, r.stdout.split())
    print(f"\nflow cap 5/s: 30 connections at once: {ok} connected, {pending} unanswered, {err} errors")
    assert err == 0 and 1 <= ok <= 15 and pending >= 15, (ok, pending, err)
    assert svc.today()["drops"].get("egress-flow-cap", 0) >= 15
    # A rate, not a ban: a second later a new connection gets through.
    time.sleep(1.2)
    assert connect(topo, topo.client, HOST_IP, 443) == "ok hello from 443"


def test_set_plan_updates_flow_cap(net1, workdir):
    topo = net1
    svc = make_service(topo, workdir, plans="\n[plans.tight]\ndevices = 1\nnew_flows_per_second = 5\n")
    dev = vpn.genkeys()
    svc.account("alice", "plus", dev)
    svc.start()
    client = svc.client(topo.client, dev, "client")
    vpn.wait_connected(topo, client, server=svc.server)

    def limits() -> list[str]:
        return sorted(re.findall(r"limit rate over (\d+/second)", "\n".join(table_rules(topo) or [])))

    assert wait_until(lambda: limits() == ["200/second"] * 2, 5), table_rules(topo)
    svc.cli("account", "set-plan", "alice", "tight")
    assert client.proc.poll() is None                  # a plan change does not end the session
    assert wait_until(lambda: limits() == ["5/second"] * 2, 3), limits()


# -- (d) client to client ------------------------------------------------------------------------------

def test_client_to_client_blocked_by_default_allowed_when_configured(net2, workdir):
    topo = net2
    svc = make_service(topo, workdir)
    devs = [vpn.genkeys(), vpn.genkeys()]
    svc.account("alice", "free", devs[0])
    svc.account("bob", "free", devs[1])

    def bring_up(tag: str) -> tuple[list[vpn.Daemon], list[tuple[str, str]]]:
        clients, ips = [], []
        for i, ns in enumerate(topo.clients):
            c = svc.client(ns, devs[i], f"c{i}-{tag}")
            ips.append(vpn.tunnel_ips(vpn.wait_connected(topo, c, server=svc.server)))
            clients.append(c)
        return clients, ips

    svc.start()
    clients, ips = bring_up("default")
    for i in (0, 1):            # each reaches the server ...
        assert _ok(vpn.ping(topo, topo.clients[i], SERVER_TUN4)), svc.logs(*clients)
    before = svc.today()["drops"].get("client-to-client", 0)
    for me, other in ((0, 1), (1, 0)):    # ... but not the other client
        for addr in ips[other]:
            assert not _ok(vpn.ping(topo, topo.clients[me], addr, count=1, wait=1)), addr
    assert svc.today()["drops"].get("client-to-client", 0) - before >= 4

    for c in clients:
        vpn.stop(topo, c)
    vpn.stop(topo, svc.server)
    rewrite_config(svc, extra="client_to_client = true\n")
    svc.start(name="vpnd-c2c")
    clients, ips = bring_up("c2c")
    for me, other in ((0, 1), (1, 0)):
        for addr in ips[other]:
            r = vpn.ping(topo, topo.clients[me], addr, count=2)
            assert _ok(r) and " 2 received" in r.stdout, f"{me} -> {addr}: {r.stdout}\n{svc.logs(*clients)}"
    assert svc.today()["drops"].get("client-to-client", 0) == 0


# -- (e) bandwidth cap ---------------------------------------------------------------------------------

RUNS, SECONDS, CAP = 3, 3, 20.0
CAP_CEILING = 1.5       # make test: the cap is enforced at all (uncapped, vpnd moves Gbit/s); the
CAP_TOLERANCE = 0.2     # +-20 % figure depends on the machine's load: tests/soak/test_soak.py (make soak)


def bandwidth_cap(topo: Topology, workdir: Path) -> dict:
    """A CAP Mbit/s plan, iperf3 TCP RUNS x SECONDS s each way: the runs, their medians, the day's
    statistics (the account's bytes, the bucket's drops) checked."""
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed (make deps-system installs it)")
    svc = make_service(topo, workdir, plans=f"\n[plans.capped]\ndevices = 1\nbandwidth_mbit = {CAP:g}\n")
    dev = vpn.genkeys()
    svc.account("alice", "capped", dev)
    svc.start()
    client = svc.client(topo.client, dev, "client")
    vpn.wait_connected(topo, client, server=svc.server)
    topo.popen(topo.server, "iperf3", "-s", "-B", SERVER_TUN4, "-p", "5201",
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert vpn.wait_tcp_listening(topo, topo.server, 5201)

    def transfer(*extra: str) -> tuple[float, int]:
        """One iperf3 run: (Mbit/s, bytes) as measured by the receiving side."""
        for _ in range(3):           # iperf3's server is busy for a moment after each test
            r = topo.run(topo.client, "iperf3", "-c", SERVER_TUN4, "-p", "5201", "-t", str(SECONDS), "-J",
                         *extra, check=False, timeout=SECONDS + 30)
            if r.returncode == 0:
                end = json.loads(r.stdout)["end"]["sum_received"]
                return end["bits_per_second"] / 1e6, int(end["bytes"])
            time.sleep(0.5)
        raise AssertionError(f"iperf3 failed: {r.stdout[-500:]}{r.stderr}\n{svc.logs(client)}")

    up = [transfer() for _ in range(RUNS)]
    down = [transfer("-R") for _ in range(RUNS)]
    med_up, med_down = (statistics.median(m for m, _ in runs) for runs in (up, down))
    print(f"\nbandwidth cap {CAP:g} Mbit/s, TCP, {RUNS} x {SECONDS} s each way: "
          f"upload {', '.join(f'{m:.2f}' for m, _ in up)} (median {med_up:.2f}), "
          f"download {', '.join(f'{m:.2f}' for m, _ in down)} (median {med_down:.2f}) Mbit/s")
    day = svc.today()
    assert day["drops"].get("bandwidth-cap", 0) > 0, day      # the bucket, not the machine, set the pace
    # Bytes per account for the day: at least what iperf3 moved each way (plus headers).
    acct = day["accounts"]["alice"]
    assert acct["bytes_in"] >= sum(b for _, b in up) and acct["bytes_out"] >= sum(b for _, b in down), acct
    return {"cap": CAP, "up": up, "down": down, "median_up": med_up, "median_down": med_down}


def test_bandwidth_cap_20mbit(net1, workdir):
    r = bandwidth_cap(net1, workdir)
    # it moves, and no faster than the cap allows (a busy machine can only make it slower)
    assert 0 < r["median_up"] <= CAP_CEILING * CAP, r
    assert 0 < r["median_down"] <= CAP_CEILING * CAP, r


# -- (f) the registry under kill -9 --------------------------------------------------------------------

_OPS = textwrap.dedent("""
    import base64, hashlib

    def key(i):
        return base64.b64encode(hashlib.sha256(b"device %d" % i).digest()).decode()

    def op(m):
        # add k0, add k1, add k2, remove k0, add k3, remove k1, ...: every state is different
        if m < 2:
            return "device-add", key(m)
        i, remove = 2 + (m - 2) // 2, (m - 2) % 2
        return ("device-remove", key(i - 2)) if remove else ("device-add", key(i))
""")
_ops_ns: dict = {}
exec(_OPS, _ops_ns)     # op(m): the m-th change, the same function the writer below runs
op = _ops_ns["op"]

_WRITER = _OPS + textwrap.dedent("""
    import sys
    from vpnd.registry import open_registry
    path, m = sys.argv[1], int(sys.argv[2])
    reg = open_registry("sqlite://" + path)
    print("ready", flush=True)
    while True:
        print(m, flush=True)                 # change m is in flight (or done)
        kind, k = op(m)
        k = base64.b64decode(k)
        reg.add_device("alice", k) if kind == "device-add" else reg.remove_device("alice", k)
        m += 1
""")


def _state(m: int) -> list[str]:
    """The devices after the first m changes."""
    devices: list[str] = []
    for i in range(m):
        kind, k = op(i)
        devices.append(k) if kind == "device-add" else devices.remove(k)
    return devices


def test_registry_survives_kill9_during_write_loop(workdir):
    rng = random.Random(5)
    path = workdir / "accounts.db"
    first = open_registry(f"sqlite://{path}")
    first.add_account("alice", "plus", utc_day())
    first.close()
    state = functools.lru_cache(maxsize=None)(_state)

    step, rounds, interrupted = 0, 12, 0
    for _ in range(rounds):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(step)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            printed = [line.strip() for line in proc.stdout.read().splitlines()]
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
            proc.stdout.close()
        in_flight = int(printed[-1]) if printed else step
        # The registry opens, and is exactly the state before or after the interrupted change.
        reader = open_registry(f"sqlite://{path}")
        got = sorted(encode_key(k) for k in reader.account("alice").devices)
        for f in reader.files():
            assert os.stat(f).st_mode & 0o777 == 0o600, f
        reader.close()
        before, after = sorted(state(in_flight)), sorted(state(in_flight + 1))
        assert got in (before, after), (in_flight, got, before, after)
        interrupted += bool(printed) and got == before
        step = in_flight if got == before else in_flight + 1
    config = workdir / "v.toml"
    config.write_text('[server]\nprivate_key_file = "missing.key"\n'
                      'address_pool4 = "198.19.0.0/24"\naccounts = "sqlite:accounts.db"\n')
    r = subprocess.run([vpn.VPND, "account", "show", "alice", "--json", "--config", str(config)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert sorted(d["key"] for d in json.loads(r.stdout)["alice"]["devices"]) == sorted(state(step))
    extra = encode_key(rng.randbytes(32))
    r = subprocess.run([vpn.VPND, "device", "add", "alice", extra, "--config", str(config)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    print(f"\nregistry kill -9: {rounds} rounds, {step} changes completed, {interrupted} kills "
          f"left the change in flight undone; opening and the next write unaffected")
