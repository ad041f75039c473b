"""User mistakes on the command line, in config files and in privileges (DESIGN §6).

The ground rule: bad input from a user gets ONE clear line on stderr ("PROG: error: what is wrong;
how to fix it"), a non-zero exit status (2 for command line and config, 1 at run time) and never a
Python traceback. Every case runs the real console scripts (`vpnd`, `vpnclient`) from the venv
as subprocesses, each bounded by a timeout.

Safety: every `vpnd serve` / `vpnclient up` run as root goes through `unshare --net`, so even if a
bad config were wrongly accepted, the process would meet an empty private network namespace
(vanishing with it) and never touch the host's interfaces or ports. The port-in-use case runs in
a named namespace created and deleted by the test.

Unprivileged runs: the venv interpreter lives under /root (mode 0700 here), so user `nobody`
cannot exec it. `run_as_nobody` runs the same sources with the system interpreter of the same
minor version as a real subprocess (skipped where there is none); `_fork_as_nobody` forks this
process, drops to uid/gid 65534 and calls the entry point in-process.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from string import Template

import pytest

from vpncore.keys import genkey
from vpncore.configfile import encode_key, parse_key

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT = 30          # seconds, for every subprocess
NOBODY = 65534

# -- keys for the configs ----------------------------------------------------------------------

KEY = genkey()
KEY2 = genkey()


def _pub(private_b64: str) -> str:
    from nacl.bindings import crypto_scalarmult_base
    return encode_key(crypto_scalarmult_base(parse_key(private_b64, "key")))


PUB = _pub(KEY)
PUB2 = _pub(KEY2)
SUBST = {"key": KEY, "pub": PUB, "pub2": PUB2}

# -- running the console scripts ---------------------------------------------------------------


@dataclass
class Result:
    argv: list
    returncode: int
    stdout: str
    stderr: str


def _exe(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing; run 'make venv'")
    return str(path)


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    for k in ("PYTHONIOENCODING", "PYTHONUTF8", "PYTHONWARNINGS"):
        env.pop(k, None)
    env.update(extra)
    return env


def _completed(argv, r) -> Result:
    return Result(argv, r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace"))


def run(prog: str, *args, stdin: bytes | str = b"", env: dict | None = None, isolate_net: bool = False,
        timeout: float = TIMEOUT) -> Result:
    argv = [_exe(prog), *map(str, args)]
    if isolate_net and os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare (util-linux) to run serve/up as root without touching the host network")
        argv = ["unshare", "--net", "--", *argv]
    if isinstance(stdin, str):
        stdin = stdin.encode()
    r = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, env=env or _env(), cwd=REPO)
    return _completed(argv, r)


def serve(config) -> Result:
    return run("vpnd", "serve", "--config", config, isolate_net=True)


def up(config) -> Result:
    return run("vpnclient", "up", "--config", config, isolate_net=True)


def assert_user_error(r: Result, prog: str, *words: str, status: int | None = None) -> str:
    """Exactly one non-empty stderr line 'PROG: error: ...' mentioning `words`; no traceback; exit != 0."""
    shown = f"argv={r.argv}\nexit={r.returncode}\nstderr:\n{r.stderr}\nstdout:\n{r.stdout}"
    assert "Traceback" not in r.stderr, shown
    assert r.returncode > 0, shown            # non-zero, and not killed by a signal
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}\n{shown}"
    line = lines[0]
    assert line.strip(), shown
    assert line.startswith(f"{prog}: error: ") and len(line) > len(f"{prog}: error: ") + 10, shown
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not mentioned\n{shown}"
    if status is not None:
        assert r.returncode == status, shown
    return line


def write(path: Path, template: str, mode: int | None = None) -> Path:
    path.write_text(Template(template).substitute(SUBST))
    if mode is not None:
        os.chmod(path, mode)
    return path


SERVER_OK = """
[server]
private_key = "$key"
address_pool4 = "198.19.0.0/24"
"""

CLIENT_OK = """
[client]
private_key = "$key"

[server]
endpoint = "198.18.0.1:51820"
public_key = "$pub2"
"""

# -- command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("prog,args,words", [
    ("vpnd", ["--bogus"], ["--bogus"]),
    ("vpnd", ["serve", "--config", "x.toml", "--bogus"], ["--bogus"]),
    ("vpnd", ["frobnicate"], ["frobnicate"]),
    ("vpnd", ["serve"], ["--config"]),
    ("vpnd", ["serve", "--config"], ["--config"]),
    ("vpnclient", ["--bogus"], ["--bogus"]),
    ("vpnclient", ["up", "--config", "x.toml", "--bogus"], ["--bogus"]),
    ("vpnclient", ["connect"], ["connect"]),
    ("vpnclient", ["up", "--config"], ["--config"]),
    ("vpnclient", ["up", "--config", "x.toml", "--log-level", "loud"], ["--log-level", "loud"]),
    ("vpnclient", ["status", "--config", "a.toml", "--socket", "/tmp/b.sock"], ["--socket", "--config"]),
    ("vpnclient", ["down", "--json"], ["--json"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_command_line(prog, args, words):
    r = run(prog, *args)
    line = assert_user_error(r, prog, *words, status=2)
    assert f"{prog}" in line and "--help" in line   # says where to look


@pytest.mark.parametrize("prog", ["vpnd", "vpnclient"])
def test_no_command_prints_help_and_fails(prog):
    r = run(prog)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "usage:" in r.stdout + r.stderr


@pytest.mark.parametrize("prog", ["vpnd", "vpnclient"])
def test_help_is_not_an_error(prog):
    r = run(prog, "--help")
    assert r.returncode == 0 and r.stderr == "" and "usage:" in r.stdout


# -- the config file itself -------------------------------------------------------------------


@pytest.mark.parametrize("prog,start", [("vpnd", serve), ("vpnclient", up)])
def test_missing_config_file(tmp_path, prog, start):
    path = tmp_path / "nope.toml"
    assert_user_error(start(path), prog, "nope.toml", "does not exist", status=2)


@pytest.mark.parametrize("prog,start", [("vpnd", serve), ("vpnclient", up)])
def test_config_is_a_directory(tmp_path, prog, start):
    assert_user_error(start(tmp_path), prog, str(tmp_path), "directory", status=2)


@pytest.mark.parametrize("prog,start", [("vpnd", serve), ("vpnclient", up)])
def test_invalid_toml(tmp_path, prog, start):
    path = tmp_path / "bad.toml"
    path.write_text("[server\nprivate_key = \n")
    assert_user_error(start(path), prog, "bad.toml", "not valid TOML", "line", status=2)


@pytest.mark.parametrize("prog,start", [("vpnd", serve), ("vpnclient", up)])
def test_config_not_utf8(tmp_path, prog, start):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe[server]\n\x80\x81\n")
    assert_user_error(start(path), prog, "binary.toml", status=2)


# -- vpnd config contents ---------------------------------------------------------------------

SERVER_BAD = [
    ("no-server-section", """
[[client]]
public_key = "$pub"
""", ["server"]),
    ("server-not-a-table", 'server = "yes"\n', ["server"]),
    ("unknown-section", SERVER_OK + "[peer]\nx = 1\n", ["'peer'"]),
    ("unknown-server-key", SERVER_OK + 'colour = "blue"\n', ["[server]", "'colour'"]),
    ("unknown-client-key", SERVER_OK + '[[client]]\npublic_key = "$pub"\ncolour = "blue"\n',
     ["[[client]]", "'colour'"]),
    ("no-private-key", '[server]\naddress_pool4 = "198.19.0.0/24"\n', ["private_key", "genkey"]),
    ("private-key-not-base64", '[server]\nprivate_key = "not base64!"\naddress_pool4 = "198.19.0.0/24"\n',
     ["private_key", "base64"]),
    ("private-key-wrong-length", '[server]\nprivate_key = "AAAA"\naddress_pool4 = "198.19.0.0/24"\n',
     ["private_key", "not 32"]),
    ("private-key-not-string", '[server]\nprivate_key = 42\naddress_pool4 = "198.19.0.0/24"\n',
     ["private_key"]),
    ("listen-no-port", SERVER_OK + 'listen = ["0.0.0.0"]\n', ["listen"]),
    ("listen-port-too-big", SERVER_OK + 'listen = ["0.0.0.0:99999"]\n', ["listen", "port"]),
    ("listen-port-not-number", SERVER_OK + 'listen = ["0.0.0.0:http"]\n', ["listen", "port"]),
    ("listen-v6-no-brackets-close", SERVER_OK + 'listen = ["[::1:51820"]\n', ["listen"]),
    ("listen-not-string", SERVER_OK + "listen = [51820]\n", ["listen"]),
    ("listen-empty", SERVER_OK + "listen = []\n", ["listen"]),
    ("pool4-not-network", '[server]\nprivate_key = "$key"\naddress_pool4 = "not-a-net"\n',
     ["address_pool4", "not a network"]),
    ("pool6-not-network", '[server]\nprivate_key = "$key"\naddress_pool6 = "2001:2::zz/64"\n',
     ["address_pool6", "not a network"]),
    ("pool4-is-ipv6", '[server]\nprivate_key = "$key"\naddress_pool4 = "2001:2::/64"\n',
     ["address_pool4", "IPv4"]),
    ("pool4-too-small", '[server]\nprivate_key = "$key"\naddress_pool4 = "198.19.0.0/31"\n',
     ["address_pool4", "too small"]),
    ("pool6-too-small", '[server]\nprivate_key = "$key"\naddress_pool6 = "2001:2::/127"\n',
     ["address_pool6", "too small"]),
    ("no-pool", '[server]\nprivate_key = "$key"\n', ["address_pool4"]),
    ("mtu-too-small", SERVER_OK + "mtu = 500\n", ["mtu", "1280"]),
    ("mtu-too-big", SERVER_OK + "mtu = 70000\n", ["mtu", "65000"]),
    ("mtu-string", SERVER_OK + 'mtu = "1420"\n', ["mtu"]),
    ("dns-bad", SERVER_OK + 'dns = ["one.one.one.one"]\n', ["dns", "one.one.one.one"]),
    ("push-routes-bad", SERVER_OK + 'push_routes = ["10.0.0.0/33"]\n', ["push_routes"]),
    ("log-level-bad", SERVER_OK + 'log_level = "loud"\n', ["log_level", "quiet"]),
    ("duplicate-client", SERVER_OK + '[[client]]\npublic_key = "$pub"\n[[client]]\npublic_key = "$pub"\n',
     ["[[client]] number 2", "public key"]),
    ("client-no-public-key", SERVER_OK + '[[client]]\nname = "laptop"\n', ["[[client]] number 1", "public_key"]),
    ("client-public-key-bad", SERVER_OK + '[[client]]\npublic_key = "short"\n', ["public_key"]),
    ("client-psk-bad", SERVER_OK + '[[client]]\npublic_key = "$pub"\npreshared_key = "AAAA"\n',
     ["preshared_key", "not 32"]),
    ("client-not-array", SERVER_OK + '[client]\npublic_key = "$pub"\n', ["[[client]]"]),
]


@pytest.mark.parametrize("name,text,words", SERVER_BAD, ids=[c[0] for c in SERVER_BAD])
def test_vpnd_bad_config(tmp_path, name, text, words):
    path = write(tmp_path / "vpnd.toml", text)
    assert_user_error(serve(path), "vpnd", *words, status=2)


SERVER_DEFECTS = [
    pytest.param(SERVER_OK + "log_level = []\n", ["log_level"], id="log-level-not-string"),
    pytest.param("client = [1]\n" + SERVER_OK, ["[[client]]"], id="client-entry-not-table"),
]


@pytest.mark.parametrize("text,words", SERVER_DEFECTS)
def test_vpnd_bad_config_defects(tmp_path, text, words):
    path = write(tmp_path / "vpnd.toml", text)
    assert_user_error(serve(path), "vpnd", *words, status=2)


WRONG_TYPE = [
    ("vpnd", 'server = "yes"\n', "table"),
    ("vpnd", SERVER_OK + '[[client]]\npublic_key = 42\n', "string"),
    ("vpnclient", CLIENT_OK.replace('"198.18.0.1:51820"', "51820"), "string"),
]


@pytest.mark.parametrize("prog,text,word", WRONG_TYPE, ids=["server-not-table", "client-key-int", "endpoint-int"])
def test_wrong_type_message_speaks_toml(tmp_path, prog, text, word):
    path = write(tmp_path / "c.toml", text)
    line = assert_user_error(serve(path) if prog == "vpnd" else up(path), prog, word, status=2)
    assert " dict" not in line and " str;" not in line and ").server" not in line


def test_vpnd_private_key_file_missing(tmp_path):
    path = write(tmp_path / "vpnd.toml", '[server]\nprivate_key_file = "keys/nope.key"\n'
                                          'address_pool4 = "198.19.0.0/24"\n')
    assert_user_error(serve(path), "vpnd", str(tmp_path / "keys" / "nope.key"), "private key file",
                      "No such file", status=2)


def test_vpnd_private_key_file_is_directory(tmp_path):
    (tmp_path / "keys").mkdir()
    path = write(tmp_path / "vpnd.toml", '[server]\nprivate_key_file = "keys"\naddress_pool4 = "198.19.0.0/24"\n')
    assert_user_error(serve(path), "vpnd", "private key file", "directory", status=2)


def test_vpnd_private_key_file_garbage_text(tmp_path):
    (tmp_path / "server.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    path = write(tmp_path / "vpnd.toml", '[server]\nprivate_key_file = "server.key"\n'
                                          'address_pool4 = "198.19.0.0/24"\n')
    assert_user_error(serve(path), "vpnd", "server.key", "base64", status=2)


def test_vpnd_private_key_file_raw_binary(tmp_path):
    (tmp_path / "server.key").write_bytes(b"\xff" + bytes(range(0x80, 0x80 + 31)))
    path = write(tmp_path / "vpnd.toml", '[server]\nprivate_key_file = "server.key"\n'
                                          'address_pool4 = "198.19.0.0/24"\n')
    assert_user_error(serve(path), "vpnd", "server.key", status=2)


# -- vpnclient config contents ----------------------------------------------------------------

CLIENT_BAD = [
    ("no-client-section", '[server]\nendpoint = "198.18.0.1:51820"\npublic_key = "$pub2"\n', ["[client]"]),
    ("no-server-section", '[client]\nprivate_key = "$key"\n', ["[server]"]),
    ("unknown-section", CLIENT_OK + "[extra]\nx = 1\n", ["'extra'"]),
    ("unknown-client-key", CLIENT_OK.replace("[server]", 'colour = "blue"\n[server]'), ["[client]", "'colour'"]),
    ("unknown-server-key", CLIENT_OK + 'colour = "blue"\n', ["[server]", "'colour'"]),
    ("no-private-key", '[client]\ninterface = "vpn0"\n[server]\nendpoint = "198.18.0.1:51820"\n'
                       'public_key = "$pub2"\n', ["private_key", "genkey"]),
    ("private-key-not-base64", CLIENT_OK.replace('"$key"', '"@@@@"'), ["private_key", "base64"]),
    ("private-key-wrong-length", CLIENT_OK.replace('"$key"', '"AAAAAAAA"'), ["private_key", "not 32"]),
    ("private-key-file-missing", CLIENT_OK.replace('private_key = "$key"', 'private_key_file = "nope.key"'),
     ["nope.key", "private key file"]),
    ("no-endpoint", '[client]\nprivate_key = "$key"\n[server]\npublic_key = "$pub2"\n', ["endpoint"]),
    ("endpoint-no-port", CLIENT_OK.replace("198.18.0.1:51820", "198.18.0.1"), ["endpoint"]),
    ("endpoint-port-zero", CLIENT_OK.replace("198.18.0.1:51820", "198.18.0.1:0"), ["endpoint", "port"]),
    ("endpoint-port-too-big", CLIENT_OK.replace("198.18.0.1:51820", "198.18.0.1:70000"), ["endpoint", "port"]),
    ("endpoint-port-word", CLIENT_OK.replace("198.18.0.1:51820", "[2001:2::1]:vpn"), ["endpoint", "port"]),
    ("endpoint-v6-unbracketed-port", CLIENT_OK.replace("198.18.0.1:51820", "[2001:2::1]51820"), ["endpoint"]),
    ("endpoint-not-string", CLIENT_OK.replace('"198.18.0.1:51820"', "51820"), ["endpoint"]),
    ("no-server-public-key", '[client]\nprivate_key = "$key"\n[server]\nendpoint = "198.18.0.1:51820"\n',
     ["public_key"]),
    ("server-public-key-bad", CLIENT_OK.replace('"$pub2"', '"xyz"'), ["public_key"]),
    ("psk-bad", CLIENT_OK + 'preshared_key = "AAAA"\n', ["preshared_key", "not 32"]),
    ("keepalive-negative", CLIENT_OK.replace("[server]", "persistent_keepalive = -1\n[server]"),
     ["persistent_keepalive"]),
    ("keepalive-string", CLIENT_OK.replace("[server]", 'persistent_keepalive = "10"\n[server]'),
     ["persistent_keepalive"]),
]


@pytest.mark.parametrize("name,text,words", CLIENT_BAD, ids=[c[0] for c in CLIENT_BAD])
def test_vpnclient_bad_config(tmp_path, name, text, words):
    path = write(tmp_path / "client.toml", text)
    assert_user_error(up(path), "vpnclient", *words, status=2)


# -- vpnd pubkey --------------------------------------------------------------------------------


@pytest.mark.parametrize("prog", ["vpnd", "vpnclient"])
@pytest.mark.parametrize("stdin,words", [
    (b"", ["standard input", "genkey"]),
    (b"   \n\n", ["standard input", "genkey"]),
    (b"this is not a key\n", ["standard input", "base64"]),
    (b"AAAA\n", ["standard input", "not 32"]),
], ids=["empty", "blank", "garbage", "short"])
def test_pubkey_bad_stdin(prog, stdin, words):
    assert_user_error(run(prog, "pubkey", stdin=stdin), prog, *words, status=2)


def test_pubkey_binary_stdin():
    r = run("vpnd", "pubkey", stdin=b"\x8c\xff\x00\x01" * 8, env=_env(PYTHONIOENCODING="utf-8:strict"))
    assert_user_error(r, "vpnd", "standard input", status=2)


def test_pubkey_binary_stdin_default_locale():
    r = run("vpnd", "pubkey", stdin=b"\x8c\xff\x00\x01" * 8)
    assert_user_error(r, "vpnd", "standard input", status=2)


# -- vpnclient status / down with nothing running ------------------------------------------------


@pytest.mark.parametrize("cmd", ["status", "down"])
def test_status_down_no_socket(tmp_path, cmd):
    sock = tmp_path / "vpn0.sock"
    assert_user_error(run("vpnclient", cmd, "--socket", sock), "vpnclient", "not running", str(sock),
                      "vpnclient up", status=1)


@pytest.mark.parametrize("cmd", ["status", "down"])
def test_status_down_no_socket_from_config(tmp_path, cmd):
    sock = tmp_path / "ctl.sock"
    path = write(tmp_path / "client.toml", CLIENT_OK.replace("[server]", f'control_socket = "{sock}"\n[server]'))
    assert_user_error(run("vpnclient", cmd, "--config", path), "vpnclient", "not running", str(sock), status=1)


@pytest.mark.parametrize("cmd", ["status", "down"])
def test_status_down_stale_socket(tmp_path, cmd):
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))          # bound, never listening: like a socket left by a killed client
        assert_user_error(run("vpnclient", cmd, "--socket", path), "vpnclient", "not running", "stale", status=1)
    finally:
        s.close()


def test_status_socket_path_too_long(tmp_path):
    path = "/tmp/" + "x" * 200 + ".sock"
    assert_user_error(run("vpnclient", "status", "--socket", path), "vpnclient", "socket", status=1)


def test_status_hung_client(tmp_path):
    path = tmp_path / "hung.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        s.listen(1)                # connections queue up, nothing ever answers
        assert_user_error(run("vpnclient", "status", "--socket", path), "vpnclient", "status", status=1)
    finally:
        s.close()


def test_status_bad_config(tmp_path):
    assert_user_error(run("vpnclient", "status", "--config", tmp_path / "nope.toml"), "vpnclient",
                      "does not exist", status=2)


# -- UDP port already in use (vpnd serve as root, in a fresh network namespace) ------------------


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=TIMEOUT, check=check,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def netns():
    """A fresh named network namespace with lo up; processes put in `procs` are killed, then it is deleted."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 ('ip')")
    name = f"vpnt-cli-{secrets.token_hex(3)}"
    procs: list[subprocess.Popen] = []
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        _ip("netns", "delete", name, check=False)
        assert name not in _ip("netns", "list").stdout


_HOLD_PORT = (
    "import socket, sys\n"
    "host, port = sys.argv[1], int(sys.argv[2])\n"
    "s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind((host, port))\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.mark.parametrize("host,listen", [("127.0.0.1", "127.0.0.1:51820"), ("::1", "[::1]:51820")])
def test_vpnd_udp_port_in_use(tmp_path, netns, host, listen):
    ns, procs = netns
    holder = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _HOLD_PORT, host, "51820"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(holder)
    ready, _, _ = select.select([holder.stdout], [], [], TIMEOUT)
    assert ready and holder.stdout.readline().strip() == "ready", holder.stderr.read() if holder.poll() else ""
    path = write(tmp_path / "vpnd.toml", SERVER_OK + f'listen = ["{listen}"]\ninterface = "vpnt-in-use0"\n')
    argv = ["ip", "netns", "exec", ns, _exe("vpnd"), "serve", "--config", str(path)]
    r = _completed(argv, subprocess.run(argv, capture_output=True, timeout=TIMEOUT, env=_env(),
                                        stdin=subprocess.DEVNULL))
    assert_user_error(r, "vpnd", "51820", "in use", "listen", status=1)
    # Sockets are opened before the TUN: no device was created.
    links = _ip("-n", ns, "-o", "link", "show").stdout
    assert "vpnt-in-use0" not in links and len(links.strip().splitlines()) == 1, links


def test_vpnd_listen_address_not_local(tmp_path, netns):
    ns, _ = netns
    path = write(tmp_path / "vpnd.toml", SERVER_OK + 'listen = ["203.0.113.77:51820"]\n')
    argv = ["ip", "netns", "exec", ns, _exe("vpnd"), "serve", "--config", str(path)]
    r = _completed(argv, subprocess.run(argv, capture_output=True, timeout=TIMEOUT, env=_env(),
                                        stdin=subprocess.DEVNULL))
    assert_user_error(r, "vpnd", "listen", "not assigned", status=1)


# -- without root privileges ------------------------------------------------------------------


@pytest.fixture
def shared_dir():
    """A directory user nobody can read (tmp_path's parents are mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vpncli-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _require_root():
    if os.geteuid() != 0:
        pytest.skip("needs root, to drop to user nobody")


_NOBODY_PY: list = []


def _nobody_python() -> str:
    """The system interpreter matching ours, able to import the project as nobody (or skip)."""
    _require_root()
    if not _NOBODY_PY:
        exe = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}",
                           path="/usr/local/bin:/usr/bin:/bin")
        ok = False
        if exe:
            try:
                r = subprocess.run([exe, "-c", "import nacl.bindings, trio, msgpack, cryptography, vpnd.server, "
                                    "vpnclient.client"], env=_nobody_env(), cwd="/", user=NOBODY, group=NOBODY,
                                   extra_groups=[], capture_output=True, timeout=TIMEOUT)
                ok = r.returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
        _NOBODY_PY.append(exe if ok else None)
    if _NOBODY_PY[0] is None:
        pytest.skip("no system python of the same version that user nobody can run with this venv's packages")
    return _NOBODY_PY[0]


def _nobody_env() -> dict:
    purelib = sysconfig.get_paths()["purelib"]
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), purelib])}


def run_as_nobody(module: str, *args) -> Result:
    """`python -m MODULE ARGS` as a real subprocess of user nobody (uid/gid 65534, no groups)."""
    argv = [_nobody_python(), "-m", module, *map(str, args)]
    r = subprocess.run(argv, env=_nobody_env(), cwd="/", user=NOBODY, group=NOBODY, extra_groups=[],
                       capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    return _completed(argv, r)


def _fork_as_nobody(func) -> tuple[int, str]:
    """Fork; the child drops to nobody, runs func() -> exit status with stderr into a pipe."""
    _require_root()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 99
        try:
            os.close(r)
            err = os.fdopen(w, "w")
            sys.stderr = err
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                status = func()
            except BaseException:  # noqa: BLE001 - shown to the parent as a traceback
                traceback.print_exc(file=err)
                status = 98
            err.flush()
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + TIMEOUT
    with os.fdopen(r, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([f], [], [], max(0.0, left))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(f.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st), b"".join(chunks).decode("utf-8", "replace")


def test_vpnd_serve_without_root(shared_dir):
    path = write(shared_dir / "vpnd.toml", SERVER_OK, mode=0o644)
    assert_user_error(run_as_nobody("vpnd", "serve", "--config", path), "vpnd", "root", "sudo", status=1)


def test_vpnclient_up_without_root(shared_dir):
    path = write(shared_dir / "client.toml", CLIENT_OK, mode=0o644)
    assert_user_error(run_as_nobody("vpnclient", "up", "--config", path), "vpnclient", "root", "sudo", status=1)


def test_config_unreadable_without_root(shared_dir):
    path = write(shared_dir / "vpnd.toml", SERVER_OK, mode=0o600)   # owned by root
    assert_user_error(run_as_nobody("vpnd", "serve", "--config", path), "vpnd", "vpnd.toml", "not readable",
                      "permissions", status=2)


def test_private_key_file_unreadable(shared_dir):
    (shared_dir / "server.key").write_text(KEY + "\n")
    os.chmod(shared_dir / "server.key", 0o600)                        # owned by root
    path = write(shared_dir / "vpnd.toml", '[server]\nprivate_key_file = "server.key"\n'
                                           'address_pool4 = "198.19.0.0/24"\n', mode=0o644)
    assert_user_error(run_as_nobody("vpnd", "serve", "--config", path), "vpnd", "server.key",
                      "private key file", "permission", status=2)


def test_status_socket_not_permitted(shared_dir):
    path = shared_dir / "root.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        s.listen(1)
        os.chmod(path, 0o600)
        assert_user_error(run_as_nobody("vpnclient", "status", "--socket", path), "vpnclient", "permission",
                          "control socket", "root", status=1)
    finally:
        s.close()


def _import_runtime():
    # The child cannot read the interpreter's stdlib under /root once it is nobody: import first.
    import trio  # noqa: F401

    import vpnclient.client  # noqa: F401
    import vpnd.server  # noqa: F401
    import vpncore.log  # noqa: F401
    import vpncore.net.tun  # noqa: F401


@pytest.mark.parametrize("prog,cmd", [("vpnd", "serve"), ("vpnclient", "up")])
def test_without_root_forked_in_process(shared_dir, prog, cmd):
    _import_runtime()
    from vpncore.cli import run_cli
    if prog == "vpnd":
        from vpnd.__main__ import main
        path = write(shared_dir / "vpnd.toml", SERVER_OK, mode=0o644)
    else:
        from vpnclient.__main__ import main
        path = write(shared_dir / "client.toml", CLIENT_OK, mode=0o644)
    status, err = _fork_as_nobody(lambda: run_cli(main, [cmd, "--config", str(path)], prog=prog))
    assert_user_error(Result([prog, cmd], status, "", err), prog, "root", status=1)


@pytest.mark.parametrize("prog,cmd", [("vpnd", "serve"), ("vpnclient", "up")])
def test_without_root_geteuid_monkeypatched(tmp_path, monkeypatch, capsys, prog, cmd):
    from vpncore.cli import run_cli
    if prog == "vpnd":
        import vpnd.__main__ as mod
        path = write(tmp_path / "vpnd.toml", SERVER_OK)
    else:
        import vpnclient.__main__ as mod
        path = write(tmp_path / "client.toml", CLIENT_OK)
    monkeypatch.setattr(mod.os, "geteuid", lambda: 1000)
    status = run_cli(mod.main, [cmd, "--config", str(path)], prog=prog)
    err = capsys.readouterr().err
    assert_user_error(Result([prog, cmd], status, "", err), prog, "root", status=1)
