"""The Noise layer against the published cacophony vectors (SPEC §4.1), and DH on low-order points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult

from vpncore.proto import noise
from vpncore.proto.errors import BadPacket
from vpncore.proto.noise import CipherState, IKHandshake

from tests.helpers import LOW_ORDER_POINTS

VECTORS_FILE = Path(__file__).resolve().parent.parent / "protocol-spec" / "vectors" / "cacophony-IK.json"
DATA = json.loads(VECTORS_FILE.read_text())
VECTORS = DATA["vectors"]

# X25519 ignores the top bit of the u-coordinate (RFC 7748 §5), so these are the same points.
LOW_ORDER_HIGH_BIT = [pt[:31] + bytes([pt[31] | 0x80]) for pt in LOW_ORDER_POINTS]


def _hex(s: str) -> bytes:
    return bytes.fromhex(s)


def test_vectors_file_names_its_source_and_covers_the_ik_family():
    assert "cacophony" in DATA["source"]
    names = {v["protocol_name"] for v in VECTORS}
    assert {"Noise_IK_25519_ChaChaPoly_BLAKE2s", "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"} <= names
    assert len(VECTORS) >= 4


def _parties(v):
    hash_name = v["protocol_name"].rsplit("_", 1)[1]
    psk_i = _hex(v["init_psks"][0]) if v.get("init_psks") else None
    psk_r = _hex(v["resp_psks"][0]) if v.get("resp_psks") else None
    init = IKHandshake(initiator=True, static_private=_hex(v["init_static"]),
                       ephemeral_private=_hex(v["init_ephemeral"]),
                       remote_static=_hex(v["init_remote_static"]), prologue=_hex(v["init_prologue"]),
                       psk=psk_i, hash_name=hash_name, protocol_name=v["protocol_name"].encode())
    resp = IKHandshake(initiator=False, static_private=_hex(v["resp_static"]),
                       ephemeral_private=_hex(v["resp_ephemeral"]), prologue=_hex(v["resp_prologue"]),
                       psk=psk_r, hash_name=hash_name, protocol_name=v["protocol_name"].encode())
    return init, resp


@pytest.mark.parametrize("v", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_cacophony_vector(v):
    init, resp = _parties(v)
    msgs = v["messages"]

    # -> e, es, s, ss
    m1 = init.write_message_1(_hex(msgs[0]["payload"]))
    assert m1.hex() == msgs[0]["ciphertext"]
    assert resp.read_message_1(m1) == _hex(msgs[0]["payload"])
    # the responder learned the initiator's static key; the initiator knew the responder's
    assert bytes(resp.rs) == noise.public_key(_hex(v["init_static"]))
    assert _hex(v["init_remote_static"]) == noise.public_key(_hex(v["resp_static"]))

    # <- e, ee, se [, psk]
    m2 = resp.write_message_2(_hex(msgs[1]["payload"]))
    assert m2.hex() == msgs[1]["ciphertext"]
    assert init.read_message_2(m2) == _hex(msgs[1]["payload"])

    assert init.ss.h.hex() == v["handshake_hash"]
    assert resp.ss.h.hex() == v["handshake_hash"]

    i_send, i_recv = init.split()
    r_recv, r_send = resp.split()
    assert (i_send, i_recv) == (r_recv, r_send)
    assert len(i_send) == len(i_recv) == 32
    # split() wipes the ephemeral and static private keys it held
    assert init.e == bytearray(32) and resp.e == bytearray(32)
    assert init.s == bytearray(32) and resp.s == bytearray(32)

    # transport messages alternate: initiator, responder, initiator, ...
    cs = {"i_send": CipherState(i_send), "i_recv": CipherState(i_recv),
          "r_send": CipherState(r_send), "r_recv": CipherState(r_recv)}
    for k, m in enumerate(msgs[2:]):
        payload, ct = _hex(m["payload"]), m["ciphertext"]
        sender, receiver = ("i_send", "r_recv") if k % 2 == 0 else ("r_send", "i_recv")
        out = cs[sender].encrypt_with_ad(b"", payload)
        assert out.hex() == ct, f"transport message {k + 2}"
        assert cs[receiver].decrypt_with_ad(b"", out) == payload
    assert cs["i_send"].n == cs["r_recv"].n == (len(msgs) - 1) // 2
    assert cs["r_send"].n == cs["i_recv"].n == (len(msgs) - 2) // 2


@pytest.mark.parametrize("v", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_cacophony_tampered_messages_fail_as_badpacket(v):
    msgs = v["messages"]
    m1 = _hex(msgs[0]["ciphertext"])
    for pos in (0, 40, len(m1) - 1):
        _, resp = _parties(v)
        bad = bytearray(m1)
        bad[pos] ^= 0x01
        with pytest.raises(BadPacket):
            resp.read_message_1(bytes(bad))
    _, resp = _parties(v)
    with pytest.raises(BadPacket):
        resp.read_message_1(m1[:79])

    init, resp = _parties(v)
    resp.read_message_1(init.write_message_1(_hex(msgs[0]["payload"])))
    m2 = bytearray(resp.write_message_2(_hex(msgs[1]["payload"])))
    m2[-1] ^= 0x80
    with pytest.raises(BadPacket):
        init.read_message_2(bytes(m2))
    with pytest.raises(BadPacket):
        init.read_message_2(bytes(m2[:47]))


def test_cipherstate_wrong_nonce_or_ad_is_badpacket():
    key = bytes(range(32))
    a, b = CipherState(key), CipherState(key)
    ct = a.encrypt_with_ad(b"ad", b"hello")
    b.n = 1
    with pytest.raises(BadPacket):
        b.decrypt_with_ad(b"ad", ct)
    b.n = 0
    with pytest.raises(BadPacket):
        b.decrypt_with_ad(b"other", ct)
    assert b.n == 0  # a failed decrypt does not consume a nonce
    assert b.decrypt_with_ad(b"ad", ct) == b"hello"
    b.wipe()
    assert b.k is None


def test_cipherstate_without_key_passes_through():
    cs = CipherState()
    assert cs.encrypt_with_ad(b"x", b"plain") == b"plain"
    assert cs.decrypt_with_ad(b"x", b"plain") == b"plain"


@pytest.mark.parametrize("point", LOW_ORDER_POINTS + LOW_ORDER_HIGH_BIT,
                         ids=[f"lo{i}" for i in range(7)] + [f"lo{i}-hi" for i in range(7)])
def test_low_order_point_in_dh_is_badpacket(point):
    private = bytes(range(1, 33))
    # PyNaCl itself refuses these (all-zero result): the raw binding raises RuntimeError...
    with pytest.raises(RuntimeError):
        crypto_scalarmult(private, point)
    # ... and noise.dh turns that into the one failure mode of remote input.
    with pytest.raises(BadPacket) as info:
        noise.dh(private, point)
    assert info.value.reason == "dh"


@pytest.mark.parametrize("public", [
    b"", bytes(31), bytes(33), None, "not bytes", b"\x09" * 31, b"\x09" * 33, bytearray(b"\x09" * 16),
], ids=["empty", "31-zero", "33-zero", "none", "str", "31-nonzero", "33-nonzero", "16-bytearray"])
def test_malformed_public_key_in_dh_is_badpacket(public):
    # Regression: PyNaCl's crypto_scalarmult checks no lengths (a short key is read past its end,
    # a long one silently truncated), so noise.dh must.
    with pytest.raises(BadPacket):
        noise.dh(bytes(range(32)), public)


@pytest.mark.parametrize("private", [b"", bytes(31), b"\x09" * 33, None])
def test_malformed_private_key_in_dh_is_badpacket(private):
    with pytest.raises(BadPacket):
        noise.dh(private, noise.public_key(bytes(range(32))))


def test_dh_agrees_both_ways():
    a, b = bytes([1] * 32), bytes([2] * 32)
    assert noise.dh(a, noise.public_key(b)) == noise.dh(b, noise.public_key(a))


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=[f"lo{i}" for i in range(7)])
def test_low_order_ephemeral_in_message_1_is_badpacket(point):
    v = next(v for v in VECTORS if v["protocol_name"] == "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    _, resp = _parties(v)
    with pytest.raises(BadPacket):
        resp.read_message_1(point + bytes(48 + 16))
