"""Forged transport datagrams against a live session, from other addresses (issue 7 roaming tests).

    python tests/e2e/forger.py PLAN.json     (run as root inside the attacker's namespace)

PLAN: {"server": ip, "port": n, "index": live receiver index (int), "counter": a recent counter,
"genuine": [hex of captured client->server datagrams], "udp_from": ip, "spoof": [[ip, port], ...],
"seconds": s, "rate": datagrams per second}

Every datagram names the live session (its receiver index), so the server finds the keypair and
must reject it on the tag or the replay window. Kinds sent, in turn:

- data, control and super-packet headers with the live index, counters just ahead of, inside and far
  ahead of the live one, and random bytes as ciphertext (a bad tag);
- captured genuine datagrams with one bit flipped (a bad tag);
- captured genuine datagrams replayed byte for byte (a good tag, an old counter).

Half go from ordinary UDP sockets on the attacker's own address (several ports), half from a raw
socket with spoofed source addresses and ports (`spoof`), including the NAT's outside address with
ports the NAT never uses. Only stdlib; prints one JSON line of counts.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
import time

TRANSPORT = struct.Struct("<BBHIQ")
FRAGMENT = struct.Struct("<BBBBIQ")


def ip_udp(src: str, sport: int, dst: str, dport: int, payload: bytes, ident: int) -> bytes:
    """An IPv4 + UDP datagram (UDP checksum 0 = none, valid for IPv4; the kernel fills the IP checksum)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident, 0, 64, 17, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + udp


def forgeries(plan: dict, rng: random.Random):
    index, base = plan["index"], plan["counter"]
    genuine = [bytes.fromhex(h) for h in plan["genuine"]]
    offsets = (1, 2, 17, 500, 4000, 8191, 8192, 10_000, 1 << 20, 1 << 40)
    n = 0
    while True:
        n += 1
        which = n % 6
        counter = base + rng.choice(offsets) + n
        body = rng.randbytes(rng.choice((16, 32, 80, 600, 1400)))
        if which == 0:
            yield "data", TRANSPORT.pack(4, 0, 0, index, counter) + body
        elif which == 1:
            yield "control", TRANSPORT.pack(4, 1, 0, index, counter) + body
        elif which == 2:
            frags = rng.choice((1, 2))
            yield "super", FRAGMENT.pack(4, 2, rng.randrange(frags), frags, index, counter) + body
        elif which == 3 and genuine:
            g = bytearray(rng.choice(genuine))
            bit = rng.randrange(16 * 8, len(g) * 8)       # anywhere after the header: the tag fails
            g[bit // 8] ^= 1 << (bit % 8)
            yield "bitflip", bytes(g)
        elif which == 4 and genuine:
            g = bytearray(rng.choice(genuine))
            g[8:16] = struct.pack("<Q", counter)          # the header is the AD: the tag fails
            yield "recounted", bytes(g)
        elif genuine:
            yield "replay", rng.choice(genuine)


def main(path: str) -> int:
    plan = json.load(open(path))
    rng = random.Random(plan.get("seed", 7))
    dst = (plan["server"], plan["port"])
    udp = []
    for _ in range(4):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((plan["udp_from"], 0))
        udp.append(s)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)    # IP_HDRINCL implied
    spoof = [tuple(x) for x in plan["spoof"]]
    counts: dict[str, int] = {}
    sent = errors = 0
    gen = forgeries(plan, rng)
    start = time.monotonic()
    end = start + plan["seconds"]
    interval = 1.0 / plan["rate"]
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = start + sent * interval
        if due > now:
            time.sleep(min(due - now, end - now))
            continue
        kind, dg = next(gen)
        try:
            if sent % 2:
                src, sport = rng.choice(spoof)
                raw.sendto(ip_udp(src, sport + rng.randrange(16), dst[0], dst[1], dg, sent & 0xFFFF), (dst[0], 0))
            else:
                rng.choice(udp).sendto(dg, dst)
        except OSError:
            errors += 1
        counts[kind] = counts.get(kind, 0) + 1
        sent += 1
    print(json.dumps({"sent": sent, "errors": errors, "kinds": counts,
                      "seconds": round(time.monotonic() - start, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
