"""Forget in memory too: overwrite what Python freed that may hold a client's address (DESIGN §4).

Dropping a reference does not erase anything: CPython's small-object allocator (pymalloc) keeps a
freed block's bytes until the block is handed out again, and glibc's malloc does the same. Measured
with tests/e2e/memscan.py on a vpnd after 18 sessions with 72 DNS queries had ended (the sessions
gone from every live object, `gc-scan` clean), a read of /proc/PID/mem still found:

- 9 to 23 copies of client underlay addresses as text: the `str` of the (host, port) tuple that
  `socket.recvmsg` makes for every datagram received (pump.Udp.recv_trains), freed into pymalloc
  pools of the 64-byte (IPv4) and 80/96-byte (IPv6) size classes; no packed form (the sockaddr
  that CPython fills lives on the C stack and is overwritten by later calls);
- about 140 copies of queried DNS names: the `bytes` of each query and answer from `recvfrom`/`recv`
  (malloc'd at 4 KiB and 64 KiB, then shrunk in place: glibc heap), the question and the re-IDed
  query sliced from them (pymalloc).

Measures, and what each covers:

1. DNS (vpnd/dns.py): names never become Python objects. Queries are received straight into
   preallocated slots and answers into one buffer (`recvfrom_into`/`recv_into`), sent from there,
   and zeroed when the query ends; TCP goes through two small buffers per connection, zeroed
   chunk by chunk. Cost: 1.1 MiB allocated once (256 slots of 4 KiB, the answer buffer); no
   per-query allocation of name bytes. Covers every name that reaches vpnd's own code; not the
   kernel's socket buffers (not process memory) or the upstream resolver (the operator's).

2. `scrub()` here (pymalloc, every size class from 48 to 512 bytes): a read-only walk of the
   ring of partly used pools of each class (from the pool of a probe object; every header is
   checked before it is followed) counts their free blocks; then that many zero-filled `bytes`
   of the class, plus 8 pools' worth (to take emptied pools that arenas cache), are allocated and
   freed. The allocator hands out the ring's free blocks before any new pool, so each free block,
   including those that held address strings or small decrypted packets, is overwritten with
   zeros; what stays in it is a `bytes` header and a free-list pointer. Only the allocator's own
   API writes memory: nothing is written by address.
3. `scrub_malloc()` (glibc's main arena, objects over 512 bytes, e.g. TUN reads of a DNS answer):
   8 chunks of each tcache size, then as many 64-byte chunks as `mallinfo2()` says are free, each
   zeroed and given back; then `malloc_trim(0)`, which returns every whole free page to the kernel
   (it reads as zeros afterwards).

vpnd runs both (`forget_freed`) from its timer loop at most once a second, and only after a
session ended. Cost, measured: 10-15 ms in a small vpnd (about 22,000 blocks, 5,000-8,000 chunks);
about 150 ms in a process with 300,000 objects of which 100,000 were freed (80 ms pymalloc,
up to 75 ms malloc, capped at 65,536 chunks). That time blocks vpnd's event loop (a latency spike
for every client, at most once a second while sessions end); nothing is added per packet.

What remains (best effort, honestly):

- pools that became completely empty are cached by their arena until reused: the 8-pool margin
  takes some of them, not necessarily all (more than 8 emptied pools of one class stay as they
  were); a block that is live (a str still referenced by something) is not freed, so not touched;
- glibc: free chunks under 80 bytes outside the tcache, other threads' tcaches (the TUN writer
  thread, trio's worker threads) and other arenas; more free bytes than the cap;
- the data path itself: while a session lives, its packets (plaintext, DNS included) pass through
  per-packet `bytes`; they are overwritten by this scrub only after a session ends;
- live references: the endpoint of a live session is needed to reach the client; it is dropped at
  session end (proto.server) and overwritten at the next scrub once freed. A str still referenced
  by something we do not know about is not freed, so not scrubbed;
- the kernel: socket buffers, conntrack (see vpnd/egress.py), and swap (mlockall prevents it
  where permitted).
"""

from __future__ import annotations

import ctypes
import gc
import sys

# the size classes of compact ASCII str objects of 7 to 45 characters (IPv4 and IPv6 text, with a
# port or scope) and of the tuples that hold them: 16-byte alignment (64-bit CPython >= 3.8)
CLASSES = tuple(range(48, 513, 16))   # every class a bytes object reaches (33 + n bytes)
_HEADER = 48                 # sizeof(struct pool_header) on 64-bit
_BYTES_OVERHEAD = sys.getsizeof(b"")                     # 33: a bytes of length n takes 33 + n


class _Pool(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint), ("_pad", ctypes.c_uint), ("freeblock", ctypes.c_void_p),
                ("nextpool", ctypes.c_void_p), ("prevpool", ctypes.c_void_p), ("arenaindex", ctypes.c_uint),
                ("szidx", ctypes.c_uint), ("nextoffset", ctypes.c_uint), ("maxnextoffset", ctypes.c_uint)]


def _probe_pool_size(size: int, probe: bytes) -> int | None:
    """pymalloc's pool size (16 KiB since 3.10, 4 KiB before), from a probe block's pool header."""
    for pool_size in (1 << 14, 1 << 12):
        base = id(probe) & ~(pool_size - 1)
        h = _Pool.from_address(base)
        if h.szidx == size // 16 - 1 and h.maxnextoffset == pool_size - size and \
                _HEADER <= h.nextoffset <= pool_size and (id(probe) - base - _HEADER) % size == 0:
            return pool_size
    return None


def _free_blocks(size: int, pool_size: int | None, probes: list) -> tuple[int | None, int | None]:
    """(pool size, free blocks in the ring of partly used pools of class `size`), read only.

    Probes (bytes filling a whole block of the class) are made until the latest comes from a pool
    that still has room: the allocator serves from the ring's head pool, and a pool that just
    became full has left the ring."""
    for _ in range(1024):
        probes.append(bytes(size - _BYTES_OVERHEAD))
        if pool_size is None:
            pool_size = _probe_pool_size(size, probes[-1])
            if pool_size is None:
                return None, None
        base = id(probes[-1]) & ~(pool_size - 1)
        h = _Pool.from_address(base)
        if h.freeblock or h.nextoffset <= h.maxnextoffset:
            break
    else:
        return pool_size, None
    szidx, capacity = size // 16 - 1, (pool_size - _HEADER) // size
    free = 0
    pool = base
    for _ in range(1 << 20):               # bounded: a ring longer than this is not a ring
        if pool % pool_size == 0:          # the ring's head (in the usedpools array) is not aligned
            h = _Pool.from_address(pool)
            if h.szidx != szidx or h.maxnextoffset != pool_size - size or h.count > capacity:
                return pool_size, None
            free += capacity - h.count
        pool = _Pool.from_address(pool).nextpool
        if not pool or pool == base:
            return pool_size, free
    return pool_size, None


_pool_size: int | None = None


MARGIN_POOLS = 8            # whole pools per class beyond the ring's free blocks (emptied pools)
FALLBACK_BLOCKS = 1 << 15   # blocks per class when the ring cannot be read


def scrub(classes: tuple[int, ...] = CLASSES) -> dict:
    """Overwrite the free blocks of pymalloc's `classes` (see the module docstring). Returns counts,
    no addresses: {"ok": ring read for every class, "blocks": blocks overwritten}."""
    global _pool_size
    stats = {"ok": True, "blocks": 0}
    was = gc.isenabled()
    gc.disable()                        # no collection (nor finalizer) runs in between
    try:
        for size in classes:
            probes: list = []
            _pool_size, free = _free_blocks(size, _pool_size, probes)
            if free is None:
                stats["ok"] = False
                free = FALLBACK_BLOCKS
            else:
                free += MARGIN_POOLS * ((_pool_size - _HEADER) // size)
            # bytes(n) comes zero-filled (calloc): taking `free` blocks takes every free block of
            # the ring's pools, then `MARGIN_POOLS` more pools from the arenas (emptied ones first)
            n = size - _BYTES_OVERHEAD
            flood = [bytes(n) for _ in range(free)]
            stats["blocks"] += len(flood) + len(probes)
            del flood, probes
    finally:
        if was:
            gc.enable()
    return stats


# --- glibc malloc's main arena (objects over 512 bytes: TUN reads, big datagrams) ------------------

class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


MALLOC_CHUNK = 64            # bytes asked per chunk of the flood (an 80-byte chunk)
MALLOC_MAX_CHUNKS = 1 << 16  # at most 4 MiB per scrub
# first, every size that this thread's tcache keeps (up to 1,032 bytes, 7 chunks each): malloc
# serves those from the tcache before any bin, so the flood above would never reach them
TCACHE_SIZES = range(8, 1033, 16)
TCACHE_COUNT = 8


def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _Mallinfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = (ctypes.c_size_t,)
        libc.free.argtypes = (ctypes.c_void_p,)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):       # not glibc >= 2.33
        return None


_LIBC = _libc()


def scrub_malloc() -> dict:
    """Overwrite the free memory of glibc's main arena: this thread's tcache (8 chunks of each of its
    sizes), then as many zero-filled 64-byte chunks as the arena has free bytes
    (`mallinfo2().fordblks`), taken (best fit: holes first, then split from larger free chunks);
    then, still holding those, the smaller sizes (48, 32 and 16-byte requests) down to what is left,
    which takes the remainders that splitting left (a freed 600-byte packet cut into 80-byte chunks
    leaves a 48-byte tail with its old bytes); all given back, then `malloc_trim(0)`. Other
    threads' tcaches and other arenas are not reached. Returns {"ok", "chunks"}."""
    if _LIBC is None:
        return {"ok": False, "chunks": 0}
    held: list[int] = []
    ok = True
    try:
        ok &= _take(held, [size for size in TCACHE_SIZES for _ in range(TCACHE_COUNT)])
        for request in (MALLOC_CHUNK, 56, 40, 24):
            free = _LIBC.mallinfo2().fordblks
            n = free // (request + 8) + 64
            ok &= n <= MALLOC_MAX_CHUNKS and _take(held, [request] * min(n, MALLOC_MAX_CHUNKS))
    finally:
        for p in held:
            _LIBC.free(p)
    # and every whole free page of the arena goes back to the kernel (madvise DONTNEED: it reads as
    # zeros from now on), which also takes what merged into the top of the heap
    _LIBC.malloc_trim(0)
    return {"ok": bool(ok), "chunks": len(held)}


def _take(held: list, sizes: list) -> bool:
    """malloc and zero one chunk per size, kept in `held`; False if malloc said no."""
    malloc, memset = _LIBC.malloc, ctypes.memset
    for size in sizes:
        p = malloc(size)
        if not p:
            return False
        memset(p, 0, size)
        held.append(p)
    return True


def forget_freed() -> dict:
    """Both scrubs (pymalloc's classes, then glibc's main arena): counts only."""
    a, b = scrub(), scrub_malloc()
    return {"ok": a["ok"] and b["ok"], "blocks": a["blocks"], "chunks": b["chunks"]}
