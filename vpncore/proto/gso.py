"""Software offload fallback: finish checksums and segment super-packets (SPEC §5.6).

A TUN opened with IFF_VNET_HDR hands over packets with a virtio_net_hdr and,
with offloads on, TCP/UDP super-packets of up to 64 KiB. A peer that did not
advertise the "superpacket" feature must get ordinary, complete IP packets:
these pure functions turn one header + super-packet into that list.
"""

from __future__ import annotations

import struct

VNET_HDR = struct.Struct("<BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
from .constants import VNET_HDR_LEN  # noqa: E402
ZERO_VNET_HDR = bytes(VNET_HDR_LEN)
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 3, 4, 5, 0x80
_IPPROTO_TCP, _IPPROTO_UDP = 6, 17
_H = struct.Struct("!H")
_I = struct.Struct("!I")


def ones_sum(data: bytes) -> int:
    """The 16-bit ones' complement sum of `data` (big-endian words), as an int in 0..0xffff."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big")
    r = n % 0xFFFF          # 2**16 == 1 (mod 0xffff): the sum of the words, folded
    return 0xFFFF if r == 0 and n else r


def checksum(data: bytes, initial: int = 0) -> int:
    s = ones_sum(data) + initial
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def finish_checksum(packet: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Complete a NEEDS_CSUM packet: the field holds the pseudo-header sum; fold in the rest."""
    at = csum_start + csum_offset
    if at + 2 > len(packet) or csum_start > len(packet):
        return b""
    c = checksum(packet[csum_start:])
    if c == 0 and packet[9 if packet[0] >> 4 == 4 else 6] == _IPPROTO_UDP:
        c = 0xFFFF
    return packet[:at] + _H.pack(c) + packet[at + 2:]


def _pseudo(packet: bytes, v: int, proto: int, length: int) -> int:
    if v == 4:
        return ones_sum(packet[12:20] + bytes((0, proto)) + _H.pack(length))
    return ones_sum(packet[8:40] + _I.pack(length) + bytes((0, 0, 0, proto)))


def _ipv4_header(hdr: bytes, total: int, ident: int) -> bytes:
    h = bytearray(hdr)
    h[2:4] = _H.pack(total)
    h[4:6] = _H.pack(ident & 0xFFFF)
    h[10:12] = b"\0\0"
    h[10:12] = _H.pack(checksum(bytes(h)))
    return bytes(h)


def segment(data: bytes) -> list[bytes]:
    """Complete IP packets from virtio_net_hdr + packet; [] if the packet is malformed."""
    if len(data) < VNET_HDR_LEN + 20:
        return []
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(data)
    packet = data[VNET_HDR_LEN:]
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        if flags & NEEDS_CSUM:
            packet = finish_checksum(packet, csum_start, csum_offset)
        return [packet] if packet else []
    v = packet[0] >> 4
    if v == 4:
        ihl = (packet[0] & 0x0F) * 4
        proto = packet[9]
    elif v == 6:
        ihl, proto = 40, packet[6]
    else:
        return []
    if kind in (GSO_TCPV4, GSO_TCPV6) and proto == _IPPROTO_TCP:
        return _segment_tcp(packet, v, ihl, gso_size)
    if kind in (GSO_UDP_L4, GSO_UDP) and proto == _IPPROTO_UDP:
        return _segment_udp(packet, v, ihl, gso_size)
    return []


def _segment_tcp(packet: bytes, v: int, ihl: int, mss: int) -> list[bytes]:
    if len(packet) < ihl + 20 or mss <= 0:
        return []
    thl = (packet[ihl + 12] >> 4) * 4
    start = ihl + thl
    payload = packet[start:]
    seq0 = _I.unpack_from(packet, ihl + 4)[0]
    flags0 = packet[ihl + 13]
    ident0 = _H.unpack_from(packet, 4)[0] if v == 4 else 0
    out = []
    count = max(1, -(-len(payload) // mss))
    for i in range(count):
        seg = payload[i * mss:(i + 1) * mss]
        last = i == count - 1
        tcp = bytearray(packet[ihl:start])
        tcp[4:8] = _I.pack((seq0 + i * mss) & 0xFFFFFFFF)
        fl = flags0 if last else flags0 & ~0x09          # FIN and PSH only on the last segment
        if i:
            fl &= ~0x80                                   # CWR only on the first
        tcp[13] = fl
        tcp[16:18] = b"\0\0"
        tcp_len = thl + len(seg)
        c = checksum(bytes(tcp) + seg, _pseudo(packet, v, _IPPROTO_TCP, tcp_len))
        tcp[16:18] = _H.pack(c)
        if v == 4:
            ip = _ipv4_header(packet[:ihl], ihl + tcp_len, ident0 + i)
        else:
            ip = packet[:4] + _H.pack(tcp_len) + packet[6:40]
        out.append(ip + bytes(tcp) + seg)
    return out


def _segment_udp(packet: bytes, v: int, ihl: int, size: int) -> list[bytes]:
    if len(packet) < ihl + 8 or size <= 0:
        return []
    payload = packet[ihl + 8:]
    ident0 = _H.unpack_from(packet, 4)[0] if v == 4 else 0
    out = []
    for i in range(max(1, -(-len(payload) // size))):
        seg = payload[i * size:(i + 1) * size]
        udp = bytearray(packet[ihl:ihl + 8])
        udp[4:6] = _H.pack(8 + len(seg))
        udp[6:8] = b"\0\0"
        c = checksum(bytes(udp) + seg, _pseudo(packet, v, _IPPROTO_UDP, 8 + len(seg))) or 0xFFFF
        udp[6:8] = _H.pack(c)
        if v == 4:
            ip = _ipv4_header(packet[:ihl], ihl + 8 + len(seg), ident0 + i)
        else:
            ip = packet[:4] + _H.pack(8 + len(seg)) + packet[6:40]
        out.append(ip + bytes(udp) + seg)
    return out


def split(data: bytes, max_bytes: int) -> list[bytes]:
    """Cut a TCP super-packet read (virtio_net_hdr + packet) into super-packets of whole segments
    with at most `max_bytes` of payload each, still in virtio_net_hdr form (local behaviour, §5.6).

    Why: a TCP connection takes its super-packet size from the TUN's gso_max_size once, when it
    connects; lowering it under loss (proto/loss.py) helps only new connections. Pieces get their own IP
    length, IPv4 ID and header checksum, TCP sequence number and flags (FIN/PSH on the last piece,
    CWR on the first), and the pseudo-header sum of their length in the checksum field, which is
    what NEEDS_CSUM asks the receiving kernel to complete. Anything else (UDP, no NEEDS_CSUM, not
    bigger than `max_bytes`, malformed) comes back unchanged as the only item."""
    flags, gso_type, _hdr_len, mss, _csum_start, _csum_offset = VNET_HDR.unpack_from(data)
    kind = gso_type & ~GSO_ECN
    if kind not in (GSO_TCPV4, GSO_TCPV6) or not flags & NEEDS_CSUM or mss <= 0:
        return [data]
    packet = memoryview(data)[VNET_HDR_LEN:]
    v = packet[0] >> 4
    if v == 4:
        ihl = (packet[0] & 0x0F) * 4
    elif v == 6:
        ihl = 40
    else:
        return [data]
    per = max(1, max_bytes // mss) * mss
    if len(packet) < ihl + 20:
        return [data]
    start = ihl + (packet[ihl + 12] >> 4) * 4
    payload = packet[start:]
    if len(payload) <= per or start > len(packet):
        return [data]
    vnet = bytes(data[:VNET_HDR_LEN])
    hdr = bytes(packet[:start])
    seq0 = _I.unpack_from(packet, ihl + 4)[0]
    flags0 = packet[ihl + 13]
    ident0 = _H.unpack_from(packet, 4)[0] if v == 4 else 0
    tcp0 = hdr[ihl:start]
    count = -(-len(payload) // per)
    out = []
    for k in range(count):
        seg = payload[k * per:(k + 1) * per]
        tcp = bytearray(tcp0)
        tcp[4:8] = _I.pack((seq0 + k * per) & 0xFFFFFFFF)
        fl = flags0 if k == count - 1 else flags0 & ~0x09
        if k:
            fl &= ~0x80
        tcp[13] = fl
        tcp_len = len(tcp) + len(seg)
        tcp[16:18] = _H.pack(_pseudo(hdr, v, _IPPROTO_TCP, tcp_len))
        if v == 4:
            ip = _ipv4_header(hdr[:ihl], ihl + tcp_len, ident0 + k * (per // mss))
        else:
            ip = hdr[:4] + _H.pack(tcp_len) + hdr[6:40]
        out.append(b"".join((vnet, ip, tcp, seg)))
    return out
