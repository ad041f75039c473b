"""The Noise layer: CipherState, SymmetricState and the IK / IKpsk2 handshake (SPEC §4.1).

A plain transcription of the Noise Protocol Framework (revision 34) for the one
pattern family we use, with X25519 and ChaCha20-Poly1305 from PyNaCl and BLAKE2s
or BLAKE2b from hashlib. The cacophony test vectors exercise this module as is.

    IK:                     IKpsk2:
      <- s                    <- s
      ...                     ...
      -> e, es, s, ss         -> e, es, s, ss
      <- e, ee, se            <- e, ee, se, psk

Every failure on remote input becomes BadPacket (PyNaCl raises RuntimeError on a
low-order point, ValueError on bad lengths, CryptoError on a bad tag).
"""

from __future__ import annotations

import hashlib
import hmac

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

from .errors import BadPacket

DHLEN = 32
_NONCE_PAD = bytes(4)
_HASHES = {"BLAKE2s": (hashlib.blake2s, 32, "blake2s"), "BLAKE2b": (hashlib.blake2b, 64, "blake2b")}


def dh(private: bytes, public: bytes) -> bytes:
    """X25519; a low-order or malformed public key is a BadPacket, never a RuntimeError."""
    if not isinstance(private, (bytes, bytearray)) or not isinstance(public, (bytes, bytearray)) \
            or len(private) != DHLEN or len(public) != DHLEN:
        raise BadPacket("dh")
    try:
        out = crypto_scalarmult(bytes(private), bytes(public))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BadPacket("dh") from exc
    if out == bytes(32):
        raise BadPacket("dh")
    return out


def public_key(private: bytes) -> bytes:
    return crypto_scalarmult_base(bytes(private))


def aead_encrypt(key: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _NONCE_PAD + n.to_bytes(8, "little"), bytes(key))


def aead_decrypt(key: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _NONCE_PAD + n.to_bytes(8, "little"), bytes(key))
    except (CryptoError, ValueError, TypeError, RuntimeError) as exc:
        raise BadPacket("aead") from exc


class Hash:
    """HASH, HMAC and HKDF for one of the BLAKE2 functions (Noise §4.3, §5.2)."""

    def __init__(self, name: str = "BLAKE2s"):
        self.name = name
        self._ctor, self.hashlen, self._hmac_name = _HASHES[name]

    def hash(self, data: bytes) -> bytes:
        return self._ctor(data).digest()

    def hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(bytes(key), data, self._hmac_name)

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
        temp = self.hmac(chaining_key, ikm)
        out, prev = [], b""
        for i in range(1, outputs + 1):
            prev = self.hmac(temp, prev + bytes([i]))
            out.append(prev)
        return out


class CipherState:
    """k and n (Noise §5.1). Keys longer than 32 bytes (BLAKE2b) are truncated by the caller."""

    __slots__ = ("k", "n")

    def __init__(self, k: bytes | None = None):
        self.k = bytearray(k) if k is not None else None
        self.n = 0

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.k is None:
            return plaintext
        ct = aead_encrypt(self.k, self.n, ad, plaintext)
        self.n += 1
        return ct

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self.k is None:
            return ciphertext
        pt = aead_decrypt(self.k, self.n, ad, ciphertext)
        self.n += 1
        return pt

    def wipe(self) -> None:
        if self.k is not None:
            self.k[:] = bytes(len(self.k))
        self.k = None


class SymmetricState:
    """ck, h and a CipherState (Noise §5.2)."""

    def __init__(self, protocol_name: bytes, hash_name: str = "BLAKE2s"):
        self.H = Hash(hash_name)
        if len(protocol_name) <= self.H.hashlen:
            self.h = protocol_name.ljust(self.H.hashlen, b"\0")
        else:
            self.h = self.H.hash(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def _key(self, temp_k: bytes) -> None:
        self.cipher = CipherState(temp_k[:32])

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = self.H.hkdf(self.ck, ikm, 2)
        self._key(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = self.H.hash(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = self.H.hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self._key(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = self.H.hkdf(self.ck, b"", 2)
        return k1[:32], k2[:32]


class IKHandshake:
    """One side of a Noise IK or IKpsk2 handshake, with explicit ephemeral keys.

    `ephemeral` is the caller's randomness (32 bytes); the protocol layer passes
    fresh random bytes, tests pass the vectors' fixed keys.
    """

    def __init__(self, *, initiator: bool, static_private: bytes, ephemeral_private: bytes,
                 remote_static: bytes | None = None, prologue: bytes = b"", psk: bytes | None = None,
                 hash_name: str = "BLAKE2s", protocol_name: bytes | None = None):
        self.initiator = initiator
        self.psk = psk
        if protocol_name is None:
            pattern = "IKpsk2" if psk is not None else "IK"
            protocol_name = f"Noise_{pattern}_25519_ChaChaPoly_{hash_name}".encode()
        self.ss = SymmetricState(protocol_name, hash_name)
        self.s = bytearray(static_private)
        self.s_pub = public_key(self.s)
        self.e = bytearray(ephemeral_private)
        self.e_pub = public_key(self.e)
        self.rs = remote_static
        self.re: bytes | None = None
        self.ss.mix_hash(prologue)
        # pre-message "<- s": both sides hash the responder's static key
        self.ss.mix_hash(self.rs if initiator else self.s_pub)

    def _token_e_out(self) -> bytes:
        # h = HASH(h || e.pub); in PSK handshakes also MixKey(e.pub)
        self.ss.mix_hash(self.e_pub)
        if self.psk is not None:
            self.ss.mix_key(self.e_pub)
        return self.e_pub

    def _token_e_in(self, re: bytes) -> None:
        self.re = bytes(re)
        self.ss.mix_hash(self.re)
        if self.psk is not None:
            self.ss.mix_key(self.re)

    # -> e, es, s, ss
    def write_message_1(self, payload: bytes) -> bytes:
        out = self._token_e_out()
        self.ss.mix_key(dh(self.e, self.rs))                   # es
        out += self.ss.encrypt_and_hash(self.s_pub)             # s
        self.ss.mix_key(dh(self.s, self.rs))                    # ss
        return out + self.ss.encrypt_and_hash(payload)

    def read_message_1(self, message: bytes) -> bytes:
        if len(message) < DHLEN + 48:
            raise BadPacket("short")
        self._token_e_in(message[:DHLEN])
        self.ss.mix_key(dh(self.s, self.re))                    # es
        rs = self.ss.decrypt_and_hash(message[DHLEN:DHLEN + 48])  # s
        self.rs = rs
        self.ss.mix_key(dh(self.s, self.rs))                    # ss
        return self.ss.decrypt_and_hash(message[DHLEN + 48:])

    # <- e, ee, se [, psk]
    def write_message_2(self, payload: bytes) -> bytes:
        out = self._token_e_out()
        self.ss.mix_key(dh(self.e, self.re))                    # ee
        self.ss.mix_key(dh(self.e, self.rs))                    # se
        if self.psk is not None:
            self.ss.mix_key_and_hash(self.psk)                  # psk
        return out + self.ss.encrypt_and_hash(payload)

    def read_message_2(self, message: bytes) -> bytes:
        """Read the response; on failure the state is as before, so a forged response cannot
        spoil the handshake for the genuine one that follows."""
        if len(message) < DHLEN + 16:
            raise BadPacket("short")
        ss = self.ss
        saved = (ss.ck, ss.h, ss.cipher, self.re)
        try:
            return self._read_message_2(message)
        except BadPacket:
            ss.ck, ss.h, ss.cipher, self.re = saved
            raise

    def _read_message_2(self, message: bytes) -> bytes:
        self._token_e_in(message[:DHLEN])
        self.ss.mix_key(dh(self.e, self.re))                    # ee
        self.ss.mix_key(dh(self.s, self.re))                    # se
        if self.psk is not None:
            self.ss.mix_key_and_hash(self.psk)                  # psk
        return self.ss.decrypt_and_hash(message[DHLEN:])

    def split(self) -> tuple[bytes, bytes]:
        """(initiator->responder key, responder->initiator key); wipes the ephemeral."""
        keys = self.ss.split()
        self.wipe()
        return keys

    def wipe(self) -> None:
        self.e[:] = bytes(len(self.e))
        self.s[:] = bytes(len(self.s))
        self.ss.cipher.wipe()
