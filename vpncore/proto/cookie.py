"""mac1, mac2 and the cookie reply: cheap rejection and load shedding (SPEC §4.5).

mac1 = MAC(HASH(LABEL_MAC1 || S_pub of the receiver), msg[:mac1 offset])
cookie = MAC(secret, source), secret random and replaced every COOKIE_SECRET_LIFETIME
mac2 = MAC(cookie, msg[:mac2 offset]) when a fresh cookie is held, else 16 zero bytes
The cookie travels in a cookie reply encrypted with XChaCha20-Poly1305 under
HASH(LABEL_COOKIE || S_pub of the cookie's sender), with the mac1 it answers as AD.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
from typing import Callable

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)

from .constants import (
    COOKIE_LIFETIME, COOKIE_NONCE_LEN, COOKIE_SECRET_LIFETIME, LABEL_COOKIE, LABEL_MAC1, MAC_LEN,
)
from .errors import BadPacket
from .wire import pack_cookie_reply, unpack_cookie_reply_untrusted

ZERO_MAC = bytes(MAC_LEN)


def _hash(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=bytes(key), digest_size=MAC_LEN).digest()


def mac1_key(public: bytes) -> bytes:
    return _hash(LABEL_MAC1 + public)


def cookie_key(public: bytes) -> bytes:
    return _hash(LABEL_COOKIE + public)


def source_bytes(src: tuple) -> bytes:
    """The cookie's input: the packed IP address then the port, big-endian.

    inet_pton rather than ipaddress: this runs for every initiation of a flood (1.7 us vs 0.1 us)."""
    host = src[0].partition("%")[0]          # an IPv6 scope (fe80::1%eth0) is not part of the address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.inet_pton(family, host) + int(src[1]).to_bytes(2, "big")
    except (OSError, ValueError) as exc:
        raise ValueError(f"not an IP address: {host!r}") from exc


def _xaead_encrypt_binding(key: bytes, nonce: bytes, ad: bytes, plain: bytes) -> bytes:
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plain, ad, nonce, key)


try:
    # The same libsodium function without PyNaCl's argument checks (2.9 us -> 0.7 us per call): the
    # cookie reply is sealed for every initiation of a handshake flood. Our arguments have fixed
    # lengths (a 16-byte cookie and AD, a 24-byte nonce, a 32-byte key). If PyNaCl's private module
    # moves, the public binding above is used.
    from nacl._sodium import ffi as _ffi, lib as _lib

    _xaead_raw = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt

    def xaead_encrypt(key: bytes, nonce: bytes, ad: bytes, plain: bytes) -> bytes:
        if len(key) != 32 or len(nonce) != COOKIE_NONCE_LEN:
            raise ValueError("bad XChaCha20-Poly1305 key or nonce length")
        n = len(plain) + 16
        out = _ffi.new("unsigned char[]", n)
        _xaead_raw(out, _ffi.NULL, plain, len(plain), ad, len(ad), _ffi.NULL, nonce, key)
        return _ffi.buffer(out, n)[:]
except (ImportError, AttributeError):    # pragma: no cover - depends on the PyNaCl build
    xaead_encrypt = _xaead_encrypt_binding


class CookieChecker:
    """Receiver side: checks mac1/mac2 of messages addressed to `public`, issues cookies."""

    def __init__(self, public: bytes, rng: Callable[[int], bytes]):
        self._mac1_key = mac1_key(public)
        # keyed BLAKE2s states, copied per message (saves the key block: these run per flood packet)
        self._mac1_state = hashlib.blake2s(key=self._mac1_key, digest_size=MAC_LEN)
        self._cookie_key = cookie_key(public)
        self._rng = rng
        self._secret = bytearray(rng(32))
        self._secret_state = None
        self._secret_born = None

    def cookie_for(self, src: tuple, now: float) -> bytes:
        """The cookie of source `src` (computed once per initiation, used by mac2_ok and make_reply)."""
        if self._secret_born is None or now - self._secret_born >= COOKIE_SECRET_LIFETIME:
            self._secret[:] = self._rng(32)
            self._secret_born = now
            self._secret_state = hashlib.blake2s(key=bytes(self._secret), digest_size=MAC_LEN)
        h = self._secret_state.copy()
        h.update(source_bytes(src))
        return h.digest()

    def mac1_ok(self, msg: bytes) -> bool:
        at = len(msg) - 2 * MAC_LEN
        h = self._mac1_state.copy()
        h.update(msg[:at])
        return hmac.compare_digest(h.digest(), msg[at:at + MAC_LEN])

    def mac2_ok(self, msg: bytes, src: tuple, now: float, cookie: bytes | None = None) -> bool:
        at = len(msg) - MAC_LEN
        cookie = cookie or self.cookie_for(src, now)
        return hmac.compare_digest(mac(cookie, msg[:at]), msg[at:])

    def make_reply(self, msg: bytes, receiver: int, src: tuple, now: float, cookie: bytes | None = None) -> bytes:
        nonce = self._rng(COOKIE_NONCE_LEN)
        at = len(msg) - 2 * MAC_LEN
        cookie = cookie or self.cookie_for(src, now)
        sealed = xaead_encrypt(self._cookie_key, nonce, msg[at:at + MAC_LEN], cookie)
        return pack_cookie_reply(receiver, nonce, sealed)


class CookieGenerator:
    """Sender side: adds mac1 (and mac2 with a fresh cookie) for messages to `remote_public`."""

    def __init__(self, remote_public: bytes):
        self._mac1_key = mac1_key(remote_public)
        self._cookie_key = cookie_key(remote_public)
        self._cookie: bytes | None = None
        self._cookie_at = 0.0
        self.last_mac1: bytes | None = None

    def add_macs(self, msg_without_macs: bytes, now: float) -> bytes:
        m1 = mac(self._mac1_key, msg_without_macs)
        self.last_mac1 = m1
        if self._cookie is not None and now - self._cookie_at < COOKIE_LIFETIME:
            m2 = mac(self._cookie, msg_without_macs + m1)
        else:
            m2 = ZERO_MAC
        return msg_without_macs + m1 + m2

    def consume_reply(self, datagram: bytes, now: float, expected_receiver: int) -> None:
        """Store the cookie of a reply to our message `expected_receiver`; BadPacket if invalid."""
        reply = unpack_cookie_reply_untrusted(datagram)
        if self.last_mac1 is None:
            raise BadPacket("cookie-unexpected")
        if reply.receiver != expected_receiver:
            raise BadPacket("cookie-index")
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                reply.encrypted_cookie, self.last_mac1, reply.nonce, self._cookie_key)
        except Exception as exc:  # CryptoError, ValueError, TypeError from the binding
            raise BadPacket("cookie-aead") from exc
        self._cookie, self._cookie_at = cookie, now
