"""Egress and abuse controls in nftables: NAT for client traffic, and what clients may not reach.

Everything lives in one table, `inet vpnd_<interface>`, which vpnd deletes and recreates at start
(so rules left by a crashed run are removed on the next start) and deletes at shutdown:

- postrouting: masquerade the tunnel pools out of the egress interface the operator names;
- forward, from the tunnel: drop TCP to the blocked ports (25 by default), drop traffic to the
  server's own networks (its addresses, every network attached to it, and the private and
  link-local ranges), and cap new flows per second per account (one set of tunnel addresses and
  one `limit` rule per account: a kernel token bucket, nothing recorded).

Drops are counted by nftables counters (kernel memory) and read for `vpnd stats`; nothing logs.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

from vpncore.userror import UserError

PRIVATE = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
           "127.0.0.0/8", "fc00::/7", "fe80::/10", "::1/128"]


def _nft(script: str) -> None:
    try:
        r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise UserError("the 'nft' command is missing; install nftables (apt-get install nftables)", 1) from None
    if r.returncode != 0:
        detail = (r.stderr or "").strip().splitlines()
        raise UserError(f"nftables refused vpnd's rules ({detail[0] if detail else r.returncode}); "
                        f"check that the kernel has nf_tables and NAT support", 1)


def attached_networks(exclude_ifnames: tuple[str, ...]) -> list[str]:
    """Networks of every address on this machine's interfaces (but the tunnel)."""
    try:
        r = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10)
        links = json.loads(r.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    nets = set()
    for link in links:
        if link.get("ifname") in exclude_ifnames:
            continue
        for a in link.get("addr_info", []):
            try:
                nets.add(str(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network))
            except (KeyError, ValueError):
                continue
    return sorted(nets)


class Egress:
    """The nftables table of one vpnd instance."""

    def __init__(self, tun: str, pools: list, egress_interface: str | None, blocked_ports: list[int],
                 block_server_networks: bool, extra_blocked: list[str]):
        self.table = f"vpnd_{tun}"
        self.tun = tun
        self.pools = pools
        self.egress = egress_interface
        self.ports = blocked_ports
        self.block_server_networks = block_server_networks
        self.extra = extra_blocked
        self.active = False
        self._sets: dict[int, tuple[str, str]] = {}
        self._forwarding_was_off: list[str] = []

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

    def start(self) -> None:
        self.stop(quiet=True)      # rules a crashed run left behind
        v4, v6 = self._blocked()
        lines = [f"table inet {self.table} {{",
                 "  chain forward { type filter hook forward priority 0; policy accept;"]
        if self.ports:
            ports = ", ".join(str(p) for p in self.ports)
            lines.append(f'    iifname "{self.tun}" tcp dport {{ {ports} }} counter drop comment "blocked-port"')
        if v4:
            lines.append(f'    iifname "{self.tun}" ip daddr {{ {", ".join(v4)} }} counter drop comment "server-network"')
        if v6:
            lines.append(f'    iifname "{self.tun}" ip6 daddr {{ {", ".join(v6)} }} counter drop comment "server-network"')
        lines.append("  }")
        if self.egress:
            lines.append("  chain postrouting { type nat hook postrouting priority 100; policy accept;")
            for p in self.pools:
                fam = "ip" if p.version == 4 else "ip6"
                lines.append(f'    oifname "{self.egress}" {fam} saddr {p} masquerade')
            lines.append("  }")
        lines.append("}")
        _nft("\n".join(lines) + "\n")
        self.active = True
        if self.egress:
            for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
                r = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=10)
                if r.stdout.strip() == "0":
                    self._forwarding_was_off.append(key)
                    subprocess.run(["sysctl", "-q", "-w", f"{key}=1"], capture_output=True, timeout=10)

    def stop(self, quiet: bool = False) -> None:
        r = subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, text=True,
                           timeout=10) if _have_nft() else None
        self.active = False
        self._sets.clear()
        for key in self._forwarding_was_off:   # forwarding back as we found it (clean stops only)
            subprocess.run(["sysctl", "-q", "-w", f"{key}=0"], capture_output=True, timeout=10)
        self._forwarding_was_off.clear()
        if r is not None and r.returncode != 0 and not quiet and "No such file" not in r.stderr:
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
                f"add rule inet {self.table} forward ip saddr @{s4} jump acct{slot}\n"
                f"add rule inet {self.table} forward ip6 saddr @{s6} jump acct{slot}\n"
                + self.flow_cap(slot, per_second))

    def flow_cap(self, slot: int, per_second: int) -> str:
        """The nft script that (re)sets account slot `slot`'s new-flow cap; 0 = no cap."""
        script = f"flush chain inet {self.table} acct{slot}\n"
        if per_second:
            for fam in ("ipv4", "ipv6"):
                script += (f"add rule inet {self.table} acct{slot} meta nfproto {fam} ct state new limit rate "
                           f"over {per_second}/second burst {per_second} packets counter drop comment \"flow-cap\"\n")
        return script

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
    from shutil import which
    return which("nft") is not None
