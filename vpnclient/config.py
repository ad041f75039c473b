"""vpnclient's configuration file (TOML).

    [client]
    private_key = "..."                  # or private_key_file = "client.key"
    interface = "vpn0"
    control_socket = "/run/vpnclient/vpn0.sock"   # default: /run/vpnclient/<interface>.sock
    persistent_keepalive = 10            # seconds, 0 = off
    kill_switch = true                   # nftables table inet vpnclient_killswitch ('up --no-kill-switch'):
                                         # true: on while 'up' runs and after it fails, until 'vpnclient down';
                                         # "always": also after 'down', Ctrl-C and SIGTERM, with no client
                                         # running, until 'vpnclient down --disable-kill-switch'; false: off
    full_tunnel = true                   # optional; unset: follow the server (a pushed 0.0.0.0/0 or ::/0);
                                         # true: default routes for every family the tunnel has an address
                                         # for; false: ignore pushed default routes (split tunnel)
    allow_lan = false                    # true: local networks (RFC 1918, 169.254/16, fc00::/7, fe80::/10
                                         # and the machine's own networks) stay reachable outside the tunnel
    exclude = ["203.0.113.0/24"]         # destinations that bypass the tunnel (and the kill switch)
    fwmark = 51820                       # SO_MARK of the tunnel's sockets (0xca6c), exempt from the tunnel
    route_table = 51820                  # the routing table that holds the tunnel's default routes
    resolv_conf = "/etc/resolv.conf"     # the resolver file pointed at the tunnel's DNS while up
    state_dir = "/var/lib/vpnclient"     # <interface>.json: what to restore after a crash

Full tunnel (routing.py, DESIGN §8) keeps the main routing table as it is: the default routes go
into `route_table`, `ip rule`s send unmarked traffic there, and `vpnclient bypass -- COMMAND` runs
one program whose sockets carry `fwmark` (a cgroup, bypass.py), so it leaves outside the tunnel.

    [server]                             # one server ...
    endpoint = "198.18.0.1:51820"
    public_key = "..."
    preshared_key = "..."                # optional
    name = "home"                        # optional here
    location = "nl"                      # optional here

    [[server]]                           # ... or several (locations), each with name and location
    name = "ams-1"
    location = "nl"
    endpoint = "198.18.0.1:51820"
    public_key = "..."
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from vpncore.net.udp import parse_hostport
from vpncore.cli import UserError
from vpncore.configfile import check_keys, load_toml, need, parse_key, read_private_key

CLIENT_KEYS = {"private_key", "private_key_file", "interface", "control_socket", "persistent_keepalive",
               "kill_switch", "resolv_conf", "state_dir", "full_tunnel", "allow_lan", "exclude", "fwmark",
               "route_table"}
SERVER_KEYS = {"endpoint", "public_key", "preshared_key", "name", "location"}
RUN_DIR = "/run/vpnclient"
STATE_DIR = "/var/lib/vpnclient"
DEFAULT_CONFIG = "/etc/vpnclient/vpn0.toml"
MAX_SERVERS = 64
MAX_EXCLUDE = 64
DEFAULT_FWMARK = 0xCA6C         # 51820, as wg-quick
DEFAULT_TABLE = 51820
RESERVED_TABLES = {0, 253, 254, 255}     # unspec, default, main, local
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_LOCATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}")


@dataclass
class ServerEntry:
    """One server the client may use: a location in `vpnclient locations`."""

    name: str
    location: str
    host: str
    port: int
    public_key: bytes
    psk: bytes | None = None

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"ServerEntry({self.name!r})"


@dataclass
class ClientConfig:
    private_key: bytes
    server_host: str            # the first server (kept for callers that know only one)
    server_port: int
    server_public: bytes
    psk: bytes | None = None
    interface: str = "vpn0"
    control_socket: str = ""
    persistent_keepalive: int = 10
    kill_switch: bool | str = True      # True, False or "always" (permanent)
    full_tunnel: bool | None = None     # None: as the server pushes
    allow_lan: bool = False
    exclude: list[str] = field(default_factory=list)
    fwmark: int = DEFAULT_FWMARK
    route_table: int = DEFAULT_TABLE
    resolv_conf: str = "/etc/resolv.conf"
    state_dir: str = STATE_DIR
    servers: list[ServerEntry] = field(default_factory=list)
    config_path: str = ""       # the file it came from (for the hints that name it)

    def __post_init__(self):
        if not self.servers:
            self.servers = [ServerEntry("server", "", self.server_host, self.server_port, self.server_public,
                                        self.psk)]

    @property
    def state_file(self) -> str:
        return state_file(self.state_dir, self.interface)

    def __repr__(self) -> str:
        return "ClientConfig(...)"


def default_socket(interface: str) -> str:
    return os.path.join(RUN_DIR, f"{interface}.sock")


def state_file(state_dir: str, interface: str) -> str:
    return os.path.join(state_dir, f"{interface}.json")


def _server(sv: dict, where: str, listed: bool) -> ServerEntry:
    check_keys(sv, SERVER_KEYS, where)
    key_where = "server" if not listed else where
    host, port = parse_hostport(need(sv, "endpoint", str, where), f"{key_where}.endpoint")
    if port == 0:
        raise UserError(f"{key_where}.endpoint needs a port from 1 to 65535")
    public = parse_key(need(sv, "public_key", str, where), f"{key_where}.public_key")
    psk = parse_key(sv["preshared_key"], f"{key_where}.preshared_key") if "preshared_key" in sv else None
    if listed:
        name = need(sv, "name", str, where)
        location = need(sv, "location", str, where)
    else:
        name = sv.get("name", "server")
        location = sv.get("location", "")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"{where} name must be 1 to 32 letters, digits, '.', '_' or '-' (e.g. \"ams-1\")")
    if not isinstance(location, str) or (location or listed) and not _LOCATION.fullmatch(location):
        raise UserError(f"{where} location must be a short code of letters, digits, '_' or '-' (e.g. \"nl\")")
    return ServerEntry(name, location, host, port, public, psk)


def _servers(doc: dict) -> list[ServerEntry]:
    value = doc.get("server")
    if value is None:
        need(doc, "server", dict, "the config file ([server] section)")
    if isinstance(value, dict):
        return [_server(value, "[server]", False)]
    if not isinstance(value, list) or not value:
        raise UserError("servers are a [server] section, or [[server]] sections with name, location, "
                        "endpoint and public_key each")
    if len(value) > MAX_SERVERS:
        raise UserError(f"the config lists {len(value)} servers; at most {MAX_SERVERS} are supported")
    out, names = [], set()
    for i, sv in enumerate(value, 1):
        where = f"[[server]] number {i}"
        if not isinstance(sv, dict):
            raise UserError(f"{where} is not a table; write each server as a [[server]] section")
        entry = _server(sv, where, True)
        if entry.name.lower() in names:
            raise UserError(f"{where} repeats the name {entry.name!r}; give each server its own name")
        names.add(entry.name.lower())
        out.append(entry)
    return out


def _bool(section: dict, key: str, default: bool) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"client.{key} must be true or false")
    return value


def _kill_switch(section: dict) -> bool | str:
    value = section.get("kill_switch", True)
    if value == "always" or isinstance(value, bool):
        return value
    raise UserError('client.kill_switch must be true, false or "always" (blocks even with no client running)')


def _int(section: dict, key: str, default: int, what: str) -> int:
    value = section.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 0xFFFFFFFF:
        raise UserError(f"client.{key} must be {what}")
    return value


def _network(item, where: str) -> str:
    """A network like "203.0.113.0/24" (host bits clear), or one UserError line."""
    example = ' (e.g. "203.0.113.0/24" or "2001:db8::/32")'
    try:
        net = ipaddress.ip_network(item, strict=True) if isinstance(item, str) else None
    except ValueError:
        try:
            example = f"; did you mean {ipaddress.ip_network(item, strict=False)}?"
        except ValueError:
            pass
        net = None
    if net is None:
        raise UserError(f"{where}: {repr(item)[:60]} is not a network{example}")
    if net.prefixlen == 0:
        raise UserError(f"{where}: {net} would take everything out of the tunnel; use full_tunnel = false")
    return str(net)


def _exclude(section: dict) -> list[str]:
    value = section.get("exclude", [])
    if not isinstance(value, list) or len(value) > MAX_EXCLUDE:
        raise UserError(f'client.exclude must be a list of at most {MAX_EXCLUDE} networks, '
                        f'e.g. ["203.0.113.0/24", "2001:db8::/32"]')
    return [_network(item, "client.exclude") for item in value]


def _path(section: dict, key: str, default: str) -> str:
    value = section.get(key, default)
    if not isinstance(value, str) or not value or "\0" in value:
        raise UserError(f"client.{key} must be a file system path")
    return value


def load(path: str) -> ClientConfig:
    doc = load_toml(path, "config file")
    check_keys(doc, {"client", "server"}, "the config file")
    cl = need(doc, "client", dict, "the config file ([client] section)")
    check_keys(cl, CLIENT_KEYS, "[client]")
    servers = _servers(doc)
    key = read_private_key(cl, "[client]", os.path.dirname(os.path.abspath(path)))
    first = servers[0]
    cfg = ClientConfig(private_key=key, server_host=first.host, server_port=first.port,
                       server_public=first.public_key, psk=first.psk, servers=servers)
    cfg.config_path = path
    cfg.interface = str(cl.get("interface", "vpn0"))
    cfg.control_socket = str(cl.get("control_socket", default_socket(cfg.interface)))
    ka = cl.get("persistent_keepalive", 10)
    if not isinstance(ka, int) or isinstance(ka, bool) or not 0 <= ka <= 3600:
        raise UserError("client.persistent_keepalive must be a number of seconds from 0 (off) to 3600")
    cfg.persistent_keepalive = ka
    cfg.kill_switch = _kill_switch(cl)
    cfg.full_tunnel = None if "full_tunnel" not in cl else _bool(cl, "full_tunnel", True)
    cfg.allow_lan = _bool(cl, "allow_lan", False)
    cfg.exclude = _exclude(cl)
    cfg.fwmark = _int(cl, "fwmark", DEFAULT_FWMARK, "a mark from 1 to 4294967295 (default 51820)")
    cfg.route_table = _int(cl, "route_table", DEFAULT_TABLE, "a table number from 1 to 4294967295 other "
                           "than 253, 254 and 255 (default 51820)")
    if cfg.route_table in RESERVED_TABLES:
        raise UserError("client.route_table must not be a system table (253 default, 254 main, 255 local); "
                        "use e.g. 51820")
    cfg.resolv_conf = _path(cl, "resolv_conf", "/etc/resolv.conf")
    cfg.state_dir = _path(cl, "state_dir", STATE_DIR)
    return cfg
