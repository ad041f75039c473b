"""What vpnclient changes on the system, behind a few functions: addresses, MTU, routes.

Everything here is undone by closing the TUN device (the kernel removes the
device with its addresses and routes); `Applied` remembers what is in place so
a changed configuration (e.g. after the server restarted) replaces it.

Pushed routes other than the default routes go into the main table through the device; a default
route (0.0.0.0/0, ::/0) never goes into the main table: the full tunnel (routing.py) puts it in a
table of its own.
"""

from __future__ import annotations

from vpncore.net import tun as tunlib
from vpncore.proto.loss import tun_gso_max_size

from .routing import is_default


class Applied:
    def __init__(self, ifname: str):
        self.ifname = ifname
        self.addresses: list[str] = []
        self.routes: list[str] = []
        self.mtu: int | None = None
        self.dns: list[str] = []

    def apply(self, msg: dict) -> bool:
        """Bring the device in line with a config message; True if anything changed."""
        changed = False
        if msg["mtu"] != self.mtu:
            tunlib.set_mtu(self.ifname, msg["mtu"])
            tunlib.set_gso_max_size(self.ifname, tun_gso_max_size(msg["mtu"]))
            self.mtu = msg["mtu"]
            changed = True
        want = [msg[k] for k in ("ipv4", "ipv6") if k in msg]
        for old in [a for a in self.addresses if a not in want]:
            tunlib.del_address(self.ifname, old)
            self.addresses.remove(old)
            changed = True
        for new in [a for a in want if a not in self.addresses]:
            tunlib.add_address(self.ifname, new)
            self.addresses.append(new)
            changed = True
        for route in msg["routes"]:
            if route not in self.routes:
                if not is_default(route):
                    tunlib.add_route(self.ifname, route)
                self.routes.append(route)
                changed = True
        self.dns = list(msg.get("dns", []))
        return changed
