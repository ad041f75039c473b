"""The accounts registry, plans and the live policy (issue 5), without root.

- `vpnd.accounts`: parse/dump, damaged files, `change()` and its errors, mode 0600, atomic writes
  (a failure in the middle leaves the old file and no temp file), the lock between writers;
- `vpnd.policy`: device limits at admission, release, what a registry change ends, the token
  bucket over a simulated clock;
- the real `vpnd account ...` / `vpnd device ...` console scripts as subprocesses against a
  registry in a temporary directory, with no server running (the config names a control socket
  inside that directory, so the CLI never reaches another vpnd on this machine).

Every file lives in a directory created and removed by the `workdir` fixture.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from vpncore import atomicfile
from vpncore.keys import genkey
from vpncore.cli import UserError
from vpncore.configfile import encode_key, parse_key
from vpnd import accounts as reg
from vpnd.policy import DEFAULT_PLANS, AccountState, Plan, Policy, TokenBucket
from vpnd.stats import utc_day

BIN = Path(sys.executable).parent
VPND = str(BIN / "vpnd")
TIMEOUT = 30


def _key() -> str:
    """A device public key in the registry's text form (any 32 bytes do for the registry)."""
    return encode_key(os.urandom(32))


K1, K2, K3 = _key(), _key(), _key()


@pytest.fixture
def workdir():
    d = Path(tempfile.mkdtemp(prefix="vpnd-acct-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def path(workdir) -> str:
    return str(workdir / "accounts.json")


def _temps(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(".accounts-"))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


# -- parse and dump ------------------------------------------------------------------------------

def test_parse_dump_round_trip():
    accounts = {
        "bob": reg.Account("bob", "plus", "suspended", [parse_key(K2, "k"), parse_key(K3, "k")], "2026-01-02"),
        "alice": reg.Account("alice", "free", "active", [parse_key(K1, "k")], "2026-01-01"),
        "carol.x_y-1": reg.Account("carol.x_y-1", "free", "active", [], "2026-01-03"),
    }
    text = reg.dump(accounts)
    assert text.endswith("\n")
    again = reg.parse(text, "mem")
    assert again == accounts
    assert reg.dump(again) == text                       # stable: same accounts, same bytes
    doc = json.loads(text)
    assert doc["version"] == 1
    assert list(doc["accounts"]) == ["alice", "bob", "carol.x_y-1"]
    assert doc["accounts"]["bob"] == {"plan": "plus", "status": "suspended", "devices": [K2, K3],
                                      "created": "2026-01-02"}
    # Only what the issue allows: id, plan, status, devices, creation day.
    assert set(doc["accounts"]["alice"]) == {"plan", "status", "devices", "created"}


def test_parse_defaults_and_empty():
    assert reg.parse('{"version": 1, "accounts": {}}', "p") == {}
    a = reg.parse('{"version": 1, "accounts": {"x": {"plan": "free"}}}', "p")["x"]
    assert (a.status, a.devices, a.created) == ("active", [], "")


DAMAGED = [
    ("not-json", '{"version": 1, "accounts": {', "not JSON"),
    ("empty", "", "not JSON"),
    ("half-written", reg.dump({"a": reg.Account("a", "free", "active", [], "d")})[:30], "not JSON"),
    ("list", "[]", "unknown layout"),
    ("version", '{"version": 2, "accounts": {}}', "unknown layout"),
    ("accounts-list", '{"version": 1, "accounts": []}', "unknown layout"),
    ("bad-id", '{"version": 1, "accounts": {"a b": {"plan": "free"}}}', "bad account entry"),
    ("entry-not-dict", '{"version": 1, "accounts": {"a": 3}}', "bad account entry"),
    ("devices-not-list", '{"version": 1, "accounts": {"a": {"plan": "free", "devices": "x"}}}', "bad device list"),
    ("bad-key", '{"version": 1, "accounts": {"a": {"plan": "free", "devices": ["abc"]}}}', "bad device key"),
    ("shared-key", json.dumps({"version": 1, "accounts": {"a": {"plan": "free", "devices": [K1]},
                                                           "b": {"plan": "free", "devices": [K1]}}}),
     "a device key belongs to two accounts"),
    ("bad-status", '{"version": 1, "accounts": {"a": {"plan": "free", "status": "gone"}}}', "bad plan or status"),
    ("no-plan", '{"version": 1, "accounts": {"a": {}}}', "bad plan or status"),
]


@pytest.mark.parametrize("name,text,what", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_registry_is_one_clear_error(path, name, text, what):
    Path(path).write_text(text)
    with pytest.raises(UserError) as info:
        reg.load(path)
    msg = _one_line(info.value)
    assert f"accounts registry {path!r} is damaged ({what})" in msg
    assert "restore it from a backup" in msg
    assert info.value.status == 1


def test_damaged_registry_not_utf8_and_directory(path, workdir):
    Path(path).write_bytes(b'{"version": 1, "accounts": {"\xff": 1}}')
    with pytest.raises(UserError, match=r"is damaged \(not UTF-8\)") as info:
        reg.load(path)
    _one_line(info.value)
    d = workdir / "dir.json"
    d.mkdir()
    with pytest.raises(UserError, match="is a directory; name a file") as info:
        reg.load(str(d))
    _one_line(info.value)


def test_missing_registry_is_empty(path):
    assert reg.load(path) == {}


def test_change_refuses_damaged_registry_and_leaves_it(path):
    Path(path).write_text("{broken")
    with pytest.raises(UserError, match="is damaged"):
        reg.change(path, "add", "alice", plan="free")
    assert Path(path).read_text() == "{broken"


# -- change() --------------------------------------------------------------------------------------

PLANS = ("free", "plus")


def test_change_lifecycle(path):
    acct = reg.change(path, "add", "alice", plan="free", plans=PLANS)
    assert (acct.id, acct.plan, acct.status, acct.devices, acct.created) == ("alice", "free", "active", [], utc_day())
    reg.change(path, "add", "bob", plan="plus", plans=PLANS)
    assert sorted(reg.load(path)) == ["alice", "bob"]

    reg.change(path, "device-add", "alice", key=K1)
    reg.change(path, "device-add", "alice", key=" " + K2 + "\n")       # pasted with whitespace
    assert reg.load(path)["alice"].devices == [parse_key(K1, "k"), parse_key(K2, "k")]

    reg.change(path, "suspend", "alice")
    assert reg.load(path)["alice"].status == "suspended"
    reg.change(path, "suspend", "alice")                                 # idempotent
    assert reg.load(path)["alice"].status == "suspended"
    reg.change(path, "resume", "alice")
    assert reg.load(path)["alice"].status == "active"

    reg.change(path, "set-plan", "alice", plan="plus", plans=PLANS)
    assert reg.load(path)["alice"].plan == "plus"

    reg.change(path, "device-remove", "alice", key=K1)
    assert reg.load(path)["alice"].devices == [parse_key(K2, "k")]

    removed = reg.change(path, "remove", "alice")
    assert removed.id == "alice"
    assert list(reg.load(path)) == ["bob"]
    # A removed account's device key is free again.
    reg.change(path, "device-add", "bob", key=K2)
    assert reg.load(path)["bob"].devices == [parse_key(K2, "k")]
    # The file is exactly the canonical dump of what load() returns.
    assert Path(path).read_text() == reg.dump(reg.load(path))


@pytest.mark.parametrize("op,kw", [("suspend", {}), ("resume", {}), ("remove", {}),
                                   ("set-plan", {"plan": "plus"}), ("device-add", {"key": K1}),
                                   ("device-remove", {"key": K1})])
def test_change_unknown_account(path, op, kw):
    reg.change(path, "add", "alice", plan="free")
    before = Path(path).read_text()
    with pytest.raises(UserError) as info:
        reg.change(path, op, "nobody", plans=PLANS, **kw)
    assert _one_line(info.value) == "no account 'nobody'; see 'vpnd account list'"
    assert info.value.status == 1
    assert Path(path).read_text() == before


def test_change_errors(path, workdir):
    reg.change(path, "add", "alice", plan="free", plans=PLANS)
    reg.change(path, "add", "bob", plan="free", plans=PLANS)
    reg.change(path, "device-add", "alice", key=K1)
    before = Path(path).read_text()

    cases = [
        (("add", "alice"), {"plan": "free"}, r"^account 'alice' already exists$"),
        (("add", "carol"), {"plan": "gold", "plans": PLANS},
         r"^unknown plan 'gold'; configured plans: free, plus$"),
        (("set-plan", "alice"), {"plan": "gold", "plans": PLANS}, r"^unknown plan 'gold'"),
        (("device-add", "bob"), {"key": K1},
         r"^that device key is already registered \(account 'alice'\); each device belongs to one account$"),
        (("device-add", "alice"), {"key": K1}, r"already registered \(account 'alice'\)"),
        (("device-add", "alice"), {"key": "not base64!"}, r"^the device public key is not valid base64"),
        (("device-add", "alice"), {"key": encode_key(b"x" * 31)},
         r"^the device public key decodes to 31 bytes, not 32"),
        (("device-remove", "bob"), {"key": K1}, r"^account 'bob' has no such device$"),
        (("add", "bad id"), {"plan": "free"}, r"^account id 'bad id' is not valid"),
        (("add", "-dash"), {"plan": "free"}, r"is not valid; use 1-64 letters"),
        (("add", "x" * 65), {"plan": "free"}, r"is not valid"),
    ]
    for (op, aid), kw, pattern in cases:
        with pytest.raises(UserError, match=pattern) as info:
            reg.change(path, op, aid, **kw)
        _one_line(info.value)
        assert Path(path).read_text() == before, (op, aid)     # an error changes nothing
    assert _temps(workdir) == []


def test_change_in_missing_directory(workdir):
    with pytest.raises(UserError, match="does not exist; create it") as info:
        reg.change(str(workdir / "nope" / "accounts.json"), "add", "alice", plan="free")
    _one_line(info.value)


# -- mode and atomic writes ----------------------------------------------------------------------

def test_registry_mode_0600_whatever_the_umask(path):
    old = os.umask(0)
    try:
        reg.change(path, "add", "alice", plan="free")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        reg.change(path, "device-add", "alice", key=K1)        # a rewrite keeps it
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)
    # An operator's looser mode is not kept either: every write makes a new 0600 file.
    os.chmod(path, 0o644)
    reg.change(path, "suspend", "alice")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
def test_failed_write_leaves_old_content_and_no_temp_file(path, workdir, monkeypatch, where):
    reg.change(path, "add", "alice", plan="free")
    reg.change(path, "device-add", "alice", key=K1)
    before = Path(path).read_bytes()
    inode = os.stat(path).st_ino

    def boom(*a, **kw):
        raise OSError(errno.EIO, "simulated I/O error")

    if where == "replace":
        monkeypatch.setattr(reg.os, "replace", boom)
    elif where == "fsync":
        monkeypatch.setattr(reg.os, "fsync", boom)
    else:   # the write itself: half the bytes reach the temp file, then the disk is full
        real_write = os.write

        def half_write(fd, data):
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "simulated disk full")

        monkeypatch.setattr(atomicfile.os, "write", half_write)

    with pytest.raises(OSError) as info:
        reg.change(path, "device-add", "alice", key=K2)
    assert not isinstance(info.value, UserError)
    monkeypatch.undo()
    assert Path(path).read_bytes() == before
    assert os.stat(path).st_ino == inode
    assert _temps(workdir) == [], "the temp file of the failed write was left behind"
    assert reg.load(path)["alice"].devices == [parse_key(K1, "k")]
    # and the next write works normally
    reg.change(path, "device-add", "alice", key=K2)
    assert len(reg.load(path)["alice"].devices) == 2


def test_unwritable_registry_is_a_user_error(path, monkeypatch):
    reg.change(path, "add", "alice", plan="free")

    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(reg.os, "replace", denied)
    with pytest.raises(UserError, match=r"cannot write the accounts registry .*\(Permission denied\)") as info:
        reg.change(path, "suspend", "alice")
    _one_line(info.value)


def test_writers_exclude_each_other(path):
    """A second writer waits for the lock: no lost update between two read-modify-writes."""
    reg.change(path, "add", "alice", plan="free")
    done = threading.Event()
    errors = []

    def writer():
        try:
            reg.change(path, "device-add", "alice", key=K2)
        except BaseException as exc:   # reported below
            errors.append(exc)
        done.set()

    with reg.locked(path) as accounts:
        t = threading.Thread(target=writer)
        t.start()
        assert not done.wait(0.5), "a second writer got in while the lock was held"
        accounts["alice"].devices.append(parse_key(K1, "k"))
        reg.write_atomic(path, reg.dump(accounts))
    t.join(10)
    assert done.is_set() and not errors, errors
    # Both changes are there: the waiting writer read the registry after the first one wrote it.
    assert reg.load(path)["alice"].devices == [parse_key(K1, "k"), parse_key(K2, "k")]


# -- Policy ------------------------------------------------------------------------------------------

def _cfg(path, plans=None, clients=()):
    return SimpleNamespace(accounts=path, plans=dict(plans or DEFAULT_PLANS),
                           clients=[SimpleNamespace(public_key=k, psk=None) for k in clients])


class FakePeer:
    def __init__(self, key: str):
        self.public_key = parse_key(key, "k")


def test_policy_device_limit_and_release(path):
    reg.change(path, "add", "alice", plan="free")
    for k in (K1, K2):
        reg.change(path, "device-add", "alice", key=k)
    pol = Policy(_cfg(path))
    pol.load()
    p1, p2 = FakePeer(K1), FakePeer(K2)

    state, why = pol.admit(p1)
    assert why is None and isinstance(state, AccountState)
    assert state.id == "alice" and state.plan is DEFAULT_PLANS["free"] and state.sessions == {p1}
    assert state.up is None and state.down is None             # free: no bandwidth cap by default

    refused, why = pol.admit(p2)
    assert refused is None
    assert why == "device limit reached: plan 'free' allows 1 device at a time"
    assert state.sessions == {p1}                              # the first stays

    pol.release(state, p1, [])
    assert state.sessions == set()
    again, why = pol.admit(p2)
    assert why is None and again is state and state.sessions == {p2}
    pol.release(None, p2, [])                                  # a session without account: no-op
    assert state.sessions == {p2}


def test_policy_plus_limit_and_refusals(path):
    keys = [_key() for _ in range(6)]
    reg.change(path, "add", "bob", plan="plus")
    for k in keys:
        reg.change(path, "device-add", "bob", key=k)
    reg.change(path, "add", "carol", plan="gold")               # no plans given: not checked here
    reg.change(path, "device-add", "carol", key=K1)
    reg.change(path, "add", "dave", plan="free")
    reg.change(path, "device-add", "dave", key=K2)
    reg.change(path, "suspend", "dave")
    static = parse_key(K3, "k")
    pol = Policy(_cfg(path, clients=[static]))
    pol.load()
    peers = [FakePeer(k) for k in keys]
    for p in peers[:5]:
        assert pol.admit(p)[1] is None
    assert pol.admit(peers[5]) == (None, "device limit reached: plan 'plus' allows 5 devices at a time")
    assert pol.admit(FakePeer(K1)) == (None, "account has an unknown plan; contact the operator")
    assert pol.admit(FakePeer(K2)) == (None, "account suspended")
    assert pol.admit(FakePeer(K3)) == (None, None)              # a [[client]] entry: no account, no limits
    assert pol.admit(FakePeer(_key())) == (None, "this device is not registered on this server")
    # Who may handshake at all: active accounts with a known plan, and the static clients.
    assert set(pol.authorized()) == {parse_key(k, "k") for k in keys} | {static}


def test_policy_to_end_after_registry_changes(path):
    reg.change(path, "add", "alice", plan="plus")
    reg.change(path, "add", "bob", plan="plus")
    for k in (K1, K2):
        reg.change(path, "device-add", "alice", key=k)
    reg.change(path, "device-add", "bob", key=K3)
    pol = Policy(_cfg(path))
    pol.load()
    a1, a2, b = FakePeer(K1), FakePeer(K2), FakePeer(K3)
    for p in (a1, a2, b):
        assert pol.admit(p)[1] is None
    assert pol.to_end() == [] and not pol.changed()

    reg.change(path, "device-remove", "alice", key=K2)
    assert pol.changed()
    pol.load()
    assert not pol.changed()
    assert pol.to_end() == [(a2, "device removed from the account")]
    pol.release(pol.live["alice"], a2, [])

    reg.change(path, "suspend", "alice")
    pol.load()
    assert pol.to_end() == [(a1, "account suspended")]
    assert parse_key(K1, "k") not in pol.authorized()

    reg.change(path, "remove", "bob")
    pol.load()
    assert sorted(pol.to_end(), key=lambda x: x[1]) == [(b, "account removed"), (a1, "account suspended")]
    assert parse_key(K3, "k") not in pol.authorized()


def test_policy_plan_change_applies_to_live_state(path):
    plans = dict(DEFAULT_PLANS, capped=Plan("capped", devices=1, bandwidth_mbit=20.0))
    reg.change(path, "add", "alice", plan="plus")
    reg.change(path, "device-add", "alice", key=K1)
    pol = Policy(_cfg(path, plans))
    pol.load()
    state, _ = pol.admit(FakePeer(K1))
    assert state.up is None
    reg.change(path, "set-plan", "alice", plan="capped")
    pol.load()
    assert pol.to_end() == []
    assert state.plan.name == "capped"
    assert state.up.rate == state.down.rate == 20e6 / 8
    reg.change(path, "set-plan", "alice", plan="plus")
    pol.load()
    pol.to_end()
    assert state.up is None and state.down is None


def test_policy_take_bytes_per_account(path):
    reg.change(path, "add", "alice", plan="free")
    reg.change(path, "device-add", "alice", key=K1)
    pol = Policy(_cfg(path))
    pol.load()
    state, _ = pol.admit(FakePeer(K1))
    assert pol.take_bytes() == {}
    state.bytes_in, state.bytes_out = 1000, 2500
    assert pol.take_bytes() == {"alice": (1000, 2500)}
    assert pol.take_bytes() == {}


def test_live_state_is_memory_only(path):
    import pickle
    st = AccountState("alice", DEFAULT_PLANS["free"], 3)
    assert repr(st) == "AccountState(slot=3)" and "alice" not in repr(st)
    with pytest.raises(TypeError):
        pickle.dumps(st)


# -- TokenBucket ----------------------------------------------------------------------------------------

def _offer(bucket: TokenBucket, start: float, seconds: float, offered_mbit: float, size: int) -> int:
    """Offer `size`-byte packets at `offered_mbit` over a simulated clock; bytes accepted."""
    gap = size * 8 / (offered_mbit * 1e6)
    n = int(seconds / gap)
    return sum(size for i in range(n) if bucket.take(size, start + i * gap))


def test_token_bucket_rate_over_simulated_clock():
    b = TokenBucket(20)
    assert b.rate == 2.5e6                                 # bytes per second
    burst = b.burst
    assert burst >= 2 * 65536 + 1500                       # two full super-packets fit
    t0 = b.stamp
    # Offered 100 Mbit/s of 1400-byte packets for 10 s: passes the burst plus 20 Mbit/s, no more.
    got = _offer(b, t0, 10.0, 100, 1400)
    assert abs(got - (burst + 2.5e6 * 10)) <= 2 * 1400, (got, burst)
    # Below the rate, everything passes.
    b2 = TokenBucket(20)
    assert _offer(b2, b2.stamp, 5.0, 15, 1400) == int(5.0 / (1400 * 8 / 15e6)) * 1400


def test_token_bucket_idle_refill_is_capped_at_burst():
    b = TokenBucket(20)
    now = b.stamp
    passed = 0
    while b.take(65536, now):                              # a full bucket, then empty
        passed += 1
    assert passed == int(b.burst // 65536) >= 2
    assert not b.take(65536, now)
    now += 3600                                            # an hour idle: refills to the burst only
    assert b.take(int(b.burst), now)
    assert not b.take(1500, now)
    now += 1500 / b.rate                                   # exactly one packet's worth later
    assert b.take(1500, now + 1e-9)
    assert not b.take(1500, now + 1e-9)


# -- the CLI, as subprocesses, without a running server -----------------------------------------------

@pytest.fixture
def cli(workdir):
    cfg = workdir / "vpnd.toml"
    cfg.write_text(
        "[server]\n"
        f'private_key = "{genkey()}"\n'
        'address_pool4 = "198.19.0.0/24"\n'
        'accounts = "accounts.json"\n'
        f'control_socket = "{workdir}/not-running.sock"\n'   # never another vpnd's socket
        "\n[plans.gold]\ndevices = 3\nbandwidth_mbit = 100\n")

    def run(*argv: str, config: Path | None = cfg) -> subprocess.CompletedProcess:
        args = [VPND, *argv] + (["--config", str(config)] if config else [])
        r = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                           cwd=workdir)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    run.registry = workdir / "accounts.json"
    run.config = cfg
    return run


def _err(r: subprocess.CompletedProcess, status: int) -> str:
    """The one stderr line of a failed command (and nothing on stdout)."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vpnd: error: "), r.stderr
    assert r.stdout == ""
    return lines[0][len("vpnd: error: "):]


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stderr == ""
    return r.stdout


def test_cli_account_lifecycle(cli):
    day = utc_day()
    assert _ok(cli("account", "add", "alice")) == "vpnd: account alice created\n"
    assert stat.S_IMODE(os.stat(cli.registry).st_mode) == 0o600
    assert _ok(cli("account", "add", "bob", "--plan", "gold")) == "vpnd: account bob created\n"
    assert _ok(cli("device", "add", "alice", K1)) == "vpnd: device added to account alice\n"
    assert _ok(cli("device", "add", "alice", K2)) == "vpnd: device added to account alice\n"

    assert _ok(cli("account", "list")) == (f"alice  plan free  active  devices 2  created {day}\n"
                                           f"bob  plan gold  active  devices 0  created {day}\n")
    assert _ok(cli("account", "show", "alice")) == (
        f"account  alice\nplan     free\nstatus   active\ncreated  {day}\ndevice   {K1}\ndevice   {K2}\n")
    listed = json.loads(_ok(cli("account", "list", "--json")))
    assert listed == {"alice": {"plan": "free", "status": "active", "devices": [K1, K2], "created": day},
                      "bob": {"plan": "gold", "status": "active", "devices": [], "created": day}}
    assert json.loads(_ok(cli("account", "show", "bob", "--json"))) == {"bob": listed["bob"]}

    assert _ok(cli("account", "suspend", "alice")) == "vpnd: account alice suspended\n"
    assert "  suspended  " in _ok(cli("account", "list")).splitlines()[0]
    assert _ok(cli("account", "resume", "alice")) == "vpnd: account alice resumed\n"
    assert _ok(cli("account", "set-plan", "alice", "plus")) == "vpnd: account alice moved to the new plan\n"
    assert _ok(cli("device", "remove", "alice", K1)) == "vpnd: device removed from account alice\n"
    assert json.loads(_ok(cli("account", "show", "alice", "--json")))["alice"]["devices"] == [K2]
    assert _ok(cli("account", "remove", "bob")) == "vpnd: account bob removed\n"
    assert list(json.loads(_ok(cli("account", "list", "--json")))) == ["alice"]
    # The file is what the library reads, and nothing more.
    assert reg.load(str(cli.registry))["alice"].plan == "plus"
    assert _temps(cli.registry.parent) == []


def test_cli_empty_registry(cli):
    assert _ok(cli("account", "list")) == ""
    assert _ok(cli("account", "list", "--json")) == "{}\n"
    assert not cli.registry.exists()               # reading never creates the file


def test_cli_errors_are_one_line(cli):
    _ok(cli("account", "add", "alice"))
    _ok(cli("device", "add", "alice", K1))
    _ok(cli("account", "add", "bob"))
    before = cli.registry.read_bytes()

    assert _err(cli("account", "add", "alice"), 1) == "account 'alice' already exists"
    assert _err(cli("account", "show", "nobody"), 1) == "no account 'nobody'; see 'vpnd account list'"
    for argv in (("account", "suspend", "nobody"), ("account", "resume", "nobody"),
                 ("account", "remove", "nobody"), ("account", "set-plan", "nobody", "plus"),
                 ("device", "add", "nobody", K2), ("device", "remove", "nobody", K1)):
        assert _err(cli(*argv), 1) == "no account 'nobody'; see 'vpnd account list'", argv
    assert _err(cli("device", "add", "bob", K1), 1) == (
        "that device key is already registered (account 'alice'); each device belongs to one account")
    assert _err(cli("device", "add", "bob", "zzzz"), 2).startswith("the device public key decodes to 3 bytes")
    assert _err(cli("device", "add", "bob", "not-a-key!"), 2).startswith("the device public key is not valid base64")
    assert _err(cli("device", "remove", "bob", K1), 1) == "account 'bob' has no such device"
    assert _err(cli("account", "add", "carol", "--plan", "gold2"), 2) == (
        "unknown plan 'gold2'; configured plans: free, plus, gold")
    assert _err(cli("account", "set-plan", "bob", "nope"), 2).startswith("unknown plan 'nope'")
    assert "is not valid" in _err(cli("account", "add", "has space"), 2)
    assert cli.registry.read_bytes() == before          # no failed command touched the file

    # usage errors: one line, status 2
    assert "--config" in _err(cli("account", "list", config=None), 2)
    assert "see 'vpnd account --help'" in _err(cli("account", config=None), 2)
    assert "see 'vpnd device add --help'" in _err(cli("device", "add", "bob"), 2)
    assert _err(cli("account", "list", config=cli.config.parent / "missing.toml"), 2).startswith("config file")


def test_cli_damaged_registry_and_no_registry(cli, workdir):
    cli.registry.write_text('{"version": 1, "accounts": {"a": {"plan": ')
    for argv in (("account", "list"), ("account", "add", "x"), ("device", "add", "x", K1)):
        msg = _err(cli(*argv), 1)
        assert msg.startswith(f"accounts registry '{cli.registry}' is damaged (not JSON)"), msg
    assert cli.registry.read_text() == '{"version": 1, "accounts": {"a": {"plan": '

    bare = workdir / "bare.toml"
    bare.write_text(f'[server]\nprivate_key = "{genkey()}"\naddress_pool4 = "198.19.0.0/24"\n'
                    f'control_socket = "{workdir}/x.sock"\n')
    assert "names no accounts registry" in _err(cli("account", "list", config=bare), 2)
