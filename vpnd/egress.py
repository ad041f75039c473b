"""Egress and abuse controls in nftables: NAT for client traffic, and what clients may not reach.

Everything lives in one table, `inet vpnd_<interface>`, which vpnd deletes and recreates at start
(so rules left by a crashed run are removed on the next start) and deletes at shutdown:

- raw_prerouting, raw_output (priority raw): `notrack` for the tunnel's own UDP port(s), so the
  kernel's connection tracking never holds a client's real address and port (DESIGN §8);
- postrouting: masquerade the tunnel pools out of the egress interface (IPv4; IPv6 too unless a full
  tunnel has a global IPv6 pool, which is routed); a client flow whose UDP source port is one of the
  listen ports gets another one (its replies would otherwise be taken for tunnel datagrams);
- forward, from the tunnel: drop TCP to the blocked ports (25 by default), drop traffic to the
  server's own networks (its addresses, every network attached to it, and the private and
  link-local ranges), and cap new flows per second per account (one set of tunnel addresses and
  one `limit` rule per account: a kernel token bucket, nothing recorded);
- forward, to the tunnel: drop what comes from another interface unless it answers a connection a
  client opened (conntrack state established or related);
- `forwarding_was_off_ipv4` / `_ipv6`: empty chains that say vpnd turned that forwarding sysctl on.
  They are kernel state, not a file: a crashed run's table tells the next start what to put back.

A host firewall whose forward hook drops by default (an iptables `FORWARD DROP` policy, as Docker and
ufw set: `table ip filter` chain FORWARD in nftables) would drop the tunnel's traffic whatever vpnd's
table says (a drop in any base chain is final). vpnd appends two accept rules for its interface to
each such chain, tagged with the comment `vpnd_<interface>`, and deletes them by handle at stop and
at the next start; with iptables-legacy it does the same with `iptables-legacy -A/-D`.

Drops are counted by nftables counters (kernel memory) and read for `vpnd stats`; nothing logs.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import subprocess
import sys
from shutil import which

from vpncore.net.links import attached_networks
from vpncore.cli import UserError
from vpncore.log import WARNING, journal_prefix

PRIVATE = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
           "127.0.0.0/8", "fc00::/7", "fe80::/10", "::1/128"]
ULA = ipaddress.ip_network("fc00::/7")
FORWARDING = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
MARKER = {4: "forwarding_was_off_ipv4", 6: "forwarding_was_off_ipv6"}
LEGACY = {4: ("iptables-legacy", "/proc/net/ip_tables_names"), 6: ("ip6tables-legacy", "/proc/net/ip6_tables_names")}


def _nft(script: str) -> None:
    try:
        r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise UserError("the 'nft' command is missing; install nftables (apt-get install nftables)", 1) from None
    if r.returncode != 0:
        detail = (r.stderr or "").strip().splitlines()
        raise UserError(f"nftables refused vpnd's rules ({detail[0] if detail else r.returncode}); "
                        f"check that the kernel has nf_tables and NAT support", 1)


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None


# --- the egress interface: from the default route ----------------------------------------------------

def parse_default_route(text: str) -> str | None:
    """The interface of the preferred default route in `ip -j route show default` output, or None."""
    try:
        routes = json.loads(text or "[]")
    except ValueError:
        return None
    best = None
    for r in routes if isinstance(routes, list) else []:
        if not isinstance(r, dict) or r.get("dst") != "default" or r.get("type", "unicast") != "unicast":
            continue
        dev = r.get("dev") or next((h.get("dev") for h in r.get("nexthops", []) if isinstance(h, dict)
                                    and h.get("dev")), None)
        if not dev:
            continue
        metric = r.get("metric", 0) if isinstance(r.get("metric", 0), int) else 0
        if best is None or metric < best[0]:
            best = (metric, dev)
    return best[1] if best else None


def default_route_interface(version: int) -> str | None:
    argv = ["ip", "-j"] + (["-6"] if version == 6 else ["-4"]) + ["route", "show", "default"]
    r = _run(argv)
    return parse_default_route(r.stdout) if r is not None and r.returncode == 0 else None


def egress_interfaces(cfg) -> dict[int, str]:
    """{IP version: egress interface} for each pool: `egress_interface`, else (full tunnel) the
    interface of that family's default route. A full tunnel with a pool that has neither is a config
    error (exit 2), found before anything is set up."""
    pools = {n.version: n for n in (cfg.pool4, cfg.pool6) if n is not None}
    if cfg.egress_interface:
        return {v: cfg.egress_interface for v in pools}
    if not cfg.full_tunnel:
        return {}
    out = {}
    for v in sorted(pools):
        dev = default_route_interface(v)
        if dev is None:
            raise UserError(f"full_tunnel needs a way out: this server has no IPv{v} default route; set "
                            f"egress_interface = \"eth0\" (your internet interface) in [server]"
                            + (" or remove address_pool6" if v == 6 else ""))
        out[v] = dev
    return out


# --- other firewalls on the forward hook ---------------------------------------------------------------

def forward_drop_chains(ruleset: dict, own_table: str) -> list[tuple[str, str, str]]:
    """(family, table, chain) of every base chain on the forward hook with policy drop, outside
    vpnd's own table, in `nft -j list ruleset` output."""
    out = []
    for item in ruleset.get("nftables", []):
        c = item.get("chain") if isinstance(item, dict) else None
        if not c or c.get("hook") != "forward" or c.get("policy") != "drop":
            continue
        if c.get("family") not in ("ip", "ip6", "inet"):
            continue
        if c.get("family") == "inet" and c.get("table") == own_table:
            continue
        out.append((c["family"], c["table"], c["name"]))
    return out


def tagged_rules(ruleset: dict, tag: str) -> list[tuple[str, str, str, int]]:
    """(family, table, chain, handle) of the rules carrying comment `tag` (outside vpnd's table)."""
    out = []
    for item in ruleset.get("nftables", []):
        r = item.get("rule") if isinstance(item, dict) else None
        if r and r.get("comment") == tag and not (r.get("family") == "inet" and r.get("table") == tag):
            out.append((r["family"], r["table"], r["chain"], r["handle"]))
    return out


def accept_rules(chains, tun: str, tag: str) -> list[dict]:
    """nft JSON commands: accept the tunnel's traffic in each chain (appended: the chain's own rules
    still come first; vpnd's table decides what comes in from outside)."""
    cmds = []
    for family, table, chain in chains:
        for key in ("iifname", "oifname"):
            cmds.append({"add": {"rule": {
                "family": family, "table": table, "chain": chain, "comment": tag,
                "expr": [{"match": {"op": "==", "left": {"meta": {"key": key}}, "right": tun}},
                         {"counter": None}, {"accept": None}]}}})
    return cmds


def _ruleset() -> dict:
    r = _run(["nft", "-j", "list", "ruleset"])
    if r is None or r.returncode != 0:
        return {}
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {}


def _nft_json(cmds: list[dict]) -> bool:
    if not cmds:
        return True
    r = _run(["nft", "-j", "-f", "-"], json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}] + cmds}))
    return r is not None and r.returncode == 0


def _legacy_tables(version: int) -> bool:
    try:
        with open(LEGACY[version][1]) as f:
            return "filter" in f.read().split()
    except OSError:
        return False


def legacy_forward_drop(version: int) -> bool | None:
    """True if the legacy (x_tables) FORWARD policy of this family is DROP, False if not or no such
    table, None if the table exists but iptables-legacy is missing (cannot tell)."""
    if not _legacy_tables(version):
        return False
    tool = which(LEGACY[version][0])
    if tool is None:
        return None
    r = _run([tool, "-w", "-S", "FORWARD"])
    return r is not None and r.returncode == 0 and "-P FORWARD DROP" in r.stdout.splitlines()


def _legacy_remove(version: int, tag: str) -> None:
    tool = which(LEGACY[version][0])
    if tool is None or not _legacy_tables(version):
        return
    r = _run([tool, "-w", "-S", "FORWARD"])
    for line in (r.stdout.splitlines() if r is not None and r.returncode == 0 else []):
        if line.startswith("-A FORWARD ") and f"--comment {tag}" in line:
            _run([tool, "-w", "-D"] + shlex.split(line)[1:])


def sysctl_get(key: str) -> str | None:
    r = _run(["sysctl", "-n", key])
    return r.stdout.strip() if r is not None and r.returncode == 0 else None


def sysctl_set(key: str, value: str) -> None:
    """Set a sysctl and check it took: one line, exit 1, if not."""
    r = _run(["sysctl", "-q", "-w", f"{key}={value}"])
    if r is None or r.returncode != 0 or sysctl_get(key) != value:
        raise UserError(f"could not set {key} to {value} (sysctl failed); vpnd needs to change it to "
                        f"forward the tunnel's traffic: run it as root in a namespace where /proc/sys is writable", 1)


class Egress:
    """The nftables table of one vpnd instance, and the forwarding sysctls and foreign accept rules
    that go with it."""

    def __init__(self, tun: str, pools: list, egress_interface, blocked_ports: list[int],
                 block_server_networks: bool, extra_blocked: list[str], *, full_tunnel: bool = False,
                 listen_ports=()):
        self.table = f"vpnd_{tun}"
        self.tun = tun
        self.pools = pools
        if isinstance(egress_interface, dict):          # {IP version: interface}, see egress_interfaces
            self.egress = dict(egress_interface)
        else:
            self.egress = {p.version: egress_interface for p in pools} if egress_interface else {}
        self.full_tunnel = full_tunnel
        self.ports = blocked_ports
        self.listen_ports = sorted(set(listen_ports))
        self.block_server_networks = block_server_networks
        self.extra = extra_blocked
        self.active = False
        self._sets: dict[int, tuple[str, str]] = {}
        self._forwarding_was_off: list[int] = []     # IP versions whose forwarding vpnd turned on
        self._legacy_added: list[int] = []

    def __repr__(self) -> str:
        return f"Egress({self.table})"

    def _blocked(self) -> tuple[list[str], list[str]]:
        nets = list(self.extra)
        if self.block_server_networks:
            nets += PRIVATE + attached_networks((self.tun,))
        pools = {str(p) for p in self.pools}
        v4 = sorted({n for n in nets if ipaddress.ip_network(n).version == 4 and n not in pools})
        v6 = sorted({n for n in nets if ipaddress.ip_network(n).version == 6 and n not in pools})
        return v4, v6

    def masqueraded(self, pool) -> bool:
        """IPv4 pools are always NATed; an IPv6 pool in a full tunnel only when it is a ULA (a global
        pool is routed: the clients keep their tunnel addresses)."""
        if pool.version not in self.egress:
            return False
        return pool.version == 4 or not self.full_tunnel or pool.subnet_of(ULA)

    @property
    def forwards(self) -> list[int]:
        """IP versions whose forwarding sysctl vpnd needs on."""
        return sorted({p.version for p in self.pools if p.version in self.egress})

    def script(self, blocked: tuple[list[str], list[str]], was_off=()) -> str:
        """The nft script that creates vpnd's table."""
        v4, v6 = blocked
        tun = self.tun
        lines = [f"table inet {self.table} {{"]
        if self.listen_ports:
            ports = ", ".join(str(p) for p in self.listen_ports)
            lines += ["  chain raw_prerouting { type filter hook prerouting priority raw; policy accept;",
                      f'    iifname != "{tun}" udp dport {{ {ports} }} fib daddr type local notrack',
                      "  }",
                      "  chain raw_output { type filter hook output priority raw; policy accept;",
                      f"    udp sport {{ {ports} }} notrack",
                      "  }"]
        lines.append("  chain forward { type filter hook forward priority 0; policy accept;")
        if self.ports:
            ports = ", ".join(str(p) for p in self.ports)
            lines.append(f'    iifname "{tun}" tcp dport {{ {ports} }} counter drop comment "blocked-port"')
        if v4:
            lines.append(f'    iifname "{tun}" ip daddr {{ {", ".join(v4)} }} counter drop comment "server-network"')
        if v6:
            lines.append(f'    iifname "{tun}" ip6 daddr {{ {", ".join(v6)} }} counter drop comment "server-network"')
        lines.append(f'    oifname "{tun}" iifname != "{tun}" ct state != {{ established, related }} '
                     f'counter drop comment "inbound"')
        lines.append("  }")
        nat = [p for p in self.pools if self.masqueraded(p)]
        if nat:
            lines.append("  chain postrouting { type nat hook postrouting priority 100; policy accept;")
            for p in nat:
                fam, out = ("ip" if p.version == 4 else "ip6"), self.egress[p.version]
                if self.listen_ports:       # never map a client flow onto the tunnel's own port
                    low = min(self.listen_ports)
                    span = f"1024-{low - 1}" if low > 2048 else f"{max(self.listen_ports) + 1}-65535"
                    ports = ", ".join(str(x) for x in self.listen_ports)
                    lines.append(f'    oifname "{out}" {fam} saddr {p} udp sport {{ {ports} }} masquerade to :{span}')
                lines.append(f'    oifname "{out}" {fam} saddr {p} masquerade')
            lines.append("  }")
        for v in was_off:
            lines.append(f"  chain {MARKER[v]} {{ }}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _leftover_markers(self) -> list[int]:
        """IP versions whose forwarding a crashed run turned on (its table's marker chains)."""
        r = _run(["nft", "-j", "list", "table", "inet", self.table])
        if r is None or r.returncode != 0:
            return []
        try:
            items = json.loads(r.stdout).get("nftables", [])
        except ValueError:
            return []
        names = {i["chain"].get("name") for i in items if isinstance(i, dict) and "chain" in i}
        return [v for v, name in MARKER.items() if name in names]

    def _remove_foreign(self) -> None:
        """Delete the accept rules vpnd added to other tables' chains (by handle), and legacy ones."""
        rules = tagged_rules(_ruleset(), self.table)
        _nft_json([{"delete": {"rule": {"family": f, "table": t, "chain": c, "handle": h}}}
                   for f, t, c, h in rules])
        for v in (4, 6):
            _legacy_remove(v, self.table)
        self._legacy_added.clear()

    def start(self) -> None:
        # What a crashed run left: forwarding it turned on, accept rules, its table.
        leftover = self._leftover_markers()
        self._remove_foreign()
        self.stop(quiet=True)
        for v in leftover:
            sysctl_set(FORWARDING[v], "0")
        v4, v6 = self._blocked()
        was_off = [v for v in self.forwards if sysctl_get(FORWARDING[v]) == "0"]
        foreign = forward_drop_chains(_ruleset(), self.table)
        legacy = {v: legacy_forward_drop(v) for v in (4, 6) if any(p.version == v for p in self.pools)}
        _nft(self.script((v4, v6), was_off))
        self._forwarding_was_off = was_off      # the markers are in the kernel from here on
        self.active = True
        try:
            if not _nft_json(accept_rules(foreign, self.tun, self.table)):
                raise UserError(f"this host's firewall drops forwarded packets (a forward chain with policy "
                                f"drop) and vpnd could not add its accept rules there; allow the tunnel: "
                                f"'iptables -A FORWARD -i {self.tun} -j ACCEPT' and "
                                f"'iptables -A FORWARD -o {self.tun} -j ACCEPT'", 1)
            for v, drop in legacy.items():
                if drop is None:
                    print(f"{journal_prefix(sys.stderr, WARNING)}vpnd: warning: legacy ip{'6' if v == 6 else ''}tables rules are loaded but "
                          f"{LEGACY[v][0]} is missing, so vpnd cannot tell whether they drop the tunnel's "
                          f"forwarded traffic; install iptables", file=sys.stderr, flush=True)
                elif drop:
                    tool = which(LEGACY[v][0])
                    for flag in ("-i", "-o"):
                        r = _run([tool, "-w", "-A", "FORWARD", flag, self.tun, "-m", "comment", "--comment",
                                  self.table, "-j", "ACCEPT"])
                        if r is None or r.returncode != 0:
                            raise UserError(f"this host's legacy iptables FORWARD policy is DROP and vpnd could "
                                            f"not add its accept rules; run '{LEGACY[v][0]} -A FORWARD -i "
                                            f"{self.tun} -j ACCEPT' and the same with -o {self.tun}", 1)
                    self._legacy_added.append(v)
            for v in was_off:
                sysctl_set(FORWARDING[v], "1")
        except BaseException:
            self.stop(quiet=True)      # nothing half set up
            raise

    def stop(self, quiet: bool = False) -> None:
        error = None
        for v in self._forwarding_was_off:   # forwarding back as we found it, before the markers go
            try:
                sysctl_set(FORWARDING[v], "0")
            except UserError as exc:
                error = error or exc
        self._forwarding_was_off = []
        if self.active:
            self._remove_foreign()
        r = subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, text=True,
                           timeout=10) if _have_nft() else None
        self.active = False
        self._sets.clear()
        if quiet:
            return
        if error is not None:
            raise error
        if r is not None and r.returncode != 0 and "No such file" not in r.stderr:
            raise UserError(f"could not remove nftables table {self.table}", 1)

    # --- per-account new-flow caps ------------------------------------------------------------
    def account_slot(self, slot: int, per_second: int) -> str:
        """The nft script for a new account slot: its address sets, a chain the forward chain jumps
        to for its addresses, and (if capped) its new-flow limit rules in that chain."""
        s4, s6 = f"acct{slot}_v4", f"acct{slot}_v6"
        self._sets[slot] = (s4, s6)
        return (f"add set inet {self.table} {s4} {{ type ipv4_addr; }}\n"
                f"add set inet {self.table} {s6} {{ type ipv6_addr; }}\n"
                f"add chain inet {self.table} acct{slot}\n"
                f"add rule inet {self.table} forward ip saddr @{s4} jump acct{slot} comment \"acct{slot}\"\n"
                f"add rule inet {self.table} forward ip6 saddr @{s6} jump acct{slot} comment \"acct{slot}\"\n"
                + self.flow_cap(slot, per_second))

    def flow_cap(self, slot: int, per_second: int) -> str:
        """The nft script that (re)sets account slot `slot`'s new-flow cap; 0 = no cap."""
        script = f"flush chain inet {self.table} acct{slot}\n"
        if per_second:
            for fam in ("ipv4", "ipv6"):
                script += (f"add rule inet {self.table} acct{slot} meta nfproto {fam} ct state new limit rate "
                           f"over {per_second}/second burst {per_second} packets counter drop comment \"flow-cap\"\n")
        return script

    def drop_slot(self, slot: int) -> bool:
        """Delete an account slot: its jump rules (found by their comment), chain and sets (the
        account was removed or suspended: nothing of it stays in the kernel). Blocking: a worker thread."""
        self._sets.pop(slot, None)
        if not self.active:
            return True
        r = subprocess.run(["nft", "-j", "list", "chain", "inet", self.table, "forward"], capture_output=True,
                           text=True, timeout=10)
        try:
            items = json.loads(r.stdout)["nftables"]
        except (ValueError, KeyError):
            return False
        tag = f"acct{slot}"
        cmds = [{"delete": {"rule": {"family": "inet", "table": self.table, "chain": "forward",
                                     "handle": i["rule"]["handle"]}}}
                for i in items if isinstance(i, dict) and i.get("rule", {}).get("comment") == tag]
        cmds.append({"delete": {"chain": {"family": "inet", "table": self.table, "name": tag}}})
        cmds += [{"delete": {"set": {"family": "inet", "table": self.table, "name": f"{tag}_v{v}"}}} for v in (4, 6)]
        return _nft_json(cmds)

    def element(self, slot: int, address, add: bool) -> str:
        s4, s6 = self._sets[slot]
        verb = "add" if add else "delete"
        return f"{verb} element inet {self.table} {s4 if address.version == 4 else s6} {{ {address} }}\n"

    def apply(self, script: str) -> bool:
        if not script or not self.active:
            return True
        r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10)
        return r.returncode == 0

    def counters(self) -> dict[str, int]:
        """Packets dropped by each kind of rule (from nftables' own counters)."""
        if not self.active:
            return {}
        r = subprocess.run(["nft", "-j", "list", "table", "inet", self.table], capture_output=True, text=True,
                           timeout=10)
        out: dict[str, int] = {}
        try:
            items = json.loads(r.stdout)["nftables"]
        except (ValueError, KeyError):
            return out
        for item in items:
            rule = item.get("rule")
            if not rule:
                continue
            packets = sum(e["counter"]["packets"] for e in rule.get("expr", []) if "counter" in e)
            name = rule.get("comment")
            if name:
                out[name] = out.get(name, 0) + packets
        return out


def _have_nft() -> bool:
    return which("nft") is not None
