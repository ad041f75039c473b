"""The initiator's state machine: one client's connection to one server (SPEC §8).

    conn = ClientConnection(private_key=..., server_public=..., rng=os.urandom, wall_offset=...)
    conn.connect(now)
    for dg in conn.datagrams_to_send(): sock.send(dg)
    packet = conn.receive_datagram(dg, now)        # an IP packet, or None
    dg = conn.encrypt(packet, now)                 # hot path: a datagram, or None
    conn.handle_timer(now) when now >= conn.get_timer()
    conn.statistics()                              # frozen totals: bytes, drops

The transport half (sealing, opening, super-packets, loss reports, counters) is the connection's
Tunnel (tunnel.py); this module is the initiator: handshakes, timers, hello/config, close.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from . import control
from .constants import (
    DEAD_PEER_TIMEOUT, FEATURE_PARITY, FEATURE_SUPERPACKET, KEEPALIVE_TIMEOUT, MSG_COOKIE_REPLY, MSG_RESPONSE,
    MSG_TRANSPORT, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, REKEY_TIMEOUT, LOSS_REPORT_INTERVAL,
    HELLO_RETRY_TIMEOUT,
)
from .cookie import CookieChecker, CookieGenerator
from .errors import BadPacket
from .events import ControlReceived, HandshakeCompleted, LossReported, ServerClosed
from .handshake import consume_response, create_initiation
from .noise import public_key
from .superpacket import train_items
from .tunnel import Counters, Statistics, Tunnel

IDLE, HANDSHAKING, ESTABLISHED, CLOSED = "idle", "handshaking", "established", "closed"

# One table owns the state transitions (SPEC §8.1).
TRANSITIONS = {
    (IDLE, "connect"): HANDSHAKING,
    (HANDSHAKING, "response"): ESTABLISHED,
    (ESTABLISHED, "response"): ESTABLISHED,        # rekey or reconnect completed
    (ESTABLISHED, "expired"): HANDSHAKING,         # current keypair reached REJECT_AFTER_TIME
    (ESTABLISHED, "server-close"): HANDSHAKING,    # server went away: keep trying
    (HANDSHAKING, "server-close"): HANDSHAKING,
    (IDLE, "close"): CLOSED,
    (HANDSHAKING, "close"): CLOSED,
    (ESTABLISHED, "close"): CLOSED,
}


class ClientConnection:
    """The initiator's side of one session with one server (SPEC §8.1, §8.3): the handshake and its
    retransmission, rekeying, dead-peer detection and keepalives, hello/config, close; the
    transport itself is `self.tunnel` (one Tunnel for the connection's life, across rekeys).
    Sans-IO: bytes and `now` in, datagrams and events out; memory-only (never pickled)."""

    def __init__(self, *, private_key: bytes, server_public: bytes, rng: Callable[[int], bytes],
                 psk: bytes | None = None, wall_offset: float = 0.0, features=(), persistent_keepalive: float = 0,
                 vnet_hdr: bool = False):
        self._private = bytearray(private_key)
        self.public = public_key(self._private)
        self.server_public = bytes(server_public)
        self._psk = psk
        self._rng = rng
        self._wall_offset = wall_offset
        self.features = list(features)
        # vnet_hdr: our TUN carries virtio_net_hdr; we take super-packets and return framed packets
        self.vnet_hdr = vnet_hdr
        if vnet_hdr:
            self.features += [f for f in (FEATURE_SUPERPACKET, FEATURE_PARITY) if f not in self.features]
        self.persistent_keepalive = persistent_keepalive
        self._macs = CookieGenerator(self.server_public)
        self._checker = CookieChecker(self.public, rng)
        self.state = IDLE
        self.pending = None
        self._last_initiation = None
        self._cookie_retried = False    # the one immediate retry after a cookie reply was sent
        self._hello_at = None           # hello sent on the current keypair and no config yet: when
        self._out: deque[bytes] = deque()
        self._events: deque = deque()
        self.last_handshake = None      # monotonic time of the last completed handshake
        self._counters = Counters()
        self.drops = self._counters.drops
        self.tunnel = Tunnel(vnet_hdr=vnet_hdr, counters=self._counters, send=self._out.append,
                             control=self._receive_control)

    def __repr__(self) -> str:
        return f"<ClientConnection {self.state}>"

    def __reduce__(self):
        raise TypeError("session state is memory-only")

    def _transition(self, what: str) -> None:
        self.state = TRANSITIONS[(self.state, what)]

    # --- the tunnel's state, as attributes (read by the embedding and tests) ----------------------
    current = property(lambda self: self.tunnel.current, doc="the keypair sealed with (or None)")
    previous = property(lambda self: self.tunnel.previous, doc="the keypair before the last rekey")
    last_rx = property(lambda self: self.tunnel.last_rx, doc="time of the last authenticated receive")
    last_tx = property(lambda self: self.tunnel.last_tx, doc="time of the last transport message sent")
    rx_bytes = property(lambda self: self._counters.rx_bytes, doc="transport bytes received (tunnel.py)")
    tx_bytes = property(lambda self: self._counters.tx_bytes, doc="transport bytes sent (tunnel.py)")

    @property
    def parity(self) -> bool:
        """The embedding's choice: add parity fragments to super-packets (under loss, §5.5)."""
        return self.tunnel.add_parity

    @parity.setter
    def parity(self, on: bool) -> None:
        self.tunnel.add_parity = on

    @property
    def peer_super(self) -> bool:
        """The server's config listed super-packets (and our TUN carries virtio_net_hdr)."""
        return self.tunnel.peer_takes_super

    @peer_super.setter
    def peer_super(self, on: bool) -> None:
        self.tunnel.peer_takes_super = on

    @property
    def peer_parity(self) -> bool:
        """... and parity fragments."""
        return self.tunnel.peer_takes_parity

    @peer_parity.setter
    def peer_parity(self, on: bool) -> None:
        self.tunnel.peer_takes_parity = on

    def statistics(self) -> Statistics:
        """Frozen totals for this connection (never reset): transport bytes and drops by reason."""
        return self._counters.snapshot()

    # --- outputs --------------------------------------------------------------
    def datagrams_to_send(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    # --- handshake --------------------------------------------------------------
    def connect(self, now: float) -> None:
        self._transition("connect")
        self._send_initiation(now)

    def _send_initiation(self, now: float, cookie_retry: bool = False) -> None:
        self._cookie_retried = cookie_retry
        if self.pending is not None:
            self.pending.noise.wipe()
        index = int.from_bytes(self._rng(4), "little")
        msg, self.pending = create_initiation(
            static_private=self._private, remote_static=self.server_public, psk=self._psk,
            ephemeral=self._rng(32), index=index, wall_time=now + self._wall_offset, now=now, macs=self._macs)
        self._last_initiation = now
        self._out.append(msg)

    def _receive_response(self, dg: bytes, now: float) -> None:
        if self.pending is None:
            raise BadPacket("unexpected-response")
        kp = consume_response(dg, self.pending, checker=self._checker, now=now)
        self.pending = None
        self.tunnel.use(kp)
        self.last_handshake = self.tunnel.last_rx = now
        self.tunnel.unanswered_since = None
        self._transition("response")
        self._events.append(HandshakeCompleted())
        # the first transport message confirms the keypair to the responder; it is sent again every
        # HELLO_RETRY_TIMEOUT until a config arrives (a lost hello would leave us without addresses)
        self._send_hello(now)

    def _send_hello(self, now: float) -> None:
        self._hello_at = now
        self.send_control(control.hello(self.features), now)

    # --- transport ---------------------------------------------------------------
    def receive_datagram(self, dg: bytes, now: float) -> bytes | None:
        """Process one datagram from the server; returns an IP packet for the TUN, or None."""
        try:
            t = dg[0] if dg else 0
            if t == MSG_TRANSPORT:
                return self.tunnel.open_untrusted(dg, now)
            if self.state == CLOSED:
                raise BadPacket("closed")
            if t == MSG_RESPONSE:
                self._receive_response(dg, now)
            elif t == MSG_COOKIE_REPLY:
                if self.pending is None:
                    raise BadPacket("cookie-unexpected")
                self._macs.consume_reply(dg, now, self.pending.index)
                # the server is under load and dropped our initiation: send it again at once with
                # mac2 (once per retransmission interval, so a stream of replies cannot make us loop)
                if not self._cookie_retried:
                    self._send_initiation(now, cookie_retry=True)
            else:
                raise BadPacket("type")
        except BadPacket as exc:
            self.drops[exc.reason] += 1
        return None

    def receive_train(self, buf: bytes, seg: int, now: float) -> list:
        """A UDP GRO train from the server (datagrams of `seg` bytes, the last maybe shorter): the IP
        packets for the TUN, as receive_datagram gives them one by one. Whole super-packets in it
        are taken in one step (superpacket.whole_in_train)."""
        out = []
        for dg, whole in train_items(buf, seg, self.vnet_hdr):
            if whole is None:
                got = self.receive_datagram(dg, now)
            else:
                try:
                    got = self.tunnel.open_whole(dg, whole, now)
                except BadPacket as exc:
                    self.drops[exc.reason] += 1
                    continue
            if got is not None:
                out.append(got)
        return out

    def _receive_control(self, msg: dict, now: float) -> None:
        if msg["type"] == "close":
            self._drop_keypairs()
            self._transition("server-close")
            self._last_initiation = now  # first retry after REKEY_TIMEOUT
            self._events.append(ServerClosed(msg["reason"], msg.get("retry", True)))
        elif msg["type"] == "loss":
            self._events.append(LossReported(msg["done"], msg["lost"], None, msg.get("repaired", 0)))
        else:
            if msg["type"] != "config":       # hello is for servers
                raise BadPacket("control-direction")
            features = msg.get("features", ())
            self.tunnel.peer_takes_super = FEATURE_SUPERPACKET in features
            self.tunnel.peer_takes_parity = FEATURE_PARITY in features
            self._hello_at = None
            self._events.append(ControlReceived(msg))

    def encrypt(self, packet: bytes, now: float) -> bytes | None:
        """Hot path: one IP packet to one datagram, or None (no session yet: dropped and counted)."""
        return self.tunnel.seal_packet(packet, now)

    def encrypt_frames(self, data: bytes, now: float, chunk: int) -> list[bytes]:
        """Hot path with vnet_hdr: one TUN read (virtio_net_hdr + packet) to its datagrams
        (Tunnel.seal_read: super-packet fragments and parity, or kind-0 segments)."""
        return self.tunnel.seal_read(data, now, chunk)

    def send_packet(self, packet: bytes, now: float) -> None:
        dg = self.tunnel.seal_packet(packet, now)
        if dg is not None:
            self._out.append(dg)

    def send_control(self, msg: dict, now: float) -> None:
        dg = self.tunnel.seal_control(msg, now)
        if dg is not None:
            self._out.append(dg)

    def _send_keepalive(self, now: float) -> None:
        dg = self.tunnel.seal_keepalive(now)
        if dg is not None:
            self._out.append(dg)

    # --- timers --------------------------------------------------------------
    def get_timer(self) -> float | None:
        """The earliest time handle_timer has something to do, or None."""
        if self.state in (IDLE, CLOSED):
            return None
        tun = self.tunnel
        cur = tun.current
        t = [kp.created + REJECT_AFTER_TIME for kp in (cur, tun.previous) if kp is not None]
        if self._hello_at is not None and cur is not None:
            t.append(self._hello_at + HELLO_RETRY_TIMEOUT)
        if self.pending is not None or cur is None:
            # while a handshake is pending, handle_timer only retransmits and expires keys
            t.append((self._last_initiation or 0) + REKEY_TIMEOUT)
            return min(t)
        t.append(cur.created + REKEY_AFTER_TIME)
        if tun.unanswered_since is not None:
            t.append(tun.unanswered_since + DEAD_PEER_TIMEOUT)
        if tun.data_rx_since is not None:
            t.append(tun.data_rx_since + KEEPALIVE_TIMEOUT)
        if self.persistent_keepalive:
            t.append((tun.last_tx or 0) + self.persistent_keepalive)
        return min(t)

    def handle_timer(self, now: float) -> None:
        if self.state in (IDLE, CLOSED):
            return
        tun = self.tunnel
        if tun.current is not None and now - tun.loss_at >= LOSS_REPORT_INTERVAL:
            tun.report_loss(now)
        cur = tun.current
        if cur is not None and cur in tun.expire(now, REJECT_AFTER_TIME):
            cur = None
            self._transition("expired")
        if cur is not None and self._hello_at is not None and now - self._hello_at >= HELLO_RETRY_TIMEOUT:
            self._send_hello(now)
        if self.pending is not None or cur is None:
            if now - (self._last_initiation or 0) >= REKEY_TIMEOUT:
                self._send_initiation(now)
            return
        if now - cur.created >= REKEY_AFTER_TIME or cur.send_counter >= REKEY_AFTER_MESSAGES:
            self._send_initiation(now)
        elif tun.unanswered_since is not None and now - tun.unanswered_since >= DEAD_PEER_TIMEOUT:
            tun.unanswered_since = None
            self._send_initiation(now)
        if tun.keepalive_due(now):
            self._send_keepalive(now)
        elif self.persistent_keepalive and now - (tun.last_tx or 0) >= self.persistent_keepalive:
            self._send_keepalive(now)

    # --- teardown --------------------------------------------------------------
    def _drop_keypairs(self) -> None:
        self.tunnel.wipe()
        self._hello_at = None
        if self.pending is not None:
            self.pending.noise.wipe()
            self.pending = None

    def close(self, now: float, reason: str = "client disconnected") -> None:
        """Tell the server (if a session exists), then forget all keys."""
        if self.tunnel.current is not None:
            self.send_control(control.close(reason), now)
        self._drop_keypairs()
        self._private[:] = bytes(32)
        self._transition("close")
