"""systemd's notify protocol by hand (vpncore/sdnotify.py), and vpnd/vpnclient speaking it.

The tests play the service manager: a Unix datagram socket they listen on (a path in a temporary
directory, or an abstract name), with SO_PASSCRED so every datagram carries the sender's PID, as
systemd checks for NotifyAccess=main. Unit tests of the module first (in this process and in a
child process given NOTIFY_SOCKET), then the real vpnd and vpnclient in network namespaces with
NOTIFY_SOCKET and WATCHDOG_USEC=1000000: READY=1 only once the TUN device is configured,
WATCHDOG=1 every half second while they run, STOPPING=1 at SIGTERM.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vpncore import sdnotify

REPO = Path(__file__).resolve().parents[1]
SERVER_MESSAGES = {"READY=1\nSTATUS=serving", "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"}
CLIENT_MESSAGES = {"READY=1\nSTATUS=connected", "WATCHDOG=1"}


class Manager:
    """The service manager's end: a datagram socket with the sender's credentials on each message."""

    def __init__(self, address: str):
        self.address = address               # what NOTIFY_SOCKET says: a path or "@name"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def recv(self, timeout: float) -> tuple[str, int] | None:
        """(text, sender PID) of the next datagram, or None after `timeout` s."""
        self.sock.settimeout(max(0.001, timeout))
        try:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except (TimeoutError, socket.timeout):
            return None
        pid = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        return data.decode(), pid

    def drain(self) -> list[str]:
        out = []
        while (m := self.recv(0.05)) is not None:
            out.append(m[0])
        return out

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass


@pytest.fixture(params=["path", "abstract"])
def manager(request, tmp_path, monkeypatch):
    address = str(tmp_path / "notify") if request.param == "path" else f"@vpnt-notify-{secrets.token_hex(6)}"
    m = Manager(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield m
    finally:
        m.close()


# -- the module ---------------------------------------------------------------------------------

def test_unset_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    before = sdnotify.failures
    assert not sdnotify.enabled()
    assert sdnotify.ready("serving") is False
    assert sdnotify.watchdog() is False
    assert sdnotify.stopping() is False
    assert sdnotify.status("serving") is False
    assert sdnotify.watchdog_interval() is None       # nobody to ping
    assert sdnotify.failures == before                # not a failure: nothing was asked for


def test_each_call_is_one_datagram_with_our_pid(manager):
    assert sdnotify.enabled()
    assert sdnotify.ready("serving")
    assert sdnotify.status("connected")
    assert sdnotify.watchdog()
    assert sdnotify.stopping()
    got = [manager.recv(2) for _ in range(4)]
    assert [g[0] for g in got] == ["READY=1\nSTATUS=serving", "STATUS=connected", "WATCHDOG=1",
                                   "STOPPING=1\nSTATUS=stopping"]
    assert {g[1] for g in got} == {os.getpid()}      # what NotifyAccess=main checks
    assert manager.recv(0.1) is None


@pytest.mark.parametrize("text", ["198.51.100.7", "2001:db8::1", "3 sessions", "key AbC9+/=", "since 12:03",
                                  "", "x" * 64, "Serving", "serving\nREADY=1", "serving; rm"])
def test_status_text_is_fixed_words_only(manager, text):
    before = sdnotify.failures
    assert sdnotify.status(text) is False
    assert sdnotify.failures == before + 1
    assert sdnotify.ready(text) is True               # READY=1 still goes, without the text
    assert manager.recv(2)[0] == "READY=1"
    assert manager.recv(0.1) is None


@pytest.mark.parametrize("address", ["/nonexistent/vpnt/notify", "relative/notify", "vsock:2:1234",
                                     "@", "/" + "x" * 200, "@vpnt-nobody-listens"])
def test_a_failed_send_is_counted_never_raised(monkeypatch, address):
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    before = sdnotify.failures
    assert sdnotify.ready("serving") is False
    assert sdnotify.watchdog() is False
    assert sdnotify.failures == before + 2


def test_a_refused_socket_family_is_counted_never_raised(manager, monkeypatch):
    def refused(*a, **k):
        raise PermissionError(1, "Operation not permitted")     # RestrictAddressFamilies= without AF_UNIX
    monkeypatch.setattr(sdnotify.socket, "socket", refused)
    before = sdnotify.failures
    assert sdnotify.watchdog() is False
    assert sdnotify.failures == before + 1


def test_a_manager_that_does_not_read_never_blocks_us(manager):
    manager.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = sdnotify.failures
    start = time.monotonic()
    sent = sum(sdnotify.watchdog() for _ in range(3000))
    assert time.monotonic() - start < 10
    assert 0 < sent < 3000                            # the queue filled up; the rest were dropped
    assert sdnotify.failures == before + 3000 - sent


def test_a_socket_that_went_away(manager):
    manager.close()
    before = sdnotify.failures
    assert sdnotify.watchdog() is False
    assert sdnotify.failures == before + 1


@pytest.mark.parametrize("usec,pid,expect", [
    ("1000000", None, 0.5), ("30000000", None, 15.0), ("30000000", "self", 15.0), ("30000000", "other", None),
    ("30000000", "garbage", None), ("0", None, None), ("-5", None, None), ("", None, None), ("abc", None, None),
    (None, None, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(manager, monkeypatch, usec, pid, expect):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid))
    assert sdnotify.watchdog_interval() == expect


def test_watchdog_interval_needs_a_manager(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert sdnotify.watchdog_interval() is None


def test_a_child_process_given_notify_socket(manager):
    code = ("from vpncore import sdnotify as n\n"
            "assert n.ready('serving') and n.watchdog() and n.stopping()\n"
            "print(n.watchdog_interval())\n")
    env = dict(os.environ, NOTIFY_SOCKET=manager.address, WATCHDOG_USEC="2000000", PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0 and out.strip() == "1.0"
    got = [manager.recv(5) for _ in range(3)]
    assert [g[0] for g in got] == ["READY=1\nSTATUS=serving", "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"]
    assert {g[1] for g in got} == {child.pid}


# -- the capability check of 'vpnd serve' and 'vpnclient up' ------------------------------------

NET_ADMIN = 1 << 12
ALL = (1 << 41) - 1


@pytest.mark.parametrize("euid,sets,expect", [
    (0, {"CapEff": ALL, "CapBnd": ALL, "CapAmb": 0, "CapInh": 0}, True),                 # plain root
    (0, {"CapEff": 0, "CapBnd": ALL, "CapAmb": 0, "CapInh": 0}, False),                  # root, caps dropped
    (0, {"CapEff": NET_ADMIN, "CapBnd": NET_ADMIN, "CapAmb": 0, "CapInh": 0}, True),     # root, bounded
    (0, {"CapEff": NET_ADMIN, "CapBnd": 0, "CapAmb": 0, "CapInh": 0}, False),            # helpers would lose it
    (1000, {"CapEff": NET_ADMIN, "CapBnd": ALL, "CapAmb": NET_ADMIN, "CapInh": NET_ADMIN}, True),  # the unit
    (1000, {"CapEff": ALL, "CapBnd": ALL, "CapAmb": 0, "CapInh": 0}, False),             # nft would not get it
    (1000, {"CapEff": 0, "CapBnd": ALL, "CapAmb": 0, "CapInh": 0}, False),               # an ordinary user
    (1000, {"CapEff": 1 << 10, "CapBnd": ALL, "CapAmb": 1 << 10, "CapInh": 1 << 10}, False),  # another cap
])
def test_has_net_admin(monkeypatch, euid, sets, expect):
    monkeypatch.setattr(sdnotify, "_capability_sets", lambda path="/proc/self/status": sets)
    monkeypatch.setattr(sdnotify.os, "geteuid", lambda: euid)
    assert sdnotify.has_net_admin() is expect


def test_has_net_admin_without_proc(monkeypatch):
    monkeypatch.setattr(sdnotify, "_capability_sets", lambda path="/proc/self/status": None)
    monkeypatch.setattr(sdnotify.os, "geteuid", lambda: 0)
    assert sdnotify.has_net_admin() is True
    monkeypatch.setattr(sdnotify.os, "geteuid", lambda: 1000)
    assert sdnotify.has_net_admin() is False


def test_capability_sets_parse_proc_status(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tvpnd\nUid:\t998\t998\t998\t998\nCapInh:\t0000000000001000\n"
                      "CapPrm:\t0000000000001400\nCapEff:\t0000000000001400\nCapBnd:\t000001ffffffffff\n"
                      "CapAmb:\t0000000000001000\n")
    assert sdnotify._capability_sets(str(status)) == {"CapInh": 0x1000, "CapPrm": 0x1400, "CapEff": 0x1400,
                                                      "CapBnd": 0x1ffffffffff, "CapAmb": 0x1000}
    status.write_text("Name:\tx\nCapEff:\tnot-hex\n")
    assert sdnotify._capability_sets(str(status)) is None
    assert sdnotify._capability_sets(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("bounding,expect", [("-all", "False"), ("-all,+net_admin", "True"),
                                             ("-all,+net_bind_service", "False")])
def test_has_net_admin_in_a_real_process(bounding, expect):
    """As root with the bounding set cut (what CapabilityBoundingSet= does): only CAP_NET_ADMIN counts."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to cut the bounding set")
    r = subprocess.run(["setpriv", "--inh-caps=-all", f"--bounding-set={bounding}", "--", sys.executable, "-c",
                        "from vpncore.sdnotify import has_net_admin; print(has_net_admin())"],
                       capture_output=True, text=True, timeout=30, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expect


# -- the real vpnd and vpnclient ----------------------------------------------------------------

def _collect(manager: Manager, proc: subprocess.Popen, until, timeout: float) -> list[tuple[float, str, int]]:
    """Datagrams until `until(text)` is true for one (included), the process ends, or `timeout` s."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = manager.recv(min(0.2, max(0.0, deadline - time.monotonic())))
        if m is None:
            if proc.poll() is not None:
                break
            continue
        got.append((time.monotonic(), *m))
        if until(m[0]):
            break
    return got


def _env(address: str) -> dict:
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="1000000")
    env.pop("WATCHDOG_PID", None)
    return env


def _log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


def _spawn(topo, ns: str, log, manager: Manager, *argv: str) -> subprocess.Popen:
    """`argv` in namespace `ns` with NOTIFY_SOCKET (and a watchdog) pointing at `manager`."""
    with open(log, "ab") as out:
        return topo.popen(ns, *argv, stdout=out, stderr=subprocess.STDOUT, env=_env(manager.address))


def _ready(text: str) -> bool:
    return "READY=1" in text.split("\n")


@pytest.mark.netns
def test_vpnd_ready_after_the_tun_watchdog_while_running_stopping_at_sigterm(workdir, topology):
    from tests.e2e import vpn
    from tests.e2e.netns import link_exists

    topo = topology
    manager = Manager(str(workdir / "notify"))        # a path: abstract names stay in their netns
    try:
        keys = vpn.genkeys()
        config = vpn.write_server_config(workdir / "vpnd.toml", keys, [vpn.genkeys()])
        log = workdir / "vpnd.log"
        proc = _spawn(topo, topo.server, log, manager, vpn.VPND, "serve", "--config", str(config))
        tun_at_ready = {}

        def ready(text: str) -> bool:
            if _ready(text):
                # at once, while vpnd runs on: the device and its pool addresses must already be there
                tun_at_ready["link"] = link_exists(vpn.SERVER_IF, topo.server)
                tun_at_ready["addresses"] = vpn._server_ready(topo, topo.server)
                return True
            return False

        got = _collect(manager, proc, ready, 60)
        assert got and got[-1][1] == "READY=1\nSTATUS=serving", f"{got}\n{_log(log)}"
        assert len(got) == 1, f"READY=1 must come first: {got}"
        assert tun_at_ready == {"link": True, "addresses": True}, f"{tun_at_ready}\n{_log(log)}"
        assert got[0][2] == proc.pid                                # the main process (NotifyAccess=main)

        pings = _collect(manager, proc, lambda text: False, 3.0)
        texts = [t for _, t, _ in pings]
        assert texts.count("WATCHDOG=1") >= 3, f"{texts}\n{_log(log)}"   # every 0.5 s: about 6
        assert set(texts) == {"WATCHDOG=1"} and {p for _, _, p in pings} == {proc.pid}
        gaps = [b[0] - a[0] for a, b in zip(pings, pings[1:])]
        print(f"watchdog pings in 3 s: {len(pings)}, largest gap {max(gaps):.2f} s (WATCHDOG_USEC: 1 s)")
        assert max(gaps) < 5

        os.kill(proc.pid, signal.SIGTERM)
        end = _collect(manager, proc, lambda text: text.startswith("STOPPING=1"), 30)
        assert end and end[-1][1] == "STOPPING=1\nSTATUS=stopping", f"{end}\n{_log(log)}"
        assert proc.wait(30) == 0, _log(log)
        assert not link_exists(vpn.SERVER_IF, topo.server)
        everything = {t for _, t, _ in got + pings + end} | set(manager.drain())
        assert everything <= SERVER_MESSAGES, everything       # fixed text only: no address, key or time
    finally:
        manager.close()


@pytest.mark.netns
def test_vpnclient_ready_once_the_tunnel_is_configured(workdir, topology):
    from tests.e2e import vpn

    topo = topology
    manager = Manager(str(workdir / "notify"))
    try:
        server_keys, client_keys = vpn.genkeys(), vpn.genkeys()
        vpn.start_server(topo, workdir, server_keys, [client_keys], timeout=60)
        sock = workdir / "client.sock"
        config = vpn.write_client_config(workdir / "client.toml", client_keys, server_keys.public,
                                         f"{topo.link.server_ip4}:{vpn.PORT}", sock)
        resolv = workdir / "client.resolv.conf"
        log = workdir / "client.log"
        proc = _spawn(topo, topo.client, log, manager, vpn.VPNCLIENT, "up", "--config", str(config))
        seen = {}

        def ready(text: str) -> bool:
            if _ready(text):
                r = topo.run(topo.client, "ip", "-o", "addr", "show", "dev", vpn.CLIENT_IF, check=False)
                seen["address"] = " 198.19.0.2/24 " in r.stdout
                seen["dns"] = resolv.exists() and "nameserver 198.19.0.1" in resolv.read_text()
                return True
            return False

        got = _collect(manager, proc, ready, 60)
        assert got and got[-1][1] == "READY=1\nSTATUS=connected", f"{got}\n{_log(log)}"
        assert seen == {"address": True, "dns": True}, f"{seen}\n{_log(log)}"
        assert {p for _, _, p in got} == {proc.pid}
        assert vpn.ping(topo, topo.client, vpn.SERVER_TUN4).returncode == 0

        pings = _collect(manager, proc, lambda text: False, 3.0)
        texts = [t for _, t, _ in pings]
        assert texts.count("WATCHDOG=1") >= 3, f"{texts}\n{_log(log)}"
        assert {t for _, t, _ in got + pings} <= CLIENT_MESSAGES
        assert topo.stop(proc, 20) == 0, _log(log)
    finally:
        manager.close()
