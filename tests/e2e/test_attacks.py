"""Reliability and security under attack and faults, against a running vpnd (issue 7, part A).

Fast versions, run by `make test`, assert the mechanisms; the long ones (more packets, longer floods,
bounded memory) and the rate and throughput figures a busy machine can miss without a defect are in
tests/soak/ and run by `make soak`. Every test runs vpnd with its test hooks in namespaces it
creates (underlay 198.18.0.0/15, spoofed attack sources 198.18.128.0/17 routed back to the
attacker's namespace); raw sockets are opened only inside them.

What is counted, and where:
- delivered to vpnd's TUN: the device's rx packet counter (`ip -s link`), with a positive control
  (the original packets are counted there first);
- bytes the server sent in reply: nftables counters in the server namespace's output hook;
- what vpnd made of it: `vpnd stats` drop counters by reason, active sessions; `gc-scan` (the test
  harness, tests/e2e/vpnd_harness.py) counts the live Peer and Keypair objects;
- memory: VmRSS of the vpnd process.
Figures measured by these tests are printed (pytest -s shows them) and kept in bench/README.md.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e import attack_harness as H
from tests.e2e import vpn
from tests.e2e.netns import Topology, require_root, wait_until
from tests.helpers import LOW_ORDER_POINTS
from vpncore.net.pump import Udp
from vpncore.proto.constants import CONSTRUCTION, IDENTIFIER, INITIATION_LEN, MAC_LEN
from vpncore.proto.cookie import CookieGenerator, mac, mac1_key
from vpncore.proto.noise import SymmetricState, dh, public_key
from vpncore.proto.timestamp import tai64n
from vpncore.proto.wire import pack_initiation

pytestmark = pytest.mark.netns

BAD_SRC = "198.18.1.66"          # the bad-keys sender: an extra address on the attacker's veth
FIGURES: dict[str, dict] = {}



def report(name: str, **figures) -> None:
    """Print a test's measured figures (shown with -s, and in the failure output)."""
    FIGURES[name] = figures
    print(f"\nFIGURES {name}: {json.dumps(figures)}")


# --- a shared world: vpnd, a driver namespace (c0) and an attacker namespace (c1) ---------------

class World:
    def __init__(self, topo: Topology, workdir: Path, drivers: int = 8):
        self.topo, self.workdir = topo, workdir
        self.driver_keys = [H.raw_keypair() for _ in range(drivers)]
        self.attacker_key = H.raw_keypair()
        clients = [H.keys_from_raw(*k) for k in self.driver_keys + [self.attacker_key]]
        topo.add_address(topo.clients[1], topo.links[1].client_if, f"{BAD_SRC}/24")
        H.route_spoofed_back(topo, 1)
        self.nft = H.NftCounters(topo, {
            "in-bad": ("input", f"udp dport {H.PORT} ip saddr {BAD_SRC}"),
            "out-bad": ("output", f"udp sport {H.PORT} ip daddr {BAD_SRC}"),
            "out-c1": ("output", f"udp sport {H.PORT} ip daddr {topo.links[1].client_ip4}"),
            "in-spoof": ("input", f"udp dport {H.PORT} ip saddr {H.SPOOF_NET}"),
            "out-spoof": ("output", f"ip daddr {H.SPOOF_NET}"),
            "out-all": ("output", f"udp sport {H.PORT}"),
        })
        self.server = H.start_vpnd(topo, workdir, clients)
        self._next_driver = 0

    def driver(self) -> H.Driver:
        """A new connected driver session (each with its own authorized key) in c0."""
        key, _ = self.driver_keys[self._next_driver]
        self._next_driver += 1
        link = self.topo.links[0]
        d = H.Driver(self.topo, self.topo.clients[0], self.workdir, self.server, key, link.client_ip4,
                     link.server_ip4, name=f"driver{self._next_driver}")
        r = d.call(cmd="connect")
        assert r["ok"] and r["state"] == "established", (r, self.server.log_tail())
        return d

    def counters(self) -> dict:
        return {k: v["packets"] for k, v in self.nft.read().items()}

    def quiet(self) -> None:
        """Let vpnd's under-load flag fall back (it is computed every 0.25 s tick)."""
        time.sleep(0.6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_root()
    topo = Topology(clients=2)
    try:
        yield World(topo, tmp_path_factory.mktemp("attack-world"))
    finally:
        topo.close()


def _delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before) if after.get(k, 0) != before.get(k, 0)}


# --- replay -----------------------------------------------------------------------------------

def capture(world: World, n: int, rate: float, attempts: int = 2):
    """A driver session that sent n recorded datagrams, every one of which reached vpnd's TUN.

    Loss-free on purpose: a datagram vpnd never saw would be new to it on replay (and rightly
    delivered), so the replay check needs a capture vpnd saw whole. On a busy machine vpnd's socket
    can overflow: then one more try with a new session, at half the rate (bounded).
    """
    topo = world.topo
    tries = []
    for attempt in range(attempts):
        d = world.driver()
        rx0, snmp0 = H.tun_rx_packets(topo), H.udp_snmp(topo, topo.server)
        sent = d.call(cmd="send", n=n, port=9, rate=rate, record=True, tag="orig", timeout=n / rate + 60)
        assert sent["recorded"] == n
        wait_until(lambda: H.tun_rx_packets(topo) - rx0 >= n, 5)
        delivered = H.tun_rx_packets(topo) - rx0
        lost = _delta(H.udp_snmp(topo, topo.server), snmp0).get("RcvbufErrors", 0)
        tries.append({"delivered": delivered, "socket_drops": lost, "rate": rate})
        if delivered == n:
            return d, tries
        d.close()
        rate /= 2
    raise AssertionError(f"no loss-free capture of {n} datagrams: {tries}")


def live_replay(world: World, n: int, rate: float) -> dict:
    """Capture n transport datagrams a real session sent, replay them in order and reversed (same
    socket) and shuffled (a raw socket with the client's address and another port)."""
    topo, srv = world.topo, world.server
    d, tries = capture(world, n, rate)
    try:
        delivered = tries[-1]["delivered"]
        dump = world.workdir / f"recorded-{n}.hex"
        d.call(cmd="dump", path=str(dump), what="recorded")
        drops0, snmp0 = srv.drops(), H.udp_snmp(topo, topo.server)
        rx1 = H.tun_rx_packets(topo)
        d.call(cmd="replay", order="forward", rate=rate, timeout=n / rate + 60)
        d.call(cmd="replay", order="reverse", rate=rate, timeout=n / rate + 60)
        shuffled = world.workdir / f"shuffled-{n}.hex"
        lines = dump.read_text().splitlines()
        random.Random(7).shuffle(lines)
        shuffled.write_text("\n".join(lines) + "\n")
        raw = H.run_tool(topo, topo.clients[0], world.workdir, "replay-raw",
                         {"mode": "send", "dst": [topo.links[0].server_ip4, H.PORT],
                          "src": [topo.links[0].client_ip4, 40001], "file": str(shuffled), "rate": rate,
                          "seconds": n / rate + 30}, timeout=n / rate + 90)
        assert raw["sent"] == n
        time.sleep(0.5)
        replayed_delivered = H.tun_rx_packets(topo) - rx1
        drops = _delta(srv.drops(), drops0)
        snmp = _delta(H.udp_snmp(topo, topo.server), snmp0)
        # the session is untouched: fresh packets still go through, replies still reach the driver's
        # socket (a replay from another port did not move the endpoint)
        rx2 = H.tun_rx_packets(topo)
        assert d.call(cmd="ping", n=3)["replies"] == 3
        fresh = d.call(cmd="send", n=100, port=9, rate=rate)
        assert wait_until(lambda: H.tun_rx_packets(topo) - rx2 >= 103, 5), "the session stopped carrying traffic"
        return {"captured": n, "originals_delivered": delivered, "capture_tries": tries, "replayed": 3 * n,
                "replayed_delivered": replayed_delivered, "replay_drops": drops.get("replay", 0),
                "socket_drops": snmp.get("RcvbufErrors", 0), "other_drops": {k: v for k, v in drops.items() if k != "replay"},
                "fresh_after": fresh["sent"]}
    finally:
        d.close()


def test_live_replay_in_order_reversed_shuffled(world):
    r = live_replay(world, n=10_000, rate=10_000)
    report("live-replay", **r)
    assert r["replayed_delivered"] == 0, r
    # every replayed datagram that reached vpnd's socket is counted as a replay drop
    assert r["replay_drops"] + r["socket_drops"] >= r["replayed"], r
    # most were vpnd's to refuse (the 98 % figure, a rate the socket keeps up with, is in make soak)
    assert r["replay_drops"] >= 0.5 * r["replayed"], r
    assert world.server.alive()


# --- replayed initiation ----------------------------------------------------------------------

def test_replayed_initiation_changes_nothing(world):
    topo, srv = world.topo, world.server
    world.quiet()
    d = world.driver()
    try:
        before = d.call(cmd="status")
        assert d.call(cmd="ping", n=2)["replies"] == 2
        active0, scan0, drops0, nft0 = srv.active(), srv.gc_scan(), srv.drops(), world.counters()
        # the same first handshake message, again, from the same socket...
        same = d.call(cmd="resend_initiation", wait=1.0)
        # ...and from another address (the attacker's namespace, a raw socket)
        init_file = world.workdir / "initiation.hex"
        d.call(cmd="dump", path=str(init_file), what="initiations")
        other = H.run_tool(topo, topo.clients[1], world.workdir, "init-replay",
                           {"mode": "send", "dst": [topo.links[1].server_ip4, H.PORT],
                            "src": [topo.links[1].client_ip4, 40002], "file": str(init_file), "rate": 100})
        assert other["sent"] == 1
        time.sleep(1.0)
        after = d.call(cmd="status")
        drops, nft = _delta(srv.drops(), drops0), _delta(world.counters(), nft0)
        scan = srv.gc_scan()
        replies = d.call(cmd="ping", n=3)["replies"]
        report("replayed-initiation", replays_sent=2, initiation_replay_drops=drops.get("initiation-replay", 0),
               responses_to_driver=same["received"].get("2", 0), replies_to_other_source=nft.get("out-c1", 0),
               active_before=active0, active_after=srv.active(), peers=(scan0["peers"], scan["peers"]),
               keypairs=(scan0["keypairs"], scan["keypairs"]),
               handshake_unchanged=after["last_handshake"] == before["last_handshake"], pings_after=replies)
        assert drops.get("initiation-replay", 0) == 2, drops
        assert same["received"].get("2", 0) == 0, same          # no handshake response
        assert nft.get("out-c1", 0) == 0, nft                   # nothing to the other source
        assert srv.active() == active0
        assert (scan["peers"], scan["keypairs"]) == (scan0["peers"], scan0["keypairs"]), (scan0, scan)
        # the client's view: the same handshake (same time, same indices), traffic continues
        assert after["last_handshake"] == before["last_handshake"]
        assert (after["local_index"], after["server_index"]) == (before["local_index"], before["server_index"])
        assert after["handshake_age_s"] > before["handshake_age_s"]
        assert replies == 3
        assert after["initiations_sent"] == 1
    finally:
        d.close()


# --- bad keys ---------------------------------------------------------------------------------

def crafted_initiation(server_public: bytes, static_private: bytes, *, e_pub: bytes | None = None,
                       s_pub: bytes | None = None, es: bytes | None = None, ss: bytes | None = None,
                       index: int = 1) -> bytes:
    """An initiation written step by step (SPEC §4), with any ephemeral/static public key in it.

    For a low-order key the DH results the attacker puts in (`es`/`ss` = 32 zero bytes) are exactly
    what a server that skipped the low-order check would compute, so without the check such a
    message would decrypt: only the check stops it. With honest values it is a valid initiation.
    """
    e_priv = bytearray(os.urandom(32))
    e_priv[0] &= 248
    e_priv[31] = (e_priv[31] & 127) | 64
    e_pub = e_pub if e_pub is not None else public_key(e_priv)
    s_pub = s_pub if s_pub is not None else public_key(static_private)
    sym = SymmetricState(CONSTRUCTION)
    sym.mix_hash(IDENTIFIER)
    sym.mix_hash(server_public)                                # pre-message <- s
    sym.mix_hash(e_pub)                                        # e (and MixKey(e.pub): psk mode)
    sym.mix_key(e_pub)
    sym.mix_key(es if es is not None else dh(e_priv, server_public))          # es
    enc_static = sym.encrypt_and_hash(s_pub)                                  # s
    sym.mix_key(ss if ss is not None else dh(static_private, server_public))  # ss
    enc_time = sym.encrypt_and_hash(tai64n(time.time()))
    return CookieGenerator(server_public).add_macs(pack_initiation(index, e_pub + enc_static + enc_time)[:-32], 0.0)


def with_mac1(server_public: bytes, body: bytes) -> bytes:
    return body + mac(mac1_key(server_public), body) + bytes(MAC_LEN)


def bad_key_initiations(server_public: bytes, static_private: bytes) -> dict[str, list[bytes]]:
    zero32 = bytes(32)
    ff = b"\xff" * 32
    low = LOW_ORDER_POINTS + [zero32]          # all-zero is the first low-order point; named again
    good = crafted_initiation(server_public, static_private)
    return {
        "dh": [crafted_initiation(server_public, static_private, e_pub=p, es=zero32) for p in low]
        + [crafted_initiation(server_public, static_private, s_pub=p, ss=zero32) for p in low],
        "aead": [crafted_initiation(server_public, static_private, e_pub=ff, es=zero32),
                 crafted_initiation(server_public, static_private, s_pub=ff, ss=zero32)],
        "length": [with_mac1(server_public, good[:n - 32]) for n in (33, 64, 147)]
        + [with_mac1(server_public, good[:116] + bytes(k)) for k in (1, 16, 900)],
    }


def test_bad_keys_live(world):
    topo, srv = world.topo, world.server
    world.quiet()
    static_private, _ = world.attacker_key
    cases = bad_key_initiations(srv.public, static_private)
    assert all(len(m) == INITIATION_LEN for m in cases["dh"] + cases["aead"])
    path = world.workdir / "bad-keys.hex"
    msgs = [m for ms in cases.values() for m in ms]
    path.write_text("".join(m.hex() + "\n" for m in msgs))
    active0, scan0, drops0, nft0 = srv.active(), srv.gc_scan(), srv.drops(), world.counters()
    sent = H.run_tool(topo, topo.clients[1], world.workdir, "bad-keys",
                      {"mode": "send", "dst": [topo.links[1].server_ip4, H.PORT], "src": [BAD_SRC, 40066],
                       "file": str(path), "rate": 200})
    time.sleep(0.8)
    drops, nft, scan = _delta(srv.drops(), drops0), _delta(world.counters(), nft0), srv.gc_scan()
    # control: the same builder with honest keys makes an initiation vpnd answers
    good = crafted_initiation(srv.public, static_private)
    good_path = world.workdir / "good.hex"
    good_path.write_text(good.hex() + "\n")
    H.run_tool(topo, topo.clients[1], world.workdir, "good-key",
               {"mode": "send", "dst": [topo.links[1].server_ip4, H.PORT], "src": [topo.links[1].client_ip4, 40067],
                "file": str(good_path), "rate": 100})
    assert wait_until(lambda: _delta(world.counters(), nft0).get("out-c1", 0) >= 1, 3), "the control got no reply"
    report("bad-keys", sent=sent["sent"], arrived=nft.get("in-bad", 0), replies=nft.get("out-bad", 0),
           drops=drops, peers=(scan0["peers"], scan["peers"]), control_replies=_delta(world.counters(), nft0).get("out-c1"))
    assert sent["sent"] == len(msgs) and nft.get("in-bad", 0) == len(msgs), (sent, nft)
    assert nft.get("out-bad", 0) == 0, nft                       # no reply, not a byte
    assert drops == {k: len(v) for k, v in cases.items()}, drops  # each refused for its reason, nothing else
    assert srv.active() == active0 and scan["peers"] == scan0["peers"] and scan["keypairs"] == scan0["keypairs"]
    assert srv.alive()


# --- junk flood -------------------------------------------------------------------------------

def junk_flood(world: World, seconds: float, rate: float) -> dict:
    topo, srv = world.topo, world.server
    d = world.driver()
    try:
        world.quiet()
        active0, scan0, drops0, nft0 = srv.active(), srv.gc_scan(), srv.drops(), world.counters()
        rss0 = srv.rss_kib()
        snmp0 = H.udp_snmp(topo, topo.server)
        r = H.run_tool(topo, topo.clients[1], world.workdir, "junk",
                       {"mode": "junk", "dst": [topo.links[1].server_ip4, H.PORT], "src_net": H.SPOOF_NET,
                        "rate": rate, "seconds": seconds}, timeout=seconds + 60)
        time.sleep(1.0)
        drops, nft, scan = _delta(srv.drops(), drops0), _delta(world.counters(), nft0), srv.gc_scan()
        snmp = _delta(H.udp_snmp(topo, topo.server), snmp0)
        pings = d.call(cmd="ping", n=3)["replies"]
        return {"sent": r["sent"], "rate": r["rate"], "arrived": nft.get("in-spoof", 0),
                "processed": snmp.get("InDatagrams", 0), "socket_drops": snmp.get("RcvbufErrors", 0),
                "mac1_drops": drops.get("mac1", 0), "other_drops": {k: v for k, v in drops.items() if k != "mac1"},
                "replies": nft.get("out-spoof", 0), "active": (active0, srv.active()),
                "peers": (scan0["peers"], scan["peers"]), "keypairs": (scan0["keypairs"], scan["keypairs"]),
                "rss_growth_kib": srv.rss_kib() - rss0, "pings_after": pings}
    finally:
        d.close()


def check_junk(r: dict, world: World) -> None:
    # the mechanism; how much of 40,000/s arrives (90 %) is a figure of the machine, in make soak
    assert r["arrived"] > 0 and r["processed"] > 0, r
    assert r["replies"] == 0, r                               # not one packet back to a spoofed source
    assert r["mac1_drops"] > 0 and r["mac1_drops"] >= r["processed"] - 50, r   # all of it refused at mac1
    assert r["active"][0] == r["active"][1], r
    assert r["peers"][0] == r["peers"][1] and r["keypairs"][0] == r["keypairs"][1], r   # no state kept
    assert r["pings_after"] == 3 and world.server.alive(), r


def test_junk_flood_bad_mac1(world):
    r = junk_flood(world, seconds=3, rate=40_000)
    report("junk-flood", **r)
    check_junk(r, world)


# --- socket errors, without root: the pump counts them, never raises ----------------------------

class _FailingSocket:
    def __init__(self, code: int):
        self.code = code
        self.calls = 0

    def setsockopt(self, *args):
        raise OSError(errno.ENOPROTOOPT, "no")

    def _fail(self, *args, **kw):
        self.calls += 1
        raise OSError(self.code, os.strerror(self.code))

    send = sendto = sendmsg = recvmsg = _fail


@pytest.mark.parametrize("code", [errno.ENOBUFS, errno.EPERM, errno.ECONNREFUSED, errno.EAGAIN, errno.EMSGSIZE])
def test_pump_counts_socket_errors(code):
    sock = _FailingSocket(code)
    udp = Udp(sock)
    udp.send([b"x" * 100], ("198.18.0.2", 1))
    udp.send([b"y" * 1452] * 5 + [b"z" * 100], ("198.18.0.2", 1))   # a fragment train (GSO path)
    udp.send([b"y" * 1452] * 3)
    assert udp.errors >= 3, udp.errors
    sent_errors = udp.errors
    out = udp.recv_batch(8)          # EAGAIN ends a batch; any other error is counted and skipped
    assert out == []
    assert udp.errors - sent_errors == (0 if code == errno.EAGAIN else 8)


# --- vpnd, real clients, and an attacker namespace --------------------------------------------

class Site:
    """vpnd (the test harness: hooks, `fault_rate`) with `real` real vpnclients in c0..c{real-1}; the
    last namespace is the attacker's (spoofed sources routed back to it)."""

    def __init__(self, topo: Topology, workdir: Path, real: int, env: dict | None = None, extra: str = "",
                 drivers: int = 1, fault_rate: float = 0.0):
        self.topo, self.workdir = topo, workdir
        self.attacker = len(topo.clients) - 1
        self.client_keys = [vpn.genkeys() for _ in range(real + 1)]      # one spare for a late client
        self.driver_keys = [H.raw_keypair() for _ in range(drivers)]
        H.route_spoofed_back(topo, self.attacker)
        self.server = H.start_vpnd(topo, workdir, self.client_keys + [H.keys_from_raw(*k) for k in self.driver_keys],
                                   fault_rate=fault_rate, env=env, extra=extra)
        self.clients = []
        for i in range(real):
            c = self.client(i, i)
            vpn.wait_connected(topo, c, timeout=15)
            self.clients.append(c)

    def client(self, ns_index: int, key_index: int) -> vpn.Daemon:
        link = self.topo.links[ns_index]
        return H.start_real_client(self.topo, self.topo.clients[ns_index], self.workdir, self.client_keys[key_index],
                                   self.server, f"{link.server_ip4}:{H.PORT}", name=f"client{key_index}")

    def attacker_link(self):
        return self.topo.links[self.attacker]

    def driver(self, i: int = 0) -> H.Driver:
        link = self.attacker_link()
        d = H.Driver(self.topo, self.topo.clients[self.attacker], self.workdir, self.server, self.driver_keys[i][0],
                     link.client_ip4, link.server_ip4, name=f"site-driver{i}")
        assert d.call(cmd="connect")["ok"], self.server.log_tail()
        return d


# --- fuzz against the running server ------------------------------------------------------------

def live_fuzz(site: Site, count: int, rate: float) -> dict:
    """`count` random and mutated datagrams from spoofed sources while client 0 transfers data."""
    topo, srv = site.topo, site.server
    wd = site.workdir
    # a corpus of real datagrams: a driver session's (initiation, hello, data of many sizes) ...
    d = site.driver()
    for size in (0, 20, 100, 600, 1300):
        d.call(cmd="send", n=20, port=9, rate=1000, size=size)
    driver_corpus = wd / "driver-corpus.hex"
    d.call(cmd="dump", path=str(driver_corpus), what="corpus")
    driver_index = d.call(cmd="status")["server_index"]
    H.Transfer(topo, topo.clients[0], wd, 20 << 20, 5301, 1).start().finish()     # warm up
    seconds = count / rate
    mb_s = 12e6
    transfer = H.Transfer(topo, topo.clients[0], wd, int(mb_s * (seconds + 3)), 5302, 2, rate=mb_s).start()
    # ... and the real client's (its super-packet fragments), with the receiver index of its session
    sniffed = wd / "sniffed.hex"
    sn = H.run_tool(topo, topo.server, wd, "sniff", {"mode": "sniff", "ifname": topo.links[0].server_if,
                                                     "from_host": topo.links[0].client_ip4, "dport": H.PORT,
                                                     "count": 60, "seconds": 10, "file": str(sniffed)})
    assert sn["indices"], sn
    time.sleep(0.5)
    rss0, drops0, snmp0 = srv.rss_kib(), srv.drops(), H.udp_snmp(topo, topo.server)
    link = site.attacker_link()
    fz = H.run_tool(topo, topo.clients[site.attacker], wd, "fuzz",
                    {"mode": "fuzz", "dst": [link.server_ip4, H.PORT], "src_net": H.SPOOF_NET,
                     "files": [str(driver_corpus), str(sniffed)], "indices": sn["indices"] + [driver_index],
                     "server_public": srv.public.hex(), "count": count, "rate": rate, "pool": 50_000,
                     "seconds": seconds * 3 + 60, "seed": 11}, timeout=seconds * 3 + 120)
    alive_during = srv.alive()
    result = transfer.finish(timeout=seconds * 3 + 120)
    time.sleep(1.0)
    rss1 = srv.rss_kib()
    drops = _delta(srv.drops(), drops0)
    snmp = _delta(H.udp_snmp(topo, topo.server), snmp0)
    pings = d.call(cmd="ping", n=3)["replies"]
    r = vpn.ping(topo, topo.clients[0], H.SERVER_TUN4, count=3)
    d.close()
    return {"sent": fz["sent"], "distinct": fz["distinct"], "rate": fz["rate"], "corpus": sn["captured"],
            "live_indices": len(sn["indices"]) + 1, "received_by_socket": snmp.get("InDatagrams", 0),
            "socket_drops": snmp.get("RcvbufErrors", 0), "drops_by_reason": drops,
            "transfer_bytes": result["bytes"], "transfer_mbit_s": result["mbit_s"], "checksum_ok": True,
            "rss_before_kib": rss0, "rss_after_kib": rss1, "rss_growth_kib": rss1 - rss0,
            "alive": alive_during and srv.alive(), "driver_pings_after": pings,
            "client_pings_after": r.stdout.count("bytes from")}


@pytest.fixture
def fuzz_site(tmp_path):
    require_root()
    topo = Topology(clients=2)
    try:
        yield Site(topo, tmp_path, real=1)
    finally:
        topo.close()


def check_fuzz(r: dict) -> None:
    assert r["alive"], r
    assert r["checksum_ok"] and r["transfer_bytes"] > 0
    assert r["rss_growth_kib"] < 10 * 1024, r
    # vpnd really parsed them: a good part reached its socket and was dropped for a reason (the
    # tighter figure, half of 20,000/s, depends on the machine keeping up: make soak)
    assert r["received_by_socket"] >= 0.2 * r["sent"], r
    assert sum(r["drops_by_reason"].values()) >= 0.2 * r["sent"], r
    assert "internal-error" not in r["drops_by_reason"], r      # every parser failed cleanly
    assert r["driver_pings_after"] == 3 and r["client_pings_after"] == 3, r


def test_fuzz_live_200k_datagrams(fuzz_site):
    r = live_fuzz(fuzz_site, count=200_000, rate=20_000)
    report("live-fuzz", **r)
    check_fuzz(r)


# --- containment: injected faults and EPERM on every send ---------------------------------------

def containment(site: Site, total: int, block_s: float, cycles: int = 1) -> dict:
    topo, srv = site.topo, site.server
    wd = site.workdir
    drops0 = srv.drops()
    transfers = [H.Transfer(topo, topo.clients[i], wd, total, 5400 + i, 40 + i).start() for i in range(2)]
    results = [t.finish(timeout=300) for t in transfers]
    faults = _delta(srv.drops(), drops0).get("internal-error", 0)
    assert srv.alive(), srv.log_tail()
    refused_total, recovered = 0, []
    for cycle in range(cycles):
        # EPERM: every send vpnd makes is refused for a while, mid-transfer; then the path is back
        rate = 10e6
        t = H.Transfer(topo, topo.clients[0], wd, int(rate * (block_s + 3)), 5500 + cycle, 50 + cycle, rate=rate).start()
        time.sleep(1.0)
        H.block_server_output(topo)
        try:
            time.sleep(block_s)
        finally:
            refused = H.unblock_server_output(topo)
        refused_total += refused
        t0 = time.monotonic()
        ok = all(vpn.ping(topo, topo.clients[i], H.SERVER_TUN4, count=1, wait=2).returncode == 0 for i in range(2))
        recovered.append(round(time.monotonic() - t0, 2))
        assert ok, "a session did not recover after the EPERM period"
        results.append(t.finish(timeout=120))
        assert refused > 0, "the block refused nothing: vpnd sent nothing while it was on"
    return {"transfers": len(results), "bytes_each": total, "mbit_s": [r["mbit_s"] for r in results],
            "checksums_ok": True, "internal_errors": faults, "eperm_refused_sends": refused_total,
            "eperm_seconds": block_s, "cycles": cycles, "recovered_in_s": recovered,
            "alive": srv.alive(), "active_sessions": srv.active()}


@pytest.fixture
def fault_site(tmp_path):
    require_root()
    topo = Topology(clients=3)
    try:
        yield Site(topo, tmp_path, real=2, fault_rate=0.001)
    finally:
        topo.close()


def check_containment(r: dict) -> None:
    assert r["alive"] and r["checksums_ok"], r
    assert r["internal_errors"] > 0, r        # faults were injected, counted, contained
    assert r["eperm_refused_sends"] > 0, r
    assert r["active_sessions"] == 2, r


def test_containment_faults_and_eperm(fault_site):
    r = containment(fault_site, total=50 << 20, block_s=2.0)
    report("containment", **r)
    check_containment(r)


# --- handshake flood ---------------------------------------------------------------------------

def handshake_flood(site: Site, rate: float, measure_s: float, connect_wait: float, iperf_args=()) -> dict:
    """Baseline TCP throughput of client 0; the same under a flood of valid-mac1 initiations from
    spoofed sources; a checksummed transfer and a new client's connection during the flood."""
    topo, srv = site.topo, site.server
    wd = site.workdir
    iperf = H.Iperf(topo)
    # warm-up: a cold first baseline (a fresh TCP connection's first seconds, the processes' first
    # packets) would understate the throughput the flood is compared with
    iperf.run(topo.clients[0], 4, *iperf_args)
    base1 = H.Iperf.tcp_mbit(iperf.run(topo.clients[0], measure_s, *iperf_args))
    drops0 = srv.drops()
    link = site.attacker_link()
    flood_s = 1 + measure_s + connect_wait + 120      # a bound: stopped once the measurements are done
    flood = H.start_tool(topo, topo.clients[site.attacker], wd, "hsflood",
                         {"mode": "hsflood", "dst": [link.server_ip4, H.PORT], "src_net": H.SPOOF_NET,
                          "server_public": srv.public.hex(), "rate": rate, "seconds": flood_s})
    try:
        time.sleep(1.0)
        active_flooded = srv.active()          # one client, and no session from the flood
        under = H.Iperf.tcp_mbit(iperf.run(topo.clients[0], measure_s, *iperf_args))
        # then, still under the flood, a new legitimate client (its own namespace) connects; a thread
        # notes when it is up (status polled every 0.1 s). Not during the throughput measurement:
        # starting a client process (interpreter, TUN, routes) costs CPU that is not the flood's.
        late = site.client(1, len(site.client_keys) - 1)
        watch = H.ConnectWatch(topo, late, limit=connect_wait)
        connected_in = watch.join()
        checked = H.Transfer(topo, topo.clients[0], wd, 20 << 20, 5601, 61).start().finish(timeout=120)
        flood_alive = flood.poll() is None
        during = _delta(srv.drops(), drops0)
    finally:
        fl = H.stop_tool(flood)
    connected_late = connected_in
    if connected_in is None:     # does it get in once the flood is over? (bounded)
        again = H.ConnectWatch(topo, late, limit=15)
        if again.join() is not None:
            connected_late = round(again.t0 + again.connected_s - watch.t0, 2)
    base2 = H.Iperf.tcp_mbit(iperf.run(topo.clients[0], measure_s, *iperf_args))
    iperf.stop()
    baseline = (base1 + base2) / 2
    return {"iperf_args": " ".join(iperf_args) or "uncapped", "flood_rate": fl["rate"], "flood_sent": fl["sent"], "flood_outlived_measurement": flood_alive,
            "cookie_sent": during.get("cookie-sent", 0), "unknown_key": during.get("unknown-key", 0),
            "baseline_mbit_s": [round(base1), round(base2)], "under_flood_mbit_s": round(under),
            "kept": round(under / baseline, 3), "checked_transfer_mbit_s": checked["mbit_s"],
            "new_client_connected_s": connected_in, "new_client_connected_eventually_s": connected_late,
            "new_client_last_status": {k: watch.last.get(k) for k in ("state", "addresses", "handshake_age_s", "drops")},
            "active_under_flood": active_flooded, "active_at_end": srv.active(), "alive": srv.alive()}


@pytest.fixture(scope="module")
def flood_run(tmp_path_factory):
    require_root()
    topo = Topology(clients=3)
    try:
        site = Site(topo, tmp_path_factory.mktemp("hsflood"), real=1)
        r = handshake_flood(site, rate=21_000, measure_s=6, connect_wait=15)
        report("handshake-flood", **r)
        yield r
    finally:
        topo.close()


# make test asserts the mechanism; the figures (the generator's 20,000/s, 70 % kept, a new client in
# 5 s) depend on what else the machine runs and are asserted in tests/soak/test_soak.py (make soak).
FLOOD_RATE_FLOOR = 2_000        # well above "under load" (64 initiations per 0.25 s tick = 256/s)
KEPT_FLOOR = 0.1                # the existing client still transfers (measured 0.74-0.80; soak: 0.70)


def test_handshake_flood_engages_cookies(flood_run):
    r = flood_run
    assert r["flood_rate"] >= FLOOD_RATE_FLOOR and r["flood_outlived_measurement"], r
    assert r["cookie_sent"] > 0, r            # the cookie mechanism engaged
    # no DH for the flood once under load: at most what arrives before the first 0.25 s tick
    assert r["unknown_key"] < 0.1 * r["flood_sent"], r
    assert r["active_under_flood"] == 1 and r["alive"], r    # the flood made no session; the server is up
    # the new client did get in (how fast is the next test), and nothing else did
    assert r["new_client_connected_eventually_s"] is not None and r["active_at_end"] == 2, r


def test_handshake_flood_existing_client_still_transfers(flood_run):
    r = flood_run
    assert r["under_flood_mbit_s"] > 0 and r["kept"] >= KEPT_FLOOR, r
    assert r["checked_transfer_mbit_s"] > 0, r      # and a checksummed transfer went through


def test_handshake_flood_new_client_connects_during_flood(flood_run):
    # within connect_wait (15 s) while the flood runs (measured 0.23-0.48 s; soak: 5 s)
    r = flood_run
    assert r["new_client_connected_s"] is not None, r


# --- a lost hello (found by the handshake flood: socket loss there ate a new client's hello) -----

def lost_hello(tmp_path: Path) -> dict:
    """The client's hello dropped (nft rule in its namespace) until it was sent once; then the rule
    goes and a watch notes when the config has arrived."""
    require_root()
    topo = Topology(clients=1)
    try:
        keys = vpn.genkeys()
        srv = H.start_vpnd(topo, tmp_path, [keys])
        # in the client namespace: drop transport messages of kind 1 (control) for a moment
        rule = (f"table inet vpnattk_hello {{\n chain output {{\n type filter hook output priority -300; "
                f"policy accept;\n udp dport {H.PORT} @th,64,16 0x0401 counter drop\n }}\n}}\n")
        r = subprocess.run(["ip", "netns", "exec", topo.client, "nft", "-f", "-"], input=rule, text=True,
                           capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr

        def dropped() -> int:
            out = json.loads(topo.run(topo.client, "nft", "-j", "list", "table", "inet", "vpnattk_hello").stdout)
            return sum(e["counter"]["packets"] for i in out["nftables"] if "rule" in i
                       for e in i["rule"]["expr"] if "counter" in e)
        client = H.start_real_client(topo, topo.client, tmp_path, keys, srv, f"{topo.link.server_ip4}:{H.PORT}",
                                     "client0")
        assert wait_until(lambda: dropped() >= 1, 15), "the hello was never sent"
        lost = dropped()
        topo.run(topo.client, "nft", "delete", "table", "inet", "vpnattk_hello")
        watch = H.ConnectWatch(topo, client, limit=10)
        connected = watch.join()
        r = {"hellos_dropped": lost, "config_within_10s_after": connected,
             "last_status": {k: watch.last.get(k) for k in ("state", "addresses", "handshake_age_s")}}
        report("lost-hello", **r)
        return r
    finally:
        topo.close()


def test_lost_hello_client_still_gets_its_config(tmp_path):
    # the hello is sent again every HELLO_RETRY_TIMEOUT (1 s) until a config arrives: the config comes
    # within the watch's 10 s, not at the rekey (120 s). Measured 1.05 s; make soak asserts 3 s.
    r = lost_hello(tmp_path)
    assert r["config_within_10s_after"] is not None, r
