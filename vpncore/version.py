"""The version both commands print for `--version`: the installed package's, else pyproject's."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def version() -> str:
    try:
        return importlib.metadata.version("vpncore")
    except importlib.metadata.PackageNotFoundError:   # run from a source tree that was never installed
        import tomllib
        try:
            with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
                return tomllib.load(f)["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def add_version_argument(parser, prog: str) -> None:
    """`--version`, looked up only when asked for: building the parser reads no package metadata
    (a process that dropped its privileges may no longer read the interpreter's files)."""
    import argparse

    class _Version(argparse.Action):
        def __init__(self, option_strings, dest, **kw):
            super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{prog} {version()}")
            parser.exit()

    parser.add_argument("--version", action=_Version)
