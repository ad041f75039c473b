"""The packet pump (vpncore/net/pump.py) without root: fake TUNs (AF_UNIX datagram socketpairs) and
loopback UDP. Packets in, the same packets out; a failing read or datagram is counted, never fatal;
the core's events are handled before delivery on both receive paths."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

import trio
from nacl.bindings import crypto_scalarmult_base

from vpncore.log import QUIET, Log
from vpncore.net.fake import FakeApplied, fake_tun
from vpncore.proto.loss import SMALL
from vpncore.net.pump import Link, Pump, PumpLimits
from vpncore.net.udp import Udp, UdpSet, open_connected, open_listener
from vpncore.proto.constants import VNET_HDR_LEN
from vpncore.proto.gso import VNET_HDR
from vpnclient.client import Client
from vpnclient.config import ClientConfig
from vpnd.config import ClientEntry, ServerConfig
from vpnd.server import Server

from tests.helpers import ipv4_packet, udp_payload

NO_VNET = bytes(VNET_HDR_LEN)


async def _recv(sock: socket.socket, timeout: float = 5.0) -> bytes:
    with trio.fail_after(timeout):
        while True:
            try:
                return sock.recv(1 << 17)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)


def _tcp_super(src: str, dst: str, total: int = 60000, mss: int = 1380) -> bytes:
    """virtio_net_hdr (GSO_TCPV4) + one IPv4/TCP super-packet, as a TUN with TSO gives."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0,
                     ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    return VNET_HDR.pack(1, 1, 40, mss, 20, 16) + ip + tcp + os.urandom(total - 40)


# --- the pump's mechanics, with a transparent Side ---------------------------------------------

class EchoSide:
    """Seals a read as itself (one datagram); opens a datagram as itself. Records the order of calls;
    a read or datagram starting with b"X" raises (a bug met by one packet)."""

    def __init__(self, ep):
        self.link = Link(lambda piece, now, chunk: [bytes(piece)], lambda on: None, 1436)
        self.ep = ep
        self.calls = []

    def route(self, read, now):
        if read[:1] == b"X":
            raise RuntimeError("a bug met by this read")
        return self.link, self.ep

    def open(self, dg, src, now):
        if dg[:1] == b"X":
            raise RuntimeError("a bug met by this datagram")
        self.calls.append("open")
        return dg

    def open_train(self, buf, seg, src, now):
        self.calls.append("open")
        return [buf[i:i + seg] for i in range(0, len(buf), seg)]

    def events(self, now):
        self.calls.append("events")

    def deliver(self, item, now):
        self.calls.append("deliver")
        return item

    def after_batch(self, now):
        self.calls.append("after")


async def test_pump_moves_packets_both_ways_and_contains_failures():
    tun, kernel = fake_tun()
    kernel.setblocking(False)
    a = open_listener("127.0.0.1", 0)       # the pump's socket
    b = open_listener("127.0.0.1", 0)       # the far end
    side = EchoSide(b.getsockname()[:2])
    pump = Pump(tun.fd, UdpSet([Udp(a)]), side, PumpLimits(hold=4))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            sent = [b"p%04d" % i + bytes(100) for i in range(20)]
            for p in sent[:10] + [b"X-bad"] + sent[10:]:
                kernel.send(p)
            got = [await _recv(b) for _ in sent]
            assert got == sent                       # in order, the failing read alone lost
            back = [b"q%04d" % i + bytes(60) for i in range(5)]
            for p in back[:2] + [b"X-bad"] + back[2:]:
                b.sendto(p, a.getsockname())
            assert [await _recv(kernel) for _ in back] == back
            with trio.fail_after(5):
                while pump.statistics().contained < 2:
                    await trio.sleep(0.01)
            i = side.calls.index("open")
            assert side.calls[i:i + 3] == ["open", "events", "deliver"]     # events before delivery
            nursery.cancel_scope.cancel()
        st = pump.statistics()
        assert st.contained == 2 and st.tun_reads >= 21 and st.tun_read_errors == 0, st
    finally:
        pump.close()
        for s in (a, b, kernel):
            s.close()
        tun.close()


def test_loss_reports_decide_size_and_parity_in_the_link():
    parity = []
    link = Link(lambda piece, now, chunk: [], parity.append, 1436)
    assert parity == [False] and link.gso.size > SMALL
    link.loss_report(done=90, lost=10)
    assert parity[-1] is True and link.gso.size == SMALL
    for _ in range(3):
        link.loss_report(done=100, lost=0)
    assert parity[-1] is False and link.gso.size > SMALL


# --- the real vpnd and vpnclient, each with its pump --------------------------------------------

async def test_server_and_client_pumps_carry_packets_unchanged(tmp_path):
    sk, ck = os.urandom(32), os.urandom(32)
    stun, server_kernel = fake_tun("srv0")
    ctun, client_kernel = fake_tun("cli0")
    for s in (server_kernel, client_kernel):
        s.setblocking(False)
    srv = Server(ServerConfig(private_key=sk, listen=[("127.0.0.1", 0)],
                              pool4=ipaddress.ip_network("198.19.0.0/24"),
                              clients=[ClientEntry(crypto_scalarmult_base(ck))]), Log("vpnd", QUIET))
    listener = open_listener("127.0.0.1", 0)
    srv.attach(stun, [listener])
    port = listener.getsockname()[1]
    cl = Client(ClientConfig(private_key=ck, server_host="127.0.0.1", server_port=port,
                             server_public=crypto_scalarmult_base(sk), control_socket=str(tmp_path / "c.sock"),
                             persistent_keepalive=0), Log("vpnclient", QUIET), out=lambda line: None)
    sock, ep = open_connected("127.0.0.1", port)
    cl.attach(ctun, sock, ep, FakeApplied())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            await nursery.start(cl.run)
            with trio.fail_after(10):
                while not (cl.applied.addresses and srv.routes):
                    await trio.sleep(0.02)
            mine = cl.applied.addresses[0].split("/")[0]
            far = "192.0.2.7"
            up = [NO_VNET + ipv4_packet(mine, far, udp_payload(n, n)) for n in (10, 500, 1400)]
            up.append(_tcp_super(mine, far))              # a super-packet: fragments, one GRO train
            for p in up:
                client_kernel.send(p)
            assert [await _recv(server_kernel) for _ in up] == up
            down = [NO_VNET + ipv4_packet(far, mine, udp_payload(n, n)) for n in (20, 1300)]
            down.append(_tcp_super(far, mine))
            for p in down:
                server_kernel.send(p)
            assert [await _recv(client_kernel) for _ in down] == down
            # a packet from an address that is not the client's is dropped by vpnd's policy
            client_kernel.send(NO_VNET + ipv4_packet("198.19.0.99", far, b"spoofed"))
            client_kernel.send(up[0])
            assert await _recv(server_kernel) == up[0]
            srv._account()
            drops = srv.stats.today().drops
            assert drops.get("inner-source", 0) == 1 and not drops.get("internal-error"), drops
            srv.stop()
            cl.stop()
    finally:
        server_kernel.close()
        client_kernel.close()
