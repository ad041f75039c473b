"""The transport half of a session: what both ends do with established keypairs (SPEC §5, §6.3, §8.5).

A `Tunnel` belongs to one end of one session (the client's ClientConnection has one; on the server
every Peer has one). The handshake side (client.py, server.py) puts keypairs into its slots; the
tunnel seals and opens with them:

    send:     seal_packet (kind 0), seal_read (a TUN read: super-packet fragments + parity, or
              kind-0 segments), seal_control, seal_keepalive
    receive:  open_untrusted(dg, now, src): header, keypair by index, AEAD + replay window,
              confirmation and roaming, then by kind: the packet for the TUN, a control message
              to the owner's `control` callback, or nothing. A super-packet fragment waits in its
              keypair's Reassembly until it completes.
    loss:     report_loss: the §6.3 `loss` counts of its keypairs, sent through `send`
    counters: one Counters object (shared by every tunnel of a server: totals only, SPEC §9)

Remote input has one failure mode: BadPacket, raised to the owner, which counts it. Everything a
verified message does for liveness, confirmation and roaming (§5.7 step 6) happens before the
checks of its content (step 7), so a message that fails those still took effect.

Byte counters (the one definition, both ends): `rx_bytes`/`tx_bytes` count the bytes of every
authenticated transport message received / every transport message sealed, as
TRANSPORT_HEADER_LEN + len(ciphertext) (the tag included). A super-packet is one message whatever
its fragmentation: 16 + len(plaintext) + 16; fragment headers and the parity fragment are not
counted. So on a lossless link one side's tx_bytes is the other's rx_bytes, and a kind-0 message
counts its datagram's length.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from . import control
from .constants import (
    FEATURE_PARITY, FEATURE_SUPERPACKET, KEEPALIVE_TIMEOUT, KIND_CONTROL, KIND_DATA, KIND_SUPER, LOSS_REPORT_EARLY,
    TAG_LEN, TRANSPORT_HEADER_LEN, VNET_HDR_LEN,
)
from .errors import BadPacket
from .gso import ZERO_VNET_HDR, segment
from .keypair import ip_packet_length, pad, strip_padding
from .superpacket import fits, parse_fragment, reassembly_of, seal_fragments
from .wire import unpack_transport_header_untrusted

_OVERHEAD = TRANSPORT_HEADER_LEN + TAG_LEN


def _ignore(*_args) -> None:
    """The callbacks of a detached tunnel."""


@dataclass(frozen=True)
class Statistics:
    """Totals since the protocol object was created (never reset): transport bytes as defined in
    tunnel.py's docstring, and drops by reason. `since(earlier)` gives the difference."""
    rx_bytes: int = 0
    tx_bytes: int = 0
    drops: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def since(self, earlier: "Statistics") -> "Statistics":
        drops = {k: v - earlier.drops.get(k, 0) for k, v in self.drops.items() if v != earlier.drops.get(k, 0)}
        return Statistics(self.rx_bytes - earlier.rx_bytes, self.tx_bytes - earlier.tx_bytes, MappingProxyType(drops))


class Counters:
    """The mutable totals behind Statistics. One per ClientConnection; one per ServerProtocol,
    shared by all its peers' tunnels (no per-session figure exists, SPEC §9). `drops` is the
    owner's drop Counter itself. `first_data_rx` is for the server's get_timer(): the earliest time
    since its last timer run that a tunnel started a passive-keepalive deadline."""

    __slots__ = ("rx_bytes", "tx_bytes", "drops", "first_data_rx")

    def __init__(self):
        self.rx_bytes = self.tx_bytes = 0
        self.drops: Counter[str] = Counter()
        self.first_data_rx = None

    def __reduce__(self):
        raise TypeError("counters are memory-only")

    def snapshot(self) -> Statistics:
        return Statistics(self.rx_bytes, self.tx_bytes, MappingProxyType(dict(self.drops)))


def parse_untrusted(dg: bytes, takes_super: bool) -> tuple[int, int, int, int, int]:
    """(kind, frag_no, frag_count, receiver index, counter) of a transport datagram (SPEC §5.7
    steps 1-3, §5.5 step 1 without the keypair); frag_no and frag_count are 0 for kinds other than 2.
    BadPacket if malformed, or a fragment to an end whose TUN does not carry virtio_net_hdr."""
    kind, index, counter = unpack_transport_header_untrusted(dg)
    if kind != KIND_SUPER:
        return kind, 0, 0, index, counter
    if not takes_super:
        raise BadPacket("superpacket-unsupported")
    no, n, index, counter = parse_fragment(dg)
    return kind, no, n, index, counter


def _nothing(*_args) -> None:
    return None


class Tunnel:
    """The transport half of one end of one session (SPEC §5, §6.3, §8.5): keypair slots, feature
    agreement, sealing, opening and dispatch by kind, super-packet reassembly and loss reports,
    liveness times, byte counters. Memory-only: never pickled, printed without content.

    Slots: `current` (the only one sealed with), `previous` (still opened after a rekey) and, on
    the server, `next` (installed by an initiation, never sealed with; the first authenticated
    message on it confirms it, §8.5). The owner supplies:
      send(dg)              where the datagrams the tunnel decides to send itself go (loss reports);
      control(msg, now)     a verified, decoded control message;
      confirmed(dropped)    `next` became current; `dropped` is the wiped old previous (or None).
    `vnet_hdr`: this end's TUN carries virtio_net_hdr (it takes super-packets and delivers
    vnet_hdr || packet).
    """

    __slots__ = ("current", "previous", "next", "vnet_hdr", "peer_takes_super", "peer_takes_parity", "add_parity",
                 "endpoint", "last_rx", "last_tx", "data_rx_since", "unanswered_since", "loss_at", "counters",
                 "_send", "_control", "_confirmed", "__weakref__")

    def __init__(self, *, vnet_hdr: bool = False, counters: Counters | None = None,
                 send: Callable[[bytes], None] = _nothing, control: Callable[[dict, float], None] = _nothing,
                 confirmed: Callable = _nothing):
        self.current = self.previous = self.next = None
        self.vnet_hdr = vnet_hdr
        self.peer_takes_super = False   # the other end agreed to super-packets (§5.5)
        self.peer_takes_parity = False  # ... and to parity fragments
        self.add_parity = False         # the embedding's choice: add parity (under loss, §5.5)
        self.endpoint = None            # server: where the peer is (roaming, §8.5); the client has none
        self.last_rx = self.last_tx = None   # last authenticated receive / last transport message sent
        self.data_rx_since = None       # first data received since our last send (passive keepalive)
        self.unanswered_since = None    # first data sent since the last authenticated receive (dead peer)
        self.loss_at = 0.0              # when the last loss report was taken
        self.counters = counters if counters is not None else Counters()
        self._send, self._control, self._confirmed = send, control, confirmed

    def __repr__(self) -> str:
        kp = self.current
        return "<Tunnel>" if kp is None else f"<Tunnel #{kp.local_index:08x}>"

    def __reduce__(self):
        raise TypeError("session state is memory-only and cannot be serialized")

    # --- keypair slots (§8.5) -----------------------------------------------------------------
    def keypairs(self) -> list:
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]

    def keypair_for(self, index: int):
        """The keypair whose local index is `index`; BadPacket("index") if none."""
        for kp in (self.current, self.previous, self.next):
            if kp is not None and kp.local_index == index:
                return kp
        raise BadPacket("index")

    def use(self, kp):
        """Make `kp` current at once (the initiator's completed handshake): the old current becomes
        previous; the old previous is wiped and returned (or None)."""
        dropped = self.previous
        if dropped is not None:
            dropped.wipe()
        self.previous, self.current = self.current, kp
        return dropped

    def offer(self, kp):
        """Install `kp` as next (the responder's new keypair, unconfirmed); a replaced unconfirmed
        one is wiped and returned (or None)."""
        dropped = self.next
        if dropped is not None:
            dropped.wipe()
        self.next = kp
        return dropped

    def forget(self, kp) -> None:
        """Wipe `kp` and empty its slot."""
        kp.wipe()
        if self.current is kp:
            self.current = None
        if self.previous is kp:
            self.previous = None
        if self.next is kp:
            self.next = None

    def expire(self, now: float, after: float) -> list:
        """Wipe and return the keypairs at least `after` seconds old (REJECT_AFTER_TIME, §8.3-§8.4)."""
        old = [kp for kp in self.keypairs() if now - kp.created >= after]
        for kp in old:
            self.forget(kp)
        return old

    def wipe(self) -> list:
        """Wipe and return every keypair; the tunnel keeps no key material afterwards."""
        kps = self.keypairs()
        for kp in kps:
            kp.wipe()
        self.current = self.previous = self.next = None
        return kps

    def detach(self) -> None:
        """Drop the callbacks: a server's are bound to its Peer (a reference cycle), so without this
        an ended session would outlive its end until the cyclic garbage collector happens to run."""
        self._send = self._control = self._confirmed = _ignore

    def agree(self, features) -> None:
        """The other end's feature list (its hello or config, §5.5): super-packets only to an end
        that lists them while our TUN carries virtio_net_hdr, parity only with super-packets."""
        self.peer_takes_super = self.vnet_hdr and FEATURE_SUPERPACKET in features
        self.peer_takes_parity = self.peer_takes_super and FEATURE_PARITY in features

    # --- sealing ------------------------------------------------------------------------------
    def seal_packet(self, packet: bytes, now: float) -> bytes | None:
        """Hot path: one IP packet to one kind-0 datagram, or None (no keypair: counted as a drop)."""
        kp = self.current
        if kp is None:
            self.counters.drops["no-session"] += 1
            return None
        dg = kp.seal(KIND_DATA, pad(packet))
        self.last_tx = now
        self.data_rx_since = None
        if self.unanswered_since is None:
            self.unanswered_since = now
        self.counters.tx_bytes += len(dg)
        return dg

    def seal_read(self, read: bytes, now: float, chunk: int) -> list[bytes]:
        """Hot path with vnet_hdr: one TUN read (virtio_net_hdr + packet) to its datagrams.

        A GSO super-packet to an end that takes them (and that fits in SUPER_MAX_FRAGMENTS): one
        AEAD, fragments of `chunk` bytes, plus a parity fragment when add_parity and the peer
        agreed (§5.5). Anything else: checksummed and segmented in software, one kind-0 datagram
        per packet (§5.6). No keypair: [] (counted as a drop)."""
        kp = self.current
        if kp is None:
            self.counters.drops["no-session"] += 1
            return []
        if self.peer_takes_super and fits(read, chunk):
            plain = pad(read)
            frames = seal_fragments(kp, plain, chunk, self.add_parity and self.peer_takes_parity)
            self.counters.tx_bytes += len(plain) + _OVERHEAD
        else:
            frames = [kp.seal(KIND_DATA, pad(p)) for p in segment(read)]
            self.counters.tx_bytes += sum(map(len, frames))
        self.last_tx = now
        self.data_rx_since = None
        if self.unanswered_since is None:
            self.unanswered_since = now
        return frames

    def seal_control(self, msg: dict, now: float) -> bytes | None:
        """One control message (§6) on the current keypair, or None without one."""
        kp = self.current
        if kp is None:
            return None
        dg = kp.seal(KIND_CONTROL, control.encode(msg))
        self.last_tx = now
        self.data_rx_since = None
        self.counters.tx_bytes += len(dg)
        return dg

    def seal_keepalive(self, now: float) -> bytes | None:
        """An empty kind-0 message (§5.2) on the current keypair, or None without one."""
        kp = self.current
        if kp is None:
            return None
        dg = kp.seal(KIND_DATA, b"")
        self.last_tx = now
        self.data_rx_since = None
        self.counters.tx_bytes += len(dg)
        return dg

    def report_loss(self, now: float) -> None:
        """Take the super-packet counts of every keypair (§6.3) and, if any, send a `loss` report."""
        self.loss_at = now
        done = lost = repaired = 0
        for kp in (self.current, self.previous, self.next):
            if kp is not None and kp.reassembly is not None:
                d, lo, r = kp.reassembly.take()
                done, lost, repaired = done + d, lost + lo, repaired + r
        if done or lost:
            dg = self.seal_control(control.loss(done, lost, repaired), now)
            if dg is not None:
                self._send(dg)

    # --- opening ------------------------------------------------------------------------------
    def open_untrusted(self, dg: bytes, now: float, src=None):
        """One transport datagram: the packet for the TUN (bytes, or a memoryview of a super-packet's
        plaintext), or None (keepalive, control message, incomplete super-packet). BadPacket on any
        failure. `src` (server) is the datagram's source: the endpoint follows it once verified."""
        kind, no, n, index, counter = parse_untrusted(dg, self.vnet_hdr)
        return self.open_parsed(dg, kind, no, n, index, counter, now, src)

    def open_parsed(self, dg: bytes, kind: int, no: int, n: int, index: int, counter: int, now: float, src=None):
        """open_untrusted after parse_untrusted (the server parses first, to find the tunnel)."""
        kp = self.keypair_for(index)
        if kind == KIND_SUPER:
            if n == 1:
                plain = kp.open_with_header(dg[:TRANSPORT_HEADER_LEN], counter, dg[TRANSPORT_HEADER_LEN:])
            else:
                r = reassembly_of(kp)
                lost = r.lost
                plain = r.receive(kp, dg, no, n, counter)
                if r.lost != lost and now - self.loss_at >= LOSS_REPORT_EARLY:
                    self.report_loss(now)      # tell the sender at once: it shrinks its super-packets
                if plain is None:
                    return None
            return self._super_delivered(kp, plain, now, src)
        plain = kp.open(dg, counter)
        self._authenticated(kp, now, src, len(dg))
        if kind == KIND_DATA:
            if not plain:
                return None  # keepalive
            size = ip_packet_length(plain)
            if size <= 0:
                raise BadPacket("inner-length")
            self._data_received(now)
            return ZERO_VNET_HDR + plain[:size] if self.vnet_hdr else plain[:size]
        if kind == KIND_CONTROL:
            self._control(control.decode_untrusted(plain), now)
            return None
        raise BadPacket("kind")

    def open_whole(self, header: bytes, whole: tuple, now: float, src=None):
        """A super-packet found whole in a GRO train (train_items gives `header` and `whole` =
        (receiver index, counter, ciphertext)): the packet for the TUN; BadPacket on failure."""
        index, counter, ct = whole
        kp = self.keypair_for(index)
        return self._super_delivered(kp, reassembly_of(kp).whole(kp, header, counter, ct), now, src)

    def _authenticated(self, kp, now: float, src, size: int) -> None:
        """§5.7 step 6: confirmation, roaming, liveness, counted."""
        if kp is self.next:
            self.next = None
            self._confirmed(self.use(kp))
        if src is not None and self.endpoint != src:
            self.endpoint = src          # roaming: only ever on an authenticated packet
        self.last_rx = now
        self.unanswered_since = None
        self.counters.rx_bytes += size

    def _data_received(self, now: float) -> None:
        if self.data_rx_since is None:
            self.data_rx_since = now
            c = self.counters
            if c.first_data_rx is None:
                c.first_data_rx = now

    def _super_delivered(self, kp, plain: bytes, now: float, src):
        self._authenticated(kp, now, src, len(plain) + _OVERHEAD)
        self._data_received(now)
        size = ip_packet_length(plain, VNET_HDR_LEN)
        if size <= 0:
            raise BadPacket("inner-length")
        return strip_padding(plain, VNET_HDR_LEN + size)

    def keepalive_due(self, now: float) -> bool:
        """Passive keepalive (§8.3 step 6, §8.4 step 3): data received, nothing sent since, for
        KEEPALIVE_TIMEOUT."""
        return self.current is not None and self.data_rx_since is not None and \
            now - self.data_rx_since >= KEEPALIVE_TIMEOUT
