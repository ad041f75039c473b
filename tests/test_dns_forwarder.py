"""vpnd's DNS forwarder (issue 6) on loopback, no privileges: forwarding, IDs, timeouts, bounds, TCP.

The forwarder listens on 127.0.0.1 (port picked by the kernel) without a device binding; fake
upstreams are Trio sockets on loopback. The real thing (on the tunnel address, bound to the TUN,
reached through the tunnel) is tested end to end in tests/e2e/test_leaks.py.
"""

from __future__ import annotations

import functools
import socket
import struct

import pytest
import trio

from vpnd import dns
from vpnd.dns import DnsForwarder, parse_upstream, question_end, servfail
from vpncore.cli import UserError


def query(name: str, qid: int = 0x1234, qtype: int = 1) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def answer_for(q: bytes, ip: bytes = b"\xc0\x00\x02\x4d") -> bytes:
    qend = question_end(q)
    return (q[:2] + b"\x81\x80" + b"\x00\x01\x00\x01\x00\x00\x00\x00" + q[12:qend]
            + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04" + ip)


class Upstream:
    """A fake resolver on loopback: answers, stays silent, or answers wrongly first."""

    def __init__(self, mode: str = "answer"):
        self.mode = mode
        self.seen: list[bytes] = []
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def start(self):
        await self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()

    async def serve(self):
        while True:
            q, src = await self.sock.recvfrom(4096)
            self.seen.append(q)
            if self.mode == "silent":
                continue
            if self.mode == "spoof":      # wrong ID, then a wrong question, then the real one
                await self.sock.sendto(bytes([q[0] ^ 1, q[1]]) + answer_for(q)[2:], src)
                await self.sock.sendto(answer_for(query("other.test", int.from_bytes(q[:2], "big"))), src)
            await self.sock.sendto(answer_for(q), src)


async def ask(addr, data: bytes, timeout: float = 3.0) -> bytes | None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        await s.connect(addr)
        await s.send(data)
        with trio.move_on_after(timeout):
            return await s.recv(65535)
    return None


async def start(nursery, upstreams) -> tuple[DnsForwarder, tuple]:
    fwd = DnsForwarder(["127.0.0.1"], upstreams, device=None, port=0)
    fwd.open()
    await nursery.start(fwd.serve)
    return fwd, fwd.bound()[0][0]


async def test_answer_comes_back_with_the_clients_id_and_upstream_sees_a_fresh_one():
    up = Upstream()
    async with trio.open_nursery() as n:
        up_addr = await up.start()
        n.start_soon(up.serve)
        fwd, addr = await start(n, [up_addr])
        ids = set()
        for i in range(8):
            q = query("leak.vpn.test", qid=0x4242)
            a = await ask(addr, q)
            assert a is not None and a[:2] == b"\x42\x42" and a[2] & 0x80
            assert a.endswith(b"\xc0\x00\x02\x4d")
            assert up.seen[-1][2:] == q[2:]             # the query itself is unchanged
            ids.add(up.seen[-1][:2])
        assert len(ids) > 1                               # a fresh random ID per query
        assert fwd.statistics() == {"answers": 8, "queries": 8}
        n.cancel_scope.cancel()
    fwd.close()


async def test_timeout_gives_servfail_and_counts_a_failure(monkeypatch):
    monkeypatch.setattr(dns, "ATTEMPT_TIMEOUT", 0.3)
    up = Upstream("silent")
    async with trio.open_nursery() as n:
        up_addr = await up.start()
        n.start_soon(up.serve)
        fwd, addr = await start(n, [up_addr])
        q = query("slow.vpn.test", qid=7)
        a = await ask(addr, q)
        assert a == servfail(q, question_end(q))
        assert a[3] & 0x0F == 2 and a[:2] == q[:2]
        assert fwd.statistics() == {"failures": 1, "queries": 1}
        n.cancel_scope.cancel()
    fwd.close()


async def test_refused_upstream_moves_on_to_the_next():
    dead = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await dead.bind(("127.0.0.1", 0))
    dead_addr = dead.getsockname()
    dead.close()                                  # nothing listens there: ICMP port unreachable
    up = Upstream()
    async with trio.open_nursery() as n:
        up_addr = await up.start()
        n.start_soon(up.serve)
        fwd, addr = await start(n, [dead_addr, up_addr])
        a = await ask(addr, query("x.vpn.test"))
        assert a is not None and a[3] & 0x0F == 0
        assert fwd.upstreams[fwd._first] == up_addr     # the next query goes to the live one first
        n.cancel_scope.cancel()
    fwd.close()


async def test_answers_with_a_wrong_id_or_question_are_ignored():
    up = Upstream("spoof")
    async with trio.open_nursery() as n:
        up_addr = await up.start()
        n.start_soon(up.serve)
        fwd, addr = await start(n, [up_addr])
        q = query("real.vpn.test", qid=99)
        a = await ask(addr, q)
        assert a[:2] == q[:2] and a[12:question_end(q)] == q[12:question_end(q)]
        assert a.endswith(b"\xc0\x00\x02\x4d")
        n.cancel_scope.cancel()
    fwd.close()


async def test_not_a_query_gets_no_answer():
    up = Upstream()
    async with trio.open_nursery() as n:
        up_addr = await up.start()
        n.start_soon(up.serve)
        fwd, addr = await start(n, [up_addr])
        for junk in (b"\x00" * 5, answer_for(query("a.test")), query("a.test")[:-3]):
            assert await ask(addr, junk, timeout=0.3) is None
        assert fwd.statistics() == {"malformed": 3, "queries": 3} and up.seen == []
        n.cancel_scope.cancel()
    fwd.close()


async def test_in_flight_table_is_bounded(monkeypatch):
    monkeypatch.setattr(dns, "MAX_INFLIGHT", 2)
    monkeypatch.setattr(dns, "ATTEMPT_TIMEOUT", 1.0)
    up = Upstream("silent")
    async with trio.open_nursery() as n:
        up_addr = await up.start()
        n.start_soon(up.serve)
        fwd, addr = await start(n, [up_addr])
        replies = []

        async def one(i):
            replies.append(await ask(addr, query(f"q{i}.vpn.test", qid=i)))

        async with trio.open_nursery() as m:
            for i in range(5):
                m.start_soon(one, i)
                await trio.sleep(0.02)
        assert fwd.statistics()["overload"] == 3 and len(up.seen) == 2
        assert all(r is not None and r[3] & 0x0F == 2 for r in replies)     # SERVFAIL, never silence
        assert fwd._inflight == 0
        n.cancel_scope.cancel()
    fwd.close()


async def test_tcp_is_relayed_to_the_upstream():
    got = []

    async def tcp_upstream(stream):
        data = await stream.receive_some(4096)
        got.append(data)
        q = data[2:]
        a = answer_for(q)
        await stream.send_all(struct.pack("!H", len(a)) + a)
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, tcp_upstream, 0, host="127.0.0.1"))
        up_addr = listeners[0].socket.getsockname()
        fwd = DnsForwarder(["127.0.0.1"], [up_addr], port=0)
        fwd.open()
        await n.start(fwd.serve)
        stream = await trio.open_tcp_stream(*fwd.bound()[1][0])
        q = query("tcp.vpn.test", qid=0x0707)
        await stream.send_all(struct.pack("!H", len(q)) + q)
        data = b""
        with trio.fail_after(5):
            while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        await stream.aclose()
        assert data[2:4] == b"\x07\x07" and data.endswith(b"\xc0\x00\x02\x4d")
        assert got == [struct.pack("!H", len(q)) + q]
        assert fwd.statistics()["tcp_connections"] == 1
        n.cancel_scope.cancel()
    fwd.close()


def test_port_in_use_is_one_line():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        fwd = DnsForwarder(["127.0.0.1"], [("127.0.0.1", 53)], port=s.getsockname()[1])
        with pytest.raises(UserError, match="already in use") as info:
            fwd.open()
        assert info.value.status == 1 and fwd.bound() == ([], [])
    finally:
        s.close()


@pytest.mark.parametrize("text,want", [
    ("192.0.2.53", ("192.0.2.53", 53)), ("192.0.2.53:5353", ("192.0.2.53", 5353)),
    ("2001:db8::53", ("2001:db8::53", 53)), ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
    ("[::1]", ("::1", 53)),
])
def test_parse_upstream(text, want):
    assert parse_upstream(text, "x") == want


@pytest.mark.parametrize("text", ["dns.example", "192.0.2.53:0", "[2001:db8::53", "192.0.2.53:x", 53])
def test_parse_upstream_refuses(text):
    with pytest.raises(UserError):
        parse_upstream(text, "server.dns_upstream entry")


def test_system_upstreams(tmp_path):
    p = tmp_path / "resolv.conf"
    p.write_text("# c\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\nsearch x\nnameserver 2001:db8::2\n")
    assert dns.system_upstreams(str(p)) == [("192.0.2.1", 53), ("2001:db8::2", 53)]
    p.write_text("search only\n")
    assert dns.system_upstreams(str(p)) == [("127.0.0.1", 53)]          # glibc's default
    assert dns.system_upstreams(str(tmp_path / "none")) == [("127.0.0.1", 53)]


def test_question_end_accepts_plain_queries_only():
    q = query("a.b.test")
    assert question_end(q) == len(q)
    assert question_end(q[:-1]) is None
    assert question_end(answer_for(q)) is None                           # a response
    assert question_end(q[:4] + b"\x00\x02" + q[6:]) is None             # two questions
    assert question_end(q[:12] + b"\xc0\x0c" + q[-4:]) is None           # compression pointer
    assert question_end(b"\x00" * 11) is None
