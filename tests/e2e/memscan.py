"""Read a live process's memory (/proc/PID/mem) and look for canary addresses and DNS names.

    hits = scan_pid(pid, Canaries(addresses=[...], names=[...]))
    python -m tests.e2e.memscan PID ADDRESS|NAME ...      # the same, by hand (prints JSON)

Every mapping of /proc/PID/maps with read permission is read (mappings the kernel refuses, such as
[vvar] or a guard page, are skipped and counted). What is looked for:

- an address: its text forms (compressed and exploded for IPv6), its packed bytes (4 or 16), which
  also covers it inside a sockaddr_in/sockaddr_in6 or a cookie input (packed + port); each hit is
  classified by what surrounds it ("sockaddr", "addr+port", "packed", "text");
- a DNS name: its text form, its wire form (length-prefixed labels) and its first label alone
  (which also covers any copy of part of a name).

The search is anchored: every canary address of one family shares a prefix and every canary name
shares a marker, so the scan finds all anchor occurrences (one `bytes.find` pass per anchor) and
checks only the few windows around them; a 100 MB process takes well under a second.

Packed IPv4 addresses are four bytes: by chance alone a given 4-byte value turns up in a process
image of N bytes with probability about N / 2**32 if the bytes were random. The canaries are chosen
to make that small (no zero or 0xff byte; see `ipv4_canaries`) and tests scan a fresh process for
the same canaries first, which shows the chance hit rate of these values is zero in a vpnd image.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from dataclasses import dataclass, field

WINDOW = 80
_MAPS = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


def wire_name(name: str) -> bytes:
    """The DNS wire form of `name`: length-prefixed labels and the root's zero byte."""
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes((len(label),)) + label.encode()
    return out + b"\x00"


def ipv4_canaries(prefix: str, count: int, start: int = 0x93) -> list[str]:
    """`count` addresses in `prefix` (a /24) whose last byte is odd and neither 0x00 nor 0xff."""
    net = ipaddress.ip_network(prefix)
    out = []
    for last in range(start, 0xFF, 2):
        out.append(str(net.network_address + last))
        if len(out) == count:
            return out
    raise ValueError("not that many")


@dataclass
class Canaries:
    addresses: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def patterns(self) -> list[tuple[bytes, list[tuple[str, str, bytes]]]]:
        """[(anchor, [(canary, form, pattern)])]: patterns grouped under an anchor they contain."""
        groups: dict[bytes, list] = {}

        def add(anchor: bytes, canary: str, form: str, pattern: bytes) -> None:
            assert anchor in pattern and len(pattern) <= WINDOW, (anchor, pattern)
            groups.setdefault(anchor, []).append((canary, form, pattern))

        for a in self.addresses:
            ip = ipaddress.ip_address(a)
            p = ip.packed
            add(p[:3] if ip.version == 4 else p[:8], a, "packed", p)
            text = str(ip).encode()
            add(text[:text.rindex(b"." if ip.version == 4 else b":") + 1][:8], a, "text", text)
            if ip.version == 6:
                ex = ip.exploded.encode()
                add(ex[:10], a, "text", ex)
        for n in self.names:
            first = n.split(".")[0].encode()
            marker = first[:4]
            add(marker, n, "text", n.encode())
            add(marker, n, "wire", wire_name(n))
            add(marker, n, "label", first)
        return list(groups.items())


def _classify(data: bytes, pos: int, pattern: bytes, form: str) -> str:
    if form != "packed":
        return form
    end = pos + len(pattern)
    family = b"\x02\x00" if len(pattern) == 4 else b"\x0a\x00"
    back = 4 if len(pattern) == 4 else 8      # sockaddr_in: family, port; sockaddr_in6: + flowinfo
    if pos >= back and data[pos - back:pos - back + 2] == family:
        return "sockaddr"
    if end + 2 <= len(data) and data[end:end + 2] != b"\x00\x00" and len(data) > end:
        return "addr+port?"
    return "packed"


def search(data: bytes, canaries: Canaries, base: int = 0, where: str = "") -> list[dict]:
    """Every occurrence in `data` of any form of any canary: [{canary, form, where, offset}]."""
    hits = []
    for anchor, pats in canaries.patterns():
        pos = data.find(anchor)
        while pos >= 0:
            lo = max(0, pos - WINDOW)
            window = data[lo:pos + WINDOW]
            for canary, form, pattern in pats:
                i = window.find(pattern)
                while i >= 0:
                    at = lo + i
                    hit = {"canary": canary, "form": _classify(data, at, pattern, form), "where": where,
                           "offset": base + at}
                    if hit not in hits:
                        hits.append(hit)
                    i = window.find(pattern, i + 1)
            pos = data.find(anchor, pos + 1)
    return hits


def mappings(pid: int | str) -> list[tuple[int, int, str, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            m = _MAPS.match(line.rstrip("\n"))
            if m:
                out.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4) or "[anon]"))
    return out


def read_memory(pid: int | str) -> tuple[list[tuple[int, str, bytes]], int]:
    """[(start, mapping name, bytes)] of every readable mapping, and how many were unreadable."""
    regions, skipped = [], 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, perms, name in mappings(pid):
            if perms[0] != "r":
                skipped += 1
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                skipped += 1
                continue
            regions.append((start, name, data or b""))
    return regions, skipped


def scan_pid(pid: int | str, canaries: Canaries) -> dict:
    """{"hits": [...], "bytes": total read, "regions": n, "skipped": n} for a live process."""
    regions, skipped = read_memory(pid)
    hits = []
    for start, name, data in regions:
        # a hit spanning two adjacent mappings is missed; mappings are page-aligned and objects rarely
        # straddle them (malloc arenas are one mapping)
        hits += search(data, canaries, start, name)
    return {"hits": hits, "bytes": sum(len(d) for _, _, d in regions), "regions": len(regions),
            "skipped": skipped}


def summary(hits: list[dict]) -> dict:
    """Counts by (canary kind, form, mapping), for a readable report."""
    out: dict[str, int] = {}
    for h in hits:
        kind = "name" if not any(c in h["canary"] for c in ".:") or h["form"] in ("wire", "label") \
            or re.search(r"[g-z]", h["canary"]) else "address"
        key = f"{kind}/{h['form']}/{h['where']}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


if __name__ == "__main__":
    pid, items = sys.argv[1], sys.argv[2:]
    addrs, names = [], []
    for it in items:
        try:
            ipaddress.ip_address(it)
            addrs.append(it)
        except ValueError:
            names.append(it)
    r = scan_pid(pid, Canaries(addrs, names))
    print(json.dumps({"summary": summary(r["hits"]), "hits": len(r["hits"]), "bytes": r["bytes"],
                      "skipped": r["skipped"]}))
