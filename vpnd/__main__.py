"""vpnd command line: genkey, genpsk, pubkey, serve, stats, account, device."""

from __future__ import annotations

import argparse
import os
import sys

from vpncore.keys import genkey, genpsk, pubkey_from_stdin, warn_if_stdout_exposed
from vpncore.version import version
from vpncore.cli import UserError, run_cli

PROG = "vpnd"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, as for every other user error
        raise UserError(f"{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="The VPN server daemon. Keeps no logs: sessions live in memory only.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    p.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub.add_parser("genkey", help="print a new private key")
    sub.add_parser("genpsk", help="print a new random preshared key")
    sub.add_parser("pubkey", help="read a private key on stdin, print its public key")
    s = sub.add_parser("serve", help="run the server in the foreground")
    s.add_argument("--config", "-c", required=True, metavar="FILE", help="server configuration (TOML)")
    st = sub.add_parser("stats", help="aggregate statistics per UTC day (no per-connection figures exist)")
    g = st.add_mutually_exclusive_group()
    g.add_argument("--config", "-c", metavar="FILE", help="find the control socket from this config")
    g.add_argument("--socket", metavar="PATH", help="the control socket of the running server")
    st.add_argument("--json", action="store_true", help="print JSON for scripts")

    acc = sub.add_parser("account", help="manage accounts in the registry (changes reach a running vpnd at once)")
    asub = acc.add_subparsers(dest="op", metavar="ACTION", parser_class=_Parser, required=True)
    actions = []
    add = asub.add_parser("add", help="create an account")
    add.add_argument("id")
    add.add_argument("--plan", default="free", help="plan name from the config (default: free)")
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
    dev = sub.add_parser("device", help="add or remove a device (public key) of an account")
    dsub = dev.add_subparsers(dest="op", metavar="ACTION", parser_class=_Parser, required=True)
    for name in ("add", "remove"):
        d = dsub.add_parser(name, help=f"{name} a device")
        d.add_argument("id", metavar="ACCOUNT")
        d.add_argument("key", metavar="PUBKEY")
        actions.append(d)
    for parser in actions:
        parser.add_argument("--config", "-c", required=True, metavar="FILE",
                            help="server configuration naming the registry (accounts = ...)")
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
    if os.geteuid() != 0:
        raise UserError("vpnd serve needs root (it creates a TUN device); run it with sudo or as root", 1)
    from .egress import egress_interfaces
    cfg.egress_by_family = egress_interfaces(cfg)      # before anything is set up: a config error is exit 2
    from .harden import harden
    log = Log(PROG, cfg.log_level)
    for warning in harden():
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    server = (make_server or Server)(cfg, log)
    try:
        server.open()
        trio.run(server.run)
    except TunError as exc:
        raise UserError(str(exc), 1) from None
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


def accounts_command(args) -> int:
    import json

    from vpncore.net.ctlsock import query
    from vpncore.configfile import encode_key

    from . import accounts as reg
    from .config import load

    cfg = load(args.config)
    if cfg.accounts is None:
        raise UserError("the config names no accounts registry; add accounts = \"/var/lib/vpnd/accounts.json\" "
                        "to [server]")
    op = args.op if args.cmd == "account" else f"device-{args.op}"
    if op in ("list", "show"):
        accounts = reg.load(cfg.accounts)
        chosen = list(accounts.values()) if op == "list" else [accounts.get(args.id)]
        if chosen == [None]:
            raise UserError(f"no account {args.id!r}; see 'vpnd account list'", 1)
        if args.json:
            print(json.dumps({a.id: a.as_json() for a in chosen}))
        elif op == "list":
            for a in sorted(chosen, key=lambda a: a.id):
                print(f"{a.id}  plan {a.plan}  {a.status}  devices {len(a.devices)}  created {a.created}")
        else:
            a = chosen[0]
            print(f"account  {a.id}\nplan     {a.plan}\nstatus   {a.status}\ncreated  {a.created}")
            for d in a.devices:
                print(f"device   {encode_key(d)}")
        return 0
    reg.change(cfg.accounts, op, args.id, plan=getattr(args, "plan", None), key=getattr(args, "key", None),
               plans=tuple(cfg.plans))
    running = True
    try:
        query(cfg.control_socket, "reload", PROG, timeout=5)
    except UserError:
        running = False      # not running: it reads the registry when it starts
    verb = {"add": "created", "suspend": "suspended", "resume": "resumed", "remove": "removed",
            "set-plan": "moved to the new plan", "device-add": "device added to",
            "device-remove": "device removed from"}[op]
    tail = "; the running server applied it" if running else ""
    print(f"vpnd: account {args.id} {verb}{tail}" if not op.startswith("device") else
          f"vpnd: {verb} account {args.id}{tail}")
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
    elif args.cmd == "stats":
        return stats(args)
    elif args.cmd in ("account", "device"):
        return accounts_command(args)
    else:
        build_parser().print_help()
        return 2
    return 0


def entry() -> None:
    sys.exit(run_cli(main, prog=PROG))


if __name__ == "__main__":
    entry()
