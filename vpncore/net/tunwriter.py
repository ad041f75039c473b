"""TUN writes in packet order, the big ones from a thread of their own (DESIGN §3)."""

from __future__ import annotations

import os
import queue
import threading


class TunWriter:
    """Writes packets to a TUN fd, the big ones from a thread of its own; always in order.

    A TUN write of a 64 KiB super-packet runs the receiving TCP stack in the writer's context (~40 us
    a write). os.write releases the GIL, so with a second thread that kernel work overlaps the pump's
    next receive and decryption (which releases it too) on the other core. Measured in bench/e2e.py's
    topology, 4 x 8 s single TCP stream each, alternating: upload 3,069-3,341 Mbit/s with inline
    writes, 3,301-3,516 with the thread; download 3,340-3,533 and 3,252-3,604 (no gain that way).
    PumpLimits(tun_thread=False) turns the thread off, for such comparisons. Small packets
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
