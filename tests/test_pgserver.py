"""The throwaway PostgreSQL server of tests/pgserver.py, against a real server."""
import os
import shutil
import subprocess
import sys

import psycopg
import pytest

from tests.pgserver import ADMIN_USER, PostgresServer, process_gone


def test_admin_connects_over_unix_socket(postgres):
    with psycopg.connect(postgres.admin_url(), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (ADMIN_USER,)
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (True,)
        assert conn.info.host == postgres.socket_dir
    assert oct(os.stat(postgres.socket_dir).st_mode & 0o777) in ("0o755", "0o711")


def test_row_survives_stop_and_start(postgres):
    postgres.create_database("survive")
    postgres.execute("CREATE TABLE t (id int PRIMARY KEY, name text)", dbname="survive")
    postgres.execute("INSERT INTO t VALUES (%s, %s)", (1, "alice"), dbname="survive")
    old_pid = postgres.postmaster_pid()
    try:
        postgres.stop()
        assert postgres.postmaster_pid() is None and process_gone(old_pid)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(postgres.admin_url("survive"), connect_timeout=5)
    finally:
        postgres.start()
    assert postgres.postmaster_pid() not in (None, old_pid)
    assert postgres.execute("SELECT id, name FROM t", dbname="survive") == [(1, "alice")]


def test_read_only_role_selects_but_cannot_insert(postgres):
    postgres.create_database("ro")
    postgres.execute("CREATE TABLE accounts (id int)", dbname="ro")
    postgres.execute("INSERT INTO accounts VALUES (7)", dbname="ro")
    postgres.create_role("reader", "reader-pw", read_only=True)
    postgres.execute("GRANT SELECT ON accounts TO reader", dbname="ro")
    url = postgres.url("reader", "reader-pw", "ro")
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT id FROM accounts").fetchall() == [(7,)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO accounts VALUES (8)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE mine (x int)")
    assert postgres.execute("SELECT count(*) FROM accounts", dbname="ro") == [(1,)]


def test_read_write_role_creates_tables_in_its_database(postgres):
    postgres.create_database("rw")
    postgres.create_role("writer", "writer-pw", database="rw")
    with psycopg.connect(postgres.url("writer", "writer-pw", "rw"), autocommit=True, connect_timeout=10) as conn:
        conn.execute("CREATE TABLE mine (x int)")
        conn.execute("INSERT INTO mine VALUES (1)")
        assert conn.execute("SELECT x FROM mine").fetchall() == [(1,)]
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)


def test_wrong_password_fails(postgres):
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres.url(ADMIN_USER, "not-the-password"), connect_timeout=10)


def test_no_tcp_listener(postgres):
    assert postgres.execute("SHOW listen_addresses") == [("",)]
    pid = postgres.postmaster_pid()
    assert pid is not None
    if shutil.which("ss") and os.geteuid() == 0:  # -p shows other users' processes only to root
        out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=10, check=True).stdout
        assert f"pid={pid}," not in out, out


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_reachable_from_another_network_namespace(postgres):
    code = ("import sys, psycopg; c = psycopg.connect(sys.argv[1], connect_timeout=10); "
            "print(c.execute('SELECT 42').fetchone()[0])")
    p = subprocess.run(["unshare", "--net", sys.executable, "-c", code, postgres.admin_url()],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "42"


def test_log_is_written(postgres):
    assert "database system is ready to accept connections" in postgres.log_text()


def test_context_manager_cleans_up():
    with PostgresServer() as pg:
        assert pg.execute("SELECT 1") == [(1,)]
        pid, tmp = pg.postmaster_pid(), pg.socket_dir
        assert pid is not None and os.path.isdir(tmp)
    assert not os.path.exists(tmp)
    assert process_gone(pid)
    pg.close()  # idempotent
    with pytest.raises(RuntimeError):
        pg.start()
