"""vpnd full tunnel (issue 12, server side): config, egress detection, the nft script, FORWARD DROP
detection, ctnetlink parsing. Unit tests, no privileges."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct

import pytest

from vpncore.keys import genkey
from vpncore.proto import control
from vpncore.cli import UserError
from vpnd import config as scfg
from vpnd import conntrack, egress

KEY = genkey()
BASE = f'[server]\nprivate_key = "{KEY}"\naddress_pool4 = "198.19.0.0/24"\naddress_pool6 = "2001:2:0:100::/64"\n'


def load(tmp_path, extra: str = ""):
    p = tmp_path / "vpnd.toml"
    p.write_text(BASE + extra)
    return scfg.load(str(p))


def test_full_tunnel_pushes_both_defaults(tmp_path):
    cfg = load(tmp_path, "full_tunnel = true\npush_routes = [\"10.20.0.0/16\", \"0.0.0.0/0\"]\n")
    assert cfg.full_tunnel is True
    assert scfg.pushed_routes(cfg) == ["198.19.0.0/24", "2001:2:0:100::/64", "10.20.0.0/16", "0.0.0.0/0", "::/0"]
    assert scfg.pushed_routes(load(tmp_path)) == ["198.19.0.0/24", "2001:2:0:100::/64"]


def test_full_tunnel_ipv4_only_pushes_no_ipv6_default(tmp_path):
    p = tmp_path / "v4.toml"
    p.write_text(f'[server]\nprivate_key = "{KEY}"\naddress_pool4 = "198.19.0.0/24"\nfull_tunnel = true\n')
    assert scfg.pushed_routes(scfg.load(str(p))) == ["198.19.0.0/24", "0.0.0.0/0"]


def test_full_tunnel_must_be_bool(tmp_path):
    with pytest.raises(UserError, match="full_tunnel must be true or false"):
        load(tmp_path, 'full_tunnel = "yes"\n')


def test_route_limit_agrees_with_protocol(tmp_path):
    from vpncore.proto.constants import CONTROL_MAX_ITEMS
    # pools (2) + defaults (2) + n push_routes: exactly the protocol's limit loads, one more does not
    n = CONTROL_MAX_ITEMS - 4
    ok = ", ".join(f'"10.{i}.0.0/16"' for i in range(n))
    cfg = load(tmp_path, f"full_tunnel = true\npush_routes = [{ok}]\n")
    msg = {"type": "config", "version": 1, "mtu": 1420, "routes": scfg.pushed_routes(cfg), "dns": cfg.dns,
           "ipv4": "198.19.0.254/24", "ipv6": "2001:2:0:100:ffff:ffff:ffff:ffff/64"}
    control.encode(msg)          # what the server will send is what the client accepts
    over = ", ".join(f'"10.{i}.0.0/16"' for i in range(n + 1))
    with pytest.raises(UserError, match=rf"pushes {CONTROL_MAX_ITEMS + 1} routes.*{CONTROL_MAX_ITEMS}"):
        load(tmp_path, f"full_tunnel = true\npush_routes = [{over}]\n")


def test_route_bytes_limit_is_a_config_error(tmp_path):
    long6 = ", ".join(f'"2001:db8:{i:x}:ffff:ffff:ffff:ffff:ff00/120"' for i in range(27))
    with pytest.raises(UserError, match="too long for one config message"):
        load(tmp_path, f"push_routes = [{long6}]\n")


ROUTE4 = json.dumps([{"dst": "default", "gateway": "192.0.2.1", "dev": "eth0", "flags": []},
                     {"dst": "default", "gateway": "192.0.2.9", "dev": "wlan0", "metric": 600, "flags": []}])
ROUTE6 = json.dumps([{"dst": "default", "gateway": "fe80::1", "dev": "ens3", "metric": 1024, "pref": "medium"},
                     {"dst": "default", "metric": 100, "nexthops": [{"gateway": "fe80::2", "dev": "ens4"}]}])


def test_parse_default_route():
    assert egress.parse_default_route(ROUTE4) == "eth0"       # no metric is metric 0
    assert egress.parse_default_route(ROUTE6) == "ens4"       # lowest metric, multipath first hop
    assert egress.parse_default_route("[]") is None
    assert egress.parse_default_route("not json") is None
    assert egress.parse_default_route(json.dumps([{"dst": "default", "type": "unreachable", "dev": "lo"}])) is None


def test_egress_interfaces(tmp_path, monkeypatch):
    cfg = load(tmp_path, "full_tunnel = true\n")
    monkeypatch.setattr(egress, "default_route_interface", lambda v: {4: "eth0", 6: "ens3"}[v])
    assert egress.egress_interfaces(cfg) == {4: "eth0", 6: "ens3"}
    monkeypatch.setattr(egress, "default_route_interface", lambda v: "eth0" if v == 4 else None)
    with pytest.raises(UserError, match="no IPv6 default route.*egress_interface") as exc:
        egress.egress_interfaces(cfg)
    assert exc.value.status == 2
    cfg.egress_interface = "uplink"
    assert egress.egress_interfaces(cfg) == {4: "uplink", 6: "uplink"}
    assert egress.egress_interfaces(load(tmp_path)) == {}     # no full tunnel, no egress: nothing to find


def _egress(pool6="2001:2:0:100::/64", full=True, ports=(51820,)):
    return egress.Egress("vpnd0", [ipaddress.ip_network("198.19.0.0/24"), ipaddress.ip_network(pool6)],
                         {4: "eth0", 6: "eth1"}, [25], True, [], full_tunnel=full, listen_ports=ports)


def test_script_notrack_inbound_and_nat():
    e = _egress()
    s = e.script((["10.0.0.0/8"], ["fe80::/10"]), was_off=[4])
    assert "hook prerouting priority raw" in s and "hook output priority raw" in s
    assert 'iifname != "vpnd0" udp dport { 51820 } fib daddr type local notrack' in s
    assert "udp sport { 51820 } notrack" in s
    assert ('oifname "vpnd0" iifname != "vpnd0" ct state != { established, related } counter drop '
            'comment "inbound"') in s
    assert 'iifname "vpnd0" tcp dport { 25 } counter drop comment "blocked-port"' in s
    assert 'oifname "eth0" ip saddr 198.19.0.0/24 masquerade' in s
    assert "ip6 saddr 2001:2:0:100::/64" not in s           # a global pool is routed
    assert "chain forwarding_was_off_ipv4 { }" in s and "ipv6 { }" not in s
    assert "udp sport { 51820 } masquerade to :1024-51819" in s
    assert e.forwards == [4, 6]


def test_script_ula_pool_is_masqueraded():
    s = _egress("fd00:1::/64").script(([], []))
    assert 'oifname "eth1" ip6 saddr fd00:1::/64 masquerade' in s
    # without full_tunnel, egress_interface NATs every pool, as before
    assert "ip6 saddr 2001:2:0:100::/64 masquerade" in _egress(full=False).script(([], []))


def test_script_without_egress_has_no_nat_and_no_forwarding():
    e = egress.Egress("vpnd0", [ipaddress.ip_network("198.19.0.0/24")], None, [25], True, [], listen_ports=[5000])
    s = e.script(([], []))
    assert "postrouting" not in s and e.forwards == []
    assert "udp dport { 5000 }" in s and 'comment "inbound"' in s


RULESET = {"nftables": [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    {"table": {"family": "ip", "name": "filter", "handle": 1}},
    {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 2, "type": "filter",
               "hook": "forward", "prio": 0, "policy": "drop"}},
    {"chain": {"family": "ip", "table": "filter", "name": "INPUT", "handle": 3, "type": "filter",
               "hook": "input", "prio": 0, "policy": "drop"}},
    {"chain": {"family": "ip6", "table": "filter", "name": "FORWARD", "handle": 2, "type": "filter",
               "hook": "forward", "prio": 0, "policy": "accept"}},
    {"chain": {"family": "inet", "table": "vpnd_vpnd0", "name": "forward", "handle": 4, "type": "filter",
               "hook": "forward", "prio": 0, "policy": "drop"}},
    {"chain": {"family": "inet", "table": "fw", "name": "fwd", "handle": 1, "type": "filter",
               "hook": "forward", "prio": 10, "policy": "drop"}},
    {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 9}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 7, "comment": "vpnd_vpnd0",
              "expr": [{"accept": None}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 8, "comment": "other",
              "expr": [{"accept": None}]}},
    {"rule": {"family": "inet", "table": "vpnd_vpnd0", "chain": "forward", "handle": 5,
              "comment": "vpnd_vpnd0", "expr": [{"drop": None}]}},
]}


def test_forward_drop_detection():
    assert egress.forward_drop_chains(RULESET, "vpnd_vpnd0") == [("ip", "filter", "FORWARD"), ("inet", "fw", "fwd")]
    assert egress.tagged_rules(RULESET, "vpnd_vpnd0") == [("ip", "filter", "FORWARD", 7)]
    cmds = egress.accept_rules([("ip", "filter", "FORWARD")], "vpnd0", "vpnd_vpnd0")
    assert [c["add"]["rule"]["expr"][0]["match"]["left"]["meta"]["key"] for c in cmds] == ["iifname", "oifname"]
    assert all(c["add"]["rule"]["comment"] == "vpnd_vpnd0" for c in cmds)


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def test_conntrack_entry_parsing():
    ip = _nla(0x8000 | 1, _nla(1, bytes([198, 19, 0, 2])) + _nla(2, bytes([198, 18, 51, 2])))
    proto = _nla(0x8000 | 2, _nla(1, bytes([17])) + _nla(2, struct.pack("!H", 40000)) + _nla(3, struct.pack("!H", 53)))
    orig = _nla(0x8000 | 1, ip + proto)
    msg = orig + _nla(0x8000 | 2, ip) + _nla(18, struct.pack("!H", 0))
    e = conntrack._parse(msg, 0, len(msg), socket.AF_INET)
    assert e.src == bytes([198, 19, 0, 2]) and e.dst == bytes([198, 18, 51, 2])
    assert (e.proto, e.sport, e.dport) == (17, 40000, 53)
    assert e.raw == orig + _nla(18, struct.pack("!H", 0))      # the original tuple and zone, to delete it
    assert repr(e) == "Entry(...)"


def test_sysctl_failure_is_one_line_exit_1(monkeypatch):
    import subprocess as sp
    monkeypatch.setattr(egress, "_run", lambda argv, stdin=None: sp.CompletedProcess(argv, 255, "", "permission denied"))
    with pytest.raises(UserError, match=r"could not set net.ipv4.ip_forward to 1 \(sysctl failed\)") as exc:
        egress.sysctl_set("net.ipv4.ip_forward", "1")
    assert exc.value.status == 1 and "\n" not in str(exc.value)
