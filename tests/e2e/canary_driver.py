"""Drives many client sessions from one process through the sans-IO core (for the no-logs tests).

    python -m tests.e2e.canary_driver PLAN.json

PLAN: {"server": [host, port], "server6": [host, port], "server_public": hex, "sessions": [{"src": ip, "key": hex,
"destinations": [ip, ...]}], "close": [indices that send a close; the others just go silent]}.
Each session binds its own UDP socket to its canary source address, handshakes, waits for its
pushed config, sends UDP packets to canary destinations inside the tunnel plus one ICMP echo to
the server's tunnel address, then ends. Prints one JSON line: what happened, and each session's
transport keys (hex) so the tests can look for them in the server's memory.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

from vpncore.proto.client import ClientConnection
from vpncore.proto.events import ControlReceived
from vpncore.proto.gso import checksum
from tests.helpers import ipv4_packet

SERVER_TUN4 = "198.19.0.1"


class Session:
    def __init__(self, spec: dict, server: tuple, server_public: bytes, index: int):
        import os
        self.spec = spec
        fam = socket.AF_INET6 if ":" in spec["src"] else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_DGRAM)
        self.sock.bind((spec["src"], 0))
        self.sock.connect(tuple(server[1] if fam == socket.AF_INET6 else server[0]))
        self.sock.setblocking(False)
        self.conn = ClientConnection(private_key=bytes.fromhex(spec["key"]), server_public=server_public,
                                     rng=os.urandom, wall_offset=time.time() - time.monotonic() + index * 1e-3)
        self.address = None
        self.replies = 0

    def flush(self):
        for dg in self.conn.datagrams_to_send():
            try:
                self.sock.send(dg)
            except OSError:
                pass

    def pump(self, now: float):
        while True:
            try:
                dg = self.sock.recv(65535)
            except (BlockingIOError, OSError):
                break
            pkt = self.conn.receive_datagram(dg, now)
            if pkt is not None and pkt[9] == 1 and pkt[20] == 0:   # ICMP echo reply
                self.replies += 1
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, ControlReceived) and ev.msg["type"] == "config":
                self.address = ev.msg["ipv4"].split("/")[0]
        self.conn.handle_timer(now)
        self.flush()


def icmp_echo(src: str, dst: str, ident: int) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"canary-ping"
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4_packet(src, dst, body, proto=1)


def run_until(sessions, predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        for s in sessions:
            s.pump(now)
        if predicate():
            return True
        select.select([s.sock for s in sessions], [], [], 0.05)
    return predicate()


def main(path: str) -> int:
    plan = json.load(open(path))
    server = (tuple(plan["server"]), tuple(plan["server6"]))
    server_public = bytes.fromhex(plan["server_public"])
    sessions = [Session(spec, server, server_public, i) for i, spec in enumerate(plan["sessions"])]
    for s in sessions:
        s.conn.connect(time.monotonic())
        s.flush()
    run_until(sessions, lambda: all(s.address for s in sessions), 20)
    keys = [bytes(k).hex() for s in sessions if s.conn.current is not None for k in s.conn.current._keys]
    now = time.monotonic()
    sent = 0
    for i, s in enumerate(sessions):
        if not s.address:
            continue
        for dst in s.spec["destinations"]:
            s.conn.send_packet(ipv4_packet(s.address, dst, b"canary traffic " * 8), now)
            sent += 1
        s.conn.send_packet(icmp_echo(s.address, SERVER_TUN4, i), now)
        s.flush()
    run_until(sessions, lambda: all(s.replies for s in sessions if s.address), 10)
    return end_sessions(sessions, plan, {"sent": sent, "replies": sum(s.replies for s in sessions),
                                         "session_keys": keys})


def end_sessions(sessions: list, plan: dict, report: dict) -> int:
    """Close the sessions the plan names (the others just fall silent), print one JSON line (the
    session counts, then `report`), close the sockets."""
    closing = set(plan.get("close", []))
    for i, s in enumerate(sessions):
        if i in closing:
            s.conn.close(time.monotonic(), "done")
            s.flush()
    print(json.dumps({"sessions": len(sessions), "established": sum(1 for s in sessions if s.address),
                      **report}))
    for s in sessions:
        s.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
