"""Attack traffic for the reliability tests (issue 7): raw-socket senders that run inside a namespace.

    python -m tests.e2e.attack_tools SPEC.json        # prints one JSON line: what was sent

SPEC is a JSON object:

    {"mode": "hsflood" | "junk" | "fuzz" | "send" | "sniff" | "blast",
     "dst": ["198.18.1.1", 51820],
     "src_net": "198.18.128.0/17",   # spoofed IPv4 sources (hsflood, junk, fuzz); or
     "src": ["198.18.0.2", 40000],   # one fixed source (send, and optionally the others)
     "rate": 20000, "seconds": 5,    # pacing (packets per second) and a hard time bound
     "count": 100000,                # stop after this many datagrams (whichever comes first)
     "server_public": hex,           # hsflood: initiations carry a valid mac1 for this server
     "file": path,                   # send: datagrams as hex lines; sniff: where to write them
     "files": [path, ...],           # fuzz: the seed corpus (real datagrams, hex lines)
     "indices": [int, ...],          # fuzz: live receiver indices for "valid header + garbage"
     "seed": 1, "pool": 4096}        # precomputed distinct packets, cycled

"blast" sends `size`-byte UDP datagrams from `src` (plain load, e.g. through a tunnel: the raw
socket follows the namespace's routes). "sniff" sends nothing: it reads (AF_PACKET, run it in the server namespace) what `from_host`
sends to UDP port `dport` on `ifname` and reports the receiver indices in use.

Every datagram is a complete IPv4+UDP packet built here (IP_HDRINCL: any source address and
port) and handed to the kernel in batches with one `sendmmsg` call (ctypes; Python has no
binding), so one process reaches well over 20,000 packets per second. Packets go only to `dst`,
which the tests always set to an address inside the namespaces they created.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import json
import random
import signal
import socket
import struct
import sys
import time

from vpncore.proto.constants import (
    INITIATION_LEN, KIND_CONTROL, KIND_DATA, KIND_SUPER, MAC_LEN, MSG_COOKIE_REPLY, MSG_INITIATION,
    MSG_RESPONSE, MSG_TRANSPORT, RESPONSE_LEN, COOKIE_REPLY_LEN,
)
from vpncore.proto.cookie import CookieGenerator, mac, mac1_key
from vpncore.proto.handshake import create_initiation

BATCH = 64
STOP = []          # set by SIGTERM: finish the current batch, print what was sent, exit 0
MAX_PAYLOAD = 1500 - 28
MAX_SECONDS = 600

# --- sendmmsg through ctypes ----------------------------------------------------------------


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int


def ipv4_udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """A complete IPv4+UDP packet. The kernel fills in the IP checksum and ID (IP_HDRINCL);
    a UDP checksum of zero means 'none' over IPv4."""
    total = 28 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


class RawSender:
    """A raw IPv4 socket (IPPROTO_RAW, header included) with a precomputed ring of packets."""

    def __init__(self, dst: str, packets: list[bytes]):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        n = len(packets)
        self._bufs = [ctypes.create_string_buffer(p, len(p)) for p in packets]
        self._iov = (_Iovec * n)()
        self._addr = ctypes.create_string_buffer(
            struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0) + socket.inet_aton(dst) + bytes(8), 16)
        # the ring twice over, so any window of up to n packets is contiguous
        self._msgs = (_Mmsghdr * (2 * n))()
        for i in range(2 * n):
            j = i % n
            self._iov[j].iov_base = ctypes.cast(self._bufs[j], ctypes.c_void_p)
            self._iov[j].iov_len = len(packets[j])
            h = self._msgs[i].msg_hdr
            h.msg_name = ctypes.cast(self._addr, ctypes.c_void_p)
            h.msg_namelen = 16
            h.msg_iov = ctypes.pointer(self._iov[j])
            h.msg_iovlen = 1
        self.n = n
        self.pos = 0
        self.errors = 0

    def send(self, count: int) -> int:
        """Send the next `count` packets of the ring (fewer if the kernel takes fewer)."""
        count = min(count, self.n)
        at = ctypes.addressof(self._msgs) + self.pos * ctypes.sizeof(_Mmsghdr)
        sent = _libc.sendmmsg(self.sock.fileno(), at, count, 0)
        if sent < 0:                 # this packet was refused (e.g. EMSGSIZE): skip it, count it
            self.errors += 1
            self.pos = (self.pos + 1) % self.n
            return 0
        self.pos = (self.pos + sent) % self.n
        return sent

    def close(self) -> None:
        self.sock.close()


def run_paced(sender: RawSender, rate: float, seconds: float, count: int) -> dict:
    """Send at `rate` packets/s (0: as fast as possible) until `count` or `seconds`; bounded."""
    seconds = min(seconds, MAX_SECONDS)
    start = time.monotonic()
    deadline = start + seconds
    sent = calls = 0
    batch = BATCH if not rate else max(1, min(BATCH, int(rate / 500) or 1))
    while sent < count and not STOP:
        now = time.monotonic()
        if now >= deadline:
            break
        if rate:
            due = int((now - start) * rate) - sent
            if due <= 0:
                time.sleep(min(batch / rate, deadline - now, 0.01))
                continue
            n = min(due, batch, count - sent)
        else:
            n = min(batch, count - sent)
        sent += sender.send(n)
        calls += 1
    elapsed = time.monotonic() - start
    return {"sent": sent, "seconds": round(elapsed, 3), "rate": round(sent / elapsed) if elapsed else 0,
            "calls": calls, "errors": sender.errors}


# --- what is sent -------------------------------------------------------------------------------

def spoofed_sources(net: str, n: int, rng: random.Random) -> list[tuple[str, int]]:
    """n (address, port) pairs spread over the network `net` (its hosts only)."""
    net4 = ipaddress.ip_network(net)
    first, size = int(net4.network_address) + 1, net4.num_addresses - 2
    return [(str(ipaddress.IPv4Address(first + rng.randrange(size))), rng.randrange(1024, 65535))
            for _ in range(n)]


def valid_mac1_initiations(server_public: bytes, n: int, rng: random.Random) -> list[bytes]:
    """n real Noise initiations (fresh unknown static keys, so they can never make a session)
    with a valid mac1 for `server_public`: each costs the server its DH work unless the cookie
    mechanism stops it first."""
    out = []
    macs = CookieGenerator(server_public)
    for i in range(n):
        static = rng.randbytes(32)
        msg, pending = create_initiation(static_private=static, remote_static=server_public, psk=None,
                                         ephemeral=rng.randbytes(32), index=rng.getrandbits(32),
                                         wall_time=1.7e9 + i, now=0.0, macs=macs)
        pending.noise.wipe()
        out.append(msg)
    return out


def bad_mac1_initiations(n: int, rng: random.Random) -> list[bytes]:
    """Well-formed initiations (type, length, reserved bytes) whose mac1 is random."""
    return [bytes([MSG_INITIATION, 0, 0, 0]) + rng.randbytes(INITIATION_LEN - 4) for _ in range(n)]


def with_mac1(server_public: bytes, body: bytes) -> bytes:
    """`body` (everything before the macs) + a valid mac1 + a zero mac2: any length."""
    return body + mac(mac1_key(server_public), body) + bytes(MAC_LEN)


def mutate(rng: random.Random, corpus: list[bytes], indices: list[int]) -> bytes:
    """One hostile datagram: random bytes, bit flips or truncations of real datagrams, valid
    headers (with live receiver indices) followed by garbage."""
    r = rng.random()
    if r < 0.12 or not corpus:
        return rng.randbytes(rng.choice((0, 1, 2, 3, 4, 15, 16, 17, 31, 32, 33, 64, 92, 148, 200, 1400,
                                         rng.randrange(0, 1500))))
    base = rng.choice(corpus)
    if r < 0.40:       # bit flips
        b = bytearray(base)
        if b:
            for _ in range(rng.choice((1, 1, 2, 3, 8))):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if r < 0.52:       # truncation or extension
        if rng.random() < 0.7:
            return base[:rng.randrange(len(base) + 1)]
        return base + rng.randbytes(rng.randrange(1, 64))
    if r < 0.60:       # the real header, a garbage body
        return base[:16] + rng.randbytes(max(0, len(base) - 16))
    index = rng.choice(indices) if indices and rng.random() < 0.8 else rng.getrandbits(32)
    counter = rng.choice((0, 1, rng.getrandbits(8), rng.getrandbits(20), rng.getrandbits(64), 2**64 - 1))
    if r < 0.78:       # transport data / control, live index, garbage ciphertext
        kind = rng.choice((KIND_DATA, KIND_DATA, KIND_CONTROL, 3, 255))
        return struct.pack("<BBHIQ", MSG_TRANSPORT, kind, 0, index, counter) + rng.randbytes(
            rng.choice((0, 15, 16, 17, 32, 100, 1100, 1436)))
    if r < 0.92:       # super-packet fragments: live index, any fragment numbers and sizes
        n = rng.choice((0, 1, 2, 3, 47, 64, 65, 255))
        no = rng.randrange(max(1, n)) if rng.random() < 0.9 else rng.randrange(256)
        return struct.pack("<BBBBIQ", MSG_TRANSPORT, KIND_SUPER, no, n, index, counter) + rng.randbytes(
            rng.choice((0, 1, 16, 500, 1436)))
    t = rng.choice((MSG_INITIATION, MSG_RESPONSE, MSG_COOKIE_REPLY))
    length = {MSG_INITIATION: INITIATION_LEN, MSG_RESPONSE: RESPONSE_LEN, MSG_COOKIE_REPLY: COOKIE_REPLY_LEN}[t]
    if rng.random() < 0.3:
        length += rng.choice((-1, 1, -16))
    return bytes([t, 0, 0, 0]) + struct.pack("<I", index) + rng.randbytes(length - 8)


def read_hex_lines(path: str) -> list[bytes]:
    with open(path) as f:
        return [bytes.fromhex(line.strip()) for line in f if line.strip()]


def build(spec: dict) -> list[bytes]:
    """The ring of complete IP packets for `spec`."""
    rng = random.Random(spec.get("seed", 1))
    dst, dport = spec["dst"]
    mode = spec["mode"]
    pool = int(spec.get("pool", 4096))
    if mode == "send":
        payloads = read_hex_lines(spec["file"])
    elif mode == "hsflood":
        distinct = valid_mac1_initiations(bytes.fromhex(spec["server_public"]), min(pool, 512), rng)
        payloads = [distinct[i % len(distinct)] for i in range(pool)]
    elif mode == "junk":
        payloads = bad_mac1_initiations(pool, rng)
    elif mode == "blast":       # plain load: UDP datagrams of `size` zero bytes (e.g. into a tunnel)
        payloads = [bytes(int(spec.get("size", 1300)))] * min(pool, 256)
    elif mode == "fuzz":
        corpus = [dg for name in spec.get("files", []) for dg in read_hex_lines(name)]
        if spec.get("server_public"):   # a few garbage initiations that do pass mac1
            pk = bytes.fromhex(spec["server_public"])
            corpus += [with_mac1(pk, bytes([MSG_INITIATION, 0, 0, 0]) + rng.randbytes(INITIATION_LEN - 36))
                       for _ in range(4)]
        indices = [int(i) for i in spec.get("indices", [])]
        payloads = [mutate(rng, corpus, indices) for _ in range(pool)]
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if "src" in spec:
        srcs = [tuple(spec["src"])] * len(payloads)
    else:
        srcs = spoofed_sources(spec["src_net"], len(payloads), rng)
    # at most what fits the underlay's 1,500-byte MTU in one unfragmented datagram
    return [ipv4_udp(s, sp, dst, dport, p[:MAX_PAYLOAD]) for (s, sp), p in zip(srcs, payloads)]


def sniff(spec: dict) -> dict:
    """Capture (AF_PACKET, in the server namespace) UDP datagrams to port `dport` from `from_host`
    on interface `ifname`: their receiver indices and first bytes (a corpus of real datagrams)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((spec["ifname"], 0))
    s.settimeout(0.2)
    want_src = socket.inet_aton(spec["from_host"])
    deadline = time.monotonic() + min(float(spec.get("seconds", 10)), 60)
    indices, corpus = set(), []
    try:
        while len(corpus) < int(spec.get("count", 50)) and time.monotonic() < deadline:
            try:
                frame = s.recv(65600)
            except socket.timeout:
                continue
            if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17 or frame[26:30] != want_src:
                continue
            ihl = (frame[14] & 15) * 4
            udp = frame[14 + ihl:]
            if len(udp) < 8 or struct.unpack_from("!H", udp, 2)[0] != int(spec["dport"]):
                continue
            dg = udp[8:8 + 1452]     # a GSO train arrives whole: keep its first datagram's worth
            if len(dg) > 16 and dg[0] == MSG_TRANSPORT:
                indices.add(struct.unpack_from("<I", dg, 4)[0])
                corpus.append(dg)
    finally:
        s.close()
    if spec.get("file"):
        with open(spec["file"], "w") as f:
            f.writelines(dg.hex() + "\n" for dg in corpus)
    return {"mode": "sniff", "indices": sorted(indices), "captured": len(corpus)}


def main(path: str) -> int:
    spec = json.load(open(path))
    signal.signal(signal.SIGTERM, lambda *_: STOP.append(1))
    if spec["mode"] == "sniff":
        print(json.dumps(sniff(spec)), flush=True)
        return 0
    rate, seconds = float(spec.get("rate", 0)), min(float(spec.get("seconds", 10)), MAX_SECONDS)
    count = int(spec.get("count", 0)) or 10**12
    total = {"sent": 0, "seconds": 0.0, "calls": 0, "errors": 0, "bytes": 0, "distinct": 0, "prepare_s": 0.0}
    seed = spec.get("seed", 1)
    start = time.monotonic()
    while total["sent"] < count and not STOP:
        # fuzz: every ring is new (distinct datagrams throughout); the others cycle one ring
        t0 = time.monotonic()
        packets = build({**spec, "seed": f"{seed}:{total['distinct']}"})
        total["prepare_s"] += time.monotonic() - t0
        left = seconds - (time.monotonic() - start)
        if left <= 0:
            break
        sender = RawSender(spec["dst"][0], packets)
        want = count - total["sent"]
        if spec["mode"] in ("fuzz", "send"):
            want = min(want, len(packets))
        try:
            r = run_paced(sender, rate, left, want)
        finally:
            sender.close()
        for k in ("sent", "seconds", "calls", "errors"):
            total[k] += r[k]
        total["bytes"] += sum(len(p) - 28 for p in packets[:r["sent"]]) if r["sent"] <= len(packets) else \
            sum(len(p) - 28 for p in packets) * r["sent"] // len(packets)
        total["distinct"] += min(r["sent"], len(packets))
        if spec["mode"] != "fuzz" or r["sent"] < want:
            break
    total.update(mode=spec["mode"], seconds=round(total["seconds"], 3), prepare_s=round(total["prepare_s"], 2),
                 rate=round(total["sent"] / total["seconds"]) if total["seconds"] else 0,
                 wall_s=round(time.monotonic() - start, 2))
    print(json.dumps(total), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
