"""UDP for the tunnel (DESIGN §3a, SPEC §5.5): sockets opened, tuned and their failures explained;
GSO trains out and GRO batches in (Udp); the sends of one batch held for trains (HeldSends); the
sockets of one end by address family (UdpSet). The pump (pump.py) drives these."""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import struct

from ..cli import UserError
from ..proto.loss import GSO_MAX_BYTES

BUFFER_BYTES = 4 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """'198.18.0.1:51820', '[2001:2::1]:51820' or 'host:port' -> (host, port)."""
    if not isinstance(text, str) or ":" not in text:
        raise UserError(f"{what} must look like 198.18.0.1:51820 or [2001:2::1]:51820")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UserError(f"{what} must look like [2001:2::1]:51820")
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise UserError(f"{what} has no IPv6 address in its brackets; e.g. [2001:2::1]:51820") from None
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise UserError(f"{what}: write an IPv6 address in brackets, e.g. [2001:2::1]:51820")
        if not _HOST.match(host):
            raise UserError(f"{what} has no valid host name or IPv4 address before the port")
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


SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
RECV_BUFFER = 65535
_CMSG_SPACE = socket.CMSG_SPACE(4)

_SEG = struct.Struct("=H")
_GRO = struct.Struct("=i")


class Udp:
    """A non-blocking UDP socket with GSO/GRO where the kernel has them; counters, never exceptions."""

    __slots__ = ("sock", "gso", "gro", "errors", "last_errno")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.errors = 0
        self.last_errno = 0     # of the latest failed send (the client re-opens on ENETUNREACH etc.)
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            self.gro = True
        except OSError:
            self.gro = False
        self.gso = True    # tried on first use; an EIO/EINVAL turns it off

    def recv_batch(self, cap: int) -> list:
        """Up to `cap` reads: a list of (datagram, address); GRO trains are split back into datagrams."""
        out = []
        for data, addr, seg in self.recv_trains(cap):
            if seg:
                out.extend((data[i:i + seg], addr) for i in range(0, len(data), seg))
            else:
                out.append((data, addr))
        return out

    def recv_trains(self, cap: int, max_bytes: int = 1 << 62) -> list:
        """Up to `cap` reads, stopping once `max_bytes` arrived: a list of (data, address, seg). A GRO
        train comes whole with its segment size `seg` (datagrams of seg bytes, the last maybe
        shorter); a single datagram has seg 0."""
        out = []
        recvmsg = self.sock.recvmsg
        got = 0
        for _ in range(cap):
            if got >= max_bytes:
                break
            try:
                data, anc, _flags, addr = recvmsg(RECV_BUFFER, _CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError:   # e.g. ECONNREFUSED from an earlier ICMP error: count, go on
                self.errors += 1
                continue
            seg = 0
            if anc:
                for level, kind, value in anc:
                    if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                        seg = _GRO.unpack_from(value)[0]
                if seg >= len(data):
                    seg = 0
            out.append((data, addr, seg))
            got += len(data)
        return out

    def send(self, frames: list, addr=None) -> None:
        """Send datagrams; equal-size runs (super-packet fragments) go as GSO trains."""
        n = len(frames)
        if n == 1 or not self.gso:
            for f in frames:
                self._send_one(f, addr)
            return
        size = len(frames[0])
        if len(frames[-1]) > size and n > 3 and len(frames[-3]) == size:
            # a super-packet's parity fragment (2 bytes longer than a chunk) follows its train alone
            self.send(frames[:-1], addr)
            self._send_one(frames[-1], addr)
            return
        if len(frames[-2]) != size or len(frames[-1]) > size:   # not a fragment train (segmented packets)
            for f in frames:
                self._send_one(f, addr)
            return
        per = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)
        cmsg = [(SOL_UDP, UDP_SEGMENT, _SEG.pack(size))]
        for i in range(0, n, per):
            group = frames[i:i + per]
            if len(group) == 1:
                self._send_one(group[0], addr)
                continue
            try:
                if addr is None:
                    self.sock.sendmsg([b"".join(group)], cmsg)
                else:
                    self.sock.sendmsg([b"".join(group)], cmsg, 0, addr)
            except BlockingIOError:
                self.errors += 1
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    # segments larger than the route's MTU: one datagram each, which the kernel
                    # fragments (the tunnel sockets do not set DF)
                    for f in group:
                        self._send_one(f, addr)
                elif exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                    self.gso = False          # no UDP GSO here: per-datagram from now on
                    for f in group:
                        self._send_one(f, addr)
                else:
                    self.errors += 1
                    self.last_errno = exc.errno

    def send_runs(self, datagrams: list, addr=None) -> None:
        """Single datagrams gathered over one batch of TUN reads (small packets: ACKs, a UDP flow),
        in order: each run of equal sizes, the last of a run maybe shorter, goes as one GSO train
        (one sendmsg instead of one per datagram; the receiver takes the train with one recvmsg)."""
        i, n = 0, len(datagrams)
        while i < n:
            size = len(datagrams[i])
            limit = min(n, i + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
            j = i + 1
            while j < limit and len(datagrams[j]) == size:
                j += 1
            if j < limit and len(datagrams[j]) < size:      # a shorter one may end a train
                j += 1
            if j - i == 1:
                self._send_one(datagrams[i], addr)
            else:
                self.send(datagrams[i:j], addr)
            i = j

    def _send_one(self, frame: bytes, addr) -> None:
        try:
            if addr is None:
                self.sock.send(frame)
            else:
                self.sock.sendto(frame, addr)
        except OSError as exc:
            self.errors += 1
            self.last_errno = exc.errno or 0


class HeldSends:
    """The sends of one batch of TUN reads: single datagrams (ACKs, a UDP flow) are held per endpoint
    and leave as trains (Udp.send_runs) once `hold` wait, before a super-packet's fragments to the
    same endpoint (order kept), or at flush() at the end of the batch.

    `hold` (PumpLimits.hold): a ping reply read among ACKs must not wait for the whole batch (which,
    with the TUN writer thread making ACKs meanwhile, can be 256 reads, ~2 ms). A train holds at most
    ~45 datagrams of a tunnel MTU anyway; 1 sends each at once."""

    __slots__ = ("_by_addr", "_hold")

    def __init__(self, hold: int = 32):
        self._by_addr: dict = {}     # endpoint -> (Udp, [datagram]); empty between batches
        self._hold = hold

    def send(self, udp: Udp, frames: list, addr=None) -> None:
        if len(frames) == 1:
            entry = self._by_addr.get(addr)
            if entry is None:
                entry = self._by_addr[addr] = (udp, [])
            entry[1].append(frames[0])
            if len(entry[1]) >= self._hold:
                udp.send_runs(self._by_addr.pop(addr)[1], addr)
        elif frames:
            entry = self._by_addr.pop(addr, None)
            if entry is not None:
                udp.send_runs(entry[1], addr)
            udp.send(frames, addr)

    def flush(self) -> None:
        by_addr = self._by_addr
        try:
            for addr, (udp, datagrams) in by_addr.items():
                udp.send_runs(datagrams, addr)
        finally:
            by_addr.clear()      # forget fast: no endpoint lingers between batches


class UdpSet:
    """The UDP sockets of one end: the one a datagram to `ep` leaves by (its address family; a
    connected socket for ep None)."""

    __slots__ = ("all", "v4", "v6")

    def __init__(self, udps):
        self.all = list(udps)
        self.v4 = next((u for u in self.all if u.sock.family == socket.AF_INET), None)
        self.v6 = next((u for u in self.all if u.sock.family == socket.AF_INET6), None)

    def pick(self, ep):
        if ep is None:
            return self.all[0]
        return self.v6 if ":" in ep[0] else self.v4

    def send_one(self, dg: bytes, ep=None) -> None:
        """A single datagram (a handshake or control message) to `ep`; dropped without a socket."""
        udp = self.pick(ep)
        if udp is not None:
            udp.send([dg], ep)
