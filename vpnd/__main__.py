"""vpnd command line: genkey, genpsk, pubkey, serve, check, stats, api, account, device, plan, registry."""

from __future__ import annotations

import argparse
import os
import sys

from vpncore.keys import genkey, genpsk, pubkey_from_stdin, warn_if_stdout_exposed
from vpncore.version import add_version_argument
from vpncore.cli import UserError, run_cli

PROG = "vpnd"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, as for every other user error
        raise UserError(f"{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="The VPN server daemon. Keeps no logs: sessions live in memory only.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    add_version_argument(p, PROG)
    sub.add_parser("genkey", help="print a new private key")
    sub.add_parser("genpsk", help="print a new random preshared key")
    sub.add_parser("pubkey", help="read a private key on stdin, print its public key")
    s = sub.add_parser("serve", help="run the server in the foreground")
    s.add_argument("--config", "-c", required=True, metavar="FILE", help="server configuration (TOML)")
    ck = sub.add_parser("check", help="validate a server configuration as serve would, without starting")
    ck.add_argument("--config", "-c", required=True, metavar="FILE", help="server configuration (TOML)")
    st = sub.add_parser("stats", help="aggregate statistics per UTC day (no per-connection figures exist)")
    g = st.add_mutually_exclusive_group()
    g.add_argument("--config", "-c", metavar="FILE", help="find the control socket from this config")
    g.add_argument("--socket", metavar="PATH", help="the control socket of the running server")
    st.add_argument("--json", action="store_true", help="print JSON for scripts")

    api = sub.add_parser("api", help="serve the device API (users add their own devices; see vpnd/api.py)")
    api.add_argument("--config", "-c", required=True, metavar="FILE", help="API configuration (TOML, [api] table)")
    where = "registry location: sqlite:///PATH or postgresql://...?passfile=FILE"
    acc = sub.add_parser("account", help="manage accounts in the registry (running servers follow at once)")
    asub = acc.add_subparsers(dest="op", metavar="ACTION", parser_class=_Parser, required=True)
    actions = []
    add = asub.add_parser("add", help="create an account")
    add.add_argument("id")
    add.add_argument("--plan", default="free", help="plan name from the registry (default: free)")
    actions += [add, asub.add_parser("list", help="list accounts")]
    for name, text in (("show", "show one account"), ("suspend", "suspend: live sessions end at once"),
                       ("resume", "resume a suspended account"), ("remove", "delete an account")):
        a = asub.add_parser(name, help=text)
        a.add_argument("id")
        actions.append(a)
    sp = asub.add_parser("set-plan", help="change an account's plan")
    sp.add_argument("id")
    sp.add_argument("plan")
    actions.append(sp)
    dev = sub.add_parser("device", help="add, list or remove the devices (public keys) of an account")
    dsub = dev.add_subparsers(dest="op", metavar="ACTION", parser_class=_Parser, required=True)
    for name in ("add", "remove"):
        d = dsub.add_parser(name, help=f"{name} a device")
        d.add_argument("id", metavar="ACCOUNT")
        d.add_argument("key", metavar="PUBKEY")
        if name == "add":
            d.add_argument("--name", help="a name for the device (optional)")
        actions.append(d)
    dl = dsub.add_parser("list", help="list an account's devices")
    dl.add_argument("id", metavar="ACCOUNT")
    actions.append(dl)
    pl = sub.add_parser("plan", help="the registry's plans (device limit, bandwidth and new-flow caps)")
    psub = pl.add_subparsers(dest="op", metavar="ACTION", parser_class=_Parser, required=True)
    actions.append(psub.add_parser("list", help="list plans"))
    ps = psub.add_parser("set", help="create or change a plan")
    ps.add_argument("name")
    ps.add_argument("--devices", type=int, help="devices an account may register (a new plan: 1)")
    ps.add_argument("--bandwidth-mbit", type=float, help="per account and direction; 0 = no cap (new: 0)")
    ps.add_argument("--new-flows-per-second", type=int, help="per account; 0 = no cap (new: 0)")
    pr = psub.add_parser("remove", help="remove a plan no account uses")
    pr.add_argument("name")
    actions += [ps, pr]
    rg = sub.add_parser("registry", help="create a registry, or migrate a JSON registry into one")
    rsub = rg.add_subparsers(dest="op", metavar="ACTION", parser_class=_Parser, required=True)
    ri = rsub.add_parser("init", help="create the tables (PostgreSQL: and let a read-only role read them)")
    ri.add_argument("--reader", metavar="ROLE", help="PostgreSQL role the servers connect as (SELECT only)")
    rm = rsub.add_parser("migrate", help="copy a JSON registry into an empty registry, and check it")
    rm.add_argument("--from", dest="source", required=True, metavar="FILE", help="the accounts.json to migrate")
    actions += [ri, rm]
    for parser in actions:
        g = parser.add_mutually_exclusive_group(required=True)
        g.add_argument("--registry", "-r", metavar="URL", help=where)
        g.add_argument("--config", "-c", metavar="FILE",
                       help="a config naming the registry (the server's, or one with [admin] registry = ...)")
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    return p


def serve(path: str, make_server=None) -> int:
    """Run the server for the config at `path` in the foreground. `make_server(cfg, log)` builds it
    (default vpnd.server.Server; the test harness, tests/e2e/vpnd_harness.py, passes its own)."""
    import trio

    from vpncore.log import Log
    from vpncore.net.tun import TunError

    from .config import load
    from .server import Server

    cfg = load(path)
    from vpncore.sdnotify import has_net_admin
    if not has_net_admin():        # root, or a user with it in the ambient set (the systemd unit)
        raise UserError("vpnd serve needs CAP_NET_ADMIN (it creates a TUN device): run it as root (sudo) "
                        "or with AmbientCapabilities=CAP_NET_ADMIN", 1)
    from .egress import egress_interfaces
    cfg.egress_by_family = egress_interfaces(cfg)      # before anything is set up: a config error is exit 2
    from vpncore.log import WARNING, journal_prefix

    from .harden import harden
    log = Log(PROG, cfg.log_level)
    for warning in harden():
        print(f"{journal_prefix(sys.stderr, WARNING)}{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    server = (make_server or Server)(cfg, log)
    try:
        server.open()
        trio.run(server.run)
    except TunError as exc:
        raise UserError(str(exc), 1) from None
    return 0


def check(path: str) -> int:
    """`vpnd check`: load and validate the config exactly as serve does before it opens anything
    (the egress interface too; no root needed); one line and exit 2 on a mistake."""
    from .config import load
    from .egress import egress_interfaces

    cfg = load(path)
    cfg.egress_by_family = egress_interfaces(cfg)
    print(f"{PROG}: config OK")
    return 0


def stats(args) -> int:
    import json

    from vpncore.net.ctlsock import query

    from .config import default_socket, load
    from .stats import format_text

    path = args.socket or (load(args.config).control_socket if args.config else default_socket("vpnd0"))
    snap = query(path, "stats", PROG)
    print(json.dumps(snap) if args.json else format_text(snap))
    return 0


def registry_command(args) -> int:
    """`vpnd account|device|plan|registry ...`: with only the registry's location, never the
    server's private key."""
    from .registry import admin
    from .config import registry_location
    from .registry import parse_location

    if args.registry:
        location, plans = parse_location(args.registry, os.getcwd()), ()
    else:
        location, plans = registry_location(args.config)
    out = admin.run(location, args.cmd, args.op, args, config_plans=plans)
    if args.json:
        import json
        print(json.dumps(out["json"], sort_keys=True))
    elif out["text"]:
        print(out["text"])
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "genkey":
        warn_if_stdout_exposed(PROG)
        print(genkey())
    elif args.cmd == "genpsk":
        print(genpsk())
    elif args.cmd == "pubkey":
        print(pubkey_from_stdin())
    elif args.cmd == "serve":
        return serve(args.config)
    elif args.cmd == "check":
        return check(args.config)
    elif args.cmd == "stats":
        return stats(args)
    elif args.cmd == "api":
        from .api import serve as serve_api
        return serve_api(args.config)
    elif args.cmd in ("account", "device", "plan", "registry"):
        return registry_command(args)
    else:
        build_parser().print_help()
        return 2
    return 0


def entry() -> None:
    sys.exit(run_cli(main, prog=PROG))


if __name__ == "__main__":
    entry()
