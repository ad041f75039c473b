"""The sender's reaction to the peer's loss reports: super-packet size and parity (vpncore/net/gsosize.py,
SPEC §5.5, §6.3), and the UDP train that carries a parity fragment (vpncore/net/pump.py)."""

from __future__ import annotations

import socket

from vpncore.net.gsosize import GROW_AFTER, LARGE, SMALL, GsoGovernor
from vpncore.net.pump import Udp


def test_starts_small_with_parity_and_grows_without_it_after_clean_reports():
    g = GsoGovernor("t0")
    assert g.size == SMALL and g.pending == SMALL and g.parity
    for i in range(GROW_AFTER - 1):
        g.report(100, 0)
        assert g.size == SMALL and g.parity, i
    g.report(100, 0)
    assert g.size == LARGE and g.pending == LARGE and not g.parity


def test_loss_brings_parity_back_and_heavy_loss_shrinks():
    g = GsoGovernor("t0")
    for _ in range(GROW_AFTER):
        g.report(100, 0)
    assert g.size == LARGE and not g.parity
    g.report(990, 10)                 # 1 %: below the shrink threshold, but parity comes back
    assert g.size == LARGE and g.parity
    g.report(90, 10)                  # 10 %: small again
    assert g.size == SMALL and g.parity


def test_repaired_super_packets_keep_parity_on_and_the_size_small():
    g = GsoGovernor("t0")
    for _ in range(3 * GROW_AFTER):
        g.report(1000, 0, repaired=80)      # parity is doing its job: loss is still there
    assert g.size == SMALL and g.parity
    for _ in range(GROW_AFTER):
        g.report(1000, 0)
    assert g.size == LARGE and not g.parity


def test_empty_reports_change_nothing():
    g = GsoGovernor("t0")
    g.pending = None
    for _ in range(10):
        g.report(0, 0)
    assert g.size == SMALL and g.parity and g.pending is None


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
