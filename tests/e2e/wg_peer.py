"""A WireGuard peer made of vpncore.proto.wireguard and one UDP socket (test driver, no TUN).

Run with the venv's python inside a network namespace. It answers ICMP echo requests that arrive in
the tunnel for --tunnel-ip by building the reply packet itself. Two modes:

  responder (default): wait for initiations on --listen; --under-load demands mac2 (cookie reply).
  --initiate HOST:PORT: start the handshake, then send --count echo requests to --ping and exit 0
  when every one was answered (1 otherwise).

It prints one line per event on stdout (ready, handshake, cookie-sent, cookie-received, echo-reply,
pong SEQ) so the test can follow it.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import os
import signal
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from vpncore.proto import wireguard as wg  # noqa: E402
from vpncore.proto.errors import BadPacket  # noqa: E402
from tests.helpers import _checksum as checksum, ipv4_packet  # noqa: E402


def say(*words) -> None:
    print(*words, flush=True)


def ipv4_icmp(src: bytes, dst: bytes, icmp_type: int, ident: int, seq: int, data: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + data
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    return ipv4_packet(socket.inet_ntoa(src), socket.inet_ntoa(dst), icmp, proto=1)


def parse_icmp(packet: bytes):
    """(src, dst, type, ident, seq, data) of an IPv4 ICMP echo packet, or None."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 15) * 4
    icmp = packet[ihl:]
    if len(icmp) < 8:
        return None
    t, _code, _ck, ident, seq = struct.unpack("!BBHHH", icmp[:8])
    return packet[12:16], packet[16:20], t, ident, seq, icmp[8:]


def key(text: str) -> bytes:
    raw = base64.b64decode(text)
    if len(raw) != 32:
        raise SystemExit("keys are 32 bytes, base64")
    return raw


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Peer:
    def __init__(self, args):
        self.args = args
        self.tunnel_ip = ipaddress.IPv4Address(args.tunnel_ip).packed
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(hostport(args.listen))
        self.sessions: dict[int, wg.Session] = {}
        self.endpoint = None
        self.pongs: set[int] = set()
        private = key(args.private_key)
        peer = key(args.peer_public)
        psk = key(args.psk) if args.psk else None
        self.responder = wg.Responder(private, {peer: psk})
        self.initiator = wg.Initiator(private, peer, psk=psk)

    def send(self, datagram: bytes, addr) -> None:
        self.sock.sendto(datagram, addr)

    def latest(self) -> wg.Session | None:
        usable = [s for s in self.sessions.values() if s.confirmed]
        return max(usable, key=lambda s: s.created) if usable else None

    def handle(self, data: bytes, addr) -> None:
        now = time.time()
        kind = data[0] if data else 0
        if kind == wg.MSG_INITIATION:
            try:
                consumed = self.responder.consume_initiation(data, now, src=addr,
                                                             under_load=self.args.under_load)
            except wg.CookieRequired as c:
                self.send(c.reply, addr)
                say("cookie-sent")
                return
            msg, session = self.responder.create_response(consumed, now)
            self.sessions[session.local_index] = session
            self.send(msg, addr)
            say("handshake responder")
        elif kind == wg.MSG_RESPONSE:
            session = self.initiator.consume_response(data, now)
            self.sessions[session.local_index] = session
            self.endpoint = addr
            say("handshake initiator")
        elif kind == wg.MSG_COOKIE_REPLY:
            self.initiator.consume_cookie_reply(data, now)
            say("cookie-received")
            self.send(self.initiator.create_initiation(now), addr)
        elif kind == wg.MSG_TRANSPORT:
            header, _ = wg.parse_transport(data)
            session = self.sessions.get(header.receiver)
            if session is None:
                raise BadPacket("index")
            packet = session.decrypt(data, now)
            self.endpoint = addr
            if not packet:
                say("keepalive")
                return
            icmp = parse_icmp(packet)
            if icmp is None:
                return
            src, dst, t, ident, seq, payload = icmp
            if t == 8 and dst == self.tunnel_ip:
                self.send(session.encrypt(ipv4_icmp(dst, src, 0, ident, seq, payload), now), addr)
                say("echo-reply", seq)
            elif t == 0 and dst == self.tunnel_ip:
                self.pongs.add(seq)
                say("pong", seq)

    def pump(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data, addr = self.sock.recvfrom(65535)
        except socket.timeout:
            return
        try:
            self.handle(data, addr)
        except BadPacket as e:
            say("drop", e.reason)

    def serve(self) -> int:
        say("ready", base64.b64encode(self.responder.public).decode())
        while True:
            self.pump(1.0)

    def initiate(self) -> int:
        target = hostport(self.args.initiate)
        ping = ipaddress.IPv4Address(self.args.ping).packed
        say("ready", base64.b64encode(self.responder.public).decode())
        deadline = time.monotonic() + 20
        while self.latest() is None:
            if time.monotonic() > deadline:
                say("no-handshake")
                return 1
            self.send(self.initiator.create_initiation(time.time()), target)
            until = time.monotonic() + 1
            while self.latest() is None and time.monotonic() < until:
                self.pump(0.2)
        for seq in range(1, self.args.count + 1):
            session = self.latest()
            pkt = ipv4_icmp(self.tunnel_ip, ping, 8, 0x4242, seq, os.urandom(32))
            self.send(session.encrypt(pkt, time.time()), self.endpoint)
            until = time.monotonic() + 3
            while seq not in self.pongs and time.monotonic() < until:
                self.pump(0.2)
        ok = len(self.pongs) == self.args.count
        say("done", len(self.pongs), "of", self.args.count)
        return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--private-key", required=True, help="ours, base64")
    p.add_argument("--peer-public", required=True, help="the wireguard-go side's, base64")
    p.add_argument("--listen", default="0.0.0.0:51820")
    p.add_argument("--tunnel-ip", required=True)
    p.add_argument("--psk", help="the preshared key, base64 (none: all zeros)")
    p.add_argument("--under-load", action="store_true")
    p.add_argument("--initiate", metavar="HOST:PORT")
    p.add_argument("--ping", help="with --initiate: the tunnel address to send echo requests to")
    p.add_argument("--count", type=int, default=3)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    peer = Peer(args)
    return peer.initiate() if args.initiate else peer.serve()


if __name__ == "__main__":
    sys.exit(main())
