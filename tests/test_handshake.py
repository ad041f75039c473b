"""Client and server state machines end to end, synchronously, with explicit time (SPEC §4, §7, §8)."""

from __future__ import annotations

import copy
import pickle

import pytest

from vpncore.proto import wire
from vpncore.proto.client import ClientConnection
from vpncore.proto.constants import (
    CONSTRUCTION, COOKIE_REPLY_LEN, DEAD_PEER_TIMEOUT, IDENTIFIER, INITIATION_LEN, KIND_DATA, MSG_COOKIE_REPLY,
    MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT, REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_TIMEOUT,
    RESPONSE_LEN, TRANSPORT_MIN_LEN, HELLO_RETRY_TIMEOUT,
)
from vpncore.proto.cookie import CookieGenerator
from vpncore.proto.events import ControlReceived, HandshakeCompleted, ServerClosed, SessionEnded, SessionStarted
from vpncore.proto.handshake import ZERO_PSK
from vpncore.proto.noise import IKHandshake
from vpncore.proto.server import ServerProtocol
from vpncore.proto.keypair import pad
from vpncore.proto.timestamp import tai64n

from tests.helpers import (
    C2S, MIN_CONFIG, S2C, blocking_link, drain_events, established_pair, fire_timers, ipv4_packet, ipv6_packet,
    LOW_ORDER_POINTS, keypair_from, lossy_link, pair, run_until, seeded_rng, server_send, shuttle, tick, udp_payload,
)

LOW_IDS = ["zero", "one", "order8-a", "order8-b", "p-1", "p", "p+1"]
CONFIG = {"type": "config", "version": 1, "ipv4": "10.8.0.2/24", "ipv6": "fd00::2/64",
          "routes": ["0.0.0.0/0", "::/0"], "mtu": 1420, "dns": ["10.8.0.1"]}


def recording_link(log: list, inner=None, clock=None):
    """A link that records (time, direction, address, datagram) and then applies `inner`."""
    def link(direction, items):
        for addr, dg in items:
            log.append((clock["now"] if clock else None, direction, addr, dg))
        return inner(direction, items) if inner is not None else items
    return link


def of_type(log, direction, msg_type):
    return [entry for entry in log if entry[1] == direction and entry[3][0] == msg_type]


def craft_initiation(server_public: bytes, static_private: bytes, *, e_pub: bytes | None = None,
                     s_pub: bytes | None = None, index: int = 0x1234, wall: float = 1.8e9, now: float = 0.0) -> bytes:
    """An initiation built by hand, optionally claiming a chosen ephemeral or static public key."""
    noise = IKHandshake(initiator=True, static_private=static_private, ephemeral_private=bytes(range(32)),
                        remote_static=server_public, prologue=IDENTIFIER, psk=ZERO_PSK, protocol_name=CONSTRUCTION)
    if e_pub is not None:
        noise.e_pub = e_pub
    if s_pub is not None:
        noise.s_pub = s_pub
    body = noise.write_message_1(tai64n(wall))
    return CookieGenerator(server_public).add_macs(wire.pack_initiation(index, body)[:-32], now)


def assert_no_server_state(server: ServerProtocol) -> None:
    assert server.peers == {}
    assert server.by_index == {}
    assert server.datagrams_to_send() == []
    assert drain_events(server) == []


# --- the happy path ------------------------------------------------------------------------------

def test_full_handshake_data_and_control():
    server, client, src = pair(seed=1, vnet_hdr=False)
    log: list = []
    client.connect(0.0)
    assert client.state == "handshaking"
    shuttle(server, client, src, 0.0, recording_link(log))

    init, = of_type(log, C2S, MSG_INITIATION)
    resp, = of_type(log, S2C, MSG_RESPONSE)
    assert len(init[3]) == INITIATION_LEN and len(resp[3]) == RESPONSE_LEN
    assert resp[2] == src
    assert wire.unpack_response_untrusted(resp[3]).receiver == wire.unpack_initiation_untrusted(init[3]).sender

    assert client.state == "established"
    cev = drain_events(client)
    assert [type(e) for e in cev] == [HandshakeCompleted]

    sev = drain_events(server)
    assert [type(e) for e in sev] == [SessionStarted, ControlReceived]
    peer = sev[0].peer
    assert server.peers[client.public] is peer and peer.state == "live" and peer.endpoint == src
    assert sev[1].peer is peer and sev[1].msg["type"] == "hello" and sev[1].msg["features"] == ["test"]
    assert peer.current.remote_index == client.current.local_index
    assert client.current.remote_index == peer.current.local_index

    # the policy layer answers SessionStarted with a config; the client sees it as an event
    server.send_control(peer, CONFIG, 0.1)
    shuttle(server, client, src, 0.1)
    ev, = drain_events(client)
    assert isinstance(ev, ControlReceived) and ev.peer is None and ev.msg == CONFIG

    # data both ways, IPv4 and IPv6, odd lengths: padding is added on the wire and trimmed on delivery
    up = [ipv4_packet(payload=udp_payload(n, n)) for n in (0, 1, 13, 37, 1380)] + \
         [ipv6_packet(payload=udp_payload(n, n)) for n in (0, 3, 100, 1360)]
    down = [ipv4_packet("10.8.0.1", "10.8.0.2", udp_payload(n, n + 7)) for n in (2, 44)] + \
           [ipv6_packet("fd00::1", "fd00::2", udp_payload(n, n + 9)) for n in (5, 777)]
    for p in up:
        client.send_packet(p, 1.0)
    sizes = []
    inject = []
    for p in down:
        item = server_send(server, peer, p, 1.0)
        sizes.append((len(p), len(item[2])))
        inject.append(item)
    for n, dg_len in sizes:
        assert dg_len == TRANSPORT_MIN_LEN + len(pad(b"x" * n)) and (dg_len - TRANSPORT_MIN_LEN) % 16 == 0
    to_server, to_client = shuttle(server, client, src, 1.0, inject=inject)
    assert to_server == up
    assert to_client == down
    assert server.rx_bytes > 0 and client.rx_bytes > 0   # totals only: no per-peer figure exists


def test_server_delivery_names_the_peer():
    server, client, src = established_pair(seed=2, vnet_hdr=False)
    pkt = ipv4_packet(payload=b"abc")
    result = server.receive_datagram(client.encrypt(pkt, 1.0), src, 1.0)
    assert result == (server.peers[client.public], pkt)


def test_keepalive_is_not_delivered_and_refreshes_liveness():
    server, client, src = established_pair(seed=3)
    peer = server.peers[client.public]
    client.send_packet(ipv4_packet(payload=b"ping"), 1.0)
    to_server, _ = shuttle(server, client, src, 1.0)
    assert len(to_server) == 1
    assert client.get_timer() == pytest.approx(1.0 + DEAD_PEER_TIMEOUT)
    # the server has nothing to say: a passive keepalive after KEEPALIVE_TIMEOUT
    to_server, to_client = run_until(server, client, src, 1.5, 4.0, step=0.5)
    assert to_client == [] and to_server == []
    assert peer.last_tx is not None and client.last_rx >= 3.0
    assert client.get_timer() == REKEY_AFTER_TIME       # no dead-peer deadline left
    assert client.current is not None and client.pending is None


def test_ip_builders_make_valid_headers():
    import ipaddress
    import struct as _s
    v4 = ipv4_packet("10.8.0.2", "10.8.0.1", b"x" * 33, proto=6)
    assert len(v4) == 53 and _s.unpack_from("!H", v4, 2)[0] == 53 and v4[0] == 0x45 and v4[9] == 6
    words = _s.unpack("!10H", v4[:20])
    total = sum(words)
    assert (total & 0xFFFF) + (total >> 16) == 0xFFFF          # the header checksum verifies
    assert ipaddress.IPv4Address(v4[12:16]) == ipaddress.IPv4Address("10.8.0.2")
    v6 = ipv6_packet("fd00::2", "fd00::1", b"y" * 7)
    assert len(v6) == 47 and v6[0] >> 4 == 6 and _s.unpack_from("!H", v6, 4)[0] == 7
    assert ipaddress.IPv6Address(v6[24:40]) == ipaddress.IPv6Address("fd00::1")


# --- rekey and expiry ----------------------------------------------------------------------------------

def _traffic(server, client, sent_up: list, sent_down: list, seen: dict, server_events: list | None = None):
    """Data both ways each step; with `server_events`, the server's events are collected there and
    every hello is answered with a config, as vpnd's policy layer does."""
    peer = server.peers[client.public]

    def each(now):
        if server_events is not None:
            for ev in drain_events(server):
                server_events.append(ev)
                if isinstance(ev, ControlReceived) and ev.msg["type"] == "hello":
                    server.send_control(ev.peer, MIN_CONFIG, now)
        seen.setdefault(client.current.local_index if client.current else None, now)
        k = len(sent_up)
        up = ipv4_packet(payload=udp_payload(20 + k % 50, k))
        down = ipv6_packet("fd00::1", "fd00::2", udp_payload(30 + k % 40, k))
        if client.current is not None:
            sent_up.append(up)
        client.send_packet(up, now)
        item = server_send(server, peer, down, now)
        if item is not None:
            sent_down.append(down)
        return [item]
    return each


def test_rekey_at_120s_without_loss_and_old_keypair_until_it_ages_out():
    server, client, src = established_pair(seed=4, vnet_hdr=False)
    peer = server.peers[client.public]
    first = client.current
    sent_up, sent_down, seen, server_events = [], [], {}, []
    each = _traffic(server, client, sent_up, sent_down, seen, server_events)

    to_server, to_client = run_until(server, client, src, 0.5, 150.0, step=0.5, each=each)
    assert to_server == sent_up and to_client == sent_down          # nothing lost across the switch
    assert len(sent_up) == 300

    assert client.current is not first and client.previous is first
    assert list(seen) == [first.local_index, client.current.local_index]
    assert REKEY_AFTER_TIME <= seen[client.current.local_index] <= REKEY_AFTER_TIME + 0.5
    assert peer.current.local_index == client.current.remote_index != first.remote_index
    assert peer.previous.local_index == first.remote_index
    assert [type(e) for e in drain_events(client) if not isinstance(e, ControlReceived)] == [HandshakeCompleted]
    sev = server_events + drain_events(server)
    assert [e.msg["type"] for e in sev if isinstance(e, ControlReceived)] == ["hello"]   # answered at once
    assert not any(isinstance(e, (SessionStarted, SessionEnded)) for e in sev)

    # the old keypair is still accepted in both directions until REJECT_AFTER_TIME after its creation
    old_up = ipv4_packet(payload=b"old keypair up")
    old_down = ipv4_packet("10.8.0.1", "10.8.0.2", b"old keypair down")
    assert server.receive_datagram(first.seal(KIND_DATA, pad(old_up)), src, 150.0) == (peer, old_up)
    assert client.receive_datagram(peer.previous.seal(KIND_DATA, pad(old_down)), 150.0) == old_down

    to_server, to_client = run_until(server, client, src, 150.5, 179.5, step=0.5, each=each)
    late_up = first.seal(KIND_DATA, pad(old_up))
    late_down = peer.previous.seal(KIND_DATA, pad(old_down))
    fire_timers(server, client, REJECT_AFTER_TIME)
    assert client.previous is None and peer.previous is None
    assert server.receive_datagram(late_up, src, REJECT_AFTER_TIME) is None
    assert client.receive_datagram(late_down, REJECT_AFTER_TIME) is None
    assert server.drops["index"] == 1 and client.drops["index"] == 1
    # the current keypair carries on
    to_server, to_client = run_until(server, client, src, 180.0, 200.0, step=0.5, each=each)
    assert to_server == sent_up[-len(to_server):] and len(to_server) == 41
    assert client.state == "established" and client.current is not first


def test_no_second_rekey_before_its_time():
    server, client, src = established_pair(seed=5)
    log: list = []
    clock = {"now": 0.0}
    sent_up, sent_down, seen = [], [], {}
    inner = _traffic(server, client, sent_up, sent_down, seen)

    def each(now):
        clock["now"] = now
        return inner(now)
    run_until(server, client, src, 1.0, 250.0, step=1.0, link=recording_link(log, clock=clock), each=each)
    times = [t for t, *_ in of_type(log, C2S, MSG_INITIATION)]
    assert times == [REKEY_AFTER_TIME, 2 * REKEY_AFTER_TIME]


def test_keypair_unused_after_180s_and_server_ends_the_peer():
    server, client, src = established_pair(seed=6, vnet_hdr=False)
    peer = server.peers[client.public]
    no_handshakes = blocking_link(c2s=lambda dg: dg[0] == MSG_INITIATION)
    sent_up, sent_down, seen = [], [], {}
    each = _traffic(server, client, sent_up, sent_down, seen)

    to_server, to_client = run_until(server, client, src, 0.5, 179.5, step=0.5, link=no_handshakes, each=each)
    assert to_server == sent_up and to_client == sent_down and len(to_server) == 359
    assert client.state == "established" and client.pending is not None   # rekey attempts go nowhere
    stale = client.current.seal(KIND_DATA, pad(ipv4_packet(payload=b"stale")))
    drain_events(server)
    drain_events(client)

    fire_timers(server, client, REJECT_AFTER_TIME)
    assert client.state == "handshaking" and client.current is None
    assert client.encrypt(ipv4_packet(payload=b"x"), REJECT_AFTER_TIME) is None
    assert client.drops["no-session"] == 1
    ev, = drain_events(server)
    assert isinstance(ev, SessionEnded) and ev.peer is peer and ev.reason == "expired"
    assert server.peers == {} and server.by_index == {} and peer.endpoint is None
    assert server.encrypt(peer, ipv4_packet(payload=b"x"), REJECT_AFTER_TIME) is None
    assert server.receive_datagram(stale, src, REJECT_AFTER_TIME) is None
    assert server.drops["index"] == 1

    # the link heals: the client's next retry (every REKEY_TIMEOUT) starts a new session
    run_until(server, client, src, 180.5, 180.0 + REKEY_TIMEOUT + 0.5, step=0.5)
    assert client.state == "established"
    sev = drain_events(server)
    assert isinstance(sev[0], SessionStarted) and sev[0].peer is not peer
    assert [type(e) for e in drain_events(client)] == [HandshakeCompleted]


def test_handshake_retransmits_every_rekey_timeout_while_responses_are_lost():
    server, client, src = pair(seed=7)
    log: list = []
    clock = {"now": 0.0}
    lose_responses = recording_link(log, blocking_link(s2c=lambda dg: dg[0] == MSG_RESPONSE), clock)

    def each(now):
        clock["now"] = now
    client.connect(0.0)
    shuttle(server, client, src, 0.0, lose_responses)
    run_until(server, client, src, 0.25, 27.0, step=0.25, link=lose_responses, each=each)
    inits = of_type(log, C2S, MSG_INITIATION)
    assert [t for t, *_ in inits] == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    parsed = [wire.unpack_initiation_untrusted(dg) for *_, dg in inits]
    assert len({p.sender for p in parsed}) == len(parsed)          # fresh index each time
    assert len({p.ephemeral for p in parsed}) == len(parsed)       # fresh ephemeral each time
    assert len(of_type(log, S2C, MSG_RESPONSE)) == len(inits)       # the server answered every one
    peer = server.peers[client.public]
    assert peer.state == "new" and peer.current is None
    assert list(server.by_index) == [peer.next.local_index]         # earlier attempts were forgotten
    assert client.state == "handshaking" and drain_events(client) == []

    # responses get through again: the next retransmit completes
    run_until(server, client, src, 27.25, 30.0, step=0.25, link=recording_link(log, clock=clock), each=each)
    assert client.state == "established"
    assert [t for t, *_ in of_type(log, C2S, MSG_INITIATION)][-1] == 30.0
    assert isinstance(drain_events(server)[0], SessionStarted)


# Regression: get_timer used to return the rekey/dead-peer/keepalive deadlines while a handshake was
# pending, which handle_timer does not act on then: get_timer() stayed <= now and the endpoint spun.
def test_timer_is_in_the_future_after_handling_a_rekey():
    server, client, src = established_pair(seed=8)
    lose_responses = blocking_link(s2c=lambda dg: dg[0] == MSG_RESPONSE)
    run_until(server, client, src, 1.0, REKEY_AFTER_TIME, step=1.0, link=lose_responses)
    assert client.pending is not None
    client.handle_timer(REKEY_AFTER_TIME)
    assert client.get_timer() > REKEY_AFTER_TIME


def test_timer_deadlines_when_idle_and_after_sending():
    server, client, src = established_pair(seed=9, now=10.0)
    assert client.get_timer() == 10.0 + REKEY_AFTER_TIME
    client.send_packet(ipv4_packet(payload=b"x"), 12.0)
    assert client.get_timer() == 12.0 + DEAD_PEER_TIMEOUT
    client.close(13.0)
    assert client.get_timer() is None


# --- dead peer detection -----------------------------------------------------------------------------

def test_server_restart_is_detected_and_the_client_reconnects():
    seed = 10
    server, client, src = established_pair(seed=seed)
    server_private, _ = keypair_from(f"server:{seed}")
    fresh = ServerProtocol(private_key=server_private, rng=seeded_rng("restarted"))
    fresh.authorize(client.public)
    first = client.current
    times = {}
    up = []

    def each(now):
        pkt = ipv4_packet(payload=udp_payload(40, int(now)))
        client.send_packet(pkt, now)
        up.append((now, pkt))
        if client.current is not first and "switch" not in times:
            times["switch"] = now
        peer = fresh.peers.get(client.public)
        if peer is not None and peer.current is not None:
            return [server_send(fresh, peer, ipv6_packet(payload=udp_payload(8, int(now))), now)]

    to_server, to_client = run_until(fresh, client, src, 10.0, 30.0, step=1.0, each=each)
    assert fresh.drops["index"] >= 1                     # the old session's datagrams are unknown here
    assert client.current is not first and client.state == "established"
    assert times["switch"] <= 10.0 + DEAD_PEER_TIMEOUT + 1.0
    assert isinstance(drain_events(fresh)[0], SessionStarted)
    # traffic flows again both ways after the reconnect
    after = [pkt for t, pkt in up if t >= times["switch"]]
    assert after and to_server[-len(after):] == after
    assert len(to_client) >= 10


def test_no_reconnect_while_the_server_answers_sparse_one_way_traffic():
    server, client, src = established_pair(seed=11)
    first = client.current
    run_until(server, client, src, 2.5, 100.0, step=2.5,
              each=lambda now: client.send_packet(ipv4_packet(payload=b"one way"), now))
    assert client.current is first   # passive keepalives from the server keep the session alive


# Regression: the passive keepalive used to wait for KEEPALIVE_TIMEOUT after the *last* data packet,
# so steady one-way traffic never got one and the client re-handshaked every ~8 s (dead peer).
def test_no_reconnect_while_the_server_answers_steady_one_way_traffic():
    server, client, src = established_pair(seed=11)
    first = client.current
    run_until(server, client, src, 1.0, 100.0, step=1.0,
              each=lambda now: client.send_packet(ipv4_packet(payload=b"one way"), now))
    assert client.current is first   # passive keepalives from the server keep the session alive


# --- replayed and unwanted initiations ----------------------------------------------------------------

def test_replayed_initiation_creates_nothing_and_does_not_disturb_the_live_session():
    server, client, src = pair(seed=12, vnet_hdr=False)
    log: list = []
    client.connect(0.0)
    shuttle(server, client, src, 0.0, recording_link(log))
    first_init = of_type(log, C2S, MSG_INITIATION)[0][3]
    peer = server.peers[client.public]
    before = (dict(server.by_index), peer.current, peer.previous, peer.next, peer.endpoint, peer.last_timestamp)
    drain_events(server)

    attacker = ("203.0.113.9", 4444)
    for addr in (src, attacker):
        assert server.receive_datagram(first_init, addr, 3.0) is None
    assert server.drops["initiation-replay"] == 2
    assert server.datagrams_to_send() == []
    assert (dict(server.by_index), peer.current, peer.previous, peer.next, peer.endpoint, peer.last_timestamp) == before
    assert drain_events(server) == []
    # the live session is untouched
    pkt = ipv4_packet(payload=b"still here")
    client.send_packet(pkt, 3.0)
    assert shuttle(server, client, src, 3.0)[0] == [pkt]

    # after a rekey, both the first and the rekey initiation are replays
    log.clear()
    run_until(server, client, src, 4.0, REKEY_AFTER_TIME + 1, step=1.0, link=recording_link(log))
    rekey_init = of_type(log, C2S, MSG_INITIATION)[0][3]
    for dg in (first_init, rekey_init):
        assert server.receive_datagram(dg, attacker, 130.0) is None
    assert server.drops["initiation-replay"] == 4
    assert peer.next is None and peer.endpoint == src and server.datagrams_to_send() == []


def test_initiation_from_an_unauthorized_key_gets_no_response():
    server, _, src = pair(seed=13)
    stranger_private, stranger_public = keypair_from("stranger")
    stranger = ClientConnection(private_key=stranger_private, server_public=server.public, rng=seeded_rng("s"))
    stranger.connect(0.0)
    shuttle(server, stranger, src, 0.0)
    run_until(server, stranger, src, 1.0, 12.0, step=1.0)
    assert server.drops["unknown-key"] == 3                 # at 0, 5 and 10 s
    assert_no_server_state(server)
    assert stranger.state == "handshaking" and stranger.current is None


def test_deauthorized_key_is_refused_and_its_session_ended():
    server, client, src = established_pair(seed=14)
    peer = server.peers[client.public]
    server.deauthorize(client.public, 5.0)
    ev, = drain_events(server)
    assert isinstance(ev, SessionEnded) and ev.peer is peer and ev.reason == "not authorized"
    shuttle(server, client, src, 5.0)
    assert isinstance(drain_events(client)[0], ServerClosed)
    run_until(server, client, src, 6.0, 16.0, step=1.0)
    assert server.drops["unknown-key"] == 2 and server.peers == {}


class _CountingRng:
    def __init__(self, seed):
        self.inner, self.calls = seeded_rng(seed), 0

    def __call__(self, n):
        self.calls += 1
        return self.inner(n)


@pytest.mark.parametrize("under_load", [False, True])
@pytest.mark.parametrize("where", ["mac1", "body", "type-reserved"])
def test_bad_mac1_gets_no_response_and_no_state(where, under_load):
    server_private, server_public = keypair_from("mac1-server")
    client_private, client_public = keypair_from("mac1-client")
    rng = _CountingRng("mac1")
    server = ServerProtocol(private_key=server_private, rng=rng)
    server.authorize(client_public)
    server.under_load = under_load
    good = craft_initiation(server_public, client_private)
    bad = bytearray(good)
    bad[{"mac1": wire.INITIATION_MAC1_AT + 3, "body": 60, "type-reserved": 2}[where]] ^= 0x10
    calls = rng.calls
    assert server.receive_datagram(bytes(bad), ("198.18.0.9", 1000), 0.0) is None
    # mac1 covers every byte before it; a non-zero reserved byte is refused even before mac1
    assert server.drops == ({"header": 1} if where == "type-reserved" else {"mac1": 1})
    assert rng.calls == calls                           # no ephemeral drawn: no DH was done
    assert_no_server_state(server)
    # control: the unmodified message is accepted (when not under load)
    if not under_load:
        server.receive_datagram(good, ("198.18.0.9", 1000), 0.0)
        assert len(server.datagrams_to_send()) == 1 and client_public in server.peers


# --- cookies under load --------------------------------------------------------------------------------

def test_under_load_cookie_reply_then_mac2_succeeds():
    server, client, src = pair(seed=15)
    server.under_load = True
    log: list = []
    client.connect(0.0)
    shuttle(server, client, src, 0.0, recording_link(log))
    first, second = of_type(log, C2S, MSG_INITIATION)
    reply, = of_type(log, S2C, MSG_COOKIE_REPLY)
    assert first[3][-16:] == bytes(16)                  # no cookie yet: mac2 is zero
    assert len(reply[3]) == COOKIE_REPLY_LEN and reply[2] == src
    assert wire.unpack_cookie_reply_untrusted(reply[3]).receiver == wire.unpack_initiation_untrusted(first[3]).sender
    # the client sent the initiation again at once (not after REKEY_TIMEOUT), with mac2 from the cookie
    assert log.index(second) > log.index(reply)
    assert second[3][-16:] != bytes(16)
    assert wire.unpack_initiation_untrusted(second[3]).sender != wire.unpack_initiation_untrusted(first[3]).sender
    assert server.drops["cookie-sent"] == 1              # the first was dropped, the second accepted
    assert client.state == "established" and sum(client.drops.values()) == 0
    assert isinstance(drain_events(server)[0], SessionStarted)

    # a replayed cookie reply is refused once no handshake is pending
    assert client.receive_datagram(reply[3], 6.0) is None
    assert client.drops["cookie-unexpected"] == 1


def test_cookie_is_bound_to_the_source_address_and_the_retry_does_not_loop():
    server, client, src = pair(seed=16)
    server.under_load = True
    client.connect(0.0)
    first, = client.datagrams_to_send()
    server.receive_datagram(first, src, 0.0)
    (_, reply), = server.datagrams_to_send()
    assert client.receive_datagram(reply, 0.0) is None
    retry, = client.datagrams_to_send()                   # at once, with mac2 for `src`
    moved = ("198.18.7.7", 40000)
    server.receive_datagram(retry, moved, 0.0)             # ... but it arrives from elsewhere
    (ep, reply2), = server.datagrams_to_send()
    assert ep == moved and server.drops["cookie-sent"] == 2 and server.peers == {}
    assert client.receive_datagram(reply2, 0.0) is None
    assert client.datagrams_to_send() == []               # one immediate retry per interval: no loop
    assert client.get_timer() == REKEY_TIMEOUT
    run_until(server, client, moved, 1.0, REKEY_TIMEOUT, step=1.0)   # the timer's retry, from `moved`
    assert client.state == "established" and server.peers[client.public].endpoint == moved
    assert server.drops["cookie-sent"] == 2


def test_cookie_reply_for_another_index_is_refused():
    server, client, src = pair(seed=17)
    server.under_load = True
    client.connect(0.0)
    init = client.datagrams_to_send()[0]
    server.receive_datagram(init, src, 0.0)
    (_, reply), = server.datagrams_to_send()
    r = wire.unpack_cookie_reply_untrusted(reply)
    other = wire.pack_cookie_reply(r.receiver ^ 1, r.nonce, r.encrypted_cookie)
    assert client.receive_datagram(other, 0.0) is None
    assert client.drops["cookie-index"] == 1
    tampered = bytearray(reply)
    tampered[-1] ^= 1
    assert client.receive_datagram(bytes(tampered), 0.0) is None
    assert client.drops["cookie-aead"] == 1


# --- roaming -------------------------------------------------------------------------------------

def test_roaming_follows_authenticated_packets_only():
    server, client, src = established_pair(seed=18, vnet_hdr=False)
    peer = server.peers[client.public]
    new_src = ("198.18.99.1", 33333)
    attacker = ("203.0.113.66", 6666)

    pkt = ipv4_packet(payload=b"from the new address")
    client.send_packet(pkt, 1.0)
    to_server, _ = shuttle(server, client, new_src, 1.0)
    assert to_server == [pkt] and peer.endpoint == new_src
    # replies follow the client to its new address
    down = ipv4_packet("10.8.0.1", "10.8.0.2", b"reply")
    _, to_client = shuttle(server, client, new_src, 1.1, inject=[server_send(server, peer, down, 1.1)])
    assert to_client == [down]

    genuine = client.encrypt(ipv4_packet(payload=b"genuine"), 2.0)
    forged = bytearray(genuine)
    forged[-3] ^= 0x40
    unknown_index = bytearray(genuine)
    unknown_index[4:8] = bytes(4) if genuine[4:8] != bytes(4) else b"\1\0\0\0"
    for dg in (bytes(forged), bytes(unknown_index), genuine[:TRANSPORT_MIN_LEN - 1]):
        assert server.receive_datagram(dg, attacker, 2.0) is None
        assert peer.endpoint == new_src
    assert server.drops["tag"] == 1 and server.drops["index"] == 1 and server.drops["length"] == 1
    # the genuine datagram is still good; once seen, a replay of it from elsewhere moves nothing
    assert server.receive_datagram(genuine, new_src, 2.0) is not None
    assert server.receive_datagram(genuine, attacker, 2.1) is None
    assert server.drops["replay"] == 1 and peer.endpoint == new_src


# --- closing ------------------------------------------------------------------------------------

def test_close_from_client_ends_the_servers_peer():
    server, client, src = established_pair(seed=19)
    peer = server.peers[client.public]
    kp = client.current
    client.close(5.0)
    assert client.state == "closed" and client.current is None and client.get_timer() is None
    out = client.datagrams_to_send()
    assert len(out) == 1 and out[0][0] == MSG_TRANSPORT
    shuttle(server, client, src, 5.0, inject=[(C2S, src, dg) for dg in out])
    ev, = drain_events(server)
    assert isinstance(ev, SessionEnded) and ev.peer is peer and ev.reason == "closed by client"
    assert server.peers == {} and server.by_index == {} and peer.endpoint is None
    assert server.datagrams_to_send() == []              # no close sent back
    assert client.encrypt(ipv4_packet(payload=b"x"), 6.0) is None
    with pytest.raises(Exception):
        kp.seal(KIND_DATA, b"")                          # keys are wiped
    client.handle_timer(100.0)
    assert client.datagrams_to_send() == []              # and it stays closed


def test_server_close_all_makes_the_client_emit_server_closed_and_retry():
    server, client, src = established_pair(seed=20)
    peer = server.peers[client.public]
    server.close_all(5.0, "maintenance")
    sev = drain_events(server)
    assert len(sev) == 1 and isinstance(sev[0], SessionEnded) and sev[0].peer is peer and sev[0].reason == "maintenance"
    assert server.peers == {} and server.by_index == {}
    shuttle(server, client, src, 5.0)
    cev = drain_events(client)
    assert len(cev) == 1 and isinstance(cev[0], ServerClosed) and cev[0].reason == "maintenance"
    assert client.state == "handshaking" and client.current is None
    assert client.get_timer() == 5.0 + REKEY_TIMEOUT

    # the retry comes REKEY_TIMEOUT later and (the server being back) succeeds
    log: list = []
    run_until(server, client, src, 5.5, 5.0 + REKEY_TIMEOUT + 0.5, step=0.5, link=recording_link(log))
    assert len(of_type(log, C2S, MSG_INITIATION)) == 1
    assert client.state == "established"
    assert [type(e) for e in drain_events(client)] == [HandshakeCompleted]
    new = drain_events(server)[0]
    assert isinstance(new, SessionStarted) and new.peer is not peer


# --- memory-only objects ------------------------------------------------------------------------

def test_keypair_and_peer_refuse_pickle_and_show_only_an_index():
    server, client, src = established_pair(seed=21)
    peer = server.peers[client.public]
    secrets = [src[0], str(src[1]), client.public.hex(), server.public.hex(), client.public[:8].hex()]
    for obj in (peer, peer.current, client.current, server, client):
        for proto in range(pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(TypeError):
                pickle.dumps(obj, protocol=proto)
        with pytest.raises(TypeError):
            copy.copy(obj)
        with pytest.raises(TypeError):
            copy.deepcopy(obj)
        text = repr(obj) + str(obj)
        assert not any(s in text for s in secrets), text
    assert repr(peer) == f"<Peer #{peer.handle:08x}>"
    assert repr(peer.current) == f"<Keypair #{peer.current.local_index:08x}>"
    assert repr(client.current) == f"<Keypair #{client.current.local_index:08x}>"
    client.handle_timer(REKEY_AFTER_TIME)                # a pending handshake exists now
    with pytest.raises(TypeError):
        pickle.dumps(client.pending)
    assert repr(client.pending) == f"<PendingInitiation #{client.pending.index:08x}>"


# --- low-order points ------------------------------------------------------------------------------

@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=LOW_IDS)
def test_low_order_client_ephemeral_in_initiation(point):
    server, client, src = pair(seed=22)
    client_private, _ = keypair_from("client:22")
    # control: the same hand-made initiation with an honest ephemeral is accepted
    ok = craft_initiation(server.public, client_private, wall=1.0e9)
    server2, _, _ = pair(seed=22)
    assert server2.receive_datagram(ok, src, 0.0) is None and len(server2.datagrams_to_send()) == 1

    dg = craft_initiation(server.public, client_private, e_pub=point)
    assert server.receive_datagram(dg, src, 0.0) is None
    assert server.drops == {"dh": 1}
    assert_no_server_state(server)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=LOW_IDS)
def test_low_order_server_ephemeral_in_response(point):
    server, client, src = pair(seed=23)
    client.connect(0.0)
    init = wire.unpack_initiation_untrusted(client.datagrams_to_send()[0])
    forged = wire.pack_response(0xABCDEF, init.sender, point + bytes(16))[:-32]
    forged = CookieGenerator(client.public).add_macs(forged, 0.0)   # a valid mac1: the DH is reached
    assert client.receive_datagram(forged, 0.0) is None
    assert client.drops == {"dh": 1}
    assert client.state == "handshaking" and client.current is None
    assert client.datagrams_to_send() == [] and drain_events(client) == []


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=LOW_IDS)
def test_low_order_client_static_key(point):
    server, client, src = pair(seed=24)
    server.authorize(point)               # even an authorized low-order key must not get a session
    client_private, _ = keypair_from("client:24")
    dg = craft_initiation(server.public, client_private, s_pub=point)
    assert server.receive_datagram(dg, src, 0.0) is None
    assert server.drops == {"dh": 1}
    assert_no_server_state(server)


# Regression: a response that passed the index and mac1 checks but failed later used to leave its
# ephemeral mixed into the pending handshake, so the genuine response that followed failed too.
@pytest.mark.parametrize("forgery", ["low-order-ephemeral", "other-ephemeral", "bad-tag"])
def test_forged_response_does_not_poison_the_pending_handshake(forgery):
    server, client, src = pair(seed=25)
    client.connect(0.0)
    init = client.datagrams_to_send()[0]
    server.receive_datagram(init, src, 0.0)
    (_, genuine), = server.datagrams_to_send()
    r = wire.unpack_response_untrusted(genuine)
    eph, sealed = {
        "low-order-ephemeral": (LOW_ORDER_POINTS[2], r.encrypted_nothing),
        "other-ephemeral": (keypair_from("someone")[1], r.encrypted_nothing),
        "bad-tag": (r.ephemeral, bytes(16)),
    }[forgery]
    forged = CookieGenerator(client.public).add_macs(wire.pack_response(r.sender, r.receiver, eph + sealed)[:-32], 0.0)
    assert client.receive_datagram(forged, 0.0) is None
    assert sum(client.drops.values()) == 1 and client.state == "handshaking"
    assert client.receive_datagram(genuine, 0.0) is None
    assert client.state == "established"
    assert [type(e) for e in drain_events(client)] == [HandshakeCompleted]
    _, to_client = shuttle(server, client, src, 0.0)
    assert client.public in server.peers and server.peers[client.public].state == "live"


# --- an unreliable link --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lossy_link_connects_rekeys_and_never_delivers_twice(seed):
    server, client, src = pair(seed=100 + seed, vnet_hdr=False)
    link = lossy_link(seed, drop=0.1, dup=0.05, reorder=0.1)
    sent_up, sent_down = [], []
    state = {"n": 0}

    def each(now):
        due = client.get_timer()
        assert due is None or due > now          # what was due has been handled
        items = []
        peer = server.peers.get(client.public)
        for _ in range(3):
            state["n"] += 1
            n = state["n"]
            up = ipv4_packet(payload=udp_payload(10 + n % 90, n))
            if client.current is not None:
                sent_up.append(up)
            client.send_packet(up, now)
            if peer is not None and peer.current is not None:
                down = ipv6_packet(payload=udp_payload(10 + n % 70, n))
                sent_down.append(down)
                items.append(server_send(server, peer, down, now))
        return items

    client.connect(0.0)
    shuttle(server, client, src, 0.0, link)
    to_server, to_client = run_until(server, client, src, 0.5, 260.0, step=0.5, link=link, each=each)
    assert link.dropped and link.duplicated and link.reordered
    assert client.state == "established"
    assert client.current.created >= REKEY_AFTER_TIME             # at least one rekey went through
    for delivered, sent in ((to_server, sent_up), (to_client, sent_down)):
        assert len(set(delivered)) == len(delivered)              # the replay window drops duplicates
        assert set(delivered) <= set(sent)
        assert len(delivered) >= 0.75 * len(sent)


# --- pre-shared key ----------------------------------------------------------------------------

def test_psk_must_match():
    psk = bytes(range(32))
    server, client, src = established_pair(seed=40, psk=psk, vnet_hdr=False)
    pkt = ipv4_packet(payload=b"with psk")
    client.send_packet(pkt, 1.0)
    assert shuttle(server, client, src, 1.0)[0] == [pkt]

    server, client, src = pair(seed=41, psk=psk)
    server.authorize(client.public, bytes(32 * [7]))      # the server holds another PSK for this key
    client.connect(0.0)
    shuttle(server, client, src, 0.0)
    assert client.state == "handshaking" and client.drops["aead"] == 1
    assert server.peers[client.public].state == "new"     # never confirmed: no SessionStarted
    assert drain_events(server) == []


# --- the hello is sent again until a config arrives ----------------------------------------------------

def _hellos(server) -> list:
    return [e for e in drain_events(server) if isinstance(e, ControlReceived) and e.msg["type"] == "hello"]


def test_a_lost_hello_is_sent_again_until_a_config_arrives():
    server, client, src = pair(seed=40)
    lost = {"n": 0}

    def drop_first_two_controls(dg):      # the first two transport messages from the client: hellos
        if dg[0] == MSG_TRANSPORT and lost["n"] < 2:
            lost["n"] += 1
            return True
        return False
    link = blocking_link(c2s=drop_first_two_controls)
    client.connect(0.0)
    shuttle(server, client, src, 0.0, link)
    assert client.state == "established" and lost["n"] == 1
    assert server.peers[client.public].state == "new"           # unconfirmed: the hello was lost
    assert client.get_timer() == pytest.approx(HELLO_RETRY_TIMEOUT)
    tick(server, client, src, HELLO_RETRY_TIMEOUT, link)          # second hello: lost too
    assert lost["n"] == 2 and _hellos(server) == []
    tick(server, client, src, 2 * HELLO_RETRY_TIMEOUT, link)      # third: arrives, confirms the keypair
    peer = server.peers[client.public]
    assert peer.state == "live" and len(_hellos(server)) == 1
    # no config yet: the hello keeps coming, once per HELLO_RETRY_TIMEOUT
    tick(server, client, src, 3 * HELLO_RETRY_TIMEOUT, link)
    assert len(_hellos(server)) == 1
    server.send_control(peer, MIN_CONFIG, 3.0)
    shuttle(server, client, src, 3.0, link)
    assert any(isinstance(e, ControlReceived) and e.msg["type"] == "config" for e in drain_events(client))
    # with the config in, nothing more: the next deadline is the rekey, not a hello
    run_until(server, client, src, 3.5, 10.0, step=0.5, link=link)
    assert _hellos(server) == [] and client.get_timer() == REKEY_AFTER_TIME


def test_no_hello_is_resent_once_configured():
    server, client, src = established_pair(seed=41)
    run_until(server, client, src, 0.5, 20.0, step=0.5)
    assert _hellos(server) == []
