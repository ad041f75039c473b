"""Full tunnel the wg-quick way: a routing table of our own and policy rules (DESIGN §8, issue 12).

For each family that carries a full tunnel (`families`: a pushed 0.0.0.0/0 or ::/0, or
`full_tunnel = true` for every family the tunnel has an address for), `commands` gives, in order:

    ip -4 route replace default dev vpn0 table 51820
    ip -4 rule add to 10.0.0.0/8 lookup main pref 32760               # exclude / allow_lan, if any
    ip -4 rule add table main suppress_prefixlength 0 pref 32761      # main's specific routes win
    ip -4 rule add not fwmark 0xca6c table 51820 pref 32762            # everything unmarked: the tunnel

The tunnel's own sockets carry SO_MARK `fwmark` (vpncore.net.udp.open_connected), so they skip
pref 32762 and reach the server through the main table's default route, whichever network we
are on (roaming and failover follow the mark, not an address). The main table is never changed:
its default route stays, only ignored by pref 32761. `net.ipv4.conf.all.src_valid_mark=1` makes
rp_filter look up the reverse path with the packet's mark, and the nftables table
`inet vpnclient_marks` copies the mark into conntrack on the way out and back onto the replies
on the way in (as wg-quick does), so replies to marked sockets pass a strict rp_filter.

Removal (`remove`) finds what to delete by preference and table, not from memory: every rule at
PREFS whose table is ours or main, every route of our table, the nftables table. So after a
SIGKILL, the next `up` or `down` leaves `ip rule` and `ip route show table all` as before `up`.
The old src_valid_mark value is kept in the state file (guard.py) and put back by the caller.
One full-tunnel client per network namespace: a second would share the preferences.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

from vpncore.cli import UserError

PREF_EXCLUDE = 32760       # to CIDR lookup main: `exclude` and `allow_lan` networks
PREF_SUPPRESS = 32761      # lookup main suppress_prefixlength 0
PREF_TUNNEL = 32762        # not fwmark M lookup T
PREFS = (PREF_EXCLUDE, PREF_SUPPRESS, PREF_TUNNEL)
DEFAULTS = {4: "0.0.0.0/0", 6: "::/0"}
LAN = {4: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"],
       6: ["fc00::/7", "fe80::/10"]}
# on-link networks and fe80::/10 route through main already (pref 32761); these may sit behind a router
LAN_RULES = {4: LAN[4], 6: ["fc00::/7"]}
NFT_TABLE = "vpnclient_marks"
SRC_VALID_MARK = "/proc/sys/net/ipv4/conf/all/src_valid_mark"


def families(routes: list[str], addresses: list[str], full_tunnel: bool | None) -> list[int]:
    """The families (4, 6) whose default route goes into our table."""
    if full_tunnel is False:
        return []
    pushed = {ipaddress.ip_network(r, strict=False).version for r in routes if is_default(r)}
    if full_tunnel:
        pushed |= {ipaddress.ip_interface(a).version for a in addresses}
    return sorted(pushed)


def is_default(route: str) -> bool:
    """A default route in any spelling the control channel accepts (`0.0.0.0/0`, `::0/0`, `0:0::/00`:
    a prefix length of 0), never for the main table: `families` decides where it goes."""
    try:
        return ipaddress.ip_network(route, strict=False).prefixlen == 0
    except ValueError:
        return False


def bypass_networks(family: int, exclude: list[str], allow_lan: bool) -> list[str]:
    """Destinations of `family` that get a `lookup main` rule ahead of the tunnel."""
    nets = [n for n in exclude if ipaddress.ip_network(n).version == family]
    return nets + (LAN_RULES[family] if allow_lan else [])


def commands(ifname: str, fams: list[int], table: int, fwmark: int, exclude: list[str],
             allow_lan: bool) -> list[list[str]]:
    """The `ip` commands that set the full tunnel up, in order (the tunnel rule last)."""
    cmds = []
    for fam in fams:
        f = f"-{fam}"
        cmds.append(["ip", f, "route", "replace", "default", "dev", ifname, "table", str(table)])
        for net in bypass_networks(fam, exclude, allow_lan):
            cmds.append(["ip", f, "rule", "add", "to", net, "lookup", "main", "pref", str(PREF_EXCLUDE)])
        cmds.append(["ip", f, "rule", "add", "table", "main", "suppress_prefixlength", "0",
                     "pref", str(PREF_SUPPRESS)])
        cmds.append(["ip", f, "rule", "add", "not", "fwmark", hex(fwmark), "table", str(table),
                     "pref", str(PREF_TUNNEL)])
    return cmds


def nft_script(fwmark: int) -> str:
    """Mark save (postrouting) and restore (prerouting) through conntrack, replacing any old copy."""
    return "\n".join([
        f"table inet {NFT_TABLE}",
        f"delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE} {{",
        "  chain premangle {",
        "    type filter hook prerouting priority mangle; policy accept;",
        f"    ct mark {hex(fwmark)} meta mark set ct mark",
        "  }",
        "  chain postmangle {",
        "    type filter hook postrouting priority mangle; policy accept;",
        f"    meta mark {hex(fwmark)} ct mark set meta mark",
        "  }",
        "}",
    ]) + "\n"


def _run(argv: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=script, capture_output=True, text=True, timeout=15)
    except FileNotFoundError:
        raise UserError(f"the full tunnel needs the '{argv[0]}' command; install "
                        f"{'iproute2' if argv[0] == 'ip' else 'nftables'}", 1) from None
    except subprocess.TimeoutExpired:
        raise UserError(f"'{' '.join(argv)}' did not finish within 15 s", 1) from None


def _why(r: subprocess.CompletedProcess) -> str:
    lines = (r.stderr or r.stdout or "").strip().splitlines()
    return (lines[-1] if lines else f"exit status {r.returncode}").removeprefix("Error: ").rstrip(".")


def check_support() -> None:
    """Policy routing works here (`ip rule`), or one line and exit status 1."""
    r = _run(["ip", "-4", "rule", "show"])
    if r.returncode != 0:
        raise UserError(f"policy routing is not available here ('ip rule': {_why(r)}); the full tunnel "
                        f"needs a kernel with CONFIG_IP_MULTIPLE_TABLES, or set full_tunnel = false", 1)


def install(ifname: str, fams: list[int], table: int, fwmark: int, exclude: list[str],
            allow_lan: bool) -> None:
    """Set the full tunnel up for `fams`; on any failure remove it all again, then one UserError."""
    remove(table)
    if not fams:
        return
    steps = [(cmd, None) for cmd in commands(ifname, fams, table, fwmark, exclude, allow_lan)]
    steps.insert(0, (["nft", "-f", "-"], nft_script(fwmark)))
    for argv, script in steps:
        r = _run(argv, script)
        if r.returncode != 0:
            remove(table)
            hint = ("this kernel has no policy routing for that family" if "not supported" in _why(r)
                    else "check the kernel's policy routing and nftables support")
            raise UserError(f"cannot set up the full tunnel ('{' '.join(argv[:6])} ...': {_why(r)}); "
                            f"{hint}, or set full_tunnel = false", 1)


def _rules(fam: int) -> list[dict]:
    r = _run(["ip", "-j", f"-{fam}", "rule", "show"])
    if r.returncode != 0:
        return []
    try:
        return json.loads(r.stdout or "[]")
    except ValueError:
        return []


def remove(table: int) -> bool:
    """Delete our rules (by preference and table), our table's routes and the mark table.
    True if anything was there."""
    found = False
    for fam in (4, 6):
        for rule in _rules(fam):
            if rule.get("priority") in PREFS and rule.get("table") in (str(table), "main"):
                argv = ["ip", f"-{fam}", "rule", "del", "pref", str(rule["priority"]), "table", rule["table"]]
                if rule.get("dst"):
                    argv += ["to", f"{rule['dst']}/{rule.get('dstlen', 128 if fam == 6 else 32)}"]
                found |= _run(argv).returncode == 0
        r = _run(["ip", f"-{fam}", "route", "show", "table", str(table)])
        if r.returncode == 0 and r.stdout.strip():
            _run(["ip", f"-{fam}", "route", "flush", "table", str(table)])
            found = True
    if _run(["nft", "list", "table", "inet", NFT_TABLE]).returncode == 0:
        _run(["nft", "delete", "table", "inet", NFT_TABLE])
        found = True
    return found


def read_src_valid_mark() -> str | None:
    try:
        with open(SRC_VALID_MARK) as f:
            return f.read().strip()
    except OSError:
        return None


def write_src_valid_mark(value: str) -> None:
    try:
        with open(SRC_VALID_MARK, "w") as f:
            f.write(value)
    except OSError as exc:
        raise UserError(f"cannot set net.ipv4.conf.all.src_valid_mark ({exc.strerror}); run as root", 1) from None
