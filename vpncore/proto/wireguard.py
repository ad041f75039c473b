"""The WireGuard protocol, exactly, as a sans-IO module (issue 15, part 1).

Sources of the facts used here (no code was copied):
  [WP]  J. A. Donenfeld, "WireGuard: Next Generation Kernel Network Tunnel", §5 (whitepaper)
  [PP]  https://www.wireguard.com/protocol/ (the protocol page)
  [WGO] wireguard-go, commit f333402b: device/constants.go (timers, limits), tai64n/tai64n.go
        (base and the 2^24 ns whitener), replay/replay.go (window of 127 * 64 = 8128 counters),
        device/send.go (padding capped at the MTU), device/cookie.go (CookieRefreshTime)
  DESIGN §10 "WireGuard compatibility facts".

The Noise layer is shared with our own protocol: vpncore.proto.noise.IKHandshake with the WireGuard
construction as protocol name, the WireGuard identifier as prologue and a 32-byte zero PSK when none
is configured [PP]. WireGuard's KDF_n is Noise's HKDF over HMAC-BLAKE2s, its AEAD is
ChaCha20-Poly1305 with the nonce 4 zero bytes || 64-bit little-endian counter -- Noise's layout too
[WP §5.4], so noise.py is used unchanged.

Our protocol's handshake messages have WireGuard's layouts, so much more is shared: the sizes and
message types (constants.py), the initiation/response/cookie-reply tuples, packers and parsers
(wire.py), the MAC primitives and the cookie's source bytes (cookie.py), the replay window
(replay.py, sized here as wireguard-go's), TAI64N (timestamp.py) and the IP length (keypair.py).
What stays here is what WireGuard does differently: its identifier and timers, the transport header
(ours carries a payload kind and fragment numbers in the reserved bytes), and the cookie state
machines (wireguard-go's single 120 s CookieRefreshTime both for the secret and for a cookie held).

    initiation (148) type 1 | 3x0 | sender u32 | ephemeral 32 | static 32+16 | timestamp 12+16 | mac1 | mac2
    response    (92) type 2 | 3x0 | sender u32 | receiver u32 | ephemeral 32 | empty 0+16 | mac1 | mac2
    cookie      (64) type 3 | 3x0 | receiver u32 | nonce 24 | cookie 16+16
    transport  (32+) type 4 | 3x0 | receiver u32 | counter u64 | AEAD(packet || zero padding to 16)

Everything here is sans-IO: no sockets, no clocks; `now` is always the caller's UNIX time in
seconds (wall time: it also makes the TAI64N timestamp). Every failure on remote input is BadPacket.
"""

from __future__ import annotations

import hmac
from typing import Callable, Mapping, NamedTuple

from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
from nacl.utils import random as _random

from . import cookie as _cookie
from .constants import (
    COOKIE_NONCE_LEN, COOKIE_REPLY_LEN, INITIATION_LEN, LABEL_COOKIE, LABEL_MAC1, MAC_LEN,
    MSG_COOKIE_REPLY, MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT, PADDING_MULTIPLE,
    REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, RESPONSE_LEN,
    TIMESTAMP_LEN, TRANSPORT_HEADER_LEN, TRANSPORT_MIN_LEN,
)
from .cookie import ZERO_MAC, cookie_key, mac, mac1_key, xaead_encrypt
from .errors import BadPacket
from .handshake import ZERO_PSK
from .keypair import ip_packet_length as _ip_packet_length
from .noise import IKHandshake, aead_decrypt, aead_encrypt, public_key
from .replay import ReplayWindow as _ReplayWindow
from .timestamp import tai64n
from .wire import (
    TRANSPORT_HEADER, CookieReply, Initiation, Response,
    pack_cookie_reply, pack_initiation, pack_response, unpack_cookie_reply_untrusted,
    unpack_initiation_untrusted, unpack_response_untrusted,
)

__all__ = [
    "CONSTRUCTION", "IDENTIFIER", "LABEL_MAC1", "LABEL_COOKIE",
    "MSG_INITIATION", "MSG_RESPONSE", "MSG_COOKIE_REPLY", "MSG_TRANSPORT",
    "INITIATION_LEN", "RESPONSE_LEN", "COOKIE_REPLY_LEN", "TRANSPORT_MIN_LEN", "REJECT_AFTER_MESSAGES",
    "Initiation", "Response", "CookieReply", "TransportHeader",
    "pack_initiation", "pack_response", "pack_cookie_reply", "pack_transport",
    "parse_initiation", "parse_response", "parse_cookie_reply", "parse_transport", "parse",
    "tai64n", "mac", "mac1_key", "cookie_key", "source_bytes",
    "CookieChecker", "CookieGenerator", "CookieRequired", "ReplayWindow", "Session", "KeyExhausted",
    "Initiator", "Responder", "ConsumedInitiation", "ip_packet_length",
]

# -- WireGuard's own constants [PP], [WGO device/constants.go] ------------------------------------

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"   # fixed by WireGuard (ours is the same today)
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"

REKEY_ATTEMPT_TIME = 90
KEEPALIVE_TIMEOUT = 10                   # ours: 2
COOKIE_REFRESH_TIME = 120                # the secret's lifetime and a held cookie's (ours: 120 and 115)
HANDSHAKE_INITIATION_RATE = 1 / 50       # an initiation per peer at most every 20 ms [WGO]
REPLAY_WINDOW = 8128                     # [WGO replay/replay.go]; the kernel keeps 8192 - 64; ours 8192

# -- message layouts: wire.py's, but for the transport header -------------------------------------


class TransportHeader(NamedTuple):
    receiver: int
    counter: int


def _bytes(data) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadPacket("type")
    return bytes(data)


def parse_initiation(data) -> Initiation:
    return unpack_initiation_untrusted(_bytes(data))


def parse_response(data) -> Response:
    return unpack_response_untrusted(_bytes(data))


def parse_cookie_reply(data) -> CookieReply:
    return unpack_cookie_reply_untrusted(_bytes(data))


def pack_transport(receiver: int, counter: int, encrypted: bytes) -> bytes:
    return TRANSPORT_HEADER.pack(MSG_TRANSPORT, 0, 0, receiver, counter) + encrypted


def parse_transport(data) -> tuple[TransportHeader, bytes]:
    """(header, encrypted packet with its tag); the smallest is a keepalive of 32 bytes.

    Not wire.unpack_transport_header_untrusted: in WireGuard the 3 bytes after the type are reserved
    and zero (ours carry a payload kind and, for super-packet fragments, fragment numbers)."""
    data = _bytes(data)
    if len(data) < TRANSPORT_MIN_LEN:
        raise BadPacket("length")
    msg_type, kind, reserved, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
    if msg_type != MSG_TRANSPORT or kind or reserved:
        raise BadPacket("header")   # wrong type, or a reserved byte that is not zero
    return TransportHeader(receiver, counter), data[TRANSPORT_HEADER_LEN:]


def parse(data):
    """Any of the four messages by its type byte (a transport message gives (header, encrypted))."""
    data = _bytes(data)
    if not data:
        raise BadPacket("length")
    parser = {MSG_INITIATION: parse_initiation, MSG_RESPONSE: parse_response,
              MSG_COOKIE_REPLY: parse_cookie_reply, MSG_TRANSPORT: parse_transport}.get(data[0])
    if parser is None:
        raise BadPacket("type")
    return parser(data)


# -- mac1, mac2, cookies [WP §5.4.4, §5.4.7], [PP]: cookie.py's primitives ------------------------

def source_bytes(src) -> bytes:
    """The cookie's input for a source: bytes as given, or (host, port) packed as IP || port (BE)."""
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    return _cookie.source_bytes((str(src[0]), src[1]))


class CookieRequired(BadPacket):
    """The responder is under load and the initiation lacked a valid mac2: drop it, send `reply`."""

    __slots__ = ("reply",)

    def __init__(self, reply: bytes):
        super().__init__("cookie-required")
        self.reply = reply


class CookieChecker:
    """The receiver of initiations (or responses) addressed to `public`: mac1, mac2, cookie replies.

    Not cookie.CookieChecker: the secret is drawn on first use and replaced only once it is more
    than COOKIE_REFRESH_TIME old [WGO]; sources may be given as bytes."""

    def __init__(self, public: bytes, rng: Callable[[int], bytes] = _random):
        self._mac1_key = mac1_key(public)
        self._cookie_key = cookie_key(public)
        self._rng = rng
        self._secret = b""
        self._secret_born: float | None = None

    def mac1_ok(self, msg: bytes) -> bool:
        at = len(msg) - 2 * MAC_LEN
        return at > 0 and hmac.compare_digest(mac(self._mac1_key, msg[:at]), msg[at:at + MAC_LEN])

    def cookie(self, src, now: float) -> bytes:
        """MAC(R_m, A_m): R_m random, replaced every COOKIE_REFRESH_TIME [WP §5.4.7]."""
        if self._secret_born is None or now - self._secret_born > COOKIE_REFRESH_TIME:
            self._secret, self._secret_born = self._rng(32), now
        return mac(self._secret, source_bytes(src))

    def mac2_ok(self, msg: bytes, src, now: float) -> bool:
        at = len(msg) - MAC_LEN
        return at > 0 and hmac.compare_digest(mac(self.cookie(src, now), msg[:at]), msg[at:])

    def make_reply(self, msg: bytes, receiver: int, src, now: float) -> bytes:
        """A cookie reply to `msg` (whose sender index is `receiver`), sealed with its mac1 as AD."""
        at = len(msg) - 2 * MAC_LEN
        nonce = self._rng(COOKIE_NONCE_LEN)
        sealed = xaead_encrypt(self._cookie_key, nonce, msg[at:at + MAC_LEN], self.cookie(src, now))
        return pack_cookie_reply(receiver, nonce, sealed)


class CookieGenerator:
    """The sender of messages to `remote_public`: adds mac1, and mac2 while a cookie is fresh.

    Not cookie.CookieGenerator: a cookie is used for COOKIE_REFRESH_TIME (ours: 115 s), `add_macs`
    takes the whole message (mac fields included) and `consume_reply` a parsed reply."""

    def __init__(self, remote_public: bytes):
        self._mac1_key = mac1_key(remote_public)
        self._cookie_key = cookie_key(remote_public)
        self.cookie: bytes | None = None
        self.cookie_at = 0.0
        self.last_mac1: bytes | None = None

    def add_macs(self, msg: bytes, now: float) -> bytes:
        """`msg` with its last 32 bytes (the mac fields) replaced by mac1 and mac2."""
        body = msg[:-2 * MAC_LEN]
        m1 = mac(self._mac1_key, body)
        self.last_mac1 = m1
        if self.cookie is not None and now - self.cookie_at < COOKIE_REFRESH_TIME:
            m2 = mac(self.cookie, body + m1)
        else:
            m2 = ZERO_MAC
        return body + m1 + m2

    def consume_reply(self, reply: CookieReply, now: float) -> None:
        if self.last_mac1 is None:
            raise BadPacket("cookie-unexpected")
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                reply.encrypted_cookie, self.last_mac1, reply.nonce, self._cookie_key)
        except Exception as exc:     # CryptoError, ValueError, TypeError from the binding
            raise BadPacket("cookie-aead") from exc
        self.cookie, self.cookie_at = cookie, now


# -- replay window: replay.py's, sized as wireguard-go's ------------------------------------------

class ReplayWindow(_ReplayWindow):
    """Sliding window over received counters; `size` counters below the highest are remembered.

    `check` changes nothing (done before the tag is verified); `update` only after it verified.
    """

    __slots__ = ()

    def __init__(self, size: int = REPLAY_WINDOW):
        super().__init__(size)


# -- transport sessions [WP §5.4.6] ---------------------------------------------------------------

class KeyExhausted(Exception):
    """A local send refused: the keypair is too old, has sent REJECT_AFTER_MESSAGES, or is unconfirmed."""


def ip_packet_length(packet: bytes) -> int:
    """The length an IPv4/IPv6 header claims; BadPacket if it is no IP packet or claims too much."""
    n = _ip_packet_length(packet)
    if n <= 0:
        raise BadPacket("ip")
    return n


class Session:
    """One keypair: send and receive keys, both indexes, the send counter and the replay window.

    The responder's keypair is not `confirmed` until a first transport message from the initiator
    decrypted under it [WP §5.4.6]; before that `encrypt` refuses to send.
    """

    def __init__(self, send_key: bytes, recv_key: bytes, local_index: int, remote_index: int,
                 created: float, *, initiator: bool, replay_window: int = REPLAY_WINDOW):
        self.send_key, self.recv_key = bytes(send_key), bytes(recv_key)
        self.local_index, self.remote_index = local_index, remote_index
        self.created = created
        self.initiator = initiator
        self.confirmed = initiator
        self.send_counter = 0
        self.replay = ReplayWindow(replay_window)

    def __repr__(self) -> str:
        return f"<wireguard.Session local={self.local_index:08x} remote={self.remote_index:08x}>"

    def __reduce__(self):
        raise TypeError("keys are memory-only")

    def expired(self, now: float) -> bool:
        return now - self.created >= REJECT_AFTER_TIME

    def needs_rekey(self, now: float) -> bool:
        """The initiator's rule to start a new handshake on sending [WP §6.2]."""
        return self.send_counter >= REKEY_AFTER_MESSAGES or (
            self.initiator and now - self.created >= REKEY_AFTER_TIME)

    def encrypt(self, packet: bytes, now: float, mtu: int | None = None) -> bytes:
        """A type-4 datagram carrying `packet` (b"" = keepalive), zero-padded to 16 (not past mtu)."""
        if not self.confirmed:
            raise KeyExhausted("unconfirmed")
        if self.send_counter >= REJECT_AFTER_MESSAGES:
            raise KeyExhausted("messages")
        if self.expired(now):
            raise KeyExhausted("time")
        n = len(packet)
        padded = -(-n // PADDING_MULTIPLE) * PADDING_MULTIPLE
        if mtu is not None and n <= mtu:
            padded = min(padded, mtu)
        counter = self.send_counter
        self.send_counter += 1
        sealed = aead_encrypt(self.send_key, counter, b"", bytes(packet) + bytes(padded - n))
        return pack_transport(self.remote_index, counter, sealed)

    def decrypt_padded(self, datagram, now: float) -> bytes:
        """The plaintext of a type-4 datagram for this keypair, padding included; BadPacket if not."""
        header, sealed = parse_transport(datagram)
        if header.receiver != self.local_index:
            raise BadPacket("index")
        if self.expired(now):
            raise BadPacket("expired")
        if not self.replay.check(header.counter):
            raise BadPacket("replay")
        plain = aead_decrypt(self.recv_key, header.counter, b"", sealed)
        if not self.replay.update(header.counter):
            raise BadPacket("replay")
        self.confirmed = True
        return plain

    def decrypt(self, datagram, now: float) -> bytes:
        """The IP packet of a type-4 datagram without its padding (b"" for a keepalive)."""
        plain = self.decrypt_padded(datagram, now)
        if not plain:
            return b""
        return plain[:ip_packet_length(plain)]


# -- the handshake [WP §5.4.2, §5.4.3], [PP] ------------------------------------------------------

def _noise(initiator: bool, static_private: bytes, ephemeral: bytes, remote_static: bytes | None,
           psk: bytes | None) -> IKHandshake:
    return IKHandshake(initiator=initiator, static_private=static_private, ephemeral_private=ephemeral,
                       remote_static=remote_static, prologue=IDENTIFIER, psk=psk or ZERO_PSK,
                       protocol_name=CONSTRUCTION)


def _index(rng: Callable[[int], bytes]) -> int:
    return int.from_bytes(rng(4), "little")


class Initiator:
    """Our side of handshakes we start towards one peer (the responder's public key)."""

    def __init__(self, static_private: bytes, responder_public: bytes, psk: bytes | None = None,
                 rng: Callable[[int], bytes] = _random):
        self.static_private = bytes(static_private)
        self.public = public_key(self.static_private)
        self.responder_public = bytes(responder_public)
        self.psk = psk
        self.rng = rng
        self.macs = CookieGenerator(self.responder_public)
        self.checker = CookieChecker(self.public, rng)    # mac1 of responses is keyed on our key
        self._pending: IKHandshake | None = None
        self.index: int | None = None
        self.sent_at: float | None = None

    def create_initiation(self, now: float) -> bytes:
        """A fresh initiation (new ephemeral, new index); replaces any pending one."""
        if self._pending is not None:
            self._pending.wipe()
        noise = _noise(True, self.static_private, self.rng(32), self.responder_public, self.psk)
        body = noise.write_message_1(tai64n(now))
        self.index = _index(self.rng)
        self._pending, self.sent_at = noise, now
        msg = pack_initiation(self.index, body)                 # ephemeral, static, timestamp
        return self.macs.add_macs(msg, now)

    def consume_cookie_reply(self, datagram, now: float) -> None:
        """Store the cookie of a reply to our last initiation (used for mac2 by the next one)."""
        reply = parse_cookie_reply(datagram)
        if self._pending is None or reply.receiver != self.index:
            raise BadPacket("cookie-index")
        self.macs.consume_reply(reply, now)

    def consume_response(self, datagram, now: float) -> Session:
        """The keypair of a valid response to our pending initiation; BadPacket otherwise."""
        datagram = _bytes(datagram)
        resp = parse_response(datagram)
        if self._pending is None or resp.receiver != self.index:
            raise BadPacket("index")
        if not self.checker.mac1_ok(datagram):
            raise BadPacket("mac1")
        if self.sent_at is not None and now - self.sent_at > REKEY_ATTEMPT_TIME:
            raise BadPacket("stale")
        noise = self._pending
        noise.read_message_2(resp.ephemeral + resp.encrypted_nothing)
        k_send, k_recv = noise.split()
        self._pending = None
        return Session(k_send, k_recv, self.index, resp.sender, now, initiator=True)


class ConsumedInitiation:
    """A verified initiation: the peer, its timestamp, its index, and the Noise state to answer."""

    __slots__ = ("noise", "peer_static", "timestamp", "sender")

    def __init__(self, noise: IKHandshake, peer_static: bytes, timestamp: bytes, sender: int):
        self.noise, self.peer_static, self.timestamp, self.sender = noise, peer_static, timestamp, sender

    def __reduce__(self):
        raise TypeError("handshake state is memory-only")


class _PeerState:
    __slots__ = ("psk", "last_timestamp", "last_consumed", "macs")

    def __init__(self, public: bytes, psk: bytes | None):
        self.psk = psk
        self.last_timestamp = bytes(TIMESTAMP_LEN)
        self.last_consumed: float | None = None
        self.macs = CookieGenerator(public)


class Responder:
    """Our side of handshakes peers start: `peers` maps each allowed public key to its PSK (or None)."""

    def __init__(self, static_private: bytes, peers: Mapping[bytes, bytes | None],
                 rng: Callable[[int], bytes] = _random):
        self.static_private = bytes(static_private)
        self.public = public_key(self.static_private)
        self.rng = rng
        self.checker = CookieChecker(self.public, rng)
        self.peers = {bytes(k): _PeerState(bytes(k), v) for k, v in peers.items()}
        self._responses: dict[int, bytes] = {}      # our response index -> the peer it went to

    def add_peer(self, public: bytes, psk: bytes | None = None) -> None:
        self.peers[bytes(public)] = _PeerState(bytes(public), psk)

    def consume_initiation(self, datagram, now: float, src=None, under_load: bool = False) -> ConsumedInitiation:
        """Check macs, decrypt, identify the peer and apply the timestamp and flood rules.

        Under load a valid mac2 (cookie of `src`) is required: CookieRequired carries the reply.
        """
        datagram = _bytes(datagram)
        init = parse_initiation(datagram)
        if not self.checker.mac1_ok(datagram):
            raise BadPacket("mac1")
        if under_load:
            if src is None:
                raise ValueError("under load, the source address is needed for the cookie")
            if not self.checker.mac2_ok(datagram, src, now):
                raise CookieRequired(self.checker.make_reply(datagram, init.sender, src, now))
        noise = _noise(False, self.static_private, self.rng(32), None, None)
        timestamp = noise.read_message_1(init.ephemeral + init.encrypted_static + init.encrypted_timestamp)
        peer_static = bytes(noise.rs)
        peer = self.peers.get(peer_static)
        if peer is None:
            noise.wipe()
            raise BadPacket("unknown-peer")
        # replay and flood of initiations [WP §5.1], [WGO device/noise-protocol.go]
        if timestamp <= peer.last_timestamp:
            noise.wipe()
            raise BadPacket("timestamp-replay")
        if peer.last_consumed is not None and 0 <= now - peer.last_consumed <= HANDSHAKE_INITIATION_RATE:
            noise.wipe()
            raise BadPacket("flood")
        peer.last_timestamp, peer.last_consumed = timestamp, now
        noise.psk = peer.psk or ZERO_PSK
        return ConsumedInitiation(noise, peer_static, timestamp, init.sender)

    def create_response(self, consumed: ConsumedInitiation, now: float) -> tuple[bytes, Session]:
        """The response and the (unconfirmed) keypair of a consumed initiation."""
        noise = consumed.noise
        body = noise.write_message_2(b"")
        index = _index(self.rng)
        k_initiator, k_responder = noise.split()
        peer = self.peers[consumed.peer_static]
        msg = peer.macs.add_macs(pack_response(index, consumed.sender, body), now)
        self._responses[index] = consumed.peer_static
        if len(self._responses) > 1024:                     # keep only recent responses' indexes
            self._responses.pop(next(iter(self._responses)))
        return msg, Session(k_responder, k_initiator, index, consumed.sender, now, initiator=False)

    def consume_cookie_reply(self, datagram, now: float) -> None:
        """A cookie reply from a peer under load, to one of our responses."""
        reply = parse_cookie_reply(datagram)
        peer_static = self._responses.get(reply.receiver)
        if peer_static is None:
            raise BadPacket("cookie-index")
        self.peers[peer_static].macs.consume_reply(reply, now)
