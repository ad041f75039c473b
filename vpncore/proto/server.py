"""The responder's state machine: many peers, found by session index (SPEC §8.2).

    srv = ServerProtocol(private_key=..., rng=os.urandom)
    srv.authorize(client_public)
    result = srv.receive_datagram(dg, src, now)    # (peer, ip_packet) or None
    dg = srv.encrypt(peer, packet, now)            # hot path
    for endpoint, dg in srv.datagrams_to_send(): sock.sendto(dg, endpoint)

`src` is the datagram's source as a (host, port) tuple. It is kept only as the
live peer's endpoint, replaced on every authenticated packet from elsewhere
(roaming) and dropped with the peer.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Callable

from . import control
from .constants import (
    FEATURE_PARITY, FEATURE_SUPERPACKET, KEEPALIVE_TIMEOUT, LOSS_REPORT_EARLY, LOSS_REPORT_INTERVAL, KIND_CONTROL, KIND_DATA, KIND_SUPER, MSG_INITIATION,
    MSG_TRANSPORT, REJECT_AFTER_TIME, VNET_HDR_LEN,
)
from .cookie import CookieChecker, CookieGenerator
from .errors import BadPacket
from .events import ControlReceived, LossReported, SessionEnded, SessionStarted
from .handshake import ZERO_PSK, consume_initiation, create_response
from .noise import public_key
from .gso import ZERO_VNET_HDR
from .session import ip_packet_length, pad, strip_padding as _strip
from .superpacket import open_whole, parse_fragment, receive_fragment, seal_read, train_items
from .wire import check_initiation_untrusted, unpack_transport_header_untrusted

# Peer session states and their one table of transitions (SPEC §8.2).
NEW, LIVE, ENDED = "new", "live", "ended"
PEER_TRANSITIONS = {
    (NEW, "confirmed"): LIVE,
    (LIVE, "confirmed"): LIVE,
    (NEW, "end"): ENDED,
    (LIVE, "end"): ENDED,
}


class Peer:
    """One client's live session on the server. Memory-only: never pickled, printed as an index."""

    __slots__ = ("public_key", "endpoint", "current", "previous", "next", "last_timestamp", "state",
                 "last_rx", "data_rx_since", "last_tx", "app", "handle", "super", "parity", "add_parity",
                 "loss_at",
                 "__weakref__")

    def __init__(self, public_key: bytes, handle: int):
        self.public_key = public_key
        self.handle = handle
        self.endpoint = None
        self.current = self.previous = self.next = None
        self.last_timestamp = b""
        self.state = NEW
        self.last_rx = self.last_tx = None
        self.data_rx_since = None   # first data received since our last send (passive keepalive)
        self.app = None   # the policy layer's data (assigned addresses, account)
        self.super = False  # the client advertised super-packets in its hello
        self.parity = False  # ... and parity fragments
        self.add_parity = False   # the embedding's choice for this peer: add parity (under loss, §5.5)
        self.loss_at = 0.0   # when we last sent this peer a loss report

    def __repr__(self) -> str:
        return f"<Peer #{self.handle:08x}>"

    def __reduce__(self):
        raise TypeError("session state is memory-only and cannot be serialized")

    def keypairs(self):
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]


class ServerProtocol:
    def __init__(self, *, private_key: bytes, rng: Callable[[int], bytes], vnet_hdr: bool = False):
        self._private = bytearray(private_key)
        self.public = public_key(self._private)
        self._rng = rng
        self._checker = CookieChecker(self.public, rng)
        self._authorized: dict[bytes, bytes] = {}     # public key -> psk
        self._reply_macs: dict[bytes, CookieGenerator] = {}
        self.peers: dict[bytes, Peer] = {}             # public key -> live session
        self.by_index: dict = {}                       # local index -> Keypair
        self.under_load = False
        self.reject_after = REJECT_AFTER_TIME     # shortened only by tests (vpnd's test hooks)
        self.shedding = False     # set by the embedding over its memory cap: no new handshakes
        self.cookie_budget = float("inf")   # cookie replies the embedding still allows (vpnd: per tick)
        self._last_loss_report = 0.0
        self.vnet_hdr = vnet_hdr   # our TUN carries virtio_net_hdr: take super-packets, return framed packets
        self._out: deque = deque()
        self._events: deque = deque()
        self.drops: Counter[str] = Counter()
        # totals over all sessions: no per-session or per-address figure exists (SPEC §9)
        self.rx_bytes = self.tx_bytes = 0

    def __repr__(self) -> str:
        return f"<ServerProtocol peers={len(self.peers)}>"

    def __reduce__(self):
        raise TypeError("server state is memory-only")

    # --- configuration -----------------------------------------------------------
    def authorize(self, client_public: bytes, psk: bytes | None = None) -> None:
        self._authorized[bytes(client_public)] = psk or ZERO_PSK

    def deauthorize(self, client_public: bytes, now: float) -> None:
        self._authorized.pop(client_public, None)
        self._reply_macs.pop(client_public, None)
        peer = self.peers.get(client_public)
        if peer is not None:
            self.end_peer(peer, "not authorized", now)

    def is_authorized(self, client_public: bytes) -> bool:
        return client_public in self._authorized

    def authorized_keys(self) -> list[bytes]:
        return list(self._authorized)

    # --- outputs --------------------------------------------------------------
    def datagrams_to_send(self) -> list:
        out = list(self._out)
        self._out.clear()
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    # --- input --------------------------------------------------------------
    def receive_datagram(self, dg: bytes, src: tuple, now: float):
        """One datagram from `src`: (peer, ip_packet) for the TUN, or None. Never raises on bad input."""
        try:
            t = dg[0] if dg else 0
            if t == MSG_TRANSPORT:
                return self._receive_transport(dg, src, now)
            if t == MSG_INITIATION:
                self._receive_initiation(dg, src, now)
            else:
                raise BadPacket("type")
        except BadPacket as exc:
            self.drops[exc.reason] += 1
        return None

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._rng(4), "little")
            if index not in self.by_index:
                return index

    def _receive_initiation(self, dg: bytes, src: tuple, now: float) -> None:
        if self.shedding:
            raise BadPacket("memory-shed")
        check_initiation_untrusted(dg)           # length, type and reserved bytes
        # mac1 next: no DH for anyone who does not know our public key
        if not self._checker.mac1_ok(dg):
            raise BadPacket("mac1")
        if self.under_load:
            checker = self._checker
            cookie = checker.cookie_for(src, now)
            if not checker.mac2_ok(dg, src, now, cookie):
                # a cookie reply costs ~4 us of Python and a send: beyond the embedding's budget
                # (a flood bigger than the process can answer) the initiation is dropped unanswered
                if self.cookie_budget <= 0:
                    raise BadPacket("cookie-budget")
                self.cookie_budget -= 1
                sender = int.from_bytes(dg[4:8], "little")
                self._out.append((src, checker.make_reply(dg, sender, src, now, cookie)))
                self.drops["cookie-sent"] += 1    # counted like a drop; returns, as raising costs 0.5 us
                return
        consumed = consume_initiation(dg, static_private=self._private, ephemeral=self._rng(32),
                                      psk_for=self._authorized.get)
        peer = self.peers.get(consumed.peer_static)
        if peer is not None and consumed.timestamp <= peer.last_timestamp:
            consumed.noise.wipe()
            raise BadPacket("initiation-replay")
        macs = self._reply_macs.get(consumed.peer_static)
        if macs is None:
            macs = self._reply_macs[consumed.peer_static] = CookieGenerator(consumed.peer_static)
        index = self._new_index()
        msg, kp = create_response(consumed, index=index, now=now, macs=macs)
        if peer is None:
            peer = self.peers[consumed.peer_static] = Peer(consumed.peer_static, index)
        if peer.next is not None:   # an unconfirmed earlier handshake is replaced
            self._forget_keypair(peer.next)
        peer.next = kp
        kp.peer = peer
        self.by_index[index] = kp
        peer.last_timestamp = consumed.timestamp
        peer.endpoint = src
        self._out.append((src, msg))

    def _receive_transport(self, dg: bytes, src: tuple, now: float):
        kind, index, counter = unpack_transport_header_untrusted(dg)
        if kind == KIND_SUPER:
            return self._receive_super(dg, src, now)
        kp = self.by_index.get(index)
        if kp is None:
            raise BadPacket("index")
        plain = kp.open(dg, counter)
        peer = self._authenticated(kp, src, now)
        self.rx_bytes += len(dg)
        if kind == KIND_DATA:
            if not plain:
                return None
            n = ip_packet_length(plain)
            if n <= 0:
                raise BadPacket("inner-length")
            if peer.data_rx_since is None:
                peer.data_rx_since = now
            return peer, (ZERO_VNET_HDR + plain[:n] if self.vnet_hdr else plain[:n])
        if kind == KIND_CONTROL:
            msg = control.decode_untrusted(plain)
            if msg["type"] == "close":
                self.end_peer(peer, "closed by client", now, notify=False)
            elif msg["type"] == "loss":
                self._events.append(LossReported(msg["done"], msg["lost"], peer, msg.get("repaired", 0)))
            else:
                if msg["type"] != "hello":       # config is for clients
                    raise BadPacket("control-direction")
                peer.super = self.vnet_hdr and FEATURE_SUPERPACKET in msg.get("features", ())
                peer.parity = peer.super and FEATURE_PARITY in msg.get("features", ())
                self._events.append(ControlReceived(msg, peer))
            return None
        raise BadPacket("kind")

    def _authenticated(self, kp, src: tuple, now: float) -> Peer:
        """Book-keeping after a tag verified: confirmation, roaming, liveness."""
        peer = kp.peer
        if kp is peer.next:
            self._confirm(peer, kp)
        if peer.endpoint != src:
            peer.endpoint = src          # roaming: only ever on an authenticated packet
        peer.last_rx = now
        return peer

    def _receive_super(self, dg: bytes, src: tuple, now: float):
        if not self.vnet_hdr:
            raise BadPacket("superpacket-unsupported")
        no, n, index, counter = parse_fragment(dg)
        kp = self.by_index.get(index)
        if kp is None:
            raise BadPacket("index")
        lost = kp.super_lost
        plain = receive_fragment(kp, dg, no, n, counter)
        if kp.super_lost != lost and now - kp.peer.loss_at >= LOSS_REPORT_EARLY:
            self._report_loss(kp.peer, now)     # tell the sender at once: it shrinks its super-packets
        if plain is None:
            return None
        return self._super_delivered(kp, plain, src, now)

    def _super_delivered(self, kp, plain: bytes, src: tuple, now: float):
        peer = self._authenticated(kp, src, now)
        self.rx_bytes += len(plain)
        if peer.data_rx_since is None:
            peer.data_rx_since = now
        size = ip_packet_length(plain, VNET_HDR_LEN)
        if size <= 0:
            raise BadPacket("inner-length")
        return peer, _strip(plain, VNET_HDR_LEN + size)

    def receive_train(self, buf: bytes, seg: int, src: tuple, now: float) -> list:
        """A UDP GRO train from `src` (datagrams of `seg` bytes, the last maybe shorter): the
        (peer, packet) results of its datagrams, as receive_datagram gives them one by one. Whole
        super-packets in it are taken in one step (superpacket.whole_in_train); never raises."""
        out = []
        for dg, whole in train_items(buf, seg, self.vnet_hdr):
            if whole is None:
                got = self.receive_datagram(dg, src, now)
            else:
                try:
                    kp = self.by_index.get(whole[0])
                    if kp is None:
                        raise BadPacket("index")
                    got = self._super_delivered(kp, open_whole(kp, dg, whole[1], whole[2]), src, now)
                except BadPacket as exc:
                    self.drops[exc.reason] += 1
                    continue
            if got is not None:
                out.append(got)
        return out

    def _confirm(self, peer: Peer, kp) -> None:
        if peer.previous is not None:
            self._forget_keypair(peer.previous)
        peer.previous, peer.current, peer.next = peer.current, kp, None
        first = peer.state == NEW
        peer.state = PEER_TRANSITIONS[(peer.state, "confirmed")]
        if first:
            self._events.append(SessionStarted(peer))

    # --- output --------------------------------------------------------------
    def encrypt(self, peer: Peer, packet: bytes, now: float) -> bytes | None:
        kp = peer.current
        if kp is None:
            self.drops["no-session"] += 1
            return None
        dg = kp.seal(KIND_DATA, pad(packet))
        peer.last_tx = now
        peer.data_rx_since = None
        self.tx_bytes += len(dg)
        return dg

    def encrypt_frames(self, peer: Peer, data: bytes, now: float, chunk: int) -> list[bytes]:
        """Hot path with vnet_hdr: virtio_net_hdr + packet to datagrams (super-packet or segmented)."""
        kp = peer.current
        if kp is None:
            self.drops["no-session"] += 1
            return []
        frames = seal_read(kp, data, chunk, peer.super, peer.add_parity and peer.parity)
        peer.last_tx = now
        peer.data_rx_since = None
        self.tx_bytes += len(data)
        return frames

    def send_control(self, peer: Peer, msg: dict, now: float) -> None:
        kp = peer.current
        if kp is None or peer.endpoint is None:
            return
        dg = kp.seal(KIND_CONTROL, control.encode(msg))
        peer.last_tx = now
        peer.data_rx_since = None
        self.tx_bytes += len(dg)
        self._out.append((peer.endpoint, dg))

    # --- timers and teardown -------------------------------------------------------
    def handle_timer(self, now: float) -> None:
        """Expire keypairs at REJECT_AFTER_TIME, end peers left without keys, send passive keepalives
        and super-packet loss reports."""
        report = now - self._last_loss_report >= LOSS_REPORT_INTERVAL
        if report:
            self._last_loss_report = now
        for peer in list(self.peers.values()):
            if report and peer.current is not None:
                self._report_loss(peer, now)
            for kp in peer.keypairs():
                if now - kp.created >= self.reject_after:
                    self._forget_keypair(kp)
                    for slot in ("current", "previous", "next"):
                        if getattr(peer, slot) is kp:
                            setattr(peer, slot, None)
            if not peer.keypairs():
                self.end_peer(peer, "expired", now)
                continue
            if peer.current is not None and peer.data_rx_since is not None and \
                    now - peer.data_rx_since >= KEEPALIVE_TIMEOUT:
                dg = peer.current.seal(KIND_DATA, b"")
                peer.last_tx = now
                peer.data_rx_since = None
                self._out.append((peer.endpoint, dg))

    def _report_loss(self, peer: Peer, now: float) -> None:
        peer.loss_at = now
        done, lost, repaired = control.take_loss((peer.current, peer.previous, peer.next))
        if done or lost:
            self.send_control(peer, control.loss(done, lost, repaired), now)

    def _forget_keypair(self, kp) -> None:
        self.by_index.pop(kp.local_index, None)
        kp.wipe()
        kp.peer = None

    def end_peer(self, peer: Peer, reason: str, now: float, notify: bool = True, retry: bool = True) -> None:
        """End a session: optionally tell the client why (and whether to reconnect), then drop keys,
        endpoint and timestamp."""
        if self.peers.get(peer.public_key) is not peer:
            return
        if notify:
            self.send_control(peer, control.close(reason, retry), now)
        for kp in peer.keypairs():
            self._forget_keypair(kp)
        peer.current = peer.previous = peer.next = None
        peer.endpoint = None
        peer.last_timestamp = b""
        del self.peers[peer.public_key]
        self._reply_macs.pop(peer.public_key, None)   # holds the last response's mac1
        was_live = peer.state == LIVE
        peer.state = PEER_TRANSITIONS[(peer.state, "end")]
        if was_live:
            self._events.append(SessionEnded(peer, reason))

    def close_all(self, now: float, reason: str = "server shutting down") -> None:
        for peer in list(self.peers.values()):
            self.end_peer(peer, reason, now)
