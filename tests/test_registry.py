"""The accounts registry (issue 14): one contract, run against every engine.

- the contract: accounts, plans, devices, the errors (one line each), generation numbers and
  wait_change, the device limit at registration under concurrent writers;
- what may never be stored: the schema of each engine read back, no column that could hold an
  address, a port or a time finer than a day, no connection or session table;
- SQLite: mode 0600, WAL, secure_delete, and a deleted account's bytes gone from all its files;
- migration of a registry of the first format, written by the code of that format
  (tests/data/accounts-v1.json), by hand and automatically beside it.

Engines: SQLite in a temporary directory; PostgreSQL on the real server tests/conftest.py starts.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import stat
import threading
from pathlib import Path

import pytest

from vpncore.cli import UserError
from vpnd.registry import DEFAULT_PLANS, Plan, open_registry, parse_location
from vpnd.registry.migrate import migrate_beside, migrate_json
from vpnd.stats import utc_day

V1 = Path(__file__).parent / "data" / "accounts-v1.json"
K1, K2, K3 = (bytes([i]) * 32 for i in (1, 2, 3))
DAY = "2026-12-03"
ENGINES = ["sqlite", "postgresql"]
_dbs = itertools.count()


@pytest.fixture
def new_registry(request, workdir):
    """A function returning a new, empty registry of the engine under test (and its location)."""
    made = []

    def make():
        if request.param == "sqlite":
            url = f"sqlite://{workdir}/accounts{len(made)}.db"
        else:
            pg = request.getfixturevalue("postgres")
            name = f"reg_{os.getpid()}_{next(_dbs)}"
            pg.create_database(name)
            url = pg.passfile_url("vpnd_admin", pg.password, name)
        reg = open_registry(url, create=True)
        made.append(reg)
        return reg
    yield make
    for reg in made:
        reg.close()


@pytest.fixture
def reg(new_registry):
    return new_registry()


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def pytest_generate_tests(metafunc):
    if "new_registry" in metafunc.fixturenames:
        metafunc.parametrize("new_registry", ENGINES, indirect=True)


# -- the contract -------------------------------------------------------------------------------------

def test_new_registry_has_default_plans_and_nothing_else(reg):
    snap = reg.snapshot()
    assert snap.accounts == {} and snap.plans == DEFAULT_PLANS
    assert snap.generation == reg.generation()


def test_account_lifecycle(reg):
    g0 = reg.generation()
    reg.add_account("alice", "free", DAY)
    reg.add_account("bob", "plus", DAY)
    assert reg.generation() == g0 + 2                  # every change moves the generation
    reg.add_device("alice", K1, "phone")
    a = reg.account("alice")
    assert (a.id, a.plan, a.status, a.devices, a.created, a.names) == ("alice", "free", "active", [K1], DAY,
                                                                      {K1: "phone"})
    reg.set_status("alice", "suspended")
    assert reg.account("alice").status == "suspended"
    reg.set_status("alice", "suspended")               # idempotent
    reg.set_status("alice", "active")
    reg.set_account_plan("alice", "plus")
    assert reg.account("alice").plan == "plus"
    reg.add_device("alice", K2)
    reg.remove_device("alice", K1)
    assert reg.account("alice").devices == [K2] and reg.account("alice").names == {}
    reg.remove_account("alice")
    assert list(reg.snapshot().accounts) == ["bob"]
    reg.add_device("bob", K2)                          # a removed account's key is free again
    assert reg.account("bob").devices == [K2]


def test_errors_are_one_line_and_change_nothing(reg):
    reg.add_account("alice", "free", DAY)
    reg.add_device("alice", K1)
    reg.add_account("bob", "plus", DAY)
    before = reg.snapshot()
    cases = [
        (lambda: reg.add_account("alice", "free", DAY), "account 'alice' already exists"),
        (lambda: reg.add_account("carol", "gold", DAY), "unknown plan 'gold'; the registry's plans: free, plus"),
        (lambda: reg.add_account("has space", "free", DAY), "is not valid"),
        (lambda: reg.account("nobody"), "no account 'nobody'; see 'vpnd account list'"),
        (lambda: reg.set_status("nobody", "active"), "no account 'nobody'"),
        (lambda: reg.set_account_plan("bob", "gold"), "unknown plan 'gold'"),
        (lambda: reg.remove_account("nobody"), "no account 'nobody'"),
        (lambda: reg.add_device("nobody", K2), "no account 'nobody'"),
        (lambda: reg.add_device("bob", K1), "that device key is already registered (to another account)"),
        (lambda: reg.add_device("alice", K1), "already registered (to this account)"),
        (lambda: reg.add_device("alice", K2), "account 'alice' has 1 device, as many as plan 'free' allows"),
        (lambda: reg.add_device("bob", b"short"), "32 bytes"),
        (lambda: reg.add_device("bob", K2, "x" * 65), "a device name is"),
        (lambda: reg.remove_device("bob", K1), "account 'bob' has no such device"),
        (lambda: reg.remove_plan("free"), "plan 'free' has 1 account"),
        (lambda: reg.remove_plan("gold"), "unknown plan 'gold'"),
        (lambda: reg.put_plan(Plan("bad name", 1)), "plan name"),
        (lambda: reg.put_plan(Plan("p", -1)), "devices must be"),
    ]
    for call, text in cases:
        with pytest.raises(UserError) as info:
            call()
        assert text in one_line(info.value), (text, str(info.value))
    after = reg.snapshot()
    assert (after.accounts, after.plans, after.generation) == (before.accounts, before.plans, before.generation)


def test_plans(reg):
    reg.put_plan(Plan("gold", 3, 100.0, 20))
    assert reg.snapshot().plans["gold"] == Plan("gold", 3, 100.0, 20)
    reg.put_plan(Plan("gold", 4))
    assert reg.snapshot().plans["gold"] == Plan("gold", 4, 0.0, 0)
    reg.add_account("carol", "gold", DAY)
    assert reg.put_plans([Plan("gold", 4)]) is False             # already so: no write, no new generation
    assert reg.put_plans([Plan("gold", 5), Plan("team", 10)]) is True
    assert reg.snapshot().plans["team"].devices == 10
    reg.remove_plan("team")
    assert "team" not in reg.snapshot().plans


def test_device_limit_follows_the_plan(reg):
    reg.put_plan(Plan("duo", 2))
    reg.add_account("alice", "duo", DAY)
    reg.add_device("alice", K1)
    reg.add_device("alice", K2)
    with pytest.raises(UserError, match="has 2 devices, as many as plan 'duo' allows"):
        reg.add_device("alice", K3)
    reg.put_plan(Plan("duo", 3))
    reg.add_device("alice", K3)
    assert len(reg.account("alice").devices) == 3


def test_device_limit_holds_under_concurrent_registrations(new_registry):
    """Writers on their own connections (as servers of a fleet and API workers are) register
    devices of one account at once: never more than the plan allows."""
    first = new_registry()
    first.put_plan(Plan("trio", 3))
    first.add_account("alice", "trio", DAY)
    location = first.location
    writers = [open_registry(location) for _ in range(6)]
    ok, refused, errors = [], [], []
    barrier = threading.Barrier(len(writers))

    def register(i, r):
        barrier.wait()
        try:
            r.add_device("alice", bytes([100 + i]) * 32)
            ok.append(i)
        except UserError as exc:
            refused.append(str(exc))
        except Exception as exc:          # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=register, args=(i, r)) for i, r in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in writers:
        r.close()
    assert errors == []
    assert len(ok) == 3 and len(refused) == 3, (ok, refused)
    assert all("as many as plan 'trio' allows" in m for m in refused)
    assert len(first.account("alice").devices) == 3


def test_wait_change_returns_on_a_change_from_another_connection(new_registry):
    server_view = new_registry()
    admin = open_registry(server_view.location)
    try:
        gen = server_view.generation()
        assert server_view.wait_change(gen, 0.3) == gen         # nothing changed: back after the timeout
        seen = {}

        def wait():
            seen["gen"] = server_view.wait_change(gen, 30)

        t = threading.Thread(target=wait)
        t.start()
        admin.add_account("alice", "free", DAY)
        t.join(30)
        assert seen["gen"] != gen and seen["gen"] == admin.generation()
        assert "alice" in server_view.snapshot().accounts
    finally:
        admin.close()


# -- what is never stored ------------------------------------------------------------------------------

FORBIDDEN_NAME = re.compile(r"(^|_)(ip|ips|addr|address|addresses|port|endpoint|host|remote|seen|time|"
                            r"timestamp|ts|at|session|sessions|connection|connections|login|last)($|_)")
ALLOWED_TYPES = {"sqlite": {"TEXT", "INTEGER", "REAL", "BLOB"},
                 "postgresql": {"text", "integer", "bigint", "smallint", "double precision", "bytea", "date",
                                "boolean"}}


def test_schema_can_hold_no_address_port_or_fine_time(reg):
    columns = reg.schema_columns()
    tables = {t for t, _, _ in columns}
    assert tables == {"meta", "plans", "accounts", "devices"}, tables     # no connection or session table
    for table, column, kind in columns:
        assert not FORBIDDEN_NAME.search(column), (table, column)
        assert kind in ALLOWED_TYPES[reg.engine], (table, column, kind)    # no inet, cidr, timestamp, time
    # the only date is a day, and the check on it is the engine's
    assert [(t, c) for t, c, k in columns if "day" in c] == [("accounts", "created_day")]
    with pytest.raises(Exception):
        reg.add_account("alice", "free", "2026-12-03T10:11:12")


def test_forbidden_name_check_can_fail():
    assert FORBIDDEN_NAME.search("last_seen") and FORBIDDEN_NAME.search("endpoint")
    assert FORBIDDEN_NAME.search("client_ip") and not FORBIDDEN_NAME.search("created_day")


# -- SQLite on disk ------------------------------------------------------------------------------------

def test_sqlite_file_mode_wal_and_secure_delete(workdir):
    old = os.umask(0o022)
    try:
        r = open_registry(f"sqlite://{workdir}/a.db")
    finally:
        os.umask(old)
    try:
        r.add_account("alice", "free", DAY)
        for f in r.files():
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
        with r._tx() as cur:
            cur.execute("PRAGMA journal_mode")
            assert cur.fetchone()[0] == "wal"
            cur.execute("PRAGMA secure_delete")
            assert cur.fetchone()[0] == 1
    finally:
        r.close()


def test_sqlite_deleted_account_leaves_no_bytes(workdir):
    r = open_registry(f"sqlite://{workdir}/a.db")
    try:
        secret_id, key = "zq-gone-account-7", bytes(range(200, 232))
        r.add_account(secret_id, "plus", DAY)
        r.add_device(secret_id, key, "gone-phone-name")
        r.add_account("stays", "free", DAY)
        assert secret_id in r.snapshot().accounts
        r.remove_account(secret_id)
        files = r.files()
        blob = b"".join(Path(f).read_bytes() for f in files)
        for needle in (secret_id.encode(), key, b"gone-phone-name"):
            assert needle not in blob, (needle, files)
        assert b"stays" in blob
    finally:
        r.close()


def test_sqlite_bad_files_are_one_line(workdir):
    junk = workdir / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(UserError, match="is not a vpnd registry or is damaged") as info:
        open_registry(f"sqlite://{junk}")
    one_line(info.value)
    (workdir / "d.db").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        open_registry(f"sqlite://{workdir}/d.db")
    with pytest.raises(UserError, match="does not exist; create it"):
        open_registry(f"sqlite://{workdir}/missing/a.db")
    other = workdir / "other.db"
    import sqlite3
    sqlite3.connect(other).execute("CREATE TABLE meta (name TEXT, value INTEGER)").connection.commit()
    with pytest.raises(UserError, match="no schema version"):
        open_registry(f"sqlite://{other}")


def test_locations():
    assert parse_location("sqlite:///var/lib/vpnd/a.db").target == "/var/lib/vpnd/a.db"
    assert parse_location("sqlite:a.db", "/etc/vpnd").target == "/etc/vpnd/a.db"
    assert parse_location("accounts.json", "/etc/vpnd").engine == "json"
    assert parse_location("/x/accounts.db").engine == "sqlite"
    assert parse_location("postgresql://vpnd@db/vpnd?passfile=/etc/vpnd/pgpass").engine == "postgresql"
    for bad, text in (("postgresql://u:secret@db/vpnd", "holds a password"),
                      ("postgresql://db/vpnd?password=x", "holds a password"),
                      ("postgresql://db", "names no database"),
                      ("mysql://db/x", "unknown registry engine"),
                      ("sqlite://relative.db", "sqlite:///ABSOLUTE"),
                      ("", "is empty")):
        with pytest.raises(UserError, match=re.escape(text)) as info:
            parse_location(bad)
        assert "secret" not in str(info.value)


# -- migration -----------------------------------------------------------------------------------------

def _v1_view():
    from vpnd.registry.jsonfile import load
    return {a.id: (a.plan, a.status, sorted(a.devices)) for a in load(str(V1)).values()}


def test_migrate_by_hand_into_each_engine(reg):
    assert migrate_json(str(V1), reg) == 3
    got = {a.id: (a.plan, a.status, sorted(a.devices)) for a in reg.snapshot().accounts.values()}
    assert got == _v1_view() and got["carol.x_y-1"][1] == "suspended" and len(got["bob"][2]) == 3
    with pytest.raises(UserError, match="already holds accounts"):
        migrate_json(str(V1), reg)


def test_migrate_beside_once(workdir):
    path = workdir / "accounts.json"
    shutil.copy(V1, path)
    loc = migrate_beside(str(path))
    assert loc.target == str(workdir / "accounts.db")
    assert not path.exists() and (workdir / "accounts.json.migrated").exists()
    r = open_registry(loc)
    try:
        assert {a.id: (a.plan, a.status, sorted(a.devices)) for a in r.snapshot().accounts.values()} == _v1_view()
        r.add_account("new", "free", utc_day())
    finally:
        r.close()
    # a second start: the .db is used as it is (the change above stays)
    loc2 = open_registry(parse_location(str(path)))
    try:
        assert "new" in loc2.snapshot().accounts
    finally:
        loc2.close()


def test_migrate_refuses_a_damaged_json_and_leaves_it(workdir):
    path = workdir / "accounts.json"
    path.write_text('{"version": 1, "accounts": {"a": {"plan": ')
    with pytest.raises(UserError, match="is damaged"):
        migrate_beside(str(path))
    assert path.exists() and not (workdir / "accounts.db").exists()


# -- PostgreSQL: bad locations and credentials ---------------------------------------------------------

def test_postgresql_bad_credentials_missing_database_and_no_tables(postgres):
    from vpnd.registry import RegistryUnavailable
    pg = postgres
    name = f"empty_{os.getpid()}"
    pg.create_database(name)
    with pytest.raises(RegistryUnavailable, match="password authentication failed"):
        open_registry(pg.passfile_url("vpnd_admin", "wrong-password", name))
    with pytest.raises(RegistryUnavailable, match="does not exist"):
        open_registry(pg.passfile_url("vpnd_admin", pg.password, "no_such_db"))
    with pytest.raises(UserError, match="holds no vpnd registry; create it with 'vpnd registry init") as info:
        open_registry(pg.passfile_url("vpnd_admin", pg.password, name))     # servers never create tables
    one_line(info.value)
    pg.execute("CREATE TABLE meta (name text, value bigint)", dbname=name)
    with pytest.raises(UserError, match="no schema version"):
        open_registry(pg.passfile_url("vpnd_admin", pg.password, name))


def test_vpnd_serve_with_an_unreachable_registry_is_one_line(workdir):
    from vpncore.keys import genkey
    cfg = workdir / "vpnd.toml"
    cfg.write_text(f'[server]\nprivate_key = "{genkey()}"\naddress_pool4 = "198.19.0.0/24"\n'
                   f'interface = "vpnt-reg0"\ncontrol_socket = "{workdir}/s.sock"\n'
                   f'accounts = "postgresql://vpnd@/vpnd?host={workdir}/nowhere&passfile={workdir}/pgpass"\n')
    import subprocess
    import sys
    r = subprocess.run([str(Path(sys.executable).parent / "vpnd"), "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    lines = [x for x in r.stderr.splitlines() if "warning" not in x]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("vpnd: error: cannot reach the accounts registry (") and \
        "check that the database runs" in lines[0], r.stderr
    assert not (workdir / "s.sock").exists()


def test_sqlite_file_made_by_root_belongs_to_its_directory_owner(workdir):
    """`vpnd account add` as root in the service's StateDirectory (owned by user vpnd): the new
    registry is the service user's, so the server running as that user can open it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a file for another user")
    state = workdir / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    r = open_registry(f"sqlite://{state}/accounts.db")
    try:
        r.add_account("alice", "free", DAY)
        for f in r.files():
            st = os.stat(f)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600), f
    finally:
        r.close()
