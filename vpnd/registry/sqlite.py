"""The SQLite engine: the registry of a server on its own, in one file (stdlib sqlite3).

The file is created mode 0600 (SQLite gives its -wal and -shm files the same mode), in WAL mode,
with `secure_delete` (freed pages are zeroed) and the WAL truncated after every change, so a
deleted account or device leaves no bytes in any of the three files. Writers take SQLite's write
lock at the start of their transaction (BEGIN IMMEDIATE): two admin commands never interleave, and
the device limit is checked and the device added under one lock. A server learns of a change by
reading the generation number (a few microseconds, from a worker thread) every POLL seconds.
"""

from __future__ import annotations

import os
import sqlite3
import time

from vpncore.cli import UserError

from .sql import SqlRegistry

POLL = 0.1

DDL = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE plans (name TEXT PRIMARY KEY, devices INTEGER NOT NULL CHECK (devices >= 0),
                    bandwidth_mbit REAL NOT NULL DEFAULT 0, new_flows_per_second INTEGER NOT NULL DEFAULT 0);
CREATE TABLE accounts (id TEXT PRIMARY KEY, plan TEXT NOT NULL REFERENCES plans (name),
                       status TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
                       created_day TEXT NOT NULL CHECK (created_day GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]'));
CREATE TABLE devices (public_key BLOB PRIMARY KEY CHECK (length(public_key) = 32),
                      account TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE, name TEXT);
CREATE INDEX devices_account ON devices (account);
"""


class SqliteRegistry(SqlRegistry):
    engine = "sqlite"
    P = "?"

    def __init__(self, path: str, create: bool = True):
        super().__init__()
        self.path = os.path.abspath(path)
        self.location = f"sqlite://{self.path}"
        self._create = create
        with self._tx() as cur:          # opens, creates if asked, checks the schema version
            self._check_schema(cur)

    def _connect(self):
        path = self.path
        if not os.path.exists(path):
            if not self._create:
                raise UserError(f"no accounts registry at {path!r}; create it with "
                                f"'vpnd registry init --registry sqlite://{path}'", 1)
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                _owner_of_directory(path)
            except FileNotFoundError:
                raise UserError(f"the directory of the accounts registry {path!r} does not exist; create it",
                                1) from None
            except PermissionError:
                raise UserError(f"cannot create the accounts registry {path!r}; run as root", 1) from None
            except FileExistsError:
                pass
        elif os.path.isdir(path):
            raise UserError(f"the accounts registry {path!r} is a directory; name a file", 2)
        try:
            conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("PRAGMA foreign_keys = ON")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                conn.execute("BEGIN IMMEDIATE")
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                    for statement in DDL.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    self._seed(conn.cursor())
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None
        return conn

    def _damaged(self, exc: Exception) -> UserError:
        if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc):
            return UserError(f"cannot write the accounts registry {self.path!r}; run as root", 1)
        return UserError(f"the accounts registry {self.path!r} is not a vpnd registry or is damaged "
                         f"({exc}); restore it from a backup", 1)

    def _begin(self, conn, write: bool):
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        return cur

    def _translate(self, exc: BaseException):
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError):
            return self._damaged(exc)
        return None

    def _after_write(self) -> None:      # (under the lock)
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:
            pass       # busy: the next change truncates it

    def wait_change(self, since: int, timeout: float) -> int:
        """Block (in a worker thread) until the generation differs from `since`, or `timeout` has
        passed; returns the generation."""
        deadline = time.monotonic() + timeout
        while True:
            gen = self.generation()
            if gen != since or time.monotonic() >= deadline:
                return gen
            time.sleep(POLL)

    def schema_columns(self) -> list[tuple[str, str, str]]:
        out = []
        with self._tx() as cur:
            cur.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            for (table,) in cur.fetchall():
                cur.execute(f"PRAGMA table_info({table})")
                out += [(table, r[1], r[2].upper()) for r in cur.fetchall()]
        return out

    def files(self) -> list[str]:
        return [p for p in (self.path, self.path + "-wal", self.path + "-shm") if os.path.exists(p)]

    def grant_reader(self, role: str) -> None:
        from vpncore.cli import UserError
        raise UserError("--reader is for PostgreSQL; a SQLite registry is read by the server on the same host")


def _owner_of_directory(path: str) -> None:
    """A registry that root creates (an admin command) belongs to its directory's owner: the
    service user of StateDirectory=vpnd, which must open it (SQLite gives its -wal and -shm files
    the database file's owner when it runs as root)."""
    if os.geteuid() != 0:
        return
    st = os.stat(os.path.dirname(path) or ".")
    if st.st_uid != 0:
        os.chown(path, st.st_uid, st.st_gid)
