"""vpncore.keys: genkey and pubkey, in-process and through the console scripts."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult_base

from vpncore import keys
from vpncore.cli import UserError

BIN = Path(sys.executable).parent
TIMEOUT = 30

# RFC 7748 §6.1: Alice's private key and public key.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def test_genkey_is_base64_of_32_clamped_bytes():
    for _ in range(200):
        text = keys.genkey()
        assert len(text) == 44 and text.endswith("=") and text.strip() == text
        raw = decode(text)
        assert len(raw) == 32
        assert raw[0] & 7 == 0                 # low three bits cleared
        assert raw[31] & 0x80 == 0             # top bit cleared
        assert raw[31] & 0x40 == 0x40          # second-highest bit set


def test_two_genkeys_differ():
    seen = {keys.genkey() for _ in range(100)}
    assert len(seen) == 100


def pubkey_of(text: str, monkeypatch) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    return keys.pubkey_from_stdin()


def test_pubkey_of_rfc7748_vector(monkeypatch):
    out = pubkey_of(b64(ALICE_PRIVATE) + "\n", monkeypatch)
    assert decode(out) == ALICE_PUBLIC == crypto_scalarmult_base(ALICE_PRIVATE)


def test_pubkey_matches_nacl_for_generated_keys(monkeypatch):
    for _ in range(20):
        private = keys.genkey()
        assert decode(pubkey_of(private, monkeypatch)) == crypto_scalarmult_base(decode(private))


def test_pubkey_tolerates_surrounding_whitespace(monkeypatch):
    assert decode(pubkey_of("\n  " + b64(ALICE_PRIVATE) + "  \n\n", monkeypatch)) == ALICE_PUBLIC


@pytest.mark.parametrize("text,match", [
    ("", "standard input"),
    ("\n", "standard input"),
    ("garbage!", "not valid base64"),
    (b64(b"\x01" * 31), "31 bytes, not 32"),
    (b64(b"\x01" * 33), "33 bytes, not 32"),
])
def test_pubkey_bad_input_is_user_error(monkeypatch, text, match):
    with pytest.raises(UserError, match=match) as info:
        pubkey_of(text, monkeypatch)
    assert info.value.status == 2


def _run(prog: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    exe = BIN / prog
    if not exe.exists():
        pytest.fail(f"{exe} is missing; run 'make venv'")
    return subprocess.run([str(exe), *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("prog", ["vpnd", "vpnclient"])
def test_cli_genkey_pubkey(prog):
    a, b = _run(prog, "genkey"), _run(prog, "genkey")
    assert a.returncode == b.returncode == 0 and a.stderr == b.stderr == ""
    assert a.stdout != b.stdout
    private = a.stdout.strip()
    assert a.stdout == private + "\n" and len(decode(private)) == 32
    p = _run(prog, "pubkey", stdin=a.stdout)
    assert p.returncode == 0 and p.stderr == ""
    assert decode(p.stdout.strip()) == crypto_scalarmult_base(decode(private))


def test_cli_pubkey_of_rfc7748_vector():
    p = _run("vpnd", "pubkey", stdin=b64(ALICE_PRIVATE) + "\n")
    assert p.returncode == 0 and p.stdout == b64(ALICE_PUBLIC) + "\n"
