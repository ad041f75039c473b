"""Resolver save/restore, the state file, crash recovery and the kill switch's rules (issue 6).

Unit tests on temporary files: never the machine's /etc/resolv.conf. The kill switch's nft calls
are replaced by a recorder here; tests/e2e/test_leaks.py runs the real ones in namespaces.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import stat
from types import SimpleNamespace

import pytest

from vpnclient import guard as guardmod
from vpnclient import killswitch, resolver, state
from vpncore.cli import UserError

ORIGINAL = b"# the machine's own resolver\nnameserver 198.18.0.1\nsearch example.test\n\xff binary tail \x00\n"


@pytest.fixture
def resolv(tmp_path):
    path = tmp_path / "etc" / "resolv.conf"
    path.parent.mkdir()
    path.write_bytes(ORIGINAL)
    path.chmod(0o640)
    return path


def test_file_saved_pointed_and_restored_byte_for_byte(resolv):
    saved = resolver.snapshot(str(resolv))
    json.dumps(saved)                                  # it goes into the state file
    resolver.point_at(saved, ["198.19.0.1", "2001:2:0:100::1"])
    text = resolv.read_text()
    assert text.endswith("nameserver 198.19.0.1\nnameserver 2001:2:0:100::1\n") and text.startswith("#")
    assert stat.S_IMODE(resolv.stat().st_mode) == 0o644       # readable by every resolver user while up
    resolver.restore(saved)
    assert resolv.read_bytes() == ORIGINAL
    assert stat.S_IMODE(resolv.stat().st_mode) == 0o640
    assert sorted(os.listdir(resolv.parent)) == ["resolv.conf"]     # no temporary file left


def test_symlink_is_replaced_not_followed_and_comes_back(tmp_path):
    target = tmp_path / "stub-resolv.conf"
    target.write_bytes(ORIGINAL)
    link = tmp_path / "resolv.conf"
    link.symlink_to("stub-resolv.conf")
    saved = resolver.snapshot(str(link))
    assert saved == {"path": str(link), "kind": "symlink", "target": "stub-resolv.conf"}
    resolver.point_at(saved, ["198.19.0.1"])
    assert not link.is_symlink() and b"198.19.0.1" in link.read_bytes()
    assert target.read_bytes() == ORIGINAL                       # the stub manager's file is untouched
    resolver.restore(saved)
    assert link.is_symlink() and os.readlink(link) == "stub-resolv.conf"


def test_missing_file_is_created_then_removed(tmp_path):
    path = tmp_path / "resolv.conf"
    saved = resolver.snapshot(str(path))
    assert saved["kind"] == "absent"
    resolver.point_at(saved, ["198.19.0.1"])
    assert path.exists()
    resolver.restore(saved)
    assert not path.exists()


def test_mount_point_is_written_in_place(resolv, monkeypatch):
    """A bind-mounted resolver file (containers, `ip netns exec`) cannot be renamed over."""
    inode = resolv.stat().st_ino
    saved = resolver.snapshot(str(resolv))

    def busy(src, dst):
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(resolver.os, "replace", busy)
    resolver.point_at(saved, ["198.19.0.1"])
    assert resolv.stat().st_ino == inode and b"198.19.0.1" in resolv.read_bytes()
    resolver.restore(saved)
    assert resolv.stat().st_ino == inode and resolv.read_bytes() == ORIGINAL
    assert stat.S_IMODE(resolv.stat().st_mode) == 0o640
    assert sorted(os.listdir(resolv.parent)) == ["resolv.conf"]


def test_a_directory_is_refused_with_one_line(tmp_path):
    with pytest.raises(UserError, match="not a regular file") as info:
        resolver.snapshot(str(tmp_path))
    assert info.value.status == 1


def test_state_file_is_private_and_atomic(tmp_path):
    path = str(tmp_path / "state" / "vpn0.json")
    state.save(path, {"interface": "vpn0", "resolver": None})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert state.load(path) == {"interface": "vpn0", "resolver": None, "version": 1}
    assert os.listdir(os.path.dirname(path)) == ["vpn0.json"]
    state.remove(path)
    state.remove(path)                  # twice is fine
    assert state.load(path) is None
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="unreadable") as info:
        state.load(path)
    assert info.value.status == 1


# --- the guard: the order of changes, and recovery after a crash --------------------------------

class FakeNft:
    def __init__(self):
        self.table = None            # (ifname, endpoints, tunnel_ipv6) while "installed"
        self.calls = []

    def install(self, ifname, endpoints, tunnel_ipv6=False):
        self.calls.append(("install", tunnel_ipv6))
        self.table = (ifname, list(endpoints), tunnel_ipv6)

    def present(self):
        return self.table is not None

    def remove(self):
        self.calls.append(("remove",))
        had, self.table = self.table is not None, None
        return had


@pytest.fixture
def nft(monkeypatch):
    fake = FakeNft()
    for name in ("install", "present", "remove"):
        monkeypatch.setattr(killswitch, name, getattr(fake, name))
    return fake


def cfg_for(tmp_path, resolv):
    return SimpleNamespace(interface="vpn0", resolv_conf=str(resolv), control_socket=str(tmp_path / "c.sock"),
                           state_file=str(tmp_path / "state" / "vpn0.json"))


def test_guard_orderly_run(tmp_path, resolv, nft):
    cfg = cfg_for(tmp_path, resolv)
    g = guardmod.Guard(cfg, kill_switch=True, out=lambda line: None)
    assert g.recover() == {}
    g.engage([("198.18.0.1", 51820)], {"a:1": ["198.18.0.1"]})
    assert nft.table == ("vpn0", [("198.18.0.1", 51820)], False)
    assert state.load(cfg.state_file)["resolver"] is None          # nothing replaced yet
    lines = g.apply(["198.19.0.2/24"], ["198.19.0.1"])
    assert any("IPv6 is blocked" in line for line in lines)
    assert nft.table[2] is False
    saved = state.load(cfg.state_file)["resolver"]                  # saved before the write
    assert saved["kind"] == "file" and saved["mode"] == 0o640
    assert b"198.19.0.1" in resolv.read_bytes()
    assert g.apply(["198.19.0.2/24"], ["198.19.0.1"]) == []          # a repeated config says nothing
    g.apply(["198.19.0.2/24", "2001:2:0:100::2/64"], ["198.19.0.1"])
    assert nft.table[2] is True                                      # IPv6 through the tunnel only now
    g.release()
    assert resolv.read_bytes() == ORIGINAL and stat.S_IMODE(resolv.stat().st_mode) == 0o640
    assert nft.table is None and not os.path.exists(cfg.state_file)


def test_crash_then_next_up_restores_first(tmp_path, resolv, nft):
    cfg = cfg_for(tmp_path, resolv)
    g = guardmod.Guard(cfg, kill_switch=True, out=lambda line: None)
    g.recover()
    g.engage([("198.18.0.1", 51820)], {"host:1": ["198.18.0.1"]})
    g.apply(["198.19.0.2/24"], ["198.19.0.1"])
    del g                                       # SIGKILL: nothing undone, the table stays
    assert nft.table is not None and b"198.19.0.1" in resolv.read_bytes()
    lines = []
    g2 = guardmod.Guard(cfg, kill_switch=True, out=lines.append)
    cache = g2.recover()
    assert resolv.read_bytes() == ORIGINAL and "restored" in lines[0]
    assert cache == {"host:1": ["198.18.0.1"]}
    assert nft.table is not None and ("remove",) not in nft.calls   # never a gap in the kill switch
    g2.engage([("198.18.0.1", 51820)], cache)
    g2.apply(["198.19.0.2/24"], ["198.19.0.1"])
    # the saved original is the machine's, not the tunnel's resolver of the crashed run
    assert base64.b64decode(state.load(cfg.state_file)["resolver"]["data"]) == ORIGINAL
    g2.release()
    assert resolv.read_bytes() == ORIGINAL and nft.table is None


def test_crash_then_down_without_a_client(tmp_path, resolv, nft):
    cfg = cfg_for(tmp_path, resolv)
    g = guardmod.Guard(cfg, kill_switch=True, out=lambda line: None)
    g.engage([("198.18.0.1", 51820)], {})
    g.apply(["198.19.0.2/24"], ["198.19.0.1"])
    out = []
    assert guardmod.undo_crashed_run(cfg, running=lambda path: True, out=out.append) is False   # owner alive
    assert nft.table is not None and b"198.19.0.1" in resolv.read_bytes()
    assert guardmod.undo_crashed_run(cfg, running=lambda path: False, out=out.append) is True
    assert resolv.read_bytes() == ORIGINAL and stat.S_IMODE(resolv.stat().st_mode) == 0o640
    assert nft.table is None and not os.path.exists(cfg.state_file)
    assert guardmod.undo_crashed_run(cfg, running=lambda path: False, out=out.append) is False   # nothing left


def test_no_kill_switch_removes_a_stale_one(tmp_path, resolv, nft):
    nft.table = ("vpn0", [], False)            # left by a crashed run
    lines = []
    g = guardmod.Guard(cfg_for(tmp_path, resolv), kill_switch=False, out=lines.append)
    g.engage([("198.18.0.1", 51820)], {})
    assert nft.table is None and "removed the kill switch" in lines[0] and "no kill switch" in lines[1]
    g.apply(["198.19.0.2/24"], ["198.19.0.1"])
    assert ("install", False) not in nft.calls and ("install", True) not in nft.calls
    g.release()
    assert resolv.read_bytes() == ORIGINAL


def test_shared_host_resolver_is_left_alone(tmp_path, resolv, nft, monkeypatch):
    monkeypatch.setattr(resolver, "shared_with_host", lambda path: True)
    g = guardmod.Guard(cfg_for(tmp_path, resolv), kill_switch=True, out=lambda line: None)
    g.engage([], {})
    lines = g.apply(["198.19.0.2/24"], ["198.19.0.1"])
    assert any("not changing" in line for line in lines)
    assert resolv.read_bytes() == ORIGINAL
    g.release()


# --- the kill switch's rules (text; applied for real in tests/e2e/test_leaks.py) -------------------

def test_ruleset_allows_only_the_tunnel_the_endpoints_and_link_housekeeping():
    text = killswitch.ruleset("vpn0", [("198.18.0.1", 51820), ("2001:2::1", 4500), ("198.18.0.1", 51820)], False)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[:3] == ["table inet vpnclient_killswitch", "delete table inet vpnclient_killswitch",
                         "table inet vpnclient_killswitch {"]        # one transaction: replace, no gap
    assert "type filter hook output priority filter; policy drop;" in lines
    assert "type filter hook forward priority filter; policy drop;" in lines
    accepts = [line for line in lines if line.endswith("accept")]
    assert accepts.count('oifname "vpn0" meta nfproto ipv4 accept') == 2      # output and forward
    assert not any("ipv6 accept" in line and "vpn0" in line for line in accepts)   # no IPv6 address: none
    assert accepts.count("ip daddr 198.18.0.1 udp dport 51820 accept") == 1
    assert "ip6 daddr 2001:2::1 udp dport 4500 accept" in accepts
    assert 'oifname "lo" accept' in accepts
    assert all("53" not in line.split() for line in lines)                      # DNS has no way around
    six = killswitch.ruleset("vpn0", [], True)
    assert six.count('oifname "vpn0" meta nfproto ipv6 accept') == 2


def test_ruleset_refuses_names_and_odd_interfaces():
    with pytest.raises(ValueError):
        killswitch.ruleset("vpn0", [("vpn.example.org", 51820)], False)
    with pytest.raises(UserError):
        killswitch.ruleset('vpn0" accept', [], False)
