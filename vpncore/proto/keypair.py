"""Transport data: a keypair that seals and opens transport messages (SPEC §5).

Nonce = 4 zero bytes || counter (u64 LE); associated data = the 16-byte
transport header, so type, kind, receiver and counter are all authenticated.
Data-kind plaintext is padded with zeros to a multiple of 16 bytes.

The AEAD is ChaCha20-Poly1305 (RFC 8439) from the `cryptography` package: the
same cipher the spec names, chosen for the hot path because one call costs
~1.3 us for 1,400 bytes against ~4.1 us through PyNaCl's binding (measured in
bench/micro). The handshake uses PyNaCl.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .constants import MSG_TRANSPORT, REJECT_AFTER_MESSAGES, TRANSPORT_HEADER_LEN
from .errors import BadPacket
from .replay import ReplayWindow

HEADER = struct.Struct("<BBHIQ")
NONCE = struct.Struct("<IQ")
_ZEROS = bytes(16)


class Keypair:
    """One direction pair of transport keys from one handshake: send counter, receive replay window,
    and the seal/open of single transport messages (SPEC §5.1-§5.4). Memory only: never pickled,
    printed as its index.

    It knows nothing of peers, kinds or super-packets: the Tunnel (tunnel.py) that holds it decides
    what to seal and what an opened message means. `reassembly` is the super-packet table of this
    keypair (superpacket.Reassembly, created at the first fragment), kept here because it lives and
    dies with the keys (§5.5 Bounds).
    """

    __slots__ = ("_seal", "_open", "_keys", "local_index", "remote_index", "send_counter",
                 "replay", "created", "initiator", "reassembly",
                 "__weakref__")

    def __init__(self, send_key: bytes, recv_key: bytes, local_index: int, remote_index: int,
                 created: float, initiator: bool):
        self._keys = [bytearray(send_key), bytearray(recv_key)]
        self._seal = ChaCha20Poly1305(bytes(send_key)).encrypt
        self._open = ChaCha20Poly1305(bytes(recv_key)).decrypt
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.created = created
        self.initiator = initiator
        self.reassembly = None   # superpacket.Reassembly once a multi-fragment super-packet arrives

    def __repr__(self) -> str:
        return f"<Keypair #{self.local_index:08x}>"

    def __reduce__(self):
        raise TypeError("session state is memory-only and cannot be serialized")

    @property
    def partial(self):
        """The incomplete super-packets held for this keypair ({counter: entry}), or None."""
        r = self.reassembly
        return None if r is None else r.partial

    def seal(self, kind: int, plaintext: bytes) -> bytes:
        """A transport datagram carrying `plaintext`. The caller pads data (see pad())."""
        c = self.send_counter
        if c >= REJECT_AFTER_MESSAGES:
            raise BadPacket("counter-exhausted")
        self.send_counter = c + 1
        header = HEADER.pack(MSG_TRANSPORT, kind, 0, self.remote_index, c)
        return header + self._seal(NONCE.pack(0, c), plaintext, header)

    def seal_detached(self, kind: int, reserved: int, plaintext: bytes) -> tuple[int, bytes]:
        """(counter, ciphertext) of one message under the next counter whose header (the AD) is
        HEADER.pack(MSG_TRANSPORT, kind, reserved, remote_index, counter) but is not prepended: a
        super-packet's fragment 0 header (§5.5) has frag_no 0 and frag_count n in `reserved`
        (`n << 8`), and its ciphertext is cut into fragments."""
        c = self.send_counter
        if c >= REJECT_AFTER_MESSAGES:
            raise BadPacket("counter-exhausted")
        self.send_counter = c + 1
        return c, self._seal(NONCE.pack(0, c), plaintext, HEADER.pack(MSG_TRANSPORT, kind, reserved, self.remote_index, c))

    def open(self, datagram: bytes, counter: int) -> bytes:
        """Plaintext of a transport datagram whose header the caller parsed; BadPacket on tag or replay."""
        if not self.replay.check(counter):
            raise BadPacket("replay")
        header = datagram[:TRANSPORT_HEADER_LEN]
        try:
            plain = self._open(NONCE.pack(0, counter), datagram[TRANSPORT_HEADER_LEN:], header)
        except InvalidTag:
            raise BadPacket("tag") from None
        # the window moves only after the tag verified
        if not self.replay.update(counter):
            raise BadPacket("replay")
        return plain

    def open_with_header(self, header: bytes, counter: int, ciphertext: bytes) -> bytes:
        """Like open() for a message whose header (the AD) and ciphertext arrive apart (§5.5)."""
        if not self.replay.check(counter):
            raise BadPacket("replay")
        try:
            plain = self._open(NONCE.pack(0, counter), ciphertext, header)
        except InvalidTag:
            raise BadPacket("tag") from None
        if not self.replay.update(counter):
            raise BadPacket("replay")
        return plain

    def wipe(self) -> None:
        """Overwrite the key bytes we hold and drop the cipher objects (best effort in Python)."""
        for k in self._keys:
            k[:] = bytes(len(k))
        self._seal = self._open = _dead
        self.reassembly = None


def _dead(*_args):
    raise BadPacket("keypair-wiped")


def pad(packet: bytes) -> bytes:
    """Zero padding to a multiple of 16 bytes (SPEC §5.2)."""
    n = -len(packet) % 16
    return packet + _ZEROS[:n] if n else packet


def strip_padding(plain: bytes, size: int):
    """The first `size` bytes of a super-packet's plaintext without copying them: `plain` itself when
    it has no padding, else a memoryview (a 64 KiB copy per super-packet saved; the embedding writes
    it to its TUN as is and takes bytes() of the few fields it looks up)."""
    return plain if size == len(plain) else memoryview(plain)[:size]


def ip_packet_length(plain: bytes, at: int = 0) -> int:
    """Length of the IP packet starting at `at` in padded plaintext, or -1 if malformed."""
    size = len(plain) - at
    if size <= 0:
        return 0 if size == 0 else -1
    version = plain[at] >> 4
    if version == 4 and size >= 20:
        n = (plain[at + 2] << 8) | plain[at + 3]
        if n < 20:
            return -1
    elif version == 6 and size >= 40:
        n = ((plain[at + 4] << 8) | plain[at + 5]) + 40
    else:
        return -1
    return n if n <= size else -1
