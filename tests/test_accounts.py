"""Accounts in vpnd (issues 5 and 14), without root: the registry's first format and the live policy.

- `vpnd.registry.jsonfile`: the JSON registry of the first format, read to migrate it (damaged
  files are one clear line);
- `vpnd.policy`: device limits at admission, release, what a registry change ends, what removed
  and suspended accounts leave behind, the token bucket over a simulated clock;
- the real `vpnd account|device|plan ...` console scripts as subprocesses against a SQLite
  registry in a temporary directory, by --registry and by --config (whose private key file does
  not exist: the admin commands never read it).

The registry engines' own contract is tests/test_registry.py. Every file lives in a directory
created and removed by the `workdir` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vpncore.cli import UserError
from vpncore.configfile import encode_key, parse_key
from vpnd.registry import DEFAULT_PLANS, Account, Plan, open_registry
from vpnd.registry import jsonfile
from vpnd.policy import AccountState, Policy, TokenBucket
from vpnd.stats import DailyStats, utc_day

BIN = Path(sys.executable).parent
VPND = str(BIN / "vpnd")
TIMEOUT = 30


def _key() -> str:
    """A device public key in the registry's text form (any 32 bytes do for the registry)."""
    return encode_key(os.urandom(32))


K1, K2, K3 = _key(), _key(), _key()


@pytest.fixture
def path(workdir) -> str:
    return str(workdir / "accounts.json")


@pytest.fixture
def r(workdir):
    reg = open_registry(f"sqlite://{workdir}/accounts.db")
    yield reg
    reg.close()


def change(reg, op: str, aid: str, *, plan: str | None = None, key: str | None = None) -> None:
    """One admin change, as `vpnd account|device ...` makes it."""
    k = parse_key(key, "k") if key is not None else None
    {"add": lambda: reg.add_account(aid, plan, utc_day()),
     "suspend": lambda: reg.set_status(aid, "suspended"), "resume": lambda: reg.set_status(aid, "active"),
     "remove": lambda: reg.remove_account(aid), "set-plan": lambda: reg.set_account_plan(aid, plan),
     "device-add": lambda: reg.add_device(aid, k), "device-remove": lambda: reg.remove_device(aid, k)}[op]()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


# -- parse and dump ------------------------------------------------------------------------------

def test_parse_the_first_format():
    text = (Path(__file__).parent / "data" / "accounts-v1.json").read_text()
    accounts = jsonfile.parse(text, "mem")
    assert sorted(accounts) == ["alice", "bob", "carol.x_y-1"]
    assert accounts["bob"].plan == "plus" and len(accounts["bob"].devices) == 3
    assert accounts["carol.x_y-1"].status == "suspended"
    assert all(len(k) == 32 for a in accounts.values() for k in a.devices)


def test_parse_defaults_and_empty():
    assert jsonfile.parse('{"version": 1, "accounts": {}}', "p") == {}
    a = jsonfile.parse('{"version": 1, "accounts": {"x": {"plan": "free"}}}', "p")["x"]
    assert (a.status, a.devices, a.created) == ("active", [], "")


DAMAGED = [
    ("not-json", '{"version": 1, "accounts": {', "not JSON"),
    ("empty", "", "not JSON"),
    ("half-written", '{"accounts": {"a": {"created": "2026-1', "not JSON"),
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
        jsonfile.load(path)
    msg = _one_line(info.value)
    assert f"accounts registry {path!r} is damaged ({what})" in msg
    assert "restore it from a backup" in msg
    assert info.value.status == 1


def test_damaged_registry_not_utf8_and_directory(path, workdir):
    Path(path).write_bytes(b'{"version": 1, "accounts": {"\xff": 1}}')
    with pytest.raises(UserError, match=r"is damaged \(not UTF-8\)") as info:
        jsonfile.load(path)
    _one_line(info.value)
    d = workdir / "dir.json"
    d.mkdir()
    with pytest.raises(UserError, match="is a directory; name a file") as info:
        jsonfile.load(str(d))
    _one_line(info.value)


def test_missing_json_registry_is_empty(path):
    assert jsonfile.load(path) == {}


# -- the live policy ------------------------------------------------------------------------------------

def _cfg(clients=()):
    return SimpleNamespace(plans=dict(DEFAULT_PLANS),
                           clients=[SimpleNamespace(public_key=k, psk=None) for k in clients])


class FakePeer:
    def __init__(self, key: str):
        self.public_key = parse_key(key, "k")


def test_policy_device_limit_and_release(r):
    r.put_plan(Plan("free", devices=2))
    change(r, "add", "alice", plan="free")
    for k in (K1, K2):
        change(r, "device-add", "alice", key=k)
    r.put_plan(Plan("free", devices=1))          # fewer than it has (as after a migration): 1 at a time
    pol = Policy(_cfg())
    pol.apply(r.snapshot())
    p1, p2 = FakePeer(K1), FakePeer(K2)

    state, why = pol.admit(p1)
    assert why is None and isinstance(state, AccountState)
    assert state.id == "alice" and state.plan == Plan("free", 1) and state.sessions == {p1}
    assert state.up is None and state.down is None             # no bandwidth cap

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


def test_policy_refusals_and_who_may_handshake(r):
    keys = [_key() for _ in range(5)]
    change(r, "add", "bob", plan="plus")
    for k in keys:
        change(r, "device-add", "bob", key=k)
    change(r, "add", "dave", plan="free")
    change(r, "device-add", "dave", key=K2)
    change(r, "suspend", "dave")
    snap = r.snapshot()
    # an account whose plan the server does not know (the engines' foreign key forbids it; a
    # snapshot made by hand shows what the policy does with one)
    snap.accounts["carol"] = Account("carol", "gold", "active", [parse_key(K1, "k")], utc_day())
    static = parse_key(K3, "k")
    pol = Policy(_cfg(clients=[static]))
    pol.apply(snap)
    for p in [FakePeer(k) for k in keys]:
        assert pol.admit(p)[1] is None
    assert pol.admit(FakePeer(K1)) == (None, "account has an unknown plan; contact the operator")
    assert pol.admit(FakePeer(K2)) == (None, "account suspended")
    assert pol.admit(FakePeer(K3)) == (None, None)              # a [[client]] entry: no account, no limits
    assert pol.admit(FakePeer(_key())) == (None, "this device is not registered on this server")
    # Who may handshake at all: active accounts with a known plan, and the static clients.
    assert set(pol.authorized()) == {parse_key(k, "k") for k in keys} | {static}


def test_policy_to_end_after_registry_changes(r):
    change(r, "add", "alice", plan="plus")
    change(r, "add", "bob", plan="plus")
    for k in (K1, K2):
        change(r, "device-add", "alice", key=k)
    change(r, "device-add", "bob", key=K3)
    pol = Policy(_cfg())
    pol.apply(r.snapshot())
    a1, a2, b = FakePeer(K1), FakePeer(K2), FakePeer(K3)
    for p in (a1, a2, b):
        assert pol.admit(p)[1] is None
    assert pol.to_end() == [] and pol.generation == r.generation()

    change(r, "device-remove", "alice", key=K2)
    assert pol.generation != r.generation()
    pol.apply(r.snapshot())
    assert pol.to_end() == [(a2, "device removed from the account")]
    pol.release(pol.live["alice"], a2, [])

    change(r, "suspend", "alice")
    pol.apply(r.snapshot())
    assert pol.to_end() == [(a1, "account suspended")]
    assert parse_key(K1, "k") not in pol.authorized()

    change(r, "remove", "bob")
    pol.apply(r.snapshot())
    assert sorted(pol.to_end(), key=lambda x: x[1]) == [(b, "account removed"), (a1, "account suspended")]
    assert parse_key(K3, "k") not in pol.authorized()


def test_removed_and_suspended_accounts_leave_nothing_in_memory(r):
    """After their sessions end, a removed or suspended account's live state goes, its nftables
    slot is queued for deletion, and the server drops its per-day figures (DailyStats)."""
    for aid, key in (("alice", K1), ("bob", K2), ("carol", K3)):
        change(r, "add", aid, plan="plus")
        change(r, "device-add", aid, key=key)
    pol = Policy(_cfg(), egress=SimpleNamespace(account_slot=lambda slot, rate: f"slot {slot}\n",
                                                element=lambda *a: ""))
    pol.apply(r.snapshot())
    peers = {aid: FakePeer(k) for aid, k in (("alice", K1), ("bob", K2), ("carol", K3))}
    states = {aid: pol.admit(p)[0] for aid, p in peers.items()}
    stats = DailyStats()
    stats.add_account_bytes({"alice": (1, 2), "bob": (3, 4), "carol": (5, 6)})
    change(r, "remove", "alice")
    change(r, "suspend", "bob")
    pol.apply(r.snapshot())
    assert pol.forget_gone() == []                      # sessions still live: nothing forgotten yet
    assert sorted(why for _, why in pol.to_end()) == ["account removed", "account suspended"]
    for aid in ("alice", "bob"):
        pol.release(states[aid], peers[aid], [])
    assert sorted(pol.forget_gone()) == ["alice", "bob"]
    assert sorted(pol.live) == ["carol"]
    assert sorted(pol.slots_to_drop) == sorted([states["alice"].slot, states["bob"].slot])
    stats.forget_accounts(["alice", "bob"])
    assert stats.account_ids() == {"carol"}


def test_policy_plan_change_applies_to_live_state(r):
    r.put_plan(Plan("capped", devices=1, bandwidth_mbit=20.0))
    change(r, "add", "alice", plan="plus")
    change(r, "device-add", "alice", key=K1)
    pol = Policy(_cfg())
    pol.apply(r.snapshot())
    state, _ = pol.admit(FakePeer(K1))
    assert state.up is None
    change(r, "set-plan", "alice", plan="capped")
    pol.apply(r.snapshot())
    assert pol.to_end() == []
    assert state.plan.name == "capped"
    assert state.up.rate == state.down.rate == 20e6 / 8
    change(r, "set-plan", "alice", plan="plus")
    pol.apply(r.snapshot())
    pol.to_end()
    assert state.up is None and state.down is None


def test_policy_take_bytes_per_account(r):
    change(r, "add", "alice", plan="free")
    change(r, "device-add", "alice", key=K1)
    pol = Policy(_cfg())
    pol.apply(r.snapshot())
    state, _ = pol.admit(FakePeer(K1))
    assert pol.take_bytes() == {}
    state.bytes_in, state.bytes_out = 1000, 2500
    assert pol.take_bytes() == {"alice": (1000, 2500)}
    assert pol.take_bytes() == {}


def test_live_state_is_memory_only():
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
    """`vpnd ...` with --config naming a server config whose private key file does not exist (the
    admin commands must not read it), or with --registry URL."""
    cfg = workdir / "vpnd.toml"
    cfg.write_text(
        "[server]\n"
        'private_key_file = "missing-server.key"\n'
        'address_pool4 = "198.19.0.0/24"\n'
        'accounts = "sqlite:accounts.db"\n'
        f'control_socket = "{workdir}/not-running.sock"\n')

    def run(*argv: str, config: Path | None = cfg, registry: str | None = None) -> subprocess.CompletedProcess:
        where = ["--registry", registry] if registry else (["--config", str(config)] if config else [])
        r = subprocess.run([VPND, *argv] + where, capture_output=True, text=True, timeout=TIMEOUT,
                           stdin=subprocess.DEVNULL, cwd=workdir)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    run.registry = workdir / "accounts.db"
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
    assert _ok(cli("plan", "set", "gold", "--devices", "3", "--bandwidth-mbit", "100")) == "vpnd: plan gold set\n"
    assert _ok(cli("account", "add", "bob", "--plan", "gold")) == "vpnd: account bob created\n"
    assert _ok(cli("plan", "set", "free", "--devices", "2")) == "vpnd: plan free set\n"
    assert _ok(cli("device", "add", "alice", K1, "--name", "phone")) == "vpnd: device added to account alice\n"
    assert _ok(cli("device", "add", "alice", K2)) == "vpnd: device added to account alice\n"

    assert _ok(cli("account", "list")) == (f"alice  plan free  active  devices 2  created {day}\n"
                                           f"bob  plan gold  active  devices 0  created {day}\n")
    devices = sorted([{"key": K1, "name": "phone"}, {"key": K2}], key=lambda d: parse_key(d["key"], "k"))
    assert _ok(cli("account", "show", "alice")) == (          # devices in the order of their keys
        f"account  alice\nplan     free\nstatus   active\ncreated  {day}\n" +
        "".join(f"device   {d['key']}" + ("  phone" if "name" in d else "") + "\n" for d in devices))
    listed = json.loads(_ok(cli("account", "list", "--json")))
    assert listed == {"alice": {"plan": "free", "status": "active", "devices": devices, "created": day},
                      "bob": {"plan": "gold", "status": "active", "devices": [], "created": day}}
    assert json.loads(_ok(cli("account", "show", "bob", "--json"))) == {"bob": listed["bob"]}
    assert json.loads(_ok(cli("device", "list", "alice", "--json"))) == devices
    plans = json.loads(_ok(cli("plan", "list", "--json")))
    assert plans["gold"] == {"devices": 3, "bandwidth_mbit": 100.0, "new_flows_per_second": 0}
    assert plans["free"] == {"devices": 2, "bandwidth_mbit": 0.0, "new_flows_per_second": 50}   # the rest kept

    assert _ok(cli("account", "suspend", "alice")) == "vpnd: account alice suspended\n"
    assert "  suspended  " in _ok(cli("account", "list")).splitlines()[0]
    assert _ok(cli("account", "resume", "alice")) == "vpnd: account alice resumed\n"
    assert _ok(cli("account", "set-plan", "alice", "plus")) == "vpnd: account alice moved to the new plan\n"
    assert _ok(cli("device", "remove", "alice", K1)) == "vpnd: device removed from account alice\n"
    assert json.loads(_ok(cli("account", "show", "alice", "--json")))["alice"]["devices"] == [{"key": K2}]
    assert _ok(cli("account", "remove", "bob")) == "vpnd: account bob removed\n"
    assert list(json.loads(_ok(cli("account", "list", "--json")))) == ["alice"]
    # --registry instead of --config: the same registry
    assert json.loads(_ok(cli("account", "list", "--json", registry=f"sqlite://{cli.registry}")))["alice"]["plan"] \
        == "plus"
    assert json.loads(_ok(cli("account", "add", "carol", "--json"))) == {"ok": True, "account": "carol"}


def test_cli_empty_registry(cli):
    assert _ok(cli("account", "list")) == ""
    assert _ok(cli("account", "list", "--json")) == "{}\n"


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
        "that device key is already registered (to another account); each device belongs to one account")
    assert _err(cli("device", "add", "alice", K2), 1) == (
        "account 'alice' has 1 device, as many as plan 'free' allows; remove one first ('vpnd device remove')")
    assert _err(cli("device", "add", "bob", "zzzz"), 2).startswith("the device public key decodes to 3 bytes")
    assert _err(cli("device", "add", "bob", "not-a-key!"), 2).startswith("the device public key is not valid base64")
    assert _err(cli("device", "remove", "bob", K1), 1) == "account 'bob' has no such device"
    assert _err(cli("account", "add", "carol", "--plan", "gold2"), 2) == (
        "unknown plan 'gold2'; the registry's plans: free, plus (see 'vpnd plan list')")
    assert _err(cli("account", "set-plan", "bob", "nope"), 2).startswith("unknown plan 'nope'")
    assert "is not valid" in _err(cli("account", "add", "has space"), 2)
    assert _err(cli("plan", "remove", "free"), 1).startswith("plan 'free' has 2 accounts")
    assert cli.registry.read_bytes() == before          # no failed command changed the file

    # usage errors: one line, status 2
    assert "--registry" in _err(cli("account", "list", config=None), 2)
    assert "see 'vpnd account --help'" in _err(cli("account", config=None), 2)
    assert "see 'vpnd device add --help'" in _err(cli("device", "add", "bob"), 2)
    assert _err(cli("account", "list", config=cli.config.parent / "missing.toml"), 2).startswith("config file")
    assert "holds a password" in _err(cli("account", "list", registry="postgresql://u:pw@db/vpnd"), 2)
    assert "unknown registry engine" in _err(cli("account", "list", registry="mysql://db/x"), 2)


def test_cli_damaged_registry_and_no_registry(cli, workdir):
    cli.registry.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    for argv in (("account", "list"), ("account", "add", "x"), ("device", "add", "x", K1)):
        msg = _err(cli(*argv), 1)
        assert msg.startswith(f"the accounts registry '{cli.registry}' is not a vpnd registry or is damaged"), msg

    bare = workdir / "bare.toml"
    bare.write_text('[server]\nprivate_key_file = "missing.key"\naddress_pool4 = "198.19.0.0/24"\n')
    assert "names no accounts registry" in _err(cli("account", "list", config=bare), 2)


def test_cli_migrate_the_first_format(cli, workdir):
    shutil.copy(Path(__file__).parent / "data" / "accounts-v1.json", workdir / "old.json")
    out = _ok(cli("registry", "migrate", "--from", "old.json", registry="sqlite:new.db"))
    assert out == "vpnd: migrated 3 accounts from old.json (checked)\n"
    listed = json.loads(_ok(cli("account", "list", "--json", registry="sqlite:new.db")))
    assert sorted(listed) == ["alice", "bob", "carol.x_y-1"] and listed["carol.x_y-1"]["status"] == "suspended"
    assert (workdir / "old.json").exists()               # by hand: the source stays where it was
    assert "already holds accounts" in _err(cli("registry", "migrate", "--from", "old.json",
                                                registry="sqlite:new.db"), 1)
