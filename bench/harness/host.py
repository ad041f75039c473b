"""Host utilities: commands, signals, root and tool checks, the bench lock, /proc readings."""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import signal
import subprocess
import sys
import time

from tests.e2e.netns import wait_until

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH)
RESULTS_DIR = os.path.join(BENCH, "results")
LOCK_PATH = "/run/lock/vpnbench.lock"
__all__ = ["run", "wait_until", "install_signal_handlers", "require_root", "require_commands", "bench_lock",
           "prepare", "script_main", "loadavg", "cpu_ticks", "proc_status", "percentile", "CLK_TCK"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def run(argv, *, check=True, timeout=30, input=None) -> subprocess.CompletedProcess:
    """Run argv in this namespace, text output captured; RuntimeError with its stderr if it fails."""
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")
    return r


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C, so every `finally` (teardown) runs."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)


def require_root(prog: str) -> None:
    if os.geteuid() != 0:
        print(f"{prog}: needs root (creates network namespaces, veth pairs and TUN devices); "
              f"run it with sudo or as root", file=sys.stderr)
        sys.exit(1)


def require_commands(names) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        print(f"missing commands: {' '.join(missing)}; run 'make deps-bench' first", file=sys.stderr)
        sys.exit(1)


def bench_lock(timeout: float = 1800):
    """Hold an exclusive lock while benchmarking (two benchmarks at once measure each other).
    Waits at most `timeout` seconds; the lock is released when the process exits."""
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    f = open(LOCK_PATH, "a")
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.close()
                print(f"another benchmark holds {LOCK_PATH} for more than {timeout:.0f} s; giving up",
                      file=sys.stderr)
                sys.exit(1)
            if not told:
                print(f"waiting for another benchmark to finish ({LOCK_PATH}) ...", file=sys.stderr)
                told = True
            time.sleep(1)


_held = []


def prepare(prog: str, commands) -> None:
    """What every benchmark does before it starts: root, tools, signals, and the lock (held until exit)."""
    require_root(prog)
    require_commands(commands)
    install_signal_handlers()
    _held.append(bench_lock())


def script_main(main) -> None:
    """`if __name__ == "__main__"` of every benchmark: exit with main()'s status, 130 on Ctrl-C."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: cleaned up", file=sys.stderr)
        sys.exit(130)


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])     # fields 14 and 15 of proc(5)


def proc_status(pid: int) -> dict:
    """VmRSS, VmHWM, VmSize (KiB) and Threads from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "VmSize", "Threads"):
                out[k] = int(v.split()[0])
    return out


def percentile(values, p: float):
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]
