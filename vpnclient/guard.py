"""Leak protection around a tunnel: kill switch, DNS through the tunnel, crash recovery (issue 6).

    guard = Guard(cfg, kill_switch=True, out=print)
    cache = guard.recover()              # undo what a crashed run left (the resolver); keep its kill switch
    guard.engage(endpoints, cache)       # state file first, then the kill switch
    guard.offer_bypass()                 # the cgroup of 'vpnclient bypass' (bypass.py)
    guard.apply(addresses, dns)          # after every tunnel config: resolver -> tunnel DNS, IPv6 rule
    guard.route(ifname, routes, addresses)   # after every tunnel config: the full tunnel (routing.py)
    guard.release(failed=False)          # stop: resolver, routing, bypass back; kill switch off unless
                                         # the run failed or it is permanent ("always")
    undo_crashed_run(cfg, out)           # 'vpnclient down' with no client running

Order matters for leaks and for exactness: the state file records the resolver's original, the
routing table and src_valid_mark's old value before any of them is touched; the kill switch goes
up before the first packet to a server and, after a crash or a failed run, stays up (replaced in
one nftables transaction) until `down`; a permanent one until `down --disable-kill-switch`.
"""

from __future__ import annotations

from . import bypass, killswitch, resolver, routing, state
from .config import DEFAULT_TABLE


class Guard:
    def __init__(self, cfg, kill_switch: bool, out=print):
        self.cfg = cfg
        self.kill_switch = kill_switch
        self.out = out
        self.path = cfg.state_file
        self.permanent = kill_switch == "always"
        self.state = {"interface": cfg.interface, "kill_switch": False, "resolver": None, "endpoints": {},
                      "control_socket": cfg.control_socket, "routing": None, "bypass": None}
        self.families: list[int] = []
        self.bypass_why = ""
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
        for line in _undo_routing(self.cfg, old) + _undo_bypass(old):
            self.out(line)
        return old.get("endpoints") or {}

    def _install_kill_switch(self, v6: bool) -> None:
        accept = list(getattr(self.cfg, "exclude", []))
        if getattr(self.cfg, "allow_lan", False):
            accept += routing.LAN[4] + routing.LAN[6] + killswitch.attached_networks(self.cfg.interface)
        extra = {"accept": accept} if accept else {}
        if getattr(self.cfg, "fwmark", 0):
            extra["mark"] = self.cfg.fwmark
        killswitch.install(self.cfg.interface, self.endpoints, tunnel_ipv6=v6, **extra)

    def engage(self, endpoints: list[tuple[str, int]], cache: dict) -> None:
        self.endpoints = list(endpoints)
        self.state.update(kill_switch=self.kill_switch, endpoints=cache)
        state.save(self.path, self.state)
        self.engaged = True
        if self.kill_switch:
            self._install_kill_switch(False)
            until = "'vpnclient down --disable-kill-switch'" if self.permanent else "'vpnclient down'"
            self.out(f"vpnclient: kill switch on: only the VPN servers and {self.cfg.interface} can be reached "
                     f"(it stays on until {until})")
        else:
            if killswitch.remove():
                self.out("vpnclient: removed the kill switch a previous run left")
            self.out("vpnclient: no kill switch: traffic can leave outside the tunnel, IPv6 too")

    def apply(self, addresses: list[str], dns: list[str]) -> list[str]:
        """Bring the kill switch and the resolver in line with the tunnel's config; lines to print."""
        lines = []
        v6 = any(":" in a for a in addresses)
        if self.kill_switch and v6 != self.tunnel_ipv6:
            self._install_kill_switch(v6)
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

    def offer_bypass(self) -> None:
        """The cgroup whose programs skip the tunnel (recorded in the state file first)."""
        root = bypass.cgroup2_root()
        if root is not None:
            self.state["bypass"] = f"{root}/{bypass.cgroup_name(self.cfg.interface)}"
            state.save(self.path, self.state)
        made, self.bypass_why = bypass.setup(self.cfg.interface, self.cfg.fwmark)
        self.state["bypass"] = made
        state.save(self.path, self.state)

    def route(self, ifname: str, routes: list[str], addresses: list[str]) -> list[str]:
        """The full tunnel for a tunnel config (routing.py); lines to print."""
        fams = routing.families(routes, addresses, self.cfg.full_tunnel)
        if fams == self.families:
            return []
        if self.state["routing"] is None:
            self.state["routing"] = {"table": self.cfg.route_table,
                                     "src_valid_mark": routing.read_src_valid_mark()}
        state.save(self.path, self.state)                 # what to undo is on disk before we change it
        routing.install(ifname, fams, self.cfg.route_table, self.cfg.fwmark, self.cfg.exclude,
                        self.cfg.allow_lan)
        if 4 in fams and self.state["routing"]["src_valid_mark"] not in (None, "1"):
            routing.write_src_valid_mark("1")
        self.families = fams
        if not fams:
            return ["vpnclient: no full tunnel: only the pushed routes go through the tunnel"]
        which = " and ".join(f"IPv{f}" for f in fams)
        return [f"vpnclient: full tunnel: all {which} traffic goes through {ifname} (routing table "
                f"{self.cfg.route_table}; the tunnel's own packets carry mark {self.cfg.fwmark:#x})"]

    def release(self, failed: bool = False) -> list[str]:
        """Undo the run: resolver, routing, bypass; the kill switch too unless the run failed or it is
        permanent (then the state file stays, without a client, so 'down' finds it). Lines to print."""
        lines = []
        saved = self.state["resolver"]
        if saved is not None:
            resolver.restore(saved)
            self.state["resolver"] = None
            lines.append(f"vpnclient: restored {saved['path'] if saved['kind'] != 'resolved' else 'systemd-resolved'}")
        lines += _undo_routing(self.cfg, self.state) + _undo_bypass(self.state)
        self.state.update(routing=None, bypass=None)
        keep = (failed or self.permanent) and self.kill_switch and killswitch.present()
        if keep:
            state.save(self.path, dict(self.state, control_socket=None))
            lines.append(_kept_line(self.cfg, self.permanent))
        else:
            if (self.engaged or self.kill_switch) and killswitch.remove():
                lines.append("vpnclient: kill switch off")
            state.remove(self.path)
        self.engaged = False
        return lines


def _kept_line(cfg, permanent: bool) -> str:
    where = f" --config {cfg.config_path}" if getattr(cfg, "config_path", "") else ""
    if permanent:
        return ('vpnclient: the kill switch stays on (kill_switch = "always"): nothing leaves outside the '
                f"tunnel until 'vpnclient down --disable-kill-switch{where}'")
    return (f"vpnclient: the kill switch stays on: nothing leaves outside the tunnel until "
            f"'vpnclient down{where}'")


def _undo_routing(cfg, st: dict) -> list[str]:
    """Remove the full tunnel a run recorded (by preference and table) and put src_valid_mark back."""
    rec = st.get("routing")
    if not rec:
        return []
    removed = routing.remove(int(rec.get("table") or DEFAULT_TABLE))
    if rec.get("src_valid_mark") not in (None, routing.read_src_valid_mark()):
        routing.write_src_valid_mark(rec["src_valid_mark"])
    return ["vpnclient: full tunnel off: routing rules and table removed"] if removed else []


def _undo_bypass(st: dict) -> list[str]:
    bypass.teardown(st.get("bypass"))
    return []


def undo_crashed_run(cfg, running, out=print, disable_kill_switch: bool = False) -> bool:
    """`vpnclient down` without a running client: resolver back, routing and bypass gone, kill switch off
    (a permanent one only with `disable_kill_switch`), state gone.

    Driven by the state file (written before anything changes), and only when the client that
    wrote it is gone (`running(control_socket)` is false). True if there was anything to undo."""
    old = state.load(cfg.state_file)
    if old is None:
        return _undo_without_state(cfg, out, disable_kill_switch)
    if old.get("control_socket") and running(old["control_socket"]):
        return False                  # its client is alive: 'down' goes to that one
    saved = old.get("resolver")
    if saved:
        resolver.restore(saved)
        out(f"vpnclient: restored {saved['path']}")
    for line in _undo_routing(cfg, old) + _undo_bypass(old):
        out(line)
    if old.get("kill_switch") == "always" and not disable_kill_switch and killswitch.present():
        state.save(cfg.state_file, dict(old, control_socket=None, resolver=None, routing=None, bypass=None))
        out(_kept_line(cfg, True))
        return True
    if killswitch.remove():
        out("vpnclient: kill switch off")
    state.remove(cfg.state_file)
    return True


def _undo_without_state(cfg, out, disable_kill_switch: bool) -> bool:
    did = False
    if routing.remove(getattr(cfg, "route_table", DEFAULT_TABLE)):
        out("vpnclient: removed full-tunnel routing rules a previous run left")
        did = True
    if killswitch.present():
        if disable_kill_switch:
            did |= killswitch.remove()
            out("vpnclient: kill switch off")
        else:
            out(f"vpnclient: a kill switch is in place but {cfg.state_file} does not say whose; if no vpnclient "
                f"runs here, remove it with 'vpnclient down --disable-kill-switch'")
    return did
