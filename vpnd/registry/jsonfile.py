"""The registry's first format, read only to migrate it (migrate.py): one JSON file, mode 0600,

    {"version": 1, "accounts": {"alice": {"plan": "free", "status": "active",
                                          "devices": ["<base64 public key>", ...],
                                          "created": "2026-11-22"}}}

as vpnd wrote it before the SQL engines (tests/data/accounts-v1.json was written by that code).
"""

from __future__ import annotations

import json

from vpncore.cli import UserError
from vpncore.configfile import parse_key

from . import ACCOUNT_ID, STATUSES, Account


def _bad(path: str, what: str) -> UserError:
    return UserError(f"accounts registry {path!r} is damaged ({what}); restore it from a backup", 1)


def parse(text: str, path: str) -> dict[str, Account]:
    try:
        doc = json.loads(text)
    except ValueError:
        raise _bad(path, "not JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("accounts"), dict):
        raise _bad(path, "unknown layout")
    out = {}
    seen: dict[bytes, str] = {}
    for aid, entry in doc["accounts"].items():
        if not ACCOUNT_ID.match(aid) or not isinstance(entry, dict):
            raise _bad(path, "bad account entry")
        devices = entry.get("devices", [])
        if not isinstance(devices, list):
            raise _bad(path, "bad device list")
        keys = []
        for d in devices:
            try:
                k = parse_key(d, "device key")
            except UserError:
                raise _bad(path, "bad device key") from None
            if k in keys:
                raise _bad(path, "a device key is listed twice in one account")
            if k in seen:
                raise _bad(path, "a device key belongs to two accounts")
            seen[k] = aid
            keys.append(k)
        status = entry.get("status", "active")
        if status not in STATUSES or not isinstance(entry.get("plan"), str):
            raise _bad(path, "bad plan or status")
        out[aid] = Account(aid, entry["plan"], status, keys, str(entry.get("created", "")))
    return out


def load(path: str) -> dict[str, Account]:
    """The registry's accounts; a missing file is an empty registry."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read(), path)
    except FileNotFoundError:
        return {}
    except PermissionError:
        raise UserError(f"cannot read the accounts registry {path!r}; run as root", 1) from None
    except UnicodeDecodeError:
        raise _bad(path, "not UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"the accounts registry {path!r} is a directory; name a file", 2) from None
