"""vpnd.config.load, vpnclient.config.load and vpnd.pool.AddressPool (unit tests, no privileges)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from string import Template

import pytest

from vpnclient import config as ccfg
from vpncore.keys import genkey
from vpncore.log import DEBUG, INFO, QUIET
from vpncore.cli import UserError
from vpncore.configfile import parse_key
from vpnd import config as scfg
from vpnd.pool import AddressPool

KEY = genkey()
KEY2 = genkey()
PSK = genkey()
SUBST = {"key": KEY, "key2": KEY2, "psk": PSK}
RAW = parse_key(KEY, "k")
RAW2 = parse_key(KEY2, "k")
RAW_PSK = parse_key(PSK, "k")


def write(path: Path, template: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(Template(template).substitute(SUBST))
    return str(path)


# -- vpnd.config ---------------------------------------------------------------------------------

SERVER_MIN = """
[server]
private_key = "$key"
address_pool4 = "198.19.0.0/24"
"""


def test_server_minimal_gets_defaults(tmp_path):
    cfg = scfg.load(write(tmp_path / "vpnd.toml", SERVER_MIN))
    assert cfg.private_key == RAW
    assert cfg.listen == [("0.0.0.0", 51820)]
    assert cfg.interface == "vpnd0"
    assert cfg.pool4 == ipaddress.ip_network("198.19.0.0/24")
    assert cfg.pool6 is None
    assert cfg.mtu == 1420
    assert cfg.push_routes == []
    assert cfg.dns_forwarder is True and cfg.dns == ["198.19.0.1"]   # issue 6: DNS through the tunnel
    assert cfg.client_to_client is False     # issue 5: blocked by default
    assert cfg.log_level == INFO
    assert cfg.clients == []


def test_server_full_file(tmp_path):
    cfg = scfg.load(write(tmp_path / "vpnd.toml", """
[server]
private_key = "$key"
listen = ["198.18.0.1:4500", "[2001:2::1]:4501"]
interface = "tun-test"
address_pool4 = "198.19.0.77/24"
address_pool6 = "2001:2:0:100::/64"
mtu = 1380
dns = ["198.19.0.1", "2001:2:0:100::1"]
push_routes = ["10.20.0.0/16"]
client_to_client = true
log_level = "debug"

[[client]]
public_key = "$key"
name = "laptop"

[[client]]
public_key = "$key2"
preshared_key = "$psk"
"""))
    assert cfg.listen == [("198.18.0.1", 4500), ("2001:2::1", 4501)]
    assert cfg.interface == "tun-test"
    assert cfg.pool4 == ipaddress.ip_network("198.19.0.0/24")      # host bits dropped
    assert cfg.pool6 == ipaddress.ip_network("2001:2:0:100::/64")
    assert cfg.mtu == 1380
    assert cfg.dns == ["198.19.0.1", "2001:2:0:100::1"]
    assert cfg.push_routes == ["10.20.0.0/16"]
    assert cfg.client_to_client is True
    assert cfg.log_level == DEBUG
    assert [(c.public_key, c.psk) for c in cfg.clients] == [(RAW, None), (RAW2, RAW_PSK)]


def test_server_listen_may_be_one_string_and_ipv6_only_pool(tmp_path):
    cfg = scfg.load(write(tmp_path / "vpnd.toml", """
[server]
private_key = "$key"
listen = "[::]:51820"
address_pool6 = "2001:2:0:100::/120"
log_level = "quiet"
"""))
    assert cfg.listen == [("::", 51820)]
    assert cfg.pool4 is None and cfg.pool6.prefixlen == 120
    assert cfg.log_level == QUIET


def test_server_repr_hides_keys(tmp_path):
    cfg = scfg.load(write(tmp_path / "vpnd.toml", SERVER_MIN + '[[client]]\npublic_key = "$key2"\n'))
    assert KEY not in repr(cfg) and KEY2 not in repr(cfg.clients)


def test_server_private_key_file_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "etc" / "keys").mkdir(parents=True)
    (tmp_path / "etc" / "keys" / "server.key").write_text(KEY + "\n")   # genkey > file leaves a newline
    path = write(tmp_path / "etc" / "vpnd.toml", '[server]\nprivate_key_file = "keys/server.key"\n'
                                                  'address_pool4 = "198.19.0.0/24"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert scfg.load(path).private_key == RAW
    assert scfg.load(os.path.relpath(path)).private_key == RAW    # a relative config path works as well


def test_server_private_key_file_absolute(tmp_path):
    key_file = tmp_path / "k" / "server.key"
    key_file.parent.mkdir()
    key_file.write_text(KEY)
    path = write(tmp_path / "conf" / "vpnd.toml", f'[server]\nprivate_key_file = "{key_file}"\n'
                                                   'address_pool4 = "198.19.0.0/24"\n')
    assert scfg.load(path).private_key == RAW


SERVER_BAD = [
    ("missing-server", '[[client]]\npublic_key = "$key"\n', r"missing 'server'"),
    ("unknown-section", SERVER_MIN + "[peer]\n", r"unknown option 'peer'"),
    ("unknown-key", SERVER_MIN + "port = 1\n", r"\[server\] has unknown option 'port'"),
    ("no-private-key", '[server]\naddress_pool4 = "198.19.0.0/24"\n', r"needs private_key"),
    ("bad-base64", '[server]\nprivate_key = "%%%"\naddress_pool4 = "198.19.0.0/24"\n', r"not valid base64"),
    ("short-key", '[server]\nprivate_key = "AAAA"\naddress_pool4 = "198.19.0.0/24"\n', r"3 bytes, not 32"),
    ("missing-key-file", '[server]\nprivate_key_file = "nope.key"\naddress_pool4 = "198.19.0.0/24"\n',
     r"cannot read the private key file .*nope\.key"),
    ("listen-bad", SERVER_MIN + 'listen = ["localhost"]\n', r"listen entry must look like"),
    ("listen-port", SERVER_MIN + 'listen = ["0.0.0.0:65536"]\n', r"invalid port"),
    ("listen-type", SERVER_MIN + "listen = 51820\n", r"server\.listen must be a list"),
    ("pool-not-net", '[server]\nprivate_key = "$key"\naddress_pool4 = "198.19.0.0/33"\n', r"not a network"),
    ("pool-version", '[server]\nprivate_key = "$key"\naddress_pool6 = "198.19.0.0/24"\n', r"IPv6 network"),
    ("pool-small", '[server]\nprivate_key = "$key"\naddress_pool4 = "198.19.0.0/32"\n', r"too small"),
    ("no-pool", '[server]\nprivate_key = "$key"\n', r"needs address_pool4 and/or address_pool6"),
    ("mtu-low", SERVER_MIN + "mtu = 1279\n", r"mtu must be a number from 1280 to 65000"),
    ("mtu-high", SERVER_MIN + "mtu = 65001\n", r"mtu"),
    ("mtu-float", SERVER_MIN + "mtu = 1420.0\n", r"mtu"),
    ("dns", SERVER_MIN + 'dns = ["8.8.8"]\n', r"dns has an invalid entry"),
    ("dns-type", SERVER_MIN + 'dns = "8.8.8.8"\n', r"dns must be a list of strings"),
    ("routes", SERVER_MIN + 'push_routes = ["x"]\n', r"push_routes has an invalid entry"),
    ("log-level", SERVER_MIN + 'log_level = "warn"\n', r"log_level must be one of"),
    ("dup-client", SERVER_MIN + '[[client]]\npublic_key = "$key2"\n[[client]]\npublic_key = "$key2"\n',
     r"number 2 repeats a public key"),
    ("client-no-key", SERVER_MIN + '[[client]]\nname = "x"\n', r"number 1 is missing 'public_key'"),
    ("client-unknown", SERVER_MIN + '[[client]]\npublic_key = "$key2"\nallowed_ips = []\n',
     r"unknown option 'allowed_ips'"),
    ("client-table", SERVER_MIN + '[client]\npublic_key = "$key2"\n', r"\[\[client\]\]"),
]


@pytest.mark.parametrize("name,text,match", SERVER_BAD, ids=[c[0] for c in SERVER_BAD])
def test_server_bad_file(tmp_path, name, text, match):
    with pytest.raises(UserError, match=match) as info:
        scfg.load(write(tmp_path / "vpnd.toml", text))
    assert info.value.status == 2
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "directory", "invalid-toml"])
def test_server_bad_path(tmp_path, kind):
    path = tmp_path / "vpnd.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "invalid-toml":
        path.write_text("[server]\nmtu = = 1\n")
    with pytest.raises(UserError, match={"missing": "does not exist", "directory": "is a directory",
                                         "invalid-toml": "not valid TOML"}[kind]):
        scfg.load(str(path))


@pytest.mark.parametrize("text,match", [
    pytest.param(SERVER_MIN + "log_level = []\n", "log_level", id="log-level-array"),
    pytest.param("client = [1]\n" + SERVER_MIN, "client", id="client-entry-int"),
])
def test_server_bad_file_defects(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        scfg.load(write(tmp_path / "vpnd.toml", text))


def test_server_private_key_file_binary(tmp_path):
    (tmp_path / "server.key").write_bytes(bytes(range(0x80, 0xa0)))
    with pytest.raises(UserError, match="server.key"):
        scfg.load(write(tmp_path / "vpnd.toml", '[server]\nprivate_key_file = "server.key"\n'
                                                 'address_pool4 = "198.19.0.0/24"\n'))


def test_server_config_not_utf8(tmp_path):
    path = tmp_path / "vpnd.toml"
    path.write_bytes(b"\x80\x81\xfe")
    with pytest.raises(UserError, match="vpnd.toml"):
        scfg.load(str(path))


# -- vpnclient.config ------------------------------------------------------------------------------

CLIENT_MIN = """
[client]
private_key = "$key"

[server]
endpoint = "198.18.0.1:51820"
public_key = "$key2"
"""


def test_client_minimal_gets_defaults(tmp_path):
    cfg = ccfg.load(write(tmp_path / "client.toml", CLIENT_MIN))
    assert cfg.private_key == RAW
    assert (cfg.server_host, cfg.server_port) == ("198.18.0.1", 51820)
    assert cfg.server_public == RAW2
    assert cfg.psk is None
    assert cfg.interface == "vpn0"
    assert cfg.control_socket == "/run/vpnclient/vpn0.sock"
    assert cfg.persistent_keepalive == 10
    assert KEY not in repr(cfg)


def test_client_full_file(tmp_path):
    cfg = ccfg.load(write(tmp_path / "client.toml", """
[client]
private_key = "$key"
interface = "office"
control_socket = "/tmp/office.sock"
persistent_keepalive = 0

[server]
endpoint = "[2001:2::1]:4500"
public_key = "$key2"
preshared_key = "$psk"
"""))
    assert (cfg.server_host, cfg.server_port) == ("2001:2::1", 4500)
    assert cfg.psk == RAW_PSK
    assert cfg.interface == "office"
    assert cfg.control_socket == "/tmp/office.sock"
    assert cfg.persistent_keepalive == 0


def test_client_socket_default_follows_interface(tmp_path):
    cfg = ccfg.load(write(tmp_path / "client.toml", CLIENT_MIN.replace("[server]", 'interface = "wg7"\n[server]')))
    assert cfg.control_socket == "/run/vpnclient/wg7.sock" == ccfg.default_socket("wg7")


def test_client_hostname_endpoint(tmp_path):
    cfg = ccfg.load(write(tmp_path / "client.toml", CLIENT_MIN.replace("198.18.0.1:51820", "vpn.example.org:443")))
    assert (cfg.server_host, cfg.server_port) == ("vpn.example.org", 443)


def test_client_private_key_file_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "client.key").write_text("  " + KEY + "\n\n")
    path = write(tmp_path / "cfg" / "client.toml",
                 CLIENT_MIN.replace('private_key = "$key"', 'private_key_file = "client.key"'))
    monkeypatch.chdir(tmp_path)
    assert ccfg.load(path).private_key == RAW
    assert ccfg.load("cfg/client.toml").private_key == RAW


CLIENT_BAD = [
    ("no-client", '[server]\nendpoint = "198.18.0.1:51820"\npublic_key = "$key2"\n', r"missing 'client'"),
    ("no-server", '[client]\nprivate_key = "$key"\n', r"missing 'server'"),
    ("unknown-section", CLIENT_MIN + "[dns]\n", r"unknown option 'dns'"),
    ("unknown-client-key", CLIENT_MIN.replace("[server]", "mtu = 1400\n[server]"), r"\[client\] has unknown option 'mtu'"),
    ("unknown-server-key", CLIENT_MIN + "port = 1\n", r"\[server\] has unknown option 'port'"),
    ("no-private-key", '[client]\n[server]\nendpoint = "198.18.0.1:51820"\npublic_key = "$key2"\n',
     r"needs private_key"),
    ("no-endpoint", '[client]\nprivate_key = "$key"\n[server]\npublic_key = "$key2"\n', r"missing 'endpoint'"),
    ("endpoint-no-port", CLIENT_MIN.replace("198.18.0.1:51820", "198.18.0.1"), r"endpoint must look like"),
    ("endpoint-port-0", CLIENT_MIN.replace("198.18.0.1:51820", "198.18.0.1:0"), r"port from 1 to 65535"),
    ("endpoint-port-big", CLIENT_MIN.replace("198.18.0.1:51820", "198.18.0.1:65536"), r"invalid port"),
    ("endpoint-empty-host", CLIENT_MIN.replace("198.18.0.1:51820", ":51820"), r"invalid port|endpoint"),
    ("no-public-key", '[client]\nprivate_key = "$key"\n[server]\nendpoint = "198.18.0.1:51820"\n',
     r"missing 'public_key'"),
    ("public-key-short", CLIENT_MIN.replace('"$key2"', '"AAAA"'), r"server\.public_key decodes to 3 bytes"),
    ("psk-bad", CLIENT_MIN + 'preshared_key = "!!"\n', r"server\.preshared_key is not valid base64"),
    ("keepalive-big", CLIENT_MIN.replace("[server]", "persistent_keepalive = 3601\n[server]"),
     r"persistent_keepalive"),
    ("keepalive-bool", CLIENT_MIN.replace("[server]", "persistent_keepalive = true\n[server]"),
     r"persistent_keepalive"),
]


@pytest.mark.parametrize("name,text,match", CLIENT_BAD, ids=[c[0] for c in CLIENT_BAD])
def test_client_bad_file(tmp_path, name, text, match):
    with pytest.raises(UserError, match=match) as info:
        ccfg.load(write(tmp_path / "client.toml", text))
    assert info.value.status == 2
    assert "\n" not in str(info.value)


def test_client_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ccfg.load(str(tmp_path / "nope.toml"))


# -- vpnd.pool.AddressPool -------------------------------------------------------------------------

def ip(text):
    return ipaddress.ip_address(text)


def test_pool_server_takes_first_host_and_clients_get_the_next():
    pool = AddressPool(ipaddress.ip_network("198.19.0.0/24"))
    assert pool.server == ip("198.19.0.1")
    assert pool.server_interface() == "198.19.0.1/24"
    got = [pool.allocate() for _ in range(3)]
    assert got == [ip("198.19.0.2"), ip("198.19.0.3"), ip("198.19.0.4")]
    assert pool.interface(got[0]) == "198.19.0.2/24"
    assert all(isinstance(a, ipaddress.IPv4Address) for a in got)


def test_pool_release_and_reuse_lowest_free():
    pool = AddressPool(ipaddress.ip_network("198.19.0.0/24"))
    a2, a3, a4, a5 = (pool.allocate() for _ in range(4))
    pool.release(a4)
    pool.release(a2)
    assert pool.allocate() == a2          # the lowest free, not the last released
    assert pool.allocate() == a4
    assert pool.allocate() == ip("198.19.0.6")
    pool.release(a3)
    assert pool.allocate() == a3


def test_pool_release_twice_or_unknown_is_harmless():
    pool = AddressPool(ipaddress.ip_network("198.19.0.0/24"))
    a = pool.allocate()
    pool.release(a)
    pool.release(a)                       # twice
    pool.release(pool.server)             # never allocated
    pool.release(ip("198.19.0.200"))      # never allocated
    assert pool.allocate() == a
    assert pool.allocate() == ip("198.19.0.3")   # a was not handed out twice


def test_pool_exhaustion_returns_none_and_recovers():
    pool = AddressPool(ipaddress.ip_network("198.19.0.0/29"))   # hosts .1-.6, .7 is broadcast
    assert pool.server == ip("198.19.0.1")
    got = [pool.allocate() for _ in range(5)]
    assert got == [ip(f"198.19.0.{i}") for i in range(2, 7)]
    assert pool.allocate() is None
    assert pool.allocate() is None
    pool.release(ip("198.19.0.4"))
    assert pool.allocate() == ip("198.19.0.4")
    assert pool.allocate() is None


def test_pool_smallest_ipv4():
    pool = AddressPool(ipaddress.ip_network("198.19.0.0/30"))
    assert pool.server == ip("198.19.0.1")
    assert pool.allocate() == ip("198.19.0.2")
    assert pool.allocate() is None        # never the broadcast address .3


def test_pool_ipv6():
    pool = AddressPool(ipaddress.ip_network("2001:2:0:100::/64"))
    assert pool.server == ip("2001:2:0:100::1")
    assert pool.server_interface() == "2001:2:0:100::1/64"
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (ip("2001:2:0:100::2"), ip("2001:2:0:100::3"))
    assert isinstance(a, ipaddress.IPv6Address)
    pool.release(a)
    assert pool.allocate() == a
    assert pool.interface(b) == "2001:2:0:100::3/64"


def test_pool_ipv6_exhaustion():
    pool = AddressPool(ipaddress.ip_network("2001:2::/126"))
    assert pool.server == ip("2001:2::1")
    assert [pool.allocate(), pool.allocate()] == [ip("2001:2::2"), ip("2001:2::3")]
    assert pool.allocate() is None


def test_pool_from_config(tmp_path):
    cfg = scfg.load(write(tmp_path / "vpnd.toml", SERVER_MIN + 'address_pool6 = "2001:2:0:100::/64"\n'))
    pools = [AddressPool(n) for n in (cfg.pool4, cfg.pool6)]
    assert [str(p.server) for p in pools] == ["198.19.0.1", "2001:2:0:100::1"]
    assert [str(p.allocate()) for p in pools] == ["198.19.0.2", "2001:2:0:100::2"]
