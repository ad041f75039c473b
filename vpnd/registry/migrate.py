"""Moving a registry of the first format (one JSON file, jsonfile.py) into an SQL engine, checked.

Automatically, once: a server config that still names `accounts = ".../accounts.json"` gets the
SQLite file beside it (`accounts.db`) on its first start, the content compared with the JSON
file's, and the JSON file renamed to `accounts.json.migrated` so it is not read again. By hand,
into any engine: `vpnd registry migrate --from accounts.json --registry URL`.
"""

from __future__ import annotations

import os
import sys

from vpncore.cli import UserError

from . import DEFAULT_PLANS, Location, Plan
from .jsonfile import load as load_json


def migrate_json(json_path: str, target, plans: dict[str, Plan] | None = None) -> int:
    """Copy every account of `json_path` into the empty registry `target`, then check that the
    target holds exactly them; returns the number of accounts. A plan an account names that neither
    `plans` nor the registry has is created with one device and no caps."""
    from vpnd.stats import utc_day

    accounts = load_json(json_path)
    if not os.path.exists(json_path):
        raise UserError(f"no registry file {json_path!r} to migrate", 1)
    have = target.snapshot().plans
    wanted = dict(plans or {})
    for a in accounts.values():
        if a.plan not in wanted and a.plan not in have:
            wanted[a.plan] = DEFAULT_PLANS.get(a.plan, Plan(a.plan, devices=1))
        a.created = a.created or utc_day()
    target.load(accounts, list(wanted.values()))
    got = target.snapshot().accounts
    if {k: (a.plan, a.status, sorted(a.devices)) for k, a in got.items()} != \
            {k: (a.plan, a.status, sorted(a.devices)) for k, a in accounts.items()}:
        raise UserError(f"the migration of {json_path!r} did not check out; the JSON file is unchanged, "
                        f"remove the new registry and report this", 1)
    return len(accounts)


def migrate_beside(json_path: str, plans: dict[str, Plan] | None = None) -> Location:
    """The SQLite location that replaces the JSON registry `json_path`, migrating it once."""
    from .sqlite import SqliteRegistry

    db = json_path[:-len(".json")] + ".db"
    if os.path.exists(db) or not os.path.exists(json_path):
        return Location("sqlite", db)
    tmp = db + ".migrating"
    for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    target = SqliteRegistry(tmp)
    try:
        n = migrate_json(json_path, target, plans)
    finally:
        target.close()
    os.rename(tmp, db)
    os.rename(json_path, json_path + ".migrated")
    print(f"vpnd: migrated {n} account{'s' if n != 1 else ''} from {json_path} into {db} (checked); "
          f"the old file is now {os.path.basename(json_path)}.migrated: delete it once you are satisfied",
          file=sys.stderr, flush=True)
    return Location("sqlite", db)
