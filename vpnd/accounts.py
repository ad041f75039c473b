"""The accounts registry: the only persistent data vpnd keeps (issue: accounts, plans, abuse controls).

One JSON file the operator names (`accounts = "PATH"` in [server]), mode 0600:

    {"version": 1, "accounts": {"alice": {"plan": "free", "status": "active",
                                          "devices": ["<base64 public key>", ...],
                                          "created": "2026-11-22"}}}

No address, no time finer than a day. Writes are atomic: a new file is written beside the old
one, flushed to disk, then renamed over it (and the directory flushed), so a crash at any point
leaves either the old or the new registry, never a mix. Writers take an exclusive flock on the
registry itself, so two `vpnd account` commands never interleave.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

from vpncore import atomicfile
from vpncore.cli import UserError
from vpncore.configfile import encode_key, parse_key

from .stats import utc_day

ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STATUSES = ("active", "suspended")


@dataclass
class Account:
    id: str
    plan: str
    status: str = "active"
    devices: list[bytes] = field(default_factory=list)
    created: str = ""

    def as_json(self) -> dict:
        return {"plan": self.plan, "status": self.status, "devices": [encode_key(d) for d in self.devices],
                "created": self.created}


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


def dump(accounts: dict[str, Account]) -> str:
    return json.dumps({"version": 1, "accounts": {a.id: a.as_json() for a in
                                                  sorted(accounts.values(), key=lambda a: a.id)}},
                      indent=1, sort_keys=True) + "\n"


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


def write_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves the old or the new content, mode 0600."""
    atomicfile.replace(path, text.encode("utf-8"))


@contextmanager
def locked(path: str):
    """Hold an exclusive lock for a read-modify-write of the registry.

    The lock is taken on the registry's directory: the file itself is replaced on every write, so a
    lock on its inode would not exclude a writer that opens the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise UserError(f"the directory of the accounts registry {path!r} does not exist; create it", 1) from None
    except PermissionError:
        raise UserError(f"cannot open the accounts registry's directory {directory!r}; run as root", 1) from None
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        for name in os.listdir(directory):     # temp files of writers that crashed mid-write
            if name.startswith(".accounts-"):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass
        yield load(path)
    finally:
        os.close(dfd)


def _check_id(aid: str) -> None:
    if not ACCOUNT_ID.match(aid):
        raise UserError(f"account id {aid[:40]!r} is not valid; use 1-64 letters, digits, '.', '_' or '-'")


def _get(accounts: dict[str, Account], aid: str) -> Account:
    acct = accounts.get(aid)
    if acct is None:
        raise UserError(f"no account {aid!r}; see 'vpnd account list'", 1)
    return acct


def change(path: str, op: str, aid: str, *, plan: str | None = None, key: str | None = None,
           plans: tuple[str, ...] = ()) -> Account | None:
    """Apply one `vpnd account|device` change to the registry file; returns the account touched."""
    _check_id(aid)
    with locked(path) as accounts:
        if op == "add":
            if aid in accounts:
                raise UserError(f"account {aid!r} already exists", 1)
            if plans and plan not in plans:
                raise UserError(f"unknown plan {plan!r}; configured plans: {', '.join(plans)}")
            acct = accounts[aid] = Account(aid, plan, "active", [], utc_day())
        elif op in ("suspend", "resume"):
            acct = _get(accounts, aid)
            acct.status = "suspended" if op == "suspend" else "active"
        elif op == "remove":
            acct = accounts.pop(_get(accounts, aid).id)
        elif op in ("device-add", "device-remove"):
            acct = _get(accounts, aid)
            k = parse_key(key, "the device public key")
            if op == "device-add":
                owner = next((a.id for a in accounts.values() if k in a.devices), None)
                if owner is not None:
                    raise UserError(f"that device key is already registered (account {owner!r}); "
                                    f"each device belongs to one account", 1)
                acct.devices.append(k)
            else:
                if k not in acct.devices:
                    raise UserError(f"account {aid!r} has no such device", 1)
                acct.devices.remove(k)
        elif op == "set-plan":
            acct = _get(accounts, aid)
            if plans and plan not in plans:
                raise UserError(f"unknown plan {plan!r}; configured plans: {', '.join(plans)}")
            acct.plan = plan
        else:
            raise ValueError(op)
        try:
            write_atomic(path, dump(accounts))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise UserError(f"cannot write the accounts registry {path!r} ({exc.strerror})", 1) from None
            raise
        return acct
