"""Start-up hardening: no core dumps, not dumpable, memory locked where permitted (DESIGN §4)."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

PR_SET_DUMPABLE = 4
MCL_CURRENT, MCL_FUTURE = 1, 2


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def harden() -> list[str]:
    """Apply what we can; return one warning line per measure that could not be applied."""
    warnings = []
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        warnings.append("could not mark the process non-dumpable (prctl PR_SET_DUMPABLE failed)")
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        warnings.append("could not lock memory (mlockall): session keys may reach swap; "
                        "raise RLIMIT_MEMLOCK or run as root with CAP_IPC_LOCK")
    return warnings
