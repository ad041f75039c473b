"""vpnd's side of the packet pump (vpncore/net/pump.py): the per-packet policy of the server.

TUN -> UDP: cryptokey routing by inner destination, then the account's down cap.
UDP -> TUN: the core opens (counting initiations for "under load"); then the account's up cap, the
inner-source check (a peer sends only from its own tunnel addresses), and client-to-client traffic
back out through the pump, or the packet to the TUN. Drops are counted by reason, never logged.
"""

from __future__ import annotations

from functools import partial

from vpncore.net.pump import Link
from vpncore.proto.constants import MSG_INITIATION, INITIATION_LEN, VNET_HDR_LEN

# offsets of the inner addresses behind the virtio_net_hdr
V4_SRC, V4_DST, V6_SRC, V6_DST = VNET_HDR_LEN + 12, VNET_HDR_LEN + 16, VNET_HDR_LEN + 8, VNET_HDR_LEN + 24


class PeerInfo:
    """What the policy layer attaches to a live peer: its tunnel addresses (packed), its account,
    and its Link (how the pump seals for it; its super-packet size and parity from its loss reports)."""

    __slots__ = ("addresses", "allowed", "account", "link", "__weakref__")

    def __init__(self, account=None, link: Link | None = None):
        self.link = link
        self.addresses = []     # ipaddress objects
        self.allowed = set()    # packed bytes, for the inner-source check
        self.account = account  # policy.AccountState, or None for a [[client]] without an account

    def __repr__(self) -> str:
        return "PeerInfo(...)"

    def __reduce__(self):
        raise TypeError("session state is memory-only")


def new_link(peer, chunk: int) -> Link:
    """The pump's Link for one of the core's peers: it seals straight through the peer's Tunnel
    (one call per TUN read, not three through proto.encrypt_frames)."""
    tunnel = peer.tunnel
    return Link(tunnel.seal_read, partial(setattr, tunnel, "add_parity"), chunk)


class ServerSide:
    """The Side (pump.Side) of vpnd: `routes` maps packed tunnel addresses to the core's peers."""

    def __init__(self, proto, routes: dict, counters, client_to_client: bool, events, flush):
        self.proto = proto
        self.routes = routes
        self.counters = counters
        self.client_to_client = client_to_client
        self._events = events      # the shell's event handler, called when the core has events
        self.after_batch = flush   # the core's queued datagrams out
        self.initiations = 0       # since the shell last looked (its "under load" policy)
        self._receive = proto.receive_datagram
        self._receive_train = proto.receive_train
        self.pump = None           # set once the pump exists (client-to-client goes back out through it)

    # --- TUN -> UDP --------------------------------------------------------------------------------
    def route(self, read: bytes, now: float):
        if len(read) <= VNET_HDR_LEN:
            return None
        if read[VNET_HDR_LEN] >> 4 == 4:
            peer = self.routes.get(read[V4_DST:V4_DST + 4])
        else:
            peer = self.routes.get(read[V6_DST:V6_DST + 16])
        if peer is None:
            self.counters["no-route"] += 1
            return None
        return self._to(peer, read, now)

    def _to(self, peer, packet, now: float):
        info = peer.app
        acct = info.account
        if acct is not None:
            if self._over_cap(acct.down, packet, now):
                return None
            acct.bytes_out += len(packet)
        ep = peer.endpoint
        if ep is None:
            return None
        return info.link, ep

    def _over_cap(self, bucket, packet, now: float) -> bool:
        """The plan's token bucket for this direction (None: uncapped) refuses the packet."""
        if bucket is None or bucket.take(len(packet), now):
            return False
        self.counters["bandwidth-cap"] += 1
        return True

    # --- UDP -> TUN --------------------------------------------------------------------------------
    def open(self, dg: bytes, src: tuple, now: float):
        if dg and dg[0] == MSG_INITIATION:
            self.initiations += 1
        return self._receive(dg, src[:2], now)

    def open_train(self, buf: bytes, seg: int, src: tuple, now: float):
        if seg == INITIATION_LEN:     # a flood from one source arrives as trains too
            self.initiations += sum(buf[i] == MSG_INITIATION for i in range(0, len(buf), seg))
        return self._receive_train(buf, seg, src[:2], now)

    def events(self, now: float) -> None:
        if self.proto.has_events:
            self._events(now)

    def deliver(self, item, now: float):
        """Cryptokey routing: the inner source must be the sender's address; then to a peer or the TUN.

        `item` is (peer, packet): virtio_net_hdr + IP packet, as our TUN takes it (bytes, or a
        memoryview of a super-packet's plaintext without its padding)."""
        peer, packet = item
        info = peer.app
        if info is None:
            self.counters["inner-source"] += 1
            return None
        acct = info.account
        if acct is not None:
            if self._over_cap(acct.up, packet, now):
                return None
            acct.bytes_in += len(packet)
        v = packet[VNET_HDR_LEN] >> 4
        if v == 4:
            src, dst = bytes(packet[V4_SRC:V4_SRC + 4]), bytes(packet[V4_DST:V4_DST + 4])
        elif v == 6:
            src, dst = bytes(packet[V6_SRC:V6_SRC + 16]), bytes(packet[V6_DST:V6_DST + 16])
        else:
            self.counters["inner-version"] += 1
            return None
        if src not in info.allowed:
            self.counters["inner-source"] += 1
            return None
        other = self.routes.get(dst)
        if other is None:
            return packet
        if not self.client_to_client:
            self.counters["client-to-client"] += 1
            return None
        packet = bytes(packet)
        dest = self._to(other, packet, now)
        if dest is not None:
            self.pump.forward(dest[0], dest[1], packet, now)
        return None
