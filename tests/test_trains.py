"""The receive fast path for UDP GRO trains (superpacket.whole_in_train, ServerProtocol.receive_train,
ClientConnection.receive_train): the same packets as taking the datagrams one by one, whatever the
train holds."""

from __future__ import annotations

import random

import pytest

from vpncore.proto.constants import VNET_HDR_LEN
from vpncore.proto.keypair import pad
from vpncore.proto.superpacket import seal_fragments

from tests.helpers import established_pair, ipv4_packet, udp_payload

CHUNK = 1436
SEG = CHUNK + 16


def _read(n: int, tag: int) -> bytes:
    return bytes([0, 1]) + bytes(VNET_HDR_LEN - 2) + ipv4_packet(payload=udp_payload(n, tag))


def _one_by_one(receive, buf: bytes, seg: int) -> list:
    out = []
    for at in range(0, len(buf), seg):
        got = receive(buf[at:at + seg])
        if got is not None:
            out.append(got)
    return out


def _pairs():
    """Two identical established vnet pairs: one takes trains, the other datagram by datagram."""
    return established_pair(seed="trains", vnet_hdr=True), established_pair(seed="trains", vnet_hdr=True)


def _trains(sender, reads: list[bytes], cut: int | None = None) -> list[bytes]:
    """GRO-like trains of the fragments of `reads`: a train ends after a short datagram (or after
    `cut` datagrams), as the kernel coalesces only equal-size datagrams."""
    dgs = [f for r in reads for f in seal_fragments(sender, pad(r), CHUNK)]
    trains, cur = [], []
    for d in dgs:
        cur.append(d)
        if len(d) < SEG or (cut and len(cur) == cut):
            trains.append(b"".join(cur))
            cur = []
    if cur:
        trains.append(b"".join(cur))
    return trains


@pytest.mark.parametrize("cut", [None, 7, 45])
def test_server_trains_give_what_datagrams_give(cut):
    (srv_a, cli_a, src), (srv_b, cli_b, _) = _pairs()
    reads = [_read(n, i) for i, n in enumerate((60000, 20000, 1300, 64000, 2900))]
    trains_a = _trains(cli_a.current, reads, cut)
    trains_b = _trains(cli_b.current, reads, cut)
    assert trains_a == trains_b                      # the same keys and counters: byte-identical
    fast = [p for t in trains_a for _, p in srv_a.receive_train(t, SEG, src, 1.0)]
    slow = [p for t in trains_b for _, p in _one_by_one(lambda d: srv_b.receive_datagram(d, src, 1.0), t, SEG)]
    assert fast == slow == reads
    assert srv_a.rx_bytes == srv_b.rx_bytes and not srv_a.drops and not srv_b.drops
    assert not srv_a.peers[cli_a.public].current.partial      # nothing left half-assembled


def test_client_trains_give_what_datagrams_give():
    (srv_a, cli_a, src), (srv_b, cli_b, _) = _pairs()
    reads = [_read(n, i) for i, n in enumerate((64000, 5000, 64000))]
    trains_a = _trains(srv_a.peers[cli_a.public].current, reads)
    trains_b = _trains(srv_b.peers[cli_b.public].current, reads)
    fast = [p for t in trains_a for p in cli_a.receive_train(t, SEG, 1.0)]
    slow = [p for t in trains_b for p in _one_by_one(lambda d: cli_b.receive_datagram(d, 1.0), t, SEG)]
    assert fast == slow == reads and not cli_a.drops


def test_a_train_replayed_delivers_nothing():
    (srv, cli, src), _ = _pairs()
    [train] = _trains(cli.current, [_read(30000, 1)])
    assert len(srv.receive_train(train, SEG, src, 1.0)) == 1
    assert srv.receive_train(train, SEG, src, 1.0) == []
    assert srv.drops == {"replay": 1}


def test_a_changed_middle_header_falls_back_to_fragment_by_fragment():
    (srv, cli, src), _ = _pairs()
    [train] = _trains(cli.current, [_read(30000, 1)])
    bad = bytearray(train)
    bad[5 * SEG + 9] ^= 1                 # fragment 5's counter + 256: another super-packet for §5.5
    assert srv.receive_train(bytes(bad), SEG, src, 1.0) == []
    partial = srv.peers[cli.public].current.partial
    assert len(partial) == 2              # held as §5.5 holds them: the rest waits, so does the stray


def test_forged_chunk_fails_the_tag_and_nothing_is_held():
    (srv, cli, src), _ = _pairs()
    [train] = _trains(cli.current, [_read(30000, 1)])
    bad = bytearray(train)
    bad[3 * SEG + 100] ^= 1
    assert srv.receive_train(bytes(bad), SEG, src, 1.0) == []
    assert srv.drops == {"tag": 1} and not srv.peers[cli.public].current.partial


def test_random_trains_never_raise():
    (srv, cli, src), _ = _pairs()
    rnd = random.Random(5)
    [train] = _trains(cli.current, [_read(20000, 1)])
    for _ in range(300):
        b = bytearray(train[:rnd.randrange(1, len(train) + 1)])
        for _ in range(rnd.randrange(4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        seg = rnd.choice((SEG, 1, 17, 148, len(b)))
        for _peer, packet in srv.receive_train(bytes(b), seg, src, 1.0):
            assert bytes(b) == train and packet == _read(20000, 1), "a changed train was delivered"
