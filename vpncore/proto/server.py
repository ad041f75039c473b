"""The responder's state machine: many peers, found by session index (SPEC §8.2).

    srv = ServerProtocol(private_key=..., rng=os.urandom)
    srv.authorize(client_public)
    result = srv.receive_datagram(dg, src, now)    # (peer, ip_packet) or None
    dg = srv.encrypt(peer, packet, now)            # hot path
    for endpoint, dg in srv.datagrams_to_send(): sock.sendto(dg, endpoint)
    srv.handle_timer(now) when now >= srv.get_timer()
    srv.set_policy(under_load=..., shedding=..., cookie_budget=...)
    srv.statistics()                               # frozen totals over all sessions

`src` is the datagram's source as a (host, port) tuple. It is kept only as the
live peer's endpoint, replaced on every authenticated packet from elsewhere
(roaming) and dropped with the peer.

The transport half of every session (sealing, opening, super-packets, loss reports) is the peer's
Tunnel (tunnel.py); this module is the responder: cookies, handshakes, peers by key and by
index, confirmation bookkeeping, expiry and keepalive timers.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable

from . import control
from .constants import (
    KEEPALIVE_TIMEOUT, LOSS_REPORT_INTERVAL, MSG_INITIATION, MSG_TRANSPORT, REJECT_AFTER_TIME,
)
from .cookie import CookieChecker, CookieGenerator
from .errors import BadPacket
from .events import ControlReceived, LossReported, SessionEnded, SessionStarted
from .handshake import ZERO_PSK, consume_initiation, create_response
from .noise import public_key
from .superpacket import train_items
from .tunnel import Counters, Statistics, Tunnel, parse_untrusted
from .wire import check_initiation_untrusted

# Peer session states and their one table of transitions (SPEC §8.2).
NEW, LIVE, ENDED = "new", "live", "ended"
PEER_TRANSITIONS = {
    (NEW, "confirmed"): LIVE,
    (LIVE, "confirmed"): LIVE,
    (NEW, "end"): ENDED,
    (LIVE, "end"): ENDED,
}


def _tunnel_attr(name: str, doc: str) -> property:
    def get(self):
        return getattr(self.tunnel, name)

    def put(self, value):
        setattr(self.tunnel, name, value)
    return property(get, put, doc=doc)


class Peer:
    """One client's session on the server (SPEC §8.2): its static key, handshake replay
    timestamp, state, and its Tunnel (keypairs current/previous/next, endpoint, liveness, feature
    agreement). `app` is the policy layer's data. Memory-only: never pickled, printed as an index.
    The tunnel's fields are readable (and settable) here under their old names."""

    __slots__ = ("public_key", "tunnel", "last_timestamp", "state", "app", "handle", "__weakref__")

    def __init__(self, public_key: bytes, handle: int, tunnel: Tunnel):
        self.public_key = public_key
        self.handle = handle
        self.tunnel = tunnel
        self.last_timestamp = b""
        self.state = NEW
        self.app = None   # the policy layer's data (assigned addresses, account)

    endpoint = _tunnel_attr("endpoint", "where the client is: the source of its last verified datagram")
    current = _tunnel_attr("current", "the keypair sealed with")
    previous = _tunnel_attr("previous", "the keypair before the last confirmed rekey")
    next = _tunnel_attr("next", "the unconfirmed keypair of the latest initiation")
    last_rx = _tunnel_attr("last_rx", "time of the last authenticated receive")
    last_tx = _tunnel_attr("last_tx", "time of the last transport message sent")
    data_rx_since = _tunnel_attr("data_rx_since", "first data received since our last send")
    loss_at = _tunnel_attr("loss_at", "when we last sent this peer a loss report")
    super = _tunnel_attr("peer_takes_super", "the client advertised super-packets in its hello")
    parity = _tunnel_attr("peer_takes_parity", "... and parity fragments")
    add_parity = _tunnel_attr("add_parity", "the embedding's choice for this peer: add parity (§5.5)")

    def __repr__(self) -> str:
        return f"<Peer #{self.handle:08x}>"

    def __reduce__(self):
        raise TypeError("session state is memory-only and cannot be serialized")

    def keypairs(self):
        return self.tunnel.keypairs()


class ServerProtocol:
    """The responder (SPEC §4.4-§4.5, §8.2, §8.4, §8.5): authorized keys, cookie replies under
    load, one Peer (with its Tunnel) per client key, found by session index for transport and by
    key for initiations; expiry, passive keepalives and loss reports on its timer. Policy comes in
    through set_policy(); totals go out through statistics(). Sans-IO and memory-only."""

    def __init__(self, *, private_key: bytes, rng: Callable[[int], bytes], vnet_hdr: bool = False,
                 reject_after: float = REJECT_AFTER_TIME):
        self._private = bytearray(private_key)
        self.public = public_key(self._private)
        self._rng = rng
        self._checker = CookieChecker(self.public, rng)
        self._authorized: dict[bytes, bytes] = {}     # public key -> psk
        self._reply_macs: dict[bytes, CookieGenerator] = {}
        self.peers: dict[bytes, Peer] = {}             # public key -> live session
        self.by_index: dict = {}                       # local index -> Peer (of every keypair)
        self.under_load = False   # policy inputs: see set_policy()
        self.shedding = False
        self.cookie_budget = float("inf")
        self.reject_after = reject_after     # REJECT_AFTER_TIME; shorter only in tests
        self._last_loss_report = 0.0
        self._wake = None         # earliest deadline known since the last handle_timer (get_timer)
        self.vnet_hdr = vnet_hdr   # our TUN carries virtio_net_hdr: take super-packets, return framed packets
        self._out: deque = deque()
        self._events: deque = deque()
        # totals over all sessions, shared by every peer's tunnel: no per-session or per-address
        # figure exists (SPEC §9)
        self._counters = Counters()
        self.drops = self._counters.drops

    def __repr__(self) -> str:
        return f"<ServerProtocol peers={len(self.peers)}>"

    def __reduce__(self):
        raise TypeError("server state is memory-only")

    rx_bytes = property(lambda self: self._counters.rx_bytes, doc="transport bytes received (tunnel.py)")
    tx_bytes = property(lambda self: self._counters.tx_bytes, doc="transport bytes sent (tunnel.py)")

    # --- configuration and policy -----------------------------------------------------------------
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

    def set_policy(self, *, under_load: bool | None = None, shedding: bool | None = None,
                   cookie_budget: float | None = None) -> None:
        """The embedding's policy inputs, in one call (each left as it is when not given):
        under_load   answer initiations without a valid mac2 with a cookie reply (§4.5);
        shedding     over the embedding's memory cap: drop every initiation ("memory-shed");
        cookie_budget  how many cookie replies may still be sent (beyond: dropped unanswered)."""
        if under_load is not None:
            self.under_load = under_load
        if shedding is not None:
            self.shedding = shedding
        if cookie_budget is not None:
            self.cookie_budget = cookie_budget

    def statistics(self) -> Statistics:
        """Frozen totals over all sessions since start (never reset): transport bytes as defined in
        tunnel.py, drops by reason. Take differences with Statistics.since()."""
        return self._counters.snapshot()

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
                kind, no, n, index, counter = parse_untrusted(dg, self.vnet_hdr)
                peer = self.by_index.get(index)
                if peer is None:
                    raise BadPacket("index")
                got = peer.tunnel.open_parsed(dg, kind, no, n, index, counter, now, src)
                return None if got is None else (peer, got)
            if t == MSG_INITIATION:
                self._receive_initiation(dg, src, now)
            else:
                raise BadPacket("type")
        except BadPacket as exc:
            self.drops[exc.reason] += 1
        return None

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
                    peer = self.by_index.get(whole[0])
                    if peer is None:
                        raise BadPacket("index")
                    got = peer, peer.tunnel.open_whole(dg, whole, now, src)
                except BadPacket as exc:
                    self.drops[exc.reason] += 1
                    continue
            if got is not None:
                out.append(got)
        return out

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
            peer = self.peers[consumed.peer_static] = self._new_peer(consumed.peer_static, index)
        dropped = peer.tunnel.offer(kp)     # an unconfirmed earlier handshake is replaced
        if dropped is not None:
            self.by_index.pop(dropped.local_index, None)
        self.by_index[index] = peer
        peer.last_timestamp = consumed.timestamp
        peer.tunnel.endpoint = src
        self._deadline(now + self.reject_after)
        self._out.append((src, msg))

    def _new_peer(self, public: bytes, handle: int) -> Peer:
        tunnel = Tunnel(vnet_hdr=self.vnet_hdr, counters=self._counters)
        peer = Peer(public, handle, tunnel)
        tunnel._send = partial(self._send_to_peer, peer)
        tunnel._control = partial(self._receive_control, peer)
        tunnel._confirmed = partial(self._confirmed, peer)
        return peer

    def _send_to_peer(self, peer: Peer, dg: bytes) -> None:
        self._out.append((peer.tunnel.endpoint, dg))

    def _confirmed(self, peer: Peer, dropped) -> None:
        """The peer's next keypair became current (§8.5); `dropped` is the wiped old previous."""
        if dropped is not None:
            self.by_index.pop(dropped.local_index, None)
        first = peer.state == NEW
        peer.state = PEER_TRANSITIONS[(peer.state, "confirmed")]
        self._deadline(self._last_loss_report + LOSS_REPORT_INTERVAL)
        if first:
            self._events.append(SessionStarted(peer))

    def _receive_control(self, peer: Peer, msg: dict, now: float) -> None:
        if msg["type"] == "close":
            self.end_peer(peer, "closed by client", now, notify=False)
        elif msg["type"] == "loss":
            self._events.append(LossReported(msg["done"], msg["lost"], peer, msg.get("repaired", 0)))
        else:
            if msg["type"] != "hello":       # config is for clients
                raise BadPacket("control-direction")
            peer.tunnel.agree(msg.get("features", ()))
            self._events.append(ControlReceived(msg, peer))

    # --- output --------------------------------------------------------------
    def encrypt(self, peer: Peer, packet: bytes, now: float) -> bytes | None:
        return peer.tunnel.seal_packet(packet, now)

    def encrypt_frames(self, peer: Peer, data: bytes, now: float, chunk: int) -> list[bytes]:
        """Hot path with vnet_hdr: virtio_net_hdr + packet to datagrams (Tunnel.seal_read)."""
        return peer.tunnel.seal_read(data, now, chunk)

    def send_control(self, peer: Peer, msg: dict, now: float) -> None:
        tunnel = peer.tunnel
        if tunnel.endpoint is None:
            return
        dg = tunnel.seal_control(msg, now)
        if dg is not None:
            self._out.append((tunnel.endpoint, dg))

    # --- timers and teardown -------------------------------------------------------
    def _deadline(self, t: float) -> None:
        if self._wake is None or t < self._wake:
            self._wake = t

    def get_timer(self) -> float | None:
        """The earliest time handle_timer has something to do, or None (no peers). Calling
        handle_timer earlier is harmless; later delays expiry, keepalives and loss reports."""
        first = self._counters.first_data_rx
        if first is None:
            return self._wake
        t = first + KEEPALIVE_TIMEOUT
        return t if self._wake is None or t < self._wake else self._wake

    def handle_timer(self, now: float) -> None:
        """Expire keypairs at reject_after, end peers left without keys, send passive keepalives
        and super-packet loss reports (§8.4)."""
        report = now - self._last_loss_report >= LOSS_REPORT_INTERVAL
        if report:
            self._last_loss_report = now
        self._counters.first_data_rx = None
        wake = None
        for peer in list(self.peers.values()):
            tunnel = peer.tunnel
            if report and tunnel.current is not None:
                tunnel.report_loss(now)
            for kp in tunnel.expire(now, self.reject_after):
                self.by_index.pop(kp.local_index, None)
            if not tunnel.keypairs():
                self.end_peer(peer, "expired", now)
                continue
            if tunnel.keepalive_due(now):
                self._out.append((tunnel.endpoint, tunnel.seal_keepalive(now)))
            # this peer's next deadlines
            t = min(kp.created for kp in tunnel.keypairs()) + self.reject_after
            if tunnel.current is not None:
                t = min(t, self._last_loss_report + LOSS_REPORT_INTERVAL)
                if tunnel.data_rx_since is not None:
                    t = min(t, tunnel.data_rx_since + KEEPALIVE_TIMEOUT)
            if wake is None or t < wake:
                wake = t
        self._wake = wake

    def end_peer(self, peer: Peer, reason: str, now: float, notify: bool = True, retry: bool = True) -> None:
        """End a session: optionally tell the client why (and whether to reconnect), then drop keys,
        endpoint and timestamp."""
        if self.peers.get(peer.public_key) is not peer:
            return
        if notify:
            self.send_control(peer, control.close(reason, retry), now)
        for kp in peer.tunnel.wipe():
            self.by_index.pop(kp.local_index, None)
        peer.tunnel.detach()            # no Peer <-> Tunnel cycle: the session is freed at once
        peer.tunnel.endpoint = None
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
