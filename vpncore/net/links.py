"""This network namespace's own networks, read from `ip -j addr` (vpnd's egress rules, vpnclient's LAN)."""

from __future__ import annotations

import ipaddress
import json
import subprocess


def attached_networks(skip: tuple[str, ...] = ()) -> list[str]:
    """The networks of every interface address here but loopback and the interfaces in `skip`
    (sorted, e.g. ["198.18.0.0/24", "2001:2::/64"]); [] when `ip` cannot be asked."""
    try:
        r = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10)
        links = json.loads(r.stdout or "[]") if r.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    nets = set()
    for link in links:
        if link.get("ifname") == "lo" or link.get("ifname") in skip:
            continue
        for a in link.get("addr_info", []):
            try:
                nets.add(str(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network))
            except (KeyError, ValueError):
                continue
    return sorted(nets)
