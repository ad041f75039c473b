"""vpnd command line: genkey, pubkey, serve."""

from __future__ import annotations

import argparse
import os
import sys

from vpncore.keys import genkey, pubkey_from_stdin
from vpncore.userror import UserError, run_cli

PROG = "vpnd"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, as for every other user error
        raise UserError(f"{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="The VPN server daemon. Keeps no logs: sessions live in memory only.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.add_parser("genkey", help="print a new private key")
    sub.add_parser("pubkey", help="read a private key on stdin, print its public key")
    s = sub.add_parser("serve", help="run the server in the foreground")
    s.add_argument("--config", "-c", required=True, metavar="FILE", help="server configuration (TOML)")
    st = sub.add_parser("stats", help="aggregate statistics per UTC day (no per-connection figures exist)")
    g = st.add_mutually_exclusive_group()
    g.add_argument("--config", "-c", metavar="FILE", help="find the control socket from this config")
    g.add_argument("--socket", metavar="PATH", help="the control socket of the running server")
    st.add_argument("--json", action="store_true", help="print JSON for scripts")
    return p


def serve(path: str) -> int:
    import trio

    from vpncore.log import Log
    from vpncore.net.tun import TunError

    from .config import load
    from .server import Server

    from .harden import harden

    cfg = load(path)
    if os.geteuid() != 0:
        raise UserError("vpnd serve needs root (it creates a TUN device); run it with sudo or as root", 1)
    log = Log(PROG, cfg.log_level)
    for warning in harden():
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    hooks = os.environ.get("VPND_TEST_HOOKS") == "1"
    server = Server(cfg, log, test_hooks=hooks)
    if hooks and os.environ.get("VPND_TEST_REJECT_AFTER"):
        server.proto.reject_after = float(os.environ["VPND_TEST_REJECT_AFTER"])
    try:
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "genkey":
        print(genkey())
    elif args.cmd == "pubkey":
        print(pubkey_from_stdin())
    elif args.cmd == "serve":
        return serve(args.config)
    elif args.cmd == "stats":
        return stats(args)
    else:
        build_parser().print_help()
        return 2
    return 0


def entry() -> None:
    sys.exit(run_cli(main, prog=PROG))


if __name__ == "__main__":
    entry()
