"""End to end: the real vpnd and vpnclient in network namespaces (DESIGN §5).

Real TUN devices, real ping, real TCP; traffic only inside the namespaces the fixtures create.
Waits are generous and bounded (60 s): the figures a busy machine can miss without a defect (the
client recovering within 10 s of a server restart, nearly all genuine datagrams arriving) are printed
here and asserted by tests/soak/test_timing_soak.py (`make soak`), on the same scenarios.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import random
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e import vpn
from tests.e2e.netns import Topology, link_exists, wait_until
from tests.e2e.vpn import POOL4, POOL6, PORT, SERVER_TUN4, SERVER_TUN6

pytestmark = pytest.mark.netns


@dataclass
class Vpn:
    topo: Topology
    workdir: Path
    server: vpn.Daemon
    clients: list[vpn.Daemon]
    statuses: list[dict]

    @property
    def client(self) -> vpn.Daemon:
        return self.clients[0]


def _bring_up(topo: Topology, workdir: Path, endpoints: list[str], extra: str = "") -> Vpn:
    server_keys = vpn.genkeys()
    client_keys = [vpn.genkeys() for _ in endpoints]
    server = vpn.start_server(topo, workdir, server_keys, client_keys, extra=extra, timeout=60)
    clients, statuses = [], []
    for ns, keys, endpoint in zip(topo.clients, client_keys, endpoints):
        c = vpn.start_client(topo, ns, workdir, keys, server_keys.public, endpoint)
        clients.append(c)
        statuses.append(vpn.wait_connected(topo, c, 60, server=server))   # one at a time: known addresses
    return Vpn(topo, workdir, server, clients, statuses)


@pytest.fixture
def one(topology, tmp_path) -> Vpn:
    """vpnd plus one connected client (IPv4 underlay endpoint)."""
    return _bring_up(topology, tmp_path, [f"{topology.link.server_ip4}:{PORT}"])


def _ok(r: subprocess.CompletedProcess) -> bool:
    return r.returncode == 0


# -- (a) ping over IPv4 and IPv6 ----------------------------------------------------------------

def test_ping_server_tunnel_address_v4_and_v6(one):
    topo = one.topo
    assert one.statuses[0]["addresses"] == ["198.19.0.2/24", "2001:2:0:100::2/64"]
    for addr in (SERVER_TUN4, SERVER_TUN6):
        r = vpn.ping(topo, topo.client, addr, count=3)
        assert _ok(r), f"ping {addr}: {r.stdout}{r.stderr}\n{one.client.log_tail()}\n{one.server.log_tail()}"
        assert " 3 received" in r.stdout, r.stdout
    # The tunnel addresses are only reachable through the tunnel: the client's route says vpn0.
    route = topo.run(topo.client, "ip", "route", "get", SERVER_TUN4).stdout
    assert "dev vpn0" in route, route


# -- (b) a TCP transfer with a checksum ---------------------------------------------------------

_RECEIVER = textwrap.dedent("""
    import hashlib, socket, sys
    host, port, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(1)
    srv.settimeout(60)
    open(ready, "w").close()
    conn, _ = srv.accept()
    conn.settimeout(60)
    h, n = hashlib.sha256(), 0
    while True:
        b = conn.recv(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
    print(n, h.hexdigest(), flush=True)
""")

_SENDER = textwrap.dedent("""
    import hashlib, random, socket, sys
    host, port, total, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng, h, sent = random.Random(seed), hashlib.sha256(), 0
    s = socket.create_connection((host, port), timeout=60)
    while sent < total:
        chunk = rng.randbytes(min(1 << 16, total - sent))
        s.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)          # the receiver closes after reading everything
    print(sent, h.hexdigest(), flush=True)
""")


def _expected_digest(total: int, seed: int) -> str:
    rng, h, n = random.Random(seed), hashlib.sha256(), 0
    while n < total:
        chunk = rng.randbytes(min(1 << 16, total - n))
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest()


def test_tcp_transfer_20mb_checksum(one):
    topo = one.topo
    total, seed, port = 20 * 1024 * 1024 + 12345, 20240601, 5001
    ready = one.workdir / "receiver.ready"
    before = vpn.status(topo, one.client)
    receiver = topo.popen(topo.server, sys.executable, "-c", _RECEIVER, SERVER_TUN4, str(port), str(ready),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: ready.exists() or receiver.poll() is not None, 60) and receiver.poll() is None
    sender = topo.run(topo.client, sys.executable, "-c", _SENDER, SERVER_TUN4, str(port), str(total), str(seed),
                      check=False, timeout=180)
    assert sender.returncode == 0, sender.stderr
    out, err = receiver.communicate(timeout=60)
    assert receiver.returncode == 0, err
    received_n, received_digest = out.split()
    sent_n, sent_digest = sender.stdout.split()
    expected = _expected_digest(total, seed)
    assert int(sent_n) == int(received_n) == total
    assert sent_digest == received_digest == expected
    # And it really went through the tunnel: the client encrypted at least that much.
    after = vpn.status(topo, one.client)
    assert after["bytes_out"] - before["bytes_out"] >= total


# -- (c) two clients reach each other through the server ----------------------------------------

def test_two_clients_ping_each_other(topology2, tmp_path):
    topo = topology2
    endpoints = [f"{topo.links[0].server_ip4}:{PORT}",      # client 0 over the IPv4 underlay
                 f"[{topo.links[1].server_ip6}]:{PORT}"]     # client 1 over the IPv6 underlay
    v = _bring_up(topo, tmp_path, endpoints, extra="client_to_client = true\n")
    ips = [vpn.tunnel_ips(st) for st in v.statuses]
    assert ips == [("198.19.0.2", "2001:2:0:100::2"), ("198.19.0.3", "2001:2:0:100::3")]
    host, port = v.statuses[1]["server_endpoint"].rsplit(":", 1)
    assert ipaddress.ip_address(host.strip("[]")) == ipaddress.ip_address(topo.links[1].server_ip6)
    assert int(port) == PORT
    for me, other in ((0, 1), (1, 0)):
        for addr in ips[other]:
            r = vpn.ping(topo, topo.clients[me], addr, count=2)
            assert _ok(r), f"client {me} -> {addr}: {r.stdout}{r.stderr}"
    # Without the tunnel there is no path: the server namespace does not forward the underlay.
    assert not _ok(vpn.ping(topo, topo.clients[0], topo.links[1].client_ip4, count=1))


# -- (d) a spoofed inner source is dropped by the server ----------------------------------------

_LISTENER = textwrap.dedent("""
    import json, select, socket, sys, time
    port, ready = int(sys.argv[1]), sys.argv[2]
    s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s4.bind(("0.0.0.0", port))
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); s6.bind(("::", port))
    open(ready, "w").close()
    seen, ends, deadline = [], set(), time.monotonic() + 120
    while len(ends) < 2 and time.monotonic() < deadline:
        for s in select.select([s4, s6], [], [], 0.2)[0]:
            data, src = s.recvfrom(2048)
            seen.append([src[0], data[:8].decode(errors="replace")])
            if data.startswith(b"END"):
                ends.add(s.family)
    print(json.dumps(seen), flush=True)
""")

_SEND_FROM = textwrap.dedent("""
    import socket, sys
    port, count, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
    for pair in sys.argv[4:]:
        src, dst = pair.split(",")
        s = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        for i in range(count):
            s.sendto(tag.ljust(500, b"."), (dst, port))
        s.close()
""")


def spoofed_inner_source(one: Vpn) -> dict:
    """Datagrams from tunnel addresses the client was not given are dropped by the server; genuine
    ones arrive. Returns the figures (how many of the 20 genuine ones arrived: nearly all on a veth,
    at least 10 asserted by tests/soak/test_timing_soak.py; here at least one of each family)."""
    topo, ns, port = one.topo, one.topo.client, 5002
    real4, real6 = vpn.tunnel_ips(one.statuses[0])
    fake4, fake6 = "198.19.0.77", "2001:2:0:100::77"
    topo.add_address(ns, "vpn0", f"{fake4}/32")      # the kernel lets us send from these on vpn0
    topo.add_address(ns, "vpn0", f"{fake6}/128")
    ready = one.workdir / "listener.ready"
    listener = topo.popen(topo.server, sys.executable, "-c", _LISTENER, str(port), str(ready),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: ready.exists() or listener.poll() is not None, 60) and listener.poll() is None

    def send(tag: str, count: int, *pairs: str) -> None:
        r = topo.run(ns, sys.executable, "-c", _SEND_FROM, str(port), str(count), tag, *pairs, check=False)
        assert r.returncode == 0, r.stderr

    before = vpn.status(topo, one.client)
    send("SPOOF", 10, f"{fake4},{SERVER_TUN4}", f"{fake6},{SERVER_TUN6}")
    # ping from the spoofed source gets nothing back either
    assert not _ok(vpn.ping(topo, ns, SERVER_TUN4, count=2, wait=1, source=fake4))
    # The client did encrypt and send the spoofed datagrams (20 x 500 bytes of payload)...
    mid = {}

    def encrypted() -> bool:
        nonlocal mid
        mid = vpn.status(topo, one.client)
        return mid["bytes_out"] - before["bytes_out"] >= 20 * 500
    assert wait_until(encrypted, 60, interval=0.5), (before, mid)
    send("REAL", 10, f"{real4},{SERVER_TUN4}", f"{real6},{SERVER_TUN6}")
    send("END", 3, f"{real4},{SERVER_TUN4}", f"{real6},{SERVER_TUN6}")
    out, err = listener.communicate(timeout=150)
    assert listener.returncode == 0, err
    seen = json.loads(out)
    sources = {src for src, _ in seen}
    # ...but the server let none of them out of its TUN, while the genuine ones arrived.
    assert fake4 not in sources and fake6 not in sources, seen
    assert not [tag for _, tag in seen if tag.startswith("SPOOF")], seen
    real = [(src, tag) for src, tag in seen if tag.startswith("REAL")]
    assert {src for src, _ in real} == {real4, real6}, seen
    assert _ok(vpn.ping(topo, ns, SERVER_TUN4, count=1, source=real4))
    return {"genuine_sent": 20, "genuine_arrived": len(real), "spoofed_sent": 20,
            "spoofed_arrived": sum(1 for _, tag in seen if tag.startswith("SPOOF"))}


def test_spoofed_inner_source_is_dropped(one):
    figures = spoofed_inner_source(one)
    print(f"\nspoofed inner source: {json.dumps(figures)}")


# -- (e) the server crashes and restarts; the client recovers by itself --------------------------

RECOVERY_DEADLINE = 60      # s; measured about 7 s (DEAD_PEER_TIMEOUT + a handshake); make soak: 10 s


def server_restart_recovery(one: Vpn, deadline: float = RECOVERY_DEADLINE) -> float:
    """kill -9 of vpnd, restart with the same config: the untouched client's ping gets through again
    within `deadline` s. Returns the seconds from the restart to the first reply."""
    topo = one.topo
    assert _ok(vpn.ping(topo, topo.client, SERVER_TUN4))
    client_pid = one.client.pid
    assert vpn.kill(one.server) == -9
    assert not _ok(vpn.ping(topo, topo.client, SERVER_TUN4, wait=1))
    t0 = time.monotonic()
    server2 = vpn.start_server(topo, one.workdir, config=one.server.config, name="vpnd-restarted", timeout=60)
    recovered = False
    while not recovered and time.monotonic() - t0 < deadline:    # bounded: ping -W1 each
        recovered = _ok(vpn.ping(topo, topo.client, SERVER_TUN4, count=1, wait=1))
    elapsed = time.monotonic() - t0
    assert recovered, f"no traffic within {deadline} s of the restart\n{one.client.log_tail()}\n{server2.log_tail()}"
    print(f"\nclient recovered {elapsed:.1f} s after the restart")
    assert one.client.proc.poll() is None and one.client.pid == client_pid   # untouched client
    st = vpn.status(topo, one.client)
    assert st["state"] == "established"
    assert _ok(vpn.ping(topo, topo.client, SERVER_TUN6, count=3, wait=2))
    return elapsed


def test_server_restart_client_recovers(one):
    server_restart_recovery(one)


# -- (f) status, down, SIGTERM -------------------------------------------------------------------

def test_status_down_and_sigterm(one):
    topo, client = one.topo, one.client
    st = one.statuses[0]
    assert st["state"] == "established"
    assert st["interface"] == "vpn0"
    assert st["server_endpoint"] == f"{topo.link.server_ip4}:{PORT}"
    assert isinstance(st["handshake_age_s"], (int, float)) and st["handshake_age_s"] >= 0
    v4, v6 = (ipaddress.ip_interface(a) for a in st["addresses"])
    assert v4.network == ipaddress.ip_network(POOL4) and v6.network == ipaddress.ip_network(POOL6)
    before = vpn.status(topo, client)
    r = vpn.ping(topo, topo.client, SERVER_TUN4, count=5, size=1000)
    assert _ok(r), r.stdout
    after = vpn.status(topo, client)
    assert after["bytes_out"] - before["bytes_out"] >= 5 * 1000
    assert after["bytes_in"] - before["bytes_in"] >= 5 * 1000
    assert after["handshake_age_s"] >= before["handshake_age_s"]     # same handshake, older
    human = topo.run(topo.client, vpn.VPNCLIENT, "status", "--socket", str(client.socket)).stdout
    assert "established" in human and "198.19.0.2/24" in human

    # `vpnclient down`: the foreground `up` exits 0 and takes its TUN device with it.
    assert vpn.tun_exists(topo, client)
    r = topo.run(topo.client, vpn.VPNCLIENT, "down", "--socket", str(client.socket), check=False)
    assert r.returncode == 0, r.stderr
    assert vpn.wait_exit(client, 60) == 0, client.log_tail()
    assert not link_exists("vpn0", topo.client)
    assert not client.socket.exists()
    r = topo.run(topo.client, vpn.VPNCLIENT, "status", "--socket", str(client.socket), check=False)
    assert r.returncode == 1 and "not running" in r.stderr

    # Again, then SIGTERM to `up` (by PID): the TUN device disappears too.
    again = vpn.restart_client(topo, client)
    vpn.wait_connected(topo, again, 60, server=one.server)
    assert _ok(vpn.ping(topo, topo.client, SERVER_TUN4))
    assert vpn.stop(topo, again, 60) == 0
    assert not link_exists("vpn0", topo.client)
    assert not again.socket.exists()
