"""A packet capture on an underlay interface and the leak check over it (issue 6 tests).

`Capture(topo, ns, ifname, path)` runs `tcpdump -w path.pcap` in the namespace (both directions,
headers only, written packet by packet) from `start()` until `stop()`, which also returns the
packets tcpdump reports as dropped by the kernel (must be 0 for a leak check to mean anything).
`read_pcap` parses the file (classic pcap, Ethernet) and `leaks(frames, mac, allowed)` returns
every frame the client sent that is not allowed while a kill switch is on:

- UDP to a server endpoint (address and port): the tunnel itself;
- ARP: link-layer address resolution for the next hop, which the kill switch cannot see (nftables'
  inet family has no ARP) and which carries no user data;
- ICMPv6 router/neighbour solicitations and advertisements with hop limit 255 and MLD reports with
  hop limit 1 to ff02::/16: link-scope housekeeping that routers never forward (RFC 4861 receivers
  drop NDP with any other hop limit); the kill switch allows exactly these on purpose (see
  vpnclient/killswitch.py), and the kernel may send them on its own at any time.

Everything else the client sends counts, whatever its protocol: nothing is left unattributed.
"""

from __future__ import annotations

import ipaddress
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.netns import Topology, wait_until

ETH_IP4, ETH_IP6, ETH_ARP, ETH_VLAN = 0x0800, 0x86DD, 0x0806, 0x8100
NDP_TYPES = {133, 134, 135, 136}
MLD_TYPES = {131, 132, 143}


@dataclass
class Frame:
    src_mac: bytes
    ethertype: int
    version: int = 0            # IP version, 0 for non-IP
    src: str = ""
    dst: str = ""
    proto: int = -1             # IP protocol / IPv6 next header (after extension headers we know)
    sport: int = -1
    dport: int = -1
    icmp_type: int = -1
    hop_limit: int = -1

    def describe(self) -> str:
        if not self.version:
            return f"ethertype 0x{self.ethertype:04x}"
        ports = f" {self.sport}->{self.dport}" if self.sport >= 0 else ""
        icmp = f" icmp type {self.icmp_type}" if self.icmp_type >= 0 else ""
        return f"IPv{self.version} {self.src} -> {self.dst} proto {self.proto}{ports}{icmp} hlim {self.hop_limit}"


class Capture:
    def __init__(self, topo: Topology, ns: str, ifname: str, path: Path):
        if shutil.which("tcpdump") is None:
            raise RuntimeError("tcpdump is missing: 'make deps-system' installs it")
        self.topo, self.ns, self.ifname = topo, ns, ifname
        self.path = Path(path).with_suffix(".pcap")      # the tcpdump AppArmor profile allows *.pcap
        self.errlog = self.path.with_suffix(".tcpdump.log")
        self.proc = None

    def start(self) -> "Capture":
        self._err = open(self.errlog, "wb")
        # --immediate-mode: hand over each packet at once (no 1 s ring-buffer block timeout), -U: write it
        # at once; -s 160: headers are enough; -Z root: keep writing as root
        self.proc = self.topo.popen(self.ns, "tcpdump", "-n", "--immediate-mode", "-U", "-s", "160", "-Z", "root",
                                    "-i", self.ifname,
                                    "-w", str(self.path), stdout=subprocess.DEVNULL, stderr=self._err)
        if not wait_until(lambda: b"listening on" in self.errlog.read_bytes() or self.proc.poll() is not None, 10):
            raise RuntimeError(f"tcpdump did not start: {self.errlog.read_text(errors='replace')}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"tcpdump exited: {self.errlog.read_text(errors='replace')}")
        time.sleep(0.2)        # "listening on" comes just before the socket is bound: let it settle
        return self

    def stop(self) -> int:
        """Stop tcpdump (SIGINT, it flushes); returns the kernel's dropped-packet count."""
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(0.3)               # the last packets reach tcpdump before it stops reading
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._err.close()
        text = self.errlog.read_text(errors="replace")
        for line in text.splitlines():
            if "dropped by kernel" in line:
                return int(line.split()[0])
        raise RuntimeError(f"tcpdump gave no statistics: {text}")

    def frames(self) -> list[Frame]:
        return read_pcap(self.path)


def read_pcap(path: Path) -> list[Frame]:
    data = Path(path).read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError("not a classic pcap file")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    if linktype != 1:
        raise ValueError(f"pcap link type {linktype}, expected Ethernet (1)")
    out, pos = [], 24
    while pos + 16 <= len(data):
        incl = struct.unpack_from(endian + "I", data, pos + 8)[0]
        out.append(parse_ethernet(data[pos + 16:pos + 16 + incl]))
        pos += 16 + incl
    return out


def parse_ethernet(pkt: bytes) -> Frame:
    f = Frame(src_mac=pkt[6:12], ethertype=struct.unpack_from("!H", pkt, 12)[0] if len(pkt) >= 14 else 0)
    off = 14
    if f.ethertype == ETH_VLAN and len(pkt) >= 18:
        f.ethertype = struct.unpack_from("!H", pkt, 16)[0]
        off = 18
    ip = pkt[off:]
    if f.ethertype == ETH_IP4 and len(ip) >= 20:
        f.version, f.proto, f.hop_limit = 4, ip[9], ip[8]
        f.src, f.dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
        l4 = ip[(ip[0] & 0x0F) * 4:]
        frag = struct.unpack_from("!H", ip, 6)[0] & 0x1FFF
        if frag == 0:
            _ports(f, l4)
    elif f.ethertype == ETH_IP6 and len(ip) >= 40:
        f.version, f.hop_limit = 6, ip[7]
        f.src, f.dst = str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40]))
        nh, l4 = ip[6], ip[40:]
        while nh in (0, 43, 60) and len(l4) >= 8:          # hop-by-hop (MLD's router alert), routing, dest opts
            nh, l4 = l4[0], l4[(l4[1] + 1) * 8:]
        f.proto = nh
        _ports(f, l4)
    return f


def _ports(f: Frame, l4: bytes) -> None:
    if f.proto in (6, 17) and len(l4) >= 4:
        f.sport, f.dport = struct.unpack_from("!HH", l4, 0)
    elif f.proto in (1, 58) and l4:
        f.icmp_type = l4[0]


def _link_scope_icmpv6(f: Frame) -> bool:
    if f.version != 6 or f.proto != 58:
        return False
    if f.icmp_type in NDP_TYPES and f.hop_limit == 255:
        return True
    return f.icmp_type in MLD_TYPES and f.hop_limit == 1 and ipaddress.ip_address(f.dst) in ipaddress.ip_network("ff02::/16")


def leaks(frames: list[Frame], client_mac: bytes, endpoints: set[tuple[str, int]]) -> list[str]:
    """Descriptions of every frame the client sent that a kill switch must not let out."""
    bad = []
    norm = {(str(ipaddress.ip_address(h)), p) for h, p in endpoints}
    for f in frames:
        if f.src_mac != client_mac:
            continue                     # received, not sent
        if f.ethertype == ETH_ARP or _link_scope_icmpv6(f):
            continue
        if f.version and f.proto == 17 and (f.dst, f.dport) in norm:
            continue
        bad.append(f.describe())
    return bad


def sent_to(frames: list[Frame], client_mac: bytes, endpoint: tuple[str, int]) -> int:
    host, port = str(ipaddress.ip_address(endpoint[0])), endpoint[1]
    return sum(1 for f in frames if f.src_mac == client_mac and f.proto == 17 and (f.dst, f.dport) == (host, port))


def mac_of(topo: Topology, ns: str, ifname: str) -> bytes:
    out = topo.run(ns, "cat", f"/sys/class/net/{ifname}/address").stdout.strip()
    return bytes.fromhex(out.replace(":", ""))
