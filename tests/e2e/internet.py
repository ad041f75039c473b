"""A small internet in network namespaces, for the full-tunnel tests and the demo (issue 12).

The client is never on the server's link: it sits behind a home router that NATs IPv4 (IPv6 is
routed, as most ISPs do it), the home router and the servers hang off an "internet" router, and a
web host on the internet answers HTTP with the source address it saw. A DNS server runs on the
internet router (reached by vpnd as its upstream; the client reaches it only through the tunnel).

    client  198.18.40.2/24 ─ .1 home .41.2 ─ .41.1 ┐
            2001:2:0:40::2     (NAT v4)             │ inet  198.18.45.53 (DNS, on lo)
                                                    ├ .42.1 ─ .42.2  server   (vpnd, egress = its uplink)
                                                    ├ .43.1 ─ .43.2  server2  (servers=2: failover)
                                                    └ .46.1 ─ .46.2  web      (HTTP: "the address I saw")

IPv6 mirrors IPv4 with 2001:2:0:NN::/64 for link 198.18.NN.0/24. Every namespace and veth has a
`vpnt-<suffix>` name; `close()` (from `Topology`) ends our processes by PID and deletes the
namespaces with everything in them. `Internet` fits `tests.e2e.vpn`: `.server` is the first
server's namespace, `.client` the client's, `.link.server_ip4` the endpoint address.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

from tests.e2e.netns import PREFIX, Link, NetnsFiles, Topology, _run, wait_until

CLIENT4, CLIENT6 = "198.18.40.2", "2001:2:0:40::2"
HOME_IN4, HOME_IN6 = "198.18.40.1", "2001:2:0:40::1"
HOME_OUT4, HOME_OUT6 = "198.18.41.2", "2001:2:0:41::2"       # the client's address on the internet
SERVERS4 = ["198.18.42.2", "198.18.43.2"]
SERVERS6 = ["2001:2:0:42::2", "2001:2:0:43::2"]
WEB4, WEB6 = "198.18.46.2", "2001:2:0:46::2"
DNS4, DNS6 = "198.18.45.53", "2001:2:0:45::53"
LAN_HOST4 = "198.18.40.7"            # a second address on the home router's LAN side (allow_lan tests)
HTTP_PORT = 80

_WEB = r"""
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        seen = self.client_address[0]
        if seen.startswith("::ffff:"):
            seen = seen[7:]
        body = (seen + "\n").encode()
        if len(sys.argv) > 2:
            with open(sys.argv[2], "a") as f:
                f.write(seen + "\n")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

S(("::", int(sys.argv[1])), H).serve_forever()
"""

_GET = r"""
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        print(r.read().decode().strip())
except Exception as e:
    print("ERROR " + type(e).__name__, file=sys.stderr)
    sys.exit(1)
"""


class Internet(NetnsFiles, Topology):
    def __init__(self, servers: int = 1) -> None:
        # noqa: Topology.__init__ builds another shape; the attributes close() needs are set here
        if servers not in (1, 2):
            raise ValueError("servers must be 1 or 2")
        self.suffix = secrets.token_hex(3)
        s = self.suffix
        self.client_ns = f"{PREFIX}{s}-cli"
        self.home = f"{PREFIX}{s}-home"
        self.inet = f"{PREFIX}{s}-inet"
        self.web = f"{PREFIX}{s}-web"
        self.server_namespaces = [f"{PREFIX}{s}-srv{i}" for i in range(servers)]
        self.server = self.server_namespaces[0]
        self.clients = [self.client_ns]
        self.namespaces = [self.client_ns, self.home, self.inet, self.web, *self.server_namespaces]
        self.client_if = f"vc{s}"
        self.server_ifs = [f"vs{s}{i}" for i in range(servers)]     # each server's uplink
        self.links: list[Link] = []
        self._created_ns: list[str] = []
        self._veths: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._created_paths: list[Path] = []
        self._closed = False
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    @property
    def client(self) -> str:
        return self.client_ns

    # -- construction ---------------------------------------------------------------------------

    def _veth(self, a_ns: str, a_if: str, a_net: int, a_host: int, b_ns: str, b_if: str, b_host: int) -> None:
        self._veths += [a_if, b_if]
        _run(["ip", "link", "add", "name", a_if, "netns", a_ns, "type", "veth", "peer", "name", b_if,
              "netns", b_ns])
        for ns, ifname, host in ((a_ns, a_if, a_host), (b_ns, b_if, b_host)):
            self.add_address(ns, ifname, f"198.18.{a_net}.{host}/24")
            self.add_address(ns, ifname, f"2001:2:0:{a_net}::{host}/64")
            self.run(ns, "ip", "link", "set", "dev", ifname, "up")

    def _default(self, ns: str, net: int, host: int = 1) -> None:
        self.run(ns, "ip", "route", "add", "default", "via", f"198.18.{net}.{host}")
        self.run(ns, "ip", "-6", "route", "add", "default", "via", f"2001:2:0:{net}::{host}")

    def _build(self) -> None:
        s = self.suffix
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            self._created_ns.append(ns)
            # no duplicate address detection: link-local addresses are there once a link is up
            self.run(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0",
                     "net.ipv6.conf.default.disable_ipv6=0", "net.ipv6.conf.all.accept_dad=0",
                     "net.ipv6.conf.default.accept_dad=0")
            self.run(ns, "ip", "link", "set", "dev", "lo", "up")
        for ns in (self.home, self.inet):
            self.run(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        self._veth(self.client, self.client_if, 40, 2, self.home, f"vh{s}i", 1)
        self._veth(self.home, f"vh{s}o", 41, 2, self.inet, f"vi{s}h", 1)
        for i, sns in enumerate(self.server_namespaces):
            self._veth(sns, self.server_ifs[i], 42 + i, 2, self.inet, f"vi{s}s{i}", 1)
            self._default(sns, 42 + i)
        self._veth(self.web, f"vw{s}", 46, 2, self.inet, f"vi{s}w", 1)
        self._default(self.web, 46)
        self._default(self.client, 40)
        self._default(self.home, 41)
        self.add_address(self.home, f"vh{s}i", f"{LAN_HOST4}/24")
        self.add_address(self.inet, "lo", f"{DNS4}/32")
        self.add_address(self.inet, "lo", f"{DNS6}/128")
        self.run(self.inet, "ip", "-6", "route", "add", "2001:2:0:40::/64", "via", HOME_OUT6)
        self.nft(self.home, f"""
            table ip vpnt_home {{
                chain post {{
                    type nat hook postrouting priority srcnat;
                    oifname "vh{s}o" masquerade
                }}
            }}
        """)
        self._settle()
        self.links.append(Link(index=0, client_ns=self.client, client_if=self.client_if,
                               server_if=self.server_ifs[0], client_v4=f"{CLIENT4}/24",
                               server_v4=f"{SERVERS4[0]}/24", client_v6=f"{CLIENT6}/64",
                               server_v6=f"{SERVERS6[0]}/64"))

    def _settle(self) -> None:
        """Wait until every veth has its IPv6 link-local address (the kernel adds it when the link's
        carrier comes up), so routing snapshots taken from now on do not change by themselves."""
        def ready(ns: str) -> bool:
            links = [x for x in self.run(ns, "ip", "-o", "link", "show").stdout.splitlines() if " lo:" not in x]
            local = self.run(ns, "ip", "-6", "-o", "addr", "show", "scope", "link").stdout
            return local.count("fe80::") >= len(links) and "tentative" not in local
        for ns in self.namespaces:
            if not wait_until(lambda: ready(ns), 10, 0.05):
                raise RuntimeError(f"link-local addresses did not appear in {ns}")

    # -- helpers ----------------------------------------------------------------------------------

    def nft(self, ns: str, script: str) -> None:
        r = subprocess.run(self._argv(ns, ["nft", "-f", "-"]), input=script, capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"nft in {ns} failed: {r.stderr.strip()}")

    def start_web(self, seen_file: Path | None = None) -> subprocess.Popen:
        """The web host's HTTP server (IPv4 and IPv6 on port 80): answers the source address it saw
        (and appends it to `seen_file`, if given: the web host's own access log)."""
        extra = [str(seen_file)] if seen_file is not None else []
        proc = self.popen(self.web, sys.executable, "-c", _WEB, str(HTTP_PORT), *extra, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)

        def listening() -> bool:
            r = self.run(self.web, "ss", "-Hltn", f"sport = :{HTTP_PORT}", check=False)
            return proc.poll() is not None or bool(r.stdout.strip())
        if not wait_until(listening, 10) or proc.poll() is not None:
            raise RuntimeError("the web host's HTTP server did not start")
        return proc

    def seen_by_web(self, ns: str | None = None, ipv6: bool = False, timeout: float = 3,
                    argv_prefix: tuple[str, ...] = ()) -> str | None:
        """The source address the web host saw for one HTTP GET from `ns` (default: the client),
        or None if the request failed. `argv_prefix` wraps the command and then says where it runs
        (e.g. `nsenter --net=... vpnclient bypass --`: run from the root namespace)."""
        url = f"http://[{WEB6}]:{HTTP_PORT}/" if ipv6 else f"http://{WEB4}:{HTTP_PORT}/"
        where = None if argv_prefix else (ns or self.client)
        r = self.run(where, *argv_prefix, sys.executable, "-c", _GET, url, str(timeout),
                     check=False, timeout=timeout + 20)
        return r.stdout.strip() if r.returncode == 0 else None

    def snapshot_routing(self, ns: str | None = None) -> dict[str, str]:
        """`ip rule`, `ip route show table all` for both families: compare before and after."""
        ns = ns or self.client
        out = {}
        for fam in ("-4", "-6"):
            out[f"rule{fam}"] = self.run(ns, "ip", fam, "rule", "show").stdout
            out[f"route{fam}"] = self.run(ns, "ip", fam, "route", "show", "table", "all").stdout
        return out
