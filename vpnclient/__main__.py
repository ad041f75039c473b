"""vpnclient command line: genkey, pubkey, up, status, down."""

from __future__ import annotations

import argparse
import json
import os
import sys

from vpncore.keys import genkey, pubkey_from_stdin
from vpncore.userror import UserError, run_cli

PROG = "vpnclient"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="The VPN client.",
                epilog="exit status: 0 success, 1 runtime failure (not running, no privileges, "
                       "network), 2 bad command line or config")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.add_parser("genkey", help="print a new private key")
    sub.add_parser("pubkey", help="read a private key on stdin, print its public key")
    up = sub.add_parser("up", help="connect and run in the foreground until Ctrl-C, SIGTERM or 'down'")
    up.add_argument("--config", "-c", required=True, metavar="FILE")
    up.add_argument("--log-level", choices=["quiet", "info", "verbose", "debug"], default="info")
    for name, helptext in (("status", "show the tunnel's state"), ("down", "disconnect a running 'up'")):
        s = sub.add_parser(name, help=helptext)
        g = s.add_mutually_exclusive_group()
        g.add_argument("--config", "-c", metavar="FILE", help="find the control socket from this config")
        g.add_argument("--socket", metavar="PATH", help="the control socket of the running client")
        if name == "status":
            s.add_argument("--json", action="store_true", help="print JSON for scripts")
    return p


def _socket_path(args) -> str:
    from .config import default_socket, load
    if args.socket:
        return args.socket
    if args.config:
        return load(args.config).control_socket
    return default_socket("vpn0")


def up(args) -> int:
    import trio

    from vpncore.log import LEVELS, Log

    from .client import Client
    from .config import load

    cfg = load(args.config)
    if os.geteuid() != 0:
        raise UserError("vpnclient up needs root (it creates a TUN device); run it with sudo or as root", 1)
    client = Client(cfg, Log(PROG, LEVELS[args.log_level]), out=lambda line: print(line, flush=True))
    trio.run(client.run)
    return client.exit_status


def format_status(st: dict) -> str:
    age = st.get("handshake_age_s")
    rows = [
        ("interface", st.get("interface") or "-"),
        ("state", st.get("state")),
        ("server", st.get("server_endpoint")),
        ("latest handshake", "never" if age is None else f"{age} s ago"),
        ("addresses", ", ".join(st.get("addresses") or []) or "-"),
        ("routes", ", ".join(st.get("routes") or []) or "-"),
        ("mtu", st.get("mtu") or "-"),
        ("dns", ", ".join(st.get("dns") or []) or "-"),
        ("bytes in", st.get("bytes_in")),
        ("bytes out", st.get("bytes_out")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "genkey":
        print(genkey())
    elif args.cmd == "pubkey":
        print(pubkey_from_stdin())
    elif args.cmd == "up":
        return up(args)
    elif args.cmd in ("status", "down"):
        from .client import query
        answer = query(_socket_path(args), args.cmd)
        if args.cmd == "status":
            print(json.dumps(answer) if args.json else format_status(answer))
        else:
            import time
            path = _socket_path(args)
            deadline = time.monotonic() + 10
            while os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            if os.path.exists(path):
                raise UserError("vpnclient did not stop within 10 s; end it with SIGTERM", 1)
            print("vpnclient: disconnected")
    else:
        parser.print_help()
        return 2
    return 0


def entry() -> None:
    sys.exit(run_cli(main, prog=PROG))


if __name__ == "__main__":
    entry()
