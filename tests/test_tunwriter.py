"""TunWriter (vpncore/net/tunwriter.py): TUN writes from a thread, in the order they were handed over, with
a bounded queue (write() waits for room; it drops only when the thread stalls). A blocking AF_UNIX datagram socketpair stands in for the TUN fd (a unit test: the e2e
tests and bench/e2e.py run it on real TUN devices)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from vpncore.net.tunwriter import TunWriter

BIG = TunWriter.THREAD_ABOVE + 1


@contextlib.contextmanager
def _writer(sndbuf: int = 1 << 20, **kw):
    """(writer, its fd's socket, the reading end), closed afterwards. A small `sndbuf` makes writes
    block while the reader does not read."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    w = TunWriter(a.fileno(), **kw)
    try:
        yield w, a, b
    finally:
        w.close()
        a.close()
        b.close()


def _read_all(b, n):
    b.settimeout(5)
    return [b.recv(1 << 17) for _ in range(n)]


def _reader(b, n):
    """Read n datagrams in a thread while the test writes (the socket buffer is smaller than all)."""
    got = []
    t = threading.Thread(target=lambda: got.extend(_read_all(b, n)), daemon=True)
    t.start()
    return t, got


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_big_and_small_packets_arrive_in_the_order_written():
    with _writer() as (w, a, b):
        packets = []
        for i in range(200):
            size = BIG + i if i % 3 else 40 + i          # small ones between big ones
            packets.append(bytes([i % 256]) * size)
        t, got = _reader(b, len(packets))
        for p in packets:
            while w._queued - w._done >= w.cap:     # a TUN never blocks; this socket can
                time.sleep(0.001)
            w.write(p)
        t.join(10)
        assert got == packets
        assert w.errors == 0 and w.dropped == 0


def test_memoryviews_are_written_as_their_bytes():
    with _writer() as (w, a, b):
        plain = bytes(range(256)) * 64
        w.write(memoryview(plain)[:BIG])
        w.write(memoryview(plain)[:100])
        assert _read_all(b, 2) == [plain[:BIG], plain[:100]]


def test_a_full_queue_makes_write_wait_for_room_not_drop():
    got = []

    def slow_reader(b):
        b.settimeout(5)
        for _ in range(40):
            time.sleep(0.002)
            got.append(b.recv(1 << 17))

    with _writer(32768, cap=2) as (w, a, b):     # a few packets in flight at most
        t = threading.Thread(target=slow_reader, args=(b,), daemon=True)
        t.start()
        packets = [bytes([i]) * BIG for i in range(40)]
        for p in packets:
            w.write(p)
            assert w._queued - w._done <= w.cap
        t.join(10)
        assert got == packets and w.dropped == 0 and w.errors == 0


def test_a_stuck_fd_fills_the_queue_to_its_cap_then_drops_and_counts():
    with _writer(32768, cap=8) as (w, a, b):     # the reader does not read: writes block
        sent = 0
        while w.dropped == 0:
            w.write(b"x" * BIG)
            sent += 1
            assert sent < 10_000
        # the cap bounds what waits: the thread holds one in a blocked write, `cap` wait in the queue
        assert w._queued - w._done <= w.cap
        assert w.dropped == 1 and w.errors == 0
        b.settimeout(5)
        got = 0
        while got < sent - 1:            # every packet but the dropped one comes out
            assert len(b.recv(1 << 17)) == BIG
            got += 1
        _wait(lambda: w._done == w._queued)
        w.write(b"small")               # the thread is idle again: written inline
        assert b.recv(100) == b"small"


def test_a_failed_write_is_counted_not_raised():
    with _writer() as (w, a, b):
        b.close()                        # the peer is gone: writes fail with ECONNREFUSED
        w.write(b"y" * 10)               # inline
        w.write(b"z" * BIG)              # from the thread
        _wait(lambda: w.errors == 2)


def test_not_threaded_writes_big_packets_inline_while_the_thread_is_idle():
    with _writer() as (w, a, b):
        w.threaded = False                  # vpnd under a handshake flood
        w.write(b"q" * BIG)
        assert w._queued == 0               # not handed over
        assert _read_all(b, 1) == [b"q" * BIG]
        w.threaded = True
        w.write(b"r" * BIG)
        assert w._queued == 1
        assert _read_all(b, 1) == [b"r" * BIG]
