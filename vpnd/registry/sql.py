"""The registry's logic on SQL, shared by both engines (sqlite.py, postgres.py).

The engines differ in connecting, placeholders, types and in how a server learns of a change;
every query and every rule (one device key, one account; the plan's device limit at registration;
the generation number bumped by each change) is written once, here. The tables (and nothing else):

    meta      name, value             schema version and the generation (bumped on every change)
    plans     name, devices, bandwidth_mbit, new_flows_per_second
    accounts  id, plan, status, created_day
    devices   public_key, account, name
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager

from vpncore.cli import UserError

from . import (DEFAULT_PLANS, DEVICE_NAME, STATUSES, Account, Conflict, NotFound, Plan, Snapshot, check_account_id,
               check_plan)

SCHEMA_VERSION = 1
DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
TABLES = ("meta", "plans", "accounts", "devices")


def _no_account(aid: str) -> UserError:
    return NotFound(f"no account {aid!r}; see 'vpnd account list'", 1)


class SqlRegistry:
    """Subclasses set `engine`, `P` (the placeholder) and implement _connect, _begin, _ddl,
    wait_change and schema_columns."""

    engine = "sql"
    P = "?"

    def __init__(self):
        self._lock = threading.Lock()      # one connection, used from worker threads in turn
        self._conn = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    # --- connection and transactions --------------------------------------------------------
    def _q(self, sql: str) -> str:
        return sql if self.P == "?" else sql.replace("?", self.P)

    @contextmanager
    def _tx(self, write: bool = False):
        """One transaction on the engine's connection; a write bumps the generation."""
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            try:
                cur = self._begin(conn, write)
                yield cur
                if write:
                    cur.execute("UPDATE meta SET value = value + 1 WHERE name = 'generation'")
                    self._notify(cur)
                self._commit(conn)
            except BaseException as exc:
                try:
                    self._rollback(conn)
                except Exception:
                    pass
                if self._lost(exc):
                    self._drop()
                err = self._translate(exc)
                if err is not None:
                    raise err from None
                raise
            if write:
                self._after_write()

    def _notify(self, cur) -> None:
        pass

    def _commit(self, conn) -> None:
        conn.commit()

    def _rollback(self, conn) -> None:
        conn.rollback()

    def _after_write(self) -> None:
        pass

    def _lost(self, exc: BaseException) -> bool:
        return False

    def _translate(self, exc: BaseException):
        return None

    def _drop(self) -> None:
        try:
            self._conn.close()
        except Exception:
            pass
        self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._drop()

    def _check_schema(self, cur) -> None:
        cur.execute("SELECT value FROM meta WHERE name = 'schema'")
        row = cur.fetchone()
        if row is None:
            raise UserError("the accounts registry has no schema version; it was not made by vpnd "
                            "(create it with 'vpnd registry init')", 1)
        if row[0] != SCHEMA_VERSION:
            raise UserError(f"the accounts registry has schema version {row[0]}, this vpnd knows "
                            f"{SCHEMA_VERSION}; upgrade vpnd", 1)

    def _seed(self, cur) -> None:
        """A new registry: the schema version, generation 0 and the default plans."""
        cur.execute(self._q("INSERT INTO meta (name, value) VALUES ('schema', ?)"), (SCHEMA_VERSION,))
        cur.execute("INSERT INTO meta (name, value) VALUES ('generation', 0)")
        for plan in DEFAULT_PLANS.values():
            self._put_plan(cur, plan)

    # --- reading ------------------------------------------------------------------------------
    def generation(self) -> int:
        with self._tx() as cur:
            cur.execute("SELECT value FROM meta WHERE name = 'generation'")
            return int(cur.fetchone()[0])

    def snapshot(self) -> Snapshot:
        with self._tx() as cur:
            cur.execute("SELECT value FROM meta WHERE name = 'generation'")
            generation = int(cur.fetchone()[0])
            cur.execute("SELECT name, devices, bandwidth_mbit, new_flows_per_second FROM plans")
            plans = {r[0]: Plan(r[0], int(r[1]), float(r[2]), int(r[3])) for r in cur.fetchall()}
            cur.execute("SELECT id, plan, status, created_day FROM accounts ORDER BY id")
            accounts = {r[0]: Account(r[0], r[1], r[2], [], str(r[3])) for r in cur.fetchall()}
            cur.execute("SELECT public_key, account, name FROM devices ORDER BY account, public_key")
            for key, aid, name in cur.fetchall():
                acct = accounts[aid]
                key = bytes(key)
                acct.devices.append(key)
                if name is not None:
                    acct.names[key] = name
        return Snapshot(generation, accounts, plans)

    def account(self, aid: str) -> Account:
        """One account with its devices (NotFound if there is none)."""
        check_account_id(aid)
        with self._tx() as cur:
            cur.execute(self._q("SELECT id, plan, status, created_day FROM accounts WHERE id = ?"), (aid,))
            row = cur.fetchone()
            if row is None:
                raise _no_account(aid)
            acct = Account(row[0], row[1], row[2], [], str(row[3]))
            cur.execute(self._q("SELECT public_key, name FROM devices WHERE account = ? ORDER BY public_key"), (aid,))
            for key, name in cur.fetchall():
                acct.devices.append(bytes(key))
                if name is not None:
                    acct.names[bytes(key)] = name
        return acct

    # --- changes (the admin commands and the device API) ---------------------------------------
    def _account_row(self, cur, aid: str, lock: bool = False):
        cur.execute(self._q("SELECT plan, status FROM accounts WHERE id = ?" + self._for_update(lock)), (aid,))
        row = cur.fetchone()
        if row is None:
            raise _no_account(aid)
        return row

    def _for_update(self, lock: bool) -> str:
        return ""

    def _plan_row(self, cur, name: str):
        cur.execute(self._q("SELECT devices FROM plans WHERE name = ?"), (name,))
        row = cur.fetchone()
        if row is None:
            cur.execute("SELECT name FROM plans ORDER BY name")
            names = ", ".join(r[0] for r in cur.fetchall()) or "none"
            raise UserError(f"unknown plan {name!r}; the registry's plans: {names} (see 'vpnd plan list')")
        return row

    def add_account(self, aid: str, plan: str, day: str) -> None:
        check_account_id(aid)
        if not DAY.match(day):
            raise UserError(f"a creation day is YYYY-MM-DD, not {day[:40]!r}")
        with self._tx(write=True) as cur:
            self._plan_row(cur, plan)
            cur.execute(self._q("SELECT 1 FROM accounts WHERE id = ?"), (aid,))
            if cur.fetchone() is not None:
                raise Conflict(f"account {aid!r} already exists", 1)
            cur.execute(self._q("INSERT INTO accounts (id, plan, status, created_day) VALUES (?, ?, 'active', ?)"),
                        (aid, plan, day))

    def set_status(self, aid: str, status: str) -> None:
        assert status in STATUSES
        check_account_id(aid)
        with self._tx(write=True) as cur:
            self._account_row(cur, aid)
            cur.execute(self._q("UPDATE accounts SET status = ? WHERE id = ?"), (status, aid))

    def set_account_plan(self, aid: str, plan: str) -> None:
        check_account_id(aid)
        with self._tx(write=True) as cur:
            self._account_row(cur, aid)
            self._plan_row(cur, plan)
            cur.execute(self._q("UPDATE accounts SET plan = ? WHERE id = ?"), (plan, aid))

    def remove_account(self, aid: str) -> None:
        check_account_id(aid)
        with self._tx(write=True) as cur:
            self._account_row(cur, aid)
            cur.execute(self._q("DELETE FROM devices WHERE account = ?"), (aid,))
            cur.execute(self._q("DELETE FROM accounts WHERE id = ?"), (aid,))

    def add_device(self, aid: str, key: bytes, name: str | None = None) -> None:
        """Register a device; refused when the key is registered already or the account's plan has
        as many devices as it allows (checked under the account's row lock: fleet-wide)."""
        check_account_id(aid)
        if len(key) != 32:
            raise UserError("a device public key is 32 bytes (44 characters of base64)")
        if name is not None and not DEVICE_NAME.match(name):
            raise UserError("a device name is 1-64 letters, digits, spaces or . ' ( ) + - _")
        with self._tx(write=True) as cur:
            plan, _ = self._account_row(cur, aid, lock=True)
            cur.execute(self._q("SELECT account FROM devices WHERE public_key = ?"), (key,))
            row = cur.fetchone()
            if row is not None:
                where = "this account" if row[0] == aid else "another account"
                raise Conflict(f"that device key is already registered (to {where}); each device "
                               f"belongs to one account", 1)
            cur.execute(self._q("SELECT count(*) FROM devices WHERE account = ?"), (aid,))
            have = int(cur.fetchone()[0])
            limit = int(self._plan_row(cur, plan)[0])
            if have >= limit:
                raise Conflict(f"account {aid!r} has {have} device{'s' if have != 1 else ''}, as many as plan "
                               f"{plan!r} allows; remove one first ('vpnd device remove')", 1)
            cur.execute(self._q("INSERT INTO devices (public_key, account, name) VALUES (?, ?, ?)"),
                        (key, aid, name))

    def remove_device(self, aid: str, key: bytes) -> None:
        check_account_id(aid)
        with self._tx(write=True) as cur:
            self._account_row(cur, aid)
            cur.execute(self._q("DELETE FROM devices WHERE public_key = ? AND account = ?"), (key, aid))
            if cur.rowcount != 1:
                raise NotFound(f"account {aid!r} has no such device", 1)

    def _put_plan(self, cur, plan: Plan) -> None:
        values = (plan.devices, float(plan.bandwidth_mbit), plan.new_flows_per_second, plan.name)
        cur.execute(self._q("UPDATE plans SET devices = ?, bandwidth_mbit = ?, new_flows_per_second = ? "
                            "WHERE name = ?"), values)
        if cur.rowcount == 0:
            cur.execute(self._q("INSERT INTO plans (devices, bandwidth_mbit, new_flows_per_second, name) "
                                "VALUES (?, ?, ?, ?)"), values)

    def put_plan(self, plan: Plan) -> None:
        check_plan(plan)
        with self._tx(write=True) as cur:
            self._put_plan(cur, plan)

    def put_plans(self, plans) -> bool:
        """Make the registry's plans include `plans` (a server config's [plans]); True if it changed."""
        for plan in plans:
            check_plan(plan)
        have = self.snapshot().plans
        if all(have.get(p.name) == p for p in plans):
            return False
        with self._tx(write=True) as cur:
            for plan in plans:
                self._put_plan(cur, plan)
        return True

    def remove_plan(self, name: str) -> None:
        with self._tx(write=True) as cur:
            self._plan_row(cur, name)
            cur.execute(self._q("SELECT count(*) FROM accounts WHERE plan = ?"), (name,))
            n = int(cur.fetchone()[0])
            if n:
                raise UserError(f"plan {name!r} has {n} account{'s' if n != 1 else ''}; move them to another plan "
                                f"first ('vpnd account set-plan')", 1)
            cur.execute(self._q("DELETE FROM plans WHERE name = ?"), (name,))

    def load(self, accounts: dict[str, Account], plans) -> None:
        """Put the accounts and plans of another registry into this empty one (migration)."""
        with self._tx(write=True) as cur:
            cur.execute("SELECT count(*) FROM accounts")
            if int(cur.fetchone()[0]):
                raise UserError("the target registry already holds accounts; migrate into an empty one", 1)
            for plan in plans:
                self._put_plan(cur, plan)
            for a in accounts.values():
                self._plan_row(cur, a.plan)
                cur.execute(self._q("INSERT INTO accounts (id, plan, status, created_day) VALUES (?, ?, ?, ?)"),
                            (a.id, a.plan, a.status, a.created))
                for key in a.devices:
                    cur.execute(self._q("INSERT INTO devices (public_key, account, name) VALUES (?, ?, ?)"),
                                (key, a.id, a.names.get(key)))
