"""The transport half both ends share (vpncore.proto.tunnel.Tunnel) and the sans-IO contract around it:
one byte-counter definition on both ends, frozen statistics, one failure mode, the server's
get_timer(), policy through set_policy(), the config constructor (SPEC §5, §6.3, §8.4)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import pickle
from pathlib import Path

import pytest

from vpncore.proto import control, superpacket
from vpncore.proto.constants import (
    FEATURE_PARITY, FEATURE_SUPERPACKET, KEEPALIVE_TIMEOUT, KIND_DATA, LOSS_REPORT_INTERVAL, REJECT_AFTER_TIME,
    TRANSPORT_HEADER_LEN, VNET_HDR_LEN,
)
from vpncore.proto.errors import BadPacket
from vpncore.proto.events import SessionEnded
from vpncore.proto.keypair import Keypair, pad
from vpncore.proto.tunnel import Statistics, Tunnel

from tests.helpers import (
    agreed_pair, drain_events, established_pair, fire_due_timers, ipv4_packet, pair, connect, shuttle, udp_payload,
)

TRANSPORT = json.loads((Path(__file__).resolve().parent.parent / "protocol-spec" / "vectors" / "transport.json").read_text())
CHUNK = 1420 + 16
CONFIG = control.config(mtu=1420, routes=[], features=[FEATURE_SUPERPACKET, FEATURE_PARITY])


def _gso_read(n: int, tag: int = 7) -> bytes:
    return bytes([0, 1]) + bytes(VNET_HDR_LEN - 2) + ipv4_packet(payload=udp_payload(n, tag))


# --- the one sealer and opener -------------------------------------------------------------------

@pytest.mark.parametrize("case", TRANSPORT["cases"], ids=lambda c: c["name"])
def test_tunnel_seals_the_transport_vectors(case):
    kp = Keypair(bytes.fromhex(case["key"]), bytes(32), 0, case["receiver_index"], 0.0, initiator=True)
    kp.send_counter = case["counter"]
    tunnel = Tunnel()
    tunnel.use(kp)
    if "control" in case:
        dg = tunnel.seal_control(case["control"], 0.0)
    elif case["packet"] is None:
        dg = tunnel.seal_keepalive(0.0)
    else:
        dg = tunnel.seal_packet(bytes.fromhex(case["packet"]), 0.0)
    assert dg.hex() == case["datagram"]
    assert tunnel.counters.tx_bytes == len(dg)


def test_superpacket_module_uses_only_public_keypair_methods():
    assert "._seal" not in inspect.getsource(superpacket)


def test_no_keypair_seals_nothing_and_counts_it():
    tunnel = Tunnel(vnet_hdr=True)
    assert tunnel.seal_packet(b"x", 0.0) is None and tunnel.seal_read(_gso_read(100), 0.0, CHUNK) == []
    assert tunnel.seal_control(control.hello(), 0.0) is None and tunnel.seal_keepalive(0.0) is None
    assert tunnel.counters.drops == {"no-session": 2} and tunnel.counters.tx_bytes == 0


def test_tunnel_is_memory_only():
    tunnel = Tunnel()
    with pytest.raises(TypeError):
        pickle.dumps(tunnel)
    with pytest.raises(TypeError):
        pickle.dumps(tunnel.counters)
    assert repr(tunnel) == "<Tunnel>"


def test_a_verified_message_with_bad_content_still_takes_effect():
    """§5.7: roaming and liveness (step 6) happen before the content checks (step 7)."""
    server, client, src = established_pair(seed="step-6")
    peer = server.peers[client.public]
    bad = client.current.seal(KIND_DATA, pad(b"\x50" + bytes(40)))     # not IPv4 or IPv6
    assert server.receive_datagram(bad, ("203.0.113.9", 4000), 5.0) is None
    assert server.drops == {"inner-length": 1}
    assert peer.endpoint == ("203.0.113.9", 4000) and peer.last_rx == 5.0


def test_open_untrusted_has_one_failure_mode():
    tunnel = Tunnel(vnet_hdr=True)
    tunnel.use(Keypair(bytes(32), bytes(32), 7, 0, 0.0, initiator=False))
    for dg in (b"", b"\x04", bytes(16), bytes([4, 2, 0, 0]) + bytes(20), bytes([4, 0, 0, 0, 7]) + bytes(40),
               bytes([4, 2, 0, 1, 7]) + bytes(40)):
        with pytest.raises(BadPacket):
            tunnel.open_untrusted(dg, 0.0)


# --- one byte-counter definition, both ends ----------------------------------------------------------

def test_byte_counters_mean_the_same_on_both_ends():
    """tx_bytes of one end == rx_bytes of the other on a lossless link, for every kind of message:
    data, keepalives, control, super-packets (with parity) whatever their fragmentation."""
    server, client, src, peer = agreed_pair("counters")
    peer.add_parity = client.parity = True

    def balanced():
        return (client.tx_bytes, server.tx_bytes) == (server.rx_bytes, client.rx_bytes)

    assert balanced()
    # kind 0 (one packet, and a single-packet read segmented in software) counts its datagram
    for seal in (lambda: [client.encrypt(ipv4_packet(payload=b"p"), 1.0)],
                 lambda: client.encrypt_frames(bytes(VNET_HDR_LEN) + ipv4_packet(payload=b"q"), 1.0, CHUNK)):
        t0 = client.tx_bytes
        frames = seal()
        assert [server.receive_datagram(f, src, 1.0) is not None for f in frames] == [True] * len(frames)
        assert client.tx_bytes - t0 == sum(map(len, frames))
    assert balanced()
    for read in (_gso_read(20000), _gso_read(64000 - 100)):
        t0 = client.tx_bytes
        frames = client.encrypt_frames(read, 2.0, CHUNK)
        assert frames[-1][2] == superpacket.SUPER_PARITY_NO
        assert client.tx_bytes - t0 == TRANSPORT_HEADER_LEN + len(pad(read)) + 16
        r0 = server.rx_bytes
        got = [server.receive_datagram(f, src, 2.0) for f in frames[:-1]]
        assert got[-1][1] == read and server.rx_bytes - r0 == client.tx_bytes - t0
    # the other way, with a repaired super-packet and a train
    frames = server.encrypt_frames(peer, _gso_read(9000), 3.0, CHUNK)
    del frames[2]
    for f in frames:
        client.receive_datagram(f, 3.0)
    train = b"".join(server.encrypt_frames(peer, _gso_read(5000), 3.0, CHUNK)[:-1])
    assert client.receive_train(train, CHUNK + 16, 3.0) == [_gso_read(5000)]
    server.handle_timer(3.0 + KEEPALIVE_TIMEOUT)          # a keepalive (nothing sent since the data)
    client.handle_timer(3.0 + LOSS_REPORT_INTERVAL)       # a loss report (control)
    shuttle(server, client, src, 5.0)
    assert balanced() and not server.drops and not client.drops


# --- statistics: frozen totals ------------------------------------------------------------------

def test_statistics_are_frozen_totals_and_give_deltas():
    server, client, src = established_pair(seed="stats")
    s0, c0 = server.statistics(), client.statistics()
    assert isinstance(s0, Statistics) and isinstance(c0, Statistics)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s0.rx_bytes = 0
    with pytest.raises(TypeError):
        s0.drops["x"] = 1
    client.send_packet(ipv4_packet(payload=b"hello"), 1.0)
    shuttle(server, client, src, 1.0)
    server.receive_datagram(b"junk", src, 1.0)
    s1 = server.statistics()
    assert (s1.rx_bytes, s1.tx_bytes, dict(s1.drops)) == (server.rx_bytes, server.tx_bytes, dict(server.drops))
    assert dict(s0.drops) == {} and s0.rx_bytes < s1.rx_bytes       # the snapshot did not move
    d = s1.since(s0)
    assert d.rx_bytes == client.statistics().since(c0).tx_bytes > 0 and dict(d.drops) == {"type": 1}
    assert dict(s1.since(s1).drops) == {} and s1.since(s1).rx_bytes == 0


# --- policy in one call ------------------------------------------------------------------------

def test_set_policy_is_the_one_input_for_load_shedding_and_cookies():
    server, client, src = pair(seed="policy")
    server.set_policy(shedding=True)
    client.connect(0.0)
    shuttle(server, client, src, 0.0)
    assert server.drops == {"memory-shed": 1} and not server.peers
    server.set_policy(shedding=False, under_load=True, cookie_budget=0)
    assert (server.shedding, server.under_load, server.cookie_budget) == (False, True, 0)
    client.handle_timer(5.0)
    shuttle(server, client, src, 5.0)
    assert server.drops["cookie-budget"] == 1 and not server.peers
    server.set_policy(cookie_budget=1)            # under_load stays as it was
    assert server.under_load
    client.handle_timer(10.0)
    shuttle(server, client, src, 10.0)            # cookie reply, the retry with mac2, the session
    assert server.drops["cookie-sent"] == 1 and client.state == "established"


# --- the server's timer ------------------------------------------------------------------------

def test_server_get_timer_says_when_the_timer_has_something_to_do():
    server, client, src = pair(seed="srv-timer")
    assert server.get_timer() is None
    connect(server, client, src, 0.0)
    peer = server.peers[client.public]
    assert server.get_timer() == LOSS_REPORT_INTERVAL           # loss reports for a live session
    server.handle_timer(LOSS_REPORT_INTERVAL)
    assert server.get_timer() == 2 * LOSS_REPORT_INTERVAL
    client.send_packet(ipv4_packet(payload=b"up"), 1.5)
    shuttle(server, client, src, 1.5)
    server.datagrams_to_send()
    assert server.get_timer() == min(2 * LOSS_REPORT_INTERVAL, 1.5 + KEEPALIVE_TIMEOUT)
    server.handle_timer(2.0)
    assert server.get_timer() == 3.0
    server.handle_timer(3.0)
    assert server.get_timer() == 1.5 + KEEPALIVE_TIMEOUT
    server.handle_timer(1.5 + KEEPALIVE_TIMEOUT)
    [(ep, keepalive)] = server.datagrams_to_send()
    assert ep == src and len(keepalive) == 32 and peer.data_rx_since is None


def test_a_server_driven_by_get_timer_expires_sessions_on_time():
    server, client, src = established_pair(seed="srv-expiry")
    client.close(1.0)          # keeps the client from rekeying; the close is lost
    client.datagrams_to_send()
    now, ended = 0.0, []
    while server.peers and now < 2 * REJECT_AFTER_TIME:
        now = server.get_timer()
        fire_due_timers(server, None, now)
        ended += [e for e in drain_events(server) if isinstance(e, SessionEnded)]
    assert not server.peers and now == REJECT_AFTER_TIME and [e.reason for e in ended] == ["expired"]
    assert server.get_timer() is None and server.by_index == {}


# --- the config message ----------------------------------------------------------------------------

def test_config_constructor_builds_what_the_client_accepts():
    msg = control.config(mtu=1420, routes=["0.0.0.0/0", "::/0"], dns=["198.19.0.1"],
                         features=[FEATURE_SUPERPACKET, FEATURE_PARITY], ipv4="198.19.0.2/24", ipv6="fd00::2/64")
    assert list(msg) == ["type", "version", "mtu", "routes", "dns", "features", "ipv4", "ipv6"]
    assert control.decode_untrusted(control.encode(msg)) == msg
    server, client, src = pair(seed="config")
    connect(server, client, src, 0.0)
    drain_events(client)
    server.send_control(server.peers[client.public], msg, 0.0)
    shuttle(server, client, src, 0.0)
    [ev] = drain_events(client)
    assert ev.msg == msg
    with pytest.raises(ValueError):
        control.config(mtu=100, routes=[])
    with pytest.raises(ValueError):
        control.config(mtu=1420, routes=["not a network"])


def test_an_ended_session_is_freed_without_the_cycle_collector():
    """Forget fast (DESIGN §4): the Peer must not wait for gc to break a Peer <-> Tunnel cycle."""
    import gc
    import weakref

    from tests.helpers import drain_events, established_pair

    was = gc.isenabled()
    gc.disable()
    try:
        server, client, _ = established_pair(1)
        peer = server.peers[client.public]
        gone = weakref.ref(peer)
        server.end_peer(peer, "test", 1.0)
        drain_events(server)
        del peer
        assert gone() is None
    finally:
        if was:
            gc.enable()
