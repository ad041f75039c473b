"""Sliding replay window over transport counters (SPEC §5.4).

The window is a Python int used as a bitmap: bit i set means counter
(top - 1 - i) was accepted. `check` is the cheap pre-check done before the AEAD
tag is verified; `update` records a counter and must be called only after the
tag verified, so forged packets can never move the window.
"""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW

_MASK = (1 << REPLAY_WINDOW) - 1


class ReplayWindow:
    """`size` counters below the highest accepted are remembered (REPLAY_WINDOW unless told)."""

    __slots__ = ("top", "bits", "size", "_mask")

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.top = 0    # one past the highest counter accepted so far
        self.bits = 0
        self.size = size
        self._mask = _MASK if size == REPLAY_WINDOW else (1 << size) - 1

    def check(self, counter: int) -> bool:
        """True if `counter` could be accepted (not too old, not seen); changes nothing."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter >= self.top:
            return True
        off = self.top - 1 - counter
        return off < self.size and not (self.bits >> off) & 1

    def update(self, counter: int) -> bool:
        """Record `counter`; False (and nothing recorded) if it is a replay or too old."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        top = self.top
        if counter >= top:
            shift = counter - top + 1
            self.bits = ((self.bits << shift) | 1) & self._mask if shift < self.size else 1
            self.top = counter + 1
            return True
        off = top - 1 - counter
        if off >= self.size:
            return False
        bit = 1 << off
        if self.bits & bit:
            return False
        self.bits |= bit
        return True
