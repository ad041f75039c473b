"""The handshake messages on top of the Noise layer (SPEC §4).

Initiator (client)                                  Responder (server)
  initiation = idx_i, e, enc(s_i), enc(TAI64N), mac1, mac2   ->
                                               <-   response = idx_r, idx_i, e, enc(), mac1, mac2
Keys: Split() -> (T_send_i, T_send_r). PSK slot: psk2 (all zeros when unused).
"""

from __future__ import annotations

from .constants import CONSTRUCTION, IDENTIFIER, KEY_LEN
from .cookie import CookieChecker, CookieGenerator
from .errors import BadPacket
from .noise import IKHandshake
from .keypair import Keypair
from .timestamp import tai64n
from .wire import pack_initiation, pack_response, unpack_initiation_untrusted, unpack_response_untrusted

ZERO_PSK = bytes(KEY_LEN)


class PendingInitiation:
    """The initiator's half-done handshake, waiting for a response."""

    __slots__ = ("noise", "index", "sent_at")

    def __init__(self, noise: IKHandshake, index: int, sent_at: float):
        self.noise, self.index, self.sent_at = noise, index, sent_at

    def __repr__(self) -> str:
        return f"<PendingInitiation #{self.index:08x}>"

    def __reduce__(self):
        raise TypeError("handshake state is memory-only")


def create_initiation(*, static_private: bytes, remote_static: bytes, psk: bytes | None, ephemeral: bytes,
                      index: int, wall_time: float, now: float, macs: CookieGenerator) -> tuple[bytes, PendingInitiation]:
    noise = IKHandshake(initiator=True, static_private=static_private, ephemeral_private=ephemeral,
                        remote_static=remote_static, prologue=IDENTIFIER, psk=psk or ZERO_PSK,
                        protocol_name=CONSTRUCTION)
    body = noise.write_message_1(tai64n(wall_time))
    msg = macs.add_macs(pack_initiation(index, body)[:-32], now)
    return msg, PendingInitiation(noise, index, now)


class ConsumedInitiation:
    """A verified initiation: who sent it, their timestamp, and the Noise state to answer with."""

    __slots__ = ("noise", "peer_static", "timestamp", "sender")

    def __init__(self, noise, peer_static, timestamp, sender):
        self.noise, self.peer_static, self.timestamp, self.sender = noise, peer_static, timestamp, sender

    def __reduce__(self):
        raise TypeError("handshake state is memory-only")


def consume_initiation(datagram: bytes, *, static_private: bytes, ephemeral: bytes, psk_for) -> ConsumedInitiation:
    """Run the Noise read of an initiation whose macs the caller checked. BadPacket on any failure.

    `psk_for(peer_static)` returns the PSK of a known peer, or None for an unknown one.
    The PSK is only mixed in at the response, so the initiation is read first.
    """
    init = unpack_initiation_untrusted(datagram)
    noise = IKHandshake(initiator=False, static_private=static_private, ephemeral_private=ephemeral,
                        prologue=IDENTIFIER, psk=ZERO_PSK, protocol_name=CONSTRUCTION)
    payload = noise.read_message_1(init.ephemeral + init.encrypted_static + init.encrypted_timestamp)
    peer_static = bytes(noise.rs)
    psk = psk_for(peer_static)
    if psk is None:
        noise.wipe()
        raise BadPacket("unknown-key")
    noise.psk = psk
    if len(payload) != 12:
        raise BadPacket("timestamp")
    return ConsumedInitiation(noise, peer_static, bytes(payload), init.sender)


def create_response(consumed: ConsumedInitiation, *, index: int, now: float, macs: CookieGenerator) -> tuple[bytes, Keypair]:
    noise = consumed.noise
    body = noise.write_message_2(b"")
    msg = macs.add_macs(pack_response(index, consumed.sender, body)[:-32], now)
    k_i, k_r = noise.split()
    return msg, Keypair(k_r, k_i, index, consumed.sender, now, initiator=False)


def consume_response(datagram: bytes, pending: PendingInitiation, *, checker: CookieChecker, now: float) -> Keypair:
    resp = unpack_response_untrusted(datagram)
    if resp.receiver != pending.index:
        raise BadPacket("index")
    if not checker.mac1_ok(datagram):
        raise BadPacket("mac1")
    pending.noise.read_message_2(resp.ephemeral + resp.encrypted_nothing)
    k_i, k_r = pending.noise.split()
    return Keypair(k_i, k_r, pending.index, resp.sender, now, initiator=True)
