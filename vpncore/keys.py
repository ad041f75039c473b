"""Key generation and display shared by `vpnd` and `vpnclient` (genkey, genpsk, pubkey)."""

from __future__ import annotations

import os
import stat
import sys

from nacl.bindings import crypto_scalarmult_base
from nacl.utils import random

from .cli import UserError
from .configfile import encode_key, parse_key
from .log import WARNING, journal_prefix


def genkey() -> str:
    """A new X25519 private key, clamped as RFC 7748 does, in base64."""
    k = bytearray(random(32))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return encode_key(bytes(k))


def genpsk() -> str:
    """A new random 32-byte preshared key in base64, as `wg genpsk` prints."""
    return encode_key(random(32))


def warn_if_stdout_exposed(prog: str) -> None:
    """Before a private key is printed: warn when stdout is a regular file group or others can access
    (as `wg genkey` warns about a world accessible file). The key is printed all the same."""
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        print(f"{journal_prefix(sys.stderr, WARNING)}{prog}: warning: the private key is written to a file others can read; "
              f"run 'umask 077' first or chmod 600 the file", file=sys.stderr, flush=True)


def pubkey_from_stdin() -> str:
    stream = getattr(sys.stdin, "buffer", None)
    try:
        text = stream.read().decode("ascii") if stream is not None else sys.stdin.read()
    except UnicodeDecodeError:
        raise UserError("standard input holds binary data; pipe in the base64 key that 'genkey' prints") from None
    if not text.strip():
        raise UserError("pubkey reads a private key on standard input, e.g. 'vpnd genkey | vpnd pubkey'")
    return encode_key(crypto_scalarmult_base(parse_key(text, "the private key on standard input")))
