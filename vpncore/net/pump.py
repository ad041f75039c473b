"""The packet pump (DESIGN §1, §3): the only hot loops in the repository, shared by vpnd and vpnclient.

A shell hands the pump its policy as a Side (below); the pump owns the batching, the held sends, the
TUN writer thread, the cutting of super-packets, the parity decision and the containment. In the
order a packet meets them:

TUN -> UDP (tun_to_udp, one task)
  1. wait_readable(tun): one await per batch; then os.read until BlockingIOError, a read error
     (counted: read_errors) or PumpLimits.reads / PumpLimits.bytes.
  2. side.route(read, now) -> (Link, endpoint) | None: where the read goes. vpnd: cryptokey routing
     by inner destination and the plan's down cap; vpnclient: its one server (endpoint None: the
     connected socket). None: dropped, the side counted why.
  3. _send: a read bigger than SPLIT_ABOVE is cut into smaller TCP super-packets while the link's
     governor is small (GsoGovernor.pieces); link.seal(piece, now, link.chunk) seals each as one AEAD
     message, or as fragments with a parity fragment while the governor asks for parity.
  4. HeldSends: single datagrams wait per endpoint and leave as GSO trains (PumpLimits.hold);
     a super-packet's fragments leave at once as one train, after the singles held before them.
  5. End of batch: held.flush().

UDP -> TUN (udp_to_tun, one task per socket)
  1. wait_readable(sock); then Udp.recv_trains(PumpLimits.reads, PumpLimits.bytes): a GRO train
     whole with its segment size, or a single datagram.
  2. side.open(dg, src, now) / side.open_train(buf, seg, src, now): the core authenticates and opens
     (an item for deliver, or None; a list of items for a train).
  3. side.events(now): the core's events (session started, loss reported, config), BEFORE delivery,
     on both paths: the datagram that confirms a session may carry its first packet.
  4. side.deliver(item, now) -> packet | None: the side's policy (vpnd: up cap, inner source,
     client-to-client through Pump.forward); the packet to write to the TUN, or None.
  5. TunWriter.write: small packets inline while the writer is idle, super-packets by its thread,
     always in order.
  6. End of batch: side.after_batch(now): the core's queued handshake and control datagrams out.

A bug met by one read or one datagram costs that read or datagram, never the pump: it is counted
(PumpStats.contained) the same way on both ends. A peer's loss reports go to Link.loss_report, the
one place that decides super-packet size and parity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from time import monotonic
from typing import Any, Callable, Iterable, Optional, Protocol

import trio

from vpncore.proto.constants import VNET_HDR_LEN

from ..proto.loss import SPLIT_ABOVE, GsoGovernor
from .tunwriter import TunWriter
from .udp import HeldSends, Udp, UdpSet

__all__ = ["Link", "Pump", "PumpLimits", "PumpStats", "Side", "TUN_READ_SIZE", "Udp", "UdpSet"]

TUN_READ_SIZE = 65536 + VNET_HDR_LEN     # a super-packet and its virtio_net_hdr; shorter buffers truncate


@dataclass(frozen=True)
class PumpLimits:
    """Implementation constants of the pump, passed in (never read from the environment).

    reads/bytes: what one wakeup of a loop handles before it yields to the other direction. A packet
    waiting to go the other way (a ping reply, a TCP ACK) waits for the rest of the batch. Measured
    (bench/e2e.py --reps 2 --seconds 5, ping p99 during a TCP upload): 256 reads of up to 64 KiB,
    10.6-10.8 ms (wireguard-go 8.6-9.0); 16 reads, 8.1-8.6 ms; 8 reads, 7.2-7.9 ms, with TCP up
    2,877-2,966 vs 2,994-3,037 Mbit/s. Bytes, not reads, so that small datagrams (a handshake flood)
    still come 256 to a wakeup.
    hold: single datagrams held for a train before they leave (HeldSends).
    tun_thread: super-packets written to the TUN from the writer thread (TunWriter); tun_queue: at
    most that many wait for it."""

    reads: int = 256
    bytes: int = 8 << 16
    hold: int = 32
    tun_thread: bool = True
    tun_queue: int = 8


@dataclass(frozen=True)
class PumpStats:
    """Cumulative counts since the pump was made."""

    tun_reads: int
    tun_read_errors: int
    contained: int            # reads and datagrams that met a bug (an exception), dropped
    tun_write_errors: int
    tun_write_dropped: int    # refused with the writer thread stalled
    udp_errors: int           # failed sends and receives on the tunnel sockets


class Link:
    """One peer as the pump sends to it: its sealer, fragment size and governor (size, parity).

    `seal(piece, now, chunk)` returns the datagrams of one TUN read (the core's encrypt_frames);
    `set_parity(on)` tells the core to add parity fragments. The governor decides both from the
    peer's loss reports (proto/loss.py), here and nowhere else."""

    __slots__ = ("seal", "chunk", "gso", "_set_parity", "__weakref__")

    def __init__(self, seal: Callable, set_parity: Callable[[bool], Any], chunk: int):
        self.seal = seal
        self.chunk = chunk          # fragment payload; the reference's is MTU + 16 (SPEC §5.5)
        self.gso = GsoGovernor()
        self._set_parity = set_parity
        set_parity(self.gso.parity)

    def loss_report(self, done: int, lost: int, repaired: int = 0) -> None:
        self.gso.report(done, lost, repaired)
        self._set_parity(self.gso.parity)

    def rebind(self, seal: Callable, set_parity: Callable[[bool], Any]) -> None:
        """The same peer over a new connection (the client's failover): the governor carries over."""
        self.seal, self._set_parity = seal, set_parity
        set_parity(self.gso.parity)


class Side(Protocol):
    """What a shell hands the pump (vpnd.datapath.ServerSide, vpnclient.client.ClientSide)."""

    def route(self, read: bytes, now: float) -> Optional[tuple[Link, Any]]: ...
    def open(self, dg: bytes, src: tuple, now: float) -> Any: ...
    def open_train(self, buf: bytes, seg: int, src: tuple, now: float) -> Iterable[Any]: ...
    def events(self, now: float) -> None: ...
    def deliver(self, item: Any, now: float) -> Any: ...
    def after_batch(self, now: float) -> None: ...


class Pump:
    """Moves packets between one TUN fd and a set of UDP sockets for one Side."""

    def __init__(self, tun_fd: int, udps: UdpSet, side: Side, limits: PumpLimits = PumpLimits()):
        self.fd = tun_fd
        self.side = side
        self.limits = limits
        self.writer = TunWriter(tun_fd, limits.tun_queue)
        self.writer.threaded = limits.tun_thread
        self.tun_reads = self.tun_read_errors = self.contained = 0
        self._udp_errors_before = 0      # of the sockets replaced by set_udps
        self.udps = udps
        self._connected, self._v4, self._v6 = udps.all[0], udps.v4, udps.v6

    def set_udps(self, udps: UdpSet) -> None:
        """New sockets (the client re-opens or switches servers); call while the loops are stopped."""
        self._udp_errors_before += sum(u.errors for u in self.udps.all)
        self.udps = udps
        self._connected, self._v4, self._v6 = udps.all[0], udps.v4, udps.v6

    def threaded(self, on: bool) -> None:
        """Hand super-packets to the writer thread (on), or write everything inline (off; vpnd under
        a handshake flood, when both cores are busy and hand-overs cost more than they gain)."""
        self.writer.threaded = on and self.limits.tun_thread

    async def run(self) -> None:
        """Both directions until cancelled: one task for the TUN, one per socket."""
        async with trio.open_nursery() as nursery:
            for udp in self.udps.all:
                nursery.start_soon(self.udp_to_tun, udp)
            nursery.start_soon(self.tun_to_udp)

    # --- TUN -> UDP ------------------------------------------------------------------------------
    async def tun_to_udp(self) -> None:
        fd, read, size = self.fd, os.read, TUN_READ_SIZE
        reads, cap = self.limits.reads, self.limits.bytes
        route, send = self.side.route, self._send
        held = HeldSends(self.limits.hold)
        hold = held.send
        wait = trio.lowlevel.wait_readable
        while True:
            await wait(fd)
            now = monotonic()
            got = count = 0
            for _ in range(reads):
                if got >= cap:
                    break
                try:
                    packet = read(fd, size)
                except BlockingIOError:
                    break
                except OSError:
                    self.tun_read_errors += 1
                    break
                got += len(packet)
                count += 1
                try:     # containment: a bug met by one read costs that read
                    dest = route(packet, now)
                    if dest is not None:
                        send(dest[0], dest[1], packet, now, hold)
                except Exception:
                    self.contained += 1
            self.tun_reads += count
            packet = dest = None     # forget fast: no packet lingers in this frame between batches
            try:
                held.flush()
            except Exception:
                self.contained += 1

    def forward(self, link: Link, ep, packet: bytes, now: float) -> None:
        """A packet that came in for another peer (vpnd's client-to-client): out at once."""
        self._send(link, ep, packet, now, _send_now)

    def _send(self, link: Link, ep, packet: bytes, now: float, send: Callable) -> None:
        if ep is None:
            udp = self._connected
        else:
            udp = self._v6 if ":" in ep[0] else self._v4
            if udp is None:
                return
        pieces = link.gso.pieces(packet) if len(packet) > SPLIT_ABOVE else (packet,)
        seal, chunk = link.seal, link.chunk
        for piece in pieces:
            frames = seal(piece, now, chunk)
            if frames:
                send(udp, frames, ep)

    # --- UDP -> TUN ------------------------------------------------------------------------------
    async def udp_to_tun(self, udp: Udp) -> None:
        side = self.side
        open_one, open_train, events, deliver = side.open, side.open_train, side.events, side.deliver
        write = self.writer.write
        recv_trains = udp.recv_trains
        reads, cap = self.limits.reads, self.limits.bytes
        wait = trio.lowlevel.wait_readable
        while True:
            await wait(udp.sock)
            now = monotonic()
            for dg, src, seg in recv_trains(reads, cap):
                try:     # containment: a bug met by one datagram (or train) costs it, never the pump
                    if seg:        # a GRO train: whole super-packets in one step
                        items = open_train(dg, seg, src, now)
                        events(now)
                        for item in items:
                            packet = deliver(item, now)
                            if packet is not None:
                                write(packet)
                    else:
                        item = open_one(dg, src, now)
                        events(now)
                        if item is not None:
                            packet = deliver(item, now)
                            if packet is not None:
                                write(packet)
                except Exception:
                    self.contained += 1
            # forget fast: no sender address or packet lingers in this frame between batches
            dg = src = item = items = packet = None
            try:
                side.after_batch(now)
            except Exception:
                self.contained += 1

    # --- the rest --------------------------------------------------------------------------------
    def statistics(self) -> PumpStats:
        w = self.writer
        return PumpStats(self.tun_reads, self.tun_read_errors, self.contained, w.errors, w.dropped,
                         self._udp_errors_before + sum(u.errors for u in self.udps.all))

    def close(self) -> None:
        """Stop the writer thread after the packets handed to it (before the TUN fd closes)."""
        self.writer.close()


def _send_now(udp: Udp, frames: list, ep) -> None:
    udp.send(frames, ep)
