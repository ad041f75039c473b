"""Key generation and display shared by `vpnd` and `vpnclient` (genkey, pubkey)."""

from __future__ import annotations

import sys

from nacl.bindings import crypto_scalarmult_base
from nacl.utils import random

from .cli import UserError
from .configfile import encode_key, parse_key


def genkey() -> str:
    """A new X25519 private key, clamped as RFC 7748 does, in base64."""
    k = bytearray(random(32))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return encode_key(bytes(k))


def pubkey_from_stdin() -> str:
    stream = getattr(sys.stdin, "buffer", None)
    try:
        text = stream.read().decode("ascii") if stream is not None else sys.stdin.read()
    except UnicodeDecodeError:
        raise UserError("standard input holds binary data; pipe in the base64 key that 'genkey' prints") from None
    if not text.strip():
        raise UserError("pubkey reads a private key on standard input, e.g. 'vpnd genkey | vpnd pubkey'")
    return encode_key(crypto_scalarmult_base(parse_key(text, "the private key on standard input")))
