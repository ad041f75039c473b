"""vpnd's full tunnel, server side (issue 12 parts 2 and 5), with real namespaces and processes.

    client 198.18.0.2 ---- 198.18.0.1  server  198.18.60.1 ---- 198.18.60.2  internet
           2001:2:0:0::2   2001:2:0:0::1       2001:db8:60::1    2001:db8:60::2
                                               default route ->  web host 203.0.113.10, 2001:db8:ff::10

The server's default route goes to the "internet" namespace; the web host's addresses sit behind it
(not on a network attached to the server, which vpnd blocks), and a TCP listener there records the
peer address it saw. The server namespace has an iptables FORWARD DROP policy (Docker, ufw).

- with `full_tunnel = true` and no egress_interface, the client's IPv4 connection reaches the web
  host from the server's address (NAT), IPv6 from the client's own tunnel address (global pool:
  routed); both default routes are pushed;
- an unsolicited connection from the internet to the client's tunnel addresses fails;
- conntrack in the server namespace never holds the client's underlay address (notrack), and no entry
  of its tunnel addresses once the session ended;
- forwarding is on while vpnd runs and back to off after a clean stop, and after SIGKILL followed by
  the next start and stop; vpnd's accept rules in the FORWARD chain go with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from shutil import which

import pytest

from tests.e2e import vpn
from tests.e2e.netns import PREFIX, Topology, require_root, wait_until

pytestmark = pytest.mark.netns

SERVER_OUT, INET_IN = "198.18.60.1", "198.18.60.2"
SERVER_OUT6, INET_IN6 = "2001:db8:60::1", "2001:db8:60::2"
WEB, WEB6 = "203.0.113.10", "2001:db8:ff::10"
TABLE = f"vpnd_{vpn.SERVER_IF}"
FORWARDING = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")


class Internet:
    """One more namespace on the server's default route, holding the web host's addresses."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.ns = f"{PREFIX}{topo.suffix}-inet"
        sif, iif = f"vo{topo.suffix}s", f"vo{topo.suffix}i"
        self.server_if = sif
        self._created = False
        try:
            subprocess.run(["ip", "netns", "add", self.ns], check=True, capture_output=True, timeout=30)
            self._created = True
            topo.run(self.ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0",
                     "net.ipv6.conf.default.disable_ipv6=0")
            topo.run(self.ns, "ip", "link", "set", "dev", "lo", "up")
            subprocess.run(["ip", "link", "add", "name", sif, "netns", topo.server, "type", "veth", "peer", "name",
                            iif, "netns", self.ns], check=True, capture_output=True, timeout=30)
            for ns, ifname, cidrs in ((topo.server, sif, (f"{SERVER_OUT}/24", f"{SERVER_OUT6}/64")),
                                      (self.ns, iif, (f"{INET_IN}/24", f"{INET_IN6}/64"))):
                for c in cidrs:
                    topo.add_address(ns, ifname, c)
                topo.run(ns, "ip", "link", "set", "dev", ifname, "up")
            topo.add_address(self.ns, "lo", f"{WEB}/32")
            topo.add_address(self.ns, "lo", f"{WEB6}/128")
            topo.run(topo.server, "ip", "route", "add", "default", "via", INET_IN)
            topo.run(topo.server, "ip", "-6", "route", "add", "default", "via", INET_IN6)
            # the internet knows the way to the tunnel pools (so an unsolicited packet does reach vpnd's
            # server and is dropped there, not for want of a route); the IPv6 pool is routed anyway
            topo.run(self.ns, "ip", "route", "add", vpn.POOL4, "via", SERVER_OUT)
            topo.run(self.ns, "ip", "-6", "route", "add", vpn.POOL6, "via", SERVER_OUT6)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._created:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
            self._created = False


@pytest.fixture
def net():
    require_root()
    topo = Topology(clients=1)
    inet = None
    try:
        inet = Internet(topo)
        yield topo, inet
    finally:
        try:
            topo.close()
        finally:
            if inet is not None:
                inet.close()


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


_LISTEN = textwrap.dedent("""
    import json, select, socket, sys
    socks = []
    for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, int(sys.argv[2]))); s.listen(16); socks.append(s)
    open(sys.argv[1], "w").close()
    while True:
        for s in select.select(socks, [], [])[0]:
            c, peer = s.accept()
            print(json.dumps({"peer": peer[0]}), flush=True)
            c.sendall(b"hello"); c.close()
""")

_CONNECT = textwrap.dedent("""
    import socket, sys
    host, port, timeout, src = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    try:
        s = socket.create_connection((host, port), timeout=timeout, source_address=(src, 0) if src else None)
        print("ok", s.recv(100).decode())
    except socket.timeout:
        print("timeout")
    except OSError as e:
        print("error", e.errno)
""")


def listen(topo: Topology, ns: str, workdir: Path, name: str, port: int) -> Path:
    ready, out = workdir / f"{name}.ready", workdir / f"{name}.jsonl"
    with open(out, "w") as f:
        proc = topo.popen(ns, sys.executable, "-c", _LISTEN, str(ready), str(port), stdout=f,
                          stderr=subprocess.STDOUT)
    assert wait_until(lambda: ready.exists() or proc.poll() is not None, 10) and proc.poll() is None, \
        out.read_text()
    return out


def peers(out: Path) -> list[str]:
    return [json.loads(line)["peer"] for line in out.read_text().splitlines() if line.startswith("{")]


def connect(topo: Topology, ns: str, host: str, port: int, src: str = "", timeout: float = 1.5) -> str:
    return topo.run(ns, sys.executable, "-c", _CONNECT, host, str(port), str(timeout), src,
                    timeout=timeout + 20).stdout.strip()


def forwarding(topo: Topology) -> list[str]:
    return topo.run(topo.server, "sysctl", "-n", *FORWARDING).stdout.split()


def started(server: vpn.Daemon) -> bool:
    """vpnd said 'started': its table, accept rules and sysctls are all in place (they come after the TUN)."""
    return wait_until(lambda: "vpnd: started" in server.log.read_text() or server.proc.poll() is not None, 10) \
        and server.proc.poll() is None


def table_exists(topo: Topology) -> bool:
    return topo.run(topo.server, "nft", "list", "table", "inet", TABLE, check=False).returncode == 0


def forward_accepts(topo: Topology) -> list[str]:
    """vpnd's rules in the FORWARD chains of the firewall (iptables-nft: nftables tables ip/ip6 filter)."""
    out = []
    for fam in ("ip", "ip6"):
        r = topo.run(topo.server, "nft", "list", "chain", fam, "filter", "FORWARD", check=False)
        out += [f"{fam}: {line.strip()}" for line in r.stdout.splitlines() if f'comment "{TABLE}"' in line]
    return out


_CT_DUMP = textwrap.dedent("""
    import ipaddress, json, socket
    from vpnd import conntrack
    rows = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        for e in conntrack.dump(fam):
            rows.append([str(ipaddress.ip_address(e.src)), str(ipaddress.ip_address(e.dst)), e.proto, e.sport, e.dport])
    print(json.dumps(rows))
""")


def conntrack_text(topo: Topology) -> str:
    """The server namespace's conntrack table: `conntrack -L` (both families) if installed, and the
    same read over ctnetlink by vpnd's own module (so the check needs no package)."""
    text = topo.run(topo.server, sys.executable, "-c", _CT_DUMP, timeout=30).stdout
    if which("conntrack"):
        for fam in ("ipv4", "ipv6"):
            text += topo.run(topo.server, "conntrack", "-L", "-f", fam, check=False).stdout
    return text


def firewall_drop_forward(topo: Topology) -> str:
    """A FORWARD DROP policy as Docker and ufw set it: iptables if installed, else its nftables form."""
    if which("iptables") and which("ip6tables"):
        topo.run(topo.server, "iptables", "-P", "FORWARD", "DROP")
        topo.run(topo.server, "ip6tables", "-P", "FORWARD", "DROP")
        return "iptables"
    for fam in ("ip", "ip6"):
        subprocess.run(["ip", "netns", "exec", topo.server, "nft", "-f", "-"], check=True, text=True,
                       input=f"table {fam} filter {{ chain FORWARD {{ type filter hook forward priority 0; "
                             f"policy drop; }} }}\n", capture_output=True, timeout=30)
    return "nft"


def test_full_tunnel_nat_inbound_conntrack_and_forwarding(net, workdir):
    topo, inet = net
    how = firewall_drop_forward(topo)
    print(f"\nFORWARD DROP set with {how}")
    assert forwarding(topo) == ["0", "0"]
    web = listen(topo, inet.ns, workdir, "web", 8080)
    back = listen(topo, topo.client, workdir, "client-listener", 8081)
    # Baseline: without vpnd, the server reaches the web host (so what fails later is vpnd's doing).
    assert connect(topo, topo.server, WEB, 8080) == "ok hello"

    skeys, ckeys = vpn.genkeys(), vpn.genkeys()
    server = vpn.start_server(topo, workdir, skeys, [ckeys], extra="full_tunnel = true\n")
    assert started(server) and table_exists(topo) and forwarding(topo) == ["1", "1"], server.log_tail()
    rules = topo.run(topo.server, "nft", "list", "table", "inet", TABLE).stdout
    assert f"udp dport {vpn.PORT} fib daddr type local notrack" in rules and f"udp sport {vpn.PORT} notrack" in rules
    assert f'oifname "{inet.server_if}" ip saddr {vpn.POOL4} masquerade' in rules, rules   # found from the route
    assert "ip6 saddr" not in rules           # the global IPv6 pool is routed, not NATed
    assert len(forward_accepts(topo)) == 4, forward_accepts(topo)

    client = vpn.start_client(topo, topo.client, workdir, ckeys, skeys.public, endpoint=f"{topo.link.server_ip4}:{vpn.PORT}")
    st = vpn.wait_connected(topo, client, server=server)
    assert "0.0.0.0/0" in st["routes"] and "::/0" in st["routes"], st
    tun4, tun6 = vpn.tunnel_ips(st)
    for host in (WEB, WEB6, INET_IN):       # whatever the client does with the default routes
        if "dev vpn0" not in topo.run(topo.client, "ip", "route", "get", host).stdout:
            topo.run(topo.client, "ip", "route", "replace", host, "dev", vpn.CLIENT_IF)

    # Out: IPv4 leaves with the server's address, IPv6 with the client's routed tunnel address.
    assert connect(topo, topo.client, WEB, 8080, tun4) == "ok hello", server.log_tail()
    assert connect(topo, topo.client, WEB6, 8080, tun6) == "ok hello", server.log_tail()
    assert peers(web)[-2:] == [SERVER_OUT, tun6], peers(web)
    assert topo.link.client_ip4 not in peers(web) and tun4 not in peers(web)

    # In: nothing from the internet reaches the client unless it answers the client's own connection.
    for addr in (tun4, tun6):
        assert connect(topo, inet.ns, addr, 8081, timeout=1.0) == "timeout"
    assert peers(back) == []
    counters = topo.run(topo.server, "nft", "list", "table", "inet", TABLE).stdout
    inbound = [line for line in counters.splitlines() if 'comment "inbound"' in line]
    assert inbound and "packets 0 " not in inbound[0], inbound

    # Conntrack: the inner flows are tracked (NAT needs it), the tunnel's own datagrams never are.
    ct = conntrack_text(topo)
    assert tun4 in ct, ct
    for underlay in (topo.link.client_ip4, topo.link.client_ip6):
        assert underlay not in ct, ct
    # The session ends (the client closes it): its tunnel addresses' entries go.
    assert vpn.stop(topo, client) == 0, client.log_tail()
    assert wait_until(lambda: tun4 not in conntrack_text(topo) and tun6 not in conntrack_text(topo), 5), \
        conntrack_text(topo)
    assert topo.link.client_ip4 not in conntrack_text(topo)

    # A clean stop puts forwarding back, removes the table and the FORWARD accept rules.
    assert vpn.stop(topo, server) == 0, server.log_tail()
    assert forwarding(topo) == ["0", "0"] and not table_exists(topo) and forward_accepts(topo) == []

    # SIGKILL leaves all of it; the next start puts forwarding back first (the table's marker), so its
    # own clean stop ends with forwarding off again, and the accept rules are not doubled.
    server = vpn.start_server(topo, workdir, config=server.config, name="vpnd-2")
    assert started(server) and forwarding(topo) == ["1", "1"] and len(forward_accepts(topo)) == 4
    assert vpn.kill(server) == -9
    assert forwarding(topo) == ["1", "1"] and table_exists(topo) and len(forward_accepts(topo)) == 4
    server = vpn.start_server(topo, workdir, config=server.config, name="vpnd-3")
    assert started(server) and forwarding(topo) == ["1", "1"], server.log_tail()
    assert "forwarding_was_off_ipv4" in topo.run(topo.server, "nft", "list", "table", "inet", TABLE).stdout
    assert len(forward_accepts(topo)) == 4, forward_accepts(topo)
    assert vpn.stop(topo, server) == 0, server.log_tail()
    assert forwarding(topo) == ["0", "0"] and not table_exists(topo) and forward_accepts(topo) == []
    for log in ("vpnd", "vpnd-2", "vpnd-3"):
        text = (workdir / f"{log}.log").read_text()
        for secret in (tun4, tun6, topo.link.client_ip4, SERVER_OUT, WEB):
            assert secret not in text, (log, text)


def test_full_tunnel_without_a_way_out_is_a_config_error(workdir):
    require_root()
    topo = Topology(clients=1)        # no default route in the server namespace
    try:
        skeys = vpn.genkeys()
        cfg = vpn.write_server_config(workdir / "vpnd.toml", skeys, [], extra="full_tunnel = true\n")
        r = topo.run(topo.server, vpn.VPND, "serve", "--config", str(cfg), check=False, timeout=30)
        assert r.returncode == 2, (r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "no IPv4 default route" in lines[0] and "egress_interface" in lines[0], lines
        # nothing half set up: no device, no table, forwarding untouched
        assert not vpn.tun_exists(topo, vpn.Daemon("x", topo.server, cfg, cfg, None, vpn.SERVER_IF))
        assert not table_exists(topo) and forwarding(topo) == ["0", "0"]
    finally:
        topo.close()
