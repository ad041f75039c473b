"""Parity fragments between a client and a server whose TUNs carry virtio_net_hdr (SPEC §5.5, §6.3):
agreement, a lost fragment rebuilt, the `repaired` count in the loss report, and no parity unless both
the embedding and the peer want it."""

from __future__ import annotations

from vpncore.proto.constants import FEATURE_PARITY, FEATURE_SUPERPACKET, LOSS_REPORT_INTERVAL, SUPER_PARITY_NO, VNET_HDR_LEN
from vpncore.proto.events import LossReported

from tests.helpers import agreed_pair, drain_events, ipv4_packet, shuttle, udp_payload

CHUNK = 1420 + 16
CONFIG = {"type": "config", "version": 1, "routes": [], "mtu": 1420,
          "features": [FEATURE_SUPERPACKET, FEATURE_PARITY]}


def _gso_read(n: int) -> bytes:
    """A TUN read: virtio_net_hdr saying TCPv4 GSO, then one IPv4 packet of about n bytes."""
    return bytes([0, 1]) + bytes(VNET_HDR_LEN - 2) + ipv4_packet(payload=udp_payload(n, 7))


def test_both_sides_agree_from_hello_and_config():
    server, client, src, peer = agreed_pair("parity-agree")
    assert FEATURE_PARITY in client.features
    assert peer.super and peer.parity            # the client's hello listed both
    assert client.peer_super and client.peer_parity


def test_a_lost_fragment_is_rebuilt_and_reported_as_repaired():
    server, client, src, peer = agreed_pair("parity-rebuild")
    peer.add_parity = True
    data = _gso_read(8000)
    frames = server.encrypt_frames(peer, data, 1.0, CHUNK)
    assert frames[-1][2] == SUPER_PARITY_NO and len(frames) == 7      # 6 data fragments + parity
    del frames[3]
    got = [client.receive_datagram(f, 1.0) for f in frames]
    assert got[:-1] == [None] * 5 and got[-1] == data
    assert sum(client.drops.values()) == 0
    # the client's next loss report says so; the server's embedding reads `repaired`
    client.handle_timer(1.0 + LOSS_REPORT_INTERVAL)
    shuttle(server, client, src, 1.0 + LOSS_REPORT_INTERVAL)
    reports = [e for e in drain_events(server) if isinstance(e, LossReported)]
    assert [(r.done, r.lost, r.repaired) for r in reports] == [(1, 0, 1)]


def test_no_parity_unless_the_embedding_and_the_peer_want_it():
    server, client, src, peer = agreed_pair("parity-off")
    data = _gso_read(8000)
    assert peer.add_parity is False
    assert all(f[2] != SUPER_PARITY_NO for f in server.encrypt_frames(peer, data, 1.0, CHUNK))
    peer.add_parity = True
    peer.parity = False                            # a client that did not list the feature
    assert all(f[2] != SUPER_PARITY_NO for f in server.encrypt_frames(peer, data, 1.0, CHUNK))
    client.parity = True
    assert client.encrypt_frames(data, 1.0, CHUNK)[-1][2] == SUPER_PARITY_NO
    client.peer_parity = False                     # a server that did not list it
    assert all(f[2] != SUPER_PARITY_NO for f in client.encrypt_frames(data, 1.0, CHUNK))


def test_the_parity_after_a_whole_super_packet_is_dropped_as_unused():
    server, client, src, peer = agreed_pair("parity-unused")
    client.parity = True
    frames = client.encrypt_frames(_gso_read(5000), 1.0, CHUNK)
    got = [server.receive_datagram(f, src, 1.0) for f in frames]
    assert got[-2] is not None and got[-1] is None
    assert server.drops == {"parity-unused": 1}
