"""Events the sans-IO core hands to its caller (SPEC §8). Never created per data packet."""

from __future__ import annotations


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        return type(self).__name__


class HandshakeCompleted(Event):
    """Client: a new keypair is in use (first connect, rekey or reconnect)."""
    __slots__ = ()


class ControlReceived(Event):
    """A verified control message; `peer` is None on the client."""
    __slots__ = ("msg", "peer")

    def __init__(self, msg: dict, peer=None):
        self.msg, self.peer = msg, peer


class SessionStarted(Event):
    """Server: a peer confirmed its first keypair; its session begins."""
    __slots__ = ("peer",)

    def __init__(self, peer):
        self.peer = peer


class SessionEnded(Event):
    """Server: a peer's session is over (closed, expired, replaced); its state is gone."""
    __slots__ = ("peer", "reason")

    def __init__(self, peer, reason: str):
        self.peer, self.reason = peer, reason


class LossReported(Event):
    """The peer reported how many of our super-packets it completed (`repaired` of them from parity)
    and lost (§6.3 `loss`)."""
    __slots__ = ("done", "lost", "repaired", "peer")

    def __init__(self, done: int, lost: int, peer=None, repaired: int = 0):
        self.done, self.lost, self.peer, self.repaired = done, lost, peer, repaired


class ServerClosed(Event):
    """Client: the server closed the session with a reason; `retry` False means do not reconnect
    (refused by policy: device limit, suspended account)."""
    __slots__ = ("reason", "retry")

    def __init__(self, reason: str, retry: bool = True):
        self.reason, self.retry = reason, retry
