"""Forget connection-tracking entries (ctnetlink, no extra package): the kernel's conntrack table is a
log of who talked to whom (DESIGN §4, §8), so vpnd deletes what it no longer needs.

- `forget(addresses)`: delete every entry whose original source or destination is one of these tunnel
  addresses (called when their session ends, from a worker thread: never in the packet loops);
- `forget_networks(networks, udp_ports)`: the same for whole pools, plus any UDP entry of the tunnel's
  listen ports (what reached them before the notrack rules were in place); at start and at stop.

How: one dump (IPCTNL_MSG_CT_GET with NLM_F_DUMP) per address family, matched here, then one
IPCTNL_MSG_CT_DELETE per match with the entry's original tuple (and zone). Nothing is logged or kept:
the functions return a count, and raise OSError when the kernel refuses (no conntrack in this
network namespace is not an error: nothing to forget).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
CTA_TUPLE_ORIG, CTA_ZONE = 1, 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
NLA_TYPE_MASK = 0x3FFF
_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")


def _attrs(buf, start: int, end: int):
    """(type, payload start, payload end, attribute start, attribute end) for each attribute."""
    pos = start
    while pos + 4 <= end:
        length, kind = _NLA.unpack_from(buf, pos)
        if length < 4 or pos + length > end:
            return
        yield kind & NLA_TYPE_MASK, pos + 4, pos + length, pos, pos + length
        pos += (length + 3) & ~3


class Entry:
    """One conntrack entry's original tuple, as parsed from a dump (and the raw attributes to delete it)."""

    __slots__ = ("family", "src", "dst", "proto", "sport", "dport", "raw")

    def __repr__(self) -> str:
        return "Entry(...)"


def _parse(buf, start: int, end: int, family: int) -> Entry | None:
    e = Entry()
    e.family, e.src, e.dst, e.proto, e.sport, e.dport, raw = family, None, None, 0, 0, 0, b""
    for kind, ps, pe, a0, a1 in _attrs(buf, start, end):
        if kind == CTA_TUPLE_ORIG:
            raw += bytes(buf[a0:a1]) + bytes(-(a1 - a0) % 4)
            for k2, ps2, pe2, _, _ in _attrs(buf, ps, pe):
                if k2 == CTA_TUPLE_IP:
                    for k3, ps3, pe3, _, _ in _attrs(buf, ps2, pe2):
                        if k3 in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                            e.src = bytes(buf[ps3:pe3])
                        elif k3 in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                            e.dst = bytes(buf[ps3:pe3])
                elif k2 == CTA_TUPLE_PROTO:
                    for k3, ps3, pe3, _, _ in _attrs(buf, ps2, pe2):
                        if k3 == CTA_PROTO_NUM and pe3 > ps3:
                            e.proto = buf[ps3]
                        elif k3 == CTA_PROTO_SRC_PORT and pe3 - ps3 >= 2:
                            e.sport = struct.unpack_from("!H", buf, ps3)[0]
                        elif k3 == CTA_PROTO_DST_PORT and pe3 - ps3 >= 2:
                            e.dport = struct.unpack_from("!H", buf, ps3)[0]
        elif kind == CTA_ZONE:
            raw += bytes(buf[a0:a1]) + bytes(-(a1 - a0) % 4)
    if e.src is None or not raw:
        return None
    e.raw = raw
    return e


def _socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    except OSError:
        pass
    s.bind((0, 0))
    s.settimeout(5)
    return s


def dump(family: int):
    """Every conntrack entry of one address family in this network namespace (a generator)."""
    s = _socket()
    try:
        body = _NFGEN.pack(family, 0, 0)
        s.send(_HDR.pack(16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                         NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        while True:
            buf = s.recv(1 << 20)
            pos = 0
            while pos + 16 <= len(buf):
                length, kind, flags, _, _ = _HDR.unpack_from(buf, pos)
                if length < 16 or pos + length > len(buf):
                    return
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", buf, pos + 16)[0]
                    if err in (0, errno.ENOENT, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                        return
                    raise OSError(err, "conntrack dump refused")
                if length >= 20:
                    fam = buf[pos + 16]
                    e = _parse(buf, pos + 20, pos + length, fam)
                    if e is not None:
                        yield e
                pos += (length + 3) & ~3
    finally:
        s.close()


def delete(entries) -> int:
    """Delete these entries (ENOENT, gone meanwhile, counts as done). Returns how many were deleted."""
    entries = list(entries)
    if not entries:
        return 0
    s = _socket()
    done = 0
    try:
        seq = 1
        for i in range(0, len(entries), 64):          # 64 requests in flight, then read their acks
            batch = entries[i:i + 64]
            out = bytearray()
            for e in batch:
                body = _NFGEN.pack(e.family, 0, 0) + e.raw
                out += _HDR.pack(16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                                 NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
                seq += 1
            s.send(bytes(out))
            acks = 0
            while acks < len(batch):
                buf = s.recv(1 << 16)
                pos = 0
                while pos + 16 <= len(buf):
                    length, kind, _, _, _ = _HDR.unpack_from(buf, pos)
                    if length < 16:
                        break
                    if kind == NLMSG_ERROR:
                        acks += 1
                        err = -struct.unpack_from("=i", buf, pos + 16)[0]
                        if err == 0:
                            done += 1
                        elif err != errno.ENOENT:
                            raise OSError(err, "conntrack delete refused")
                    pos += (length + 3) & ~3
    finally:
        s.close()
    return done


def _families(versions) -> list[int]:
    return [f for v, f in ((4, socket.AF_INET), (6, socket.AF_INET6)) if v in versions]


def forget(addresses) -> int:
    """Delete the entries whose original source or destination is one of `addresses` (ipaddress objects)."""
    packed = {a.packed for a in addresses}
    if not packed:
        return 0
    try:
        matches = [e for fam in _families({a.version for a in addresses}) for e in dump(fam)
                   if e.src in packed or e.dst in packed]
        packed.clear()
        return delete(matches)
    except FileNotFoundError:
        return 0


def forget_networks(networks, udp_ports=()) -> int:
    """Delete the entries from or to any address of `networks`, and UDP entries to or from `udp_ports`."""
    nets = [ipaddress.ip_network(n) for n in networks]
    ports = set(udp_ports)

    def hit(e: Entry) -> bool:
        if e.proto == socket.IPPROTO_UDP and (e.dport in ports or e.sport in ports):
            return True
        for raw in (e.src, e.dst):
            if raw is not None and len(raw) in (4, 16):
                a = ipaddress.ip_address(raw)
                if any(a.version == n.version and a in n for n in nets):
                    return True
        return False

    versions = {n.version for n in nets} | ({4, 6} if ports else set())
    try:
        return delete([e for fam in _families(versions) for e in dump(fam) if hit(e)])
    except FileNotFoundError:
        return 0
