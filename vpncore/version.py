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
