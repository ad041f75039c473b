"""The one logging path of vpnd and vpnclient (DESIGN §4).

An event is a name from EVENTS (a fixed sentence) plus integer counts. There is
no way to pass free text, an address, a port, a key or a timestamp: values must
be ints, and the line carries no time at all. Where code would want to log a
detail about one connection, it counts instead.
"""

from __future__ import annotations

import sys

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
    "handshaking": (INFO, "handshaking with the server"),
    "connected": (INFO, "connected"),
    "reconnecting": (INFO, "no answer from the server: reconnecting"),
    "server-closed": (INFO, "the server closed the session"),
    "config-applied": (INFO, "tunnel configuration applied"),
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
