"""The kill switch: an nftables table that lets nothing leave but tunnel traffic (issue 6).

One table, `inet vpnclient_killswitch`, in the network namespace vpnclient runs in. Its output and
forward chains drop by default; output accepts only

- loopback (local services keep working),
- the tunnel interface: IPv4 always, IPv6 only when the server gave the tunnel an IPv6 address
  (otherwise IPv6 is blocked everywhere: nothing IPv6 can leak, and the tunnel carries none),
- UDP to the configured server endpoints (every location, so a failover needs no rule change),
- packets that carry the tunnel's mark (`fwmark`: the tunnel's own sockets, and the programs that
  `vpnclient bypass` runs, bypass.py),
- the `exclude` networks, and with `allow_lan` the local networks (RFC 1918, 169.254/16, fc00::/7,
  fe80::/10 and the networks of the machine's own interfaces at `up`),
- link-scope housekeeping the underlay needs to stay up, which routers never forward and which
  carry no user data: IPv6 router and neighbour solicitations/advertisements (hop limit 255, RFC 4861
  drops any other), MLD reports to ff02::/16 (hop limit 1; switches with MLD snooping need them to
  deliver neighbour solicitations), and DHCP (v4: client port 68 to server port 67; v6: to the
  link-local group ff02::1:2), so a lease renewal does not take the underlay down. ARP is not seen
  by the inet family at all and keeps working.

Forward accepts only what goes into the tunnel (and what comes out of it), so containers or a
shared connection cannot leak either. A final `counter drop` rule counts what was blocked
(`nft list table inet vpnclient_killswitch`).

The table is kernel state: it stays when vpnclient is killed (SIGKILL, crash) or fails (a
runtime error) until `vpnclient down` deletes it; with `kill_switch = "always"` also after `down`,
with no client running, until `vpnclient down --disable-kill-switch`. Installing is one `nft -f`
transaction that deletes any old copy and adds the new one, so replacing it (reconnect after a
crash, a new tunnel configuration) never opens a gap.
"""

from __future__ import annotations

import ipaddress
import subprocess

from vpncore.net import links
from vpncore.cli import UserError

TABLE = "vpnclient_killswitch"
FAMILY = "inet"


def ruleset(ifname: str, endpoints: list[tuple[str, int]], tunnel_ipv6: bool, accept: list[str] = (),
            mark: int = 0) -> str:
    """The nft script (one transaction) that installs or replaces the table; `accept`: networks
    reachable outside the tunnel (exclude, allow_lan), `mark`: the tunnel's fwmark."""
    if not ifname or '"' in ifname or "\\" in ifname:
        raise UserError(f"interface name {ifname!r} cannot be used in a firewall rule; choose a plain name")
    out = ["    oifname \"lo\" accept",
           f"    oifname \"{ifname}\" meta nfproto ipv4 accept"]
    fwd = [f"    oifname \"{ifname}\" meta nfproto ipv4 accept",
           f"    iifname \"{ifname}\" accept"]
    if tunnel_ipv6:
        out.append(f"    oifname \"{ifname}\" meta nfproto ipv6 accept")
        fwd.insert(1, f"    oifname \"{ifname}\" meta nfproto ipv6 accept")
    for host, port in sorted(set(endpoints)):
        ip = ipaddress.ip_address(host)          # resolved addresses only, never names
        fam = "ip" if ip.version == 4 else "ip6"
        out.append(f"    {fam} daddr {ip} udp dport {int(port)} accept")
    if mark:
        out.append(f"    meta mark {int(mark):#x} accept")
    for net in sorted(set(accept), key=lambda n: (":" in n, n)):
        net = ipaddress.ip_network(net)          # validated networks only
        out.append(f"    {'ip' if net.version == 4 else 'ip6'} daddr {net} accept")
    out += [
        "    icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
        "    icmpv6 type { mld-listener-report, mld2-listener-report } ip6 hoplimit 1 ip6 daddr ff02::/16 accept",
        "    meta nfproto ipv4 udp sport 68 udp dport 67 accept",
        "    ip6 daddr ff02::1:2 udp sport 546 udp dport 547 accept",
        "    counter drop",
    ]
    return "\n".join([
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        "  chain output {",
        "    type filter hook output priority filter; policy drop;",
        *out,
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        *fwd,
        "    counter drop",
        "  }",
        "}",
    ]) + "\n"


def _nft(argv: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["nft", *argv], input=script, capture_output=True, text=True, timeout=15)
    except FileNotFoundError:
        raise UserError("the kill switch needs the 'nft' command; install nftables (apt-get install nftables) "
                        "or run 'vpnclient up --no-kill-switch'", 1) from None
    except subprocess.TimeoutExpired:
        raise UserError("nft did not answer within 15 s; the kill switch could not be changed", 1) from None


def install(ifname: str, endpoints: list[tuple[str, int]], tunnel_ipv6: bool = False, accept: list[str] = (),
            mark: int = 0) -> None:
    """Install or atomically replace the table."""
    r = _nft(["-f", "-"], ruleset(ifname, endpoints, tunnel_ipv6, accept, mark))
    if r.returncode != 0:
        detail = (r.stderr or "").strip().splitlines()
        raise UserError(f"nftables refused the kill switch ({detail[0] if detail else r.returncode}); check that "
                        f"the kernel has nf_tables, or run 'vpnclient up --no-kill-switch'", 1)


def attached_networks(skip: str) -> list[str]:
    """The networks of this namespace's interface addresses (not loopback, not `skip`)."""
    return links.attached_networks((skip,))


def present() -> bool:
    try:
        return _nft(["list", "table", FAMILY, TABLE]).returncode == 0
    except UserError:
        return False


def remove() -> bool:
    """Delete the table; True if it was there. Raises UserError only if it stays."""
    if not present():
        return False
    r = _nft(["delete", "table", FAMILY, TABLE])
    if r.returncode != 0 and present():
        raise UserError(f"could not remove the kill switch table ({(r.stderr or '').strip()[:120]}); "
                        f"remove it with 'nft delete table {FAMILY} {TABLE}'", 1)
    return True


def blocked_packets() -> int | None:
    """Packets the kill switch dropped so far (output and forward), or None without the table."""
    r = _nft(["list", "table", FAMILY, TABLE])
    if r.returncode != 0:
        return None
    total = 0
    for line in r.stdout.splitlines():
        words = line.split()
        if "counter" in words and "drop" in words and "packets" in words:
            total += int(words[words.index("packets") + 1])
    return total
