"""`vpnclient register` (vpnclient/register.py): a new key pair registered with the device API, and a
complete client config written, mode 0600, that vpnclient.config.load accepts.

The device API is a stdlib ThreadingHTTPServer on 127.0.0.1 (port 0, in a thread) with canned
answers following the contract (GET /v1/servers, POST /v1/devices with a Bearer account). Most
cases run the real console script (.venv/bin/vpnclient) as a subprocess; a few call register.py
in-process (timeouts, validation details). Every failure must be ONE stderr line
'vpnclient: error: ...', a non-zero status, no file written, and never the account number.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult_base

from vpncore.cli import UserError
from vpncore.configfile import encode_key
from vpncore.keys import genkey
from vpnclient import register
from vpnclient.config import load

REPO = Path(__file__).resolve().parent.parent
VPNCLIENT = REPO / ".venv" / "bin" / "vpnclient"
TIMEOUT = 10                     # bound on each subprocess (each takes ~0.2 s)
ACCOUNT = "acct-7Q2XK9ZP4M"     # must never show up in any output
KEY_A, KEY_B = (encode_key(crypto_scalarmult_base(base64.b64decode(genkey()))) for _ in range(2))
AMS = {"name": "ams-1", "location": "nl", "endpoint": "vpn1.example.net:51820", "public_key": KEY_A}
STO = {"name": "sto-1", "location": "se", "endpoint": "[2001:db8::1]:51821", "public_key": KEY_B}
ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


class Api:
    """Canned answers per path: (status, body: dict | bytes, extra headers); records every request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.replies = {"/v1/servers": (200, {"servers": [AMS]}, {})}
        self.release = threading.Event()     # a "hang" reply waits for it (bounded)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(n, 1 << 16)) if n else b""
                api.requests.append({"method": self.command, "path": self.path,
                                     "headers": dict(self.headers), "body": body})
                reply = api.replies.get(self.path)
                if reply is None and self.path == "/v1/devices" and self.command == "POST":
                    doc = json.loads(body)
                    reply = (201, {"public_key": doc["public_key"], "name": doc.get("name") or "swift-fox"}, {})
                if reply is None:
                    reply = (404, {"error": "not found"}, {})
                if reply == "hang":
                    api.release.wait(5)
                    return
                status, content, extra = reply
                data = content if isinstance(content, bytes) else json.dumps(content).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def paths(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    def posted(self) -> dict:
        [post] = [r for r in self.requests if r["method"] == "POST"]
        return post


@pytest.fixture
def api():
    a = Api()
    a.thread.start()
    try:
        yield a
    finally:
        a.release.set()
        a.httpd.shutdown()
        a.httpd.server_close()
        a.thread.join(timeout=2)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for k in list(os.environ):
        if "proxy" in k.lower():
            monkeypatch.delenv(k)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(VPNCLIENT), "register", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=TIMEOUT, env=ENV, cwd=REPO)


def reg(api_url: str, path: Path, *extra, account: str = ACCOUNT) -> subprocess.CompletedProcess:
    return cli("--api", api_url, "--account", account, "--config", str(path), *extra)


def one_error(r: subprocess.CompletedProcess, status: int) -> str:
    """The single error line of a failed run (checked: status, nothing on stdout, no account number)."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vpnclient: error: "), r.stderr
    assert ACCOUNT not in r.stderr
    return lines[0]


def nothing_written(path: Path) -> None:
    assert not path.exists()
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []   # no temp file


# ------------------------------------------------------------------------------------ success

def test_one_server_writes_a_loadable_0600_config(api, workdir):
    path = workdir / "vpn0.toml"
    r = reg(api.url, path, "--name", "laptop")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout == (f"vpnclient: device registered; config written to {path} (1 server); "
                        f"connect with 'vpnclient up --config {path}'\n")
    assert api.paths() == [("GET", "/v1/servers"), ("POST", "/v1/devices")]   # the list first
    get = api.requests[0]
    assert "Authorization" not in get["headers"]
    post = api.posted()
    assert post["headers"]["Authorization"] == f"Bearer {ACCOUNT}"
    assert post["headers"]["Content-Type"] == "application/json"
    body = json.loads(post["body"])
    assert set(body) == {"public_key", "name"} and body["name"] == "laptop"
    pub = body["public_key"]
    assert len(pub) == 44 and len(base64.b64decode(pub, validate=True)) == 32

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = load(str(path))
    assert encode_key(crypto_scalarmult_base(cfg.private_key)) == pub      # the key pair matches
    [s] = cfg.servers
    assert (s.name, s.location, s.endpoint, encode_key(s.public_key)) == ("ams-1", "nl", AMS["endpoint"], KEY_A)
    doc = tomllib.loads(path.read_text())
    assert isinstance(doc["server"], dict)                                  # [server]
    assert set(doc["client"]) == {"private_key"}
    private = doc["client"]["private_key"]
    assert private not in r.stdout + r.stderr and ACCOUNT not in r.stdout
    assert ACCOUNT not in path.read_text()


def test_two_servers_write_server_array_and_no_name_is_sent_without_name(api, workdir):
    api.replies["/v1/servers"] = (200, {"servers": [AMS, dict(STO, extra_field=1)]}, {})
    path = workdir / "sub" / "vpn0.toml"              # a missing directory is created
    r = reg(api.url + "/", path)                      # a trailing '/' on the base URL is fine
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "(2 servers)" in r.stdout
    assert api.paths() == [("GET", "/v1/servers"), ("POST", "/v1/devices")]
    assert set(json.loads(api.posted()["body"])) == {"public_key"}
    doc = tomllib.loads(path.read_text())
    assert isinstance(doc["server"], list) and len(doc["server"]) == 2    # [[server]]
    cfg = load(str(path))
    assert [(s.name, s.location, s.endpoint) for s in cfg.servers] == [
        ("ams-1", "nl", "vpn1.example.net:51820"), ("sto-1", "se", "[2001:db8::1]:51821")]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_force_replaces_an_existing_config(api, workdir):
    path = workdir / "vpn0.toml"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    r = reg(api.url, path, "--force")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    load(str(path))


# ------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("status,error,extra,code,words", [
    (401, "unknown or inactive account", {}, 1, "refused the account number (unknown or inactive account); check it"),
    (409, "device limit reached (5 of 5)", {}, 1, "as many devices as its plan allows"),
    (409, "public key already registered", {}, 1, "already knows this device's key"),
    (429, "too many failed attempts", {"Retry-After": "30"}, 1, "wait 30 s and try again"),
    (500, "database unavailable", {}, 1, "try again later"),
    (400, "name too long", {}, 2, "check --name"),
    (413, "request too big", {}, 2, "too big"),
])
def test_registration_refused(api, workdir, status, error, extra, code, words):
    api.replies["/v1/devices"] = (status, {"error": error}, extra)
    path = workdir / "vpn0.toml"
    line = one_error(reg(api.url, path), code)
    assert words in line and error in line
    assert api.paths() == [("GET", "/v1/servers"), ("POST", "/v1/devices")]
    nothing_written(path)


def test_server_list_failure_registers_nothing(api, workdir):
    api.replies["/v1/servers"] = (503, b"<html>down</html>", {})
    path = workdir / "vpn0.toml"
    line = one_error(reg(api.url, path), 1)
    assert "HTTP 503" in line and "try again later" in line
    assert api.paths() == [("GET", "/v1/servers")]                 # no POST: nothing registered
    nothing_written(path)


@pytest.mark.parametrize("servers", [
    {"servers": []},
    {"nope": 1},
    {"servers": [dict(AMS, endpoint="vpn1.example.net")]},
    {"servers": [dict(AMS, public_key="c2hvcnQ=")]},
    {"servers": [dict(AMS, name='x"\n[client]')]},
    {"servers": [dict(AMS, location=5)]},
    {"servers": [AMS, AMS]},
    b"not json",
])
def test_malformed_server_list_is_refused(api, workdir, servers):
    api.replies["/v1/servers"] = (200, servers, {})
    path = workdir / "vpn0.toml"
    line = one_error(reg(api.url, path), 1)
    assert "malformed server list" in line or "not JSON" in line
    assert api.paths() == [("GET", "/v1/servers")]
    nothing_written(path)


def test_unreachable_api(workdir):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))              # bound, never listening: the connection is refused
    try:
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        path = workdir / "vpn0.toml"
        line = one_error(reg(url, path), 1)
        assert f"the API at {url} cannot be reached" in line and "check --api" in line
        nothing_written(path)
    finally:
        s.close()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "file:///etc/passwd", "127.0.0.1:8080",
                                 "http://user:pw@127.0.0.1/", "http:///v1", "http://h/?a=1",
                                 "http://api.example.net", "http://198.18.0.1:8080"])
def test_bad_api_url(workdir, url):
    path = workdir / "vpn0.toml"
    line = one_error(reg(url, path), 2)
    assert "--api" in line and "pw" not in line
    if url.startswith("http://") and "example" in url or "198.18" in url:
        assert "in clear; use https://" in line
    nothing_written(path)


@pytest.mark.parametrize("account", ["", "x" * 65, "12 34"])
def test_bad_account(api, workdir, account):
    path = workdir / "vpn0.toml"
    line = one_error(reg(api.url, path, account=account), 2)
    assert "--account" in line and (not account or account not in line)
    assert api.requests == []
    nothing_written(path)


def test_existing_file_without_force(api, workdir):
    path = workdir / "vpn0.toml"
    path.write_text("keep me\n")
    line = one_error(reg(api.url, path), 2)
    assert "already exists" in line and "--force" in line
    assert path.read_text() == "keep me\n"
    assert api.requests == []                                      # checked before anything is sent


def test_redirect_is_not_followed_with_the_account(api, workdir):
    api.replies["/v1/devices"] = (307, {"error": "moved"}, {"Location": "/elsewhere"})
    path = workdir / "vpn0.toml"
    line = one_error(reg(api.url, path), 2)
    assert "redirect" in line
    assert api.paths() == [("GET", "/v1/servers"), ("POST", "/v1/devices")]   # never /elsewhere
    nothing_written(path)


def test_account_echoed_by_the_server_is_redacted(api, workdir):
    api.replies["/v1/devices"] = (401, {"error": f"unknown account {ACCOUNT}"}, {})
    line = one_error(reg(api.url, workdir / "vpn0.toml"), 1)
    assert "***" in line


# ------------------------------------------------------------------------------------ in-process

def test_in_process_success_and_output(api, workdir, capsys):
    from types import SimpleNamespace
    path = workdir / "vpn0.toml"
    args = SimpleNamespace(api=api.url, account=ACCOUNT, config=str(path), name=None, force=False)
    assert register.run(args) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out.count("\n") == 1 and ACCOUNT not in out.out
    cfg = load(str(path))
    assert encode_key(crypto_scalarmult_base(cfg.private_key)) == json.loads(api.posted()["body"])["public_key"]


def test_in_process_timeout_is_bounded(api, workdir, monkeypatch):
    monkeypatch.setattr(register, "TIMEOUT", 0.3)
    api.replies["/v1/servers"] = "hang"
    path = workdir / "vpn0.toml"
    with pytest.raises(UserError) as e:
        register.register(api.url, ACCOUNT, str(path))
    assert e.value.status == 1 and "no answer within 0.3 s" in str(e.value)
    nothing_written(path)


def test_a_different_confirmed_key_is_refused(api, workdir):
    api.replies["/v1/devices"] = (201, {"public_key": KEY_B, "name": "x"}, {})
    with pytest.raises(UserError) as e:
        register.register(api.url, ACCOUNT, str(workdir / "vpn0.toml"))
    assert e.value.status == 1 and "different device" in str(e.value)
    nothing_written(workdir / "vpn0.toml")


def test_parse_servers_and_render_round_trip():
    servers = register.parse_servers({"servers": [dict(AMS, endpoint="198.18.0.1:51820"), STO]})
    data = register.render(genkey(), servers)
    doc = tomllib.loads(data.decode())
    assert [s["endpoint"] for s in doc["server"]] == ["198.18.0.1:51820", "[2001:db8::1]:51821"]
    for bad in [dict(AMS, endpoint="2001:db8::1:51820"), dict(AMS, endpoint="bad host:1"),
                dict(AMS, endpoint="h:0"), dict(AMS, location=""), dict(AMS, name="a" * 33)]:
        with pytest.raises(ValueError):
            register.parse_servers({"servers": [bad]})
    with pytest.raises(ValueError):
        register.parse_servers({"servers": [dict(AMS, name=f"s{i}") for i in range(65)]})
    with pytest.raises(ValueError):
        register._toml_str("a\x00b")
    text = 'é \\ "q"'
    assert tomllib.loads("x = " + register._toml_str(text))["x"] == text


def test_help_lists_register():
    r = subprocess.run([sys.executable, "-m", "vpnclient", "--help"], capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=REPO)
    assert r.returncode == 0 and "register" in r.stdout
