"""One client session driven through the sans-IO core, under a test's command (issue 7 tests).

    python -m tests.e2e.attack_driver SPEC.json

SPEC: {"server": [host, port], "server_public": hex, "key": hex (client private), "src": ip}.
The driver binds a UDP socket to `src`, keeps the ClientConnection's timers running, and answers
one JSON command per line on stdin with one JSON line on stdout:

    {"cmd": "connect"}                       handshake and wait for the pushed config
    {"cmd": "send", "n": N, "port": P, "rate": R, "record": true, "size": S}
                                             N UDP packets inside the tunnel to the server's tunnel
                                             address:P, paced at R/s; with record, every transport
                                             datagram sent is kept (in order)
    {"cmd": "replay", "order": "forward"|"reverse"|"shuffle", "seed": 1, "rate": R}
                                             the recorded datagrams again, from the same socket
    {"cmd": "dump", "path": P, "what": "recorded"|"initiations"|"corpus"}
                                             hex lines to a file (for the raw-socket senders)
    {"cmd": "resend_initiation", "wait": s}  the first initiation it ever sent, again
    {"cmd": "ping", "n": N, "wait": s}       ICMP echoes to the server's tunnel address
    {"cmd": "status"}                        state, handshake age, session index, what it received
    {"cmd": "quit"}

Used where a test needs the exact bytes a real client sent (replays) or a view of the session
from the client's side (handshake age); the transfers under attack use the real vpnclient.
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import struct
import sys
import time
from collections import Counter

from vpncore.proto.client import ClientConnection
from vpncore.proto.constants import MSG_INITIATION, MSG_TRANSPORT
from vpncore.proto.events import ControlReceived
from vpncore.proto.gso import checksum
from tests.helpers import ipv4_packet

SERVER_TUN4 = "198.19.0.1"
MAX_WAIT = 60


class Driver:
    def __init__(self, spec: dict):
        self.server = tuple(spec["server"])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((spec["src"], 0))
        self.sock.connect(self.server)
        self.sock.setblocking(False)
        self.conn = ClientConnection(private_key=bytes.fromhex(spec["key"]),
                                     server_public=bytes.fromhex(spec["server_public"]),
                                     rng=os.urandom, wall_offset=time.time() - time.monotonic())
        self.address = None
        self.recording = False
        self.recorded: list[bytes] = []
        self.initiations: list[bytes] = []
        self.corpus: list[bytes] = []        # a sample of everything sent, for the fuzzer
        self.received = Counter()            # message types received from the server
        self.echo_replies = 0
        self.send_errors = 0

    # --- I/O --------------------------------------------------------------------------------
    def _out(self, dg: bytes) -> None:
        if dg[0] == MSG_INITIATION:
            self.initiations.append(dg)
        elif self.recording and dg[0] == MSG_TRANSPORT:
            self.recorded.append(dg)
        if len(self.corpus) < 400 or random.random() < 0.01:
            self.corpus.append(dg)
        self._send_raw(dg)

    def _send_raw(self, dg: bytes) -> None:
        for _ in range(200):              # a full socket buffer: wait a little, bounded
            try:
                self.sock.send(dg)
                return
            except BlockingIOError:
                select.select([], [self.sock], [], 0.01)
            except OSError:
                self.send_errors += 1
                return
        self.send_errors += 1

    def flush(self) -> None:
        for dg in self.conn.datagrams_to_send():
            self._out(dg)

    def pump(self) -> None:
        now = time.monotonic()
        for _ in range(1024):
            try:
                dg = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            if dg:
                self.received[dg[0]] += 1
            pkt = self.conn.receive_datagram(dg, now)
            if pkt is not None and len(pkt) > 20 and pkt[0] >> 4 == 4 and pkt[9] == 1 and pkt[20] == 0:
                self.echo_replies += 1
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, ControlReceived) and ev.msg.get("type") == "config":
                self.address = ev.msg["ipv4"].split("/")[0]
        due = self.conn.get_timer()
        if due is not None and now >= due:
            self.conn.handle_timer(now)
        self.flush()

    def wait(self, predicate, seconds: float) -> bool:
        deadline = time.monotonic() + min(seconds, MAX_WAIT)
        while True:
            self.pump()
            if predicate():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self.sock], [], [], min(left, 0.02))

    # --- commands ----------------------------------------------------------------------------
    def connect(self, c: dict) -> dict:
        self.conn.connect(time.monotonic())
        self.flush()
        ok = self.wait(lambda: self.address is not None, c.get("wait", 15))
        return {"ok": ok, "address": self.address, **self.status({})}

    def send(self, c: dict) -> dict:
        n, port, rate = int(c["n"]), int(c.get("port", 9)), float(c.get("rate", 10000))
        size = int(c.get("size", 64))
        self.recording = bool(c.get("record"))
        start = time.monotonic()
        sent = 0
        tag = c.get("tag", "pkt").encode()[:8].ljust(8, b"-")
        while sent < n and time.monotonic() - start < MAX_WAIT:
            due = min(n, int((time.monotonic() - start) * rate) + 1)
            now = time.monotonic()
            while sent < due:
                payload = tag + struct.pack("!I", sent) + bytes(max(0, size - 12))
                udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
                dg = self.conn.encrypt(ipv4_packet(self.address, SERVER_TUN4, udp, proto=17, ident=sent), now)
                if dg is not None:
                    self._out(dg)
                sent += 1
            self.pump()
            select.select([self.sock], [], [], 0.002)
        self.recording = False
        return {"sent": sent, "recorded": len(self.recorded), "seconds": round(time.monotonic() - start, 3)}

    def replay(self, c: dict) -> dict:
        dgs = list(self.recorded)
        order = c.get("order", "forward")
        if order == "reverse":
            dgs.reverse()
        elif order == "shuffle":
            random.Random(c.get("seed", 1)).shuffle(dgs)
        rate = float(c.get("rate", 10000))
        start = time.monotonic()
        i = 0
        while i < len(dgs) and time.monotonic() - start < MAX_WAIT:
            due = min(len(dgs), int((time.monotonic() - start) * rate) + 1)
            while i < due:
                self._send_raw(dgs[i])
                i += 1
            self.pump()
            select.select([self.sock], [], [], 0.002)
        return {"replayed": i, "seconds": round(time.monotonic() - start, 3)}

    def dump(self, c: dict) -> dict:
        what = {"recorded": self.recorded, "initiations": self.initiations, "corpus": self.corpus}[c["what"]]
        with open(c["path"], "w") as f:
            f.writelines(dg.hex() + "\n" for dg in what)
        return {"written": len(what)}

    def resend_initiation(self, c: dict) -> dict:
        before = Counter(self.received)
        self._send_raw(self.initiations[0])
        self.wait(lambda: False, c.get("wait", 1.0))
        return {"received": {str(k): v - before[k] for k, v in self.received.items() if v > before[k]}}

    def ping(self, c: dict) -> dict:
        before = self.echo_replies
        n = int(c.get("n", 3))
        for i in range(n):
            body = struct.pack("!BBHHH", 8, 0, 0, 0x7777, i) + b"attack-test-ping"
            body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
            self.conn.send_packet(ipv4_packet(self.address, SERVER_TUN4, body, proto=1), time.monotonic())
            self.flush()
        self.wait(lambda: self.echo_replies - before >= n, c.get("wait", 3))
        return {"replies": self.echo_replies - before}

    def status(self, c: dict) -> dict:
        conn = self.conn
        now = time.monotonic()
        kp = conn.current
        return {"state": conn.state,
                "handshake_age_s": None if conn.last_handshake is None else round(now - conn.last_handshake, 3),
                "last_handshake": conn.last_handshake,
                "local_index": kp.local_index if kp else None,
                "server_index": kp.remote_index if kp else None,
                "received": {str(k): v for k, v in self.received.items()},
                "drops": dict(conn.drops), "send_errors": self.send_errors,
                "initiations_sent": len(self.initiations)}


def main(path: str) -> int:
    driver = Driver(json.load(open(path)))
    stdin = sys.stdin.fileno()
    buf = b""
    deadline = time.monotonic() + 1800          # never outlives a test run
    while time.monotonic() < deadline:
        ready = select.select([stdin, driver.sock], [], [], 0.05)[0]
        driver.pump()
        if stdin not in ready:
            continue
        chunk = os.read(stdin, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            c = json.loads(line)
            if c["cmd"] == "quit":
                driver.sock.close()
                print(json.dumps({"ok": True}), flush=True)
                return 0
            try:
                answer = getattr(driver, c["cmd"])(c)
            except Exception as exc:     # report to the test, keep running
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
