"""Issue 12, client side, without root: full-tunnel rules, config keys, the bypass program, the CLI."""

from __future__ import annotations

import struct

import pytest

from vpnclient import bypass, routing
from vpnclient.__main__ import build_parser
from vpnclient.config import load
from vpnclient.system import Applied
from vpncore.keys import genkey
from vpncore.cli import UserError


def test_families_follow_the_server_unless_the_config_decides():
    addrs = ["198.19.0.2/24", "2001:2:0:100::2/64"]
    assert routing.families(["198.19.0.0/24", "0.0.0.0/0"], addrs, None) == [4]
    assert routing.families(["0.0.0.0/0", "::/0"], addrs, None) == [4, 6]
    assert routing.families(["198.19.0.0/24"], addrs, None) == []
    assert routing.families(["198.19.0.0/24"], addrs, True) == [4, 6]
    assert routing.families(["198.19.0.0/24"], addrs[:1], True) == [4]
    assert routing.families(["0.0.0.0/0", "::/0"], addrs, False) == []
    # every spelling of a default route the control channel accepts (SPEC §6.2.2) is one
    assert routing.families(["0.0.0.0/00", "::0/0"], addrs, None) == [4, 6]
    assert routing.families(["0:0::/0", "1.2.3.4/0"], addrs, None) == [4, 6]


def test_commands_put_the_default_route_in_our_table_and_the_tunnel_rule_last():
    cmds = [" ".join(c) for c in routing.commands("vpn0", [4, 6], 51820, 0xCA6C, ["203.0.113.0/24"], True)]
    assert cmds[:7] == [
        "ip -4 route replace default dev vpn0 table 51820",
        "ip -4 rule add to 203.0.113.0/24 lookup main pref 32760",
        "ip -4 rule add to 10.0.0.0/8 lookup main pref 32760",
        "ip -4 rule add to 172.16.0.0/12 lookup main pref 32760",
        "ip -4 rule add to 192.168.0.0/16 lookup main pref 32760",
        "ip -4 rule add to 169.254.0.0/16 lookup main pref 32760",
        "ip -4 rule add table main suppress_prefixlength 0 pref 32761",
    ]
    assert cmds[7] == "ip -4 rule add not fwmark 0xca6c table 51820 pref 32762"
    assert cmds[8:] == ["ip -6 route replace default dev vpn0 table 51820",
                        "ip -6 rule add to fc00::/7 lookup main pref 32760",
                        "ip -6 rule add table main suppress_prefixlength 0 pref 32761",
                        "ip -6 rule add not fwmark 0xca6c table 51820 pref 32762"]
    assert not any("table main" in c and "route" in c for c in cmds)     # the main table is never changed
    assert routing.PREF_EXCLUDE < routing.PREF_SUPPRESS < routing.PREF_TUNNEL < 32766


def test_mark_table_saves_and_restores_the_mark_through_conntrack():
    script = routing.nft_script(0xCA6C)
    assert "delete table inet vpnclient_marks" in script
    assert "ct mark 0xca6c meta mark set ct mark" in script and "meta mark 0xca6c ct mark set meta mark" in script


def test_default_routes_never_reach_the_main_table(monkeypatch):
    added = []
    monkeypatch.setattr("vpnclient.system.tunlib.add_route", lambda dev, r: added.append(r))
    monkeypatch.setattr("vpnclient.system.tunlib.set_mtu", lambda *a: None)
    monkeypatch.setattr("vpnclient.system.tunlib.set_gso_max_size", lambda *a: None)
    monkeypatch.setattr("vpnclient.system.tunlib.add_address", lambda *a: None)
    a = Applied("vpn0")
    a.apply({"mtu": 1420, "ipv4": "198.19.0.2/24", "routes": ["198.19.0.0/24", "0.0.0.0/0", "::/0", "::0/0"]})
    assert added == ["198.19.0.0/24"] and a.routes == ["198.19.0.0/24", "0.0.0.0/0", "::/0", "::0/0"]


def _config(tmp_path, client_lines: str):
    p = tmp_path / "c.toml"
    p.write_text(f'[client]\nprivate_key = "{genkey()}"\n{client_lines}\n'
                 f'[server]\nendpoint = "198.18.0.1:51820"\npublic_key = "{genkey()}"\n')
    return str(p)


def test_config_defaults(tmp_path):
    cfg = load(_config(tmp_path, ""))
    assert (cfg.full_tunnel, cfg.allow_lan, cfg.exclude, cfg.fwmark, cfg.route_table, cfg.kill_switch) == \
        (None, False, [], 0xCA6C, 51820, True)


def test_config_keys(tmp_path):
    cfg = load(_config(tmp_path, 'full_tunnel = false\nallow_lan = true\nkill_switch = "always"\n'
                                 'exclude = ["203.0.113.0/24", "2001:db8::/32"]\nfwmark = 7\nroute_table = 100\n'))
    assert (cfg.full_tunnel, cfg.allow_lan, cfg.kill_switch, cfg.fwmark, cfg.route_table) == \
        (False, True, "always", 7, 100)
    assert cfg.exclude == ["203.0.113.0/24", "2001:db8::/32"]


@pytest.mark.parametrize("line, words", [
    ('exclude = ["nope"]', "is not a network"),
    ('exclude = ["203.0.113.1/24"]', "did you mean 203.0.113.0/24"),
    ('exclude = ["0.0.0.0/0"]', "full_tunnel = false"),
    ('exclude = "203.0.113.0/24"', "list of at most"),
    ("exclude = [5]", "is not a network"),
    ('kill_switch = "sometimes"', '"always"'),
    ("full_tunnel = 1", "true or false"),
    ("allow_lan = \"yes\"", "true or false"),
    ("fwmark = 0", "fwmark must be"),
    ("route_table = 254", "system table"),
    ("route_table = -1", "route_table must be"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, line, words):
    with pytest.raises(UserError) as info:
        load(_config(tmp_path, line))
    assert info.value.status == 2 and words in str(info.value) and "\n" not in str(info.value)


def test_bypass_program_sets_the_socket_mark():
    insns = bypass.program(0xCA6C)
    assert len(insns) == 32
    op, regs, off, imm = struct.unpack_from("<BBhi", insns, 8)
    assert (op, regs, off) == (0x63, 0x21, bypass.BPF_SOCK_MARK_OFFSET)      # *(u32 *)(r1 + 16) = r2
    assert struct.unpack_from("<BBhi", insns, 0)[3] == 0xCA6C
    assert struct.unpack_from("<BBhi", bypass.program(0xFFFFFFFF), 0)[3] == -1   # a 32-bit immediate


def test_bypass_needs_a_command_and_a_cgroup():
    with pytest.raises(UserError, match="which program"):
        bypass.run("/nowhere", "", [])
    with pytest.raises(UserError) as info:
        bypass.run(None, "no cgroup v2 hierarchy is mounted here", ["true"])
    assert info.value.status == 1 and "no cgroup v2" in str(info.value)


def test_cli_documents_the_choices():
    text = build_parser().format_help()
    for word in ("allow_lan", "exclude", "full_tunnel", '"always"', "--disable-kill-switch", "bypass"):
        assert word in text
    args = build_parser().parse_args(["down", "--disable-kill-switch"])
    assert args.disable_kill_switch
    args = build_parser().parse_args(["bypass", "--", "curl", "-s", "x"])
    assert args.command == ["--", "curl", "-s", "x"]
