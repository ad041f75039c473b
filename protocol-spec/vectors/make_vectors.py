"""Deterministic generator of the protocol test vectors (SPEC §11).

Run from the repository root:

    python protocol-spec/vectors/make_vectors.py          # (re)writes the four JSON files
    python protocol-spec/vectors/make_vectors.py --check  # exit 1 if a file differs from its output

Every input is fixed: static keys, ephemerals, PSK, session indices, wall time, cookie secret and
nonce all come from `fixed(label, n)` (BLAKE2s of a label, so a reader can recompute them) and are
handed to the real code through a scripted rng that returns them in order and checks the length
of every request. The outputs are produced by the real code (vpncore.proto.client.ClientConnection,
vpncore.proto.server.ServerProtocol, handshake, session.Keypair, tunnel.Tunnel, control.encode,
replay.ReplayWindow) and, where a second path exists, cross-checked against it before anything is
written. Every receive result (delivered packet, control message or drop reason) is what
tunnel.Tunnel.open_untrusted gives, the receive path of both ends.

`cacophony-IK.json` in this directory is not generated here (it is copied from cacophony).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import struct
import sys
from pathlib import Path

import msgpack
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

from vpncore.proto import control, cookie, handshake, wire
from vpncore.proto.client import ClientConnection
from vpncore.proto.constants import (
    CONSTRUCTION, CONTROL_MAX_LEN, IDENTIFIER, KIND_CONTROL, KIND_DATA, KIND_SUPER, LABEL_COOKIE, LABEL_MAC1,
    REJECT_AFTER_MESSAGES, REPLAY_WINDOW, SUPER_MAX_FRAGMENTS, TRANSPORT_HEADER_LEN,
)
from vpncore.proto.errors import BadPacket
from vpncore.proto.noise import public_key
from vpncore.proto.replay import ReplayWindow
from vpncore.proto.server import ServerProtocol
from vpncore.proto.keypair import Keypair, pad
from vpncore.proto.superpacket import seal_fragments
from vpncore.proto.tunnel import Tunnel

GENERATOR = "protocol-spec/vectors/make_vectors.py"
HERE = Path(__file__).resolve().parent


# --- fixed inputs ------------------------------------------------------------------------------

def fixed(label: str, n: int) -> bytes:
    """n fixed bytes: BLAKE2s(label) with digest size n (n <= 32)."""
    return hashlib.blake2s(label.encode(), digest_size=n).digest()


def fixed_index(label: str) -> int:
    return int.from_bytes(fixed(label, 4), "little")


class ScriptedRng:
    """An rng that returns fixed values in a fixed order and checks every requested length."""

    def __init__(self, script: list[tuple[str, bytes]]):
        self.script = list(script)

    def __call__(self, n: int) -> bytes:
        if not self.script:
            raise AssertionError(f"rng script exhausted (asked for {n} bytes)")
        label, value = self.script.pop(0)
        if len(value) != n:
            raise AssertionError(f"rng script: {label} has {len(value)} bytes, code asked for {n}")
        return value

    def assert_done(self) -> None:
        if self.script:
            raise AssertionError(f"rng script not consumed: {[label for label, _ in self.script]}")


def script_json(script: list[tuple[str, bytes]]) -> list[dict]:
    return [{"name": label, "hex": value.hex()} for label, value in script]


def h(b) -> str:
    return bytes(b).hex()


CLIENT_SRC = ("198.18.0.2", 51820)


# --- handshake (SPEC §4) -----------------------------------------------------------------------

def initiation_fields(dg: bytes) -> dict:
    m = wire.unpack_initiation_untrusted(dg)
    return {"type": dg[0], "reserved": h(dg[1:4]), "sender_index": m.sender, "ephemeral": h(m.ephemeral),
            "encrypted_static": h(m.encrypted_static), "encrypted_timestamp": h(m.encrypted_timestamp),
            "mac1": h(m.mac1), "mac2": h(m.mac2)}


def response_fields(dg: bytes) -> dict:
    m = wire.unpack_response_untrusted(dg)
    return {"type": dg[0], "reserved": h(dg[1:4]), "sender_index": m.sender, "receiver_index": m.receiver,
            "ephemeral": h(m.ephemeral), "encrypted_nothing": h(m.encrypted_nothing),
            "mac1": h(m.mac1), "mac2": h(m.mac2)}


def cookie_reply_fields(dg: bytes) -> dict:
    m = wire.unpack_cookie_reply_untrusted(dg)
    return {"type": dg[0], "reserved": h(dg[1:4]), "receiver_index": m.receiver, "nonce": h(m.nonce),
            "encrypted_cookie": h(m.encrypted_cookie)}


def handshake_case(name: str, psk: bytes | None) -> dict:
    """One complete handshake between a ClientConnection and a ServerProtocol, at fixed inputs."""
    client_static = fixed(f"{name}: client static private", 32)
    server_static = fixed(f"{name}: server static private", 32)
    client_ephemeral = fixed(f"{name}: client ephemeral private", 32)
    server_ephemeral = fixed(f"{name}: server ephemeral private", 32)
    client_index, server_index = fixed(f"{name}: client index", 4), fixed(f"{name}: server index", 4)
    now, wall_time = 1000.0, 1700000000.5
    client_script = [("client cookie secret (unused by a client)", fixed(f"{name}: client cookie secret", 32)),
                     ("client index", client_index), ("client ephemeral private", client_ephemeral)]
    server_script = [("server cookie secret (initial)", fixed(f"{name}: server cookie secret", 32)),
                     ("server ephemeral private", server_ephemeral), ("server index", server_index)]
    crng, srng = ScriptedRng(client_script), ScriptedRng(server_script)
    cli = ClientConnection(private_key=client_static, server_public=public_key(server_static), rng=crng,
                           psk=psk, wall_offset=wall_time - now)
    srv = ServerProtocol(private_key=server_static, rng=srng)
    srv.authorize(cli.public, psk)

    cli.connect(now)
    [initiation] = cli.datagrams_to_send()
    noise_i = cli.pending.noise
    srv.receive_datagram(initiation, CLIENT_SRC, now)
    [(endpoint, response)] = srv.datagrams_to_send()
    assert endpoint == CLIENT_SRC and not srv.drops, srv.drops
    cli.receive_datagram(response, now)
    assert cli.state == "established" and not cli.drops, cli.drops
    [first_transport] = cli.datagrams_to_send()
    kp = cli.current
    hash_i = bytes(noise_i.ss.h)
    assert srv.receive_datagram(first_transport, CLIENT_SRC, now) is None and not srv.drops
    [peer] = srv.peers.values()
    assert peer.state == "live" and bytes(peer.current._keys[0]) == bytes(kp._keys[1])
    crng.assert_done(), srng.assert_done()

    # the same bytes through the handshake functions directly (the second path)
    gen = cookie.CookieGenerator(public_key(server_static))
    msg, pending = handshake.create_initiation(
        static_private=client_static, remote_static=public_key(server_static), psk=psk,
        ephemeral=client_ephemeral, index=int.from_bytes(client_index, "little"), wall_time=wall_time, now=now,
        macs=gen)
    assert msg == initiation
    consumed = handshake.consume_initiation(
        initiation, static_private=server_static, ephemeral=server_ephemeral,
        psk_for=lambda k: (psk or handshake.ZERO_PSK) if k == public_key(client_static) else None)
    resp, kp_r = handshake.create_response(consumed, index=int.from_bytes(server_index, "little"), now=now,
                                           macs=cookie.CookieGenerator(public_key(client_static)))
    hash_r = bytes(consumed.noise.ss.h)
    assert resp == response and hash_r == hash_i and bytes(kp_r._keys[1]) == bytes(kp._keys[0])

    return {
        "name": name,
        "inputs": {
            "client_static_private": h(client_static),
            "client_static_public": h(public_key(client_static)),
            "server_static_private": h(server_static),
            "server_static_public": h(public_key(server_static)),
            "client_ephemeral_private": h(client_ephemeral),
            "server_ephemeral_private": h(server_ephemeral),
            "psk": h(psk or handshake.ZERO_PSK),
            "psk_configured": psk is not None,
            "client_index": int.from_bytes(client_index, "little"),
            "server_index": int.from_bytes(server_index, "little"),
            "wall_time": wall_time,
            "now": now,
            "client_source": list(CLIENT_SRC),
            "client_rng": script_json(client_script),
            "server_rng": script_json(server_script),
        },
        "outputs": {
            "client_ephemeral_public": h(public_key(client_ephemeral)),
            "server_ephemeral_public": h(public_key(server_ephemeral)),
            "timestamp": h(consumed.timestamp),
            "mac1_key_server": h(cookie.mac1_key(public_key(server_static))),
            "mac1_key_client": h(cookie.mac1_key(public_key(client_static))),
            "initiation": h(initiation),
            "initiation_fields": initiation_fields(initiation),
            "response": h(response),
            "response_fields": response_fields(response),
            "handshake_hash": h(hash_i),
            "initiator_send_key": h(kp._keys[0]),
            "responder_send_key": h(kp._keys[1]),
            "first_transport": h(first_transport),
            "first_transport_plaintext": h(control.encode(control.hello())),
        },
    }


def cookie_case() -> dict:
    """A server under load answers an initiation with a cookie reply; the retry carries mac2."""
    name = "cookie"
    client_static, server_static = fixed(f"{name}: client static private", 32), fixed(f"{name}: server static private", 32)
    server_public = public_key(server_static)
    now1, wall_time1 = 1000.0, 1700000000.5
    now2 = now1 + 0.05      # the cookie reply arrives one round trip later; the retry leaves at once
    wall_offset = wall_time1 - now1
    client_script = [
        ("client cookie secret (unused by a client)", fixed(f"{name}: client cookie secret", 32)),
        ("client index 1", fixed(f"{name}: client index 1", 4)),
        ("client ephemeral private 1", fixed(f"{name}: client ephemeral private 1", 32)),
        ("client index 2", fixed(f"{name}: client index 2", 4)),
        ("client ephemeral private 2", fixed(f"{name}: client ephemeral private 2", 32)),
    ]
    cookie_secret = fixed(f"{name}: server cookie secret", 32)
    cookie_nonce = fixed(f"{name}: cookie nonce", 24)
    server_script = [
        ("server cookie secret (initial, replaced at first use)", fixed(f"{name}: server initial cookie secret", 32)),
        ("server cookie secret", cookie_secret),
        ("cookie reply nonce", cookie_nonce),
        ("server ephemeral private", fixed(f"{name}: server ephemeral private", 32)),
        ("server index", fixed(f"{name}: server index", 4)),
    ]
    crng, srng = ScriptedRng(client_script), ScriptedRng(server_script)
    cli = ClientConnection(private_key=client_static, server_public=server_public, rng=crng, wall_offset=wall_offset)
    srv = ServerProtocol(private_key=server_static, rng=srng)
    srv.authorize(cli.public)
    srv.under_load = True

    cli.connect(now1)
    [initiation1] = cli.datagrams_to_send()
    srv.receive_datagram(initiation1, CLIENT_SRC, now1)
    [(endpoint, reply)] = srv.datagrams_to_send()
    assert endpoint == CLIENT_SRC and srv.drops == {"cookie-sent": 1} and not srv.peers
    cli.receive_datagram(reply, now2)   # the retry, sent at once, carries mac2 (SPEC §4.5)
    assert not cli.drops, cli.drops
    [initiation2] = cli.datagrams_to_send()
    srv.receive_datagram(initiation2, CLIENT_SRC, now2)
    [(endpoint, response)] = srv.datagrams_to_send()
    assert srv.drops == {"cookie-sent": 1}
    cli.receive_datagram(response, now2)
    assert cli.state == "established" and not cli.drops
    crng.assert_done(), srng.assert_done()

    # second path: the cookie and the reply from the definitions of SPEC §4.5
    source = cookie.source_bytes(CLIENT_SRC)
    the_cookie = cookie.mac(cookie_secret, source)
    mac1 = initiation1[116:132]
    sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(the_cookie, mac1, cookie_nonce, cookie.cookie_key(server_public))
    assert reply == wire.pack_cookie_reply(int.from_bytes(initiation1[4:8], "little"), cookie_nonce, sealed)
    assert initiation2[132:148] == cookie.mac(the_cookie, initiation2[:132])

    return {
        "name": name,
        "inputs": {
            "client_static_private": h(client_static),
            "client_static_public": h(public_key(client_static)),
            "server_static_private": h(server_static),
            "server_static_public": h(server_public),
            "psk": h(handshake.ZERO_PSK),
            "client_source": list(CLIENT_SRC),
            "server_under_load": True,
            "now_first": now1,
            "now_retry": now2,
            "wall_offset": wall_offset,
            "cookie_secret": h(cookie_secret),
            "cookie_nonce": h(cookie_nonce),
            "client_rng": script_json(client_script),
            "server_rng": script_json(server_script),
        },
        "outputs": {
            "initiation_first": h(initiation1),
            "cookie_key": h(cookie.cookie_key(server_public)),
            "source_bytes": h(source),
            "cookie": h(the_cookie),
            "cookie_reply": h(reply),
            "cookie_reply_fields": cookie_reply_fields(reply),
            "initiation_retry": h(initiation2),
            "initiation_retry_fields": initiation_fields(initiation2),
            "response": h(response),
            "initiator_send_key": h(cli.current._keys[0]),
            "responder_send_key": h(cli.current._keys[1]),
        },
    }


def make_handshake() -> dict:
    return {
        "generator": GENERATOR,
        "spec": "SPEC §4 Handshake (message layouts §3.1-§3.3, mac1/mac2/cookie reply §4.5)",
        "description": "Complete handshakes at fixed inputs. `client_rng`/`server_rng` list, in order, the "
                       "random bytes the reference implementation draws; an implementation that draws "
                       "differently uses the named values directly. Integers are JSON numbers; indices are "
                       "u32 values that appear little-endian on the wire.",
        "construction": CONSTRUCTION.decode(),
        "identifier": IDENTIFIER.decode(),
        "identifier_hex": h(IDENTIFIER),
        "label_mac1": LABEL_MAC1.decode(),
        "label_cookie": LABEL_COOKIE.decode(),
        "cases": [handshake_case("zero-psk", None), handshake_case("psk", fixed("psk: pre-shared key", 32))],
        "cookie_cases": [cookie_case()],
    }


# --- transport (SPEC §5) -----------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_icmp_echo(src: str, dst: str, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    return _ipv4(src, dst, 1, icmp)


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _ipv4(src, dst, 17, udp)


def _ipv4(src: str, dst: str, proto: int, body: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0x0001, 0x4000, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:] + body


def ipv6_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    length = 8 + len(payload)
    pseudo = s + d + struct.pack("!IxxxB", length, 17)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return struct.pack("!IHBB", 6 << 28, length, 17, 64) + s + d + udp


def _seal(key: bytes, receiver_index: int, kind: int, counter: int, plaintext: bytes) -> bytes:
    kp = Keypair(key, bytes(32), 0, receiver_index, 0.0, initiator=True)
    kp.send_counter = counter
    return kp.seal(kind, plaintext)


def _sending_tunnel(key: bytes, receiver_index: int, counter: int, vnet_hdr: bool = False) -> Tunnel:
    kp = Keypair(key, bytes(32), 0, receiver_index, 0.0, initiator=True)
    kp.send_counter = counter
    tunnel = Tunnel(vnet_hdr=vnet_hdr)
    tunnel.use(kp)
    return tunnel


def _receiving_tunnel(key: bytes, local_index: int, vnet_hdr: bool = False):
    """A Tunnel whose one keypair receives with `key` at `local_index`, and the list its control
    messages go to."""
    msgs: list = []
    tunnel = Tunnel(vnet_hdr=vnet_hdr, control=lambda msg, now: msgs.append(msg))
    tunnel.use(Keypair(bytes(32), key, local_index, 0, 0.0, initiator=False))
    return tunnel, msgs


def _receive(key: bytes, local_index: int, dg: bytes):
    """The receive steps of SPEC §5.7 for one keypair (Tunnel.open_untrusted): (kind, delivered)
    or the BadPacket reason."""
    tunnel, msgs = _receiving_tunnel(key, local_index)
    try:
        delivered = tunnel.open_untrusted(dg, 0.0)
    except BadPacket as exc:
        return exc.reason
    if msgs:
        return KIND_CONTROL, msgs[0]
    return KIND_DATA, delivered


def _tunnel_seal(key: bytes, receiver: int, kind: int, counter: int, packet, plaintext: bytes) -> bytes:
    """The same datagram sealed the way both ends seal it (Tunnel), for the cross-check."""
    tunnel = _sending_tunnel(key, receiver, counter)
    if kind == KIND_CONTROL:
        return tunnel.seal_control(control.decode_untrusted(plaintext), 0.0)
    return tunnel.seal_packet(packet, 0.0) if packet is not None else tunnel.seal_keepalive(0.0)


def make_transport(hs: dict) -> dict:
    case = hs["cases"][0]
    k_ir = bytes.fromhex(case["outputs"]["initiator_send_key"])
    k_ri = bytes.fromhex(case["outputs"]["responder_send_key"])
    i_idx, r_idx = case["inputs"]["client_index"], case["inputs"]["server_index"]
    v4 = ipv4_icmp_echo("198.19.0.2", "198.19.0.1", bytes(range(56)))
    v4_16 = ipv4_udp("198.19.0.2", "198.19.0.1", 40000, 53, bytes(range(36)))
    v6 = ipv6_udp("fd00::2", "fd00::1", 40000, 5353, b"vpncore vector")
    v4_back = ipv4_icmp_echo("198.19.0.1", "198.19.0.2", bytes(range(56)))
    assert (len(v4), len(v4_16), len(v6)) == (84, 64, 62)
    specs = [
        ("keepalive", "initiator->responder", KIND_DATA, 0, None, b""),
        ("control hello", "initiator->responder", KIND_CONTROL, 1, None, control.encode(control.hello(["gso"]))),
        ("IPv4 ICMP echo, 84 bytes padded to 96", "initiator->responder", KIND_DATA, 2, v4, pad(v4)),
        ("IPv6 UDP, 62 bytes padded to 64", "initiator->responder", KIND_DATA, 3, v6, pad(v6)),
        ("IPv4 UDP, 64 bytes, no padding, counter above 2**32", "initiator->responder", KIND_DATA, 2**32 + 5,
         v4_16, pad(v4_16)),
        ("IPv4 ICMP echo reply direction", "responder->initiator", KIND_DATA, 0, v4_back, pad(v4_back)),
        ("control close", "responder->initiator", KIND_CONTROL, 1, None, control.encode(control.close("server shutting down"))),
    ]
    cases = []
    for name, direction, kind, counter, packet, plaintext in specs:
        key, receiver = (k_ir, r_idx) if direction == "initiator->responder" else (k_ri, i_idx)
        dg = _seal(key, receiver, kind, counter, plaintext)
        assert _tunnel_seal(key, receiver, kind, counter, packet, plaintext) == dg, name
        got_kind, delivered = _receive(key, receiver, dg)
        entry = {"name": name, "direction": direction, "key": h(key), "receiver_index": receiver, "kind": kind,
                 "counter": counter, "packet": None if packet is None else h(packet), "plaintext": h(plaintext),
                 "header": h(dg[:TRANSPORT_HEADER_LEN]), "nonce": h(bytes(4) + counter.to_bytes(8, "little")),
                 "datagram": h(dg)}
        if kind == KIND_DATA:
            assert delivered == (packet or None)
            entry["delivered"] = None if delivered is None else h(delivered)
        else:
            entry["control"] = delivered
        cases.append(entry)

    base = bytes.fromhex(cases[2]["datagram"])
    bad_length = ipv4_icmp_echo("198.19.0.2", "198.19.0.1", bytes(range(56)))
    bad_length = bad_length[:2] + struct.pack("!H", 200) + bad_length[4:]
    invalid_specs = [
        ("kind byte changed (the header is associated data)", base[:1] + b"\x01" + base[2:]),
        ("counter changed (nonce and associated data)", base[:8] + (3).to_bytes(8, "little") + base[16:]),
        ("ciphertext bit flipped", base[:20] + bytes([base[20] ^ 1]) + base[21:]),
        ("reserved field not zero", base[:2] + b"\x00\x01" + base[4:]),
        ("wrong type byte", b"\x05" + base[1:]),
        ("shorter than header plus tag", base[:31]),
        ("unknown receiver index", base[:4] + ((r_idx + 1) % 2**32).to_bytes(4, "little") + base[8:]),
        ("counter at REJECT_AFTER_MESSAGES", base[:8] + REJECT_AFTER_MESSAGES.to_bytes(8, "little") + base[16:]),
        ("authentic, unknown kind 7", _seal(k_ir, r_idx, 7, 10, b"")),
        ("authentic data, IPv4 total length beyond the plaintext", _seal(k_ir, r_idx, KIND_DATA, 11, pad(bad_length))),
        ("authentic data, not IPv4 or IPv6", _seal(k_ir, r_idx, KIND_DATA, 12, pad(b"\x50" + bytes(40)))),
        ("authentic control, invalid control plaintext", _seal(k_ir, r_idx, KIND_CONTROL, 13, bytes(16))),
    ]
    invalid = []
    for name, dg in invalid_specs:
        reason = _receive(k_ir, r_idx, dg)
        assert isinstance(reason, str), (name, reason)
        invalid.append({"name": name, "key": h(k_ir), "local_index": r_idx, "datagram": h(dg), "reason": reason})

    supers, super_invalid = make_super_cases(k_ir, r_idx)
    return {
        "generator": GENERATOR,
        "spec": "SPEC §5 Transport data (header §3.4, fragments §3.5, padding §5.2, super-packets §5.5, receive steps §5.7)",
        "description": "Keys and indices are those of handshake.json case 'zero-psk'. Each case seals "
                       "`plaintext` (the padded packet, a control plaintext, or nothing for a keepalive) "
                       "with `key` at `counter`; `datagram` = header || AEAD(key, nonce, plaintext, ad=header). "
                       "`delivered` is what the receiver hands on after trimming by the IP length field. "
                       "`invalid` datagrams are dropped by a receiver whose keypair has `local_index` and "
                       "receive key `key`; `reason` is the reference implementation's drop counter.",
        "initiator_to_responder_key": h(k_ir),
        "responder_to_initiator_key": h(k_ri),
        "initiator_index": i_idx,
        "responder_index": r_idx,
        "cases": cases,
        "invalid": invalid,
        "super_cases": supers,
        "super_invalid": super_invalid,
    }


def vnet_tcp4_superpacket(payload_len: int) -> bytes:
    """virtio_net_hdr (TCPv4 GSO, NEEDS_CSUM) || an IPv4/TCP super-packet with `payload_len` bytes of data."""
    payload = bytes(i % 251 for i in range(payload_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 2000, 5 << 4, 0x18, 64240, 0, 0)
    ip = _ipv4("198.19.0.2", "198.19.0.1", 6, tcp + payload)
    vnet = struct.pack("<BBHHHH", 1, 1, 40, 1380, 20, 16)
    return vnet + ip


def _receive_super(key: bytes, local_index: int, fragments: list[bytes]):
    """SPEC §5.5 receive steps for one keypair (Tunnel.open_untrusted on a vnet_hdr end): the
    delivered vnet_hdr || packet, None while incomplete, or the drop reason."""
    tunnel, _ = _receiving_tunnel(key, local_index, vnet_hdr=True)
    try:
        plain = None
        for dg in fragments:
            assert dg[1] == KIND_SUPER
            plain = tunnel.open_untrusted(dg, 0.0)
        return None if plain is None else bytes(plain)
    except BadPacket as exc:
        return exc.reason


def make_super_cases(key: bytes, receiver: int):
    big = vnet_tcp4_superpacket(3000)
    small = vnet_tcp4_superpacket(100)
    specs = [
        ("TCPv4 super-packet of 3050 bytes (with vnet header) in 3 fragments", 20, big, 1436, [2, 0, 1], False),
        ("small packet in a single fragment", 21, small, 1436, [0], False),
        ("3 fragments and a parity fragment (index 3 in `fragments`); fragment 1 lost and rebuilt",
         22, big, 1436, [0, 2, 3], True),
        ("3 fragments and a parity fragment; the last (short) fragment lost and rebuilt from the parity "
         "that arrives first", 23, big, 1436, [3, 0, 1], True),
        ("3 fragments and a parity fragment; nothing lost, the parity not used", 24, big, 1436, [1, 0, 2], True),
    ]
    cases = []
    for name, counter, data, chunk, order, parity in specs:
        kp = Keypair(key, bytes(32), 0, receiver, 0.0, initiator=True)
        kp.send_counter = counter
        frags = seal_fragments(kp, pad(data), chunk, parity)
        tunnel = _sending_tunnel(key, receiver, counter, vnet_hdr=True)   # the second path: both ends' sealer
        tunnel.peer_takes_super = tunnel.peer_takes_parity = True
        tunnel.add_parity = parity
        assert tunnel.seal_read(data, 0.0, chunk) == frags, name
        n = len(frags) - parity
        delivered = _receive_super(key, receiver, [frags[i] for i in order])
        assert delivered == data, name
        case = {"name": name, "key": h(key), "receiver_index": receiver, "counter": counter, "chunk": chunk,
                "data": h(data), "plaintext": h(pad(data)),
                "associated_data": h(struct.pack("<BBBBIQ", 4, KIND_SUPER, 0, n, receiver, counter)),
                "fragments": [h(f) for f in frags], "receive_order": order, "delivered": h(delivered)}
        if parity:
            case["parity"] = True      # the last of `fragments` is the parity fragment (SPEC §5.5)
        cases.append(case)

    kp = Keypair(key, bytes(32), 0, receiver, 0.0, initiator=True)
    kp.send_counter = 30
    f = seal_fragments(kp, pad(big), 1436)
    g = seal_fragments(kp, pad(big), 1436)   # counter 31
    pf = seal_fragments(kp, pad(big), 1436, parity=True)   # counter 32: 3 data fragments + parity
    par = pf[3]
    hdr = lambda dg, no, n: dg[:2] + bytes([no, n]) + dg[4:]
    flipped = par[:-1] + bytes([par[-1] ^ 1])
    bad_len = par[:16] + (201).to_bytes(2, "little") + par[18:]      # the last chunk is 200 bytes
    zero_len = par[:16] + bytes(2) + par[18:]
    invalid_specs = [
        ("fragment count 0", [hdr(f[0], 0, 0)]),
        (f"fragment count above SUPER_MAX_FRAGMENTS ({SUPER_MAX_FRAGMENTS})", [hdr(f[0], 0, SUPER_MAX_FRAGMENTS + 1)]),
        ("fragment number not below the count", [hdr(f[0], 3, 3)]),
        ("header only, no ciphertext", [f[0][:16]]),
        ("duplicate fragment", [f[0], f[0]]),
        ("fragment count differs from the first fragment seen for the counter", [f[0], hdr(f[1], 1, 4)]),
        ("fragment of another super-packet moved to this counter (tag fails)",
         [f[0], f[1], g[2][:8] + f[2][8:16] + g[2][16:]]),
        ("chunk times (frag_count - 1) above SUPER_MAX_PLAINTEXT + 16", [hdr(f[0], 0, SUPER_MAX_FRAGMENTS)]),
        ("all fragments but one: nothing delivered yet", [f[0], f[2]]),
        ("parity fragment with frag_count below SUPER_PARITY_MIN", [hdr(par, 255, 2)]),
        ("parity fragment with no parity bytes", [par[:18]]),
        ("duplicate parity fragment", [par, par]),
        ("two fragments lost: the parity cannot rebuild them, nothing delivered yet", [par, pf[0]]),
        ("parity naming a wrong last-chunk length: nothing rebuilt, nothing delivered yet",
         [pf[0], pf[2], bad_len]),
        ("parity naming a last-chunk length of 0: nothing rebuilt", [pf[0], pf[1], zero_len]),
        ("parity with a flipped bit: the rebuilt message fails the tag", [pf[0], pf[2], flipped]),
        ("parity after its super-packet arrived whole: not used", [pf[0], pf[1], pf[2], par]),
        ("parity whose chunk times (frag_count - 1) is above SUPER_MAX_PLAINTEXT + 16",
         [hdr(par, 255, SUPER_MAX_FRAGMENTS)]),
    ]
    invalid = []
    for name, frags in invalid_specs:
        got = _receive_super(key, receiver, frags)
        assert got is None or isinstance(got, str), name
        invalid.append({"name": name, "key": h(key), "local_index": receiver, "fragments": [h(x) for x in frags],
                        "reason": got})
    return cases, invalid


# --- replay window (SPEC §5.4) -----------------------------------------------------------------

def run_window(steps: list) -> list[dict]:
    """steps: counters, or (counter, tag_ok). Records what a receiver does (check, tag, update)."""
    w, out = ReplayWindow(), []
    for step in steps:
        counter, tag_ok = step if isinstance(step, tuple) else (step, True)
        accept = w.check(counter)
        if accept:
            accept = tag_ok and w.update(counter)
        entry = {"counter": counter, "accept": bool(accept)}
        if not tag_ok:
            entry["tag_ok"] = False
        out.append(entry)
    return out


def make_replay() -> dict:
    W, R = REPLAY_WINDOW, REJECT_AFTER_MESSAGES
    sequences = [
        ("in order", list(range(10))),
        ("duplicates", [0, 1, 2, 1, 2, 0, 3]),
        ("out of order within the window", [10, 5, 9, 0, 3, 5, 11, 4, 10]),
        ("first counter need not be zero", [5000, 0, 4999, 5000, 5001]),
        ("too old: the window holds the highest counter and the 8191 below it",
         [W + 8, 7, 8, 9, 9, W + 7, W + 9]),
        ("far jump", [0, 1, 1_000_000, 1, 999_999, 1_000_000 - (W - 1), 1_000_000 - W, 1_000_000]),
        ("wrap at the window edge: jump by REPLAY_WINDOW - 1, then by 1", [0, W - 1, 0, 1, W, 0, 1, 2]),
        ("jump by exactly REPLAY_WINDOW clears the window", [5, 5 + W, 5, 6, 5 + W - 1]),
        ("forged packets (tag fails) never move or mark the window",
         [0, (100_000, False), 1, (2, False), 2, (100_000, True), 1, 2]),
        ("limit: counters at or above REJECT_AFTER_MESSAGES are rejected",
         [R - 1, R, 2**64 - 1, R - 2, 0]),
    ]
    return {
        "generator": GENERATOR,
        "spec": "SPEC §5.4 Replay window",
        "description": "Each sequence starts from a fresh window. For every step the receiver checks the "
                       "counter, then (only if the check passes) verifies the tag, then (only if the tag "
                       "verifies) records the counter. `tag_ok: false` marks a forged packet whose tag does "
                       "not verify; `accept` is whether the packet is accepted. Counters are u64 (one "
                       "sequence exceeds 2**53: read them as 64-bit integers).",
        "window": W,
        "reject_after_messages": R,
        "sequences": [{"name": name, "steps": run_window(steps)} for name, steps in sequences],
    }


# --- control channel (SPEC §6) ----------------------------------------------------------------

def _frame(body: bytes, padding: bytes | None = None) -> bytes:
    plain = struct.pack(">H", len(body)) + body
    return plain + (bytes(-len(plain) % 16) if padding is None else padding)


def _pk(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def make_control() -> dict:
    valid_msgs = [
        ("hello, minimal", {"type": "hello", "version": 1}),
        ("hello with features", control.hello(["gso"])),
        ("config, all fields", {"type": "config", "version": 1, "ipv4": "198.19.0.2/24", "ipv6": "fd00::2/64",
                                "routes": ["0.0.0.0/0", "::/0"], "mtu": 1420, "dns": ["198.19.0.1", "fd00::1"],
                                "keepalive": 25, "features": ["gso"]}),
        ("config, required fields only", {"type": "config", "version": 1, "routes": ["10.0.0.0/8"], "mtu": 1280}),
        ("close", control.close("server shutting down")),
        ("unknown fields are ignored", {"type": "hello", "version": 1, "x-future": {"a": [1, 2]}}),
        ("strings of exactly 256 bytes and lists of exactly 32 items",
         {"type": "hello", "version": 1, "features": ["f%02d" % i for i in range(31)] + ["x" * 256]}),
    ]
    valid = []
    for name, msg in valid_msgs:
        plain = control.encode(msg)
        assert control.decode_untrusted(plain) == msg
        valid.append({"name": name, "msg": msg, "plaintext": h(plain)})

    hello_body = _pk({"type": "hello", "version": 1})
    accepted = []
    for name, plain in [
        ("no padding", _frame(hello_body, b"")),
        ("non-zero padding is ignored", _frame(hello_body, b"\xff" * 5)),
        ("padding longer than 16 bytes is ignored", _frame(hello_body, bytes(40))),
    ]:
        accepted.append({"name": name, "plaintext": h(plain), "decoded": control.decode_untrusted(plain)})

    config = {"type": "config", "version": 1, "routes": ["0.0.0.0/0"], "mtu": 1420}
    big_map = {"type": "hello", "version": 1, **{f"k{i}": 0 for i in range(31)}}
    invalid_plain = [
        ("empty", b""),
        ("one byte", b"\x00"),
        ("declared length above CONTROL_MAX_LEN", struct.pack(">H", CONTROL_MAX_LEN + 1) + bytes(CONTROL_MAX_LEN + 1)),
        ("declared length beyond the plaintext", struct.pack(">H", 16) + hello_body[:4]),
        ("body not msgpack (0xc1)", _frame(b"\xc1")),
        ("trailing bytes inside the declared length", _frame(hello_body + b"\x00")),
        ("invalid UTF-8 in a str", _frame(b"\x81\xa4type\xa1\xff")),
        ("top level is an array", _frame(_pk(["hello", 1]))),
        ("no type field", _frame(_pk({"version": 1}))),
        ("type is bin, not str", _frame(_pk({"type": b"hello", "version": 1}))),
        ("unknown type", _frame(_pk({"type": "ping", "version": 1}))),
        ("hello without version", _frame(_pk({"type": "hello"}))),
        ("version is a str", _frame(_pk({"type": "hello", "version": "1"}))),
        ("version is a bool", _frame(_pk({"type": "hello", "version": True}))),
        ("version is a float", _frame(_pk({"type": "hello", "version": 1.0}))),
        ("version is nil", _frame(_pk({"type": "hello", "version": None}))),
        ("features is a str", _frame(_pk({"type": "hello", "version": 1, "features": "gso"}))),
        ("features item not a str", _frame(_pk({"type": "hello", "version": 1, "features": [1]}))),
        ("features with 33 items", _frame(_pk({"type": "hello", "version": 1, "features": ["x"] * 33}))),
        ("map with 33 entries", _frame(_pk({**big_map, "k31": 0}))),
        ("non-string map key", _frame(_pk({1: 2, "type": "hello", "version": 1}))),
        ("str of 257 bytes", _frame(_pk({"type": "close", "reason": "a" * 257}))),
        ("str of 129 characters but 258 UTF-8 bytes", _frame(_pk({"type": "close", "reason": "\u00e9" * 129}))),
        ("bin of 257 bytes", _frame(_pk({"type": "hello", "version": 1, "x": b"a" * 257}))),
        ("ext with data", _frame(_pk({"type": "hello", "version": 1, "x": msgpack.ExtType(1, b"a")}))),
        ("close without reason", _frame(_pk({"type": "close"}))),
        ("config without routes", _frame(_pk({k: v for k, v in config.items() if k != "routes"}))),
        ("config without mtu", _frame(_pk({k: v for k, v in config.items() if k != "mtu"}))),
        ("config mtu 575", _frame(_pk({**config, "mtu": 575}))),
        ("config mtu 65536", _frame(_pk({**config, "mtu": 65536}))),
        ("config ipv4 not an address", _frame(_pk({**config, "ipv4": "198.19.0.300/24"}))),
        ("config route not a network", _frame(_pk({**config, "routes": ["0.0.0.0/33"]}))),
        ("config dns not an address", _frame(_pk({**config, "dns": ["resolver.example"]}))),
    ]
    invalid = []
    for name, plain in invalid_plain:
        try:
            control.decode_untrusted(plain)
        except BadPacket as exc:
            invalid.append({"name": name, "plaintext": h(plain), "reason": exc.reason})
        else:
            raise AssertionError(f"control vector {name!r} was accepted")

    too_long = {"type": "hello", "version": 1, "features": ["x" * 250] * 5}
    try:
        control.encode(too_long)
    except ValueError:
        pass
    else:
        raise AssertionError("encode accepted a body above CONTROL_MAX_LEN")

    return {
        "generator": GENERATOR,
        "spec": "SPEC §6 Control channel",
        "description": "`valid`: control.encode(msg) == plaintext (u16 big-endian length, msgpack with maps "
                       "in the listed key order, zero padding to a multiple of 16) and decoding gives msg back. "
                       "`accepted`: other plaintexts a receiver must accept, with the decoded message. "
                       "`invalid`: plaintexts a receiver must drop; `reason` is the reference "
                       "implementation's drop counter. `encode_rejects`: messages whose msgpack body exceeds "
                       "CONTROL_MAX_LEN, which a sender must refuse to send.",
        "valid": valid,
        "accepted": accepted,
        "invalid": invalid,
        "encode_rejects": [{"name": "msgpack body above CONTROL_MAX_LEN", "msg": too_long}],
    }


# --- main ---------------------------------------------------------------------------------------

def build() -> dict[str, dict]:
    hs = make_handshake()
    return {"handshake.json": hs, "transport.json": make_transport(hs), "replay.json": make_replay(),
            "control.json": make_control()}


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    differ = []
    for filename, obj in build().items():
        path, text = HERE / filename, dumps(obj)
        if check:
            if not path.exists() or path.read_text() != text:
                differ.append(filename)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(HERE.parent.parent)}")
    if differ:
        print("differs from the generator's output: " + ", ".join(differ), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
