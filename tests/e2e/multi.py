"""Several servers, one client: a topology for locations and failover tests (issue 6).

`MultiServer(servers=2)` is one client namespace and N server namespaces; server i is joined to the
client by its own veth pair (the client has one underlay interface per server, as if each server were
reached over a different path). Underlay addressing for server i (i from 0):

    server side  198.18.i.1/24   2001:2:0:i::1/64
    client side  198.18.i.2/24   2001:2:0:i::2/64

It is a `Topology` (same `run`, `popen`, `stop`, `close`, same `vpnt-` names and cleanup), built
differently. It can also give the client namespace its own resolver file the way `ip netns exec`
expects it (`/etc/netns/<ns>/resolv.conf`, bind-mounted over /etc/resolv.conf for every command run
in the namespace); `close()` removes that file and the directories it created.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tests.e2e.netns import NETNS_ETC, PREFIX, Link, NetnsFiles, Topology, _run



class MultiServer(NetnsFiles, Topology):
    def __init__(self, servers: int = 2) -> None:        # noqa: super().__init__ builds another shape
        if not 1 <= servers <= 8:
            raise ValueError("servers must be between 1 and 8")
        self.suffix = secrets.token_hex(3)
        self.client_ns = f"{PREFIX}{self.suffix}-c"
        self.server_namespaces = [f"{PREFIX}{self.suffix}-s{i}" for i in range(servers)]
        self.server = self.server_namespaces[0]
        self.clients = [self.client_ns]
        self.namespaces = [self.client_ns, *self.server_namespaces]
        self.links: list[Link] = []
        self._created_ns: list[str] = []
        self._veths: list[str] = []
        self._procs = []
        self._closed = False
        self._created_paths: list[Path] = []      # /etc/netns files and dirs, removed in reverse
        try:
            self._setup_multi()
        except BaseException:
            self.close()
            raise

    def _setup_multi(self) -> None:
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            self._created_ns.append(ns)
            self.run(ns, "sysctl", "-q", "-w",
                     "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0")
            self.run(ns, "ip", "link", "set", "dev", "lo", "up")
        for i, sns in enumerate(self.server_namespaces):
            cif, sif = f"vc{self.suffix}{i}", f"vs{self.suffix}{i}"
            self._veths += [cif, sif]
            _run(["ip", "link", "add", "name", cif, "netns", self.client_ns, "type", "veth",
                  "peer", "name", sif, "netns", sns])
            link = Link(index=i, client_ns=self.client_ns, client_if=cif, server_if=sif,
                        client_v4=f"198.18.{i}.2/24", server_v4=f"198.18.{i}.1/24",
                        client_v6=f"2001:2:0:{i:x}::2/64", server_v6=f"2001:2:0:{i:x}::1/64")
            for ns, ifname, v4, v6 in ((self.client_ns, cif, link.client_v4, link.client_v6),
                                       (sns, sif, link.server_v4, link.server_v6)):
                self.add_address(ns, ifname, v4)
                self.add_address(ns, ifname, v6)
                self.run(ns, "ip", "link", "set", "dev", ifname, "up")
            self.links.append(link)

    def __repr__(self) -> str:
        return f"<MultiServer client={self.client_ns} servers={self.server_namespaces}>"


def leftovers(suffix: str) -> list[str]:
    """Anything of topology `suffix` still present (for cleanup assertions)."""
    out = [ns for ns in os.listdir("/run/netns") if suffix in ns] if os.path.isdir("/run/netns") else []
    out += [str(p) for p in NETNS_ETC.glob(f"*{suffix}*")] if NETNS_ETC.exists() else []
    return out
