"""The one logging path of vpnd and vpnclient (DESIGN §4).

An event is a name from EVENTS (a fixed sentence) plus integer counts. There is
no way to pass free text, an address, a port, a key or a timestamp: values must
be ints, and the line carries no time at all. Where code would want to log a
detail about one connection, it counts instead.

Under systemd (stderr connected to the journal: JOURNAL_STREAM names the stream's device and
inode, `man sd-daemon`) each line starts with its priority, `<3>` error to `<7>` debug, so that
`journalctl -p warning` shows what needs the operator. Note that the journal stamps every line it
receives with a microsecond time: a line printed once per session is a record of when a session
started or ended. That is why vpnd prints nothing per session at the default level (info) or at
quiet; the per-session events are at verbose and debug, printed only when the operator asks.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

QUIET, INFO, VERBOSE, DEBUG = 0, 1, 2, 3
LEVELS = {"quiet": QUIET, "info": INFO, "verbose": VERBOSE, "debug": DEBUG}

# sd-daemon priorities (syslog levels), the `<N>` prefix of a line in the journal
ERR, WARNING, NOTICE, PRIO_INFO, PRIO_DEBUG = 3, 4, 5, 6, 7
# the priority of an event that names none: by the level that prints it
PRIORITY = {QUIET: NOTICE, INFO: PRIO_INFO, VERBOSE: PRIO_DEBUG, DEBUG: PRIO_DEBUG}

# name -> (level, sentence), or (level, sentence, priority). Sentences are constants: they never
# interpolate connection data. An event vpnd emits once per session (or more often) must be at
# VERBOSE or DEBUG (SERVER_PER_SESSION; tests/test_log.py checks it, tests/e2e/test_log_levels.py
# runs vpnd at every level). vpnclient's lines are on the user's own machine and may be per session.
EVENTS = {
    "started": (INFO, "started", NOTICE),
    "stopping": (INFO, "stopping", NOTICE),
    "stopped": (INFO, "stopped", NOTICE),
    "session-started": (VERBOSE, "a session started"),
    "session-ended": (VERBOSE, "a session ended"),
    "sessions": (VERBOSE, "sessions active"),
    "under-load": (VERBOSE, "handshake load high: cookies required", WARNING),
    "drops": (DEBUG, "packets dropped since the last report"),
    "handshaking": (VERBOSE, "handshaking with the server"),    # vpnclient prints its own progress lines (issue 6)
    "connected": (VERBOSE, "connected"),    # vpnclient prints its own progress lines (issue 6)
    "reconnecting": (INFO, "no answer from the server: reconnecting", WARNING),
    "server-closed": (INFO, "the server closed the session", NOTICE),
    "config-applied": (VERBOSE, "tunnel configuration applied"),    # vpnclient prints its own progress lines (issue 6)
    "harden-warning": (QUIET, "hardening incomplete: see the line above", WARNING),
    "stats": (DEBUG, "statistics"),
    "registry-lost": (QUIET, "the accounts registry cannot be reached: serving with what it last read, retrying",
                      WARNING),
    "registry-back": (QUIET, "the accounts registry is reachable again: changes made meanwhile applied", NOTICE),
}

# the events vpnd emits once per session (kept above the default level), and the only ones it may
# print at info or quiet: none of them happens per session
SERVER_PER_SESSION = frozenset({"session-started", "session-ended"})
SERVER_DEFAULT_LEVEL = frozenset({"started", "stopping", "stopped", "harden-warning", "registry-lost",
                                  "registry-back"})


def event_level(name: str) -> int:
    return EVENTS[name][0]


def event_priority(name: str) -> int:
    entry = EVENTS[name]
    return entry[2] if len(entry) > 2 else PRIORITY[entry[0]]


def is_journal(stream) -> bool:
    """Whether `stream` is the systemd journal: JOURNAL_STREAM ("DEVICE:INODE") names its fd."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):   # no fd (StringIO: io.UnsupportedOperation), closed
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def journal_prefix(stream, priority: int) -> str:
    """`<priority>` when `stream` is the journal, else "" (for lines printed outside Log)."""
    return f"<{priority}>" if is_journal(stream) else ""


class Log:
    def __init__(self, prog: str, level: int = INFO, stream=None):
        self.prog = prog
        self.level = level
        self.stream = stream if stream is not None else sys.stderr
        self.journal = is_journal(self.stream)

    def event(self, name: str, **counts: int) -> None:
        level, sentence = EVENTS[name][:2]
        if level > self.level:
            return
        for key, value in counts.items():
            if type(value) is not int:
                raise TypeError(f"log event {name!r}: {key} must be an int")
        tail = "".join(f" {k}={v}" for k, v in sorted(counts.items()))
        prefix = f"<{event_priority(name)}>" if self.journal else ""
        print(f"{prefix}{self.prog}: {sentence}{tail}", file=self.stream, flush=True)


# What a scrubbed traceback may not show: IPv4 and IPv6 addresses (with ports), keys in base64 or
# hex, and times finer than a day.
_SCRUB = [
    re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?(?![\w.])"),
    re.compile(r"\[?(?<![\w:])(?:[0-9a-fA-F]{0,4}:){2,7}[0-9a-fA-F]{0,4}(?:%\w+)?\]?(?::\d+)?(?![\w:])"),
    re.compile(r"[A-Za-z0-9+/]{43}="),
    re.compile(r"\b[0-9a-fA-F]{16,}\b"),
    re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:\.\d+)?\b"),
    re.compile(r"\b1[5-9]\d{8}(?:\.\d+)?\b"),          # Unix times in seconds
]


def scrub(text: str) -> str:
    """`text` with anything that looks like an address, key or fine time replaced by <scrubbed>."""
    for pattern in _SCRUB:
        text = pattern.sub("<scrubbed>", text)
    return text


def report_crash(prog: str, exc: BaseException, stream=None) -> None:
    """Print an unexpected exception as a scrubbed traceback (never the raw one); in the journal
    every line of it has priority error (each line becomes its own journal entry)."""
    stream = stream or sys.stderr
    text = f"{prog}: internal error (please report it):\n{scrub(''.join(traceback.format_exception(exc)))}"
    prefix = journal_prefix(stream, ERR)
    if prefix:
        text = "\n".join(prefix + line for line in text.rstrip("\n").split("\n"))
    print(text, file=stream, flush=True)
