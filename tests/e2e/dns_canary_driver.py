"""Many client sessions from canary underlay addresses, each asking vpnd's DNS forwarder for canary
names through the tunnel (for the no-logs memory test).

    python -m tests.e2e.dns_canary_driver PLAN.json

PLAN: {"server": [host, port], "server6": [host, port], "server_public": hex,
"sessions": [{"src": ip, "key": hex, "names": [name, ...]}], "close": [indices that send a close]}.
Each session handshakes from its own canary source address, waits for its pushed config, asks each
of its names (A, over the tunnel's IPv4 to 198.19.0.1:53 for even names, over its IPv6 to
2001:2:0:100::1 for odd ones), waits for the answers, then ends (a close, or silence). Prints one
JSON line: sessions established, queries sent, answers received, and each session's UDP port as vpnd
saw it (the test looks for the sockaddr form too).
"""

from __future__ import annotations

import ipaddress
import json
import struct
import sys
import time

from tests.e2e.canary_driver import Session, end_sessions, run_until
from tests.e2e.memscan import wire_name
from tests.helpers import _checksum, ipv4_packet, ipv6_packet
from vpncore.proto.events import ControlReceived

DNS4 = "198.19.0.1"
DNS6 = "2001:2:0:100::1"


def dns_query(name: str, qid: int) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire_name(name) + b"\x00\x01\x00\x01"


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    length = 8 + len(payload)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, 17, length)
    else:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", length, 17)
    head = struct.pack("!HHHH", sport, dport, length, 0)
    csum = _checksum(pseudo + head + payload) or 0xFFFF
    seg = struct.pack("!HHHH", sport, dport, length, csum) + payload
    return ipv4_packet(src, dst, seg) if s.version == 4 else ipv6_packet(src, dst, seg)


class DnsSession(Session):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.address6 = None
        self.answers = 0

    def pump(self, now: float):
        while True:
            try:
                dg = self.sock.recv(65535)
            except (BlockingIOError, OSError):
                break
            pkt = self.conn.receive_datagram(dg, now)
            if pkt is None:
                continue
            pkt = bytes(pkt)
            off, proto = (20, pkt[9]) if pkt[0] >> 4 == 4 else (40, pkt[6])
            if proto == 17 and len(pkt) >= off + 12 and struct.unpack_from("!H", pkt, off)[0] == 53 \
                    and pkt[off + 10] & 0x80:
                self.answers += 1
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, ControlReceived) and ev.msg["type"] == "config":
                self.address = ev.msg["ipv4"].split("/")[0]
                self.address6 = ev.msg["ipv6"].split("/")[0]
        self.conn.handle_timer(now)
        self.flush()


def main(path: str) -> int:
    plan = json.load(open(path))
    server = (tuple(plan["server"]), tuple(plan["server6"]))
    server_public = bytes.fromhex(plan["server_public"])
    sessions = [DnsSession(spec, server, server_public, i) for i, spec in enumerate(plan["sessions"])]
    for s in sessions:
        s.conn.connect(time.monotonic())
        s.flush()
    run_until(sessions, lambda: all(s.address and s.address6 for s in sessions), 20)
    ports = [s.sock.getsockname()[1] for s in sessions]
    sent = 0
    now = time.monotonic()
    for i, s in enumerate(sessions):
        if not s.address:
            continue
        for j, name in enumerate(s.spec["names"]):
            src, dst = (s.address, DNS4) if j % 2 == 0 else (s.address6, DNS6)
            s.conn.send_packet(udp_packet(src, dst, 40000 + j, 53, dns_query(name, 0x1000 + j)), now)
            sent += 1
        s.flush()
    run_until(sessions, lambda: all(s.answers >= len(s.spec["names"]) for s in sessions if s.address), 10)
    return end_sessions(sessions, plan, {"sent": sent, "answers": sum(s.answers for s in sessions), "ports": ports})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
