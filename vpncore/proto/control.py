"""Control channel messages: msgpack maps inside transport messages (SPEC §6).

Plaintext of a KIND_CONTROL transport message: u16 big-endian length, that many
bytes of msgpack, zero padding. Decoded only after the AEAD tag verified, with
bounded sizes; anything malformed is a BadPacket.
"""

from __future__ import annotations

import ipaddress
import struct

import msgpack

from .constants import (
    CONTROL_MAX_ITEMS, CONTROL_MAX_LEN, CONTROL_MAX_STR, CONTROL_VERSION, KEEPALIVE_MAX, PADDING_MULTIPLE,
)
from .errors import BadPacket

_LEN = struct.Struct(">H")
MAX_STR = CONTROL_MAX_STR

# type -> {field: (python type, required)}; fields not listed are ignored on receipt.
SCHEMA: dict[str, dict[str, tuple[type, bool]]] = {
    "hello": {"version": (int, True), "features": (list, False)},
    "config": {"version": (int, True), "ipv4": (str, False), "ipv6": (str, False), "routes": (list, True),
               "mtu": (int, True), "dns": (list, False), "keepalive": (int, False), "features": (list, False)},
    "close": {"reason": (str, True), "retry": (bool, False)},
    "loss": {"done": (int, True), "lost": (int, True), "repaired": (int, False)},
}


def encode(msg: dict) -> bytes:
    """Plaintext for a control message (length, msgpack, padding). ValueError if too big."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > CONTROL_MAX_LEN:
        raise ValueError("control message too long")
    plain = _LEN.pack(len(body)) + body
    plain += bytes(-len(plain) % PADDING_MULTIPLE)
    try:
        decode_untrusted(plain)      # never send what the peer's decoder would refuse
    except BadPacket as exc:
        raise ValueError(f"control message would be refused ({exc.reason})") from None
    return plain


def loss(done: int, lost: int, repaired: int = 0) -> dict:
    """A receiver's report: multi-fragment super-packets completed (of which `repaired` rebuilt from
    parity) and lost since the last one."""
    msg = {"type": "loss", "done": min(done, 2**31), "lost": min(lost, 2**31)}
    if repaired:
        msg["repaired"] = min(repaired, 2**31)
    return msg


def hello(features=()) -> dict:
    return {"type": "hello", "version": CONTROL_VERSION, "features": list(features)}


def config(*, mtu: int, routes=(), dns=(), features=(), ipv4: str | None = None, ipv6: str | None = None,
           keepalive: int | None = None) -> dict:
    """The server's `config` (SPEC §6.3): tunnel MTU, routes to send through the tunnel, DNS
    servers, agreed features (FEATURE_SUPERPACKET, FEATURE_PARITY) and the client's tunnel
    addresses as interface strings ("198.19.0.2/24", "fd00::2/64"). ValueError if a field would
    be refused by the receiver's decoder (§6.2)."""
    msg = {"type": "config", "version": CONTROL_VERSION, "mtu": mtu, "routes": list(routes), "dns": list(dns),
           "features": list(features)}
    if ipv4 is not None:
        msg["ipv4"] = ipv4
    if ipv6 is not None:
        msg["ipv6"] = ipv6
    if keepalive is not None:
        msg["keepalive"] = keepalive
    encode(msg)          # never build what the peer's decoder would refuse
    return msg


def close(reason: str, retry: bool = True) -> dict:
    # the limit is in encoded bytes (msgpack's max_str_len), so cut the UTF-8, not the characters
    return {"type": "close", "reason": reason.encode()[:MAX_STR].decode("utf-8", "ignore"), "retry": retry}


def _check_field(name: str, value, want: type) -> None:
    if want is bool:
        if not isinstance(value, bool):
            raise BadPacket("control-field")
        return
    if want is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise BadPacket("control-field")
    if not isinstance(value, want):
        raise BadPacket("control-field")
    if isinstance(value, str) and len(value) > MAX_STR:
        raise BadPacket("control-field")
    if isinstance(value, list):
        if len(value) > CONTROL_MAX_ITEMS or not all(isinstance(v, str) and len(v) <= MAX_STR for v in value):
            raise BadPacket("control-field")


def _check_config(msg: dict) -> None:
    try:
        for key, version in (("ipv4", 4), ("ipv6", 6)):
            if key in msg and ipaddress.ip_interface(msg[key]).version != version:
                raise BadPacket("control-field")
        for r in msg["routes"]:
            ipaddress.ip_network(r, strict=False)
        for d in msg.get("dns", ()):
            ipaddress.ip_address(d)
    except ValueError as exc:
        raise BadPacket("control-field") from exc
    if not 576 <= msg["mtu"] <= 65535 or not 0 <= msg.get("keepalive", 0) <= KEEPALIVE_MAX:
        raise BadPacket("control-field")


def _unique_keys(pairs) -> dict:
    """A msgpack map with a key given twice is malformed (SPEC §6.2.1: receivers SHOULD drop it)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate map key")
    return out


def decode_untrusted(plaintext: bytes) -> dict:
    """A validated control message (a dict with a known "type"), or BadPacket."""
    if len(plaintext) < 2:
        raise BadPacket("control-length")
    (n,) = _LEN.unpack_from(plaintext)
    if n > CONTROL_MAX_LEN or n + 2 > len(plaintext):
        raise BadPacket("control-length")
    try:
        msg = msgpack.unpackb(bytes(plaintext[2:2 + n]), raw=False, strict_map_key=True,
                              max_str_len=MAX_STR, max_bin_len=MAX_STR, max_array_len=CONTROL_MAX_ITEMS,
                              max_map_len=CONTROL_MAX_ITEMS, max_ext_len=0, object_pairs_hook=_unique_keys)
    except Exception as exc:  # msgpack raises many types on malformed input (and _unique_keys ValueError)
        raise BadPacket("control-msgpack") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise BadPacket("control-type")
    schema = SCHEMA.get(msg["type"])
    if schema is None:
        raise BadPacket("control-type")
    for name, (want, required) in schema.items():
        if name in msg:
            _check_field(name, msg[name], want)
        elif required:
            raise BadPacket("control-field")
    if msg.get("version", CONTROL_VERSION) != CONTROL_VERSION:
        raise BadPacket("control-version")
    if msg["type"] == "config":
        _check_config(msg)
    return msg
