"""What `vpnclient up` changed on the system, on disk, so a crash can be undone (issue 6).

`<state_dir>/<interface>.json` (mode 0600, in a 0700 directory), written before each change:

    {"version": 1, "interface": "vpn0", "kill_switch": true,
     "resolver": {...resolver.snapshot()...} or null,      # the original, while we replaced it
     "endpoints": {"vpn.example.net:51820": ["198.18.0.1"]}}   # last resolved server addresses

`vpnclient down` (with or without a running client) and the next `vpnclient up` read it: the
resolver is put back from the saved copy; the kill switch table is kernel state and is found by
name. The resolved endpoint addresses let a restarted client reach its servers by name while the
kill switch of the crashed run still blocks DNS.
"""

from __future__ import annotations

import json
import os

from vpncore import atomicfile
from vpncore.cli import UserError

VERSION = 1


def load(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 22))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise UserError(f"the state file {path} is unreadable; check the resolver file by hand, then delete "
                        f"the state file and run 'vpnclient down' again", 1) from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise UserError(f"the state file {path} is from another version; check the resolver file by hand "
                        f"and delete it", 1)
    return data


def save(path: str, data: dict) -> None:
    """Write atomically and durably (the resolver's original must survive a power cut)."""
    data = dict(data, version=VERSION)
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        atomicfile.replace(path, json.dumps(data, sort_keys=True).encode())
    except OSError as exc:
        raise UserError(f"cannot write the state file {path} ({exc.strerror}); check 'state_dir'", 1) from None


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UserError(f"cannot remove the state file {path} ({exc.strerror})", 1) from None
