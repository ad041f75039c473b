"""vpnd's configuration file (TOML), checked with one clear line per mistake.

    [server]
    private_key = "..."                 # or private_key_file = "server.key"
    listen = ["0.0.0.0:51820", "[::]:51820"]
    interface = "vpnd0"
    address_pool4 = "198.19.0.0/24"     # the server takes the first host address
    address_pool6 = "2001:2:0:100::/64"
    mtu = 1420
    dns = ["198.19.0.1"]
    push_routes = []                    # routes pushed besides the pools
    client_to_client = false            # clients may reach each other through the server
    accounts = "sqlite:///var/lib/vpnd/accounts.db"   # the accounts registry (optional; or postgresql://...)
    egress_interface = "eth0"           # NAT client traffic out of this interface (optional)
    full_tunnel = false                 # push 0.0.0.0/0 and ::/0 and carry all traffic out to the internet
    block_tcp_ports = [25]              # outbound TCP ports clients may not use
    block_server_networks = true        # clients may not reach the server's own/private networks
    blocked_networks = []               # more destinations clients may not reach
    memory_limit_mb = 512               # over this resident size: no new handshakes (counted)
    metrics_listen = "127.0.0.1:9586"   # Prometheus text, aggregate counters only (optional, loopback)

    [plans.free]                        # plans; defaults: free (1 device), plus (5 devices)
    devices = 1
    bandwidth_mbit = 0                  # per account and direction, 0 = no cap
    new_flows_per_second = 50           # per account, 0 = no cap
    log_level = "info"                  # quiet | info | verbose | debug
    control_socket = "/run/vpnd/vpnd0.sock"   # default: /run/vpnd/<interface>.sock; root only

    [[client]]
    public_key = "..."
    preshared_key = "..."               # optional
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from vpncore.log import LEVELS

from . import dns
from .registry import DEFAULT_PLANS, Location, Plan, parse_location
from vpncore.net.udp import parse_hostport
from vpncore.cli import UserError
from vpncore.configfile import check_keys, load_toml, need, parse_key, read_private_key

SERVER_KEYS = {"private_key", "private_key_file", "listen", "interface", "address_pool4", "address_pool6",
               "mtu", "dns", "push_routes", "client_to_client", "log_level", "control_socket", "accounts",
               "egress_interface", "block_tcp_ports", "block_server_networks", "blocked_networks",
               "memory_limit_mb"}
SERVER_KEYS |= {"dns_forwarder", "dns_upstream"}     # issue 6: DNS forwarder (vpnd/dns.py)
SERVER_KEYS |= {"full_tunnel"}                        # issue 12: full tunnel (vpnd/egress.py)
SERVER_KEYS |= {"metrics_listen"}                     # issue 18: Prometheus text on loopback (vpnd/metrics.py)
PLAN_KEYS = {"devices", "bandwidth_mbit", "new_flows_per_second"}
# Options other servers have that would record per-connection data: refused by name, with the reason.
NO_LOG_REFUSED = {"log_file", "logfile", "log_connections", "connection_log", "status_file", "status",
                  "pcap", "packet_capture", "capture", "accounting", "accounting_log", "syslog", "audit_log",
                  "persist_sessions", "session_file", "keep_endpoints"}
RUN_DIR = "/run/vpnd"
CLIENT_KEYS = {"public_key", "preshared_key", "name"}


@dataclass
class ClientEntry:
    public_key: bytes
    psk: bytes | None = None

    def __repr__(self) -> str:
        return "ClientEntry(...)"


@dataclass
class ServerConfig:
    private_key: bytes
    listen: list[tuple[str, int]]
    interface: str = "vpnd0"
    pool4: ipaddress.IPv4Network | None = None
    pool6: ipaddress.IPv6Network | None = None
    mtu: int = 1420
    dns: list[str] = field(default_factory=list)
    push_routes: list[str] = field(default_factory=list)
    client_to_client: bool = False
    accounts: Location | None = None
    egress_interface: str | None = None
    full_tunnel: bool = False
    egress_by_family: dict = field(default_factory=dict)   # {4: ifname, 6: ifname}, set at start (egress.py)
    block_tcp_ports: list[int] = field(default_factory=lambda: [25])
    block_server_networks: bool = True
    blocked_networks: list[str] = field(default_factory=list)
    plans: dict = field(default_factory=lambda: dict(DEFAULT_PLANS))
    plans_given: tuple = ()                      # the plans the config file itself defines
    memory_limit_mb: int = 512
    metrics_listen: tuple[str, int] | None = None
    log_level: int = 1
    control_socket: str = ""
    clients: list[ClientEntry] = field(default_factory=list)
    dns_forwarder: bool = False                 # set by dns.configure: on unless the config says false
    dns_upstream: list[tuple[str, int]] = field(default_factory=list)

    def __repr__(self) -> str:
        return "ServerConfig(...)"


def _pool(value, version: int, key: str):
    try:
        net = ipaddress.ip_network(value, strict=False)
    except (ValueError, TypeError):
        raise UserError(f"server.{key} {value!r} is not a network; use a form like "
                        f"{'198.19.0.0/24' if version == 4 else '2001:2:0:100::/64'}") from None
    if net.version != version:
        raise UserError(f"server.{key} must be an IPv{version} network")
    if net.num_addresses < 4:
        raise UserError(f"server.{key} is too small; use at least a /30 (IPv4) or /126 (IPv6)")
    return net


def load_plans(section) -> dict:
    if not isinstance(section, dict):
        raise UserError("plans are [plans.NAME] tables with devices, bandwidth_mbit, new_flows_per_second")
    plans = dict(DEFAULT_PLANS)
    for name, p in section.items():
        where = f"[plans.{name}]"
        if not isinstance(p, dict):
            raise UserError(f"{where} must be a table")
        check_keys(p, PLAN_KEYS, where)
        devices = p.get("devices", 1)
        bw = p.get("bandwidth_mbit", 0)
        flows = p.get("new_flows_per_second", 0)
        if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
            raise UserError(f"{where} devices must be a whole number of at least 1")
        if not isinstance(bw, (int, float)) or isinstance(bw, bool) or bw < 0:
            raise UserError(f"{where} bandwidth_mbit must be a number, 0 for no cap")
        if not isinstance(flows, int) or isinstance(flows, bool) or flows < 0:
            raise UserError(f"{where} new_flows_per_second must be a whole number, 0 for no cap")
        plans[name] = Plan(name, devices, float(bw), flows)
    return plans


def pushed_routes(cfg: ServerConfig) -> list[str]:
    """Every route the server pushes, in order, each once: the pools, push_routes, and with
    full_tunnel the default route of each family that has a pool."""
    routes = [str(n) for n in (cfg.pool4, cfg.pool6) if n is not None] + list(cfg.push_routes)
    if cfg.full_tunnel:
        routes += [d for d, n in (("0.0.0.0/0", cfg.pool4), ("::/0", cfg.pool6)) if n is not None]
    out: list[str] = []
    for r in routes:
        if r not in out:
            out.append(r)
    return out


def check_pushed(cfg: ServerConfig) -> None:
    """The config message must fit the protocol (CONTROL_MAX_ITEMS routes, CONTROL_MAX_LEN bytes):
    a config error now, not a failed 'config' reply to every client's hello."""
    from vpncore.proto import control
    from vpncore.proto.constants import CONTROL_MAX_ITEMS, CONTROL_VERSION, FEATURE_PARITY, FEATURE_SUPERPACKET

    routes = pushed_routes(cfg)
    if len(routes) > CONTROL_MAX_ITEMS:
        raise UserError(f"[server] pushes {len(routes)} routes (the address pools, push_routes and the full "
                        f"tunnel's default routes), more than the {CONTROL_MAX_ITEMS} the protocol carries; "
                        f"merge push_routes into fewer, larger networks")
    msg = {"type": "config", "version": CONTROL_VERSION, "mtu": cfg.mtu, "routes": routes, "dns": list(cfg.dns),
           "features": [FEATURE_SUPERPACKET, FEATURE_PARITY]}
    for key, net in (("ipv4", cfg.pool4), ("ipv6", cfg.pool6)):
        if net is not None:      # the longest address a client can get
            msg[key] = f"{net[-1]}/{net.prefixlen}"
    try:
        control.encode(msg)
    except ValueError:
        raise UserError("[server] push_routes and dns are too long for one config message of the protocol; "
                        "merge push_routes into fewer, larger networks") from None


def default_socket(interface: str) -> str:
    return os.path.join(RUN_DIR, f"{interface}.sock")


def load(path: str) -> ServerConfig:
    doc = load_toml(path, "config file")
    check_keys(doc, {"server", "client", "plans"}, "the config file")
    srv = need(doc, "server", dict, "the config file ([server] section)")
    for key in sorted(set(srv) & NO_LOG_REFUSED):
        raise UserError(f"[server] option '{key}' would record per-connection data, and vpnd keeps no logs "
                        f"by design; remove it (aggregate per-day figures: 'vpnd stats')")
    check_keys(srv, SERVER_KEYS, "[server]")
    key = read_private_key(srv, "[server]", os.path.dirname(os.path.abspath(path)))
    listen = srv.get("listen", ["0.0.0.0:51820"])
    if isinstance(listen, str):
        listen = [listen]
    if not isinstance(listen, list) or not listen:
        raise UserError("server.listen must be a list like [\"0.0.0.0:51820\", \"[::]:51820\"]")
    cfg = ServerConfig(private_key=key, listen=[parse_hostport(x, "server.listen entry") for x in listen])
    cfg.interface = str(srv.get("interface", "vpnd0"))
    cfg.control_socket = str(srv.get("control_socket", default_socket(cfg.interface)))
    if "address_pool4" in srv:
        cfg.pool4 = _pool(srv["address_pool4"], 4, "address_pool4")
    if "address_pool6" in srv:
        cfg.pool6 = _pool(srv["address_pool6"], 6, "address_pool6")
    if cfg.pool4 is None and cfg.pool6 is None:
        raise UserError("[server] needs address_pool4 and/or address_pool6, e.g. address_pool4 = \"198.19.0.0/24\"")
    cfg.mtu = srv.get("mtu", 1420)
    if not isinstance(cfg.mtu, int) or not 1280 <= cfg.mtu <= 65000:
        raise UserError("server.mtu must be a number from 1280 to 65000 (1420 suits most networks)")
    for key_name in ("dns", "push_routes"):
        items = srv.get(key_name, [])
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise UserError(f"server.{key_name} must be a list of strings")
        try:
            for x in items:
                (ipaddress.ip_address if key_name == "dns" else ipaddress.ip_network)(x)
        except ValueError:
            raise UserError(f"server.{key_name} has an invalid entry {x!r}") from None
        setattr(cfg, key_name, items)
    dns.configure(srv, cfg)
    for name in ("client_to_client", "block_server_networks", "full_tunnel"):
        if name in srv:
            if not isinstance(srv[name], bool):
                raise UserError(f"server.{name} must be true or false")
            setattr(cfg, name, srv[name])
    if "accounts" in srv:
        cfg.accounts = parse_location(need(srv, "accounts", str, "[server]"), os.path.dirname(os.path.abspath(path)))
    if "egress_interface" in srv:
        cfg.egress_interface = need(srv, "egress_interface", str, "[server]")
    ports = srv.get("block_tcp_ports", [25])
    if not isinstance(ports, list) or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536
                                              for p in ports):
        raise UserError("server.block_tcp_ports must be a list of port numbers, e.g. [25]")
    cfg.block_tcp_ports = ports
    nets = srv.get("blocked_networks", [])
    try:
        cfg.blocked_networks = [str(ipaddress.ip_network(n, strict=False)) for n in nets]
    except (ValueError, TypeError):
        raise UserError("server.blocked_networks must be a list of networks like \"10.0.0.0/8\"") from None
    check_pushed(cfg)
    cfg.plans = load_plans(doc.get("plans", {}))
    cfg.plans_given = tuple(cfg.plans[name] for name in doc.get("plans", {}))
    if cfg.plans_given and cfg.accounts is not None and cfg.accounts.engine == "postgresql":
        raise UserError("a fleet's plans live in its registry, not in a server's config: remove the [plans] "
                        "tables and set them with 'vpnd plan set NAME --devices N'")
    limit = srv.get("memory_limit_mb", 512)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 64:
        raise UserError("server.memory_limit_mb must be a whole number of at least 64")
    cfg.memory_limit_mb = limit
    if "metrics_listen" in srv:
        from .metrics import listen_address
        cfg.metrics_listen = listen_address(need(srv, "metrics_listen", str, "[server]"))
    level = srv.get("log_level", "info")
    if not isinstance(level, str) or level not in LEVELS:
        raise UserError(f"server.log_level must be one of {', '.join(LEVELS)}")
    cfg.log_level = LEVELS[level]
    clients = doc.get("client", [])
    if not isinstance(clients, list):
        raise UserError("clients are listed as [[client]] sections with a public_key each")
    seen = set()
    for i, entry in enumerate(clients, 1):
        where = f"[[client]] number {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{where} is not a table; write each client as a [[client]] section with public_key")
        check_keys(entry, CLIENT_KEYS, where)
        pub = parse_key(need(entry, "public_key", str, where), f"{where} public_key")
        if pub in seen:
            raise UserError(f"{where} repeats a public key listed earlier; list each client once")
        seen.add(pub)
        psk = parse_key(entry["preshared_key"], f"{where} preshared_key") if "preshared_key" in entry else None
        cfg.clients.append(ClientEntry(pub, psk))
    return cfg


def registry_location(path: str) -> tuple[Location, tuple]:
    """The accounts registry a config file names, and the plans it defines, read without its
    private key (the admin commands: `accounts` in [server], or `registry` in [admin] of an
    admin-only config)."""
    doc = load_toml(path, "config file")
    plans = doc.get("plans", {})
    given = load_plans(plans)
    given = tuple(given[name] for name in plans)
    base = os.path.dirname(os.path.abspath(path))
    admin = doc.get("admin")
    if isinstance(admin, dict) and "registry" in admin:
        return parse_location(need(admin, "registry", str, "[admin]"), base), given
    srv = doc.get("server")
    if isinstance(srv, dict) and "accounts" in srv:
        return parse_location(need(srv, "accounts", str, "[server]"), base), given
    raise UserError(f"{path} names no accounts registry; add accounts = \"sqlite:///var/lib/vpnd/accounts.db\" "
                    f"to [server] (or registry = \"...\" to [admin]), or pass --registry URL")
