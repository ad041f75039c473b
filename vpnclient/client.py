"""vpnclient's runtime: TUN device, connected UDP socket, timers, failover and the local control socket.

The packets move in the shared pump (vpncore/net/pump.py); ClientSide is this end's side of it.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from functools import partial

import trio

from vpncore import sdnotify
from vpncore.log import Log
from vpncore.net import ctlsock
from vpncore.net import tun as tunlib
from vpncore.proto.loss import tun_gso_max_size
from vpncore.net.pump import Link, Pump, PumpLimits
from vpncore.net.udp import Udp, UdpSet, open_connected
from vpncore.proto import control
from vpncore.proto.client import ClientConnection
from vpncore.proto.events import ControlReceived, HandshakeCompleted, LossReported, ServerClosed
from vpncore.cli import UserError

from .config import ClientConfig, ServerEntry
from .locations import NOTICE, PROBE, SWITCH, Failover, Target, open_socket
from .system import Applied

TICK = 0.2                  # failover and re-binding checks; protocol timers run when due (get_timer)
TIMER_SLACK = 0.001         # the shortest sleep of the timer loop: a deadline already past never spins
INITIAL_MTU = 1420


def new_connection(cfg: ClientConfig, server: ServerEntry, rng=os.urandom) -> ClientConnection:
    """The sans-IO connection to one server (one per server: failover builds a new one)."""
    return ClientConnection(private_key=cfg.private_key, server_public=server.public_key, rng=rng,
                            psk=server.psk, wall_offset=time.time() - time.monotonic(),
                            persistent_keepalive=cfg.persistent_keepalive, vnet_hdr=True)


# send errors that mean our source address is gone: re-open the socket (roaming from our side)
_REBIND_ERRNOS = (errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EINVAL)


class ClientSide:
    """The Side (pump.Side) of vpnclient: every read goes to the one server; what the connection
    opens goes to the TUN. attach() follows failover to a new connection."""

    def __init__(self, client: "Client", conn: ClientConnection):
        self.client = client
        self.conn = conn
        # seal straight through the connection's Tunnel: one call per TUN read
        self.link = Link(conn.tunnel.seal_read, partial(setattr, conn.tunnel, "add_parity"), INITIAL_MTU + 16)
        self._route = (self.link, None)       # None: the connected socket

    def attach(self, conn: ClientConnection) -> None:
        """A new connection (failover): the governor carries over to it."""
        self.conn = conn
        self.link.rebind(conn.tunnel.seal_read, partial(setattr, conn.tunnel, "add_parity"))

    def route(self, read: bytes, now: float):
        return self._route

    def open(self, dg: bytes, src, now: float):
        return self.conn.receive_datagram(dg, now)

    def open_train(self, buf: bytes, seg: int, src, now: float):
        return self.conn.receive_train(buf, seg, now)

    def events(self, now: float) -> None:
        self.client._handle_events()

    def deliver(self, packet, now: float):
        return packet

    def after_batch(self, now: float) -> None:
        self.client._flush()


class Client:
    def __init__(self, cfg: ClientConfig, log: Log, rng=os.urandom, out=print, *, targets=None, conn=None,
                 guard=None, limits: PumpLimits = PumpLimits()):
        self.cfg = cfg
        self.log = log
        self.out = out
        self._rng = rng
        # servers in failover order (locations.py); by default the config's first, resolved on open()
        self.targets = targets or [Target(s, s.host, s.port) for s in cfg.servers[:1]]
        self.failover = Failover(len(self.targets), time.monotonic())
        self.guard = guard            # guard.Guard: kill switch and resolver, or None
        self.conn = conn or new_connection(cfg, self.targets[0].server, rng)
        self.limits = limits
        self.side = ClientSide(self, self.conn)
        self.pump = None              # made by attach(): the devices are in
        self._switch = trio.Event()
        self._rebind = False         # on _switch: re-open the socket instead of changing server
        self._connect_started = time.monotonic()
        self._announced = None        # the connection whose first handshake was reported
        self.tun = None
        self.sock = None
        self.udp = None
        self.endpoint = None
        self.applied = None
        self.connected_once = False
        self.exit_status = 0
        self._stop = trio.Event()

    def __repr__(self) -> str:
        return "<vpnclient Client>"

    @property
    def target(self) -> Target:
        return self.targets[self.failover.index]

    def open(self) -> None:
        """The real devices: the connected socket, then the TUN."""
        sock, endpoint = open_connected(self.target.host, self.target.port, self.cfg.fwmark)
        self.sock = sock
        try:
            tun = tunlib.open_tun(self.cfg.interface, vnet_hdr=True)
            self.tun = tun
            tunlib.set_mtu(tun.name, INITIAL_MTU)
            tunlib.set_gso_max_size(tun.name, tun_gso_max_size(INITIAL_MTU))
            tunlib.link_up(tun.name)
        except tunlib.TunError as exc:
            self.close()
            raise UserError(str(exc), 1) from None
        self.attach(tun, sock, endpoint, Applied(tun.name))

    def attach(self, tun, sock, endpoint, applied) -> None:
        """The devices to pump between: open() attaches the real ones; bench/micro.py and tests a
        fake TUN (vpncore/net/fake.py), a loopback socket and a stand-in for system.Applied."""
        self.tun, self.sock, self.endpoint, self.applied = tun, sock, endpoint, applied
        self.udp = Udp(sock)
        self.pump = Pump(tun.fd, UdpSet([self.udp]), self.side, self.limits)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pump is not None:
            self.pump.close()    # the writer thread, before the TUN fd closes
            self.pump = None
        if self.tun is not None:
            self.tun.close()     # removes the device with every address and route we added
            self.tun = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until stop(), `down` or a refusal, on the devices open() or attach() gave; closes them."""
        try:
            listener = self._open_control_socket()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._signal_loop)
                nursery.start_soon(self._control_loop, listener)
                if self.conn.state == "idle":
                    self.log.event("handshaking")
                    self.out(f"vpnclient: handshaking with {self.target.label} at {self.target.endpoint}")
                    self.conn.connect(time.monotonic())
                else:                               # `up --fastest` hands in an established one
                    self._announced = self.conn
                    self.out(f"vpnclient: connected to {self.target.label}; configuring")
                self._flush()
                task_status.started(self)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            sdnotify.stopping()
            self.conn.close(time.monotonic(), "client disconnected")
            self._flush()
            self._remove_control_socket()
            self.close()

    def stop(self) -> None:
        self._stop.set()

    # --- loops ---------------------------------------------------------------------
    async def _pump(self) -> None:
        """The pump; stopped while failover swaps the connection or the socket, then restarted."""
        while True:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.pump.run)
                await self._switch.wait()
                nursery.cancel_scope.cancel()
            self._switch = trio.Event()
            if self._rebind:
                self._rebind = False
                self._reopen_socket()
            else:
                self._swap()
            self.pump.set_udps(UdpSet([self.udp]))

    async def _signal_loop(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self._stop.set()
                return

    async def _timer_loop(self) -> None:
        """The connection's timers when due (conn.get_timer); failover and re-binding every TICK."""
        policy_at = time.monotonic() + TICK
        ping_every, ping_at = sdnotify.watchdog_interval(), 0.0    # systemd's WatchdogSec=, if set
        while True:
            due = self.conn.get_timer()
            wake = policy_at if due is None else min(due, policy_at)
            await trio.sleep(max(TIMER_SLACK, wake - time.monotonic()))
            now = time.monotonic()
            if ping_every is not None and now >= ping_at:
                ping_at = now + ping_every
                sdnotify.watchdog()
            self.conn.handle_timer(now)
            self._handle_events()
            self._flush()
            if now < policy_at:
                continue
            policy_at = now + TICK
            self._failover_tick()
            if self.udp is not None and self.udp.last_errno in _REBIND_ERRNOS and not self._switch.is_set():
                self.udp.last_errno = 0
                self._rebind = True
                self._switch.set()

    # --- failover (policy in locations.Failover) -------------------------------------------------
    def _failover_tick(self) -> None:
        now = time.monotonic()
        action = self.failover.decide(self.conn.state == "established", self.conn.last_rx, now)
        if action == PROBE:     # vpnd answers a hello with the session's config: proof of life
            self.conn.send_control(control.hello(self.conn.features), now)
            self._flush()
        elif action == SWITCH:
            self._switch.set()  # _pump stops the loops, then calls _swap
        elif action == NOTICE:
            self.out(f"vpnclient: no answer from {self.target.label} at {self.target.endpoint} yet; still trying"
                     + (" (the kill switch holds)" if self.guard is not None and self.guard.kill_switch else ""))

    def _reopen_socket(self) -> None:
        """Our own underlay address went away: same server, same session, a new socket (the server
        follows the new source on the first authenticated packet, SPEC §8.5)."""
        self.sock.close()
        self.sock, self.endpoint = open_socket(self.target, self.out, self.cfg.fwmark)
        self.udp = Udp(self.sock)
        self._flush()

    def _swap(self) -> None:
        """Close the connection to the current server; a new connection and socket for the next."""
        now = time.monotonic()
        old, why = self.target, "closed the session" if self.failover.closed else "stopped answering"
        self.conn.close(now, "client moved to another server")
        self._flush()
        self.sock.close()
        new = self.targets[self.failover.switched(now)]
        self.out(f"vpnclient: {old.label} {why}; switching to {new.label} at {new.endpoint}")
        self.sock, self.endpoint = open_socket(new, self.out, self.cfg.fwmark)
        self.udp = Udp(self.sock)
        self.conn = new_connection(self.cfg, new.server, self._rng)
        self.side.attach(self.conn)
        self._connect_started = now
        self.conn.connect(now)
        self._flush()

    def _flush(self) -> None:
        for dg in self.conn.datagrams_to_send():
            self.udp.send([dg])

    def _handle_events(self) -> None:
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, HandshakeCompleted):
                if not self.connected_once:
                    self.log.event("connected")
                self.connected_once = True
                if self._announced is not self.conn:
                    self._announced = self.conn
                    ms = (time.monotonic() - self._connect_started) * 1000
                    self.out(f"vpnclient: connected to {self.target.label} (handshake {ms:.1f} ms); configuring")
            elif isinstance(ev, ControlReceived) and ev.msg["type"] == "config":
                applied = self.applied.apply(ev.msg)
                self.side.link.chunk = (self.applied.mtu or INITIAL_MTU) + 16
                if applied:
                    self.log.event("config-applied")
                    self.out(f"vpnclient: tunnel up on {self.applied.ifname}: {', '.join(self.applied.addresses)}")
                if self.guard is not None:
                    for line in self.guard.apply(self.applied.addresses, self.applied.dns):
                        self.out(line)
                    for line in self.guard.route(self.applied.ifname, self.applied.routes, self.applied.addresses):
                        self.out(line)
                if applied:          # systemd (Type=notify): configured, DNS and routing in place
                    sdnotify.ready("connected")
            elif isinstance(ev, LossReported):
                self.side.link.loss_report(ev.done, ev.lost, ev.repaired)
            elif isinstance(ev, ServerClosed):
                self.log.event("server-closed")
                if ev.retry and self.failover.enabled:
                    self.failover.server_closed()
                    self.out(f"vpnclient: {self.target.label} closed the session: {ev.reason}; switching servers")
                elif not ev.retry:       # refused by policy: reconnecting would be refused again
                    self.out(f"vpnclient: the server refused this device: {ev.reason}")
                    self.exit_status = 1
                    self._stop.set()
                else:
                    self.out(f"vpnclient: the server closed the session: {ev.reason}; reconnecting")

    # --- status and down over a local socket ----------------------------------------------------
    def status(self) -> dict:
        c = self.conn
        totals = c.statistics()
        now = time.monotonic()
        return {
            "interface": self.tun.name if self.tun else None,
            "state": c.state,
            "server_endpoint": f"[{self.endpoint[0]}]:{self.endpoint[1]}" if ":" in self.endpoint[0]
            else f"{self.endpoint[0]}:{self.endpoint[1]}",
            "handshake_age_s": None if c.last_handshake is None else round(now - c.last_handshake, 1),
            "bytes_in": totals.rx_bytes,
            "bytes_out": totals.tx_bytes,
            "addresses": list(self.applied.addresses) if self.applied else [],
            "routes": list(self.applied.routes) if self.applied else [],
            "mtu": self.applied.mtu if self.applied else None,
            "dns": list(self.applied.dns) if self.applied else [],
            "drops": sum(totals.drops.values()),
            "server": self.target.server.name,
            "location": self.target.server.location,
            "servers": len(self.targets),
            "failovers": self.failover.switches,
            "kill_switch": bool(self.guard and self.guard.kill_switch),
            "resolver": (self.guard.state["resolver"] or {}).get("path") if self.guard else None,
            "full_tunnel": [f"IPv{f}" for f in self.guard.families] if self.guard else [],
            "bypass_cgroup": self.guard.state.get("bypass") if self.guard else None,
            "bypass_unavailable": self.guard.bypass_why if self.guard else "",
        }

    def _open_control_socket(self):
        self._socket_path = self.cfg.control_socket
        return ctlsock.open_listener(self._socket_path, "vpnclient",
                                     "stop it with 'vpnclient down' or set a different control_socket")

    def _remove_control_socket(self) -> None:
        if getattr(self, "_socket_path", None):
            ctlsock.remove(self._socket_path)

    async def _control_loop(self, listener) -> None:
        await ctlsock.serve(listener, self._control_request)

    def _control_request(self, cmd: str) -> dict:
        if cmd == "status":
            return self.status()
        if cmd == "down":
            self._stop.set()
            return {"ok": True}
        return {"error": f"unknown command {cmd[:40]!r}; use status or down"}


def query(path: str, command: str, timeout: float = 5.0) -> dict:
    """Send one command to a running `vpnclient up` and return its JSON answer."""
    return ctlsock.query(path, command, "vpnclient", timeout)
