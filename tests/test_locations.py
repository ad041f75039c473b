"""Locations (issue 6): config parsing of [[server]] lists, selection, the failover policy, and
`vpnclient locations` (unit tests, no privileges)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from string import Template

import pytest

from vpnclient import config as ccfg
from vpnclient import locations
from vpnclient.locations import DEAD_AFTER, HANDSHAKE_GIVEUP, PROBE, PROBE_AFTER, PROBE_EVERY, SWITCH, Failover
from vpncore.keys import genkey
from vpncore.cli import UserError
from vpncore.configfile import parse_key

KEYS = {f"k{i}": genkey() for i in range(4)}
VPNCLIENT = str(Path(sys.executable).parent / "vpnclient")

THREE = """
[client]
private_key = "$k0"

[[server]]
name = "ams-1"
location = "nl"
endpoint = "198.18.0.1:51820"
public_key = "$k1"

[[server]]
name = "zrh-1"
location = "ch"
endpoint = "[2001:2::1]:4500"
public_key = "$k2"
preshared_key = "$k3"

[[server]]
name = "ams-2"
location = "NL"
endpoint = "vpn.example.org:51820"
public_key = "$k3"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "client.toml"
    path.write_text(Template(text).substitute(KEYS))
    return str(path)


def test_server_list_is_parsed_in_order(tmp_path):
    cfg = ccfg.load(write(tmp_path, THREE))
    assert [(s.name, s.location, s.host, s.port) for s in cfg.servers] == [
        ("ams-1", "nl", "198.18.0.1", 51820), ("zrh-1", "ch", "2001:2::1", 4500),
        ("ams-2", "NL", "vpn.example.org", 51820)]
    assert cfg.servers[1].public_key == parse_key(KEYS["k2"], "k")
    assert cfg.servers[1].psk == parse_key(KEYS["k3"], "k") and cfg.servers[0].psk is None
    assert cfg.servers[1].endpoint == "[2001:2::1]:4500"
    # the first server stays available under the old single-server names
    assert (cfg.server_host, cfg.server_port, cfg.server_public) == ("198.18.0.1", 51820, cfg.servers[0].public_key)
    assert KEYS["k1"] not in repr(cfg) and KEYS["k1"] not in repr(cfg.servers)


def test_single_server_form_still_works_and_gets_a_name(tmp_path):
    cfg = ccfg.load(write(tmp_path, '[client]\nprivate_key = "$k0"\n[server]\nendpoint = "198.18.0.1:51820"\n'
                                    'public_key = "$k1"\n'))
    assert len(cfg.servers) == 1
    s = cfg.servers[0]
    assert (s.name, s.location, s.host, s.port) == ("server", "", "198.18.0.1", 51820)
    cfg = ccfg.load(write(tmp_path, '[client]\nprivate_key = "$k0"\n[server]\nendpoint = "198.18.0.1:51820"\n'
                                    'public_key = "$k1"\nname = "home"\nlocation = "de"\n'))
    assert (cfg.servers[0].name, cfg.servers[0].location) == ("home", "de")


def test_new_client_options_and_their_defaults(tmp_path):
    base = '[client]\nprivate_key = "$k0"\n$extra[server]\nendpoint = "198.18.0.1:51820"\npublic_key = "$k1"\n'
    cfg = ccfg.load(write(tmp_path, base.replace("$extra", "")))
    assert cfg.kill_switch is True
    assert cfg.resolv_conf == "/etc/resolv.conf"
    assert cfg.state_file == "/var/lib/vpnclient/vpn0.json"
    cfg = ccfg.load(write(tmp_path, base.replace("$extra", 'kill_switch = false\nresolv_conf = "/tmp/r.conf"\n'
                                                           'state_dir = "/tmp/st"\ninterface = "wg3"\n')))
    assert (cfg.kill_switch, cfg.resolv_conf, cfg.state_file) == (False, "/tmp/r.conf", "/tmp/st/wg3.json")


def test_config_built_in_code_has_one_server():
    """bench/micro builds a ClientConfig by hand, with the single-server fields only."""
    cfg = ccfg.ClientConfig(private_key=b"\1" * 32, server_host="127.0.0.1", server_port=9, server_public=b"\2" * 32)
    assert [(s.host, s.port, s.public_key) for s in cfg.servers] == [("127.0.0.1", 9, b"\2" * 32)]


BAD = [
    ("list-entry-without-name", THREE.replace('name = "zrh-1"\n', ""), r"number 2 is missing 'name'"),
    ("list-entry-without-location", THREE.replace('location = "ch"\n', ""), r"number 2 is missing 'location'"),
    ("duplicate-name", THREE.replace('"zrh-1"', '"AMS-1"'), r"number 2 repeats the name"),
    ("bad-name", THREE.replace('"zrh-1"', '"zrh 1"'), r"number 2 name must be"),
    ("bad-location", THREE.replace('"ch"', '"c h"'), r"number 2 location must be"),
    ("unknown-key", THREE.replace('location = "ch"', 'location = "ch"\ncity = "Zurich"'),
     r"number 2 has unknown option 'city'"),
    ("bad-endpoint", THREE.replace("[2001:2::1]:4500", "[2001:2::1]"), r"endpoint"),
    ("bad-key", THREE.replace('public_key = "$k2"', 'public_key = "abc"'), r"number 2.public_key"),
    ("empty-list", 'server = []\n[client]\nprivate_key = "$k0"\n', r"\[\[server\]\] sections"),
    ("not-a-table", 'server = [1]\n[client]\nprivate_key = "$k0"\n', r"number 1 is not a table"),
    ("kill-switch-type", THREE.replace('[client]\n', '[client]\nkill_switch = "yes"\n'), r"kill_switch"),
    ("resolv-conf-type", THREE.replace('[client]\n', '[client]\nresolv_conf = 1\n'), r"resolv_conf"),
]


@pytest.mark.parametrize("name,text,match", BAD, ids=[b[0] for b in BAD])
def test_bad_server_lists(tmp_path, name, text, match):
    with pytest.raises(UserError, match=match) as info:
        ccfg.load(write(tmp_path, text))
    assert info.value.status == 2 and "\n" not in str(info.value)


def test_select_by_location_case_insensitive_in_config_order(tmp_path):
    cfg = ccfg.load(write(tmp_path, THREE))
    assert [s.name for s in locations.select(cfg.servers, None)] == ["ams-1", "zrh-1", "ams-2"]
    assert [s.name for s in locations.select(cfg.servers, "nl")] == ["ams-1", "ams-2"]
    assert [s.name for s in locations.select(cfg.servers, "Ch")] == ["zrh-1"]
    with pytest.raises(UserError, match=r"no server in location 'us'; choose one of NL, ch, nl") as info:
        locations.select(cfg.servers, "us")
    assert info.value.status == 2


def test_resolve_uses_addresses_and_falls_back_to_the_cache(tmp_path):
    cfg = ccfg.load(write(tmp_path, THREE.replace("vpn.example.org", "name.invalid")))
    lines = []
    targets, cache = locations.resolve(cfg.servers, {}, lines.append)
    assert [t.address for t in targets] == [("198.18.0.1", 51820), ("2001:2::1", 4500)]   # .invalid never resolves
    assert "skipping it" in lines[0] and "ams-2" in lines[0]
    targets, cache = locations.resolve(cfg.servers, {"name.invalid:51820": ["198.18.9.1"]}, lines.append)
    assert targets[2].address == ("198.18.9.1", 51820) and "last known address" in lines[-1]
    assert cache["name.invalid:51820"] == ["198.18.9.1"]
    with pytest.raises(UserError, match="cannot resolve any server") as info:
        locations.resolve(cfg.servers[2:], {}, lines.append)
    assert info.value.status == 1


# --- the failover policy (sans-IO: time is a parameter) ---------------------------------------------

def test_single_server_never_probes_or_switches():
    f = Failover(1, now=0.0)
    assert not f.enabled
    assert [f.decide(True, None, t) for t in (0, 10, 100)] == [None, None, None]
    f.server_closed()
    assert f.decide(False, None, 100) == "notice"        # only a word to the user, once
    assert [f.decide(False, None, t) for t in (101, 200)] == [None, None]


def test_a_talking_server_is_left_alone():
    f = Failover(2, now=0.0)
    for t in range(1, 60):
        assert f.decide(True, t - 0.5, float(t)) is None


def test_silence_probes_then_switches_within_the_deadline():
    f = Failover(3, now=0.0)
    last_rx = 10.0
    actions = {}
    for k in range(int((DEAD_AFTER + 1) * 5)):        # 0.2 s ticks, as the client's timer loop
        t = last_rx + k / 5
        a = f.decide(True, last_rx, t)
        if a:
            actions.setdefault(a, []).append(round(t - last_rx, 1))
        if a == SWITCH:
            break
    probes = actions[PROBE]
    assert probes[0] == PROBE_AFTER and len(probes) >= 2
    assert all(b - a >= PROBE_EVERY - 1e-9 for a, b in zip(probes, probes[1:]))
    assert actions[SWITCH] == [DEAD_AFTER]
    assert DEAD_AFTER + 0.2 < 10        # the bound, with a tick to spare for the handshake


def test_an_answered_probe_resets_the_silence():
    f = Failover(2, now=0.0)
    assert f.decide(True, 0.0, PROBE_AFTER) == PROBE
    assert f.decide(True, PROBE_AFTER + 0.01, DEAD_AFTER) is None     # the config came back


def test_switch_goes_round_the_list_and_restarts_the_clock():
    f = Failover(3, now=0.0)
    assert [f.switched(1.0), f.switched(2.0), f.switched(3.0)] == [1, 2, 0]
    assert f.switches == 3
    # a new server gets HANDSHAKE_GIVEUP from when we turned to it, whatever the old one did
    assert f.decide(False, None, 3.0 + HANDSHAKE_GIVEUP - 0.1) is None
    assert f.decide(False, None, 3.0 + HANDSHAKE_GIVEUP) == SWITCH


def test_server_close_switches_at_once_and_only_once():
    f = Failover(2, now=0.0)
    f.server_closed()
    assert f.decide(True, 0.9, 1.0) == SWITCH
    f.switched(1.0)
    assert f.decide(False, None, 1.2) is None


# --- vpnclient locations ----------------------------------------------------------------------------

def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([VPNCLIENT, *argv], capture_output=True, text=True, timeout=30)


def test_locations_prints_a_table_and_json(tmp_path):
    path = write(tmp_path, THREE)
    r = run("locations", "--config", path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "LOCATION", "ENDPOINT"]
    assert [line.split() for line in lines[1:]] == [["ams-1", "nl", "198.18.0.1:51820"],
                                                    ["zrh-1", "ch", "[2001:2::1]:4500"],
                                                    ["ams-2", "NL", "vpn.example.org:51820"]]
    assert len({line.index(lines[0].split()[2][0]) for line in lines[:1]}) == 1
    r = run("locations", "--config", path, "--json")
    assert json.loads(r.stdout)[1] == {"name": "zrh-1", "location": "ch", "endpoint": "[2001:2::1]:4500"}


def test_locations_errors_are_one_line(tmp_path):
    r = run("locations", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = run("up", "--config", write(tmp_path, THREE), "--location", "us")
    assert r.returncode == 2 and "no server in location 'us'" in r.stderr and r.stderr.count("\n") == 1


def test_help_documents_exit_codes():
    r = run("--help")
    assert r.returncode == 0
    for words in ("0   success", "1   runtime failure", "2   bad command line", "70  internal error"):
        assert words in r.stdout
    r = run("up", "--help")
    assert "--no-kill-switch" in r.stdout and "--fastest" in r.stdout and "--location" in r.stdout
    assert "70  internal error" in r.stdout


def test_a_server_that_never_answers_is_reported_once():
    from vpnclient.locations import NOTICE, NOTICE_AFTER
    single = Failover(1, now=0.0)
    actions = [single.decide(False, None, t / 5) for t in range(int(NOTICE_AFTER * 5) + 20)]
    assert actions.count(NOTICE) == 1 and actions[int(NOTICE_AFTER * 5)] == NOTICE
    assert Failover(1, now=0.0).decide(False, 5.0, NOTICE_AFTER + 1) is None     # it did answer once
