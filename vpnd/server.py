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
import gc
import random
from collections import Counter

import trio

from vpncore.log import Log
from vpncore.net import ctlsock
from vpncore.net import tun as tunlib
from vpncore.net.gsosize import SPLIT_ABOVE, GsoGovernor, tun_gso_max_size
from vpncore.net.pump import BATCH_BYTES, BATCH_READS, HeldSends, TunWriter, Udp
from vpncore.net.udp import open_listener
from vpncore.proto.constants import (
    CONTROL_VERSION, FEATURE_PARITY, FEATURE_SUPERPACKET, INITIATION_LEN, MSG_INITIATION, VNET_HDR_LEN,
)
from vpncore.proto.events import ControlReceived, LossReported, SessionEnded, SessionStarted
from vpncore.proto.server import ServerProtocol

from vpncore.userror import UserError

from .config import ServerConfig, pushed_routes
from .dns import DnsForwarder
from .forget import forget_freed
from . import conntrack
from .egress import Egress
from .policy import Policy
from .pool import AddressPool
from .stats import DailyStats

TICK = 0.25
UNDER_LOAD_INITIATIONS_PER_TICK = 64
# Cookie replies per tick under load (24,576/s). One costs ~7 us of Python plus a sendto: this bounds
# what a flood of valid-mac1 initiations can take from the data path (~30% of a core); beyond it,
# initiations are dropped unanswered ("cookie-budget"), and a legitimate client's chance of a reply
# to one initiation is this budget over the flood's rate.
COOKIE_REPLIES_PER_TICK = 6144
TUN_READ_SIZE = 65536 + VNET_HDR_LEN
# offsets of the inner addresses behind the virtio_net_hdr
V4_SRC, V4_DST, V6_SRC, V6_DST = VNET_HDR_LEN + 12, VNET_HDR_LEN + 16, VNET_HDR_LEN + 8, VNET_HDR_LEN + 24


class PeerInfo:
    """What the policy layer attaches to a live peer: its tunnel addresses (packed)."""

    __slots__ = ("addresses", "allowed", "account", "gso", "__weakref__")

    def __init__(self, account=None):
        self.gso = GsoGovernor()   # this peer's super-packet size and parity, from its loss reports
        self.addresses = []     # ipaddress objects
        self.allowed = set()    # packed bytes, for the inner-source check
        self.account = account  # policy.AccountState, or None for a [[client]] without an account

    def __repr__(self) -> str:
        return "PeerInfo(...)"

    def __reduce__(self):
        raise TypeError("session state is memory-only")


class Server:
    # memory (vpnd/forget.py): overwrite freed blocks that may hold an ended session's endpoint,
    # from the timer, at most once a second and only after a session ended
    SCRUB_EVERY = 1.0
    _scrub_due = False
    _scrub_at = 0.0
    scrubs = 0

    def __init__(self, cfg: ServerConfig, log: Log, rng=os.urandom, test_hooks: bool = False):
        self.cfg = cfg
        self.log = log
        self.stats = DailyStats()
        self._reported = (0, 0)          # proto byte totals already added to the day's figures
        self.test_hooks = test_hooks     # only tests set this (VPND_TEST_HOOKS=1): gc-scan command
        self.fault_rate = 0.0            # tests only (VPND_TEST_FAULT_RATE): fail this share of packets
        self.proto = ServerProtocol(private_key=cfg.private_key, rng=rng, vnet_hdr=True)
        self.chunk = cfg.mtu + 16   # fragment payload: a fragment is as big as a full-MTU data datagram
        self.pools = [AddressPool(n) for n in (cfg.pool4, cfg.pool6) if n is not None]
        self.egress = Egress(cfg.interface, [p.network for p in self.pools],
                             cfg.egress_by_family or cfg.egress_interface,
                             cfg.block_tcp_ports, cfg.block_server_networks, cfg.blocked_networks,
                             full_tunnel=cfg.full_tunnel, listen_ports=[port for _, port in cfg.listen])
        self.policy = Policy(cfg, self.egress)
        self.policy.load()
        for key, psk in self.policy.authorized().items():
            self.proto.authorize(key, psk)
        self.routes: dict[bytes, object] = {}      # packed tunnel address -> Peer
        self.counters: Counter[str] = Counter()
        self.sessions_started = 0
        self.tun = None
        self.socks: list[socket.socket] = []
        self._udp_by_family: dict[int, Udp] = {}
        self._initiations = 0
        self._send_errors = 0            # Udp.errors already counted in the day's figures
        self._udps: list[Udp] = []       # one per socket, made when the loops start
        self._stop = trio.Event()
        self._listener = None
        self.tun_writer = None
        self._held = None                # HeldSends during a TUN batch, else None
        self.cut = False                 # cut big reads while a peer reports loss (not in bench/micro)
        self._egress_seen: dict[str, int] = {}
        self.dns = None                  # DnsForwarder on the tunnel addresses (issue 6), opened in open()
        self._routes_pushed = pushed_routes(cfg)   # pools, push_routes, full tunnel defaults (checked at load)
        # Tunnel addresses of ended sessions whose conntrack entries are being deleted (a worker thread);
        # back to the pool once done. None: no conntrack clean-up (no nftables table: bench, micro).
        self._ct_queue: list | None = None
        self._ct_wake = trio.Event()

    def __repr__(self) -> str:
        return "<vpnd Server>"

    # --- set-up ------------------------------------------------------------
    def open(self) -> None:
        """Open sockets first (a port in use fails before any device exists), then the TUN; on a
        failure, close what was opened (nothing half set up)."""
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        for host, port in self.cfg.listen:
            s = open_listener(host, port)
            self.socks.append(s)
            if s.family not in self._udp_by_family:
                self._udp_by_family[s.family] = Udp(s)
        if self.cfg.control_socket:
            self._listener = ctlsock.open_listener(self.cfg.control_socket, "vpnd",
                                                   "stop it first or set a different control_socket")
        self.tun = tunlib.open_tun(self.cfg.interface, vnet_hdr=True)
        name = self.tun.name
        self.cut = True
        self.tun_writer = None if os.environ.get("VPN_TUN_INLINE") else TunWriter(self.tun.fd)
        tunlib.set_mtu(name, self.cfg.mtu)
        tunlib.set_gso_max_size(name, tun_gso_max_size(self.cfg.mtu))
        tunlib.link_up(name)
        for pool in self.pools:
            tunlib.add_address(name, pool.server_interface())
        if self.cfg.dns_forwarder:
            self.dns = DnsForwarder([str(p.server) for p in self.pools], self.cfg.dns_upstream, device=name)
            self.dns.open()
        self.egress.start()
        self._forget_conntrack()       # what a crashed run's clients, or datagrams before notrack, left
        self._ct_queue = []

    def _forget_conntrack(self) -> None:
        try:
            conntrack.forget_networks([p.network for p in self.pools], self.egress.listen_ports)
        except OSError:
            self.counters["conntrack-error"] += 1

    def close(self) -> None:
        if self.egress.active:
            self.egress.stop(quiet=True)
        if self._ct_queue is not None:
            self._ct_queue = None
            self._forget_conntrack()
        if self._listener is not None:
            self._listener.close()
            ctlsock.remove(self.cfg.control_socket)
            self._listener = None
        if self.dns is not None:
            self.dns.close()
            self.dns = None
        for s in self.socks:
            s.close()
        self.socks.clear()
        if self.tun_writer is not None:
            self.tun_writer.close()
            self.tun_writer = None
        if self.tun is not None:
            self.tun.close()   # the kernel removes the device, its addresses and routes
            self.tun = None

    # --- the loops --------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.tun is None:   # bench/micro hands in a fake TUN and loopback sockets
            self.open()
        try:
            async with trio.open_nursery() as nursery:
                for s in self.socks:
                    udp = self._udp_by_family.get(s.family)
                    if udp is None or udp.sock is not s:
                        udp = Udp(s)
                    self._udps.append(udp)
                    nursery.start_soon(self._udp_loop, udp)
                nursery.start_soon(self._tun_loop)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._signal_loop)
                if self._listener is not None:
                    nursery.start_soon(ctlsock.serve, self._listener, self._control_request)
                if self.dns is not None:
                    nursery.start_soon(self.dns.serve)
                if self._ct_queue is not None:
                    nursery.start_soon(self._conntrack_loop)
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

    async def _udp_loop(self, udp: Udp) -> None:
        proto = self.proto
        receive = proto.receive_datagram
        receive_train = proto.receive_train
        deliver = self._deliver
        recv_trains = udp.recv_trains
        fault = self.fault_rate
        while True:
            await trio.lowlevel.wait_readable(udp.sock)
            now = time.monotonic()
            for dg, src, seg in recv_trains(BATCH_READS, BATCH_BYTES):
                try:    # containment: a bug met by one datagram (or train) costs it, never the server
                    if fault and random.random() < fault:
                        raise RuntimeError("fault injected by a test")
                    if seg:        # a GRO train: whole super-packets in one step
                        if seg == INITIATION_LEN:     # a flood from one source arrives as trains too
                            self._initiations += sum(dg[i] == MSG_INITIATION for i in range(0, len(dg), seg))
                        for res in receive_train(dg, seg, src[:2], now):
                            deliver(res[0], res[1], now)
                        if proto.has_events:
                            self._handle_events(now)
                        continue
                    if dg and dg[0] == MSG_INITIATION:
                        self._initiations += 1
                    res = receive(dg, src[:2], now)
                    if proto.has_events:
                        self._handle_events(now)
                    if res is not None:
                        deliver(res[0], res[1], now)
                except Exception:
                    self.counters["internal-error"] += 1
            # forget fast: no sender address or packet lingers in this frame between batches
            dg = src = res = None
            self._flush()

    def _deliver(self, peer, packet: bytes, now: float) -> None:
        """Cryptokey routing: the inner source must be the sender's address; then to a peer or the TUN.

        `packet` is virtio_net_hdr + IP packet, as our TUN takes it (bytes, or a memoryview of a
        super-packet's plaintext without its padding)."""
        info = peer.app
        if info is None:
            self.counters["inner-source"] += 1
            return
        acct = info.account
        if acct is not None:
            if acct.up is not None and not acct.up.take(len(packet), now):
                self.counters["bandwidth-cap"] += 1
                return
            acct.bytes_in += len(packet)
        v = packet[VNET_HDR_LEN] >> 4
        if v == 4:
            src, dst = bytes(packet[V4_SRC:V4_SRC + 4]), bytes(packet[V4_DST:V4_DST + 4])
        elif v == 6:
            src, dst = bytes(packet[V6_SRC:V6_SRC + 16]), bytes(packet[V6_DST:V6_DST + 16])
        else:
            self.counters["inner-version"] += 1
            return
        if src not in info.allowed:
            self.counters["inner-source"] += 1
            return
        other = self.routes.get(dst)
        if other is not None:
            if not self.cfg.client_to_client:
                self.counters["client-to-client"] += 1
                return
            self._send_to(other, bytes(packet), now)
            return
        if self.tun_writer is not None:
            self.tun_writer.write(packet)
            return
        try:
            os.write(self.tun.fd, packet)
        except OSError:
            self.counters["tun-write-error"] += 1

    def _send_to(self, peer, packet: bytes, now: float) -> None:
        acct = peer.app.account
        if acct is not None:
            if acct.down is not None and not acct.down.take(len(packet), now):
                self.counters["bandwidth-cap"] += 1
                return
            acct.bytes_out += len(packet)
        ep = peer.endpoint
        if ep is None:
            return
        udp = self._udp_by_family[socket.AF_INET6 if ":" in ep[0] else socket.AF_INET]
        pieces = peer.app.gso.pieces(packet) if len(packet) > SPLIT_ABOVE and self.cut else (packet,)
        held = self._held
        for piece in pieces:
            frames = self.proto.encrypt_frames(peer, piece, now, self.chunk)
            if held is not None:
                held.send(udp, frames, ep)
            elif frames:
                udp.send(frames, ep)

    async def _tun_loop(self) -> None:
        fd = self.tun.fd
        read = os.read
        routes = self.routes
        send_to = self._send_to
        fault = self.fault_rate
        held = HeldSends()
        while True:
            await trio.lowlevel.wait_readable(fd)
            now = time.monotonic()
            got = 0
            self._held = held
            for _ in range(BATCH_READS):
                if got >= BATCH_BYTES:
                    break
                try:
                    packet = read(fd, TUN_READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    self.counters["tun-read-error"] += 1
                    break
                got += len(packet)
                if len(packet) <= VNET_HDR_LEN:
                    continue
                if packet[VNET_HDR_LEN] >> 4 == 4:
                    peer = routes.get(packet[V4_DST:V4_DST + 4])
                else:
                    peer = routes.get(packet[V6_DST:V6_DST + 16])
                if peer is None:
                    self.counters["no-route"] += 1
                    continue
                try:
                    if fault and random.random() < fault:
                        raise RuntimeError("fault injected by a test")
                    send_to(peer, packet, now)
                except Exception:
                    self.counters["internal-error"] += 1
            packet = peer = None
            self._held = None
            try:
                held.flush()
            except Exception:
                self.counters["internal-error"] += 1

    async def _timer_loop(self) -> None:
        while True:
            await trio.sleep(TICK)
            now = time.monotonic()
            load = self._initiations > UNDER_LOAD_INITIATIONS_PER_TICK
            if load and not self.proto.under_load:
                self.log.event("under-load")
            self.proto.under_load = load
            if self.tun_writer is not None:
                # under a handshake flood both cores are busy: hand-overs to the writer thread then
                # cost more than the overlap gains (flood test: kept 0.69-0.76 threaded, 0.72-0.82 inline)
                self.tun_writer.threaded = not load
            self.proto.cookie_budget = COOKIE_REPLIES_PER_TICK
            self._initiations = 0
            shed = resident_bytes() > self.cfg.memory_limit_mb << 20
            if shed and not self.proto.shedding:
                self.counters["memory-limit-reached"] += 1
            self.proto.shedding = shed
            if self.policy.changed():
                self.reload(now)
            self.proto.handle_timer(now)
            self._handle_events(now)
            self._flush()
            self._account()
            if self._scrub_due and now - self._scrub_at >= self.SCRUB_EVERY:
                self._scrub_due, self._scrub_at = False, now
                forget_freed()
                self.scrubs += 1
            if self.policy.nft_script:
                script, self.policy.nft_script = "".join(self.policy.nft_script), []
                if not await trio.to_thread.run_sync(self.egress.apply, script):
                    self.counters["nft-error"] += 1

    def reload(self, now: float) -> None:
        """Apply a changed accounts registry: end sessions it no longer allows, then update keys."""
        try:
            self.policy.load()
        except UserError:
            self.counters["registry-unreadable"] += 1
            return
        for peer, reason in self.policy.to_end():
            self.proto.end_peer(peer, reason, now, retry=False)
        allowed = self.policy.authorized()
        for key in [k for k in self.proto.authorized_keys() if k not in allowed]:
            self.proto.deauthorize(key, now)
        for key, psk in allowed.items():
            if not self.proto.is_authorized(key):
                self.proto.authorize(key, psk)
        self._handle_events(now)
        self._flush()

    def _account(self) -> None:
        """Move byte totals and drop counters into today's aggregate figures."""
        rx, tx = self.proto.rx_bytes, self.proto.tx_bytes
        self.stats.add_bytes(rx - self._reported[0], tx - self._reported[1])
        self._reported = (rx, tx)
        self.stats.add_drops(self.proto.drops)
        self.proto.drops.clear()
        tw = self.tun_writer
        if tw is not None and (tw.errors or tw.dropped):
            self.counters["tun-write-error"] += tw.errors
            self.counters["tun-write-dropped"] += tw.dropped
            tw.errors = tw.dropped = 0
        errors = sum(u.errors for u in self._udps)
        if errors > self._send_errors:        # failed sends and receives on the tunnel sockets
            self.counters["udp-error"] += errors - self._send_errors
            self._send_errors = errors
        self.stats.add_drops(self.counters)
        self.counters.clear()
        self.stats.add_account_bytes(self.policy.take_bytes())

    def _control_request(self, line: str) -> dict:
        cmd, _, arg = line.partition(" ")
        if cmd == "reload":
            self.reload(time.monotonic())
            return {"ok": True}
        if cmd == "stats":
            self._account()
            for name, packets in self.egress.counters().items():   # kernel counters are cumulative
                seen = self._egress_seen.get(name, 0)
                if packets > seen:
                    self.stats.today().drops[f"egress-{name}"] += packets - seen
                    self._egress_seen[name] = packets
            snap = self.stats.snapshot(active=sum(1 for p in self.proto.peers.values() if p.app is not None))
            if self.dns is not None:
                snap["dns"] = self.dns.statistics()     # counts only: no names, no addresses
            return snap
        if cmd == "scrubs" and self.test_hooks:      # how many scrubs ran (vpnd/forget.py)
            return {"scrubs": self.scrubs, "due": self._scrub_due}
        if cmd == "gc-scan" and self.test_hooks:
            return gc_scan(arg)
        return {"error": f"unknown command {cmd[:40]!r}; use stats"}

    # --- events and policy --------------------------------------------------------
    def _flush(self) -> None:
        for ep, dg in self.proto.datagrams_to_send():
            udp = self._udp_by_family.get(socket.AF_INET6 if ":" in ep[0] else socket.AF_INET)
            if udp is not None:
                udp.send([dg], ep)

    def _handle_events(self, now: float) -> None:
        while (ev := self.proto.next_event()) is not None:
            if isinstance(ev, SessionStarted):
                self._start_session(ev.peer, now)
            elif isinstance(ev, SessionEnded):
                self._end_session(ev.peer)
            elif isinstance(ev, LossReported):
                info = ev.peer.app if ev.peer is not None else None
                if info is not None:
                    info.gso.report(ev.done, ev.lost, ev.repaired)
                    ev.peer.add_parity = info.gso.parity
            elif isinstance(ev, ControlReceived):
                if ev.msg["type"] == "hello" and ev.peer.app is not None:
                    self.proto.send_control(ev.peer, self._config_for(ev.peer), now)

    def _start_session(self, peer, now: float) -> None:
        account, refusal = self.policy.admit(peer)
        if refusal is not None:
            self.counters["refused-by-policy"] += 1
            self.proto.end_peer(peer, refusal, now, retry=False)
            return
        info = PeerInfo(account)
        for pool in self.pools:
            addr = pool.allocate()
            if addr is None:
                for a in info.addresses:
                    self._release(a)
                self.counters["pool-exhausted"] += 1
                self.policy.release(account, peer, [])
                self.proto.end_peer(peer, "no free tunnel address on this server", now)
                return
            info.addresses.append(addr)
            info.allowed.add(addr.packed)
            self.routes[addr.packed] = peer
        peer.app = info
        self.policy.addresses_added(account, info.addresses)
        self.sessions_started += 1
        self.stats.connection()
        self.log.event("session-started", active=len(self.proto.peers))

    def _release(self, addr) -> None:
        self.routes.pop(addr.packed, None)
        for pool in self.pools:
            if addr.version == pool.network.version:
                pool.release(addr)

    def _forget_addresses(self, addresses) -> None:
        """An ended session's tunnel addresses: no longer routed at once; back in the pool now, or,
        with conntrack clean-up on, once their conntrack entries are deleted (_conntrack_loop), so a
        new session never gets an address whose old entries are still being removed."""
        for addr in addresses:
            self.routes.pop(addr.packed, None)
        if self._ct_queue is None:
            for addr in addresses:
                self._release(addr)
        else:
            self._ct_queue.extend(addresses)
            self._ct_wake.set()

    async def _conntrack_loop(self) -> None:
        while True:
            await self._ct_wake.wait()
            self._ct_wake = trio.Event()
            batch, self._ct_queue[:] = list(self._ct_queue), []
            try:
                await trio.to_thread.run_sync(conntrack.forget, batch)
            except Exception:
                self.counters["conntrack-error"] += 1
            for addr in batch:
                self._release(addr)
            batch = None

    def _end_session(self, peer) -> None:
        info = peer.app
        if info is not None:
            self.policy.release(info.account, peer, info.addresses)
            self._forget_addresses(info.addresses)
            info.addresses.clear()
            info.allowed.clear()
        peer.app = None
        self._scrub_due = True
        self.log.event("session-ended", active=len(self.proto.peers))

    def _config_for(self, peer) -> dict:
        msg = {"type": "config", "version": CONTROL_VERSION, "mtu": self.cfg.mtu,
               "routes": list(self._routes_pushed),
               "dns": list(self.cfg.dns), "features": [FEATURE_SUPERPACKET, FEATURE_PARITY]}
        for addr, pool in zip(peer.app.addresses, self.pools):
            msg["ipv4" if addr.version == 4 else "ipv6"] = pool.interface(addr)
        return msg


def gc_scan(masked_hex: str) -> dict:
    """Test hook: how many live objects hold any of the given byte strings (or their text).

    The patterns arrive XOR-masked with 0x5A so the request itself never holds them; the
    unmasked copies are excluded from the scan by identity.
    """
    from vpncore.proto.server import Peer
    from vpncore.proto.session import Keypair

    patterns = [bytes(b ^ 0x5A for b in bytes.fromhex(h)) for h in masked_hex.split(",") if h]
    texts = [p.decode("latin-1") for p in patterns]
    mine = {id(x) for x in patterns + texts} | {id(patterns), id(texts)}
    hits = peers = keypairs = 0
    for obj in gc.get_objects():
        if isinstance(obj, Peer):
            peers += 1
        elif isinstance(obj, Keypair):
            keypairs += 1
        if id(obj) in mine:
            continue
        refs = gc.get_referents(obj)
        # tuples of atoms (an endpoint ("198.18.0.9", 5000)) are not tracked by gc: look inside
        refs += [x for r in refs if type(r) is tuple for x in r]
        for ref in refs:
            if id(ref) in mine:
                continue
            if isinstance(ref, (bytes, bytearray)):
                hits += any(p in ref for p in patterns)
            elif isinstance(ref, str):
                hits += any(t in ref for t in texts)
    return {"hits": hits, "peers": peers, "keypairs": keypairs}


_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident memory (from /proc/self/statm), or 0 where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0
