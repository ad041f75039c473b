"""The PostgreSQL engine: one registry for a fleet of servers (psycopg 3, its sync API).

Servers connect with a role that may only read (`vpnd registry init --reader ROLE` grants it
SELECT and nothing else) and learn of a change by LISTEN/NOTIFY: every change bumps the generation
and notifies `vpnd_registry` in its own transaction, and a server's worker thread waits on a
second connection (`wait_change`), then reads the whole snapshot in one REPEATABLE READ
transaction. psycopg's async API is asyncio-only, so vpnd calls this from Trio worker threads
(DESIGN §9): the packet loops never wait on the database.

The device limit holds across the fleet because registration takes the account's row lock
(SELECT ... FOR UPDATE) before counting its devices; a device key is the primary key, so two
accounts can never hold one. A lost database is RegistryUnavailable: the server keeps what it
last read and retries. Credentials come from a libpq password file (`?passfile=`), never the URL.
"""

from __future__ import annotations

import psycopg
from psycopg import sql as pgsql

from vpncore.cli import UserError

from . import Conflict, RegistryUnavailable
from .sql import SqlRegistry

CHANNEL = "vpnd_registry"
CONNECT_TIMEOUT = 5

DDL = """
CREATE TABLE meta (name text PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE plans (name text PRIMARY KEY, devices integer NOT NULL CHECK (devices >= 0),
                    bandwidth_mbit double precision NOT NULL DEFAULT 0,
                    new_flows_per_second integer NOT NULL DEFAULT 0);
CREATE TABLE accounts (id text PRIMARY KEY, plan text NOT NULL REFERENCES plans (name),
                       status text NOT NULL CHECK (status IN ('active', 'suspended')),
                       created_day date NOT NULL);
CREATE TABLE devices (public_key bytea PRIMARY KEY CHECK (length(public_key) = 32),
                      account text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE, name text);
CREATE INDEX devices_account ON devices (account);
"""


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class PostgresRegistry(SqlRegistry):
    engine = "postgresql"
    P = "%s"

    def __init__(self, conninfo: str, create: bool = False):
        super().__init__()
        self.location = conninfo
        self._create = create
        self._listen = None
        with self._tx() as cur:
            self._check_schema(cur)

    def _open(self):
        try:
            return psycopg.connect(self.location, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                   application_name="vpnd")
        except psycopg.OperationalError as exc:
            raise RegistryUnavailable(_first_line(exc)) from None
        except psycopg.ProgrammingError as exc:      # a malformed URL
            raise UserError(f"the registry URL is not valid ({_first_line(exc)})") from None

    def _connect(self):
        conn = self._open()
        if self._create:
            with conn.transaction():
                found = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = "
                                     "current_schema() AND table_name = 'meta'").fetchone()[0]
                if not found:
                    for statement in DDL.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    self._seed(conn.cursor())
        return conn

    def _begin(self, conn, write: bool):
        cur = conn.cursor()
        cur.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return cur

    def _commit(self, conn) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn) -> None:
        conn.execute("ROLLBACK")

    def _for_update(self, lock: bool) -> str:
        return " FOR UPDATE" if lock else ""

    def _notify(self, cur) -> None:
        cur.execute(f"NOTIFY {CHANNEL}")

    def _lost(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.OperationalError) or (
            isinstance(exc, psycopg.Error) and self._conn is not None and self._conn.closed)

    def _translate(self, exc: BaseException):
        if isinstance(exc, psycopg.errors.UndefinedTable):
            return UserError("this database holds no vpnd registry; create it with "
                             "'vpnd registry init --registry URL'", 1)
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return UserError(f"the registry's database refused this role ({_first_line(exc)}); servers read "
                             f"with a read-only role, changes need the owner's", 1)
        if isinstance(exc, psycopg.errors.UniqueViolation):
            return Conflict("that device key is already registered (to another account); each device "
                            "belongs to one account", 1)
        if isinstance(exc, psycopg.OperationalError):
            return RegistryUnavailable(_first_line(exc))
        return None

    def close(self) -> None:
        super().close()
        self._close_listen()

    def _close_listen(self) -> None:
        if self._listen is not None:
            try:
                self._listen.close()
            except Exception:
                pass
            self._listen = None

    def wait_change(self, since: int, timeout: float) -> int:
        """Block (in a worker thread) until a NOTIFY says the registry changed and its generation
        differs from `since`, or `timeout` has passed; returns the generation."""
        try:
            if self._listen is None:
                listen = self._open()
                listen.execute(f"LISTEN {CHANNEL}")
                self._listen = listen          # listening before the check: no change is missed
            gen = self.generation()
            if gen != since:
                return gen
            for _ in self._listen.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.OperationalError as exc:
            self._close_listen()
            raise RegistryUnavailable(_first_line(exc)) from None
        return self.generation()

    def grant_reader(self, role: str) -> None:
        """Let `role` (which must exist) read the registry and nothing more."""
        with self._tx() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            if cur.fetchone() is None:
                raise UserError(f"no PostgreSQL role {role!r}; create it first (CREATE ROLE {role} LOGIN "
                                f"PASSWORD '...')", 1)
        with self._lock:
            conn = self._conn
            ident = pgsql.Identifier(role)
            conn.execute(pgsql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                pgsql.Identifier(conn.info.dbname), ident))
            conn.execute(pgsql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                pgsql.Identifier(conn.execute("SELECT current_schema()").fetchone()[0]), ident))
            for table in ("meta", "plans", "accounts", "devices"):
                conn.execute(pgsql.SQL("GRANT SELECT ON {} TO {}").format(pgsql.Identifier(table), ident))

    def schema_columns(self) -> list[tuple[str, str, str]]:
        with self._tx() as cur:
            cur.execute("SELECT table_name, column_name, data_type FROM information_schema.columns "
                        "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position")
            return [(t, c, k) for t, c, k in cur.fetchall()]
