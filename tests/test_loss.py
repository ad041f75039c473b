"""The sender's reaction to the peer's loss reports: super-packet size and parity (vpncore/proto/loss.py,
SPEC §5.5, §6.3), the cutting of big TCP reads (vpncore/proto/gso.py split, SPEC §5.6) and the UDP
train that carries a parity fragment (vpncore/net/pump.py)."""

from __future__ import annotations

import socket
import struct

import pytest

from vpncore.proto.loss import GROW_AFTER, LARGE, SMALL, SPLIT_ABOVE, GsoGovernor
from vpncore.net.pump import Udp
from vpncore.proto import gso
from vpncore.proto.constants import VNET_HDR_LEN


def test_starts_large_without_parity():
    g = GsoGovernor()
    assert g.size == LARGE and not g.parity
    assert g.pieces(b"x" * (SPLIT_ABOVE + 1)) == [b"x" * (SPLIT_ABOVE + 1)]


def _lossy(g):
    g.report(80, 20)
    assert g.size == SMALL and g.parity


def test_heavy_loss_shrinks_and_adds_parity_then_clean_reports_grow_without_it():
    g = GsoGovernor()
    _lossy(g)
    for i in range(GROW_AFTER - 1):
        g.report(100, 0)
        assert g.size == SMALL and g.parity, i
    g.report(100, 0)
    assert g.size == LARGE and not g.parity


def test_light_loss_brings_parity_and_heavy_loss_shrinks():
    g = GsoGovernor()
    g.report(990, 10)                 # 1 %: below the shrink threshold, but parity comes on
    assert g.size == LARGE and g.parity
    g.report(90, 10)                  # 10 %: small as well
    assert g.size == SMALL and g.parity


def test_repaired_super_packets_keep_parity_on_and_the_size_small():
    g = GsoGovernor()
    _lossy(g)
    for _ in range(3 * GROW_AFTER):
        g.report(1000, 0, repaired=80)      # parity is doing its job: loss is still there
    assert g.size == SMALL and g.parity
    for _ in range(GROW_AFTER):
        g.report(1000, 0)
    assert g.size == LARGE and not g.parity


def test_empty_reports_change_nothing():
    g = GsoGovernor()
    _lossy(g)
    for _ in range(10):
        g.report(0, 0)
    assert g.size == SMALL and g.parity


# --- cutting TCP super-packets (SPEC §5.6) ----------------------------------------------------------

def tcp_read(n: int, v: int = 4, flags: int = 0x19) -> bytes:
    """A TUN read as the kernel gives it for a TSO skb: NEEDS_CSUM, the checksum field holding the
    folded pseudo-header sum for the whole TCP length (__tcp_v4_send_check / __tcp_v6_send_check)."""
    payload = bytes(i % 251 for i in range(n))
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, 0xFFFFF000, 2000, 5 << 4, flags, 64240, 0, 0))
    if v == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + n, 0xFFF0, 0x4000, 64, 6, 0,
                         bytes([198, 19, 0, 2]), bytes([198, 19, 0, 1]))
        ip = gso._ipv4_header(ip, 40 + n, 0xFFF0)
        vnet = gso.VNET_HDR.pack(gso.NEEDS_CSUM, gso.GSO_TCPV4, 40, 1380, 20, 16)
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, 20 + n, 6, 64, bytes(15) + b"\2", bytes(15) + b"\1")
        vnet = gso.VNET_HDR.pack(gso.NEEDS_CSUM, gso.GSO_TCPV6, 60, 1360, 40, 16)
    tcp[16:18] = struct.pack("!H", gso._pseudo(ip, v, 6, 20 + n))
    return vnet + ip + bytes(tcp) + payload


@pytest.mark.parametrize("v", [4, 6])
@pytest.mark.parametrize("n", [30000, 64000, 16128 + 1])
def test_cut_pieces_carry_the_same_segments(v, n):
    read = tcp_read(n, v)
    pieces = gso.split(read, 16128)
    assert len(pieces) > 1 and all(len(p) <= 16384 + VNET_HDR_LEN for p in pieces)
    # segmenting the pieces gives exactly the segments of the whole (seq, flags, IDs, checksums)
    assert [s for p in pieces for s in gso.segment(p)] == gso.segment(read)
    for p in pieces:
        assert p[:VNET_HDR_LEN] == read[:VNET_HDR_LEN]
        # the checksum field is the pseudo-header sum of the piece's own length: finishing it over
        # the piece gives the piece's real TCP checksum
        ip = p[VNET_HDR_LEN:]
        ihl = 20 if v == 4 else 40
        done = gso.finish_checksum(ip, ihl, 16)
        whole = bytearray(ip)
        whole[ihl + 16:ihl + 18] = b"\0\0"
        want = gso.checksum(bytes(whole[ihl:]), gso._pseudo(ip, v, 6, len(ip) - ihl))
        assert done[ihl + 16:ihl + 18] == struct.pack("!H", want)


def test_reads_that_are_not_cut():
    assert gso.split(tcp_read(10000), 16128) == [tcp_read(10000)]          # small enough
    udp = gso.VNET_HDR.pack(gso.NEEDS_CSUM, gso.GSO_UDP_L4, 28, 1372, 20, 6) + bytes(30000)
    assert gso.split(udp, 16128) == [udp]
    no_csum = bytes([0]) + tcp_read(30000)[1:]
    assert gso.split(no_csum, 16128) == [no_csum]


def test_governor_cuts_only_while_small():
    g = GsoGovernor()
    read = tcp_read(60000)
    assert len(read) > SPLIT_ABOVE and g.pieces(read) == [read]
    _lossy(g)
    assert len(g.pieces(read)) == 4
    for _ in range(GROW_AFTER):
        g.report(100, 0)
    assert g.pieces(read) == [read]


# --- the parity fragment on the wire ------------------------------------------------------------------

def _pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    return tx, rx


def test_a_parity_fragment_leaves_after_its_train_as_its_own_datagram():
    tx, rx = _pair()
    try:
        udp = Udp(tx)
        frames = [bytes([i]) * 100 for i in range(3)] + [b"\x03" * 40, b"\x04" * 102]   # 4 data + parity
        udp.send(frames)
        got = [rx.recv(65535) for _ in frames]
        assert got == frames and udp.errors == 0
    finally:
        tx.close()
        rx.close()


def test_frames_of_mixed_sizes_go_one_by_one():
    tx, rx = _pair()
    try:
        udp = Udp(tx)
        frames = [b"a" * 60, b"b" * 90, b"c" * 30]
        udp.send(frames)
        assert [rx.recv(65535) for _ in frames] == frames and udp.errors == 0
    finally:
        tx.close()
        rx.close()


# --- single datagrams held over a batch (Udp.send_runs) ---------------------------------------------

class _Recorder:
    """Stands in for the socket to see how datagrams are grouped into sendmsg calls."""

    def __init__(self):
        self.calls = []

    def setsockopt(self, *a):
        pass

    def sendmsg(self, buffers, cmsg=(), flags=0, addr=None):
        (seg,) = struct.unpack("=H", cmsg[0][2])
        self.calls.append(("train", seg, b"".join(buffers)))

    def sendto(self, data, addr):
        self.calls.append(("one", len(data), data))

    def send(self, data):
        self.calls.append(("one", len(data), data))


def test_send_runs_groups_equal_sizes_into_trains_in_order():
    udp = Udp(_Recorder())
    dgs = [b"a" * 80] * 5 + [b"b" * 50] + [b"c" * 120] + [b"d" * 60] * 2 + [b"e" * 61]
    udp.send_runs(dgs, ("198.18.0.1", 1))
    calls = udp.sock.calls
    # 5 x 80 and the shorter 50: one train; 120 and the shorter 60: another; 60 alone (61 is longer)
    assert [(c[0], c[1]) for c in calls] == [("train", 80), ("train", 120), ("one", 60), ("one", 61)]
    assert b"".join(c[2] for c in calls) == b"".join(dgs)


def test_send_runs_caps_a_train_at_the_gso_limits():
    udp = Udp(_Recorder())
    dgs = [bytes([i]) * 1452 for i in range(100)]
    udp.send_runs(dgs)
    sizes = [len(c[2]) // 1452 for c in udp.sock.calls]
    assert sizes == [45, 45, 10] and b"".join(c[2] for c in udp.sock.calls) == b"".join(dgs)


def test_send_runs_on_a_real_socket_delivers_every_datagram_in_order():
    tx, rx = _pair()
    try:
        udp = Udp(tx)
        dgs = [bytes([i]) * (64 if i % 7 else 40) for i in range(60)]
        udp.send_runs(dgs)
        assert [rx.recv(65535) for _ in dgs] == dgs and udp.errors == 0
    finally:
        tx.close()
        rx.close()
