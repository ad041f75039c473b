"""Datagram layouts: pack and untrusted unpack of every message (SPEC §3).

Every `unpack_*_untrusted` takes arbitrary bytes and returns a message or
raises BadPacket; it never raises anything else.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .constants import (
    COOKIE_REPLY_LEN, INITIATION_LEN, MAC_LEN, MSG_COOKIE_REPLY, MSG_INITIATION, MSG_RESPONSE,
    MSG_TRANSPORT, RESPONSE_LEN, TRANSPORT_HEADER_LEN, TRANSPORT_MIN_LEN, KIND_SUPER,
)
from .errors import BadPacket

# type u8, reserved 3 bytes, sender index u32 LE, then the Noise message
INITIATION = struct.Struct("<B3xI32s48s28s16s16s")
RESPONSE = struct.Struct("<B3xII32s16s16s16s")
COOKIE_REPLY = struct.Struct("<B3xI24s32s")
# type u8, kind u8, reserved u16, receiver index u32 LE, counter u64 LE
TRANSPORT_HEADER = struct.Struct("<BBHIQ")

INITIATION_MAC1_AT = INITIATION_LEN - 2 * MAC_LEN
RESPONSE_MAC1_AT = RESPONSE_LEN - 2 * MAC_LEN


class Initiation(NamedTuple):
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes


class Response(NamedTuple):
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes


class CookieReply(NamedTuple):
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes


def message_type(datagram: bytes) -> int:
    """The type byte, or 0 for an empty datagram."""
    return datagram[0] if datagram else 0


def _check(datagram: bytes, msg_type: int, length: int) -> None:
    if len(datagram) != length:
        raise BadPacket("length")
    if datagram[0] != msg_type or datagram[1:4] != b"\0\0\0":
        raise BadPacket("header")


def pack_initiation(sender: int, noise_msg: bytes, mac1: bytes = bytes(16), mac2: bytes = bytes(16)) -> bytes:
    return struct.pack("<B3xI", MSG_INITIATION, sender) + noise_msg + mac1 + mac2


def check_initiation_untrusted(datagram: bytes) -> None:
    """Length, type and reserved bytes of an initiation (BadPacket if wrong), without unpacking."""
    _check(datagram, MSG_INITIATION, INITIATION_LEN)


def unpack_initiation_untrusted(datagram: bytes) -> Initiation:
    _check(datagram, MSG_INITIATION, INITIATION_LEN)
    return Initiation(*INITIATION.unpack(datagram)[1:])


def pack_response(sender: int, receiver: int, noise_msg: bytes, mac1: bytes = bytes(16), mac2: bytes = bytes(16)) -> bytes:
    return struct.pack("<B3xII", MSG_RESPONSE, sender, receiver) + noise_msg + mac1 + mac2


def unpack_response_untrusted(datagram: bytes) -> Response:
    _check(datagram, MSG_RESPONSE, RESPONSE_LEN)
    return Response(*RESPONSE.unpack(datagram)[1:])


def pack_cookie_reply(receiver: int, nonce: bytes, encrypted_cookie: bytes) -> bytes:
    return COOKIE_REPLY.pack(MSG_COOKIE_REPLY, receiver, nonce, encrypted_cookie)


def unpack_cookie_reply_untrusted(datagram: bytes) -> CookieReply:
    _check(datagram, MSG_COOKIE_REPLY, COOKIE_REPLY_LEN)
    return CookieReply(*COOKIE_REPLY.unpack(datagram)[1:])


def unpack_transport_header_untrusted(datagram: bytes) -> tuple[int, int, int]:
    """(kind, receiver index, counter) of a transport message."""
    if len(datagram) <= TRANSPORT_HEADER_LEN:
        raise BadPacket("length")
    t, kind, reserved, receiver, counter = TRANSPORT_HEADER.unpack_from(datagram)
    if t != MSG_TRANSPORT:
        raise BadPacket("header")
    # kind 2 (super-packet fragment, §5.5) uses the reserved bytes for frag_no and frag_count,
    # and its last fragment may be shorter than a tag
    if kind != KIND_SUPER and (reserved or len(datagram) < TRANSPORT_MIN_LEN):
        raise BadPacket("header" if reserved else "length")
    return kind, receiver, counter
