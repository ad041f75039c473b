"""Small command-line items (issue 18): --version, genpsk, the genkey file-mode warning, up's default config."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30
PROGS = ["vpnd", "vpnclient"]


def run(prog: str, *args, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", prog, *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=TIMEOUT, cwd=REPO)


@pytest.mark.parametrize("prog", PROGS)
def test_version(prog):
    from vpncore.version import version
    r = run(prog, "--version")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == f"{prog} 0.1.0\n"
    assert version() == "0.1.0"


@pytest.mark.parametrize("prog", PROGS)
def test_genpsk_prints_32_random_bytes(prog):
    a, b = run(prog, "genpsk"), run(prog, "genpsk")
    for r in (a, b):
        assert r.returncode == 0 and r.stderr == ""
        text = r.stdout.rstrip("\n")
        assert len(text) == 44
        assert len(base64.b64decode(text, validate=True)) == 32
    assert a.stdout != b.stdout


def test_genpsk_in_process_differs_and_is_unclamped():
    from vpncore.keys import genpsk
    raw = [base64.b64decode(genpsk(), validate=True) for _ in range(64)]
    assert len(set(raw)) == 64 and all(len(k) == 32 for k in raw)
    # a preshared key is plain random bytes, not an X25519 scalar: some draw has a clamped bit set
    assert any(k[0] & 7 or k[31] & 0x80 for k in raw)


def _genkey_to(prog: str, path: Path, mode: int) -> subprocess.CompletedProcess:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)               # exact mode, whatever this process's umask is
        return run(prog, "genkey", stdout=fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("prog", PROGS)
def test_genkey_to_readable_file_warns_but_writes_the_key(tmp_path, prog):
    path = tmp_path / "key"
    r = _genkey_to(prog, path, 0o644)
    assert r.returncode == 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: warning: ")
    assert "umask 077" in lines[0] and "chmod 600" in lines[0]
    assert len(base64.b64decode(path.read_text().strip(), validate=True)) == 32


@pytest.mark.parametrize("prog", PROGS)
def test_genkey_to_private_file_is_silent(tmp_path, prog):
    path = tmp_path / "key"
    r = _genkey_to(prog, path, 0o600)
    assert r.returncode == 0 and r.stderr == ""
    assert len(base64.b64decode(path.read_text().strip(), validate=True)) == 32


@pytest.mark.parametrize("prog", PROGS)
def test_genkey_to_pipe_is_silent(prog):
    r = run(prog, "genkey")
    assert r.returncode == 0 and r.stderr == "" and len(r.stdout.strip()) == 44


def test_up_defaults_to_the_default_config():
    import vpnclient.__main__ as cli
    from vpnclient.config import DEFAULT_CONFIG
    assert DEFAULT_CONFIG == "/etc/vpnclient/vpn0.toml"
    parser = cli.build_parser()
    assert parser.parse_args(["up"]).config == DEFAULT_CONFIG
    assert parser.parse_args(["up", "-c", "x.toml"]).config == "x.toml"
    assert parser.parse_args(["locations"]).config is None   # locations applies the same default itself
