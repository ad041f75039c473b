"""The accounts registry (issue 14): accounts, plans and devices, the only persistent data vpnd has.

One interface, two engines on one SQL schema (`schema.py`):

- SQLite (`sqlite:///var/lib/vpnd/accounts.db`, the default for one server): one file, mode 0600,
  WAL, `secure_delete`, the WAL truncated after each change so a deleted account leaves no bytes.
- PostgreSQL (`postgresql://vpnd@db.example/vpnd?passfile=/etc/vpnd/pgpass`) for a fleet: every
  server reads the same registry with a role that can only read, and learns changes by
  LISTEN/NOTIFY.

What it stores: accounts (id, plan, state, the day it was created), plans, devices (public key,
optional name). Never an address, a port, a time finer than a day, a connection or a session.

Servers read (`snapshot`, `wait_change`) from a worker thread, never from the packet loops; the
admin commands (`vpnd account|device|plan|registry`) write, with only the registry's location.
A plain path ending in `.json` names a registry of the first format (`jsonfile.py`): it is migrated
once into the SQLite file beside it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from vpncore.cli import UserError

ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PLAN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
DEVICE_NAME = re.compile(r"^[\w .'()+-]{1,64}$")
STATUSES = ("active", "suspended")


class NotFound(UserError):
    """No such account (or device of it)."""


class Conflict(UserError):
    """The change clashes with what is there: a key registered already, a full device list."""


class RegistryUnavailable(Exception):
    """The database cannot be reached now (a server keeps serving with what it last knew)."""


@dataclass(frozen=True)
class Plan:
    name: str
    devices: int
    bandwidth_mbit: float = 0.0       # per account and direction; 0 = no cap
    new_flows_per_second: int = 0     # 0 = no cap

    def as_json(self) -> dict:
        return {"devices": self.devices, "bandwidth_mbit": self.bandwidth_mbit,
                "new_flows_per_second": self.new_flows_per_second}


DEFAULT_PLANS = {
    "free": Plan("free", devices=1, bandwidth_mbit=0.0, new_flows_per_second=50),
    "plus": Plan("plus", devices=5, bandwidth_mbit=0.0, new_flows_per_second=200),
}


@dataclass
class Account:
    id: str
    plan: str
    status: str = "active"
    devices: list[bytes] = field(default_factory=list)
    created: str = ""                                    # YYYY-MM-DD (UTC)
    names: dict[bytes, str] = field(default_factory=dict)  # device key -> its optional name

    def as_json(self) -> dict:
        from vpncore.configfile import encode_key
        return {"plan": self.plan, "status": self.status, "created": self.created,
                "devices": [{"key": encode_key(d), **({"name": self.names[d]} if d in self.names else {})}
                            for d in self.devices]}


@dataclass(frozen=True)
class Snapshot:
    """Everything a server needs from the registry, read in one transaction."""
    generation: int
    accounts: dict[str, Account]
    plans: dict[str, Plan]


def check_account_id(aid: str) -> None:
    if not isinstance(aid, str) or not ACCOUNT_ID.match(aid):
        raise UserError(f"account id {str(aid)[:40]!r} is not valid; use 1-64 letters, digits, '.', '_' or '-'")


def check_plan(plan: Plan) -> None:
    if not PLAN_NAME.match(plan.name):
        raise UserError(f"plan name {plan.name[:40]!r} is not valid; use 1-32 letters, digits, '.', '_' or '-'")
    if not 0 <= plan.devices <= 1000:
        raise UserError("a plan's devices must be a whole number from 0 to 1000")
    if not 0 <= plan.bandwidth_mbit <= 1e6:
        raise UserError("a plan's bandwidth_mbit must be from 0 (no cap) to 1000000")
    if not 0 <= plan.new_flows_per_second <= 1e6:
        raise UserError("a plan's new_flows_per_second must be from 0 (no cap) to 1000000")


@dataclass(frozen=True)
class Location:
    engine: str            # "sqlite" | "postgresql" | "json"
    target: str            # file path, or the libpq connection string

    def __str__(self) -> str:   # for messages: never a password (there is none inline, see parse_location)
        return f"{self.engine}:{self.target}" if self.engine != "postgresql" else self.target


def parse_location(text: str, base_dir: str | None = None) -> Location:
    """`sqlite:///abs/path.db`, `sqlite:relative.db`, `postgresql://...`, or a plain path (a `.json`
    path is a registry of the first format, anything else a SQLite file). Relative paths are taken
    from `base_dir` (the config file's directory)."""
    if not isinstance(text, str) or not text.strip():
        raise UserError("the accounts registry location is empty; use sqlite:///var/lib/vpnd/accounts.db "
                        "or a postgresql:// URL")

    def path(p: str) -> str:
        p = unquote(p)
        return p if os.path.isabs(p) or base_dir is None else os.path.join(base_dir, p)

    if text.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(text)
        if parts.password is not None:
            raise UserError("the registry URL holds a password; put it in a libpq password file and name it "
                            "with ?passfile=/etc/vpnd/pgpass (mode 0600)")
        query = parse_qs(parts.query)
        if "password" in query:
            raise UserError("the registry URL holds a password; use ?passfile=FILE instead of password=")
        if not parts.path.strip("/") and "dbname" not in query:
            raise UserError("the registry URL names no database; e.g. postgresql://vpnd@db.example/vpnd")
        return Location("postgresql", text)
    if text.startswith("sqlite:"):
        rest = text[len("sqlite:"):]
        if rest.startswith("//"):
            rest = rest[2:]
            if not rest.startswith("/"):
                raise UserError(f"registry URL {text[:80]!r}: write sqlite:///ABSOLUTE/PATH or sqlite:RELATIVE/PATH")
        if not rest or rest.endswith("/"):
            raise UserError(f"registry URL {text[:80]!r} names no file")
        return Location("sqlite", path(rest))
    if "://" in text:
        raise UserError(f"unknown registry engine in {text[:80]!r}; use sqlite:///PATH or postgresql://...")
    p = path(text)
    return Location("json" if p.endswith(".json") else "sqlite", p)


def open_registry(location: Location | str, *, create: bool | None = None):
    """The engine for `location` (a JSON location is migrated first, see migrate.py). `create`:
    make the tables if there are none (default: yes for SQLite, no for PostgreSQL, where that is
    'vpnd registry init' with the owner's role)."""
    if isinstance(location, str):
        location = parse_location(location)
    if location.engine == "json":
        from .migrate import migrate_beside
        location = migrate_beside(location.target)
    if location.engine == "sqlite":
        from .sqlite import SqliteRegistry
        return SqliteRegistry(location.target, create=True if create is None else create)
    from .postgres import PostgresRegistry
    return PostgresRegistry(location.target, create=bool(create))
