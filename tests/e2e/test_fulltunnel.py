"""Full tunnel off-link, as on the internet (issue 12): the web host sees the server, never the user.

The topology is `tests.e2e.internet.Internet`: the client behind a NATing home router, the servers
and a web host on an "internet" router, a DNS server on the internet reached by vpnd only. vpnd runs
with `full_tunnel = true` (NAT out of the interface of its default route; an IPv6 ULA pool, so IPv6
is NATed too) and the client with its defaults (kill switch on). Checked with real processes:

- the web host sees the server's address over IPv4 and IPv6 (and the home router's address without
  the tunnel: the check can fail); names resolve through vpnd's forwarder;
- a capture on the client's underlay holds nothing the client sent but datagrams to a server
  endpoint, through connect, transfer, SIGKILL, restart and failover to a second server;
- `ip rule` and every routing table are the same before `up` and after `down` (test_client_fulltunnel
  checks the same after SIGKILL + `down`);
- `exclude`, `allow_lan` and `bypass` reach their destinations outside the tunnel, and the capture
  shows nothing else leaving outside it;
- vpnd forwards with an iptables-style `FORWARD DROP` policy in the server namespace, and a
  connection opened from the internet towards a client's tunnel address fails;
- after the sessions end, the server namespace's conntrack table holds no client address.
"""

from __future__ import annotations

import difflib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e import internet as net
from tests.e2e import vpn
from tests.e2e.capture import Capture, leaks, mac_of, sent_to
from tests.e2e.netns import require_root, wait_until

pytestmark = pytest.mark.netns

HERE = Path(__file__).resolve().parent
POOL6 = "fd00:100::/64"            # a ULA pool: vpnd NATs IPv6 too
SERVER_TUN6 = vpn.server_tun6(POOL6)
NAME, NAME_IP = "www.fulltunnel.test", "198.18.46.2"
RESOLV = b"# the client namespace's resolver before the tunnel\nnameserver 198.18.45.53\n"


@pytest.fixture
def inet():
    require_root()
    topo = net.Internet(servers=1)
    try:
        yield topo
    finally:
        topo.close()


@pytest.fixture
def inet2():
    require_root()
    topo = net.Internet(servers=2)
    try:
        yield topo
    finally:
        topo.close()


# --- helpers ------------------------------------------------------------------------------------

def start_vpnd(topo: net.Internet, i: int, workdir: Path, keys: vpn.Keys, clients: list[vpn.Keys],
               extra: str = "") -> vpn.Daemon:
    return vpn.start_server(topo, workdir, keys, clients, name=f"vpnd{i}", ns=topo.server_namespaces[i],
                            pool6=POOL6, extra=f'full_tunnel = true\ndns_upstream = ["{net.DNS4}:53"]\n' + extra)


def start_dns(topo: net.Internet, workdir: Path) -> subprocess.Popen:
    ready = workdir / "dns.ready"
    proc = topo.popen(topo.inet, sys.executable, str(HERE / "dnsserver.py"), net.DNS4, "53", str(ready),
                      f"{NAME}={NAME_IP}", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: ready.exists() or proc.poll() is not None, 10) and proc.poll() is None
    return proc


def client_config(path: Path, keys: vpn.Keys, servers: list[tuple[str, str, str]], resolv: Path,
                  extra: str = "") -> Path:
    """servers: (name, endpoint, public key), in failover order."""
    text = (f'[client]\nprivate_key = "{keys.private}"\ncontrol_socket = "{path.with_suffix(".sock")}"\n'
            f'resolv_conf = "{resolv}"\nstate_dir = "{path.parent / "state"}"\n' + extra)
    for name, endpoint, pub in servers:
        text += f'\n[[server]]\nname = "{name}"\nlocation = "xx"\nendpoint = "{endpoint}"\npublic_key = "{pub}"\n'
    path.write_text(text)
    path.chmod(0o600)
    return path


def up(topo: net.Internet, cfg: Path, *args: str) -> subprocess.Popen:
    with open(cfg.with_suffix(".log"), "ab") as out:
        return topo.popen(topo.client, vpn.VPNCLIENT, "up", "--config", str(cfg), *args,
                          stdout=out, stderr=subprocess.STDOUT)


def status(topo: net.Internet, cfg: Path) -> dict:
    r = topo.run(topo.client, vpn.VPNCLIENT, "status", "--config", str(cfg), "--json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def wait_established(topo: net.Internet, cfg: Path, proc, *, server: str | None = None,
                     timeout: float = 15) -> dict:
    last: dict = {}

    def ok():
        nonlocal last
        if proc.poll() is not None:
            return True
        last = status(topo, cfg)
        return (last.get("state") == "established" and len(last.get("addresses") or []) >= 2
                and (server is None or last.get("server") == server))

    wait_until(ok, timeout, 0.1)
    assert proc.poll() is None and ok(), f"not established ({last})\n{cfg.with_suffix('.log').read_text()}"
    return last


def down(topo: net.Internet, cfg: Path) -> subprocess.CompletedProcess:
    r = topo.run(topo.client, vpn.VPNCLIENT, "down", "--config", str(cfg), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def wait_web(topo: net.Internet, expect: str, ipv6: bool = False, timeout: float = 10) -> str | None:
    """What the web host saw, retried until it is `expect` (a tunnel may need a moment after a switch)."""
    seen = None

    def ok():
        nonlocal seen
        seen = topo.seen_by_web(ipv6=ipv6, timeout=2)
        return seen == expect
    wait_until(ok, timeout, 0.2)
    return seen


def assert_same_routing(now: dict, before: dict, when: str) -> None:
    """Rules and tables as they were; the message is a diff of what differs."""
    for key in before:
        if now[key] != before[key]:
            diff = "\n".join(difflib.unified_diff(before[key].splitlines(), now[key].splitlines(), lineterm=""))
            raise AssertionError(f"{key} differs {when}:\n{diff}")


def conntrack_dump(topo: net.Internet, ns: str) -> str:
    r = topo.run(ns, "conntrack", "-L", check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


_TRANSFER = textwrap.dedent("""
    import hashlib, socket, sys, urllib.request
    # 4 MiB each way over HTTP would need a server; a TCP echo to the web host's port is not there,
    # so: 20 GETs, each a new TCP connection through the tunnel
    for _ in range(20):
        with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
            assert r.read().strip() == sys.argv[2].encode(), "wrong source address"
    print("ok")
""")


# --- 1. the web host sees the server; DNS through the tunnel; nothing else on the underlay --------

def test_full_tunnel_web_host_sees_the_server_not_the_user(inet2, tmp_path):
    topo = inet2
    skeys, ckeys = [vpn.genkeys(), vpn.genkeys()], vpn.genkeys()
    topo.start_web()
    dns = start_dns(topo, tmp_path)
    # without the tunnel the check can fail: the web host sees the home router, and IPv6 the client itself
    assert topo.seen_by_web() == net.HOME_OUT4 and topo.seen_by_web(ipv6=True) == net.CLIENT6
    vpnds = [start_vpnd(topo, i, tmp_path, skeys[i], [ckeys]) for i in range(2)]
    resolv = topo.netns_resolv_conf(RESOLV)
    before = topo.snapshot_routing()
    cfg = client_config(tmp_path / "client.toml", ckeys,
                        [(f"s{i}", f"{net.SERVERS4[i]}:{vpn.PORT}", skeys[i].public) for i in range(2)], resolv)
    endpoints = {(net.SERVERS4[i], vpn.PORT) for i in range(2)}
    mac = mac_of(topo, topo.client, topo.client_if)
    cap = Capture(topo, topo.client, topo.client_if, tmp_path / "underlay").start()

    client = up(topo, cfg)
    st = wait_established(topo, cfg, client, server="s0")
    assert wait_web(topo, net.SERVERS4[0]) == net.SERVERS4[0]
    assert wait_web(topo, net.SERVERS6[0], ipv6=True) == net.SERVERS6[0]
    r = topo.run(topo.client, "getent", "ahostsv4", NAME, check=False, timeout=20)
    assert r.returncode == 0 and NAME_IP in r.stdout, r.stdout + r.stderr
    r = topo.run(topo.client, sys.executable, "-c", _TRANSFER, f"http://{net.WEB4}/", net.SERVERS4[0],
                 check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert st["kill_switch"] is True

    # SIGKILL: nothing leaves outside the tunnel; the restarted client takes over
    vpn.kill(vpn.Daemon("client", topo.client, cfg, cfg.with_suffix(".log"), client, "vpn0"))
    assert topo.seen_by_web(timeout=1) is None
    client = up(topo, cfg)
    wait_established(topo, cfg, client, server="s0")
    assert wait_web(topo, net.SERVERS4[0]) == net.SERVERS4[0]

    # failover: the first server dies; the second one carries the traffic, from its own address
    vpn.kill(vpnds[0])
    wait_established(topo, cfg, client, server="s1", timeout=20)
    assert wait_web(topo, net.SERVERS4[1]) == net.SERVERS4[1]
    assert wait_web(topo, net.SERVERS6[1], ipv6=True) == net.SERVERS6[1]

    down(topo, cfg)
    assert client.wait(10) == 0
    dropped = cap.stop()
    frames = cap.frames()
    assert dropped == 0, "tcpdump dropped packets: the check would be incomplete"
    bad = leaks(frames, mac, endpoints)
    assert bad == [], f"{len(bad)} frame(s) left outside the tunnel: {bad[:10]}"
    assert sent_to(frames, mac, (net.SERVERS4[0], vpn.PORT)) > 0 and sent_to(frames, mac, (net.SERVERS4[1], vpn.PORT)) > 0
    assert_same_routing(topo.snapshot_routing(), before, "after down")
    assert resolv.read_bytes() == RESOLV
    # after down, the user's own connection again (no kill switch left)
    assert topo.seen_by_web() == net.HOME_OUT4
    dns.send_signal(signal.SIGTERM)
    assert json.loads(dns.communicate(timeout=10)[0])["udp"] >= 1
    topo.stop(vpnds[1].proc)


# --- 2. exclude, allow_lan and bypass: their traffic outside the tunnel, and nothing else ---------

def test_exclude_allow_lan_bypass_and_nothing_else_outside(inet, tmp_path):
    """`up` runs under nsenter (not `ip netns exec`, which hides the cgroup v2 mount bypass needs)."""
    topo = inet
    topo.start_web()
    skeys, ckeys = vpn.genkeys(), vpn.genkeys()
    start_vpnd(topo, 0, tmp_path, skeys, [ckeys])
    (tmp_path / "resolv.conf").write_bytes(RESOLV)
    cfg = client_config(tmp_path / "client.toml", ckeys, [("s0", f"{net.SERVERS4[0]}:{vpn.PORT}", skeys.public)],
                        tmp_path / "resolv.conf", extra=f'allow_lan = true\nexclude = ["{net.WEB4}/32"]\n')
    enter = ("nsenter", f"--net=/run/netns/{topo.client}")
    assert vpn.ping(topo, topo.client, net.LAN_HOST4).returncode == 0          # the LAN, before
    mac = mac_of(topo, topo.client, topo.client_if)
    cap = Capture(topo, topo.client, topo.client_if, tmp_path / "underlay").start()
    with open(cfg.with_suffix(".log"), "ab") as out:
        client = topo.popen(None, *enter, vpn.VPNCLIENT, "up", "--config", str(cfg), stdout=out,
                            stderr=subprocess.STDOUT)
    st = wait_established(topo, cfg, client)
    # exclude: IPv4 to the web host leaves outside the tunnel; IPv6 to it (not excluded) goes through
    assert wait_web(topo, net.HOME_OUT4) == net.HOME_OUT4
    assert wait_web(topo, net.SERVERS6[0], ipv6=True) == net.SERVERS6[0]
    # allow_lan: the home router's LAN side answers through the kill switch
    assert vpn.ping(topo, topo.client, net.LAN_HOST4).returncode == 0
    # bypass: this one program reaches the web host over IPv6 from the client's own address
    if not st.get("bypass_cgroup"):
        pytest.skip(f"no cgroup v2 with BPF here: {st.get('bypass_unavailable')}")
    seen = topo.seen_by_web(ipv6=True, argv_prefix=(*enter, vpn.VPNCLIENT, "bypass", "--config", str(cfg), "--"))
    assert seen == net.CLIENT6
    r = topo.run(None, *enter, vpn.VPNCLIENT, "down", "--config", str(cfg), check=False)
    assert r.returncode == 0 and client.wait(10) == 0, r.stdout + r.stderr
    assert cap.stop() == 0, "tcpdump dropped packets: the check would be incomplete"
    frames = cap.frames()
    allowed = {(net.WEB4, 6, 80), (net.WEB6, 6, 80), (net.LAN_HOST4, 1, -1)}
    rest = [f for f in frames if (f.dst, f.proto, f.dport) not in allowed]
    bad = leaks(rest, mac, {(net.SERVERS4[0], vpn.PORT)})
    assert bad == [], f"{len(bad)} frame(s) left outside the tunnel: {bad[:10]}"
    assert any(f.src_mac == mac and f.dst == net.WEB6 for f in frames), "the bypassed request was not seen"


# --- 3. a host firewall that drops forwarding; nothing unsolicited reaches a client -------------

_LISTEN = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(4)
    open(sys.argv[2], "w").close()
    while True:
        c, a = s.accept()
        c.sendall(b"hello")
        c.close()
""")

_CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
        print(s.recv(16).decode())
    except OSError as e:
        print(type(e).__name__)
""")


def test_forward_drop_policy_and_no_unsolicited_inbound(inet, tmp_path):
    topo = inet
    topo.nft(topo.server, """
        table ip filter {
            chain FORWARD { type filter hook forward priority filter; policy drop; }
        }
        table ip6 filter {
            chain FORWARD { type filter hook forward priority filter; policy drop; }
        }
    """)
    topo.start_web()
    skeys, ckeys = vpn.genkeys(), vpn.genkeys()
    vpnd = start_vpnd(topo, 0, tmp_path, skeys, [ckeys])
    cfg = client_config(tmp_path / "client.toml", ckeys, [("s0", f"{net.SERVERS4[0]}:{vpn.PORT}", skeys.public)],
                        tmp_path / "resolv.conf")
    (tmp_path / "resolv.conf").write_bytes(RESOLV)
    client = up(topo, cfg)
    st = wait_established(topo, cfg, client)
    tun4, _ = vpn.tunnel_ips(st)
    assert wait_web(topo, net.SERVERS4[0]) == net.SERVERS4[0], vpnd.log_tail()
    assert wait_web(topo, net.SERVERS6[0], ipv6=True) == net.SERVERS6[0]

    # the internet routes the pool to the server (as if it were global): the drop must come from vpnd
    topo.run(topo.inet, "ip", "route", "add", vpn.POOL4, "via", net.SERVERS4[0])
    ready = tmp_path / "listen.ready"
    topo.popen(topo.client, sys.executable, "-c", _LISTEN, "8080", str(ready))
    assert wait_until(ready.exists, 10)
    r = topo.run(topo.server, sys.executable, "-c", _CONNECT, tun4, "8080", timeout=30)
    assert r.stdout.strip() == "hello", "the listener is not reachable through the tunnel at all"
    r = topo.run(topo.web, sys.executable, "-c", _CONNECT, tun4, "8080", timeout=30)
    assert r.stdout.strip() in ("TimeoutError", "ConnectionRefusedError", "OSError"), r.stdout

    down(topo, cfg)
    assert client.wait(10) == 0
    # the session is gone: no client address left in the kernel's connection tracking
    assert wait_until(lambda: tun4 not in conntrack_dump(topo, topo.server), 5), conntrack_dump(topo, topo.server)
    table = conntrack_dump(topo, topo.server)
    assert net.HOME_OUT4 not in table and net.CLIENT6 not in table, table
    assert vpn.stop(topo, vpnd) == 0
    # vpnd took its accept rules out of the host's chains again
    assert "vpnd" not in topo.run(topo.server, "nft", "list", "ruleset").stdout
