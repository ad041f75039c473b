"""vpnclient command line: genkey, genpsk, pubkey, register, up, status, down, locations, bypass."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from vpncore.keys import genkey, genpsk, pubkey_from_stdin, warn_if_stdout_exposed
from vpncore.version import add_version_argument
from vpncore.cli import UserError, run_cli

from .config import DEFAULT_CONFIG

PROG = "vpnclient"

EXIT_CODES = """\
exit status:
  0   success ('up': stopped by 'vpnclient down', SIGTERM or Ctrl-C, with everything undone)
  1   runtime failure: not running, no privileges, network, nftables, policy routing or cgroup v2
      missing, the server refused this device ('up' then leaves the kill switch on, failing closed:
      'vpnclient down' removes it)
  2   bad command line or config file (the message says what to fix)
  70  internal error (a bug; 'up' then leaves the kill switch on: 'vpnclient down' removes it)"""

CHOICES = """\
client config choices ([client] section; see 'vpnclient/config.py'):
  full_tunnel = true|false   unset: a pushed 0.0.0.0/0 or ::/0 sends all traffic of that family
                             through the tunnel (routing table 51820, 'ip rule' prefs 32760-32762;
                             the main table is never changed); true: every family the tunnel has an
                             address for; false: only the pushed non-default routes
  kill_switch = true|false|"always"
                             true (default): only the tunnel and the servers can be reached while
                             'up' runs, and after it fails, until 'vpnclient down'; "always": also
                             after 'down', Ctrl-C and SIGTERM with no client running, until
                             'vpnclient down --disable-kill-switch'
  allow_lan = true           local networks (10/8, 172.16/12, 192.168/16, 169.254/16, fc00::/7,
                             fe80::/10 and the machine's own networks) stay reachable outside the
                             tunnel, through the kill switch
  exclude = ["CIDR", ...]    these destinations bypass the tunnel and the kill switch
  fwmark = 51820, route_table = 51820
                             the tunnel sockets' SO_MARK and the full tunnel's routing table
  'vpnclient bypass -- COMMAND ARGS...' runs COMMAND outside the tunnel (a cgroup v2 whose sockets
  carry fwmark; needs a running 'up' and the cgroup v2 hierarchy mounted)"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="The VPN client.", epilog=CHOICES + "\n\n" + EXIT_CODES,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    add_version_argument(p, PROG)
    sub.add_parser("genkey", help="print a new private key")
    sub.add_parser("genpsk", help="print a new random preshared key")
    sub.add_parser("pubkey", help="read a private key on stdin, print its public key")
    up = sub.add_parser("up", help="connect and run in the foreground until Ctrl-C, SIGTERM or 'down'",
                        epilog=CHOICES + "\n\n" + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE",
                    help=f"the client config (default: {DEFAULT_CONFIG})")
    up.add_argument("--log-level", choices=["quiet", "info", "verbose", "debug"], default="info")
    up.add_argument("--location", metavar="CODE", help="use only the servers of this location (see 'locations')")
    up.add_argument("--fastest", action="store_true",
                    help="handshake with every server first and use the one with the shortest round trip")
    up.add_argument("--no-kill-switch", action="store_true",
                    help="let traffic leave outside the tunnel (default: only the tunnel and the servers)")
    for name, helptext in (("status", "show the tunnel's state"),
                           ("down", "disconnect; after a crash, remove the kill switch and restore DNS")):
        s = sub.add_parser(name, help=helptext)
        g = s.add_mutually_exclusive_group()
        g.add_argument("--config", "-c", metavar="FILE", help="find the control socket (and state) from this config")
        g.add_argument("--socket", metavar="PATH", help="the control socket of the running client")
        if name == "status":
            s.add_argument("--json", action="store_true", help="print JSON for scripts")
        else:
            s.add_argument("--disable-kill-switch", action="store_true",
                           help='also remove a permanent kill switch (kill_switch = "always"); without '
                                'it, down keeps that one, blocking everything outside the tunnel')
    by = sub.add_parser("bypass", help="run one program whose traffic skips the tunnel (needs a running 'up')",
                        epilog="example: vpnclient bypass -- curl https://example.net/",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = by.add_mutually_exclusive_group()
    g.add_argument("--config", "-c", metavar="FILE", help="find the running client from this config")
    g.add_argument("--socket", metavar="PATH", help="the control socket of the running client")
    by.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                    help="the program to run, after '--'")
    loc = sub.add_parser("locations", help="list the servers of a config: name, location, endpoint")
    loc.add_argument("--config", "-c", metavar="FILE", help=f"the client config (default: {DEFAULT_CONFIG})")
    loc.add_argument("--json", action="store_true", help="print JSON for scripts")
    reg = sub.add_parser("register", help="add this machine as a device of an account: new key pair, "
                         "registered with the device API, and a complete config written")
    reg.add_argument("--api", required=True, metavar="URL", help="the device API, e.g. https://api.example.net")
    reg.add_argument("--account", required=True, metavar="ID", help="the account number")
    reg.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE",
                     help=f"the client config to write, mode 0600 (default: {DEFAULT_CONFIG})")
    reg.add_argument("--name", metavar="DEVICE_NAME", help="a name for this device (default: the service picks one)")
    reg.add_argument("--force", action="store_true", help="replace an existing config (its private key is lost)")
    return p


def _socket_path(args) -> str:
    from .config import default_socket, load
    if args.socket:
        return args.socket
    if args.config:
        return load(args.config).control_socket
    return default_socket("vpn0")


def _running(path: str) -> bool:
    """Something answers on the control socket (a live `up`)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def _only(exc: BaseException, kinds: tuple) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(e, kinds) for e in exc.exceptions)
    return isinstance(exc, kinds)


def up(args) -> int:
    import trio

    from vpncore.log import LEVELS, Log

    from . import locations, routing
    from .client import Client, new_connection
    from .config import load
    from .guard import Guard

    cfg = load(args.config)
    chosen = locations.select(cfg.servers, args.location)
    from vpncore.sdnotify import has_net_admin
    if not has_net_admin():        # root, or a user with it in the ambient set (the systemd unit)
        raise UserError("vpnclient up needs CAP_NET_ADMIN (it creates a TUN device): run it as root (sudo) "
                        "or with AmbientCapabilities=CAP_NET_ADMIN", 1)
    if _running(cfg.control_socket):
        raise UserError(f"another vpnclient is already running with control socket {cfg.control_socket}; "
                        f"stop it with 'vpnclient down' or set a different control_socket", 1)
    if cfg.full_tunnel is not False:
        routing.check_support()

    def out(line: str) -> None:
        print(line, flush=True)

    guard = Guard(cfg, kill_switch=False if args.no_kill_switch else cfg.kill_switch, out=out)
    cache = guard.recover()
    out(f"vpnclient: resolving {len(cfg.servers)} server endpoint{'s' if len(cfg.servers) > 1 else ''}")
    every, cache = locations.resolve(cfg.servers, cache, out)
    targets = [t for t in every if t.server in chosen]
    if not targets:
        raise UserError("none of the chosen servers' endpoints resolves; check the network or choose "
                        "another location", 1)
    client = None
    try:
        guard.engage([t.address for t in every], cache)   # every location: failover needs no rule change
        guard.offer_bypass()

        async def main():
            nonlocal client, targets
            conn = None
            if args.fastest:
                out(f"vpnclient: measuring handshake round trips to {len(targets)} server"
                    f"{'s' if len(targets) > 1 else ''}")
                targets, conn = await locations.measure(targets, lambda s: new_connection(cfg, s),
                                                        mark=cfg.fwmark)
                for line in locations.format_rtts(targets):
                    out(line)
                if conn is None:
                    out("vpnclient: no server answered within "
                        f"{locations.MEASURE_TIMEOUT:g} s; trying them in config order")
            client = Client(cfg, Log(PROG, LEVELS[args.log_level]), out=out, targets=targets, conn=conn,
                            guard=guard)
            client.open()
            await client.run()

        trio.run(main)
    except BaseException as exc:
        if _only(exc, (UserError, KeyboardInterrupt)):   # orderly: undo; a failure keeps the kill switch
            for line in guard.release(failed=not _only(exc, (KeyboardInterrupt,))):
                out(line)
        else:                              # a bug: fail closed, keep the kill switch and the resolver
            print(f"{PROG}: the kill switch and the DNS settings stay in place; "
                  f"'vpnclient down --config {args.config}' removes them", file=sys.stderr, flush=True)
        raise
    failed = client is not None and client.exit_status != 0
    for line in guard.release(failed=failed):   # a failed run keeps the kill switch (fails closed)
        out(line)
    out("vpnclient: disconnected")
    return client.exit_status if client is not None else 0


def format_status(st: dict) -> str:
    age = st.get("handshake_age_s")
    server = st.get("server") or "-"
    if st.get("location"):
        server += f" ({st['location']})"
    blocked = st.get("kill_switch_blocked")
    ks = "on" if st.get("kill_switch") else "off"
    if st.get("kill_switch") and blocked is not None:
        ks += f", {blocked} packets blocked"
    rows = [
        ("interface", st.get("interface") or "-"),
        ("state", st.get("state")),
        ("server", server),
        ("endpoint", st.get("server_endpoint")),
        ("latest handshake", "never" if age is None else f"{age} s ago"),
        ("addresses", ", ".join(st.get("addresses") or []) or "-"),
        ("routes", ", ".join(st.get("routes") or []) or "-"),
        ("mtu", st.get("mtu") or "-"),
        ("dns", ", ".join(st.get("dns") or []) or "-"),
        ("resolver", st.get("resolver") or "unchanged"),
        ("kill switch", ks),
        ("full tunnel", " and ".join(st.get("full_tunnel") or []) or "no"),
        ("failovers", f"{st.get('failovers', 0)} (of {st.get('servers', 1)} servers)"),
        ("bytes in", st.get("bytes_in")),
        ("bytes out", st.get("bytes_out")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def status(args) -> int:
    from .client import query
    answer = query(_socket_path(args), "status")
    from vpncore.sdnotify import has_net_admin
    if answer.get("kill_switch") and has_net_admin():     # nft lists the counter only with it
        from . import killswitch
        try:
            answer["kill_switch_blocked"] = killswitch.blocked_packets()
        except UserError:
            pass
    print(json.dumps(answer) if args.json else format_status(answer))
    return 0


def _state_owner(path: str) -> str | None:
    from . import state
    try:
        data = state.load(path)
    except UserError:
        return None
    return data.get("control_socket") if data else None


def down(args) -> int:
    import time
    from types import SimpleNamespace

    from .client import query
    from .config import DEFAULT_TABLE, STATE_DIR, load, state_file
    from .guard import undo_crashed_run

    cfg = load(args.config) if args.config else SimpleNamespace(state_file=state_file(STATE_DIR, "vpn0"),
                                                                route_table=DEFAULT_TABLE)
    path = _socket_path(args)
    disable = args.disable_kill_switch
    if not _running(path):
        # no client: undo what a crashed, failed or killed one left (kill switch, routing, resolver)
        if undo_crashed_run(cfg, _running, out=print, disable_kill_switch=disable):
            print("vpnclient: no client was running; undid what the last run left behind")
            return 0
        if disable:
            print("vpnclient: no client was running and no kill switch was in place")
            return 0
    query(path, "down")                # with nothing running: the usual "not running" line
    deadline = time.monotonic() + 10
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(path):
        raise UserError("vpnclient did not stop within 10 s; end it with SIGTERM", 1)
    deadline = time.monotonic() + 5       # the client undoes its changes after closing its socket
    while _state_owner(cfg.state_file) == path and time.monotonic() < deadline:
        time.sleep(0.05)
    undo_crashed_run(cfg, _running, out=print, disable_kill_switch=disable)   # normally nothing left
    print("vpnclient: disconnected")
    return 0


def run_bypass(args) -> int:
    from .bypass import run
    from .client import query
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise UserError("say which program to run: vpnclient bypass -- COMMAND [ARGS...]")
    path = _socket_path(args)
    if not _running(path):
        raise UserError(f"no vpnclient is running with control socket {path}; start 'vpnclient up' first "
                        f"(bypass needs its cgroup)", 1)
    st = query(path, "status")
    return run(st.get("bypass_cgroup"), st.get("bypass_unavailable") or "", argv)


def list_locations(args) -> int:
    from .config import load
    cfg = load(args.config or DEFAULT_CONFIG)
    if args.json:
        print(json.dumps([{"name": s.name, "location": s.location, "endpoint": s.endpoint}
                          for s in cfg.servers]))
        return 0
    rows = [("NAME", "LOCATION", "ENDPOINT")] + [(s.name, s.location or "-", s.endpoint) for s in cfg.servers]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "genkey":
        warn_if_stdout_exposed(PROG)
        print(genkey())
    elif args.cmd == "genpsk":
        print(genpsk())
    elif args.cmd == "pubkey":
        print(pubkey_from_stdin())
    elif args.cmd == "up":
        return up(args)
    elif args.cmd == "status":
        return status(args)
    elif args.cmd == "down":
        return down(args)
    elif args.cmd == "locations":
        return list_locations(args)
    elif args.cmd == "bypass":
        return run_bypass(args)
    elif args.cmd == "register":
        from .register import run as run_register
        return run_register(args)
    else:
        parser.print_help()
        return 2
    return 0


def entry() -> None:
    sys.exit(run_cli(main, prog=PROG))


if __name__ == "__main__":
    entry()
