"""vpnclient's runtime: TUN device, connected UDP socket, timers, and the local control socket."""

from __future__ import annotations

import os
import signal
import time

import trio

from vpncore.log import Log
from vpncore.net import ctlsock
from vpncore.net import tun as tunlib
from vpncore.net.pump import Udp
from vpncore.net.udp import open_connected
from vpncore.proto.constants import VNET_HDR_LEN
from vpncore.proto.client import ClientConnection
from vpncore.proto.events import ControlReceived, HandshakeCompleted, ServerClosed
from vpncore.userror import UserError

from .config import ClientConfig
from .system import Applied

# Reads per wakeup. Small on purpose: a TUN read can be a 64 KiB super-packet (~60 us of work), and
# while one loop runs the other direction waits; these caps keep that wait near a millisecond
# (ping p99 under load), at one extra trio checkpoint (~7 us) per batch. Tunable for experiments.
TUN_BATCH = int(os.environ.get("VPN_TUN_BATCH", 8))
UDP_BATCH = int(os.environ.get("VPN_UDP_BATCH", 16))
TICK = 0.2
TUN_READ_SIZE = 65536 + VNET_HDR_LEN
INITIAL_MTU = 1420


class Client:
    def __init__(self, cfg: ClientConfig, log: Log, rng=os.urandom, out=print):
        self.cfg = cfg
        self.log = log
        self.out = out
        self.conn = ClientConnection(private_key=cfg.private_key, server_public=cfg.server_public, rng=rng,
                                     psk=cfg.psk, wall_offset=time.time() - time.monotonic(),
                                     persistent_keepalive=cfg.persistent_keepalive, vnet_hdr=True)
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

    def open(self) -> None:
        self.sock, self.endpoint = open_connected(self.cfg.server_host, self.cfg.server_port)
        self.udp = Udp(self.sock)
        try:
            self.tun = tunlib.open_tun(self.cfg.interface, vnet_hdr=True)
            tunlib.set_mtu(self.tun.name, INITIAL_MTU)
            tunlib.link_up(self.tun.name)
        except tunlib.TunError as exc:
            self.close()
            raise UserError(str(exc), 1) from None
        self.applied = Applied(self.tun.name)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.tun is not None:
            self.tun.close()     # removes the device with every address and route we added
            self.tun = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.tun is None:   # bench/micro hands in a fake TUN and a loopback socket
            self.open()
        try:
            listener = self._open_control_socket()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._udp_loop)
                nursery.start_soon(self._tun_loop)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._signal_loop)
                nursery.start_soon(self._control_loop, listener)
                self.log.event("handshaking")
                self.conn.connect(time.monotonic())
                self._flush()
                task_status.started(self)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.conn.close(time.monotonic(), "client disconnected")
            self._flush()
            self._remove_control_socket()
            self.close()

    def stop(self) -> None:
        self._stop.set()

    # --- loops ---------------------------------------------------------------------
    async def _signal_loop(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self._stop.set()
                return

    async def _udp_loop(self) -> None:
        recv_batch = self.udp.recv_batch
        conn = self.conn
        fd = self.tun.fd
        write = os.write
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            now = time.monotonic()
            for dg, _ in recv_batch(UDP_BATCH):
                packet = conn.receive_datagram(dg, now)
                if packet is not None:
                    try:
                        write(fd, packet)
                    except OSError:
                        pass
            self._handle_events()
            self._flush()

    async def _tun_loop(self) -> None:
        fd = self.tun.fd
        read = os.read
        encrypt_frames = self.conn.encrypt_frames
        send = self.udp.send
        while True:
            await trio.lowlevel.wait_readable(fd)
            now = time.monotonic()
            chunk = (self.applied.mtu or INITIAL_MTU) + 16
            for _ in range(TUN_BATCH):
                try:
                    packet = read(fd, TUN_READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    break
                frames = encrypt_frames(packet, now, chunk)
                if frames:
                    send(frames)

    async def _timer_loop(self) -> None:
        while True:
            await trio.sleep(TICK)
            self.conn.handle_timer(time.monotonic())
            self._handle_events()
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
            elif isinstance(ev, ControlReceived) and ev.msg["type"] == "config":
                if self.applied.apply(ev.msg):
                    self.log.event("config-applied")
                    self.out(f"vpnclient: tunnel up on {self.applied.ifname}: {', '.join(self.applied.addresses)}")
            elif isinstance(ev, ServerClosed):
                self.log.event("server-closed")
                if not ev.retry:       # refused by policy: reconnecting would be refused again
                    self.out(f"vpnclient: the server refused this device: {ev.reason}")
                    self.exit_status = 1
                    self._stop.set()
                else:
                    self.out(f"vpnclient: the server closed the session: {ev.reason}; reconnecting")

    # --- status and down over a local socket ----------------------------------------------------
    def status(self) -> dict:
        c = self.conn
        now = time.monotonic()
        return {
            "interface": self.tun.name if self.tun else None,
            "state": c.state,
            "server_endpoint": f"[{self.endpoint[0]}]:{self.endpoint[1]}" if ":" in self.endpoint[0]
            else f"{self.endpoint[0]}:{self.endpoint[1]}",
            "handshake_age_s": None if c.last_handshake is None else round(now - c.last_handshake, 1),
            "bytes_in": c.rx_bytes,
            "bytes_out": c.tx_bytes,
            "addresses": list(self.applied.addresses) if self.applied else [],
            "routes": list(self.applied.routes) if self.applied else [],
            "mtu": self.applied.mtu if self.applied else None,
            "dns": list(self.applied.dns) if self.applied else [],
            "drops": sum(c.drops.values()),
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
