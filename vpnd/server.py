"""vpnd's runtime: the TUN device, the UDP sockets, timers, the control socket and events (DESIGN §1).

Policy lives here (address pools, plans, what is pushed to clients) and, per packet, in
datapath.ServerSide; the packets move in the shared pump (vpncore/net/pump.py); the protocol
lives in vpncore.proto.server.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter

import trio

from vpncore.log import Log
from vpncore import sdnotify
from vpncore.net import ctlsock
from vpncore.net import tun as tunlib
from vpncore.proto.loss import tun_gso_max_size
from vpncore.net.pump import Pump, PumpLimits, PumpStats
from vpncore.net.udp import Udp, UdpSet, open_listener
from vpncore.proto import control
from vpncore.proto.constants import FEATURE_PARITY, FEATURE_SUPERPACKET
from vpncore.proto.tunnel import Statistics
from vpncore.proto.events import ControlReceived, LossReported, SessionEnded, SessionStarted
from vpncore.proto.server import ServerProtocol

from vpncore.cli import UserError

from .config import ServerConfig, pushed_routes
from .datapath import PeerInfo, ServerSide, new_link
from .dns import DnsForwarder
from .forget import forget_freed
from . import conntrack
from .egress import Egress
from .policy import Policy
from .pool import AddressPool
from .registry import RegistryUnavailable, open_registry
from .stats import DailyStats

TICK = 0.25                 # vpnd's policy period; protocol timers run when due (get_timer)
# the shortest sleep of the timer loop: deadlines within 50 ms share one handle_timer (which visits
# every peer: with thousands of sessions their deadlines are spread thin), and a past one never spins
TIMER_COALESCE = 0.05
UNDER_LOAD_INITIATIONS_PER_TICK = 64
# Cookie replies per tick under load (24,576/s). One costs ~7 us of Python plus a sendto: this bounds
# what a flood of valid-mac1 initiations can take from the data path (~30% of a core); beyond it,
# initiations are dropped unanswered ("cookie-budget"), and a legitimate client's chance of a reply
# to one initiation is this budget over the flood's rate.
COOKIE_REPLIES_PER_TICK = 6144


class Server:
    # memory (vpnd/forget.py): overwrite freed blocks that may hold an ended session's endpoint,
    # from the timer, at most once a second and only after a session ended
    SCRUB_EVERY = 1.0
    side_class = ServerSide          # the per-packet policy handed to the pump (vpnd/datapath.py)
    _scrub_due = False
    _scrub_at = 0.0

    def __init__(self, cfg: ServerConfig, log: Log, rng=os.urandom, limits: PumpLimits = PumpLimits()):
        self.cfg = cfg
        self.log = log
        self.limits = limits
        self.stats = DailyStats()
        self._proto_seen = Statistics()  # the protocol's totals already in the day's figures
        self.proto = ServerProtocol(private_key=cfg.private_key, rng=rng, vnet_hdr=True)
        self.chunk = cfg.mtu + 16   # fragment payload: a fragment is as big as a full-MTU data datagram
        self.pools = [AddressPool(n) for n in (cfg.pool4, cfg.pool6) if n is not None]
        self.egress = Egress(cfg.interface, [p.network for p in self.pools],
                             cfg.egress_by_family or cfg.egress_interface,
                             cfg.block_tcp_ports, cfg.block_server_networks, cfg.blocked_networks,
                             full_tunnel=cfg.full_tunnel, listen_ports=[port for _, port in cfg.listen])
        self.policy = Policy(cfg, self.egress)
        self.registry = None
        if cfg.accounts is not None:
            self.registry = self._open_registry(cfg)
            self.policy.apply(self.registry.snapshot())
        self._registry_wait = trio.CancelScope()
        for key, psk in self.policy.authorized().items():
            self.proto.authorize(key, psk)
        self.routes: dict[bytes, object] = {}      # packed tunnel address -> Peer
        self.counters: Counter[str] = Counter()
        self.sessions_started = 0
        self.totals: Counter[str] = Counter()         # since start, all sessions together (metrics.py)
        self.total_drops: Counter[str] = Counter()
        self._metrics = None                          # the metrics listener, when metrics_listen is set
        self.tun = None
        self.socks: list[socket.socket] = []
        self.udps: UdpSet | None = None
        self.side = self.side_class(self.proto, self.routes, self.counters, cfg.client_to_client,
                               self._handle_events, self._after_batch)
        self.pump: Pump | None = None    # made by attach(): the devices are in
        self._pump_seen = PumpStats(0, 0, 0, 0, 0, 0)   # what the day's figures already hold
        self._stop = trio.Event()
        self._listener = None
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
    @staticmethod
    def _open_registry(cfg):
        """The accounts registry, at start (blocking is fine here): unreachable is exit 1."""
        try:
            registry = open_registry(cfg.accounts)
            if cfg.plans_given and registry.engine == "sqlite":
                registry.put_plans(cfg.plans_given)    # a server on its own: the config's [plans] are the registry's
            return registry
        except RegistryUnavailable as exc:
            raise UserError(f"cannot reach the accounts registry ({exc}); check that the database runs and "
                            f"the URL and password file in 'accounts' are right", 1) from None

    def open(self) -> None:
        """Open sockets first (a port in use fails before any device exists), then the TUN; on a
        failure, close what was opened (nothing half set up)."""
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        socks = []
        for host, port in self.cfg.listen:
            socks.append(open_listener(host, port))
            self.socks = socks        # closed by close() on a failure from here on
        if self.cfg.metrics_listen is not None:
            from .metrics import open_listener as open_metrics
            self._metrics = open_metrics(self.cfg.metrics_listen)
        if self.cfg.control_socket:
            self._listener = ctlsock.open_listener(self.cfg.control_socket, "vpnd",
                                                   "stop it first or set a different control_socket")
        self.tun = tunlib.open_tun(self.cfg.interface, vnet_hdr=True)
        name = self.tun.name
        self.attach(self.tun, socks)
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

    def attach(self, tun, socks: list[socket.socket]) -> None:
        """The devices to pump between: open() attaches the real ones; bench/micro.py and tests a
        fake TUN (vpncore/net/fake.py) and loopback sockets."""
        self.tun, self.socks = tun, list(socks)
        self.udps = UdpSet([Udp(s) for s in self.socks])
        self.pump = Pump(tun.fd, self.udps, self.side, self.limits)
        self.side.pump = self.pump

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
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        for s in self.socks:
            s.close()
        self.socks = []
        if self.pump is not None:
            self.pump.close()    # the writer thread, before the TUN fd closes
            self.pump = None
        if self.tun is not None:
            self.tun.close()   # the kernel removes the device, its addresses and routes
            self.tun = None
        if self.registry is not None:
            self.registry.close()

    # --- the loops --------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop() or a signal, on the devices open() or attach() gave; closes them."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.pump.run)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._signal_loop)
                if self._listener is not None:
                    nursery.start_soon(ctlsock.serve, self._listener, self._control_request)
                if self.dns is not None:
                    nursery.start_soon(self.dns.serve)
                if self._ct_queue is not None:
                    nursery.start_soon(self._conntrack_loop)
                if self.registry is not None:
                    nursery.start_soon(self._registry_loop)
                if self._metrics is not None:
                    from . import metrics
                    nursery.start_soon(metrics.serve, self._metrics, self._metric_totals)
                self.log.event("started")
                sdnotify.ready("serving")     # systemd (Type=notify): the TUN and sockets are up
                task_status.started(self)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            sdnotify.stopping()
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

    async def _timer_loop(self) -> None:
        """The protocol's timers when they are due (proto.get_timer), and vpnd's own policy every
        TICK: the initiation rate behind "under load", the memory limit, the registry, accounting."""
        policy_at = time.monotonic() + TICK
        ping_every, ping_at = sdnotify.watchdog_interval(), 0.0    # systemd's WatchdogSec=, if set
        while True:
            due = self.proto.get_timer()
            wake = policy_at if due is None else min(due, policy_at)
            await trio.sleep(max(TIMER_COALESCE, wake - time.monotonic()))
            now = time.monotonic()
            if ping_every is not None and now >= ping_at:
                ping_at = now + ping_every
                sdnotify.watchdog()
            if now < policy_at:
                self.proto.handle_timer(now)
                self._handle_events(now)
                self._flush()
                continue
            policy_at = now + TICK
            load = self.side.initiations > UNDER_LOAD_INITIATIONS_PER_TICK
            if load and not self.proto.under_load:
                self.log.event("under-load")
            # under a handshake flood both cores are busy: hand-overs to the writer thread then
            # cost more than the overlap gains (flood test: kept 0.69-0.76 threaded, 0.72-0.82 inline)
            self.pump.threaded(not load)
            self.side.initiations = 0
            shed = resident_bytes() > self.cfg.memory_limit_mb << 20
            if shed and not self.proto.shedding:
                self.counters["memory-limit-reached"] += 1
            self.proto.set_policy(under_load=load, shedding=shed, cookie_budget=COOKIE_REPLIES_PER_TICK)
            self.proto.handle_timer(now)
            self._handle_events(now)
            self._flush()
            self._account()
            if self._scrub_due and now - self._scrub_at >= self.SCRUB_EVERY:
                self._scrub_due, self._scrub_at = False, now
                self._scrub()
            if self.policy.nft_script:
                script, self.policy.nft_script = "".join(self.policy.nft_script), []
                if not await trio.to_thread.run_sync(self.egress.apply, script):
                    self.counters["nft-error"] += 1
            while self.policy.slots_to_drop:
                if not await trio.to_thread.run_sync(self.egress.drop_slot, self.policy.slots_to_drop.pop()):
                    self.counters["nft-error"] += 1

    def _scrub(self) -> None:
        forget_freed()

    async def _registry_loop(self) -> None:
        """Follow the registry: wait for a change in a worker thread (the engine's own way: a
        generation poll for SQLite, LISTEN/NOTIFY for PostgreSQL), read the snapshot there too, and
        apply it here. A lost database: one line, keep serving with what we last knew, retry."""
        reg, lost = self.registry, False
        while True:
            try:
                gen = None
                with trio.CancelScope() as self._registry_wait:     # `reload` cancels the wait
                    gen = await trio.to_thread.run_sync(reg.wait_change, self.policy.generation, 5.0,
                                                        abandon_on_cancel=True)
                snap = None if gen == self.policy.generation else \
                    await trio.to_thread.run_sync(reg.snapshot, abandon_on_cancel=True)
            except (RegistryUnavailable, UserError) as exc:
                self.counters["registry-unreachable" if isinstance(exc, RegistryUnavailable)
                              else "registry-unreadable"] += 1
                if not lost:
                    lost = True
                    self.log.event("registry-lost")
                await trio.sleep(1.0)
                continue
            if snap is not None:
                self.apply_registry(snap, time.monotonic())
            if lost:
                lost = False
                self.log.event("registry-back")

    def apply_registry(self, snap, now: float) -> None:
        """A changed registry: end the sessions it no longer allows, update keys, and forget what
        removed or suspended accounts left in memory (live state, per-day figures, nftables slot)."""
        self.policy.apply(snap)
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
        self.policy.forget_gone()
        self.stats.forget_accounts([aid for aid in self.stats.account_ids()
                                    if aid not in snap.accounts or snap.accounts[aid].status != "active"])

    def _account(self) -> None:
        """Move byte totals and drop counters into today's aggregate figures."""
        totals = self.proto.statistics()
        new, self._proto_seen = totals.since(self._proto_seen), totals
        self.stats.add_bytes(new.rx_bytes, new.tx_bytes)
        self.stats.add_drops(new.drops)
        self.totals["bytes_in"] += new.rx_bytes
        self.totals["bytes_out"] += new.tx_bytes
        self.total_drops.update(new.drops)
        if self.pump is not None:
            now, seen = self.pump.statistics(), self._pump_seen
            for reason, a, b in (("internal-error", now.contained, seen.contained),
                                 ("tun-read-error", now.tun_read_errors, seen.tun_read_errors),
                                 ("tun-write-error", now.tun_write_errors, seen.tun_write_errors),
                                 ("tun-write-dropped", now.tun_write_dropped, seen.tun_write_dropped),
                                 ("udp-error", now.udp_errors, seen.udp_errors)):  # failed sends and receives
                if a > b:
                    self.counters[reason] += a - b
            self._pump_seen = now
        self.stats.add_drops(self.counters)
        self.total_drops.update(self.counters)
        self.counters.clear()
        self.stats.add_account_bytes(self.policy.take_bytes())

    def _active(self) -> int:
        return sum(1 for p in self.proto.peers.values() if p.app is not None)

    def _metric_totals(self) -> dict:
        self._account()
        return {"bytes_in": self.totals["bytes_in"], "bytes_out": self.totals["bytes_out"],
                "sessions_started": self.sessions_started, "sessions_active": self._active(),
                "drops": dict(self.total_drops), "dns": self.dns.statistics() if self.dns is not None else {}}

    async def _stats(self) -> dict:
        """`vpnd stats`: nftables' counters are read in a worker thread, never on the packet loops'."""
        egress = await trio.to_thread.run_sync(self.egress.counters)
        self._account()
        for name, packets in egress.items():   # kernel counters are cumulative
            seen = self._egress_seen.get(name, 0)
            if packets > seen:
                self.stats.today().drops[f"egress-{name}"] += packets - seen
                self._egress_seen[name] = packets
        snap = self.stats.snapshot(active=self._active())
        if self.dns is not None:
            snap["dns"] = self.dns.statistics()     # counts only: no names, no addresses
        return snap

    def _control_request(self, line: str):
        """A control request's answer: a dict, or an awaitable of one (ctlsock.serve awaits it)."""
        cmd = line.partition(" ")[0]
        if cmd == "reload":
            self._registry_wait.cancel()      # the registry loop reads it again now
            return {"ok": True}
        if cmd == "stats":
            return self._stats()
        return {"error": f"unknown command {cmd[:40]!r}; use stats"}

    # --- events and policy --------------------------------------------------------
    def _flush(self) -> None:
        if self.udps is None:
            return
        send = self.udps.send_one
        for ep, dg in self.proto.datagrams_to_send():
            send(dg, ep)

    def _after_batch(self, now: float) -> None:
        self._flush()

    def _handle_events(self, now: float) -> None:
        while (ev := self.proto.next_event()) is not None:
            if isinstance(ev, SessionStarted):
                self._start_session(ev.peer, now)
            elif isinstance(ev, SessionEnded):
                self._end_session(ev.peer)
            elif isinstance(ev, LossReported):
                info = ev.peer.app if ev.peer is not None else None
                if info is not None:
                    info.link.loss_report(ev.done, ev.lost, ev.repaired)
            elif isinstance(ev, ControlReceived):
                if ev.msg["type"] == "hello" and ev.peer.app is not None:
                    self.proto.send_control(ev.peer, self._config_for(ev.peer), now)

    def _start_session(self, peer, now: float) -> None:
        account, refusal = self.policy.admit(peer)
        if refusal is not None:
            self.counters["refused-by-policy"] += 1
            self.proto.end_peer(peer, refusal, now, retry=False)
            return
        info = PeerInfo(account, new_link(peer, self.chunk))
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
        addresses = {("ipv4" if a.version == 4 else "ipv6"): pool.interface(a)
                     for a, pool in zip(peer.app.addresses, self.pools)}
        return control.config(mtu=self.cfg.mtu, routes=self._routes_pushed, dns=self.cfg.dns,
                              features=(FEATURE_SUPERPACKET, FEATURE_PARITY), **addresses)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident memory (from /proc/self/statm), or 0 where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0
