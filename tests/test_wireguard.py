"""vpncore.proto.wireguard: layouts, our initiator against our responder, macs, cookies, TAI64N,
replay, and fuzzed parsers. The proof of the exact protocol is tests/e2e/test_wireguard_interop.py
(against the stock wireguard-go): no published handshake test vectors exist for WireGuard."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from vpncore.proto import wireguard as wg
from vpncore.proto.errors import BadPacket
from vpncore.proto.noise import public_key

T0 = 1_700_000_000.25
SRC = ("198.18.0.2", 40000)


def ping_packet(n: int = 84) -> bytes:
    body = os.urandom(n - 20)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, n, 0, 0, 64, 1, 0, bytes([198, 19, 0, 2]),
                       bytes([198, 19, 0, 1])) + body


@pytest.fixture
def keys():
    i_priv, r_priv = os.urandom(32), os.urandom(32)
    return i_priv, public_key(i_priv), r_priv, public_key(r_priv)


def handshake(keys, psk=None, now=T0):
    i_priv, i_pub, r_priv, r_pub = keys
    ini = wg.Initiator(i_priv, r_pub, psk=psk)
    resp = wg.Responder(r_priv, {i_pub: psk})
    m1 = ini.create_initiation(now)
    consumed = resp.consume_initiation(m1, now)
    m2, r_sess = resp.create_response(consumed, now)
    i_sess = ini.consume_response(m2, now)
    return ini, resp, i_sess, r_sess, m1, m2, consumed


# -- layouts --------------------------------------------------------------------------------------

def test_constants():
    assert wg.CONSTRUCTION == b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    assert wg.IDENTIFIER == b"WireGuard v1 zx2c4 Jason@zx2c4.com"
    assert (wg.INITIATION_LEN, wg.RESPONSE_LEN, wg.COOKIE_REPLY_LEN, wg.TRANSPORT_MIN_LEN) == (148, 92, 64, 32)
    assert wg.REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1


def test_sizes_and_fields(keys):
    ini, resp, i_sess, r_sess, m1, m2, consumed = handshake(keys)
    assert len(m1) == 148 and m1[:4] == b"\x01\0\0\0"
    assert struct.unpack_from("<I", m1, 4)[0] == ini.index
    assert m1[8:40] == wg.parse_initiation(m1).ephemeral
    assert m1[132:148] == bytes(16)                      # no cookie: mac2 zero
    assert len(m2) == 92 and m2[:4] == b"\x02\0\0\0"
    sender, receiver = struct.unpack_from("<II", m2, 4)
    assert (sender, receiver) == (r_sess.local_index, ini.index)
    data = i_sess.encrypt(ping_packet(84), T0)
    assert len(data) == 16 + 96 + 16 and data[:4] == b"\x04\0\0\0"   # 84 padded to 96
    assert struct.unpack_from("<IQ", data, 4) == (r_sess.local_index, 0)
    assert len(i_sess.encrypt(b"", T0)) == 32                        # keepalive
    assert len(i_sess.encrypt(bytes(1419), T0, mtu=1420)) == 16 + 1420 + 16   # padding stops at the MTU


def test_pack_parse_round_trip():
    msg = wg.pack_initiation(7, b"e" * 32 + b"s" * 48 + b"t" * 28, b"1" * 16, b"2" * 16)
    assert wg.parse(msg) == wg.Initiation(7, b"e" * 32, b"s" * 48, b"t" * 28, b"1" * 16, b"2" * 16)
    msg = wg.pack_response(1, 2, b"e" * 32 + b"n" * 16)
    assert wg.parse_response(msg).receiver == 2
    msg = wg.pack_cookie_reply(9, b"n" * 24, b"c" * 32)
    assert wg.parse_cookie_reply(msg) == wg.CookieReply(9, b"n" * 24, b"c" * 32)
    hdr, enc = wg.parse(wg.pack_transport(5, 2**63, b"x" * 16))
    assert hdr == wg.TransportHeader(5, 2**63) and enc == b"x" * 16


@pytest.mark.parametrize("bad", [
    lambda m: m[:-1], lambda m: m + b"\0", lambda m: m[:1] + b"\1" + m[2:], lambda m: m[:3] + b"\1" + m[4:],
    lambda m: b"\x02" + m[1:],
])
def test_strict_initiation(bad):
    msg = wg.pack_initiation(7, bytes(108))
    with pytest.raises(BadPacket):
        wg.parse_initiation(bad(msg))


def test_strict_transport():
    with pytest.raises(BadPacket):
        wg.parse_transport(wg.pack_transport(1, 0, bytes(15)))        # shorter than a keepalive
    with pytest.raises(BadPacket):
        wg.parse_transport(b"\x04\0\1\0" + bytes(28))                 # reserved byte set
    with pytest.raises(BadPacket):
        wg.parse(b"\x05" + bytes(40))


# -- our initiator against our responder ----------------------------------------------------------

@pytest.mark.parametrize("psk", [None, os.urandom(32)])
def test_handshake_and_data_both_ways(keys, psk):
    ini, resp, i_sess, r_sess, m1, m2, consumed = handshake(keys, psk)
    assert consumed.peer_static == keys[1]
    assert consumed.timestamp == wg.tai64n(T0)
    assert i_sess.send_key == r_sess.recv_key and i_sess.recv_key == r_sess.send_key
    with pytest.raises(wg.KeyExhausted):
        r_sess.encrypt(b"", T0)                                       # responder waits for confirmation
    pkt = ping_packet(100)
    assert r_sess.decrypt(i_sess.encrypt(pkt, T0), T0) == pkt       # padding stripped
    assert r_sess.confirmed
    back = ping_packet(60)
    assert i_sess.decrypt(r_sess.encrypt(back, T0), T0) == back
    assert r_sess.decrypt(i_sess.encrypt(b"", T0), T0) == b""          # keepalive
    assert r_sess.decrypt_padded(i_sess.encrypt(b"abc", T0), T0) == b"abc" + bytes(13)


def test_psk_mismatch_fails(keys):
    i_priv, i_pub, r_priv, r_pub = keys
    ini = wg.Initiator(i_priv, r_pub, psk=os.urandom(32))
    resp = wg.Responder(r_priv, {i_pub: os.urandom(32)})
    m2, _ = resp.create_response(resp.consume_initiation(ini.create_initiation(T0), T0), T0)
    with pytest.raises(BadPacket):
        ini.consume_response(m2, T0)


def test_unknown_peer_and_wrong_responder(keys):
    i_priv, i_pub, r_priv, r_pub = keys
    ini = wg.Initiator(i_priv, r_pub)
    with pytest.raises(BadPacket):
        wg.Responder(r_priv, {public_key(os.urandom(32)): None}).consume_initiation(ini.create_initiation(T0), T0)
    other = os.urandom(32)
    m1 = wg.Initiator(i_priv, public_key(other)).create_initiation(T0)
    with pytest.raises(BadPacket, match="mac1"):
        wg.Responder(r_priv, {i_pub: None}).consume_initiation(m1, T0)


def test_replayed_and_forged_data_dropped(keys):
    _, _, i_sess, r_sess, *_ = handshake(keys)
    d = i_sess.encrypt(ping_packet(), T0)
    r_sess.decrypt(d, T0)
    with pytest.raises(BadPacket, match="replay"):
        r_sess.decrypt(d, T0)
    forged = d[:-1] + bytes([d[-1] ^ 1])
    d2 = i_sess.encrypt(ping_packet(), T0)
    with pytest.raises(BadPacket):
        r_sess.decrypt(forged[:8] + d2[8:16] + forged[16:], T0)
    assert r_sess.decrypt(d2, T0)                                     # forgery moved nothing
    with pytest.raises(BadPacket, match="index"):
        r_sess.decrypt(b"\x04\0\0\0" + struct.pack("<IQ", r_sess.local_index ^ 1, 9) + d2[16:], T0)


def test_counter_window_out_of_order(keys):
    _, _, i_sess, r_sess, *_ = handshake(keys)
    msgs = [i_sess.encrypt(b"", T0) for _ in range(10)]
    for i in (3, 0, 9, 5, 1):
        assert r_sess.decrypt(msgs[i], T0) == b""
    for i in (3, 9):
        with pytest.raises(BadPacket):
            r_sess.decrypt(msgs[i], T0)


def test_replay_window_limits():
    w = wg.ReplayWindow(size=64)
    assert w.update(100) and w.update(37) and not w.update(36) and not w.update(100)
    assert w.update(10_000) and not w.check(10_000 - 64) and w.check(10_000 - 63)
    assert not w.check(wg.REJECT_AFTER_MESSAGES) and w.check(wg.REJECT_AFTER_MESSAGES - 1)
    w2 = wg.ReplayWindow()
    assert w2.size == 8128


def test_counter_and_time_limits(keys):
    _, _, i_sess, r_sess, *_ = handshake(keys)
    i_sess.send_counter = wg.REJECT_AFTER_MESSAGES
    with pytest.raises(wg.KeyExhausted):
        i_sess.encrypt(b"", T0)
    i_sess.send_counter = 5
    assert not i_sess.needs_rekey(T0 + 119) and i_sess.needs_rekey(T0 + 120)
    with pytest.raises(wg.KeyExhausted):
        i_sess.encrypt(b"", T0 + 180)
    d = i_sess.encrypt(b"", T0)
    with pytest.raises(BadPacket, match="expired"):
        r_sess.decrypt(d, T0 + 180)
    # a counter at or above REJECT_AFTER_MESSAGES is refused before the AEAD
    hdr = b"\x04\0\0\0" + struct.pack("<IQ", r_sess.local_index, wg.REJECT_AFTER_MESSAGES)
    with pytest.raises(BadPacket, match="replay"):
        r_sess.decrypt(hdr + d[16:], T0)


# -- mac1, cookies, mac2 --------------------------------------------------------------------------

def test_mac1_definition(keys):
    i_priv, _, _, r_pub = keys
    m1 = wg.Initiator(i_priv, r_pub).create_initiation(T0)
    key = hashlib.blake2s(b"mac1----" + r_pub).digest()
    assert m1[116:132] == hashlib.blake2s(m1[:116], key=key, digest_size=16).digest()


def test_wrong_mac1_dropped(keys):
    i_priv, i_pub, r_priv, r_pub = keys
    m1 = bytearray(wg.Initiator(i_priv, r_pub).create_initiation(T0))
    m1[120] ^= 1
    with pytest.raises(BadPacket, match="mac1"):
        wg.Responder(r_priv, {i_pub: None}).consume_initiation(bytes(m1), T0)


def test_wrong_mac1_on_response_dropped(keys):
    i_priv, i_pub, r_priv, r_pub = keys
    ini, resp = wg.Initiator(i_priv, r_pub), wg.Responder(r_priv, {i_pub: None})
    m2, _ = resp.create_response(resp.consume_initiation(ini.create_initiation(T0), T0), T0)
    bad = m2[:65] + bytes([m2[65] ^ 1]) + m2[66:]
    with pytest.raises(BadPacket, match="mac1"):
        ini.consume_response(bad, T0)
    assert ini.consume_response(m2, T0)                              # the genuine one still works


def test_cookie_round_trip_under_load(keys):
    i_priv, i_pub, r_priv, r_pub = keys
    ini, resp = wg.Initiator(i_priv, r_pub), wg.Responder(r_priv, {i_pub: None})
    m1 = ini.create_initiation(T0)
    with pytest.raises(wg.CookieRequired) as exc:
        resp.consume_initiation(m1, T0, src=SRC, under_load=True)
    reply = exc.value.reply
    assert len(reply) == 64 and reply[:4] == b"\x03\0\0\0" and wg.parse_cookie_reply(reply).receiver == ini.index
    assert isinstance(exc.value, BadPacket)
    ini.consume_cookie_reply(reply, T0 + 0.1)
    m1b = ini.create_initiation(T0 + 1)
    assert m1b[132:] != bytes(16)
    consumed = resp.consume_initiation(m1b, T0 + 1, src=SRC, under_load=True)
    m2, r_sess = resp.create_response(consumed, T0 + 1)
    assert ini.consume_response(m2, T0 + 1).recv_key == r_sess.send_key
    # the cookie is bound to the source address
    m1c = ini.create_initiation(T0 + 2)
    with pytest.raises(wg.CookieRequired):
        resp.consume_initiation(m1c, T0 + 2, src=("198.18.0.3", 40000), under_load=True)
    # and expires after COOKIE_REFRESH_TIME at the initiator
    assert ini.create_initiation(T0 + 0.1 + 120)[132:] == bytes(16)


def test_cookie_reply_tampered_or_unexpected(keys):
    i_priv, i_pub, r_priv, r_pub = keys
    ini, resp = wg.Initiator(i_priv, r_pub), wg.Responder(r_priv, {i_pub: None})
    with pytest.raises(wg.CookieRequired) as exc:
        resp.consume_initiation(ini.create_initiation(T0), T0, src=SRC, under_load=True)
    reply = exc.value.reply
    with pytest.raises(BadPacket):
        ini.consume_cookie_reply(reply[:-1] + bytes([reply[-1] ^ 1]), T0)
    ini.create_initiation(T0 + 1)                  # a new initiation: the reply's index is stale
    with pytest.raises(BadPacket):
        ini.consume_cookie_reply(reply, T0 + 1)


def test_mac2_definition():
    gen = wg.CookieGenerator(public_key(os.urandom(32)))
    gen.cookie, gen.cookie_at = b"c" * 16, T0
    msg = gen.add_macs(bytes(148), T0 + 1)
    assert msg[132:] == hashlib.blake2s(msg[:132], key=b"c" * 16, digest_size=16).digest()


# -- TAI64N and replayed initiations --------------------------------------------------------------

def test_tai64n_layout():
    ts = wg.tai64n(1_000_000_000.5)
    assert struct.unpack(">QI", ts) == (2**62 + 10 + 1_000_000_000, 500_000_000 & ~(2**24 - 1))


def test_replayed_initiation_rejected(keys):
    i_priv, i_pub, r_priv, r_pub = keys
    ini, resp = wg.Initiator(i_priv, r_pub), wg.Responder(r_priv, {i_pub: None})
    m1 = ini.create_initiation(T0)
    resp.consume_initiation(m1, T0)
    with pytest.raises(BadPacket, match="timestamp"):
        resp.consume_initiation(m1, T0 + 1)                       # the very same initiation again
    older = ini.create_initiation(T0 - 5)
    with pytest.raises(BadPacket, match="timestamp"):
        resp.consume_initiation(older, T0 + 2)
    same_tick = ini.create_initiation(T0 + 0.001)                   # rounds to the same 2^24 ns
    with pytest.raises(BadPacket, match="timestamp"):
        resp.consume_initiation(same_tick, T0 + 3)
    assert resp.consume_initiation(ini.create_initiation(T0 + 1), T0 + 4)


def test_initiation_flood_rate(keys):
    i_priv, i_pub, r_priv, r_pub = keys
    ini, resp = wg.Initiator(i_priv, r_pub), wg.Responder(r_priv, {i_pub: None})
    resp.consume_initiation(ini.create_initiation(T0), T0)
    with pytest.raises(BadPacket, match="flood"):
        resp.consume_initiation(ini.create_initiation(T0 + 1), T0 + 0.01)
    assert resp.consume_initiation(ini.create_initiation(T0 + 2), T0 + 0.05)


def test_new_initiation_replaces_pending(keys):
    i_priv, i_pub, r_priv, r_pub = keys
    ini, resp = wg.Initiator(i_priv, r_pub), wg.Responder(r_priv, {i_pub: None})
    old = ini.create_initiation(T0)
    ini.create_initiation(T0 + 1)
    m2, _ = resp.create_response(resp.consume_initiation(old, T0), T0)
    with pytest.raises(BadPacket, match="index"):
        ini.consume_response(m2, T0)


def test_state_not_picklable(keys):
    import pickle
    _, _, i_sess, *_ = handshake(keys)
    with pytest.raises(TypeError):
        pickle.dumps(i_sess)


# -- fuzzing --------------------------------------------------------------------------------------

_PARSERS = [wg.parse, wg.parse_initiation, wg.parse_response, wg.parse_cookie_reply, wg.parse_transport]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([0, 1, 2, 3, 4, 9]))
def test_parsers_raise_only_badpacket(data, first):
    if first and data:
        data = bytes([first]) + b"\0\0\0" + data[4:]
    for parse in _PARSERS:
        try:
            parse(data)
        except BadPacket:
            pass


_FUZZ_KEYS = (os.urandom(32), os.urandom(32))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.integers(0, 3))
def test_consumers_raise_only_badpacket(data, kind):
    i_priv, r_priv = _FUZZ_KEYS
    i_pub, r_pub = public_key(i_priv), public_key(r_priv)
    ini, resp = wg.Initiator(i_priv, r_pub), wg.Responder(r_priv, {i_pub: None})
    ini.create_initiation(T0)
    if data and kind:
        data = bytes([kind]) + b"\0\0\0" + data[4:]
    sess = wg.Session(bytes(32), bytes(32), 1, 2, T0, initiator=True)
    for call in (lambda: resp.consume_initiation(data, T0, src=SRC, under_load=True),
                 lambda: resp.consume_initiation(data, T0),
                 lambda: ini.consume_response(data, T0), lambda: ini.consume_cookie_reply(data, T0),
                 lambda: resp.consume_cookie_reply(data, T0), lambda: sess.decrypt(data, T0)):
        try:
            call()
        except BadPacket:
            pass


def test_valid_mac1_garbage_body_is_badpacket(keys):
    """A message with a correct mac1 but a garbage Noise body is still only BadPacket."""
    i_priv, i_pub, r_priv, r_pub = keys
    resp = wg.Responder(r_priv, {i_pub: None})
    gen = wg.CookieGenerator(r_pub)
    for _ in range(50):
        msg = gen.add_macs(wg.pack_initiation(1, os.urandom(108)), T0)
        with pytest.raises(BadPacket):
            resp.consume_initiation(msg, T0)
    low_order = gen.add_macs(wg.pack_initiation(1, bytes(32) + os.urandom(76)), T0)
    with pytest.raises(BadPacket):
        resp.consume_initiation(low_order, T0)
