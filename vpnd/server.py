"""vpnd's runtime: the TUN device, the UDP sockets and the loops between them (DESIGN §1, §3).

Policy lives here (address pools, cryptokey routing, what is pushed to clients);
the protocol lives in vpncore.proto.server. Hot loops await once per batch and
never log: they count.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter

import trio

from vpncore.log import Log
from vpncore.net import tun as tunlib
from vpncore.net.udp import open_listener
from vpncore.proto import control
from vpncore.proto.constants import CONTROL_VERSION, MSG_INITIATION
from vpncore.proto.events import ControlReceived, SessionEnded, SessionStarted
from vpncore.proto.server import ServerProtocol

from .config import ServerConfig
from .pool import AddressPool

BATCH = 256
TICK = 0.25
UNDER_LOAD_INITIATIONS_PER_TICK = 64
RECV_SIZE = 65535


class PeerInfo:
    """What the policy layer attaches to a live peer: its tunnel addresses (packed)."""

    __slots__ = ("addresses", "allowed", "__weakref__")

    def __init__(self):
        self.addresses = []     # ipaddress objects
        self.allowed = set()    # packed bytes, for the inner-source check

    def __repr__(self) -> str:
        return "PeerInfo(...)"

    def __reduce__(self):
        raise TypeError("session state is memory-only")


class Server:
    def __init__(self, cfg: ServerConfig, log: Log, rng=os.urandom):
        self.cfg = cfg
        self.log = log
        self.proto = ServerProtocol(private_key=cfg.private_key, rng=rng)
        for c in cfg.clients:
            self.proto.authorize(c.public_key, c.psk)
        self.pools = [AddressPool(n) for n in (cfg.pool4, cfg.pool6) if n is not None]
        self.routes: dict[bytes, object] = {}      # packed tunnel address -> Peer
        self.counters: Counter[str] = Counter()
        self.sessions_started = 0
        self.tun = None
        self.socks: list[socket.socket] = []
        self._sock_by_family: dict[int, socket.socket] = {}
        self._initiations = 0
        self._stop = trio.Event()

    def __repr__(self) -> str:
        return "<vpnd Server>"

    # --- set-up ------------------------------------------------------------
    def open(self) -> None:
        """Open sockets first (a port in use fails before any device exists), then the TUN."""
        for host, port in self.cfg.listen:
            s = open_listener(host, port)
            self.socks.append(s)
            self._sock_by_family.setdefault(s.family, s)
        self.tun = tunlib.open_tun(self.cfg.interface)
        name = self.tun.name
        tunlib.set_mtu(name, self.cfg.mtu)
        tunlib.link_up(name)
        for pool in self.pools:
            tunlib.add_address(name, pool.server_interface())

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()
        if self.tun is not None:
            self.tun.close()   # the kernel removes the device, its addresses and routes
            self.tun = None

    # --- the loops --------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.open()
        try:
            async with trio.open_nursery() as nursery:
                for s in self.socks:
                    nursery.start_soon(self._udp_loop, s)
                nursery.start_soon(self._tun_loop)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._signal_loop)
                self.log.event("started")
                task_status.started(self)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.proto.close_all(time.monotonic())
            self._flush()
            self.close()
            self.log.event("stopped")

    def stop(self) -> None:
        self._stop.set()

    async def _signal_loop(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.log.event("stopping")
                self._stop.set()
                return

    async def _udp_loop(self, sock: socket.socket) -> None:
        recv = sock.recvfrom
        proto = self.proto
        receive = proto.receive_datagram
        deliver = self._deliver
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = time.monotonic()
            for _ in range(BATCH):
                try:
                    dg, src = recv(RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    self.counters["udp-recv-error"] += 1
                    continue
                if dg and dg[0] == MSG_INITIATION:
                    self._initiations += 1
                res = receive(dg, src[:2], now)
                if proto.has_events:
                    self._handle_events(now)
                if res is not None:
                    deliver(res[0], res[1], now)
            self._flush()

    def _deliver(self, peer, packet: bytes, now: float) -> None:
        """Cryptokey routing: the inner source must be the sender's address; then to a peer or the TUN."""
        info = peer.app
        v = packet[0] >> 4
        if v == 4:
            src, dst = packet[12:16], packet[16:20]
        elif v == 6:
            src, dst = packet[8:24], packet[24:40]
        else:
            self.counters["inner-version"] += 1
            return
        if info is None or src not in info.allowed:
            self.counters["inner-source"] += 1
            return
        other = self.routes.get(dst)
        if other is not None:
            if not self.cfg.client_to_client:
                self.counters["client-to-client"] += 1
                return
            self._send_to(other, packet, now)
            return
        try:
            os.write(self.tun.fd, packet)
        except OSError:
            self.counters["tun-write-error"] += 1

    def _send_to(self, peer, packet: bytes, now: float) -> None:
        dg = self.proto.encrypt(peer, packet, now)
        ep = peer.endpoint
        if dg is None or ep is None:
            return
        sock = self._sock_by_family.get(socket.AF_INET6 if ":" in ep[0] else socket.AF_INET)
        try:
            sock.sendto(dg, ep)
        except (BlockingIOError, OSError):
            self.counters["udp-send-error"] += 1

    async def _tun_loop(self) -> None:
        fd = self.tun.fd
        read = os.read
        routes = self.routes
        send_to = self._send_to
        while True:
            await trio.lowlevel.wait_readable(fd)
            now = time.monotonic()
            for _ in range(BATCH):
                try:
                    packet = read(fd, RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    self.counters["tun-read-error"] += 1
                    break
                v = packet[0] >> 4 if packet else 0
                peer = routes.get(packet[16:20] if v == 4 else packet[24:40])
                if peer is None:
                    self.counters["no-route"] += 1
                    continue
                send_to(peer, packet, now)

    async def _timer_loop(self) -> None:
        while True:
            await trio.sleep(TICK)
            now = time.monotonic()
            load = self._initiations > UNDER_LOAD_INITIATIONS_PER_TICK
            if load and not self.proto.under_load:
                self.log.event("under-load")
            self.proto.under_load = load
            self._initiations = 0
            self.proto.handle_timer(now)
            self._handle_events(now)
            self._flush()

    # --- events and policy --------------------------------------------------------
    def _flush(self) -> None:
        for ep, dg in self.proto.datagrams_to_send():
            sock = self._sock_by_family.get(socket.AF_INET6 if ":" in ep[0] else socket.AF_INET)
            if sock is None:
                continue
            try:
                sock.sendto(dg, ep)
            except OSError:
                self.counters["udp-send-error"] += 1

    def _handle_events(self, now: float) -> None:
        while (ev := self.proto.next_event()) is not None:
            if isinstance(ev, SessionStarted):
                self._start_session(ev.peer, now)
            elif isinstance(ev, SessionEnded):
                self._end_session(ev.peer)
            elif isinstance(ev, ControlReceived):
                if ev.msg["type"] == "hello" and ev.peer.app is not None:
                    self.proto.send_control(ev.peer, self._config_for(ev.peer), now)

    def _start_session(self, peer, now: float) -> None:
        info = PeerInfo()
        for pool in self.pools:
            addr = pool.allocate()
            if addr is None:
                for a in info.addresses:
                    self._release(a)
                self.counters["pool-exhausted"] += 1
                self.proto.end_peer(peer, "no free tunnel address on this server", now)
                return
            info.addresses.append(addr)
            info.allowed.add(addr.packed)
            self.routes[addr.packed] = peer
        peer.app = info
        self.sessions_started += 1
        self.log.event("session-started", active=len(self.proto.peers))

    def _release(self, addr) -> None:
        self.routes.pop(addr.packed, None)
        for pool in self.pools:
            if addr.version == pool.network.version:
                pool.release(addr)

    def _end_session(self, peer) -> None:
        info = peer.app
        if info is not None:
            for addr in info.addresses:
                self._release(addr)
            info.addresses.clear()
            info.allowed.clear()
        peer.app = None
        self.log.event("session-ended", active=len(self.proto.peers))

    def _config_for(self, peer) -> dict:
        msg = {"type": "config", "version": CONTROL_VERSION, "mtu": self.cfg.mtu,
               "routes": [str(p.network) for p in self.pools] + list(self.cfg.push_routes),
               "dns": list(self.cfg.dns), "features": []}
        for addr, pool in zip(peer.app.addresses, self.pools):
            msg["ipv4" if addr.version == 4 else "ipv6"] = pool.interface(addr)
        return msg
