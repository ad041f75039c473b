"""Issue 12 part 4 without root: the kill switch fails closed and a permanent one outlives 'down'."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from vpnclient import guard as guardmod
from vpnclient import killswitch, routing, state


class FakeNft:
    def __init__(self):
        self.table = None

    def install(self, ifname, endpoints, tunnel_ipv6=False, accept=(), mark=0):
        self.table = (ifname, list(endpoints), tunnel_ipv6, list(accept), mark)

    def present(self):
        return self.table is not None

    def remove(self):
        had, self.table = self.table is not None, None
        return had


@pytest.fixture
def nft(monkeypatch):
    fake = FakeNft()
    for name in ("install", "present", "remove"):
        monkeypatch.setattr(killswitch, name, getattr(fake, name))
    monkeypatch.setattr(killswitch, "attached_networks", lambda skip: ["198.18.210.0/24"])
    removed = []
    monkeypatch.setattr(routing, "remove", lambda table: removed.append(table) or False)
    fake.routing_removed = removed
    return fake


def cfg_for(tmp_path, **kw):
    base = dict(interface="vpn0", resolv_conf=str(tmp_path / "resolv.conf"), control_socket=str(tmp_path / "c.sock"),
                state_file=str(tmp_path / "state" / "vpn0.json"), config_path="/etc/vpnclient/vpn0.toml",
                exclude=["203.0.113.0/24"], allow_lan=True, fwmark=0xCA6C, route_table=51820, full_tunnel=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_ruleset_accepts_the_mark_exclude_and_lan():
    text = killswitch.ruleset("vpn0", [("198.18.0.1", 51820)], True, ["203.0.113.0/24", "fc00::/7"], 0xCA6C)
    assert "meta mark 0xca6c accept" in text
    assert "ip daddr 203.0.113.0/24 accept" in text and "ip6 daddr fc00::/7 accept" in text
    assert "ip daddr 198.18.0.1 udp dport 51820 accept" in text
    assert text.index("accept") < text.index("counter drop")
    plain = killswitch.ruleset("vpn0", [("198.18.0.1", 51820)], False)
    assert "meta mark" not in plain and "daddr 203.0.113" not in plain


def test_guard_installs_the_choices_into_the_kill_switch(tmp_path, nft):
    g = guardmod.Guard(cfg_for(tmp_path), kill_switch=True, out=lambda line: None)
    g.engage([("198.18.0.1", 51820)], {})
    _, _, _, accept, mark = nft.table
    assert mark == 0xCA6C and "203.0.113.0/24" in accept and "198.18.210.0/24" in accept
    assert "10.0.0.0/8" in accept and "fe80::/10" in accept


def test_a_failed_run_keeps_the_kill_switch_until_down(tmp_path, nft):
    cfg = cfg_for(tmp_path)
    g = guardmod.Guard(cfg, kill_switch=True, out=lambda line: None)
    g.engage([("198.18.0.1", 51820)], {})
    lines = g.release(failed=True)
    assert nft.table is not None and any("stays on" in line and "vpnclient down --config" in line for line in lines)
    assert state.load(cfg.state_file)["control_socket"] is None          # 'down' needs no client
    out = []
    assert guardmod.undo_crashed_run(cfg, running=lambda p: False, out=out.append) is True
    assert nft.table is None and not os.path.exists(cfg.state_file)


def test_an_orderly_stop_removes_it(tmp_path, nft):
    g = guardmod.Guard(cfg_for(tmp_path), kill_switch=True, out=lambda line: None)
    g.engage([("198.18.0.1", 51820)], {})
    assert "vpnclient: kill switch off" in g.release(failed=False) and nft.table is None


def test_permanent_kill_switch_outlives_down_until_disabled(tmp_path, nft):
    cfg = cfg_for(tmp_path, kill_switch="always")
    g = guardmod.Guard(cfg, kill_switch="always", out=lambda line: None)
    g.engage([("198.18.0.1", 51820)], {})
    lines = g.release(failed=False)                       # down, Ctrl-C, SIGTERM
    assert nft.table is not None and any("--disable-kill-switch" in line for line in lines)
    out = []
    assert guardmod.undo_crashed_run(cfg, running=lambda p: False, out=out.append) is True
    assert nft.table is not None and any('"always"' in line for line in out)      # a plain down keeps it
    assert guardmod.undo_crashed_run(cfg, running=lambda p: False, out=out.append, disable_kill_switch=True)
    assert nft.table is None and not os.path.exists(cfg.state_file)


def test_disable_without_a_state_file_removes_a_stray_table(tmp_path, nft):
    nft.table = ("vpn0", [], False, [], 0)
    out = []
    cfg = cfg_for(tmp_path)
    assert guardmod.undo_crashed_run(cfg, running=lambda p: False, out=out.append) is False
    assert nft.table is not None and "--disable-kill-switch" in out[0]
    assert guardmod.undo_crashed_run(cfg, running=lambda p: False, out=out.append, disable_kill_switch=True)
    assert nft.table is None


def test_routing_recorded_before_install_and_undone_after_a_crash(tmp_path, nft, monkeypatch):
    cfg = cfg_for(tmp_path)
    seen = {}
    monkeypatch.setattr(routing, "read_src_valid_mark", lambda: seen.get("svm", "0"))
    monkeypatch.setattr(routing, "write_src_valid_mark", lambda v: seen.__setitem__("svm", v))

    def install(ifname, fams, table, fwmark, exclude, allow_lan):
        seen["state"] = state.load(cfg.state_file)["routing"]          # on disk before the change
        seen["fams"] = fams

    monkeypatch.setattr(routing, "install", install)
    g = guardmod.Guard(cfg, kill_switch=True, out=lambda line: None)
    g.engage([("198.18.0.1", 51820)], {})
    lines = g.route("vpn0", ["198.19.0.0/24", "0.0.0.0/0"], ["198.19.0.2/24"])
    assert seen["state"] == {"table": 51820, "src_valid_mark": "0"} and seen["fams"] == [4]
    assert seen["svm"] == "1" and "full tunnel" in lines[0]
    assert g.route("vpn0", ["198.19.0.0/24", "0.0.0.0/0"], ["198.19.0.2/24"]) == []    # unchanged: nothing
    del g                                                                    # SIGKILL
    assert guardmod.undo_crashed_run(cfg, running=lambda p: False, out=lambda line: None)
    assert nft.routing_removed == [51820] and seen["svm"] == "0"
