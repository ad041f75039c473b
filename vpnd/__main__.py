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
    return p


def serve(path: str) -> int:
    import trio

    from vpncore.log import Log
    from vpncore.net.tun import TunError

    from .config import load
    from .server import Server

    cfg = load(path)
    if os.geteuid() != 0:
        raise UserError("vpnd serve needs root (it creates a TUN device); run it with sudo or as root", 1)
    server = Server(cfg, Log(PROG, cfg.log_level))
    try:
        trio.run(server.run)
    except TunError as exc:
        raise UserError(str(exc), 1) from None
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "genkey":
        print(genkey())
    elif args.cmd == "pubkey":
        print(pubkey_from_stdin())
    elif args.cmd == "serve":
        return serve(args.config)
    else:
        build_parser().print_help()
        return 2
    return 0


def entry() -> None:
    sys.exit(run_cli(main, prog=PROG))


if __name__ == "__main__":
    entry()
