"""The device API (`vpnd api`, issue 14), as a real process on loopback over a SQLite registry.

Requests with urllib; the registry checked with the admin commands' library. What is checked:
the routes and their answers; one generic 401 for an unknown, a wrong and a suspended account;
failed attempts limited (429) without keeping addresses; bodies over the limit (413) and bad
JSON (400); the plan's device limit and a duplicate key (409); nothing logged per request.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vpncore.configfile import encode_key
from vpnd.api import FAILURES_PER_SOURCE, GENERIC, WINDOW, FailureLimiter
from vpnd.registry import Plan, open_registry
from vpnd.stats import utc_day

VPND = str(Path(sys.executable).parent / "vpnd")
SERVER_KEY = encode_key(bytes(range(32)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api(workdir):
    db = workdir / "accounts.db"
    reg = open_registry(f"sqlite://{db}")
    reg.put_plan(Plan("duo", 2))
    reg.add_account("alice", "duo", utc_day())
    reg.add_account("sam", "duo", utc_day())
    reg.set_status("sam", "suspended")
    port = free_port()
    cfg = workdir / "api.toml"
    cfg.write_text(f'[api]\nregistry = "sqlite:{db}"\nlisten = "127.0.0.1:{port}"\n\n'
                   '[[server]]\nname = "ams-1"\nlocation = "nl"\nendpoint = "vpn1.example.net:51820"\n'
                   f'public_key = "{SERVER_KEY}"\n')
    log = open(workdir / "api.log", "wb")
    proc = subprocess.Popen([VPND, "api", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/v1/servers", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (workdir / "api.log").read_text()
                time.sleep(0.1)
        yield base, reg, workdir / "api.log"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        reg.close()


def call(base, method, path, token=None, body=None, raw=None, headers=()):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in headers:
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read()
            return r.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, (json.loads(text) if text else None)


def key(i: int) -> str:
    return encode_key(bytes([i]) * 32)


def test_servers_and_device_lifecycle(api):
    base, reg, log = api
    assert call(base, "GET", "/v1/servers") == (200, {"servers": [
        {"name": "ams-1", "location": "nl", "endpoint": "vpn1.example.net:51820", "public_key": SERVER_KEY}]})
    assert call(base, "POST", "/v1/devices", "alice", {"public_key": key(1), "name": "phone"}) == \
        (201, {"public_key": key(1), "name": "phone"})
    assert call(base, "POST", "/v1/devices", "alice", {"public_key": key(2)})[0] == 201
    assert reg.account("alice").devices == [bytes([1]) * 32, bytes([2]) * 32]
    status, doc = call(base, "POST", "/v1/devices", "alice", {"public_key": key(3)})
    assert status == 409 and doc["error"].startswith("this account has 2 devices, as many as plan 'duo' allows")
    assert "alice" not in doc["error"]
    status, doc = call(base, "GET", "/v1/devices", "alice")
    assert status == 200 and doc == {"devices": [{"public_key": key(1), "name": "phone"},
                                                 {"public_key": key(2), "name": None}]}
    urlsafe = base64.urlsafe_b64encode(bytes([1]) * 32).decode().rstrip("=")
    assert call(base, "DELETE", f"/v1/devices/{urlsafe}", "alice") == (204, None)
    assert call(base, "DELETE", f"/v1/devices/{urlsafe}", "alice")[0] == 404
    assert reg.account("alice").devices == [bytes([2]) * 32]
    reg.add_account("bob", "duo", utc_day())
    status, doc = call(base, "POST", "/v1/devices", "bob", {"public_key": key(2)})
    assert status == 409 and "already registered" in doc["error"]
    # Nothing per request in the process's output: only its start line.
    assert log.read_text().splitlines() == ["vpnd: device API serving (the [api] listen address)"]


def test_bad_accounts_get_one_generic_answer(api):
    base, reg, _ = api
    answers = [call(base, "GET", "/v1/devices", token) for token in ("nobody", "sam", "al ice", "", "x" * 80)]
    answers.append(call(base, "GET", "/v1/devices"))
    assert answers == [(401, {"error": GENERIC})] * len(answers)
    # unknown and suspended look the same for a registration too, and nothing is written
    for token in ("nobody", "sam"):
        assert call(base, "POST", "/v1/devices", token, {"public_key": key(9)}) == (401, {"error": GENERIC})
    assert reg.snapshot().accounts["sam"].devices == []


def test_failed_attempts_are_limited(api):
    base, _, _ = api
    codes = [call(base, "GET", "/v1/devices", "nobody")[0] for _ in range(FAILURES_PER_SOURCE + 2)]
    assert codes == [401] * FAILURES_PER_SOURCE + [429] * 2
    status, doc = call(base, "GET", "/v1/devices", "alice")       # the real account, same source: limited too
    assert status == 429 and "wait a few minutes" in doc["error"]


def test_bad_bodies(api):
    base, reg, _ = api
    assert call(base, "POST", "/v1/devices", "alice", raw=b"{not json")[0] == 400
    assert call(base, "POST", "/v1/devices", "alice", raw=b"[1]")[0] == 400
    assert call(base, "POST", "/v1/devices", "alice", {"public_key": "abc"})[0] == 400
    assert call(base, "POST", "/v1/devices", "alice", {"public_key": key(1), "extra": 1})[0] == 400
    status, doc = call(base, "POST", "/v1/devices", "alice", raw=b"{" + b" " * 5000 + b"}")
    assert status == 413 and "4096" in doc["error"]
    assert call(base, "GET", "/nowhere")[0] == 404
    assert call(base, "PUT", "/v1/servers")[0] == 405
    assert reg.account("alice").devices == []


def test_failure_limiter_keeps_no_address_and_forgets():
    now = [0.0]
    lim = FailureLimiter(clock=lambda: now[0])
    for _ in range(FAILURES_PER_SOURCE):
        assert not lim.blocked("198.18.0.2")
        lim.failed("198.18.0.2")
    assert lim.blocked("198.18.0.2") and not lim.blocked("198.18.0.3")
    assert all(len(k) == 16 for k in lim._counts) and b"198.18" not in b"".join(lim._counts)
    now[0] += WINDOW
    assert not lim.blocked("198.18.0.2")          # a new window: new secret, no counts
    assert not lim._counts
    assert "198.18" not in repr(lim)


def test_config_errors_are_one_line(workdir):
    cfg = workdir / "api.toml"
    for text, expected in (
            ("", "has no [api] table"),
            ('[api]\nregistry = "sqlite:a.db"\n', "lists no servers"),
            ('[api]\nregistry = "sqlite:a.db"\ntls_cert = "c"\n[[server]]\nname="a"\nlocation="b"\n'
             f'endpoint="h:1"\npublic_key="{SERVER_KEY}"\n', "both tls_cert and tls_key"),
            ('[api]\nregistry = "sqlite:a.db"\nlog = "x"\n', "log")):
        cfg.write_text(text)
        r = subprocess.run([VPND, "api", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and expected in r.stderr, r.stderr
    assert not os.path.exists(workdir / "a.db")


def test_vpnclient_register_against_the_real_api(api, workdir):
    """`vpnclient register` with the real API: the key it registered is the one in the config it
    wrote, and that config loads."""
    from vpnclient.config import load
    base, reg, log = api
    path = workdir / "client" / "vpn0.toml"
    r = subprocess.run([str(Path(sys.executable).parent / "vpnclient"), "register", "--api", base, "--account",
                        "alice", "--config", str(path), "--name", "laptop"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "alice" not in r.stdout and "device registered" in r.stdout
    cfg = load(str(path))
    acct = reg.account("alice")
    assert acct.names == {acct.devices[0]: "laptop"} and len(acct.devices) == 1
    from nacl.public import PrivateKey
    assert bytes(PrivateKey(cfg.private_key).public_key) == acct.devices[0]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    # the same account again, with a second device: the plan (duo) allows it; a third is refused
    for n, expect in ((2, 0), (3, 1)):
        r = subprocess.run([str(Path(sys.executable).parent / "vpnclient"), "register", "--api", base, "--account",
                            "alice", "--config", str(workdir / f"c{n}.toml")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == expect, r.stderr
    assert r.stderr.startswith("vpnclient: error: the account already has as many devices as its plan allows "
                               "(this account has 2 devices, as many as plan 'duo' allows"), r.stderr
    assert len(r.stderr.splitlines()) == 1 and "alice" not in r.stderr
