"""Issue 6 end to end: kill switch, DNS through the tunnel, IPv6, locations and failover.

Real vpnd and vpnclient processes in namespaces (`MultiServer`: one client, one or two servers),
a real `tcpdump` on the client's underlay interface(s), a real DNS server (tests/e2e/dnsserver.py)
as vpnd's upstream, `getent` resolving through the client namespace's resolver file
(/etc/netns/<ns>/resolv.conf, which `ip netns exec` shows as /etc/resolv.conf, removed afterwards).
The leak rule (tests/e2e/capture.py): while the kill switch is on, every frame the client sends is
UDP to a server endpoint, or ARP / link-scope ICMPv6 housekeeping that never leaves the link.
Waits are generous and bounded (60 s); how fast the failover is (10 s) is printed here and asserted
by tests/soak/test_timing_soak.py (`make soak`), on the same scenario.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.e2e import vpn
from tests.e2e.capture import Capture, leaks, mac_of, sent_to
from tests.e2e.multi import MultiServer, leftovers
from tests.e2e.netns import require_root, wait_until

pytestmark = pytest.mark.netns

HERE = Path(__file__).parent
PORT = vpn.PORT
NAME, NAME_IP = "leakcheck.vpn.test", "192.0.2.77"
ORIGINAL = b"# resolver of the test namespace: must come back byte for byte\nnameserver 198.18.0.1\n" \
           b"options timeout:1 attempts:1\n"
WHO_PORT = 7000


@pytest.fixture
def net1():
    require_root()
    topo = MultiServer(servers=1)
    try:
        yield topo
    finally:
        topo.close()
        assert leftovers(topo.suffix) == []


@pytest.fixture
def net2():
    require_root()
    topo = MultiServer(servers=2)
    try:
        yield topo
    finally:
        topo.close()
        assert leftovers(topo.suffix) == []


# --- helpers ------------------------------------------------------------------------------------

def start_vpnd(topo: MultiServer, i: int, workdir: Path, keys: vpn.Keys, clients: list[vpn.Keys], *,
               ipv6: bool = True, upstream: str = "127.0.0.1:53") -> subprocess.Popen:
    cfg = workdir / f"vpnd{i}.toml"
    extra = f'dns_upstream = ["{upstream}"]\n'   # control socket: vpnd{i}.sock beside the config
    vpn.write_server_config(cfg, keys, clients, extra=extra)
    if not ipv6:
        cfg.write_text("".join(line + "\n" for line in cfg.read_text().splitlines()
                               if not line.startswith("address_pool6")))
    log = workdir / f"vpnd{i}.log"
    with open(log, "ab") as out:
        proc = topo.popen(topo.server_namespaces[i], vpn.VPND, "serve", "--config", str(cfg),
                          stdout=out, stderr=subprocess.STDOUT)

    def ready():
        r = topo.run(topo.server_namespaces[i], "ss", "-Hlun", "sport = :53", check=False)
        return proc.poll() is not None or vpn.SERVER_TUN4 in r.stdout

    assert wait_until(ready, 60) and proc.poll() is None, log.read_text()
    return proc


def start_dns(topo: MultiServer, i: int, workdir: Path) -> subprocess.Popen:
    ready = workdir / f"dns{i}.ready"
    proc = topo.popen(topo.server_namespaces[i], sys.executable, str(HERE / "dnsserver.py"), "127.0.0.1", "53",
                      str(ready), f"{NAME}={NAME_IP}", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: ready.exists() or proc.poll() is not None, 60) and proc.poll() is None
    return proc


def client_config(path: Path, keys: vpn.Keys, servers: list[tuple[str, str, str, str]], resolv: Path,
                  *, listed: bool = True) -> Path:
    """servers: (name, location, endpoint, public key)."""
    text = (f'[client]\nprivate_key = "{keys.private}"\ncontrol_socket = "{path.with_suffix(".sock")}"\n'
            f'resolv_conf = "{resolv}"\nstate_dir = "{path.parent / "state"}"\n')
    for name, loc, endpoint, pub in servers:
        text += (f'\n[[server]]\nname = "{name}"\nlocation = "{loc}"\n' if listed
                 else f'\n[server]\nname = "{name}"\n')
        text += f'endpoint = "{endpoint}"\npublic_key = "{pub}"\n'
    path.write_text(text)
    path.chmod(0o600)
    return path


def up(topo: MultiServer, cfg: Path, *args: str, log: Path | None = None) -> subprocess.Popen:
    log = log or cfg.with_suffix(".log")
    with open(log, "ab") as out:
        return topo.popen(topo.client_ns, vpn.VPNCLIENT, "up", "--config", str(cfg), *args,
                          stdout=out, stderr=subprocess.STDOUT)


def status(topo: MultiServer, cfg: Path) -> dict:
    r = topo.run(topo.client_ns, vpn.VPNCLIENT, "status", "--config", str(cfg), "--json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def wait_established(topo, cfg: Path, proc, *, server: str | None = None, timeout: float = 60) -> dict:
    last = {}

    def ok():
        nonlocal last
        if proc.poll() is not None:
            return True
        last = status(topo, cfg)
        return (last.get("state") == "established" and last.get("addresses")
                and (server is None or last.get("server") == server))

    wait_until(ok, timeout, 0.1)
    assert proc.poll() is None and ok(), f"not established ({last})\n{cfg.with_suffix('.log').read_text()}"
    return last


def killswitch_table(topo: MultiServer) -> str | None:
    r = topo.run(topo.client_ns, "nft", "list", "table", "inet", "vpnclient_killswitch", check=False)
    return r.stdout if r.returncode == 0 else None


def blocked_count(topo) -> int:
    table = killswitch_table(topo) or ""
    return sum(int(line.split("packets")[1].split()[0]) for line in table.splitlines() if "counter packets" in line)


_ATTEMPTS = textwrap.dedent("""
    import json, socket, sys
    out = {}
    def attempt(name, family, kind, addr):
        s = socket.socket(family, kind)
        s.settimeout(1.0)
        try:
            if kind == socket.SOCK_STREAM:
                s.connect(addr)
            else:
                s.sendto(b"\\x12\\x34\\x01\\x00\\x00\\x01" + bytes(6) + b"\\x03www\\x07example\\x03com\\x00\\x00\\x01\\x00\\x01", addr)
                s.recvfrom(512)
            out[name] = "reached"
        except OSError as e:
            out[name] = type(e).__name__
        finally:
            s.close()
    for spec in json.loads(sys.argv[1]):
        attempt(spec[0], socket.AF_INET6 if ":" in spec[1] else socket.AF_INET,
                socket.SOCK_STREAM if spec[3] == "tcp" else socket.SOCK_DGRAM, (spec[1], spec[2]))
    print(json.dumps(out))
""")


def leak_attempts(topo: MultiServer, link) -> dict:
    """Try to reach the underlay around the tunnel: DNS to the old resolver, TCP, UDP to the endpoint's
    address on another port, IPv6, ping. Every one must fail (and, per the capture, send nothing)."""
    specs = [("dns-udp4", link.server_ip4, 53, "udp"), ("tcp4", link.server_ip4, 22, "tcp"),
             ("udp4-other-port", link.server_ip4, PORT + 1, "udp"), ("dns-udp6", link.server_ip6, 53, "udp"),
             ("tcp6", link.server_ip6, 443, "tcp")]
    r = topo.run(topo.client_ns, sys.executable, "-c", _ATTEMPTS, json.dumps(specs), check=False)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for flag, addr in (("-4", link.server_ip4), ("-6", link.server_ip6)):
        result[f"ping{flag}"] = "reached" if vpn.ping(topo, topo.client_ns, addr, wait=1).returncode == 0 \
            else "no reply"
    return result


def assert_blocked(result: dict) -> None:
    assert "reached" not in result.values(), result
    assert set(result.values()) <= {"PermissionError", "TimeoutError", "no reply"}, result


def assert_no_leaks(cap: Capture, mac: bytes, endpoints: set, must_see: tuple[str, int] | None) -> None:
    dropped = cap.stop()
    frames = cap.frames()
    assert dropped == 0, "tcpdump dropped packets: the check would be incomplete"
    bad = leaks(frames, mac, endpoints)
    assert bad == [], f"{len(bad)} frame(s) left outside the tunnel: {bad[:10]}"
    dns = [f.describe() for f in frames if 53 in (f.sport, f.dport)]
    assert dns == [], f"DNS on the underlay: {dns[:5]}"
    if must_see is not None:
        assert sent_to(frames, mac, must_see) > 0, "the capture saw no tunnel traffic: is it capturing at all?"


def getent(topo: MultiServer, name: str) -> subprocess.CompletedProcess:
    return topo.run(topo.client_ns, "getent", "ahostsv4", name, check=False, timeout=20)


_UDP6_DNS = textwrap.dedent("""
    import socket, struct, sys
    q = struct.pack("!HHHHHH", 0xcafe, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in sys.argv[2].split(".")) + b"\\x00\\x00\\x01\\x00\\x01"
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(q, (sys.argv[1], 53))
    a = s.recv(512)
    assert a[:2] == b"\\xca\\xfe" and a[3] & 15 == 0, a
    print(socket.inet_ntoa(a[-4:]))
""")

_TCP_DNS = textwrap.dedent("""
    import socket, struct, sys
    name = sys.argv[2]
    q = struct.pack("!HHHHHH", 0xbeef, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\x00\\x00\\x01\\x00\\x01"
    s = socket.create_connection((sys.argv[1], 53), timeout=5)
    s.sendall(struct.pack("!H", len(q)) + q)
    n = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
    a = s.recv(n, socket.MSG_WAITALL)
    assert a[:2] == b"\\xbe\\xef" and a[3] & 15 == 0, a
    print(socket.inet_ntoa(a[-4:]))
""")


# --- 1. kill switch and DNS, through connect, SIGKILL, reconnect, down --------------------------

def test_kill_switch_and_dns_survive_sigkill_until_down(net1, tmp_path):
    topo, link = net1, net1.links[0]
    skeys, ckeys = vpn.genkeys(), vpn.genkeys()
    dns = start_dns(topo, 0, tmp_path)
    vpnd = start_vpnd(topo, 0, tmp_path, skeys, [ckeys])
    resolv = topo.netns_resolv_conf(ORIGINAL, 0o640)
    endpoint = (link.server_ip4, PORT)
    cfg = client_config(tmp_path / "client.toml", ckeys, [("home", "", f"{link.server_ip4}:{PORT}", skeys.public)],
                        resolv, listed=False)
    mac = mac_of(topo, topo.client_ns, link.client_if)
    cap = Capture(topo, topo.client_ns, link.client_if, tmp_path / "underlay").start()

    # connect: kill switch before the first packet, DNS pointed at the tunnel
    client = up(topo, cfg)
    st = wait_established(topo, cfg, client)
    assert st["kill_switch"] is True and st["resolver"] == str(resolv) and st["dns"][0] == vpn.SERVER_TUN4
    assert killswitch_table(topo) is not None
    assert b"nameserver 198.19.0.1\n" in resolv.read_bytes()
    log = cfg.with_suffix(".log").read_text()
    for progress in ("resolving 1 server endpoint", "kill switch on", "handshaking with home",
                     "connected to home", "tunnel up on vpn0", "DNS goes through the tunnel"):
        assert progress in log, log
    r = getent(topo, NAME)
    assert r.returncode == 0 and r.stdout.split()[0] == NAME_IP, (r.stdout, r.stderr)
    assert getent(topo, "nothing-here.vpn.test").returncode == 2        # NXDOMAIN comes back too
    r = topo.run(topo.client_ns, sys.executable, "-c", _TCP_DNS, vpn.SERVER_TUN4, NAME, check=False)
    assert r.returncode == 0 and r.stdout.strip() == NAME_IP, r.stderr     # DNS over TCP, through the tunnel
    r = topo.run(topo.client_ns, sys.executable, "-c", _UDP6_DNS, vpn.SERVER_TUN6, NAME, check=False)
    assert r.returncode == 0 and r.stdout.strip() == NAME_IP, r.stderr     # and to the IPv6 tunnel address
    # nothing else gets out; loopback still works
    before = blocked_count(topo)
    assert_blocked(leak_attempts(topo, link))
    assert blocked_count(topo) >= before + 5
    for lo in ("127.0.0.1", "::1"):
        assert vpn.ping(topo, topo.client_ns, lo).returncode == 0
    st = status(topo, cfg)
    human = topo.run(topo.client_ns, vpn.VPNCLIENT, "status", "--config", str(cfg)).stdout
    assert "kill switch" in human and "packets blocked" in human and str(resolv) in human

    # SIGKILL: the kernel's table stays, so does the tunnel resolver; nothing leaks, nothing works
    os.kill(client.pid, signal.SIGKILL)
    client.wait(10)
    assert not vpn.link_exists("vpn0", topo.client_ns)
    assert killswitch_table(topo) is not None
    assert b"198.19.0.1" in resolv.read_bytes()
    assert_blocked(leak_attempts(topo, link))
    assert getent(topo, NAME).returncode != 0

    # the next `up` restores the resolver from the state file first, then re-points it; no gap
    client = up(topo, cfg)
    wait_established(topo, cfg, client)
    assert "restored " + str(resolv) in cfg.with_suffix(".log").read_text()
    state = json.loads((tmp_path / "state" / "vpn0.json").read_text())
    assert base64.b64decode(state["resolver"]["data"]) == ORIGINAL       # the original, not the tunnel's
    r = getent(topo, NAME)
    assert r.returncode == 0 and r.stdout.split()[0] == NAME_IP

    # killed again; `down` with no client running undoes everything
    os.kill(client.pid, signal.SIGKILL)
    client.wait(10)
    assert_blocked(leak_attempts(topo, link))
    assert_no_leaks(cap, mac, {endpoint}, endpoint)
    r = topo.run(topo.client_ns, vpn.VPNCLIENT, "down", "--config", str(cfg), check=False)
    assert r.returncode == 0 and "no client was running" in r.stdout, (r.stdout, r.stderr)
    assert resolv.read_bytes() == ORIGINAL and (resolv.stat().st_mode & 0o777) == 0o640
    assert killswitch_table(topo) is None and os.listdir(tmp_path / "state") == []
    assert vpn.ping(topo, topo.client_ns, link.server_ip4).returncode == 0     # the underlay is back

    # and an orderly run: `down` to the running client restores the same way
    client = up(topo, cfg)
    wait_established(topo, cfg, client)
    r = topo.run(topo.client_ns, vpn.VPNCLIENT, "down", "--config", str(cfg), check=False)
    assert r.returncode == 0, r.stderr
    assert client.wait(60) == 0
    assert resolv.read_bytes() == ORIGINAL and (resolv.stat().st_mode & 0o777) == 0o640
    assert killswitch_table(topo) is None and os.listdir(tmp_path / "state") == []
    assert sorted(os.listdir(resolv.parent)) == ["resolv.conf"]

    # the forwarder answered: the test DNS server saw queries over UDP and TCP; vpnd counted, no names
    r = topo.run(topo.server_namespaces[0], vpn.VPND, "stats", "--socket", str(tmp_path / "vpnd0.sock"),
                 "--json")
    counters = json.loads(r.stdout)["dns"]
    assert counters["queries"] >= 3 and counters["answers"] >= 3 and counters["tcp_connections"] >= 1
    assert NAME not in r.stdout and "leakcheck" not in (tmp_path / "vpnd0.log").read_text()
    dns.send_signal(signal.SIGTERM)
    seen = json.loads(dns.communicate(timeout=30)[0])
    assert seen["udp"] >= 2 and seen["tcp"] >= 1
    topo.stop(vpnd)


# --- 2. failover between two servers: kill switch holding, TCP continuing ------------------------

_WHO = textwrap.dedent("""
    import hashlib, socket, sys, threading
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.SOL_IP, 15, 1)          # IP_FREEBIND
    srv.bind((host, port))
    srv.listen(16)
    def serve(c):
        with c:
            c.settimeout(30)
            h = hashlib.sha256()
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                h.update(b)
            c.sendall(f"{name} {h.hexdigest()}".encode())
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")

_HEARTBEAT = textwrap.dedent("""
    import socket, sys, time, os
    host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    while not os.path.exists(stop):
        t = time.monotonic()
        try:
            s = socket.create_connection((host, port), timeout=0.5)
            s.settimeout(0.5)
            s.sendall(b"ping")
            s.shutdown(socket.SHUT_WR)
            name = s.recv(200).split()[0].decode()
            s.close()
            print(f"{t:.3f} {name}", flush=True)
        except OSError:
            pass
        time.sleep(0.1)
""")

_SEND = textwrap.dedent("""
    import hashlib, random, socket, sys
    host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = random.Random(6).randbytes(total)
    s = socket.create_connection((host, port), timeout=20)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        b = s.recv(256)
        if not b:
            break
        reply += b
    print(reply.decode(), hashlib.sha256(data).hexdigest())
""")


FAILOVER_DEADLINE = 60      # s; measured a few s; make soak asserts 10 s


def failover_two_servers(net2: MultiServer, tmp_path: Path, deadline: float = FAILOVER_DEADLINE) -> dict:
    """alpha is killed (-9): the client moves to beta, TCP goes through beta within `deadline` s, the
    kill switch holding; alpha back, beta stopped (SIGTERM): the client moves back to alpha. Returns
    the figures: the seconds from the kill to the first TCP exchange through beta, and from beta's
    stop to the first through alpha."""
    topo = net2
    skeys = [vpn.genkeys(), vpn.genkeys()]
    ckeys = vpn.genkeys()
    servers = [start_vpnd(topo, i, tmp_path, skeys[i], [ckeys]) for i in (0, 1)]
    for i, name in enumerate(("alpha", "beta")):
        topo.popen(topo.server_namespaces[i], sys.executable, "-c", _WHO, name, vpn.SERVER_TUN4, str(WHO_PORT),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert vpn.wait_tcp_listening(topo, topo.server_namespaces[i], WHO_PORT, 60)
    endpoints = {(link.server_ip4, PORT) for link in topo.links}
    resolv = tmp_path / "resolv.conf"
    resolv.write_bytes(ORIGINAL)
    cfg = client_config(tmp_path / "client.toml", ckeys,
                        [("alpha", "aa", f"{topo.links[0].server_ip4}:{PORT}", skeys[0].public),
                         ("beta", "bb", f"{topo.links[1].server_ip4}:{PORT}", skeys[1].public)], resolv)
    macs = [mac_of(topo, topo.client_ns, link.client_if) for link in topo.links]
    caps = [Capture(topo, topo.client_ns, link.client_if, tmp_path / f"underlay{i}").start()
            for i, link in enumerate(topo.links)]

    client = up(topo, cfg)
    st = wait_established(topo, cfg, client, server="alpha")
    assert st["servers"] == 2 and st["failovers"] == 0
    stop_file = tmp_path / "heartbeat.stop"
    beat_log = tmp_path / "heartbeat.log"
    with open(beat_log, "wb") as out:
        beat = topo.popen(topo.client_ns, sys.executable, "-c", _HEARTBEAT, vpn.SERVER_TUN4, str(WHO_PORT),
                          str(stop_file), stdout=out, stderr=subprocess.STDOUT)

    def beats():
        return [line.split() for line in beat_log.read_text().splitlines() if len(line.split()) == 2]

    assert wait_until(lambda: len(beats()) >= 3, 60), beat_log.read_text()
    assert {name for _, name in beats()} == {"alpha"}

    t_kill = time.monotonic()
    os.kill(servers[0].pid, signal.SIGKILL)              # alpha stops answering, without a word
    servers[0].wait(10)
    assert_blocked(leak_attempts(topo, topo.links[1]))   # the kill switch holds during the switch
    assert wait_until(lambda: any(name == "beta" for _, name in beats()), deadline), \
        f"no TCP through beta within {deadline} s\n{cfg.with_suffix('.log').read_text()}"
    first_beta = min(float(t) for t, name in beats() if name == "beta")
    print(f"\nTCP through the second server {first_beta - t_kill:.1f} s after the first was killed")
    st = wait_established(topo, cfg, client, server="beta")
    assert st["failovers"] == 1 and st["server_endpoint"] == f"{topo.links[1].server_ip4}:{PORT}"
    assert "alpha (aa) stopped answering; switching to beta (bb)" in cfg.with_suffix(".log").read_text()

    # TCP keeps going through the new server: a checksummed 4 MiB transfer
    r = topo.run(topo.client_ns, sys.executable, "-c", _SEND, vpn.SERVER_TUN4, str(WHO_PORT), str(4 << 20),
                 check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    who, theirs, ours = r.stdout.split()
    assert who == "beta" and theirs == ours

    # alpha is back; beta shuts down (SIGTERM: it tells its clients): the client moves at once
    start_vpnd(topo, 0, tmp_path, skeys[0], [ckeys])
    t_stop = time.monotonic()
    topo.stop(servers[1])
    st = wait_established(topo, cfg, client, server="alpha", timeout=deadline)
    assert st["failovers"] == 2

    def alpha_since_stop() -> list[float]:
        return [float(t) for t, name in beats() if name == "alpha" and float(t) > t_stop]
    assert wait_until(lambda: alpha_since_stop() and beats()[-1][1] == "alpha", deadline), \
        f"no TCP through alpha within {deadline} s of beta's stop: {beats()[-5:]}"
    back = min(alpha_since_stop()) - t_stop
    print(f"TCP through alpha again {back:.1f} s after beta stopped")
    assert "beta (bb) closed the session: server shutting down; switching servers" in \
        cfg.with_suffix(".log").read_text()
    stop_file.touch()
    beat.wait(30)

    assert_no_leaks(caps[0], macs[0], endpoints, (topo.links[0].server_ip4, PORT))
    assert_no_leaks(caps[1], macs[1], endpoints, (topo.links[1].server_ip4, PORT))
    r = topo.run(topo.client_ns, vpn.VPNCLIENT, "down", "--config", str(cfg), check=False)
    assert r.returncode == 0 and client.wait(60) == 0
    assert killswitch_table(topo) is None and resolv.read_bytes() == ORIGINAL
    return {"failover_after_kill_s": round(first_beta - t_kill, 2), "back_after_stop_s": round(back, 2)}


def test_failover_to_the_second_server(net2, tmp_path):
    failover_two_servers(net2, tmp_path)


# --- 3. choosing a server: --location and --fastest ---------------------------------------------

def test_location_and_fastest(net2, tmp_path):
    topo = net2
    skeys = [vpn.genkeys(), vpn.genkeys()]
    ckeys = vpn.genkeys()
    servers = [start_vpnd(topo, i, tmp_path, skeys[i], [ckeys]) for i in (0, 1)]
    resolv = tmp_path / "resolv.conf"
    cfg = client_config(tmp_path / "client.toml", ckeys,
                        [("alpha", "aa", f"{topo.links[0].server_ip4}:{PORT}", skeys[0].public),
                         ("beta", "bb", f"{topo.links[1].server_ip4}:{PORT}", skeys[1].public)], resolv)

    def run_until_established(*args, server=None):
        log = tmp_path / f"up{len(list(tmp_path.glob('up*.log')))}.log"
        proc = up(topo, cfg, *args, log=log)
        st = wait_established(topo, cfg, proc, server=server)
        r = topo.run(topo.client_ns, vpn.VPNCLIENT, "down", "--config", str(cfg), check=False)
        assert r.returncode == 0 and proc.wait(60) == 0, r.stderr
        assert killswitch_table(topo) is None and not resolv.exists()
        return st, log.read_text()

    st, _ = run_until_established("--location", "BB", server="beta")
    assert st["servers"] == 1 and st["location"] == "bb"

    st, log = run_until_established("--fastest")
    rtts = [line.split() for line in log.splitlines() if line.strip().endswith(" ms")]
    assert len(rtts) == 2 and {r[1] for r in rtts} == {"alpha", "beta"}, log
    assert st["server"] == rtts[0][1]           # the first listed is the fastest, and the one used
    assert "handshaking with" not in log        # its measured handshake is the session: no second one

    topo.stop(servers[0])                       # alpha gone (SIGTERM): --fastest must pick beta
    st, log = run_until_established("--fastest", server="beta")
    assert any("alpha" in line and line.strip().endswith("no answer") for line in log.splitlines()), log


# --- 4. IPv6: a server without IPv6 leaves none, and --no-kill-switch is really off --------------

def test_no_ipv6_from_the_server_means_no_ipv6_at_all(net1, tmp_path):
    topo, link = net1, net1.links[0]
    skeys, ckeys = vpn.genkeys(), vpn.genkeys()
    start_vpnd(topo, 0, tmp_path, skeys, [ckeys], ipv6=False)
    resolv = tmp_path / "resolv.conf"
    cfg = client_config(tmp_path / "client.toml", ckeys, [("v4only", "xx", f"{link.server_ip4}:{PORT}", skeys.public)],
                        resolv)
    mac = mac_of(topo, topo.client_ns, link.client_if)
    cap = Capture(topo, topo.client_ns, link.client_if, tmp_path / "underlay").start()
    client = up(topo, cfg)
    st = wait_established(topo, cfg, client)
    assert st["addresses"] == ["198.19.0.2/24"]
    table = killswitch_table(topo)
    assert "meta nfproto ipv6 accept" not in table and "meta nfproto ipv4 accept" in table
    assert "IPv6 is blocked" in cfg.with_suffix(".log").read_text()
    assert vpn.ping(topo, topo.client_ns, vpn.SERVER_TUN4).returncode == 0          # IPv4 through the tunnel
    assert_blocked(leak_attempts(topo, link))                                       # v4 and v6 outside
    r = topo.run(topo.client_ns, "ping", "-6", "-c1", "-W1", "-I", "vpn0", "ff02::1", check=False)
    assert r.returncode != 0                                                        # nor IPv6 into the tunnel
    assert_no_leaks(cap, mac, {(link.server_ip4, PORT)}, (link.server_ip4, PORT))
    r = topo.run(topo.client_ns, vpn.VPNCLIENT, "down", "--config", str(cfg), check=False)
    assert r.returncode == 0 and client.wait(60) == 0

    # the opt-out: no table at all, the underlay is reachable around the tunnel
    cap = Capture(topo, topo.client_ns, link.client_if, tmp_path / "opt-out").start()
    client = up(topo, cfg, "--no-kill-switch", log=tmp_path / "no-kill-switch.log")
    st = wait_established(topo, cfg, client)
    assert st["kill_switch"] is False and killswitch_table(topo) is None
    assert vpn.ping(topo, topo.client_ns, link.server_ip4).returncode == 0
    attempts = leak_attempts(topo, link)
    assert attempts["ping-4"] == attempts["ping-6"] == "reached"
    cap.stop()
    found = leaks(cap.frames(), mac, {(link.server_ip4, PORT)})     # the checker sees leaks when they happen
    assert any("-> 198.18.0.1 proto 17 " in f and "->53 " in f for f in found), found
    assert any(f.startswith("IPv6 ") and "proto 58" in f for f in found), found
    log = (tmp_path / "no-kill-switch.log").read_text()
    assert "no kill switch: traffic can leave outside the tunnel" in log and "kill switch on" not in log
    r = topo.run(topo.client_ns, vpn.VPNCLIENT, "down", "--config", str(cfg), check=False)
    assert r.returncode == 0 and client.wait(60) == 0
