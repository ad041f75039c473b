"""UDP sockets for the tunnel: open, tune, and explain failures (DESIGN §3a)."""

from __future__ import annotations

import errno
import socket

from ..userror import UserError

BUFFER_BYTES = 4 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """'198.18.0.1:51820', '[2001:2::1]:51820' or 'host:port' -> (host, port)."""
    if not isinstance(text, str) or ":" not in text:
        raise UserError(f"{what} must look like 198.18.0.1:51820 or [2001:2::1]:51820")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UserError(f"{what} must look like [2001:2::1]:51820")
    else:
        host, _, port = text.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535 or not host:
        raise UserError(f"{what} has an invalid port; use a number from 1 to 65535")
    return host, p


IP_MTU_DISCOVER, IP_PMTUDISC_DONT = getattr(socket, "IP_MTU_DISCOVER", 10), 0
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT = getattr(socket, "IPV6_MTU_DISCOVER", 23), 0


def tune(sock: socket.socket) -> None:
    """Big buffers; and no DF bit: over a path with a smaller MTU than the tunnel's datagrams (down
    to IPv6's 1,280), the kernel fragments them instead of the tunnel stalling on EMSGSIZE."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    except OSError:
        pass
    _buffers(sock)


def _buffers(sock: socket.socket) -> None:
    for opt, fallback in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, fallback, BUFFER_BYTES)


def open_listener(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to host:port (IPv6 sockets are v6-only)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"UDP port {port} is already in use; stop the other program or change 'listen'", 1) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UserError("a 'listen' address is not assigned to this machine; use one of its addresses or 0.0.0.0", 1) from None
        if exc.errno == errno.EACCES:
            raise UserError(f"not allowed to bind UDP port {port}; run as root or choose a port above 1023", 1) from None
        raise UserError(f"cannot listen on UDP port {port}: {exc.strerror}", 1) from None
    tune(sock)
    sock.setblocking(False)
    return sock


SO_MARK = getattr(socket, "SO_MARK", 36)


def open_connected(host: str, port: int, mark: int = 0) -> tuple[socket.socket, tuple]:
    """A non-blocking UDP socket connected to the server; resolves `host` once.

    `mark` (SO_MARK, set before connect so the route lookup sees it): the client's full tunnel
    routes marked packets through the main table, so the tunnel's own datagrams never enter it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve the server name ({exc.strerror}); check 'endpoint' in the config", 1) from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    tune(sock)
    if mark:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError as exc:
            sock.close()
            raise UserError(f"cannot mark the tunnel socket (SO_MARK: {exc.strerror}); run as root "
                            f"(CAP_NET_ADMIN)", 1) from None
    try:
        sock.connect(addr)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot reach the server endpoint ({exc.strerror}); check the network and 'endpoint'", 1) from None
    sock.setblocking(False)
    return sock, addr[:2]
