"""Test helpers for the sans-IO core (DESIGN §5): seeded randomness, a client/server pair,
a fake link that moves datagrams between them, a seeded lossy link, and IP packet builders.

    server, client, src = pair(seed=1)
    client.connect(now)
    to_server, to_client = shuttle(server, client, src, now)

Datagrams travel as (address, datagram) items in both directions: client->server items carry
the client's source address, server->client items the server's chosen endpoint. A link is any
callable `link(direction, items) -> items` with direction "c2s" or "s2c"; it may hold items back
(then it exposes `holding() -> bool` and releases them on a later call).
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import Callable

from vpncore.proto.client import ClientConnection
from vpncore.proto.noise import public_key
from vpncore.proto.server import ServerProtocol

# The small-order Curve25519 points, as 32-byte little-endian u-coordinates: the list libsodium
# rejects in has_small_order() (crypto_scalarmult/curve25519/ref10/x25519_ref10.c), the same set
# WireGuard's and libsodium's tests use: 0, 1, the two points of order 8, p-1, p, p+1.
P = 2**255 - 19
LOW_ORDER_POINTS = [
    (0).to_bytes(32, "little"),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (P - 1).to_bytes(32, "little"),
    P.to_bytes(32, "little"),
    (P + 1).to_bytes(32, "little"),
]

C2S, S2C = "c2s", "s2c"
DEFAULT_SRC = ("198.18.0.2", 51820)
MAX_ROUNDS = 64


def seeded_rng(seed) -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom: the same seed gives the same byte stream."""
    r = random.Random(f"rng:{seed}")
    return r.randbytes


def keypair_from(seed) -> tuple[bytes, bytes]:
    """A deterministic (private, public) X25519 key pair."""
    private = random.Random(f"key:{seed}").randbytes(32)
    return private, public_key(private)


def pair(seed=0, *, src=DEFAULT_SRC, psk: bytes | None = None, wall_offset: float = 1.7e9,
         features=("test",), persistent_keepalive: float = 0, vnet_hdr: bool = True):
    """(server, client, client src): a server that has authorized the client's key; not yet connected.

    Both sides have a virtio_net_hdr TUN by default, as vpnd and vpnclient ship (super-packets, SPEC
    §5.5): delivered packets start with the 10-byte header. vnet_hdr=False gives the plain TUN mode.
    """
    server_private, server_public = keypair_from(f"server:{seed}")
    client_private, client_public = keypair_from(f"client:{seed}")
    extra = {"vnet_hdr": True} if vnet_hdr else {}
    server = ServerProtocol(private_key=server_private, rng=seeded_rng(f"server:{seed}"), **extra)
    server.authorize(client_public, psk)
    client = ClientConnection(private_key=client_private, server_public=server_public,
                              rng=seeded_rng(f"client:{seed}"), psk=psk, wall_offset=wall_offset,
                              features=features, persistent_keepalive=persistent_keepalive, **extra)
    return server, client, src


def drain_events(proto) -> list:
    """All events queued on a client or server, oldest first."""
    out = []
    while (ev := proto.next_event()) is not None:
        out.append(ev)
    return out


def shuttle(server, client, src, now: float, link=None, *, inject=(), rounds: int = MAX_ROUNDS):
    """Move datagrams both ways until nothing is pending (at most `rounds` exchanges).

    `inject` is extra (direction, address, datagram) items sent in the first round, e.g. what
    server_send() returns or a forged datagram. Returns (to_server, to_client): the IP packets the
    server and the client delivered to their TUN, in order. Server datagrams addressed to any
    endpoint other than `src` are lost (the client is not there any more). Raises AssertionError
    if the exchange does not go quiet.
    """
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    extra = [item for item in inject if item is not None]
    for _ in range(rounds):
        c2s = [(a, dg) for d, a, dg in extra if d == C2S] + [(src, dg) for dg in client.datagrams_to_send()]
        s2c = [(a, dg) for d, a, dg in extra if d == S2C] + list(server.datagrams_to_send())
        extra = []
        if link is not None:
            c2s = link(C2S, c2s)
            s2c = link(S2C, s2c)
        if not c2s and not s2c and not _holding(link):
            return to_server, to_client
        for addr, dg in c2s:
            got = server.receive_datagram(dg, addr, now)
            if got is not None:
                to_server.append(got[1])
        for addr, dg in s2c:
            if addr != src:
                continue
            got = client.receive_datagram(dg, now)
            if got is not None:
                to_client.append(got)
    raise AssertionError(f"shuttle did not go quiet in {rounds} rounds")


def server_send(server, peer, packet: bytes, now: float):
    """Encrypt one packet to `peer`: an inject item for shuttle(), or None (no session)."""
    dg = server.encrypt(peer, packet, now)
    return None if dg is None else (S2C, peer.endpoint, dg)


def _holding(link) -> bool:
    holding = getattr(link, "holding", None)
    return bool(holding()) if holding is not None else False


def connect(server, client, src, now: float, link=None) -> None:
    """Run the first handshake at `now` and check both sides agree a session exists."""
    client.connect(now)
    shuttle(server, client, src, now, link)
    assert client.state == "established", client.state
    assert client.public in server.peers


MIN_CONFIG = {"type": "config", "version": 1, "routes": [], "dns": [], "mtu": 1420}


def established_pair(seed=0, now: float = 0.0, **kw):
    """pair() plus a completed handshake at `now`, answered by a config as vpnd's policy layer does
    (else the client keeps re-sending its hello); events of the handshake are drained."""
    server, client, src = pair(seed, **kw)
    connect(server, client, src, now)
    server.send_control(server.peers[client.public], MIN_CONFIG, now)
    shuttle(server, client, src, now)
    drain_events(server)
    drain_events(client)
    return server, client, src


SUPER_CONFIG = dict(MIN_CONFIG, features=["superpacket", "parity"])


def agreed_pair(seed=0):
    """established_pair() with the offload header on, and super-packets and parity agreed by a
    config: what vpnd and vpnclient ship. Returns (server, client, src, the server's peer)."""
    server, client, src = established_pair(seed=seed, vnet_hdr=True)
    peer = server.peers[client.public]
    server.send_control(peer, SUPER_CONFIG, 0.0)
    shuttle(server, client, src, 0.0)
    drain_events(client)
    return server, client, src, peer


def fire_timers(server, client, now: float) -> None:
    """What an endpoint does: the client's timer when due (get_timer), the server's every tick."""
    due = client.get_timer()
    if due is not None and now >= due:
        client.handle_timer(now)
    server.handle_timer(now)


def fire_due_timers(server, client, now: float) -> None:
    """What an endpoint that sleeps until the next deadline does: each side's handle_timer only
    when its get_timer() is due (client may be None)."""
    for proto in (server, client):
        if proto is None:
            continue
        due = proto.get_timer()
        if due is not None and now >= due:
            proto.handle_timer(now)


def tick(server, client, src, now: float, link=None):
    """Fire due timers at `now` and shuttle what they produce."""
    fire_timers(server, client, now)
    return shuttle(server, client, src, now, link)


def run_until(server, client, src, start: float, end: float, step: float = 0.5, link=None, each=None):
    """Advance time from start to end (inclusive) in steps: due timers, then `each(now)`, then shuttle.

    `each(now)` may queue client traffic and return inject items for shuttle (or None).
    Returns (to_server, to_client) accumulated over the whole run.
    """
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    n = 0
    now = start
    while now <= end + 1e-9:
        fire_timers(server, client, now)
        inject = each(now) if each is not None else None
        a, b = shuttle(server, client, src, now, link, inject=inject or ())
        to_server += a
        to_client += b
        n += 1
        now = start + n * step
    return to_server, to_client


class LossyLink:
    """A seeded link that drops, duplicates and reorders datagrams in both directions."""

    def __init__(self, seed, drop: float = 0.1, dup: float = 0.05, reorder: float = 0.1):
        self._r = random.Random(f"link:{seed}")
        self.drop, self.dup, self.reorder = drop, dup, reorder
        self._held: dict[str, list] = {C2S: [], S2C: []}
        self.dropped = self.duplicated = self.reordered = 0

    def holding(self) -> bool:
        return bool(self._held[C2S] or self._held[S2C])

    def __call__(self, direction: str, items: list) -> list:
        released, self._held[direction] = self._held[direction], []
        out = []
        for item in items:
            x = self._r.random()
            if x < self.drop:
                self.dropped += 1
                continue
            if x < self.drop + self.reorder:
                # held back: it arrives after the next batch in this direction
                self.reordered += 1
                self._held[direction].append(item)
                continue
            out.append(item)
            if self._r.random() < self.dup:
                self.duplicated += 1
                out.insert(self._r.randrange(len(out) + 1), item)
        # within a batch, swap neighbours now and then as well
        for i in range(len(out) - 1):
            if self._r.random() < self.reorder:
                out[i], out[i + 1] = out[i + 1], out[i]
        return out + released


def lossy_link(seed, drop: float = 0.1, dup: float = 0.05, reorder: float = 0.1) -> LossyLink:
    return LossyLink(seed, drop=drop, dup=dup, reorder=reorder)


def blocking_link(*, c2s: Callable[[bytes], bool] = lambda dg: False,
                  s2c: Callable[[bytes], bool] = lambda dg: False):
    """A link that drops the datagrams for which the direction's predicate is true."""
    def link(direction, items):
        drop = c2s if direction == C2S else s2c
        return [(a, dg) for a, dg in items if not drop(dg)]
    return link


# --- IP packets ---------------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_packet(src: str = "10.8.0.2", dst: str = "10.8.0.1", payload: bytes = b"", proto: int = 17,
                ttl: int = 64, ident: int = 0) -> bytes:
    """A valid IPv4 packet: 20-byte header with total length and header checksum, then payload."""
    total = 20 + len(payload)
    if total > 65535:
        raise ValueError("payload too long for IPv4")
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xFFFF, 0, ttl, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6_packet(src: str = "fd00::2", dst: str = "fd00::1", payload: bytes = b"", next_header: int = 17,
                hop_limit: int = 64) -> bytes:
    """A valid IPv6 packet: 40-byte header with payload length, then payload."""
    if len(payload) > 65535:
        raise ValueError("payload too long for IPv6")
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit,
                      ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return hdr + payload


def udp_payload(n: int, tag: int = 0) -> bytes:
    """n bytes of recognisable payload (tag in the first 4 bytes when n >= 4)."""
    body = struct.pack("!I", tag & 0xFFFFFFFF) + bytes((tag + i) & 0xFF for i in range(max(0, n - 4)))
    return body[:n]
