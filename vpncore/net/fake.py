"""A TUN stand-in for tests and bench/micro.py: one end of an AF_UNIX datagram socketpair, which
keeps packet boundaries as a TUN fd does (no root, no device)."""

from __future__ import annotations

import os
import socket


class FakeTun:
    """Has what the shells use of vpncore.net.tun.Tun: a non-blocking fd, a name, close()."""

    def __init__(self, sock: socket.socket, name: str = "fake0"):
        self._sock = sock
        self.fd, self.name = sock.fileno(), name
        os.set_blocking(self.fd, False)     # as open_tun leaves a real TUN fd

    def close(self) -> None:
        self._sock.close()


def fake_tun(name: str = "fake0", buffer: int = 8 << 20) -> tuple[FakeTun, socket.socket]:
    """(the TUN for a shell, the other end: what the kernel would send into and read from)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    return FakeTun(a, name), b


class FakeApplied:
    """Stands in for vpnclient.system.Applied: records the pushed config, touches no device."""

    def __init__(self, ifname: str = "fake0"):
        self.ifname, self.addresses, self.routes, self.mtu, self.dns = ifname, [], [], None, []

    def apply(self, msg: dict) -> bool:
        self.mtu = msg["mtu"]
        self.addresses = [msg[k] for k in ("ipv4", "ipv6") if k in msg]
        self.routes, self.dns = list(msg.get("routes", ())), list(msg.get("dns", ()))
        return False
