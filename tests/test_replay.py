"""The sliding replay window (SPEC §5.4), in the style of the Linux kernel's WireGuard selftest
(drivers/net/wireguard/selftest/counter.c), then the same properties through Keypair.open and the
state machines.

Our window holds REPLAY_WINDOW counters ending at the highest accepted one: counter c is still
acceptable iff highest - c < REPLAY_WINDOW (and it was not seen). The kernel's table is written in
terms of COUNTER_WINDOW_SIZE (accept iff highest - c <= COUNTER_WINDOW_SIZE); here WS plays that
role, so WS = REPLAY_WINDOW - 1 and T_LIM = WS + 1.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpncore.proto.constants import KIND_DATA, REJECT_AFTER_MESSAGES, REKEY_AFTER_TIME, REJECT_AFTER_TIME, REPLAY_WINDOW
from vpncore.proto.errors import BadPacket
from vpncore.proto.replay import ReplayWindow
from vpncore.proto.keypair import Keypair, pad
from vpncore.proto.wire import unpack_transport_header_untrusted

from tests.helpers import established_pair, ipv4_packet, run_until, udp_payload

WS = REPLAY_WINDOW - 1
T_LIM = WS + 1
RAM = REJECT_AFTER_MESSAGES


def _t(w: ReplayWindow, counter: int, expected: bool, step: str) -> None:
    assert w.check(counter) is expected, f"check {step}: counter {counter}"
    assert w.update(counter) is expected, f"update {step}: counter {counter}"


# (counter, accepted) in order, on one window: the kernel's table translated.
KERNEL_TABLE = [
    (0, True), (1, True), (1, False), (9, True), (8, True), (7, True), (7, False),
    (T_LIM, True), (T_LIM - 1, True), (T_LIM - 1, False), (T_LIM - 2, True), (2, True), (2, False),
    (T_LIM + 16, True), (3, False), (T_LIM + 16, False),
    (T_LIM * 4, True), (T_LIM * 4 - (T_LIM - 1), True),        # exactly the oldest acceptable
    (10, False), (T_LIM * 4 - T_LIM, False),                     # one past the window's edge
    (T_LIM * 4 - (T_LIM + 1), False), (T_LIM * 4 - (T_LIM - 2), True), (T_LIM * 4 + 1 - T_LIM, False),
    (0, False),
    (RAM, False), (RAM - 1, True), (RAM, False), (RAM - 1, False), (RAM - 2, True),
    (RAM + 1, False), (RAM + 2, False), (RAM - 2, False), (RAM - 3, True), (0, False),
]


def test_kernel_selftest_table():
    w = ReplayWindow()
    for step, (counter, ok) in enumerate(KERNEL_TABLE):
        _t(w, counter, ok, str(step))


def test_kernel_selftest_loops():
    # fill the window from 1, then 0 is still inside it
    w = ReplayWindow()
    for i in range(1, WS + 1):
        _t(w, i, True, "a")
    _t(w, 0, True, "a0")
    _t(w, 0, False, "a0dup")
    # one further: 1 is the oldest acceptable, 0 has fallen out
    w = ReplayWindow()
    for i in range(2, WS + 2):
        _t(w, i, True, "b")
    _t(w, 1, True, "b1")
    _t(w, 0, False, "b0")
    # descending fill
    w = ReplayWindow()
    for i in range(WS, -1, -1):
        _t(w, i, True, "c")
    w = ReplayWindow()
    for i in range(WS + 1, 0, -1):
        _t(w, i, True, "d")
    _t(w, 0, False, "d0")
    w = ReplayWindow()
    for i in range(WS, 0, -1):
        _t(w, i, True, "e")
    _t(w, WS + 1, True, "e+")
    _t(w, 0, False, "e0")
    w = ReplayWindow()
    for i in range(WS, 0, -1):
        _t(w, i, True, "f")
    _t(w, 0, True, "f0")
    _t(w, WS + 1, True, "f+")


@pytest.mark.parametrize("rows", [
    # in order
    [(0, True), (1, True), (2, True), (3, True)],
    # out of order within the window
    [(5, True), (1, True), (4, True), (0, True), (2, True), (3, True), (2, False)],
    # duplicates
    [(0, True), (0, False), (7, True), (7, False), (0, False)],
    # exact window edge: highest - c == REPLAY_WINDOW - 1 is in, == REPLAY_WINDOW is out
    [(REPLAY_WINDOW + 100, True), (101, True), (100, False), (101, False)],
    # too old after a jump
    [(0, True), (REPLAY_WINDOW * 3, True), (REPLAY_WINDOW, False), (REPLAY_WINDOW * 2 + 1, True)],
    # huge jump: the whole bitmap is replaced; nothing below the new window is accepted
    [(1, True), (2**63, True), (2, False), (2**63 - REPLAY_WINDOW + 1, True), (2**63 - REPLAY_WINDOW, False),
     (2**63, False), (2**63 + 1, True)],
    # shift of exactly REPLAY_WINDOW: the old highest falls out
    [(10, True), (10 + REPLAY_WINDOW, True), (10, False), (11, True)],
    # counter limits
    [(RAM, False), (RAM + 1, False), (2**64 - 1, False), (RAM - 1, True), (RAM - 1, False), (RAM, False)],
], ids=["in-order", "out-of-order", "duplicate", "window-edge", "too-old", "huge-jump", "shift-eq-window", "limits"])
def test_table(rows):
    w = ReplayWindow()
    for step, (counter, ok) in enumerate(rows):
        _t(w, counter, ok, str(step))


def test_check_changes_nothing():
    w = ReplayWindow()
    for c in (0, 5, 3, 10**6):
        w.update(c)
    before = (w.top, w.bits)
    for c in (0, 1, 2, 10**6 + 1, RAM, 2**64, 10**6 - REPLAY_WINDOW):
        w.check(c)
    assert (w.top, w.bits) == before


def test_bitmap_stays_bounded():
    w = ReplayWindow()
    for c in range(0, 50 * REPLAY_WINDOW, 997):
        assert w.update(c)
    assert w.bits.bit_length() <= REPLAY_WINDOW


class _Model:
    """The obvious reference: a set of seen counters and the highest one."""

    def __init__(self):
        self.seen: set[int] = set()

    def accept(self, c: int) -> bool:
        if c >= RAM or c in self.seen:
            return False
        if self.seen and max(self.seen) - c >= REPLAY_WINDOW:
            return False
        self.seen.add(c)
        return True


_counters = st.one_of(st.integers(0, 3 * REPLAY_WINDOW), st.integers(0, 2**64 + 5),
                      st.integers(RAM - 2 * REPLAY_WINDOW, RAM + 2))


@settings(max_examples=300, deadline=None)
@given(st.lists(_counters, max_size=60))
def test_window_matches_reference_model(counters):
    w, model = ReplayWindow(), _Model()
    for c in sorted(counters)[: len(counters) // 3] + counters:
        expected = model.accept(c)
        assert w.check(c) is expected
        assert w.update(c) is expected


# --- Keypair.open ------------------------------------------------------------------------------

def _keypairs():
    a = Keypair(bytes([1]) * 32, bytes([2]) * 32, local_index=11, remote_index=22, created=0.0, initiator=True)
    b = Keypair(bytes([2]) * 32, bytes([1]) * 32, local_index=22, remote_index=11, created=0.0, initiator=False)
    return a, b


def _open(kp: Keypair, dg: bytes) -> bytes:
    kind, index, counter = unpack_transport_header_untrusted(dg)
    assert index == kp.local_index
    return kp.open(dg, counter)


def test_open_in_order_and_out_of_order():
    a, b = _keypairs()
    dgs = [a.seal(KIND_DATA, pad(bytes([i + 1]) * (i + 1))) for i in range(6)]
    for i in (0, 3, 1, 5, 2, 4):
        assert _open(b, dgs[i]).rstrip(b"\0") == bytes([i + 1]) * (i + 1)
    assert b.replay.top == 6


def test_open_duplicate_datagram_rejected():
    a, b = _keypairs()
    dg = a.seal(KIND_DATA, pad(b"payload"))
    assert _open(b, dg).startswith(b"payload")
    with pytest.raises(BadPacket) as info:
        _open(b, dg)
    assert info.value.reason == "replay"


@pytest.mark.parametrize("where", [0, 4, 8, 15, 16, -1])   # header fields, ciphertext, tag
def test_bad_tag_does_not_move_the_window(where):
    a, b = _keypairs()
    for _ in range(3):
        _open(b, a.seal(KIND_DATA, pad(b"x")))
    genuine = a.seal(KIND_DATA, pad(b"genuine"))           # counter 3
    top, bits = b.replay.top, b.replay.bits
    forged = bytearray(genuine)
    forged[where] ^= 0x01
    with pytest.raises(BadPacket):
        kind, index, counter = unpack_transport_header_untrusted(bytes(forged))
        b.open(bytes(forged), counter)
    assert (b.replay.top, b.replay.bits) == (top, bits)
    assert _open(b, genuine).startswith(b"genuine")


def test_forged_far_future_counter_does_not_move_the_window():
    a, b = _keypairs()
    _open(b, a.seal(KIND_DATA, pad(b"x")))
    dg = bytearray(a.seal(KIND_DATA, pad(b"y")))
    dg[8:16] = (2**62).to_bytes(8, "little")               # attacker bumps the counter; tag now fails
    with pytest.raises(BadPacket) as info:
        b.open(bytes(dg), 2**62)
    assert info.value.reason == "tag"
    assert b.replay.top == 1
    # genuine later traffic is unaffected
    assert _open(b, a.seal(KIND_DATA, pad(b"z"))).startswith(b"z")


def test_wiped_keypair_refuses_everything():
    a, b = _keypairs()
    dg = a.seal(KIND_DATA, pad(b"x"))
    b.wipe()
    with pytest.raises(BadPacket):
        _open(b, dg)
    a.wipe()
    with pytest.raises(BadPacket):
        a.seal(KIND_DATA, b"")


def test_seal_refuses_at_reject_after_messages():
    a, b = _keypairs()
    a.send_counter = RAM - 1
    dg = a.seal(KIND_DATA, pad(b"last"))
    assert _open(b, dg).startswith(b"last")
    with pytest.raises(BadPacket) as info:
        a.seal(KIND_DATA, pad(b"one too many"))
    assert info.value.reason == "counter-exhausted"


# --- through the state machines -------------------------------------------------------------

def test_server_drops_a_duplicated_datagram():
    server, client, src = established_pair(seed=31, vnet_hdr=False)   # delivered == sent
    pkt = ipv4_packet(payload=udp_payload(33, 1))
    dg = client.encrypt(pkt, 1.0)
    got = server.receive_datagram(dg, src, 1.0)
    assert got is not None and got[1] == pkt
    assert server.receive_datagram(dg, src, 1.1) is None
    assert server.drops["replay"] == 1


def test_client_drops_a_duplicated_datagram():
    server, client, src = established_pair(seed=32, vnet_hdr=False)   # delivered == sent
    peer = server.peers[client.public]
    pkt = ipv4_packet(payload=udp_payload(20, 2))
    dg = server.encrypt(peer, pkt, 1.0)
    assert client.receive_datagram(dg, 1.0) == pkt
    assert client.receive_datagram(dg, 1.0) is None
    assert client.drops["replay"] == 1


def test_old_keypair_datagrams_replayed_after_rekey_are_rejected():
    server, client, src = established_pair(seed=33)
    peer = server.peers[client.public]
    old_c2s = [client.encrypt(ipv4_packet(payload=udp_payload(40, i)), 10.0) for i in range(5)]
    old_s2c = [server.encrypt(peer, ipv4_packet(payload=udp_payload(40, 100 + i)), 10.0) for i in range(5)]
    for dg in old_c2s:
        assert server.receive_datagram(dg, src, 10.0) is not None
    for dg in old_s2c:
        assert client.receive_datagram(dg, 10.0) is not None
    old_client_kp = client.current

    run_until(server, client, src, 10.0, REKEY_AFTER_TIME + 5, step=1.0)
    assert client.current is not old_client_kp and client.previous is old_client_kp

    # the old keypair is still held (previous), but its window remembers: replays are refused
    for dg in old_c2s:
        assert server.receive_datagram(dg, src, REKEY_AFTER_TIME + 6) is None
    for dg in old_s2c:
        assert client.receive_datagram(dg, REKEY_AFTER_TIME + 6) is None
    assert server.drops["replay"] == 5 and client.drops["replay"] == 5

    # once the old keypair has aged out, the same datagrams find no keypair at all
    later = REJECT_AFTER_TIME + 1
    client.handle_timer(later)
    server.handle_timer(later)
    for dg in old_c2s:
        assert server.receive_datagram(dg, src, later) is None
    for dg in old_s2c:
        assert client.receive_datagram(dg, later) is None
    assert server.drops["index"] == 5 and client.drops["index"] == 5
