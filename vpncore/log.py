"""The one logging path of vpnd and vpnclient (DESIGN §4).

An event is a name from EVENTS (a fixed sentence) plus integer counts. There is
no way to pass free text, an address, a port, a key or a timestamp: values must
be ints, and the line carries no time at all. Where code would want to log a
detail about one connection, it counts instead.
"""

from __future__ import annotations

import re
import sys
import traceback

QUIET, INFO, VERBOSE, DEBUG = 0, 1, 2, 3
LEVELS = {"quiet": QUIET, "info": INFO, "verbose": VERBOSE, "debug": DEBUG}

# name -> (level, sentence). Sentences are constants: they never interpolate connection data.
EVENTS = {
    "started": (INFO, "started"),
    "stopping": (INFO, "stopping"),
    "stopped": (INFO, "stopped"),
    "session-started": (VERBOSE, "a session started"),
    "session-ended": (VERBOSE, "a session ended"),
    "sessions": (VERBOSE, "sessions active"),
    "under-load": (VERBOSE, "handshake load high: cookies required"),
    "drops": (DEBUG, "packets dropped since the last report"),
    "handshaking": (VERBOSE, "handshaking with the server"),    # vpnclient prints its own progress lines (issue 6)
    "connected": (VERBOSE, "connected"),    # vpnclient prints its own progress lines (issue 6)
    "reconnecting": (INFO, "no answer from the server: reconnecting"),
    "server-closed": (INFO, "the server closed the session"),
    "config-applied": (VERBOSE, "tunnel configuration applied"),    # vpnclient prints its own progress lines (issue 6)
    "harden-warning": (QUIET, "hardening incomplete: see the line above"),
    "stats": (DEBUG, "statistics"),
    "registry-lost": (QUIET, "the accounts registry cannot be reached: serving with what it last read, retrying"),
    "registry-back": (QUIET, "the accounts registry is reachable again: changes made meanwhile applied"),
}


class Log:
    def __init__(self, prog: str, level: int = INFO, stream=None):
        self.prog = prog
        self.level = level
        self.stream = stream if stream is not None else sys.stderr

    def event(self, name: str, **counts: int) -> None:
        level, sentence = EVENTS[name]
        if level > self.level:
            return
        for key, value in counts.items():
            if type(value) is not int:
                raise TypeError(f"log event {name!r}: {key} must be an int")
        tail = "".join(f" {k}={v}" for k, v in sorted(counts.items()))
        print(f"{self.prog}: {sentence}{tail}", file=self.stream, flush=True)


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
    """Print an unexpected exception as a scrubbed traceback (never the raw one)."""
    text = "".join(traceback.format_exception(exc))
    print(f"{prog}: internal error (please report it):\n{scrub(text)}", file=stream or sys.stderr, flush=True)
