#!/usr/bin/env python3
"""Mutation run over the security checks (issue 7: "every security check has a test that fails without it").

    sudo .venv/bin/python tests/mutation/run_mutants.py            # all mutants, unit then e2e tests
    .venv/bin/python tests/mutation/run_mutants.py --unit-only     # no root needed, minutes
    .venv/bin/python tests/mutation/run_mutants.py --list
    .venv/bin/python tests/mutation/run_mutants.py --only tag-ignored --only replay-removed
    sudo .venv/bin/python tests/mutation/run_mutants.py --base head   # last commit + the resilience tests

Each mutant inverts or deletes one check (mac1, mac2/cookie, the AEAD tag, the replay window, the
initiation timestamp, the authorized-key check, cryptokey routing, the endpoint update), one at a
time. The run never touches the working tree: it copies it (tracked and untracked files, not .git
or .venv) to a temporary directory, mutates the copy, and runs the tests there with PYTHONPATH
pointing at the copy, so vpnd and vpnclient started by the e2e tests run the mutated code too
(checked before the first mutant). The mutated file is restored in a `finally` and its SHA-256
compared with the original's before the next mutant; bytecode is not written
(PYTHONDONTWRITEBYTECODE), so no stale .pyc can hide a mutant or outlive it.

For each mutant: first its most relevant unit tests (-x), then, if none failed, every
tests/test_*.py; then (unless --unit-only, and if root) its relevant end-to-end tests from
tests/e2e/test_tunnel.py and tests/e2e/test_resilience.py (-x). A mutant is killed when any test
fails (or the run times out); it SURVIVED otherwise. Before the mutants, the same test selections
must pass on the unmutated copy (a failure there would "kill" every mutant and prove nothing).

Prints a table (mutant, file:line, first failing unit test, first failing e2e test, verdict) in
Markdown; exits 1 if a mutant survived or the baseline failed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROAM = "tests/e2e/test_resilience.py::test_roaming_nat_rebinding_mid_transfer_forgeries_never_move_the_endpoint"
SPOOF = "tests/e2e/test_tunnel.py::test_spoofed_inner_source_is_dropped"
PING = "tests/e2e/test_tunnel.py::test_ping_server_tunnel_address_v4_and_v6"
KEEPALIVE = "tests/e2e/test_resilience.py::test_nat_keepalive_keeps_the_client_reachable_through_idle"
# the resilience tests and their helpers (added to a --base head copy)
OVERLAY = ["tests/e2e/test_resilience.py", "tests/e2e/paths.py", "tests/e2e/transfer.py", "tests/e2e/forger.py"]
HS = "tests/test_handshake.py::"
RP = "tests/test_replay.py::"


@dataclass
class Mutant:
    name: str
    check: str                       # which security check it attacks
    path: str                        # file, relative to the repository
    edits: list[tuple[str, str]]     # (original text, replacement): each original must occur exactly once
    unit: list[str]                  # the most relevant unit tests, run first
    e2e: list[str] = field(default_factory=list)   # relevant end-to-end tests


MUTANTS = [
    # -- mac1: no DH for anyone who does not know the responder's public key ------------------------
    Mutant("mac1-deleted", "mac1", "vpncore/proto/server.py",
           [('        if not self._checker.mac1_ok(dg):\n            raise BadPacket("mac1")',
             '        if False:\n            raise BadPacket("mac1")')],
           [HS + "test_bad_mac1_gets_no_response_and_no_state", "tests/test_vectors.py"]),
    Mutant("mac1-inverted", "mac1", "vpncore/proto/server.py",
           [("        if not self._checker.mac1_ok(dg):", "        if self._checker.mac1_ok(dg):")],
           [HS + "test_full_handshake_data_and_control", HS + "test_bad_mac1_gets_no_response_and_no_state"],
           [PING]),
    Mutant("mac1_ok-always-true", "mac1", "vpncore/proto/cookie.py",
           [("        return hmac.compare_digest(h.digest(), msg[at:at + MAC_LEN])",
             "        return True")],
           [HS + "test_bad_mac1_gets_no_response_and_no_state", "tests/test_vectors.py"]),
    Mutant("client-response-mac1-deleted", "mac1", "vpncore/proto/handshake.py",
           [('    if not checker.mac1_ok(datagram):\n        raise BadPacket("mac1")',
             '    if False:\n        raise BadPacket("mac1")')],
           ["tests/e2e/test_resilience.py::test_client_drops_a_response_whose_mac1_is_wrong",
            HS + "test_forged_response_does_not_poison_the_pending_handshake"]),
    # -- mac2 / cookie: under load, only sources that proved their address get a DH ------------------
    Mutant("mac2-check-deleted", "cookie/mac2", "vpncore/proto/server.py",
           [("            if not checker.mac2_ok(dg, src, now, cookie):",
             "            if False and not checker.mac2_ok(dg, src, now, cookie):")],
           [HS + "test_under_load_cookie_reply_then_mac2_succeeds", HS + "test_cookie_is_bound_to_the_source_address_and_the_retry_does_not_loop",
            "tests/test_vectors.py"]),
    Mutant("mac2_ok-always-true", "cookie/mac2", "vpncore/proto/cookie.py",
           [("        return hmac.compare_digest(mac(cookie, msg[:at]), msg[at:])",
             "        return True")],
           [HS + "test_under_load_cookie_reply_then_mac2_succeeds", HS + "test_cookie_is_bound_to_the_source_address_and_the_retry_does_not_loop",
            "tests/test_vectors.py"]),
    Mutant("cookie-reply-index-unchecked", "cookie/mac2", "vpncore/proto/cookie.py",
           [("        if reply.receiver != expected_receiver:", "        if False:")],
           [HS + "test_cookie_reply_for_another_index_is_refused", "tests/test_parsers_fuzz.py"]),
    # -- the AEAD tag ------------------------------------------------------------------------------------
    Mutant("tag-ignored", "AEAD tag", "vpncore/proto/keypair.py",
           [('datagram[TRANSPORT_HEADER_LEN:], header)\n        except InvalidTag:\n            raise BadPacket("tag") from None',
             'datagram[TRANSPORT_HEADER_LEN:], header)\n        except InvalidTag:\n'
             '            plain = bytes(datagram[TRANSPORT_HEADER_LEN:-16])')],
           [RP + "test_bad_tag_does_not_move_the_window", HS + "test_roaming_follows_authenticated_packets_only"],
           [ROAM]),
    Mutant("super-tag-ignored", "AEAD tag", "vpncore/proto/keypair.py",
           [('plain = self._open(NONCE.pack(0, counter), ciphertext, header)\n        except InvalidTag:\n'
             '            raise BadPacket("tag") from None',
             'plain = self._open(NONCE.pack(0, counter), ciphertext, header)\n        except InvalidTag:\n'
             '            plain = bytes(ciphertext[:-16])')],
           ["tests/test_parsers_fuzz.py::test_forged_fragments_with_a_live_index", "tests/test_parsers_fuzz.py"],
           [ROAM]),
    # -- the replay window ------------------------------------------------------------------------------
    Mutant("replay-removed", "replay window", "vpncore/proto/keypair.py",
           [('        if not self.replay.check(counter):\n            raise BadPacket("replay")\n'
             '        header = datagram[:TRANSPORT_HEADER_LEN]',
             '        header = datagram[:TRANSPORT_HEADER_LEN]'),
            ('        # the window moves only after the tag verified\n        if not self.replay.update(counter):\n'
             '            raise BadPacket("replay")',
             '        self.replay.update(counter)')],
           [RP + "test_open_duplicate_datagram_rejected", RP + "test_server_drops_a_duplicated_datagram"],
           [ROAM]),
    Mutant("window-moves-before-tag", "replay window", "vpncore/proto/keypair.py",
           [('        if not self.replay.check(counter):\n            raise BadPacket("replay")\n'
             '        header = datagram[:TRANSPORT_HEADER_LEN]',
             '        if not self.replay.update(counter):\n            raise BadPacket("replay")\n'
             '        header = datagram[:TRANSPORT_HEADER_LEN]'),
            ('        # the window moves only after the tag verified\n        if not self.replay.update(counter):\n'
             '            raise BadPacket("replay")',
             '        pass')],
           [RP + "test_bad_tag_does_not_move_the_window", RP + "test_forged_far_future_counter_does_not_move_the_window"],
           [ROAM]),
    Mutant("update-accepts-duplicates", "replay window", "vpncore/proto/replay.py",
           [("        if self.bits & bit:\n            return False\n        self.bits |= bit", "        self.bits |= bit")],
           [RP + "test_table", RP + "test_kernel_selftest_table", RP + "test_window_matches_reference_model"]),
    Mutant("check-accepts-duplicates", "replay window", "vpncore/proto/replay.py",
           [("        return off < REPLAY_WINDOW and not (self.bits >> off) & 1", "        return off < REPLAY_WINDOW")],
           [RP + "test_table", RP + "test_window_matches_reference_model", "tests/test_vectors.py"]),
    Mutant("update-accepts-too-old", "replay window", "vpncore/proto/replay.py",
           [("        if off >= REPLAY_WINDOW:\n            return False\n        bit = 1 << off", "        bit = 1 << off")],
           [RP + "test_table", RP + "test_bitmap_stays_bounded", RP + "test_window_matches_reference_model"]),
    Mutant("check-accepts-too-old", "replay window", "vpncore/proto/replay.py",
           [("        return off < REPLAY_WINDOW and not (self.bits >> off) & 1",
             "        return not (self.bits >> off) & 1")],
           [RP + "test_table", RP + "test_window_matches_reference_model", "tests/test_vectors.py"]),
    # -- the initiation timestamp: a replayed first message creates nothing -------------------------------
    Mutant("timestamp-check-deleted", "initiation timestamp", "vpncore/proto/server.py",
           [("        if peer is not None and consumed.timestamp <= peer.last_timestamp:", "        if False:")],
           [HS + "test_replayed_initiation_creates_nothing_and_does_not_disturb_the_live_session"]),
    Mutant("timestamp-equal-accepted", "initiation timestamp", "vpncore/proto/server.py",
           [("consumed.timestamp <= peer.last_timestamp:", "consumed.timestamp < peer.last_timestamp:")],
           [HS + "test_replayed_initiation_creates_nothing_and_does_not_disturb_the_live_session"]),
    Mutant("timestamp-inverted", "initiation timestamp", "vpncore/proto/server.py",
           [("consumed.timestamp <= peer.last_timestamp:", "consumed.timestamp > peer.last_timestamp:")],
           [HS + "test_replayed_initiation_creates_nothing_and_does_not_disturb_the_live_session",
            HS + "test_rekey_at_120s_without_loss_and_old_keypair_until_it_ages_out"]),
    # -- only authorized keys get a session ----------------------------------------------------------------
    Mutant("unknown-key-accepted", "authorized keys", "vpncore/proto/handshake.py",
           [('    if psk is None:\n        noise.wipe()\n        raise BadPacket("unknown-key")',
             "    if psk is None:\n        psk = ZERO_PSK")],
           [HS + "test_initiation_from_an_unauthorized_key_gets_no_response",
            HS + "test_deauthorized_key_is_refused_and_its_session_ended"]),
    # -- cryptokey routing: the inner source must be the sender's tunnel address -------------------------
    Mutant("inner-source-inverted", "cryptokey routing", "vpnd/datapath.py",
           [("        if src not in info.allowed:", "        if src in info.allowed:")],
           ["tests/test_*.py"], [PING, SPOOF]),
    Mutant("inner-source-deleted", "cryptokey routing", "vpnd/datapath.py",
           [("        if src not in info.allowed:", "        if False:")],
           ["tests/test_*.py"], [SPOOF]),
    # -- the endpoint moves only on authenticated packets ---------------------------------------------------
    Mutant("endpoint-before-tag", "endpoint update", "vpncore/proto/tunnel.py",
           [("        plain = kp.open(dg, counter)\n        self._authenticated(kp, now, src, len(dg))",
             "        if src is not None:\n            self.endpoint = src\n"
             "        plain = kp.open(dg, counter)\n        self._authenticated(kp, now, src, len(dg))")],
           [HS + "test_roaming_follows_authenticated_packets_only"], [ROAM]),
    Mutant("super-endpoint-before-tag", "endpoint update", "vpncore/proto/tunnel.py",
           [("                r = reassembly_of(kp)\n",
             "                if src is not None:\n                    self.endpoint = src\n"
             "                r = reassembly_of(kp)\n")],
           [HS + "test_roaming_follows_authenticated_packets_only", "tests/test_parsers_fuzz.py"], [ROAM]),
    Mutant("endpoint-never-updated", "endpoint update (roaming)", "vpncore/proto/tunnel.py",
           [("        if src is not None and self.endpoint != src:\n            self.endpoint = src", "        pass")],
           [HS + "test_roaming_follows_authenticated_packets_only"], [ROAM, KEEPALIVE]),
]


# -- the copy -------------------------------------------------------------------------------------------

def snapshot(source: Path, dest: Path) -> None:
    """Copy the working tree's tracked and untracked (not ignored) files, as they are now."""
    out = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "-co", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        if rel.startswith((".venv/", ".git/")) or "__pycache__" in rel:
            continue
        src = source / rel
        if not src.is_file():
            continue                 # deleted in the working tree
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def snapshot_head(source: Path, dest: Path, overlay: list[str]) -> None:
    """The last commit's tree (`git archive HEAD`, read-only on the repository), plus `overlay`
    files from the working tree (new tests not committed yet)."""
    tar = subprocess.run(["git", "-C", str(source), "archive", "--format=tar", "HEAD"], capture_output=True,
                         check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    for rel in overlay:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, dest / rel)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def apply(copy: Path, m: Mutant) -> tuple[bytes, int]:
    """Mutate the copy's file; returns (original bytes, line of the first edit). ValueError if an
    original text is missing or not unique (the code moved on: update the mutant)."""
    path = copy / m.path
    original = path.read_bytes()
    text = original.decode()
    line = None
    for old, new in m.edits:
        n = text.count(old)
        if n != 1:
            raise ValueError(f"{m.name}: the text to mutate occurs {n} times in {m.path}: {old[:60]!r}")
        at = text.index(old)
        line = line or text.count("\n", 0, at) + 1
        text = text.replace(old, new)
    path.write_text(text)
    return original, line


# -- running tests ----------------------------------------------------------------------------------------

FAILED = re.compile(r"^(FAILED|ERROR) (\S+)")


@dataclass
class Outcome:
    failed: str | None       # node id of the first failing test, "TIMEOUT", or None
    passed: int
    seconds: float
    tail: str


def pytest(copy: Path, env: dict, selection: list[str], timeout: float) -> Outcome:
    args = []
    for s in selection:
        args += sorted(str(p.relative_to(copy)) for p in copy.glob(s)) if "*" in s else [s]
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *args]
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return Outcome("TIMEOUT", 0, time.monotonic() - t0, out[-2000:])
    out = r.stdout + r.stderr
    failed = next((m.group(2) for m in map(FAILED.match, out.splitlines()) if m), None)
    if failed is None and r.returncode not in (0, 5):        # 5: nothing collected
        failed = f"pytest exit {r.returncode}"
    m = re.search(r"(\d+) passed", out)
    return Outcome(failed, int(m.group(1)) if m else 0, time.monotonic() - t0, out[-3000:])


def check_imports(copy: Path, env: dict) -> None:
    """vpnd, vpnclient and vpncore must come from the copy, in this process's children and in the
    console scripts the e2e tests start."""
    code = "import vpncore, vpnd, vpnclient; print(vpncore.__file__, vpnd.__file__, vpnclient.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True).stdout
    if not all(p.startswith(str(copy)) for p in out.split()):
        raise SystemExit(f"run_mutants: the copy is not what gets imported ({out.strip()}); aborting")


# -- main ----------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these mutants")
    ap.add_argument("--unit-only", action="store_true", help="skip the end-to-end tests")
    ap.add_argument("--source", default=str(REPO), help="the working tree to copy (default: this repository)")
    ap.add_argument("--base", choices=("worktree", "head"), default="worktree",
                    help="copy the working tree as it is (default), or the last commit plus --overlay files "
                         "(when others' unfinished changes make the tree fail)")
    ap.add_argument("--overlay", action="append", default=None, metavar="PATH",
                    help=f"with --base head: working-tree files to add (default: {' '.join(OVERLAY)})")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    args = ap.parse_args()

    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.name:32} {m.check:26} {m.path}")
        return 0 if chosen or args.list else 2
    e2e = not args.unit_only
    if e2e and os.geteuid() != 0:
        print("run_mutants: not root: end-to-end tests skipped (use --unit-only to silence this)", file=sys.stderr)
        e2e = False

    source = Path(args.source).resolve()
    copy = Path(tempfile.mkdtemp(prefix="vpn-mutants-"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RESILIENCE_FIGURES")}
    env.update(PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    rows = []
    status = 0
    try:
        if args.base == "head":
            snapshot_head(source, copy, args.overlay or OVERLAY)
        else:
            snapshot(source, copy)
        snapshot_hashes = {m.path: sha256(copy / m.path) for m in chosen}
        check_imports(copy, env)
        print(f"copy of {source} in {copy}", flush=True)

        # the baseline: every selection passes unmutated
        unit_sel = sorted({u for m in chosen for u in m.unit})
        e2e_sel = sorted({t for m in chosen for t in m.e2e}) if e2e else []
        for what, sel in (("unit (relevant)", unit_sel), ("unit (all)", ["tests/test_*.py"]), ("e2e", e2e_sel)):
            if not sel:
                continue
            base = pytest(copy, env, sel, args.timeout * 2)
            print(f"baseline {what}: {base.passed} passed in {base.seconds:.0f} s"
                  + (f", FAILED {base.failed}" if base.failed else ""), flush=True)
            if base.failed:
                print(base.tail, file=sys.stderr)
                raise SystemExit("run_mutants: the unmutated tree fails; fix that first")

        for m in chosen:
            path = copy / m.path
            before = sha256(path)
            original, line = apply(copy, m)
            try:
                unit = pytest(copy, env, m.unit, args.timeout)
                if unit.failed is None:
                    unit = pytest(copy, env, ["tests/test_*.py"], args.timeout)
                e2e_out = pytest(copy, env, m.e2e, args.timeout) if e2e and m.e2e else None
            finally:
                path.write_bytes(original)
                if sha256(path) != before:
                    raise SystemExit(f"run_mutants: {m.path} not restored (hash differs); stopping")
            killed = unit.failed or (e2e_out and e2e_out.failed)
            status |= 0 if killed else 1
            row = (m.name, m.check, f"{m.path}:{line}", unit.failed or ("none failed" if killed else "SURVIVED"),
                   ("—" if not m.e2e else "(not run)") if e2e_out is None else (e2e_out.failed or "SURVIVED"),
                   "killed" if killed else "SURVIVED")
            rows.append(row)
            print(f"{m.name}: unit {row[3]} ({unit.seconds:.0f} s)"
                  + (f"; e2e {row[4]} ({e2e_out.seconds:.0f} s)" if e2e_out else ""), flush=True)
        # every mutated file is back as it was in the snapshot
        changed = [p for p, h in snapshot_hashes.items() if sha256(copy / p) != h]
        if changed:
            raise SystemExit(f"run_mutants: not restored: {changed}")
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    print()
    print("| mutant | check | file:line | first failing unit test | first failing e2e test | verdict |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(f"`{c}`" if i in (0, 2) else c for i, c in enumerate(r)) + " |")
    survived = [r[0] for r in rows if r[5] != "killed"]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutants killed" + (f"; SURVIVED: {', '.join(survived)}" if survived else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
