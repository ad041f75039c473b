"""Leak protection around a tunnel: kill switch, DNS through the tunnel, crash recovery (issue 6).

    guard = Guard(cfg, kill_switch=True, out=print)
    cache = guard.recover()              # undo what a crashed run left (the resolver); keep its kill switch
    guard.engage(endpoints, cache)       # state file first, then the kill switch
    guard.apply(addresses, dns)          # after every tunnel config: resolver -> tunnel DNS, IPv6 rule
    guard.release()                      # orderly stop: resolver back, kill switch off, state file gone
    undo_crashed_run(cfg, out)           # 'vpnclient down' with no client running

Order matters for leaks and for exactness: the state file records the resolver's original before
the resolver is touched; the kill switch goes up before the first packet to a server and, after a
crash, stays up (replaced in one nftables transaction) until `down` or an orderly stop.
"""

from __future__ import annotations

from . import killswitch, resolver, state


class Guard:
    def __init__(self, cfg, kill_switch: bool, out=print):
        self.cfg = cfg
        self.kill_switch = kill_switch
        self.out = out
        self.path = cfg.state_file
        self.state = {"interface": cfg.interface, "kill_switch": False, "resolver": None, "endpoints": {},
                      "control_socket": cfg.control_socket}
        self.endpoints: list[tuple[str, int]] = []
        self.tunnel_ipv6 = False
        self.dns: list[str] = []
        self.engaged = False
        self._said: dict = {}

    def __repr__(self) -> str:
        return "<vpnclient Guard>"

    def recover(self) -> dict:
        """Put back the resolver a crashed run replaced; returns its endpoint address cache."""
        old = state.load(self.path)
        if old is None:
            return {}
        saved = old.get("resolver")
        if saved:
            resolver.restore(saved)
            self.out(f"vpnclient: restored {saved['path']} as it was before a run that did not stop cleanly")
            state.save(self.path, dict(old, resolver=None))
        return old.get("endpoints") or {}

    def engage(self, endpoints: list[tuple[str, int]], cache: dict) -> None:
        self.endpoints = list(endpoints)
        self.state.update(kill_switch=self.kill_switch, endpoints=cache)
        state.save(self.path, self.state)
        self.engaged = True
        if self.kill_switch:
            killswitch.install(self.cfg.interface, self.endpoints, tunnel_ipv6=False)
            self.out(f"vpnclient: kill switch on: only the VPN servers and {self.cfg.interface} can be reached "
                     f"(it stays on until 'vpnclient down')")
        else:
            if killswitch.remove():
                self.out("vpnclient: removed the kill switch a previous run left")
            self.out("vpnclient: no kill switch: traffic can leave outside the tunnel, IPv6 too")

    def apply(self, addresses: list[str], dns: list[str]) -> list[str]:
        """Bring the kill switch and the resolver in line with the tunnel's config; lines to print."""
        lines = []
        v6 = any(":" in a for a in addresses)
        if self.kill_switch and v6 != self.tunnel_ipv6:
            killswitch.install(self.cfg.interface, self.endpoints, tunnel_ipv6=v6)
            self.tunnel_ipv6 = v6
        if self.kill_switch and addresses and self._said.get("ipv6") != v6:
            self._said["ipv6"] = v6
            if not v6:
                lines.append("vpnclient: the server gives no IPv6 address: IPv6 is blocked, in and outside "
                             "the tunnel")
        if dns and self.state["resolver"] is None and resolver.shared_with_host(self.cfg.resolv_conf):
            if not self._said.get("shared"):
                self._said["shared"] = True
                lines.append(f"vpnclient: not changing {self.cfg.resolv_conf}: this network namespace shares it "
                             f"with the host's; set resolv_conf (e.g. /etc/netns/NAME/resolv.conf)")
        elif dns and dns != self.dns:
            if self.state["resolver"] is None:
                path = self.cfg.resolv_conf
                snap = (resolver.resolved_snapshot(self.cfg.interface) if resolver.resolved_active(path)
                        else resolver.snapshot(path))
                self.state["resolver"] = snap
                state.save(self.path, self.state)         # the original is safe before we touch it
            resolver.point_at(self.state["resolver"], dns)
            self.dns = list(dns)
            where = ("systemd-resolved" if self.state["resolver"]["kind"] == "resolved"
                     else self.state["resolver"]["path"])
            lines.append(f"vpnclient: DNS goes through the tunnel: {where} now uses {', '.join(dns)}")
        elif not dns and not self.dns and addresses and not self._said.get("no-dns"):
            self._said["no-dns"] = True
            lines.append("vpnclient: the server pushes no DNS server: the resolver is left as it is"
                         + (" (the kill switch blocks DNS outside the tunnel)" if self.kill_switch else ""))
        return lines

    def release(self) -> list[str]:
        """Undo everything (orderly stop). Lines to print."""
        lines = []
        saved = self.state["resolver"]
        if saved is not None:
            resolver.restore(saved)
            self.state["resolver"] = None
            lines.append(f"vpnclient: restored {saved['path'] if saved['kind'] != 'resolved' else 'systemd-resolved'}")
        if self.engaged or self.kill_switch:
            if killswitch.remove():
                lines.append("vpnclient: kill switch off")
        state.remove(self.path)
        self.engaged = False
        return lines


def undo_crashed_run(cfg, running, out=print) -> bool:
    """`vpnclient down` without a running client: resolver back, kill switch off, state gone.

    Driven by the state file (written before anything changes), and only when the client that
    wrote it is gone (`running(control_socket)` is false). True if there was anything to undo."""
    old = state.load(cfg.state_file)
    if old is None:
        if killswitch.present():
            out(f"vpnclient: a kill switch is in place but {cfg.state_file} does not say whose; if no vpnclient "
                f"runs here, remove it with 'nft delete table {killswitch.FAMILY} {killswitch.TABLE}'")
        return False
    if old.get("control_socket") and running(old["control_socket"]):
        return False                  # its client is alive: 'down' goes to that one
    saved = old.get("resolver")
    if saved:
        resolver.restore(saved)
        out(f"vpnclient: restored {saved['path']}")
    if killswitch.remove():
        out("vpnclient: kill switch off")
    state.remove(cfg.state_file)
    return True
