"""Errors a user can cause, and the one way they end a program (DESIGN §6).

A `UserError` carries one sentence: what is wrong and how to fix it. The console
entry points catch it, print that line to stderr and exit with status 2 (usage
and configuration) or 1 (runtime), never with a traceback.
"""

from __future__ import annotations

import sys

from .log import ERR, journal_prefix


class UserError(Exception):
    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def run_cli(main, argv=None, prog: str = "") -> int:
    """Run `main(argv)`; a UserError becomes one line on stderr and its exit status."""
    try:
        return main(argv) or 0
    except UserError as exc:
        print(f"{journal_prefix(sys.stderr, ERR)}{prog}: error: {exc}", file=sys.stderr)
        return exc.status
    except BaseExceptionGroup as group:  # raised from inside a Trio nursery
        match, _ = group.split(UserError)
        if match is None:
            from .log import report_crash
            report_crash(prog, group)
            return 70
        exc = _first_leaf(match)
        print(f"{journal_prefix(sys.stderr, ERR)}{prog}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except Exception as exc:   # a bug: show it, but scrubbed of addresses, keys and times
        from .log import report_crash
        report_crash(prog, exc)
        return 70


def _first_leaf(exc):
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
