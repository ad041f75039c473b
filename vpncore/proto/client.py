"""The initiator's state machine: one client's connection to one server (SPEC §8).

    conn = ClientConnection(private_key=..., server_public=..., rng=os.urandom, wall_offset=...)
    conn.connect(now)
    for dg in conn.datagrams_to_send(): sock.send(dg)
    packet = conn.receive_datagram(dg, now)        # an IP packet, or None
    dg = conn.encrypt(packet, now)                 # hot path: a datagram, or None
    conn.handle_timer(now) when now >= conn.get_timer()
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Callable

from . import control
from .constants import (
    VNET_HDR_LEN, DEAD_PEER_TIMEOUT, FEATURE_PARITY, FEATURE_SUPERPACKET, KEEPALIVE_TIMEOUT, KIND_CONTROL, KIND_DATA, KIND_SUPER,
    MSG_COOKIE_REPLY, MSG_RESPONSE, MSG_TRANSPORT, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME,
    REKEY_TIMEOUT, LOSS_REPORT_EARLY, LOSS_REPORT_INTERVAL, HELLO_RETRY_TIMEOUT,
)
from .cookie import CookieChecker, CookieGenerator
from .errors import BadPacket
from .events import ControlReceived, HandshakeCompleted, LossReported, ServerClosed
from .handshake import consume_response, create_initiation
from .noise import public_key
from .gso import ZERO_VNET_HDR
from .session import ip_packet_length, pad, strip_padding as _strip
from .superpacket import open_whole, parse_fragment, receive_fragment, seal_read, train_items
from .wire import unpack_transport_header_untrusted

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
        self.peer_super = False         # the server advertised super-packets in its config
        self.peer_parity = False        # ... and parity fragments
        self.parity = False             # the embedding's choice: add parity (under loss, §5.5)
        self.persistent_keepalive = persistent_keepalive
        self._macs = CookieGenerator(self.server_public)
        self._checker = CookieChecker(self.public, rng)
        self.state = IDLE
        self.current = self.previous = self.pending = None
        self._last_initiation = None
        self._cookie_retried = False    # the one immediate retry after a cookie reply was sent
        self._hello_at = None           # hello sent on the current keypair and no config yet: when
        self._out: deque[bytes] = deque()
        self._events: deque = deque()
        self.last_handshake = None      # monotonic time of the last completed handshake
        self.last_rx = self.last_tx = None
        self._unanswered_since = None   # first data sent after the last authenticated receive
        self._data_rx_since = None      # first data received since our last send (passive keepalive)
        self._last_loss_report = 0.0
        self.rx_bytes = self.tx_bytes = 0
        self.drops: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<ClientConnection {self.state}>"

    def __reduce__(self):
        raise TypeError("session state is memory-only")

    def _transition(self, what: str) -> None:
        self.state = TRANSITIONS[(self.state, what)]

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
        if self.previous is not None:
            self.previous.wipe()
        self.previous, self.current = self.current, kp
        self.last_handshake = self.last_rx = now
        self._unanswered_since = None
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
                return self._receive_transport(dg, now)
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

    def _keypair_for(self, index: int):
        for kp in (self.current, self.previous):
            if kp is not None and kp.local_index == index:
                return kp
        raise BadPacket("index")

    def _receive_transport(self, dg: bytes, now: float) -> bytes | None:
        kind, index, counter = unpack_transport_header_untrusted(dg)
        if kind == KIND_SUPER:
            return self._receive_super(dg, now)
        plain = self._keypair_for(index).open(dg, counter)
        self.last_rx = now
        self._unanswered_since = None
        self.rx_bytes += len(dg)
        if kind == KIND_DATA:
            if not plain:
                return None  # keepalive
            n = ip_packet_length(plain)
            if n <= 0:
                raise BadPacket("inner-length")
            if self._data_rx_since is None:
                self._data_rx_since = now
            return ZERO_VNET_HDR + plain[:n] if self.vnet_hdr else plain[:n]
        if kind == KIND_CONTROL:
            self._receive_control(control.decode_untrusted(plain), now)
            return None
        raise BadPacket("kind")

    def _receive_super(self, dg: bytes, now: float) -> bytes | None:
        if not self.vnet_hdr:
            raise BadPacket("superpacket-unsupported")
        no, n, index, counter = parse_fragment(dg)
        kp = self._keypair_for(index)
        lost = kp.super_lost
        plain = receive_fragment(kp, dg, no, n, counter)
        if kp.super_lost != lost and now - self._last_loss_report >= LOSS_REPORT_EARLY:
            self._report_loss(now)      # tell the sender at once: it shrinks its super-packets
        if plain is None:
            return None
        return self._super_delivered(plain, now)

    def receive_train(self, buf: bytes, seg: int, now: float) -> list:
        """A UDP GRO train from the server (datagrams of `seg` bytes, the last maybe shorter): the IP
        packets for the TUN, as receive_datagram gives them one by one. Whole super-packets in it
        are taken in one step (superpacket.whole_in_train)."""
        out = []
        for dg, whole in train_items(buf, seg, self.vnet_hdr):
            if whole is None:
                got = self.receive_datagram(dg, now)
                if got is not None:
                    out.append(got)
                continue
            try:
                out.append(self._super_delivered(open_whole(self._keypair_for(whole[0]), dg, whole[1], whole[2]), now))
            except BadPacket as exc:
                self.drops[exc.reason] += 1
        return out

    def _super_delivered(self, plain: bytes, now: float) -> bytes:
        self.rx_bytes += len(plain)
        self.last_rx = now
        self._unanswered_since = None
        if self._data_rx_since is None:
            self._data_rx_since = now
        size = ip_packet_length(plain, VNET_HDR_LEN)
        if size <= 0:
            raise BadPacket("inner-length")
        return _strip(plain, VNET_HDR_LEN + size)

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
            self.peer_super = FEATURE_SUPERPACKET in msg.get("features", ())
            self.peer_parity = FEATURE_PARITY in msg.get("features", ())
            self._hello_at = None
            self._events.append(ControlReceived(msg))

    def _report_loss(self, now: float) -> None:
        self._last_loss_report = now
        done, lost, repaired = control.take_loss((self.current, self.previous))
        if done or lost:
            self.send_control(control.loss(done, lost, repaired), now)

    def encrypt(self, packet: bytes, now: float) -> bytes | None:
        """Hot path: one IP packet to one datagram, or None (no session yet: dropped and counted)."""
        kp = self.current
        if kp is None:
            self.drops["no-session"] += 1
            return None
        dg = kp.seal(KIND_DATA, pad(packet))
        self.last_tx = now
        self._data_rx_since = None
        if self._unanswered_since is None:
            self._unanswered_since = now
        self.tx_bytes += len(dg)
        return dg

    def encrypt_frames(self, data: bytes, now: float, chunk: int) -> list[bytes]:
        """Hot path with vnet_hdr: one TUN read (virtio_net_hdr + packet) to its datagrams.

        A GSO super-packet to a server that takes them: one AEAD, fragments of `chunk` bytes (§5.5).
        Otherwise (a single packet, or a server without offloads): checksum finished and segmented
        in software, one kind-0 datagram per packet (§5.6).
        """
        kp = self.current
        if kp is None:
            self.drops["no-session"] += 1
            return []
        frames = seal_read(kp, data, chunk, self.peer_super, self.parity and self.peer_parity)
        self.last_tx = now
        self._data_rx_since = None
        if self._unanswered_since is None:
            self._unanswered_since = now
        self.tx_bytes += sum(map(len, frames))
        return frames

    def send_packet(self, packet: bytes, now: float) -> None:
        dg = self.encrypt(packet, now)
        if dg is not None:
            self._out.append(dg)

    def send_control(self, msg: dict, now: float) -> None:
        if self.current is None:
            return
        dg = self.current.seal(KIND_CONTROL, control.encode(msg))
        self.last_tx = now
        self._data_rx_since = None
        self.tx_bytes += len(dg)
        self._out.append(dg)

    def _send_keepalive(self, now: float) -> None:
        dg = self.current.seal(KIND_DATA, b"")
        self.last_tx = now
        self._data_rx_since = None
        self.tx_bytes += len(dg)
        self._out.append(dg)

    # --- timers --------------------------------------------------------------
    def get_timer(self) -> float | None:
        """The earliest time handle_timer has something to do, or None."""
        if self.state in (IDLE, CLOSED):
            return None
        t = [kp.created + REJECT_AFTER_TIME for kp in (self.current, self.previous) if kp is not None]
        if self._hello_at is not None and self.current is not None:
            t.append(self._hello_at + HELLO_RETRY_TIMEOUT)
        if self.pending is not None or self.current is None:
            # while a handshake is pending, handle_timer only retransmits and expires keys
            t.append((self._last_initiation or 0) + REKEY_TIMEOUT)
            return min(t)
        if self.current is not None:
            t.append(self.current.created + REKEY_AFTER_TIME)
            if self._unanswered_since is not None:
                t.append(self._unanswered_since + DEAD_PEER_TIMEOUT)
            if self._data_rx_since is not None:
                t.append(self._data_rx_since + KEEPALIVE_TIMEOUT)
            if self.persistent_keepalive:
                t.append((self.last_tx or 0) + self.persistent_keepalive)
        return min(t)

    def handle_timer(self, now: float) -> None:
        if self.state in (IDLE, CLOSED):
            return
        if self.current is not None and now - self._last_loss_report >= LOSS_REPORT_INTERVAL:
            self._report_loss(now)
        if self.previous is not None and now - self.previous.created >= REJECT_AFTER_TIME:
            self.previous.wipe()
            self.previous = None
        cur = self.current
        if cur is not None and now - cur.created >= REJECT_AFTER_TIME:
            cur.wipe()
            self.current = cur = None
            self._transition("expired")
        if cur is not None and self._hello_at is not None and now - self._hello_at >= HELLO_RETRY_TIMEOUT:
            self._send_hello(now)
        if self.pending is not None or cur is None:
            if now - (self._last_initiation or 0) >= REKEY_TIMEOUT:
                self._send_initiation(now)
            return
        if now - cur.created >= REKEY_AFTER_TIME or cur.send_counter >= REKEY_AFTER_MESSAGES:
            self._send_initiation(now)
        elif self._unanswered_since is not None and now - self._unanswered_since >= DEAD_PEER_TIMEOUT:
            self._unanswered_since = None
            self._send_initiation(now)
        if self._data_rx_since is not None and now - self._data_rx_since >= KEEPALIVE_TIMEOUT:
            self._send_keepalive(now)
        elif self.persistent_keepalive and now - (self.last_tx or 0) >= self.persistent_keepalive:
            self._send_keepalive(now)

    # --- teardown --------------------------------------------------------------
    def _drop_keypairs(self) -> None:
        for kp in (self.current, self.previous):
            if kp is not None:
                kp.wipe()
        self.current = self.previous = None
        self._hello_at = None
        if self.pending is not None:
            self.pending.noise.wipe()
            self.pending = None

    def close(self, now: float, reason: str = "client disconnected") -> None:
        """Tell the server (if a session exists), then forget all keys."""
        if self.current is not None:
            self.send_control(control.close(reason), now)
        self._drop_keypairs()
        self._private[:] = bytes(32)
        self._transition("close")
