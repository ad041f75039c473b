"""systemd's readiness and watchdog protocol, written out (no dependency), and the privilege check.

sd_notify(3): one datagram of newline-separated VAR=VALUE lines to the Unix datagram socket named
by $NOTIFY_SOCKET (a path, or "@name" in the abstract namespace). With $NOTIFY_SOCKET unset every
call is a no-op, so vpnd and vpnclient behave the same outside systemd (Type=notify units in
packaging/).

    ready("serving")      READY=1 and STATUS=: the TUN, the sockets, the kill switch... are up
    status("...")         STATUS= alone
    watchdog()            WATCHDOG=1: call it every watchdog_interval() seconds
    stopping()            STOPPING=1 at shutdown

No call ever raises into the caller: a failed send (no such socket, a full queue, a refused
address family) is counted in `failures` and otherwise ignored. The service manager notices a
watchdog that stops arriving; nothing here may take the tunnel down.

STATUS= text is shown by `systemctl status` and may reach the journal: callers pass fixed words
("serving", "connected", "stopping"), never an address, key, name, count or time (README, "No
logs"). `status()` refuses anything but a short fixed vocabulary of letters, spaces and hyphens,
so a digit or an address cannot slip in.

`has_net_admin()` is the check `vpnd serve` and `vpnclient up` make before opening anything: can
this process and the helpers it runs (nft, ip, sysctl, resolvectl) use CAP_NET_ADMIN? Root, or
any user with the capability in its ambient set (AmbientCapabilities=CAP_NET_ADMIN in the units).
"""

from __future__ import annotations

import os
import re
import socket

__all__ = ["notify", "ready", "status", "watchdog", "stopping", "watchdog_interval", "enabled",
           "failures", "has_net_admin", "CAP_NET_ADMIN"]

failures = 0                       # sends that did not go through (never raised)
_STATUS_OK = re.compile(r"[a-z][a-z -]{0,62}")


def _address() -> bytes | None:
    name = os.environ.get("NOTIFY_SOCKET", "")
    if not name or name[0] not in "/@":     # unset, or a kind we do not speak (e.g. vsock:)
        return None
    raw = os.fsencode(name)
    return b"\0" + raw[1:] if raw[:1] == b"@" else raw


def enabled() -> bool:
    """True when a service manager listens ($NOTIFY_SOCKET names a path or an abstract socket)."""
    return _address() is not None


def notify(*assignments: str) -> bool:
    """Send one datagram of VAR=VALUE lines; True if it was sent, False if not (or no-op)."""
    global failures
    if not assignments:
        return False
    try:
        address = _address()
    except Exception:                # noqa: BLE001 - an odd environment must not reach the caller
        failures += 1
        return False
    if address is None:
        if os.environ.get("NOTIFY_SOCKET"):
            failures += 1
        return False
    data = "\n".join(assignments).encode("utf-8", "replace")
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    except Exception:                # noqa: BLE001 - e.g. RestrictAddressFamilies= without AF_UNIX
        failures += 1
        return False
    try:
        s.sendto(data, address)     # the sender's credentials come with it (SCM_CREDENTIALS)
        return True
    except Exception:                # noqa: BLE001 - gone, full, refused: counted, never raised
        failures += 1
        return False
    finally:
        s.close()


def status(text: str) -> bool:
    """STATUS=text; only fixed words (lowercase letters, spaces, hyphens) are sent."""
    global failures
    if not isinstance(text, str) or not _STATUS_OK.fullmatch(text):
        failures += 1
        return False
    return notify(f"STATUS={text}")


def ready(text: str | None = None) -> bool:
    """READY=1 (and STATUS=text, fixed words only): start-up is complete."""
    if text is not None and isinstance(text, str) and _STATUS_OK.fullmatch(text):
        return notify("READY=1", f"STATUS={text}")
    return notify("READY=1")


def stopping(text: str | None = "stopping") -> bool:
    """STOPPING=1: shutting down (systemd shows the unit as deactivating)."""
    if text is not None and isinstance(text, str) and _STATUS_OK.fullmatch(text):
        return notify("STOPPING=1", f"STATUS={text}")
    return notify("STOPPING=1")


def watchdog() -> bool:
    """WATCHDOG=1: a keep-alive ping (only useful when watchdog_interval() is not None)."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings: half of $WATCHDOG_USEC (WatchdogSec=), or None when no
    watchdog is asked for, or it is meant for another process ($WATCHDOG_PID is not ours)."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    if not enabled():
        return None
    return usec / 2e6


# --- the privilege the programs need --------------------------------------------------------------

CAP_NET_ADMIN = 12


def _capability_sets(path: str = "/proc/self/status") -> dict[str, int] | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    sets = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            try:
                sets[key] = int(value.strip(), 16)
            except ValueError:
                return None
    return sets if "CapEff" in sets else None


def has_net_admin(cap: int = CAP_NET_ADMIN) -> bool:
    """True if this process holds `cap` in its effective set AND the programs it executes (nft, ip,
    sysctl: no file capabilities) get it too. execve(2) keeps a capability for a non-root user only
    through the ambient set; for euid 0 it comes from the bounding (or inheritable) set. Where
    /proc/self/status cannot be read, root is assumed to hold it and nobody else."""
    sets = _capability_sets()
    if sets is None:
        return os.geteuid() == 0
    bit = 1 << cap
    if not sets["CapEff"] & bit:
        return False
    if sets.get("CapAmb", 0) & bit:
        return True
    return os.geteuid() == 0 and bool((sets.get("CapBnd", 0) | sets.get("CapInh", 0)) & bit)
