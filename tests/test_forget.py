"""vpnd/forget.py: freed blocks that held address text are overwritten (read back via /proc/PID/mem).

A child process makes address strings the way socket.recvmsg does (fresh str objects, in tuples),
drops them, optionally runs `forget_freed()`, and waits; this process scans its memory. The child
gets the canaries XOR-masked, so only the objects it builds hold them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.memscan import Canaries, ipv4_canaries, scan_pid

CHILD = r"""
import sys
from vpnd.forget import forget_freed, scrub
masked = [bytes.fromhex(h) for h in sys.argv[2].split(",")]   # still masked
keep = []
for round in range(50):
    batch = [(bytes(b ^ 0x5A for b in m).decode(), 40000 + round) for m in masked]   # like recvmsg's tuples
    big = [bytes(b ^ 0x5A for b in m) * 40 for m in masked]                            # > 512 bytes: malloc
    keep.append(batch[round % len(batch)][1])
    del batch, big
stats = forget_freed() if sys.argv[1] == "scrub" else None
print("ready", stats, flush=True)
sys.stdin.read()
"""


def run_child(mode: str, canaries: list[str]):
    masked = ",".join(bytes(b ^ 0x5A for b in c.encode()).hex() for c in canaries)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, masked], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=env)
    line = p.stdout.readline()
    assert line.startswith(b"ready"), line
    try:
        return scan_pid(p.pid, Canaries(canaries, [])), line
    finally:
        p.stdin.close()
        p.wait(10)


@pytest.fixture
def canaries():
    if not os.access("/proc/self/mem", os.R_OK) or os.geteuid() != 0:
        pytest.skip("reads another process's memory: needs root (ptrace access)")
    return ipv4_canaries("198.18.201.0/24", 8) + ["2001:2::a5c3:7e19:4d2b:91f7", "2001:2::6b1d:c35e:27a9:e461"]


def test_without_scrub_freed_address_strings_stay_readable(canaries):
    r, _ = run_child("none", canaries)                 # the control: the scanner sees what is left
    assert {h["canary"] for h in r["hits"]} == set(canaries)


def test_scrub_overwrites_freed_address_strings(canaries):
    r, line = run_child("scrub", canaries)
    assert b"'ok': True" in line, line
    assert r["hits"] == [], r["hits"][:5]


def test_scrub_is_safe_to_repeat_and_counts_only():
    from vpnd.forget import forget_freed

    junk = [(f"198.18.201.{i}", i) for i in range(1000)]
    del junk
    for _ in range(3):
        stats = forget_freed()
        assert set(stats) == {"ok", "blocks", "chunks"} and all(isinstance(v, (bool, int)) for v in stats.values())
