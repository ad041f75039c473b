"""vpnclient's configuration file (TOML).

    [client]
    private_key = "..."                  # or private_key_file = "client.key"
    interface = "vpn0"
    control_socket = "/run/vpnclient/vpn0.sock"   # default: /run/vpnclient/<interface>.sock
    persistent_keepalive = 10            # seconds, 0 = off

    [server]
    endpoint = "198.18.0.1:51820"
    public_key = "..."
    preshared_key = "..."                # optional
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vpncore.net.udp import parse_hostport
from vpncore.userror import UserError, check_keys, load_toml, need, parse_key, read_private_key

CLIENT_KEYS = {"private_key", "private_key_file", "interface", "control_socket", "persistent_keepalive"}
SERVER_KEYS = {"endpoint", "public_key", "preshared_key"}
RUN_DIR = "/run/vpnclient"


@dataclass
class ClientConfig:
    private_key: bytes
    server_host: str
    server_port: int
    server_public: bytes
    psk: bytes | None = None
    interface: str = "vpn0"
    control_socket: str = ""
    persistent_keepalive: int = 10

    def __repr__(self) -> str:
        return "ClientConfig(...)"


def default_socket(interface: str) -> str:
    return os.path.join(RUN_DIR, f"{interface}.sock")


def load(path: str) -> ClientConfig:
    doc = load_toml(path, "config file")
    check_keys(doc, {"client", "server"}, "the config file")
    cl = need(doc, "client", dict, "the config file ([client] section)")
    sv = need(doc, "server", dict, "the config file ([server] section)")
    check_keys(cl, CLIENT_KEYS, "[client]")
    check_keys(sv, SERVER_KEYS, "[server]")
    key = read_private_key(cl, "[client]", os.path.dirname(os.path.abspath(path)))
    host, port = parse_hostport(need(sv, "endpoint", str, "[server]"), "server.endpoint")
    if port == 0:
        raise UserError("server.endpoint needs a port from 1 to 65535")
    cfg = ClientConfig(private_key=key, server_host=host, server_port=port,
                       server_public=parse_key(need(sv, "public_key", str, "[server]"), "server.public_key"))
    if "preshared_key" in sv:
        cfg.psk = parse_key(sv["preshared_key"], "server.preshared_key")
    cfg.interface = str(cl.get("interface", "vpn0"))
    cfg.control_socket = str(cl.get("control_socket", default_socket(cfg.interface)))
    ka = cl.get("persistent_keepalive", 10)
    if not isinstance(ka, int) or isinstance(ka, bool) or not 0 <= ka <= 3600:
        raise UserError("client.persistent_keepalive must be a number of seconds from 0 (off) to 3600")
    cfg.persistent_keepalive = ka
    return cfg
