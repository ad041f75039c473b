"""A tiny authoritative DNS server for the tests: UDP and TCP, one zone, standard library only.

    python dnsserver.py HOST PORT READY_FILE NAME=IPV4 [NAME=IPV4 ...]

Answers A queries for the given names (TTL 5), NOERROR with no records for other types of those
names, NXDOMAIN for everything else. Touches READY_FILE once both sockets listen. On SIGTERM it
prints one JSON line: {"udp": n, "tcp": n} (queries answered), so a test can see whether its
queries arrived here.
"""

import ipaddress
import json
import select
import signal
import socket
import struct
import sys


def parse_name(msg: bytes, pos: int):
    labels = []
    while msg[pos]:
        n = msg[pos]
        labels.append(msg[pos + 1:pos + 1 + n].decode("ascii", "replace").lower())
        pos += 1 + n
    return ".".join(labels), pos + 1


def answer(query: bytes, records: dict) -> bytes | None:
    if len(query) < 12 or query[2] & 0x80 or query[4:6] != b"\x00\x01":
        return None
    name, end = parse_name(query, 12)
    qtype = struct.unpack_from("!H", query, end)[0]
    question = query[12:end + 4]
    rd = query[2] & 0x01
    if name not in records:
        return query[:2] + bytes((0x84 | rd, 0x03)) + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
    rrs = b""
    count = 0
    if qtype == 1:
        rrs = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + ipaddress.IPv4Address(records[name]).packed
        count = 1
    return query[:2] + bytes((0x84 | rd, 0x00)) + struct.pack("!HHHH", 1, count, 0, 0) + question + rrs


def main() -> None:
    host, port, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    records = dict(arg.lower().split("=", 1) for arg in sys.argv[4:])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((host, port))
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, port))
    tcp.listen(8)
    counts = {"udp": 0, "tcp": 0}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    open(ready, "w").close()
    while not stop:
        try:
            readable = select.select([udp, tcp], [], [], 0.2)[0]
        except InterruptedError:
            continue
        for s in readable:
            if s is udp:
                q, src = udp.recvfrom(4096)
                a = answer(q, records)
                if a:
                    counts["udp"] += 1
                    udp.sendto(a, src)
            else:
                conn, _ = tcp.accept()
                conn.settimeout(5)
                try:
                    n = struct.unpack("!H", conn.recv(2, socket.MSG_WAITALL))[0]
                    q = conn.recv(n, socket.MSG_WAITALL)
                    a = answer(q, records)
                    if a:
                        counts["tcp"] += 1
                        conn.sendall(struct.pack("!H", len(a)) + a)
                except (OSError, struct.error):
                    pass
                finally:
                    conn.close()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
