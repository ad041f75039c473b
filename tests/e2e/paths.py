"""Underlay paths with a router in the middle, for the resilience tests (issue 7, part B).

`RoutedPath(clients=N)` is a `Topology` of another shape: client namespaces reach the server through
a router namespace, as over the internet; optionally the router is a NAT (nftables masquerade with
a short UDP conntrack timeout), one of its links has a small MTU, and an attacker namespace hangs
off the server's side.

    client i  198.18.(210+i).2/24 ---- .1  router  198.18.201.2/24 ---- 198.18.201.1/24  server
              2001:2:0:(d0+i)::2/64 -- ::1         2001:2:0:c9::2/64 --- 2001:2:0:c9::1/64
                    (inside_mtu)                        (outside_mtu)
                                          attacker 198.18.202.2/24 ---- 198.18.202.1/24  server

- Without NAT the server routes the inside networks back through the router; with NAT it has no
  such route, so nothing reaches a client except through a live NAT mapping (IPv4 only).
- `nat_map(ports=..., address=...)` replaces the NAT rule atomically (masquerade, or snat to another
  address of the router's outside link) and flushes the router's conntrack table, so the very next
  datagram a client sends gets a new mapping: a NAT rebinding, as when a home router reboots or a
  phone moves between networks.
- `conntrack_flush(ns)` talks ctnetlink directly (IPCTNL_MSG_CT_DELETE without attributes, the
  request `conntrack -F` sends), so no extra package is needed.
- `Counters` is an nftables table of named counters in one namespace (for example: datagrams the
  server sent to each NAT port range, or to anyone else), read back as numbers.
- `Sniffer` captures UDP payloads on an interface with an AF_PACKET socket (no tcpdump needed).

Everything is made with `vpnt-<suffix>` names inside namespaces this object creates; `close()`
(from `Topology`) ends our processes by PID and deletes the namespaces, which takes every link, nft
table and conntrack entry with them. The server namespace has rp_filter off, so spoofed datagrams
reach vpnd (a test that spoofs must see them arrive, or it proves nothing).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap

from tests.e2e.netns import PREFIX, Link, Topology, _run

SERVER_OUT = "198.18.201.1"        # the server's underlay address (the VPN endpoint)
SERVER_OUT6 = "2001:2:0:c9::1"
ROUTER_OUT6 = "2001:2:0:c9::2"
INSIDE_NETS6 = "2001:2:0:d0::/60"
ROUTER_OUT = "198.18.201.2"        # the router's outside address (what a NAT maps clients to)
ROUTER_OUT2 = "198.18.201.3"       # a second outside address, for rebinding to another address
ATTACKER = "198.18.202.2"
ATTACKER_NET = "198.18.202.0/24"
INSIDE_NETS = "198.18.208.0/20"    # 198.18.210.0/24 ... one /24 per client

NAT_TABLE = "vpnt_nat"


def inside_net(i: int) -> tuple[str, str]:
    """(router side, client side) addresses of client i's link, with prefix."""
    return f"198.18.{210 + i}.1/24", f"198.18.{210 + i}.2/24"


def inside_net6(i: int) -> tuple[str, str]:
    return f"2001:2:0:{0xd0 + i:x}::1/64", f"2001:2:0:{0xd0 + i:x}::2/64"


class RoutedPath(Topology):
    def __init__(self, clients: int = 1, *, nat: bool = False, attacker: bool = False,
                 outside_mtu: int | None = None, inside_mtu: int | None = None,
                 udp_timeout: int | None = None) -> None:
        # noqa: super().__init__ builds another shape; the attributes close() needs are set here
        if not 1 <= clients <= 40:
            raise ValueError("clients must be between 1 and 40")
        self.suffix = secrets.token_hex(3)
        self.server = f"{PREFIX}{self.suffix}-srv"
        self.router = f"{PREFIX}{self.suffix}-rtr"
        self.attacker = f"{PREFIX}{self.suffix}-atk" if attacker else None
        self.clients = [f"{PREFIX}{self.suffix}-c{i}" for i in range(clients)]
        self.namespaces = [self.server, self.router, *self.clients] + ([self.attacker] if attacker else [])
        self.links: list[Link] = []
        self._created_ns: list[str] = []
        self._veths: list[str] = []
        self._procs = []
        self._closed = False
        self.nat = nat
        self.server_if = f"vs{self.suffix}o"
        self.router_out_if = f"vr{self.suffix}o"
        self.udp_timeout_applied = None      # how the short conntrack timeout was set, if asked for
        try:
            self._setup_path(attacker, outside_mtu, inside_mtu, udp_timeout)
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------------

    def _veth(self, a_ns: str, a_if: str, b_ns: str, b_if: str) -> None:
        self._veths += [a_if, b_if]
        _run(["ip", "link", "add", "name", a_if, "netns", a_ns, "type", "veth", "peer", "name", b_if,
              "netns", b_ns])

    def _up(self, ns: str, ifname: str, *cidrs: str, mtu: int | None = None) -> None:
        for c in cidrs:
            self.add_address(ns, ifname, c)
        if mtu is not None:
            self.run(ns, "ip", "link", "set", "dev", ifname, "mtu", str(mtu))
        self.run(ns, "ip", "link", "set", "dev", ifname, "up")

    def _setup_path(self, attacker: bool, outside_mtu: int | None, inside_mtu: int | None,
                    udp_timeout: int | None) -> None:
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            self._created_ns.append(ns)
            self.run(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0",
                     "net.ipv6.conf.default.disable_ipv6=0")
            self.run(ns, "ip", "link", "set", "dev", "lo", "up")
        # the server accepts whatever source arrives on any link (spoofing tests need it to reach vpnd)
        self.run(self.server, "sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=0",
                 "net.ipv4.conf.default.rp_filter=0")
        self.run(self.router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                 "net.ipv4.conf.all.promote_secondaries=1", "net.ipv4.conf.default.promote_secondaries=1")
        self._veth(self.server, self.server_if, self.router, self.router_out_if)
        self._up(self.server, self.server_if, f"{SERVER_OUT}/24", f"{SERVER_OUT6}/64", mtu=outside_mtu)
        self._up(self.router, self.router_out_if, f"{ROUTER_OUT}/24", f"{ROUTER_OUT6}/64", mtu=outside_mtu)
        for i, cns in enumerate(self.clients):
            rif, cif = f"vr{self.suffix}{i}", f"vc{self.suffix}{i}"
            self._veth(self.router, rif, cns, cif)
            (rside, cside), (rside6, cside6) = inside_net(i), inside_net6(i)
            self._up(self.router, rif, rside, rside6, mtu=inside_mtu)
            self._up(cns, cif, cside, cside6, mtu=inside_mtu)
            self.run(cns, "ip", "route", "add", "default", "via", rside.split("/")[0])
            self.run(cns, "ip", "-6", "route", "add", "default", "via", rside6.split("/")[0])
            self.links.append(Link(index=i, client_ns=cns, client_if=cif, server_if=self.server_if,
                                   client_v4=cside, server_v4=f"{SERVER_OUT}/24",
                                   client_v6=cside6, server_v6=f"{SERVER_OUT6}/64"))
        if attacker:
            sif, aif = f"vs{self.suffix}a", f"va{self.suffix}a"
            self._veth(self.server, sif, self.attacker, aif)
            self._up(self.server, sif, "198.18.202.1/24")
            self._up(self.attacker, aif, f"{ATTACKER}/24")
            self.run(self.attacker, "ip", "route", "add", "default", "via", "198.18.202.1")
            self.run(self.server, "sysctl", "-q", "-w", f"net.ipv4.conf.{sif}.rp_filter=0")
        self.run(self.server, "sysctl", "-q", "-w", f"net.ipv4.conf.{self.server_if}.rp_filter=0")
        if self.nat:
            self.nat_map()
            if udp_timeout is not None:
                self.udp_timeout_applied = self._short_udp_timeout(udp_timeout)
        else:
            self.run(self.server, "ip", "route", "add", INSIDE_NETS, "via", ROUTER_OUT)
            self.run(self.server, "ip", "-6", "route", "add", INSIDE_NETS6, "via", ROUTER_OUT6)

    def _short_udp_timeout(self, seconds: int) -> str:
        """The router's UDP conntrack timeouts: per-namespace sysctls, else an nft ct timeout object."""
        r = self.run(self.router, "sysctl", "-q", "-w", f"net.netfilter.nf_conntrack_udp_timeout={seconds}",
                     f"net.netfilter.nf_conntrack_udp_timeout_stream={seconds}", check=False)
        got = self.run(self.router, "sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout",
                       "net.netfilter.nf_conntrack_udp_timeout_stream", check=False).stdout.split()
        if r.returncode == 0 and got == [str(seconds)] * 2:
            return "sysctl"
        script = textwrap.dedent(f"""
            table ip vpnt_ct {{
                ct timeout udpshort {{
                    protocol udp
                    l3proto ip
                    policy = {{ unreplied : {seconds}, replied : {seconds} }}
                }}
                chain pre {{
                    type filter hook prerouting priority -300
                    meta l4proto udp ct timeout set "udpshort"
                }}
            }}
        """)
        self.nft(self.router, script)
        return "nft ct timeout"

    # -- the NAT -------------------------------------------------------------------------------

    def nft(self, ns: str, script: str) -> None:
        _nft(self, ns, script)

    def nat_map(self, ports: str = "20000-20999", address: str | None = None, flush: bool = True) -> None:
        """Map clients to the router's outside address (or `address`, added if missing) and `ports`."""
        if address is not None:
            have = self.run(self.router, "ip", "-o", "-4", "addr", "show", "dev", self.router_out_if).stdout
            if f" {address}/" not in have:
                self.add_address(self.router, self.router_out_if, f"{address}/24")
            action = f"snat to {address}:{ports}"
        else:
            action = f"masquerade to :{ports}"
        self.nft(self.router, textwrap.dedent(f"""
            table ip {NAT_TABLE}
            delete table ip {NAT_TABLE}
            table ip {NAT_TABLE} {{
                chain post {{
                    type nat hook postrouting priority srcnat;
                    oifname "{self.router_out_if}" meta l4proto udp {action}
                    oifname "{self.router_out_if}" masquerade
                }}
            }}
        """))
        if flush:
            conntrack_flush(self, self.router)


def _nft(topo: Topology, ns: str, script: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"nft in {ns} failed: {r.stderr.strip()}\n{script}")


# ctnetlink: flush the conntrack table of the namespace the code runs in (what `conntrack -F` does)
_FLUSH = textwrap.dedent("""
    import socket, struct, sys
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)          # NETLINK_NETFILTER
    s.bind((0, 0))
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)                    # nfgenmsg: family, version, res_id
    msg_type = (1 << 8) | 2                                             # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE
    s.send(struct.pack("=IHHII", 16 + len(body), msg_type, 0x1 | 0x4, 1, 0) + body)   # REQUEST | ACK
    reply = s.recv(65536)
    length, kind = struct.unpack_from("=IH", reply)
    err = struct.unpack_from("=i", reply, 16)[0] if kind == 2 else -1  # NLMSG_ERROR carries the status
    sys.exit(0 if err == 0 else 1)
""")


def conntrack_flush(topo: Topology, ns: str) -> None:
    r = topo.run(ns, sys.executable, "-c", _FLUSH, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"conntrack flush in {ns} failed: {r.stderr.strip()}")


def conntrack_count(topo: Topology, ns: str) -> int:
    return int(topo.run(ns, "sysctl", "-n", "net.netfilter.nf_conntrack_count").stdout.strip())


# -- counters ------------------------------------------------------------------------------------

class Counters:
    """Named nftables counters in namespace `ns`: `Counters(topo, ns, "output", {"name": "rule match"})`.

    Each rule is `<match> counter` in a chain of table `ip vpnt_watch_<hook>`; `read()` returns
    {name: packets}.
    """

    def __init__(self, topo: Topology, ns: str, hook: str, rules: dict[str, str]):
        self.topo, self.ns, self.table = topo, ns, f"vpnt_watch_{hook}"
        lines = "\n".join(f'        {match} counter comment "{name}"' for name, match in rules.items())
        _nft(topo, ns, f"table ip {self.table} {{\n    chain c {{\n        type filter hook {hook} priority 0;\n"
                       f"{lines}\n    }}\n}}\n")

    def read(self) -> dict[str, int]:
        out = self.topo.run(self.ns, "nft", "-j", "list", "table", "ip", self.table).stdout
        counts: dict[str, int] = {}
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            packets = next((e["counter"]["packets"] for e in rule["expr"] if "counter" in e), 0)
            counts[rule.get("comment", "")] = packets
        return counts


# -- capture: UDP payloads ------------------------------------------------------------------------

_SNIFF = textwrap.dedent("""
    import json, select, socket, struct, sys, time
    ifname, dport, seconds, ready = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))   # IP packets, no link header
    s.bind((ifname, 0))
    open(ready, "w").close()
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end and len(out) < 1000:
        if not select.select([s], [], [], 0.05)[0]:
            continue
        ip = s.recv(65536)
        ihl = (ip[0] & 0x0F) * 4
        if len(ip) < ihl + 8 or ip[9] != 17 or struct.unpack_from("!H", ip, 6)[0] & 0x3FFF:
            continue                                  # UDP, not a fragment
        sp, dp = struct.unpack_from("!HH", ip, ihl)
        if dp == dport:
            out.append([socket.inet_ntoa(ip[12:16]), sp, ip[ihl + 8:].hex()])
    print(json.dumps(out), flush=True)
""")


class Sniffer:
    """An AF_PACKET capture in `ns` on `ifname` of UDP datagrams to `dport`: start(), then result()
    gives [(source address, source port, payload)] (what tcpdump would show, without needing it)."""

    def __init__(self, topo: Topology, ns: str, ifname: str, dport: int, seconds: float, workdir):
        from pathlib import Path
        self.topo, self.ns, self.ifname, self.dport, self.seconds = topo, ns, ifname, dport, seconds
        self.ready = Path(workdir) / f"sniff-{ifname}.ready"
        self.proc = None

    def start(self) -> "Sniffer":
        from tests.e2e.netns import wait_until
        self.proc = self.topo.popen(self.ns, sys.executable, "-c", _SNIFF, self.ifname, str(self.dport),
                                    str(self.seconds), str(self.ready),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not wait_until(lambda: self.ready.exists() or self.proc.poll() is not None, 10) \
                or self.proc.poll() is not None:
            raise RuntimeError(f"capture did not start: {self.proc.stderr.read()}")
        return self

    def result(self) -> list[tuple[str, int, bytes]]:
        out, err = self.proc.communicate(timeout=self.seconds + 20)
        if self.proc.returncode != 0:
            raise RuntimeError(f"capture failed: {err}")
        return [(a, p, bytes.fromhex(h)) for a, p, h in json.loads(out)]
