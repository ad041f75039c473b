"""DNS for clients, through the tunnel: a forwarder on the server's tunnel addresses (issue 6).

vpnd pushes its tunnel addresses as the clients' DNS servers (unless `dns` is configured) and
answers on port 53 there, UDP and TCP, by forwarding to the operator's upstream resolvers
(`dns_upstream`, default: the nameservers of the server's /etc/resolv.conf).

No log and no record of names, by construction (DESIGN §4):
- nothing is written or logged; the only state that outlives a query is a few integer counters
  (`queries`, `answers`, `failures`, `overload`, `malformed`, `tcp_connections`);
- a UDP query lives in one task for at most `ATTEMPT_TIMEOUT` per upstream tried (two at most):
  its bytes, the client's tunnel address and port; then it is gone. Each query goes out from a fresh
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

from vpncore.userror import UserError

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

class DnsForwarder:
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

    def bound(self) -> tuple[list, list]:
        """(UDP, TCP) socket addresses actually bound (port 0 picks one: tests)."""
        return [s.getsockname()[:2] for s in self._udp_socks], [s.getsockname()[:2] for s in self._tcp_socks]

    def statistics(self) -> dict:
        return dict(sorted(self.counters.items()))

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for s in self._udp_socks:
                nursery.start_soon(self._udp_loop, trio.socket.from_stdlib_socket(s), nursery)
            for s in self._tcp_socks:
                nursery.start_soon(self._tcp_loop, trio.SocketListener(trio.socket.from_stdlib_socket(s)), nursery)
            task_status.started()

    def _order(self) -> list[tuple[str, int]]:
        n = len(self.upstreams)
        return [self.upstreams[(self._first + i) % n] for i in range(min(n, 2))]

    def _failed(self, upstream: tuple[str, int]) -> None:
        if self.upstreams[self._first % len(self.upstreams)] == upstream:
            self._first = (self._first + 1) % len(self.upstreams)

    # --- UDP ------------------------------------------------------------------------------------
    async def _udp_loop(self, sock, nursery) -> None:
        while True:
            try:
                query, client = await sock.recvfrom(MAX_QUERY)
            except OSError:
                self.counters["malformed"] += 1
                continue
            self.counters["queries"] += 1
            qend = question_end(query)
            if qend is None:
                self.counters["malformed"] += 1
                continue
            if self._inflight >= MAX_INFLIGHT or not self.upstreams:
                self.counters["overload" if self.upstreams else "failures"] += 1
                await self._reply(sock, servfail(query, qend), client)
                continue
            self._inflight += 1
            nursery.start_soon(self._forward, sock, query, qend, client)
            query = client = None          # the task holds them, for its lifetime only

    async def _reply(self, sock, data: bytes, client) -> None:
        try:
            await sock.sendto(data, client)
        except OSError:
            self.counters["failures"] += 1

    async def _forward(self, sock, query: bytes, qend: int, client) -> None:
        try:
            for upstream in self._order():
                answer = await self._ask(upstream, query, qend)
                if answer is not None:
                    self.counters["answers"] += 1
                    await self._reply(sock, query[:2] + answer[2:], client)
                    return
                self._failed(upstream)
            self.counters["failures"] += 1
            await self._reply(sock, servfail(query, qend), client)
        finally:
            self._inflight -= 1

    async def _ask(self, upstream: tuple[str, int], query: bytes, qend: int) -> bytes | None:
        """One attempt: a fresh socket and ID; the answer, or None on timeout or error."""
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        qid = secrets.token_bytes(2)
        question = query[12:qend]
        try:
            with trio.socket.socket(family, socket.SOCK_DGRAM) as up:
                await up.connect(upstream)            # only this upstream's datagrams reach us
                await up.send(qid + query[2:])
                with trio.move_on_after(ATTEMPT_TIMEOUT):
                    while True:
                        answer = await up.recv(MAX_ANSWER)
                        if (len(answer) >= 12 and answer[:2] == qid and answer[2] & 0x80
                                and answer[12:12 + len(question)] == question):
                            return answer
        except OSError:                               # refused, unreachable
            pass
        return None

    # --- TCP ------------------------------------------------------------------------------------
    async def _tcp_loop(self, listener, nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError:
                continue
            self.counters["tcp_connections"] += 1
            if self._tcp >= MAX_TCP:
                self.counters["overload"] += 1
                await stream.aclose()
                continue
            self._tcp += 1
            nursery.start_soon(self._relay, stream)
            stream = None

    async def _relay(self, stream) -> None:
        ok = False
        try:
            with trio.move_on_after(TCP_LIFETIME):
                upstream = self._order()[0]
                with trio.move_on_after(TCP_CONNECT_TIMEOUT):
                    up = await trio.open_tcp_stream(*upstream)
                    ok = True
                if not ok:
                    self._failed(upstream)
                    return
                async with up:
                    async with trio.open_nursery() as n:
                        n.start_soon(_pipe, stream, up, n.cancel_scope, False)
                        n.start_soon(_pipe, up, stream, n.cancel_scope, True)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            ok = False
        finally:
            if not ok:
                self.counters["failures"] += 1
            self._tcp -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def _pipe(src, dst, scope, last: bool) -> None:
    """Copy until EOF or TCP_IDLE of silence. The client's EOF is passed on; the upstream's ends all."""
    try:
        while True:
            with trio.move_on_after(TCP_IDLE) as idle:
                data = await src.receive_some(65536)
            if idle.cancelled_caught or not data:
                break
            await dst.send_all(data)
        if not last and not idle.cancelled_caught:
            await dst.send_eof()
            return
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
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
