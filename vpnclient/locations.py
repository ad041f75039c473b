"""Locations: choosing a server, measuring handshake round trips, and failing over (issue 6).

- `select(servers, location)`: the servers to use, in failover order (`up --location CODE` keeps to
  that location: failing over to another country is not what someone who chose one wants).
- `resolve(servers, cache)`: each endpoint to an address, once, before the kill switch goes up; a
  name that does not resolve falls back to the address the previous run saw (its kill switch may
  still block DNS).
- `measure(targets, make_conn)`: `up --fastest`. A real handshake with every server at once through
  the sans-IO `ClientConnection`, bounded by `MEASURE_TIMEOUT`; the round trip is initiation sent to
  response processed. The fastest server's connection is kept (it is established: the client
  starts on it without a second handshake); the others are closed at once, so their servers forget
  this client immediately.
- `Failover`: a sans-IO policy, ticked by the client with the connection's state and the time of
  the last authenticated packet from the server. With more than one server it probes a silent server
  (a `hello` on the current keypair, which vpnd answers with the session's `config`: a cheap
  authenticated round trip) after `PROBE_AFTER` seconds of silence, every `PROBE_EVERY` seconds, and
  switches to the next server when the current one stays silent `DEAD_AFTER` seconds, has not
  completed a handshake `HANDSHAKE_GIVEUP` seconds after we turned to it, or closed the session.
  Worst case from the last packet of a dead server to the first handshake with the next one:
  DEAD_AFTER + one tick + one round trip, inside the 10 s the issue allows. The kill switch allows
  every configured endpoint, so it holds, unchanged, throughout.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass

import trio

from vpncore.net.udp import SO_MARK, open_connected
from vpncore.proto.events import HandshakeCompleted
from vpncore.cli import UserError

from .config import ServerEntry

MEASURE_TIMEOUT = 2.0
PROBE_AFTER = 3.0
PROBE_EVERY = 1.0
DEAD_AFTER = 6.0
HANDSHAKE_GIVEUP = 6.0
NOTICE_AFTER = 10.0         # no handshake for this long (any number of servers): say so, once per server
PROBE, SWITCH, NOTICE = "probe", "switch", "notice"


@dataclass
class Target:
    """A server with its endpoint resolved (an address, never a name)."""

    server: ServerEntry
    host: str
    port: int
    rtt: float | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def label(self) -> str:
        loc = f" ({self.server.location})" if self.server.location else ""
        return f"{self.server.name}{loc}"

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def select(servers: list[ServerEntry], location: str | None) -> list[ServerEntry]:
    if location is None:
        return list(servers)
    chosen = [s for s in servers if s.location.lower() == location.lower()]
    if not chosen:
        known = sorted({s.location for s in servers if s.location})
        raise UserError(f"no server in location {location!r}; "
                        f"{'choose one of ' + ', '.join(known) if known else 'the config names no locations'} "
                        f"(see 'vpnclient locations')")
    return chosen


def resolve(servers: list[ServerEntry], cache: dict, out) -> tuple[list[Target], dict]:
    """Targets for the servers that resolve (or have a cached address), and the new cache."""
    targets, new_cache = [], {}
    for s in servers:
        try:
            infos = socket.getaddrinfo(s.host, s.port, type=socket.SOCK_DGRAM)
            host = infos[0][4][0]
        except (socket.gaierror, UnicodeError, OSError) as exc:
            cached = cache.get(s.endpoint)
            if not cached:
                out(f"vpnclient: cannot resolve {s.name}'s endpoint {s.host} "
                    f"({getattr(exc, 'strerror', None) or exc}); skipping it")
                continue
            host = cached[0]
            out(f"vpnclient: cannot resolve {s.host} now; using {s.name}'s last known address")
        targets.append(Target(s, host, s.port))
        new_cache[s.endpoint] = [host]
    if not targets:
        raise UserError("cannot resolve any server endpoint; check the network and 'endpoint' in the config "
                        "(or use IP addresses)", 1)
    return targets, new_cache


# --- up --fastest -------------------------------------------------------------------------------

async def _handshake(target: Target, make_conn, results: dict, mark: int) -> None:
    sock, _ = open_connected(target.host, target.port, mark)
    conn = make_conn(target.server)
    results[target.server.name] = (None, conn, sock)
    start = time.monotonic()
    conn.connect(start)
    try:
        for dg in conn.datagrams_to_send():
            sock.send(dg)
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                dg = sock.recv(65535)
            except BlockingIOError:
                continue
            now = time.monotonic()
            conn.receive_datagram(dg, now)
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, HandshakeCompleted):
                    results[target.server.name] = (now - start, conn, sock)
                    return
    except OSError:
        return          # refused (ICMP port unreachable): no server there; counts as no answer


async def measure(targets: list[Target], make_conn, timeout: float = MEASURE_TIMEOUT, mark: int = 0):
    """Handshake with every target at once; returns (targets sorted by round trip, the fastest's
    established connection or None). Unanswered targets keep their order, after the others.
    `mark`: SO_MARK of the probe sockets (the full tunnel's exemption, routing.py)."""
    results: dict = {}
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for t in targets:
                nursery.start_soon(_handshake, t, make_conn, results, mark)
    for t in targets:
        t.rtt = results.get(t.server.name, (None,))[0]
    ordered = sorted(targets, key=lambda t: math.inf if t.rtt is None else t.rtt)
    best = ordered[0] if ordered and ordered[0].rtt is not None else None
    now = time.monotonic()
    keep = None
    for t in targets:
        _, conn, sock = results.get(t.server.name, (None, None, None))
        if conn is None:
            continue
        if t is best:
            keep = conn                   # its hello waits in the queue: the client sends it
        else:
            conn.datagrams_to_send()      # drop the queued hello
            conn.close(now, "client chose another server")
            try:
                for dg in conn.datagrams_to_send():
                    sock.send(dg)
            except OSError:
                pass
        sock.close()
    return ordered, keep


def format_rtts(targets: list[Target]) -> list[str]:
    return [f"vpnclient:   {t.label:<24} {t.endpoint:<28} "
            f"{'no answer' if t.rtt is None else f'{t.rtt * 1000:.1f} ms'}" for t in targets]


# --- failover --------------------------------------------------------------------------------------

class Failover:
    """When to probe the current server and when to move to the next (see the module docstring)."""

    def __init__(self, count: int, now: float):
        self.count = count
        self.index = 0
        self.since = now            # when we turned to the current server
        self.last_probe = -math.inf
        self.closed = False
        self.switches = 0
        self.noticed = False

    @property
    def enabled(self) -> bool:
        return self.count > 1

    def server_closed(self) -> None:
        self.closed = True

    def decide(self, established: bool, last_rx: float | None, now: float) -> str | None:
        """PROBE, SWITCH, NOTICE or None for this tick."""
        if not established and last_rx is None and not self.noticed and now - self.since >= NOTICE_AFTER:
            self.noticed = True
            return NOTICE
        if not self.enabled:
            return None
        if self.closed:
            return SWITCH
        heard = self.since if last_rx is None else max(last_rx, self.since)
        if not established:
            return SWITCH if now - heard >= HANDSHAKE_GIVEUP else None
        silence = now - heard
        if silence >= DEAD_AFTER:
            return SWITCH
        if silence >= PROBE_AFTER and now - self.last_probe >= PROBE_EVERY:
            self.last_probe = now
            return PROBE
        return None

    def switched(self, now: float) -> int:
        """Move to the next server; returns its index."""
        self.index = (self.index + 1) % self.count
        self.since = now
        self.last_probe = -math.inf
        self.closed = False
        self.noticed = False
        self.switches += 1
        return self.index


def open_socket(target: Target, out, mark: int = 0) -> tuple[socket.socket, tuple]:
    """A connected socket to `target` (SO_MARK `mark`); when the network has no route to it right now,
    an unconnected placeholder (sends fail and are counted, so the policy moves on after HANDSHAKE_GIVEUP)."""
    try:
        return open_connected(target.host, target.port, mark)
    except UserError as exc:
        out(f"vpnclient: {target.label}: {exc}")
        sock = socket.socket(socket.AF_INET6 if ":" in target.host else socket.AF_INET, socket.SOCK_DGRAM)
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setblocking(False)
        return sock, target.address
