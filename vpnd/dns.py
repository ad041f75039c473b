"""DNS for clients, through the tunnel: a forwarder on the server's tunnel addresses (issue 6).

vpnd pushes its tunnel addresses as the clients' DNS servers (unless `dns` is configured) and
answers on port 53 there, UDP and TCP, by forwarding to the operator's upstream resolvers
(`dns_upstream`, default: the nameservers of the server's /etc/resolv.conf).

No log and no record of names, by construction (DESIGN §4):
- nothing is written or logged; the only state that outlives a query is a few integer counters
  (`queries`, `answers`, `failures`, `overload`, `malformed`, `tcp_connections`);
- a UDP query lives in one task for at most `ATTEMPT_TIMEOUT` per upstream tried (two at most):
  its bytes (in a preallocated slot, zeroed when the query ends), the client's tunnel address and
  port; then it is gone. Names never become `bytes` objects that the allocator would keep after
  the query (see `DnsForwarder` and vpnd/forget.py; tests/e2e/test_nologs.py reads vpnd's memory). Each query goes out from a fresh
  socket (random source port) with a fresh random ID, and an answer is taken only from the upstream
  it was sent to, with that ID and the same question section;
- at most `MAX_INFLIGHT` UDP queries and `MAX_TCP` TCP connections at once: beyond that, SERVFAIL
  (UDP) or an immediate close (TCP), counted as `overload`;
- TCP is relayed as bytes to one upstream, closed after `TCP_IDLE` seconds of silence or
  `TCP_LIFETIME` in all.

Only tunnel clients can reach it: the sockets are bound to the tunnel addresses *and* to the TUN
device (SO_BINDTODEVICE), so a packet to that address arriving on another interface is not taken.
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
from collections import Counter

import trio

from vpncore.cli import UserError

PORT = 53
MAX_INFLIGHT = 256
MAX_TCP = 32
ATTEMPT_TIMEOUT = 2.0
TCP_CONNECT_TIMEOUT = 3.0
TCP_IDLE = 10.0
TCP_LIFETIME = 60.0
MAX_QUERY = 4096          # a query bigger than this is not a DNS query
MAX_ANSWER = 65535
IP_FREEBIND = 15
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


# --- configuration ------------------------------------------------------------------------------

def parse_upstream(text: str, what: str) -> tuple[str, int]:
    """'192.0.2.53', '192.0.2.53:5353', '2001:db8::53' or '[2001:db8::53]:5353' (addresses only:
    a name would need DNS to find DNS)."""
    if not isinstance(text, str):
        raise UserError(f"{what} must be a string like \"192.0.2.53\" or \"[2001:db8::53]:53\"")
    host, port = text, PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UserError(f"{what} {text!r} must look like [2001:db8::53]:53")
        port = rest[1:] if rest else PORT
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        addr = ipaddress.ip_address(host)
        port = int(port)
    except ValueError:
        raise UserError(f"{what} {text!r} is not an IP address (with an optional port); names cannot be "
                        f"used for the upstream resolver") from None
    if not 0 < port < 65536:
        raise UserError(f"{what} {text!r} has an invalid port; use 1 to 65535")
    return str(addr), port


def system_upstreams(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The nameservers of the server's own resolver file; glibc's default (127.0.0.1) if none."""
    found = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver" and "%" not in words[1]:
                    try:
                        found.append((str(ipaddress.ip_address(words[1])), PORT))
                    except ValueError:
                        continue     # e.g. a scoped fe80::1%eth0: not usable from here
    except OSError:
        pass
    return found[:3] or [("127.0.0.1", PORT)]


# --- the wire format: just enough to check a query and build SERVFAIL -------------------------

def question_end(msg: bytes) -> int | None:
    """End offset of the single question of a query, or None if `msg` is not a plain query."""
    if len(msg) < 12 or msg[2] & 0x80 or msg[4:6] != b"\x00\x01":
        return None
    pos, end = 12, len(msg)
    for _ in range(128):
        if pos >= end:
            return None
        n = msg[pos]
        if n == 0:
            pos += 1
            return pos + 4 if pos + 4 <= end else None
        if n & 0xC0:                # compression has no place in a query's only name
            return None
        pos += 1 + n
    return None


def servfail(query: bytes, qend: int) -> bytes:
    """SERVFAIL for `query`: same ID, opcode and RD; the question echoed."""
    flags = bytes((0x80 | (query[2] & 0x79), 0x80 | 2))
    return query[:2] + flags + b"\x00\x01\x00\x00\x00\x00\x00\x00" + query[12:qend]


# --- the forwarder ------------------------------------------------------------------------------

_ZERO = memoryview(bytes(MAX_ANSWER))
TCP_BUFFER = 4096


def _wipe(buf: bytearray, n: int) -> None:
    """Overwrite the first `n` bytes of a reused buffer (no allocation: copied from a zero page)."""
    buf[:n] = _ZERO[:n]


class DnsForwarder:
    """The forwarder. Names never become Python objects (see `vpnd.forget` for the whole picture):

    - a UDP query is received with `recvfrom_into` straight into one of `MAX_INFLIGHT` slots
      (bytearrays made once, at open), forwarded from there, and the slot is zeroed when the query
      ends (answered, SERVFAIL, or malformed); overload SERVFAILs use one spare slot the same way;
    - every upstream answer is received with `recv_into` into the one answer buffer, checked, given
      back the client's ID in place and sent from there, then zeroed, all without an `await` in
      between (so no other task can write that buffer meanwhile);
    - what a query task holds besides its slot number: lengths, the client's ID as an int, its
      tunnel address and port (from `recvfrom_into`), the upstream socket. No `bytes` of a query or
      answer, so nothing with a name is left to the allocator when the query ends;
    - TCP is relayed through two 4 KiB buffers per connection with `recv_into`, each chunk zeroed
      once sent.
    """

    def __init__(self, listen: list[str], upstreams: list[tuple[str, int]], device: str | None = None,
                 port: int = PORT):
        self.listen = list(listen)
        self.upstreams = list(upstreams)
        self.device = device
        self.port = port
        self.counters: Counter[str] = Counter()
        self._first = 0              # the upstream tried first; moves on when one fails
        self._inflight = 0
        self._tcp = 0
        self._udp_socks: list[socket.socket] = []
        self._tcp_socks: list[socket.socket] = []
        self._slots = [bytearray(MAX_QUERY) for _ in range(MAX_INFLIGHT)]
        self._free = list(range(MAX_INFLIGHT))
        self._spare = bytearray(MAX_QUERY)       # a query refused (overload) waits here for its SERVFAIL
        self._answer = bytearray(MAX_ANSWER)     # every upstream answer, one at a time

    def __repr__(self) -> str:
        return f"DnsForwarder(listening={len(self._udp_socks)})"

    def __reduce__(self):
        raise TypeError("memory-only")

    def _bind(self, kind: int, addr: str) -> socket.socket:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(family, kind)
        try:
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)        # the address may still be settling
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.device:
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.device.encode())
            s.bind((addr, self.port))
            if kind == socket.SOCK_STREAM:
                s.listen(64)
        except OSError as exc:
            s.close()
            proto = "TCP" if kind == socket.SOCK_STREAM else "UDP"
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"{proto} port {self.port} on the tunnel address is already in use (another DNS "
                                f"server?); stop it, or set dns_forwarder = false and dns = [...]", 1) from None
            raise UserError(f"cannot open the DNS forwarder's {proto} port {self.port} ({exc.strerror}); "
                            f"set dns_forwarder = false to run without it", 1) from None
        s.setblocking(False)
        return s

    def open(self) -> None:
        try:
            for addr in self.listen:
                self._udp_socks.append(self._bind(socket.SOCK_DGRAM, addr))
                self._tcp_socks.append(self._bind(socket.SOCK_STREAM, addr))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for s in self._udp_socks + self._tcp_socks:
            s.close()
        self._udp_socks.clear()
        self._tcp_socks.clear()
        for buf in self._slots + [self._spare]:
            _wipe(buf, len(buf))
        _wipe(self._answer, len(self._answer))

    def bound(self) -> tuple[list, list]:
        """(UDP, TCP) socket addresses actually bound (port 0 picks one: tests)."""
        return [s.getsockname()[:2] for s in self._udp_socks], [s.getsockname()[:2] for s in self._tcp_socks]

    def statistics(self) -> dict:
        return dict(sorted(self.counters.items()))

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for s in self._udp_socks:
                nursery.start_soon(self._udp_loop, s, nursery)
            for s in self._tcp_socks:
                nursery.start_soon(self._tcp_loop, s, nursery)
            task_status.started()

    def _order(self) -> list[tuple[str, int]]:
        n = len(self.upstreams)
        return [self.upstreams[(self._first + i) % n] for i in range(min(n, 2))]

    def _failed(self, upstream: tuple[str, int]) -> None:
        if self.upstreams[self._first % len(self.upstreams)] == upstream:
            self._first = (self._first + 1) % len(self.upstreams)

    # --- UDP ------------------------------------------------------------------------------------
    async def _udp_loop(self, sock: socket.socket, nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            slot = self._free.pop() if self._free else None
            buf = self._spare if slot is None else self._slots[slot]
            try:
                n, client = sock.recvfrom_into(buf)
            except BlockingIOError:
                n = 0
            except OSError:
                n = -1
            if n <= 0:
                if n < 0:
                    self.counters["malformed"] += 1
                if slot is not None:
                    self._free.append(slot)
                continue
            self.counters["queries"] += 1
            qend = question_end(memoryview(buf)[:n])
            if qend is None or slot is None or not self.upstreams:
                if qend is None:
                    self.counters["malformed"] += 1
                else:
                    self.counters["overload" if self.upstreams else "failures"] += 1
                    self._servfail(sock, buf, qend, client)
                _wipe(buf, n)
                if slot is not None:
                    self._free.append(slot)
                continue
            self._inflight += 1
            nursery.start_soon(self._forward, sock, slot, n, qend, client)
            client = None          # the task holds it (a tunnel address and port), for its lifetime only

    def _send(self, sock: socket.socket, data, client) -> None:
        try:
            sock.sendto(data, client)
        except OSError:          # also a full buffer: the client asks again
            self.counters["failures"] += 1

    def _servfail(self, sock: socket.socket, buf: bytearray, qend: int, client) -> None:
        """SERVFAIL for the query in `buf`, written over it in place (same ID, opcode, RD; question)."""
        buf[2] = 0x80 | (buf[2] & 0x79)
        buf[3] = 0x80 | 2
        buf[4:12] = b"\x00\x01\x00\x00\x00\x00\x00\x00"
        self._send(sock, memoryview(buf)[:qend], client)

    async def _forward(self, sock: socket.socket, slot: int, n: int, qend: int, client) -> None:
        buf = self._slots[slot]
        cid = buf[0] << 8 | buf[1]
        try:
            for upstream in self._order():
                if await self._ask(upstream, buf, n, qend, sock, client, cid):
                    self.counters["answers"] += 1
                    return
                self._failed(upstream)
            self.counters["failures"] += 1
            buf[0], buf[1] = cid >> 8, cid & 0xFF
            self._servfail(sock, buf, qend, client)
        finally:
            _wipe(buf, n)
            self._free.append(slot)
            self._inflight -= 1

    async def _ask(self, upstream: tuple[str, int], buf: bytearray, n: int, qend: int, sock, client,
                   cid: int) -> bool:
        """One attempt from a fresh socket with a fresh ID; True once the client has its answer."""
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        qid = secrets.randbelow(0x10000)
        buf[0], buf[1] = qid >> 8, qid & 0xFF
        query = memoryview(buf)
        answer = self._answer
        view = memoryview(answer)
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as up:
                up.setblocking(False)
                up.connect(upstream)                  # only this upstream's datagrams reach us
                up.send(query[:n])
                with trio.move_on_after(ATTEMPT_TIMEOUT):
                    while True:
                        await trio.lowlevel.wait_readable(up)
                        try:
                            m = up.recv_into(answer)
                        except BlockingIOError:
                            continue
                        # from here to the wipe there is no await: the answer buffer is this task's
                        ok = (m >= qend and answer[0] == buf[0] and answer[1] == buf[1] and answer[2] & 0x80
                              and view[12:qend] == query[12:qend])
                        if ok:
                            answer[0], answer[1] = cid >> 8, cid & 0xFF
                            self._send(sock, view[:m], client)
                        _wipe(answer, m)
                        if ok:
                            return True
        except OSError:                               # refused, unreachable
            pass
        return False

    # --- TCP ------------------------------------------------------------------------------------
    async def _tcp_loop(self, listener: socket.socket, nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            self.counters["tcp_connections"] += 1
            if self._tcp >= MAX_TCP:
                self.counters["overload"] += 1
                conn.close()
                continue
            conn.setblocking(False)
            self._tcp += 1
            nursery.start_soon(self._relay, conn)
            conn = None

    async def _relay(self, conn: socket.socket) -> None:
        ok = False
        up = None
        try:
            with trio.move_on_after(TCP_LIFETIME):
                upstream = self._order()[0]
                family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
                up = socket.socket(family, socket.SOCK_STREAM)
                up.setblocking(False)
                err = up.connect_ex(upstream)
                if err == errno.EINPROGRESS:
                    with trio.move_on_after(TCP_CONNECT_TIMEOUT):
                        await trio.lowlevel.wait_writable(up)
                        err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                ok = err == 0
                if not ok:
                    self._failed(upstream)
                    return
                async with trio.open_nursery() as n:
                    n.start_soon(_pipe, conn, up, n.cancel_scope, False)
                    n.start_soon(_pipe, up, conn, n.cancel_scope, True)
        except OSError:
            ok = False
        finally:
            if not ok:
                self.counters["failures"] += 1
            self._tcp -= 1
            if up is not None:
                up.close()
            conn.close()


async def _pipe(src: socket.socket, dst: socket.socket, scope, last: bool) -> None:
    """Copy until EOF or TCP_IDLE of silence, through one buffer zeroed after each chunk. The
    client's EOF is passed on; the upstream's ends all."""
    buf = bytearray(TCP_BUFFER)
    view = memoryview(buf)
    idle = None
    try:
        while True:
            with trio.move_on_after(TCP_IDLE) as idle:
                await trio.lowlevel.wait_readable(src)
            if idle.cancelled_caught:
                break
            try:
                n = src.recv_into(buf)
            except BlockingIOError:
                continue
            if not n:
                break
            try:
                off = 0
                while off < n:
                    try:
                        off += dst.send(view[off:n])
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(dst)
            finally:
                _wipe(buf, n)
        if not last and not idle.cancelled_caught:
            dst.shutdown(socket.SHUT_WR)
            return
    except OSError:
        pass
    scope.cancel()


def configure(section: dict, cfg) -> None:
    """`[server]` dns_forwarder (default true) and dns_upstream (default: this machine's resolvers).
    With the forwarder on and no `dns` configured, clients are told to use the forwarder."""
    from .pool import AddressPool

    on = section.get("dns_forwarder", True)
    if not isinstance(on, bool):
        raise UserError("server.dns_forwarder must be true or false")
    cfg.dns_forwarder = on
    ups = section.get("dns_upstream")
    if ups is not None:
        if isinstance(ups, str):
            ups = [ups]
        if not isinstance(ups, list) or not ups:
            raise UserError('server.dns_upstream must be a list like ["192.0.2.53", "[2001:db8::53]:53"]')
        cfg.dns_upstream = [parse_upstream(u, "server.dns_upstream entry") for u in ups]
    elif on:
        cfg.dns_upstream = system_upstreams()
    if on and "dns" not in section:
        cfg.dns = [str(AddressPool(n).server) for n in (cfg.pool4, cfg.pool6) if n is not None]
