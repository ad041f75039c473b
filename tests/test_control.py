"""Control channel messages: encode/decode and every way decode must refuse (SPEC §6)."""

from __future__ import annotations

import struct

import msgpack
import pytest

from vpncore.proto import control
from vpncore.proto.constants import CONTROL_MAX_ITEMS, CONTROL_MAX_LEN, CONTROL_VERSION, PADDING_MULTIPLE
from vpncore.proto.errors import BadPacket


def config(**over) -> dict:
    msg = {"type": "config", "version": CONTROL_VERSION, "ipv4": "10.8.0.2/24", "ipv6": "fd00::2/64",
           "routes": ["0.0.0.0/0", "::/0"], "mtu": 1420, "dns": ["10.8.0.1", "fd00::1"], "keepalive": 25,
           "features": ["gso"]}
    msg.update(over)
    return msg


def raw(body: bytes) -> bytes:
    """A control plaintext around an arbitrary msgpack body (bypassing encode's checks)."""
    plain = struct.pack(">H", len(body)) + body
    return plain + bytes(-len(plain) % PADDING_MULTIPLE)


def packed(msg) -> bytes:
    return raw(msgpack.packb(msg, use_bin_type=True))


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("msg", [
    control.hello(),
    control.hello(["gso", "uso"]),
    config(),
    {k: v for k, v in config().items() if k not in ("ipv4", "ipv6", "dns", "keepalive", "features")},
    control.close("server shutting down"),
    control.close(""),
], ids=["hello", "hello-features", "config", "config-minimal", "close", "close-empty"])
def test_round_trip(msg):
    plain = control.encode(msg)
    assert len(plain) % PADDING_MULTIPLE == 0
    (n,) = struct.unpack_from(">H", plain)
    assert plain[2 + n:] == bytes(len(plain) - 2 - n)  # zero padding
    assert control.decode_untrusted(plain) == msg


def test_hello_carries_version_and_features():
    msg = control.decode_untrusted(control.encode(control.hello(("a", "b"))))
    assert msg == {"type": "hello", "version": CONTROL_VERSION, "features": ["a", "b"]}


def test_close_reason_is_truncated_to_max_str():
    msg = control.close("x" * 1000)
    assert msg["reason"] == "x" * control.MAX_STR
    assert control.decode_untrusted(control.encode(msg)) == msg


@pytest.mark.parametrize("reason", ["é" * 200, "ü" + "x" * 255, "€" * 100, "🙂" * 70])
def test_close_with_non_ascii_reason_round_trips(reason):
    # Regression: the limit is MAX_STR encoded bytes (msgpack max_str_len), not characters; a
    # reason cut by characters was encoded fine and then refused by the peer.
    msg = control.close(reason)
    assert len(msg["reason"].encode()) <= control.MAX_STR
    assert reason.startswith(msg["reason"]) and len(msg["reason"]) >= control.MAX_STR // 4 - 1
    assert control.decode_untrusted(control.encode(msg)) == msg


def test_unknown_fields_are_ignored_but_kept_out_of_validation():
    msg = dict(control.hello(), extra={"nested": [1, 2, 3]})
    assert control.decode_untrusted(control.encode(msg))["type"] == "hello"


def test_trailing_bytes_after_the_body_are_ignored():
    plain = control.encode(control.hello()) + bytes(32)
    assert control.decode_untrusted(plain)["type"] == "hello"


def test_encode_refuses_an_oversize_message():
    with pytest.raises(ValueError):
        control.encode({"type": "hello", "version": 1, "blob": b"x" * (CONTROL_MAX_LEN + 1)})


# --- refusals -----------------------------------------------------------------------------------

def _bad(plain: bytes) -> str:
    with pytest.raises(BadPacket) as info:
        control.decode_untrusted(plain)
    assert info.value.reason.startswith("control-")
    return info.value.reason


@pytest.mark.parametrize("plain", [b"", b"\x00", b"\x00\x05abc", struct.pack(">H", CONTROL_MAX_LEN + 1) + bytes(CONTROL_MAX_LEN + 1),
                                   b"\xff\xff" + bytes(100)], ids=["empty", "one-byte", "short-body", "oversize", "huge-length"])
def test_bad_length(plain):
    assert _bad(plain) == "control-length"


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\x01", b"\xdc\xff\xff", b"\xd9\x05ab",
                                  b"\xc7\x01\x05x", b"\xd4\x00\x00"],
                         ids=["empty", "reserved-c1", "truncated-array", "array16-huge", "truncated-str", "ext8", "fixext"])
def test_malformed_msgpack(body):
    assert _bad(raw(body)) in ("control-msgpack", "control-type")


@pytest.mark.parametrize("obj", [None, 1, "hello", [1, 2], {"version": 1}, {"type": 1}, {"type": b"hello"},
                                 {"type": "bogus", "version": 1}, {"type": "HELLO", "version": 1}],
                         ids=["nil", "int", "str", "list", "no-type", "int-type", "bin-type", "unknown", "case"])
def test_unknown_or_missing_type(obj):
    assert _bad(packed(obj)) == "control-type"


def test_non_string_map_keys_are_refused():
    assert _bad(packed({1: "x", "type": "hello", "version": 1})) == "control-msgpack"


@pytest.mark.parametrize("msg", [
    {"type": "hello"},                                          # version missing
    {"type": "hello", "version": "1"},
    {"type": "hello", "version": True},                         # bool is not an int here
    {"type": "hello", "version": 1.0},
    {"type": "hello", "version": 1, "features": "gso"},
    {"type": "hello", "version": 1, "features": [1]},
    {"type": "hello", "version": 1, "features": [b"gso"]},
    {"type": "close"},
    {"type": "close", "reason": 5},
    {"type": "close", "reason": None},
    {"type": "close", "reason": b"bytes"},
    {k: v for k, v in config().items() if k != "routes"},
    {k: v for k, v in config().items() if k != "mtu"},
    config(routes="0.0.0.0/0"),
    config(routes=[1]),
    config(mtu="1420"),
    config(mtu=1420.0),
    config(ipv4=167772162),
    config(dns="10.8.0.1"),
    config(keepalive="25"),
], ids=lambda m: "-".join(f"{k}" for k in m)[:40])
def test_wrong_types_and_missing_fields(msg):
    assert _bad(packed(msg)) == "control-field"


@pytest.mark.parametrize("over", [
    {"ipv4": "10.8.0.300/24"}, {"ipv4": "not an address"}, {"ipv4": "10.8.0.2/33"}, {"ipv6": "fd00::zz/64"},
    {"ipv6": "fd00::2/129"}, {"routes": ["0.0.0.0/0", "256.0.0.0/8"]}, {"routes": ["::/200"]},
    {"routes": [""]}, {"dns": ["10.8.0.1/32"]}, {"dns": ["dns.example"]}, {"dns": [""]},
], ids=lambda o: next(iter(o)) + ":" + str(next(iter(o.values())))[:20])
def test_bad_addresses(over):
    assert _bad(packed(config(**over))) == "control-field"


@pytest.mark.parametrize("mtu,ok", [(575, False), (576, True), (1420, True), (65535, True), (65536, False),
                                    (0, False), (-1, False), (2**40, False)])
def test_mtu_range(mtu, ok):
    plain = packed(config(mtu=mtu))
    if ok:
        assert control.decode_untrusted(plain)["mtu"] == mtu
    else:
        assert _bad(plain) == "control-field"


def test_too_many_items():
    routes = [f"10.{i}.0.0/16" for i in range(CONTROL_MAX_ITEMS)]
    assert control.decode_untrusted(packed(config(routes=routes)))["routes"] == routes
    # one more item: refused by the msgpack limits (array longer than CONTROL_MAX_ITEMS)
    assert _bad(packed(config(routes=routes + ["10.99.0.0/16"]))) in ("control-msgpack", "control-field")
    # a map with more than CONTROL_MAX_ITEMS keys
    big = dict(control.hello(), **{f"k{i}": i for i in range(CONTROL_MAX_ITEMS)})
    assert _bad(packed(big)) == "control-msgpack"


def test_overlong_strings():
    ok = "x" * control.MAX_STR
    assert control.decode_untrusted(packed(control.close(ok)))["reason"] == ok
    assert _bad(packed({"type": "close", "reason": ok + "x"})) == "control-msgpack"
    assert _bad(packed({"type": "hello", "version": 1, "features": [ok + "x"]})) == "control-msgpack"
    assert _bad(packed({"type": "hello", "version": 1, "blob": b"y" * (control.MAX_STR + 1)})) == "control-msgpack"


def test_deep_nesting_is_refused_not_a_crash():
    body = b"\x91" * 1000 + b"\xc0"     # 1000 nested one-element arrays
    assert _bad(raw(body)) in ("control-msgpack", "control-type")


def test_a_map_with_a_key_twice_is_dropped():
    """SPEC §6.2.1: a repeated key is malformed; the reference drops the message (no last-wins)."""
    pairs = msgpack.packb("type") + msgpack.packb("close") + msgpack.packb("retry") + msgpack.packb(True)
    once = b"\x83" + pairs + msgpack.packb("reason") + msgpack.packb("x")
    assert control.decode_untrusted(raw(once))["reason"] == "x"         # the same bytes, one key each
    twice = b"\x84" + pairs + msgpack.packb("reason") + msgpack.packb("x") + msgpack.packb("reason") \
        + msgpack.packb("y")
    with pytest.raises(BadPacket) as exc:
        control.decode_untrusted(raw(twice))
    assert exc.value.reason == "control-msgpack"
