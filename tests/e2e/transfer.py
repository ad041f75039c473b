"""A TCP transfer through the tunnel with a checksum and a record of its progress (issue 7 tests).

    rx = Receiver(topo, ns, host, port, workdir).start()
    tx = Sender(topo, other_ns, host, port, total=..., seed=..., rate=None).start()
    sent = tx.result(timeout)          # {"bytes", "sha256", "start", "end"}
    got = rx.result(timeout)           # {"bytes", "sha256", "first", "last", "max_gap", "max_gap_at",
                                       #  "gaps_over": {"0.5": n, "1.0": n}, "gaps": [[start, length], ...],
                                       #  "samples": [bytes per 100 ms]}

The receiver notes the wall-clock time of every `recv` that returned data (time.time(): the same
clock in every namespace, so a test can line events up with it); `max_gap` is the longest time
between two of them from the first byte to the last, `max_gap_at` when that gap began, and
`gaps` the 50 longest gaps over 20 ms (start, length), and `samples` the bytes received in each
100 ms from the first byte on. The sender writes a seeded
pseudo-random stream, optionally paced to `rate` bytes/s; both sides hash what they moved.

The receiver ends early, with `error` set, when nothing arrives for `idle` seconds or, with
`stall=(window, floor)`, when fewer than `floor` bytes arrive in a `window`-second stretch (a transfer
that trickles is as stuck as one that stops: a failing test then costs seconds, not its deadline).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.e2e.netns import Topology, wait_until

CHUNK = 1 << 16

_RECEIVER = textwrap.dedent("""
    import hashlib, json, socket, sys, time
    host, port, ready, idle = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    window, floor = float(sys.argv[5]), int(sys.argv[6])
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(1)
    srv.settimeout(60)
    open(ready, "w").close()
    conn, _ = srv.accept()
    conn.settimeout(0.25)
    h, n, times, sizes = hashlib.sha256(), 0, [], []
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    error = None
    heard = time.monotonic()
    mark_t, mark_n = None, 0
    while True:
        now = time.monotonic()
        if now - heard > idle:       # a transfer silent this long has failed: end, report what came
            error = f"idle for {idle} s"
            break
        if window and mark_t is not None and now - mark_t >= window:
            if n - mark_n < floor:   # stalled: under `floor` bytes in `window` seconds
                error = f"stalled: {n - mark_n} bytes in {now - mark_t:.1f} s"
                break
            mark_t, mark_n = now, n
        try:
            k = conn.recv_into(buf)
        except socket.timeout:
            continue
        except OSError as exc:
            error = repr(exc)
            break
        if not k:
            break
        heard = time.monotonic()
        if mark_t is None:
            mark_t = heard
        times.append(time.time())
        sizes.append(k)
        h.update(view[:k])
        n += k
    conn.close()
    first = times[0] if times else None
    last = times[-1] if times else None
    gap, gap_at = 0.0, first
    for a, b in zip(times, times[1:]):
        if b - a > gap:
            gap, gap_at = b - a, a
    over = {str(t): sum(1 for a, b in zip(times, times[1:]) if b - a > t) for t in (0.25, 0.5, 1.0, 2.0)}
    gaps = sorted(([a, b - a] for a, b in zip(times, times[1:]) if b - a > 0.02), key=lambda g: -g[1])[:50]
    samples = []
    if times:
        samples = [0] * (int((last - first) / 0.1) + 1)
        for t, k in zip(times, sizes):
            samples[int((t - first) / 0.1)] += k
    print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "first": first, "last": last, "max_gap": gap,
                      "max_gap_at": gap_at, "gaps_over": over, "gaps": gaps, "samples": samples, "error": error}), flush=True)
""")

_SENDER = textwrap.dedent("""
    import hashlib, json, random, socket, sys, time
    host, port, total, seed, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    rng, h, sent = random.Random(seed), hashlib.sha256(), 0
    s = socket.create_connection((host, port), timeout=60)
    start = time.time()
    t0 = time.monotonic()
    while sent < total:
        chunk = rng.randbytes(min(1 << 16, total - sent))
        if rate > 0:
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        s.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)          # the receiver closes after reading everything
    print(json.dumps({"bytes": sent, "sha256": h.hexdigest(), "start": start, "end": time.time()}), flush=True)
""")


def expected_digest(total: int, seed: int) -> str:
    """The SHA-256 of the stream a Sender with this seed writes."""
    rng, h, n = random.Random(seed), hashlib.sha256(), 0
    while n < total:
        chunk = rng.randbytes(min(CHUNK, total - n))
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest()


class _Proc:
    def _result(self, timeout: float) -> dict:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.topo.stop(self.proc)
            raise AssertionError(f"{self.what} did not finish within {timeout} s") from None
        if self.proc.returncode != 0 or not out.strip():
            raise AssertionError(f"{self.what} failed ({self.proc.returncode}): {err.strip()[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])


class Receiver(_Proc):
    def __init__(self, topo: Topology, ns: str, host: str, port: int, workdir: Path, idle: float = 30,
                 stall: tuple[float, int] = (0, 0)):
        self.topo, self.ns, self.host, self.port, self.idle = topo, ns, host, port, idle
        self.stall = stall
        self.ready = Path(workdir) / f"receiver-{port}.ready"
        self.what = f"receiver in {ns}"
        self.proc = None

    def start(self) -> "Receiver":
        self.proc = self.topo.popen(self.ns, sys.executable, "-c", _RECEIVER, self.host, str(self.port),
                                    str(self.ready), str(self.idle), str(self.stall[0]), str(self.stall[1]),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not wait_until(lambda: self.ready.exists() or self.proc.poll() is not None, 10) \
                or self.proc.poll() is not None:
            raise AssertionError(f"receiver did not start: {self.proc.stderr.read() if self.proc.poll() is not None else ''}")
        return self

    def result(self, timeout: float) -> dict:
        return self._result(timeout)


class Sender(_Proc):
    def __init__(self, topo: Topology, ns: str, host: str, port: int, *, total: int, seed: int, rate: float = 0):
        self.topo, self.ns, self.host, self.port = topo, ns, host, port
        self.total, self.seed, self.rate = total, seed, rate
        self.what = f"sender in {ns}"
        self.proc = None

    def start(self) -> "Sender":
        self.proc = self.topo.popen(self.ns, sys.executable, "-c", _SENDER, self.host, str(self.port),
                                    str(self.total), str(self.seed), str(self.rate),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def result(self, timeout: float) -> dict:
        return self._result(timeout)

    def running(self) -> bool:
        return self.proc.poll() is None
