"""Man pages and bash/zsh completions for vpnd and vpnclient, generated from their argparse parsers.

    python -I tools/gen_docs.py --lib DIR --out DIR

Run by `make install-docs` with the installed venv's Python, so the pages describe the installed
code. The generators are argparse-manpage and shtab from PyPI; the make target pip-installs them
into a temporary directory (--lib) rather than into the installed venv, whose packages stay exactly
the project's. Writes OUT/vpnd.8, OUT/vpnclient.8, OUT/bash/{vpnd,vpnclient} and
OUT/zsh/{_vpnd,_vpnclient}.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

# name -> (module with build_parser(), the man page's one-line NAME, the FILES section)
PROGRAMS = {
    "vpnd": ("vpnd.__main__", "VPN server daemon that keeps no logs", [
        ("/etc/vpnd/vpnd.toml", "the server's configuration, read by vpnd.service"),
        ("/etc/vpnd/vpnd.example.toml", "an example configuration to start from"),
        ("/run/vpnd/INTERFACE.sock", "the control socket of a running server ('vpnd stats')"),
        ("/var/lib/vpnd/", "the state directory (an SQLite accounts registry, when configured)"),
        ("vpnd.service", "the systemd unit: systemctl enable --now vpnd"),
    ]),
    "vpnclient": ("vpnclient.__main__", "VPN client with a kill switch and DNS through the tunnel", [
        ("/etc/vpnclient/vpn0.toml", "the default configuration ('vpnclient up' without --config)"),
        ("/etc/vpnclient/vpnclient.example.toml", "an example configuration to start from"),
        ("/run/vpnclient/INTERFACE.sock", "the control socket of a running client ('status', 'down')"),
        ("/var/lib/vpnclient/INTERFACE.json", "what to restore after a crash ('vpnclient down')"),
        ("vpnclient@NAME.service", "the systemd unit for /etc/vpnclient/NAME.toml: "
                                   "systemctl enable --now vpnclient@vpn0"),
    ]),
}
FILE_METAVARS = {"FILE", "PATH"}
# The requests argparse-manpage writes (and ours below): any other line starting with '.' or "'" is text
# it wrapped there (e.g. a help ending "registry = ...)"), which roff would take for an unknown request.
REQUEST = re.compile(r"\.(TH|SH|SS|TP|PP|IP|RS|RE|B|I|BR|IR|BI|IB|RB|RI|nf|fi|UR|UE|br|sp|in)( |$)")


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line taken for a request."""
    out = []
    for line in text.replace("\\", "\\\\").replace("-", "\\-").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def mark_files(parser: argparse.ArgumentParser, shtab) -> None:
    """Options that take a FILE or PATH complete file names (an attribute only shtab reads)."""
    for p in parsers(parser):
        for action in p._actions:
            if action.metavar in FILE_METAVARS:
                action.complete = shtab.FILE


def manpage(name: str, parser: argparse.ArgumentParser, summary: str, files, version: str) -> str:
    from argparse_manpage.manpage import Manpage

    page = Manpage(parser, _data={"project_name": "vpncore", "version": version, "manual_section": "8",
                                  "manual_title": "System Manager's Manual", "description": summary})
    if parser.epilog:       # preformatted (RawDescriptionHelpFormatter): keep its layout
        page.add_section("comments", "=", ".nf\n" + roff(parser.epilog) + "\n.fi")
    page.add_section("files", "=", "\n".join(f".TP\n.I {roff(path)}\n{roff(text)}" for path, text in files))
    other = "vpnclient" if name == "vpnd" else "vpnd"
    page.add_section("see also", "=", f".BR {other} (8),\n.BR systemctl (1),\n.BR nft (8)")
    lines = str(page).splitlines()
    return "\n".join(line if not line.startswith((".", "'")) or REQUEST.match(line) else "\\&" + line
                     for line in lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", help="where argparse-manpage and shtab are installed (pip install --target)")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    if args.lib:
        sys.path.insert(0, os.path.abspath(args.lib))
    import shtab

    from vpncore.version import version

    os.makedirs(os.path.join(args.out, "bash"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "zsh"), exist_ok=True)
    for name, (module, summary, files) in PROGRAMS.items():
        mod = importlib.import_module(module)
        parser = mod.build_parser()
        with open(os.path.join(args.out, f"{name}.8"), "w") as f:
            f.write(manpage(name, parser, summary, files, version()))
        parser = mod.build_parser()          # a fresh one: the man page generator keeps state on it
        mark_files(parser, shtab)
        for shell, path in (("bash", os.path.join("bash", name)), ("zsh", os.path.join("zsh", "_" + name))):
            with open(os.path.join(args.out, path), "w") as f:
                f.write(shtab.complete(parser, shell=shell))
    print(f"gen_docs: man pages and bash/zsh completions for {', '.join(PROGRAMS)} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
