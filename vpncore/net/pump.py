"""The packet pump's I/O primitives: UDP GSO trains out, UDP GRO batches in (DESIGN §3, SPEC §5.5).

The hot loops in vpnd and vpnclient are built from these: await once per batch
(`trio.lowlevel.wait_readable`), then read until BlockingIOError or a cap; one
TUN read (a super-packet of up to 64 KiB with its virtio_net_hdr) becomes one
AEAD message whose fragments leave in one `sendmsg` with a UDP_SEGMENT cmsg.
"""

from __future__ import annotations

import errno
import os
import queue
import socket
import struct
import threading

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_BYTES = 65507
GSO_MAX_SEGMENTS = 64
RECV_BUFFER = 65535
_CMSG_SPACE = socket.CMSG_SPACE(4)

# What one wakeup of a loop (TUN -> UDP or UDP -> TUN) handles before it yields to the other
# direction: at most BATCH_READS reads and about BATCH_BYTES bytes. A packet waiting to go the other
# way (a ping reply, a TCP ACK) waits for the rest of the batch. Measured (bench/e2e.py --reps 2
# --seconds 5, ping p99 during a TCP upload): 256 reads of up to 64 KiB, 10.6-10.8 ms (wireguard-go
# 8.6-9.0); 16 reads, 8.1-8.6 ms; 8 reads, 7.2-7.9 ms, with TCP up 2,877-2,966 vs 2,994-3,037 Mbit/s.
# Bytes, not reads, so that small datagrams (a handshake flood) still come 256 to a wakeup.
# Overridable for experiments (VPN_BATCH_READS, VPN_BATCH_BYTES).
BATCH_READS = int(os.environ.get("VPN_BATCH_READS", 256))
BATCH_BYTES = int(os.environ.get("VPN_BATCH_BYTES", 8 << 16))
# Single datagrams held for a train (Udp.send_runs) leave once this many wait: a ping reply read among
# ACKs must not wait for the whole batch (which, with the TUN writer thread making ACKs meanwhile,
# can be 256 reads, ~2 ms). A train holds at most ~45 datagrams of a tunnel MTU anyway. Overridable
# (VPN_HOLD_DATAGRAMS; 1 sends each at once) for experiments.
HOLD_DATAGRAMS = int(os.environ.get("VPN_HOLD_DATAGRAMS", 32))
_SEG = struct.Struct("=H")
_GRO = struct.Struct("=i")


class Udp:
    """A non-blocking UDP socket with GSO/GRO where the kernel has them; counters, never exceptions."""

    __slots__ = ("sock", "gso", "gro", "errors", "last_errno")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.errors = 0
        self.last_errno = 0     # of the latest failed send (the client re-opens on ENETUNREACH etc.)
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            self.gro = True
        except OSError:
            self.gro = False
        self.gso = True    # tried on first use; an EIO/EINVAL turns it off

    def recv_batch(self, cap: int) -> list:
        """Up to `cap` reads: a list of (datagram, address); GRO trains are split back into datagrams."""
        out = []
        for data, addr, seg in self.recv_trains(cap):
            if seg:
                out.extend((data[i:i + seg], addr) for i in range(0, len(data), seg))
            else:
                out.append((data, addr))
        return out

    def recv_trains(self, cap: int, max_bytes: int = 1 << 62) -> list:
        """Up to `cap` reads, stopping once `max_bytes` arrived: a list of (data, address, seg). A GRO
        train comes whole with its segment size `seg` (datagrams of seg bytes, the last maybe
        shorter); a single datagram has seg 0."""
        out = []
        recvmsg = self.sock.recvmsg
        got = 0
        for _ in range(cap):
            if got >= max_bytes:
                break
            try:
                data, anc, _flags, addr = recvmsg(RECV_BUFFER, _CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError:   # e.g. ECONNREFUSED from an earlier ICMP error: count, go on
                self.errors += 1
                continue
            seg = 0
            if anc:
                for level, kind, value in anc:
                    if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                        seg = _GRO.unpack_from(value)[0]
                if seg >= len(data):
                    seg = 0
            out.append((data, addr, seg))
            got += len(data)
        return out

    def send(self, frames: list, addr=None) -> None:
        """Send datagrams; equal-size runs (super-packet fragments) go as GSO trains."""
        n = len(frames)
        if n == 1 or not self.gso:
            for f in frames:
                self._send_one(f, addr)
            return
        size = len(frames[0])
        if len(frames[-1]) > size and n > 3 and len(frames[-3]) == size:
            # a super-packet's parity fragment (2 bytes longer than a chunk) follows its train alone
            self.send(frames[:-1], addr)
            self._send_one(frames[-1], addr)
            return
        if len(frames[-2]) != size or len(frames[-1]) > size:   # not a fragment train (segmented packets)
            for f in frames:
                self._send_one(f, addr)
            return
        per = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)
        cmsg = [(SOL_UDP, UDP_SEGMENT, _SEG.pack(size))]
        for i in range(0, n, per):
            group = frames[i:i + per]
            if len(group) == 1:
                self._send_one(group[0], addr)
                continue
            try:
                if addr is None:
                    self.sock.sendmsg([b"".join(group)], cmsg)
                else:
                    self.sock.sendmsg([b"".join(group)], cmsg, 0, addr)
            except BlockingIOError:
                self.errors += 1
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    # segments larger than the route's MTU: one datagram each, which the kernel
                    # fragments (the tunnel sockets do not set DF)
                    for f in group:
                        self._send_one(f, addr)
                elif exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                    self.gso = False          # no UDP GSO here: per-datagram from now on
                    for f in group:
                        self._send_one(f, addr)
                else:
                    self.errors += 1
                    self.last_errno = exc.errno

    def send_runs(self, datagrams: list, addr=None) -> None:
        """Single datagrams gathered over one batch of TUN reads (small packets: ACKs, a UDP flow),
        in order: each run of equal sizes, the last of a run maybe shorter, goes as one GSO train
        (one sendmsg instead of one per datagram; the receiver takes the train with one recvmsg)."""
        i, n = 0, len(datagrams)
        while i < n:
            size = len(datagrams[i])
            limit = min(n, i + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
            j = i + 1
            while j < limit and len(datagrams[j]) == size:
                j += 1
            if j < limit and len(datagrams[j]) < size:      # a shorter one may end a train
                j += 1
            if j - i == 1:
                self._send_one(datagrams[i], addr)
            else:
                self.send(datagrams[i:j], addr)
            i = j

    def _send_one(self, frame: bytes, addr) -> None:
        try:
            if addr is None:
                self.sock.send(frame)
            else:
                self.sock.sendto(frame, addr)
        except OSError as exc:
            self.errors += 1
            self.last_errno = exc.errno or 0


class HeldSends:
    """The sends of one batch of TUN reads: single datagrams (ACKs, a UDP flow) are held per endpoint
    and leave as trains (Udp.send_runs) once HOLD_DATAGRAMS wait, before a super-packet's fragments
    to the same endpoint (order kept), or at flush() at the end of the batch."""

    __slots__ = ("_by_addr",)

    def __init__(self):
        self._by_addr: dict = {}     # endpoint -> (Udp, [datagram]); empty between batches

    def send(self, udp: Udp, frames: list, addr=None) -> None:
        if len(frames) == 1:
            entry = self._by_addr.get(addr)
            if entry is None:
                entry = self._by_addr[addr] = (udp, [])
            entry[1].append(frames[0])
            if len(entry[1]) >= HOLD_DATAGRAMS:
                udp.send_runs(self._by_addr.pop(addr)[1], addr)
        elif frames:
            entry = self._by_addr.pop(addr, None)
            if entry is not None:
                udp.send_runs(entry[1], addr)
            udp.send(frames, addr)

    def flush(self) -> None:
        by_addr = self._by_addr
        try:
            for addr, (udp, datagrams) in by_addr.items():
                udp.send_runs(datagrams, addr)
        finally:
            by_addr.clear()      # forget fast: no endpoint lingers between batches


class TunWriter:
    """Writes packets to a TUN fd, the big ones from a thread of its own; always in order.

    A TUN write of a 64 KiB super-packet runs the receiving TCP stack in the writer's context (~40 us
    a write). os.write releases the GIL, so with a second thread that kernel work overlaps the pump's
    next receive and decryption (which releases it too) on the other core. Measured in bench/e2e.py's
    topology, 4 x 8 s single TCP stream each, alternating: upload 3,069-3,341 Mbit/s with inline
    writes, 3,301-3,516 with the thread; download 3,340-3,533 and 3,252-3,604 (no gain that way).
    VPN_TUN_INLINE=1 in the environment turns the thread off, for such comparisons. Small packets
    (ACKs, a ping) are written inline while the thread is idle: a hand-over costs a thread wake-up,
    more than their write; while it is busy they queue behind it, so the order on the TUN is the
    order of write() calls.

    At most `cap` packets wait: a packet queued behind them waits ~40 us for each (a ping behind 64
    super-packets took p99 under a TCP upload from ~7 to 11.5 ms). With `cap` waiting, write() blocks
    until the thread has room, as an inline write would take that long; it drops and counts a packet
    only if the thread made no progress for STALL seconds (a TUN write never blocks that long)."""

    THREAD_ABOVE = 8192     # bytes: bigger packets go to the thread
    STALL = 0.5             # seconds without progress before write() gives up on a packet

    def __init__(self, fd: int, cap: int = 8):
        self.fd = fd
        self.cap = cap
        self.errors = 0          # failed writes (the thread's and the inline ones)
        self.dropped = 0         # packets refused with `cap` waiting
        self.threaded = True     # False: every packet inline while the thread is idle (the owner's choice)
        self._queued = 0         # handed to the thread (main thread only)
        self._done = 0           # written by the thread (the thread only)
        self._room = threading.Lock()     # released by the thread when write() waits for room
        self._room.acquire()
        self._waiting_room = False
        self._q = queue.SimpleQueue()
        self._put = self._q.put
        self._thread = threading.Thread(target=self._run, name="tun-writer", daemon=True)
        self._thread.start()

    def write(self, packet) -> None:
        waiting = self._queued - self._done
        if not waiting and (len(packet) <= self.THREAD_ABOVE or not self.threaded):
            try:
                os.write(self.fd, packet)
            except OSError:
                self.errors += 1
            return
        if waiting >= self.cap and not self._wait_for_room():
            self.dropped += 1
            return
        self._queued += 1
        self._put(packet)

    def _wait_for_room(self) -> bool:
        """Block (GIL released) until fewer than `cap` wait; False if the thread stalled."""
        done = self._done
        while self._queued - self._done >= self.cap:
            self._waiting_room = True
            if self._queued - self._done < self.cap:   # it finished one meanwhile
                break
            if not self._room.acquire(timeout=self.STALL) and self._done == done:
                self._waiting_room = False
                return False
            done = self._done
        self._waiting_room = False
        return True

    def _run(self) -> None:
        get, write, fd = self._q.get, os.write, self.fd
        done = 0
        while True:
            packet = get()
            if packet is None:
                return
            try:
                write(fd, packet)
            except OSError:
                self.errors += 1
            done += 1
            self._done = done
            if self._waiting_room:
                try:
                    self._room.release()
                except RuntimeError:     # already released
                    pass

    def close(self) -> None:
        """Stop the thread after the packets already handed over (call before closing the fd)."""
        self._put(None)
        self._thread.join(timeout=2)
