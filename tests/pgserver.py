"""A throwaway PostgreSQL server for the tests: its own data dir in /tmp, unix socket only.

    with PostgresServer() as pg:
        pg.create_database("vpnd")
        url = pg.admin_url("vpnd")        # postgresql://vpnd_admin:PW@/vpnd?host=%2Ftmp%2F...&port=5432

The server runs as a non-root OS user (PostgreSQL refuses root): `postgres` when the Debian package
made it, else a system user `vpnd-pgtest` created here. It listens on no TCP address at all; the
socket directory is world-searchable so processes of any user and in any network namespace (unix
sockets live on the filesystem) can connect. Durability is off (fsync, synchronous_commit,
full_page_writes): a crash may lose the database, which is fine for tests.

It only ever stops the server it started, through `pg_ctl stop` on its own data dir; the last
resort, when pg_ctl cannot stop it, is a signal to the postmaster whose pid is in that data dir's
postmaster.pid and whose command line names that data dir.
"""
from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse

INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                "run `apt-get install postgresql` (or `make deps-system`)")

ADMIN_USER = "vpnd_admin"
FALLBACK_OS_USER = "vpnd-pgtest"
PORT = 5432  # only names the socket file (.s.PGSQL.5432) in our own directory: no TCP
STEP_TIMEOUT = 60  # seconds, for each initdb / pg_ctl call
PG_CTL_WAIT = 30  # seconds pg_ctl -w waits for start or stop


def find_bindir() -> str:
    """The directory holding initdb and pg_ctl, or RuntimeError(INSTALL_HINT)."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(out)
        except (OSError, subprocess.SubprocessError):
            pass

    def version(path: str) -> tuple:
        name = os.path.basename(os.path.dirname(path))
        return tuple(int(x) for x in re.findall(r"\d+", name)) or (0,)

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for d in candidates:
        if d and all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl")):
            return d
    raise RuntimeError(INSTALL_HINT)


def _os_user() -> pwd.struct_passwd | None:
    """The user to run the server as, or None to run as ourselves (we are not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", FALLBACK_OS_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    FALLBACK_OS_USER], check=True, capture_output=True, timeout=30)
    return pwd.getpwnam(FALLBACK_OS_USER)


class PostgresServer:
    """One PostgreSQL cluster in a fresh temp dir. Nothing happens until start() (or `with`)."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.password = secrets.token_urlsafe(24)
        self.socket_dir: str | None = None  # the temp dir: socket, log, and data/ inside
        self.data_dir: str | None = None
        self.log_path: str | None = None
        self._user: pwd.struct_passwd | None = None
        self._running = False
        self._closed = False
        self._cleanup_registered = False

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> "PostgresServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the server: the first call creates the cluster; later calls restart it on the
        same data dir (after stop()). Waits until it accepts connections. No-op if running."""
        if self._closed:
            raise RuntimeError("PostgresServer is closed")
        if self._running:
            return
        try:
            if self.data_dir is None:
                self._init_cluster()
            self._pg_ctl("start", "-w", "-t", str(PG_CTL_WAIT), "-l", self.log_path)
            self._running = True
        except BaseException:
            self.close()
            raise

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (pg_ctl stop -m MODE: smart, fast or immediate); the data dir stays."""
        if self.data_dir is None or not self._running:
            return
        pid = self.postmaster_pid()
        self._pg_ctl("stop", "-w", "-t", str(PG_CTL_WAIT), "-m", mode)
        self._running = False
        _wait_gone(pid)

    def close(self) -> None:
        """Stop the server (fast, then immediate, then a signal to our own postmaster) and remove
        the temp dir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        pid = self.postmaster_pid()
        if pid is not None:
            for mode in ("fast", "immediate"):
                try:
                    self._pg_ctl("stop", "-w", "-t", str(PG_CTL_WAIT), "-m", mode)
                    break
                except (RuntimeError, subprocess.SubprocessError, OSError):
                    continue
            else:
                self._signal_own_postmaster()
            _wait_gone(pid)
        self._running = False
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._running

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid (first line of data/postmaster.pid), or None."""
        try:
            with open(os.path.join(self.data_dir or "", "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    # -- connections ------------------------------------------------------------------------

    def url(self, user: str, password: str, dbname: str = "postgres") -> str:
        """A libpq URL for USER over our unix socket (host= percent-encoded as a query parameter)."""
        if self.socket_dir is None:
            raise RuntimeError("PostgresServer not started")
        q = urllib.parse.quote
        return (f"postgresql://{q(user, safe='')}:{q(password, safe='')}@/{q(dbname, safe='')}"
                f"?host={q(self.socket_dir, safe='')}&port={PORT}")

    def passfile_url(self, user: str, password: str, dbname: str) -> str:
        """A libpq URL with no password in it: the password is in a password file (mode 0600,
        ?passfile=), the way vpnd's config must name its credentials."""
        if self.socket_dir is None:
            raise RuntimeError("PostgresServer not started")
        path = os.path.join(self.socket_dir, f"pgpass-{user}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"*:*:*:{user}:{password}\n")
        q = urllib.parse.quote
        return (f"postgresql://{q(user, safe='')}@/{q(dbname, safe='')}?host={q(self.socket_dir, safe='')}"
                f"&port={PORT}&passfile={q(path, safe='')}")

    def admin_url(self, dbname: str = "postgres") -> str:
        return self.url(ADMIN_USER, self.password, dbname)

    def connect(self, dbname: str = "postgres", **kwargs):
        """A psycopg connection as the superuser (autocommit unless told otherwise)."""
        import psycopg
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.admin_url(dbname), **kwargs)

    def execute(self, sql, params=None, dbname: str = "postgres"):
        """Run one statement as the superuser, autocommit. Returns the rows (list of tuples) if
        the statement returns rows, else None. SQL may be a str or a psycopg.sql.Composable."""
        with self.connect(dbname) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else None

    def create_database(self, name: str, owner: str | None = None) -> None:
        from psycopg import sql
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner is not None:
            stmt += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        self.execute(stmt)

    def create_role(self, name: str, password: str, read_only: bool = False,
                    database: str | None = None) -> None:
        """A LOGIN role, no superuser/createdb/createrole. A read-only one gets nothing but CONNECT
        (on DATABASE if given; every database grants CONNECT to PUBLIC anyway): the caller GRANTs
        SELECT. A read-write one, when DATABASE is given, may also create tables in its schema
        public (PostgreSQL 15 no longer lets every role do that)."""
        from psycopg import sql
        role = sql.Identifier(name)
        self.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}")
                     .format(role, sql.Literal(password)))
        if database is not None:
            db = sql.Identifier(database)
            self.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, role))
            if not read_only:
                self.execute(sql.SQL("GRANT CREATE, TEMPORARY ON DATABASE {} TO {}").format(db, role))
                self.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(role),
                             dbname=database)

    def log_text(self) -> str:
        """The server log so far ('' if none yet)."""
        try:
            with open(self.log_path or "", encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # -- internals --------------------------------------------------------------------------

    def _init_cluster(self) -> None:
        self._user = _os_user()
        self.socket_dir = tempfile.mkdtemp(prefix="vpnd-pg-", dir="/tmp")
        if not self._cleanup_registered:
            atexit.register(self.close)
            self._cleanup_registered = True
        os.chmod(self.socket_dir, 0o755)
        if self._user is not None:
            os.chown(self.socket_dir, self._user.pw_uid, self._user.pw_gid)
        self.data_dir = os.path.join(self.socket_dir, "data")
        self.log_path = os.path.join(self.socket_dir, "postgres.log")
        pwfile = os.path.join(self.socket_dir, "pwfile")
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        if self._user is not None:
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        try:
            self._run([os.path.join(self.bindir, "initdb"), "-D", self.data_dir,
                       "-U", ADMIN_USER, "--pwfile", pwfile, "-A", "scram-sha-256",
                       "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
        finally:
            os.unlink(pwfile)
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": self.socket_dir,
            "unix_socket_permissions": "0777",
            "port": str(PORT),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",  # pg_ctl -l: stderr goes to socket_dir/postgres.log
            "log_destination": "stderr",
            "log_connections": "off",
            "log_disconnections": "off",
            "log_hostname": "off",
            "shared_buffers": "32MB",
        }
        conf = os.path.join(self.data_dir, "postgresql.conf")
        with open(conf, "a") as f:
            f.write("\n# tests/pgserver.py\n")
            for k, v in settings.items():
                f.write(f"{k} = '{v}'\n")

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=self.socket_dir or "/tmp")
        return env

    def _run(self, argv: list[str]) -> str:
        kw = {}
        if self._user is not None:
            kw = dict(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        try:
            p = subprocess.run(argv, cwd=self.socket_dir, env=self._env(), stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=STEP_TIMEOUT, **kw)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{os.path.basename(argv[0])} timed out after {STEP_TIMEOUT}s"
                               f"\n{self.log_text()[-2000:]}") from e
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(os.path.basename(a) for a in argv[:2])} failed "
                               f"(exit {p.returncode}): {(p.stdout + p.stderr).strip()[-2000:]}"
                               f"\n--- server log ---\n{self.log_text()[-2000:]}")
        return p.stdout

    def _pg_ctl(self, action: str, *args: str) -> str:
        return self._run([os.path.join(self.bindir, "pg_ctl"), action, "-D", self.data_dir, *args])

    def _signal_own_postmaster(self) -> None:
        """Last resort: SIGQUIT then SIGKILL to the postmaster named by our postmaster.pid, only
        if its command line names our data dir (so never a process we did not start)."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            return
        if os.fsencode(self.data_dir) not in cmdline:
            return
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            if _wait_gone(pid):
                return


def process_gone(pid: int) -> bool:
    """True if PID no longer runs (absent, or a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int | None, timeout: float = 5.0) -> bool:
    """Wait (bounded) until the postmaster PID has exited: pg_ctl stop -w returns once it removed
    postmaster.pid, a moment before the process itself is gone."""
    if pid is None:
        return True
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
