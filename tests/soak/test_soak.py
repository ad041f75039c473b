"""Long versions of the attack and fault tests, bounded memory, and the figures (issue 7, part A;
issue 13, part 5; `make soak`).

Same scenarios as tests/e2e/test_attacks.py with more packets and longer floods, plus the bounded
memory test: twice the sustainable load for 60 s against a vpnd whose memory_limit_mb is 96. The
rate and throughput thresholds a busy machine can miss without a defect live here, not in
`make test` (which asserts the mechanisms): the flood generator's 20,000/s, 70 % of the baseline
kept under the flood, a new client in 5 s, 90 % of the junk flood arriving, the ±20 % bandwidth cap,
the lost hello's config in 3 s. Every test prints its figures (FIGURES lines, pytest -s).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e import attack_harness as H
from tests.e2e import test_accounts_e2e as A
from tests.e2e import vpn
from tests.e2e.netns import Topology, require_root
from tests.e2e.test_attacks import (
    Site, World, check_containment, check_fuzz, check_junk, containment, handshake_flood, junk_flood, live_fuzz,
    live_replay, lost_hello, report,
)

pytestmark = pytest.mark.netns

net1 = A.net1                              # the bandwidth cap's fixture (workdir: tests/conftest.py)

MEMORY_LIMIT_MB = 96


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_root()
    topo = Topology(clients=2)
    try:
        yield World(topo, tmp_path_factory.mktemp("soak-world"))
    finally:
        topo.close()


def test_soak_live_replay_100k(world):
    r = live_replay(world, n=100_000, rate=10_000)
    report("soak-live-replay", **r)
    assert r["replayed_delivered"] == 0, r
    assert r["replay_drops"] + r["socket_drops"] >= r["replayed"], r
    assert r["replay_drops"] >= 0.98 * r["replayed"], r


def test_soak_junk_flood_30s(world):
    r = junk_flood(world, seconds=30, rate=40_000)
    report("soak-junk-flood", **r)
    check_junk(r, world)
    assert r["arrived"] >= 0.9 * r["sent"], r
    assert r["rss_growth_kib"] < 2 * 1024, r


def test_soak_junk_flood_3s_90_percent_arrive(world):
    """The make-test junk flood (3 s at 40,000/s), with its figure: 90 % arrive."""
    r = junk_flood(world, seconds=3, rate=40_000)
    report("soak-junk-flood-3s", **r)
    check_junk(r, world)
    assert r["arrived"] >= 0.9 * r["sent"], r


@pytest.fixture
def site1(tmp_path):
    require_root()
    topo = Topology(clients=2)
    try:
        yield Site(topo, tmp_path, real=1)
    finally:
        topo.close()


def test_soak_fuzz_1m_datagrams(site1):
    r = live_fuzz(site1, count=1_000_000, rate=20_000)
    report("soak-live-fuzz", **r)
    check_fuzz(r)
    # most reached vpnd's socket and were dropped for a reason (make test: a fifth)
    assert r["received_by_socket"] >= 0.5 * r["sent"], r
    assert sum(r["drops_by_reason"].values()) >= 0.5 * r["sent"], r


@pytest.fixture
def fault_site(tmp_path):
    require_root()
    topo = Topology(clients=3)
    try:
        yield Site(topo, tmp_path, real=2, fault_rate=0.001)
    finally:
        topo.close()


def test_soak_containment(fault_site):
    r = containment(fault_site, total=200 << 20, block_s=3.0, cycles=3)
    report("soak-containment", **r)
    check_containment(r)


@pytest.fixture(scope="module")
def soak_flood(tmp_path_factory):
    require_root()
    out = {}
    for args in ((), ("-b", "200M")):
        topo = Topology(clients=3)
        try:
            site = Site(topo, tmp_path_factory.mktemp("soak-hsflood"), real=1)
            r = handshake_flood(site, rate=21_000, measure_s=10, connect_wait=20, iperf_args=args)
            report(f"soak-handshake-flood-{r['iperf_args'].replace(' ', '')}", **r)
            out[r["iperf_args"]] = r
        finally:
            topo.close()
    return out


def test_soak_handshake_flood_engages_cookies(soak_flood):
    for r in soak_flood.values():
        assert r["flood_rate"] >= 20_000 and r["cookie_sent"] > 0, r      # the generator kept its rate
        assert r["unknown_key"] < 0.1 * r["flood_sent"], r
        assert r["active_under_flood"] == 1 and r["alive"], r
        assert r["new_client_connected_eventually_s"] is not None and r["active_at_end"] == 2, r


def test_soak_handshake_flood_keeps_70_percent(soak_flood):
    """make test (tests/e2e/test_attacks.py) asserts the client still transfers; here, how much."""
    assert soak_flood["uncapped"]["kept"] >= 0.70, soak_flood


def test_soak_handshake_flood_new_client_within_5s(soak_flood):
    assert all(r["new_client_connected_s"] is not None and r["new_client_connected_s"] <= 5
               for r in soak_flood.values()), soak_flood


def test_soak_lost_hello_config_within_3s(tmp_path):
    """Hello re-sent every 1 s: the config within 3 s of the drop rule's removal (make test: 10 s)."""
    r = lost_hello(tmp_path)
    assert r["config_within_10s_after"] is not None and r["config_within_10s_after"] <= 3.0, r


# --- bandwidth cap -----------------------------------------------------------------------------

def test_soak_bandwidth_cap_within_20_percent(net1, workdir):
    """make test (tests/e2e/test_accounts_e2e.py) asserts the cap is enforced; here, how closely."""
    r = A.bandwidth_cap(net1, workdir)
    report("soak-bandwidth-cap", **r)
    cap, tol = A.CAP, A.CAP_TOLERANCE
    assert abs(r["median_up"] - cap) <= tol * cap, r
    assert abs(r["median_down"] - cap) <= tol * cap, r


# --- bounded memory -----------------------------------------------------------------------------

def _tun_counters(topo, ns: str, ifname: str) -> dict:
    r = topo.run(ns, "ip", "-s", "-j", "link", "show", "dev", ifname)
    st = json.loads(r.stdout)[0]["stats64"]
    return {"rx": st["rx"]["packets"], "tx": st["tx"]["packets"], "dropped": st["tx"]["dropped"] + st["rx"]["dropped"]}


def _blast(site, ns: str, name: str, src: str, dst: str, seconds: float):
    """Unlimited-rate UDP (1,300-byte datagrams) from `src` to `dst`, through the tunnel."""
    return H.start_tool(site.topo, ns, site.workdir, name, {"mode": "blast", "src": [src, 40100], "dst": [dst, 9],
                                                          "size": 1300, "rate": 0, "seconds": seconds})


@pytest.fixture
def capped_site(tmp_path):
    require_root()
    topo = Topology(clients=2)
    try:
        yield Site(topo, tmp_path, real=1, extra=f"memory_limit_mb = {MEMORY_LIMIT_MB}\n")
    finally:
        topo.close()


def test_soak_bounded_memory_twice_sustainable_load_60s(capped_site):
    """Twice the sustainable load (and more) for 60 s, with memory_limit_mb = 96: VmRSS sampled every
    second stays under the cap; the excess is dropped and counted (kernel counters at vpnd's socket
    and TUN, vpnd's own drop counters)."""
    site = capped_site
    topo, srv = site.topo, site.server
    c0, client_ip = topo.clients[0], "198.19.0.2"
    assert vpn.status(topo, site.clients[0])["addresses"][0].startswith(client_ip + "/")
    # the sustainable load: what one unlimited stream gets through vpnd into its TUN, alone
    t0 = _tun_counters(topo, topo.server, vpn.SERVER_IF)
    alone = H.tool_result(_blast(site, c0, "blast-alone", client_ip, H.SERVER_TUN4, 5), timeout=60)
    time.sleep(0.5)
    sustainable_pps = (_tun_counters(topo, topo.server, vpn.SERVER_IF)["rx"] - t0["rx"]) / alone["seconds"]
    seconds = 60
    drops0, snmp0 = srv.drops(), H.udp_snmp(topo, topo.server)
    srv_tun0, cli_tun0 = _tun_counters(topo, topo.server, vpn.SERVER_IF), _tun_counters(topo, c0, "vpn0")
    link = site.attacker_link()
    load = [_blast(site, c0, "blast-in-1", client_ip, H.SERVER_TUN4, seconds),
            _blast(site, c0, "blast-in-2", client_ip, H.SERVER_TUN4, seconds),
            _blast(site, topo.server, "blast-out", H.SERVER_TUN4, client_ip, seconds),   # through vpnd's TUN
            H.start_tool(topo, topo.clients[site.attacker], site.workdir, "mem-flood",
                         {"mode": "hsflood", "dst": [link.server_ip4, H.PORT], "src_net": H.SPOOF_NET,
                          "server_public": srv.public.hex(), "rate": 21_000, "seconds": seconds})]
    samples = []
    deadline = time.monotonic() + seconds + 30
    while any(p.poll() is None for p in load) and time.monotonic() < deadline:
        samples.append(srv.rss_kib())
        time.sleep(1.0)
    results = [H.tool_result(p, timeout=60) for p in load]
    time.sleep(1.0)
    after = srv.drops()
    drops = {k: after.get(k, 0) - drops0.get(k, 0) for k in after if after.get(k, 0) != drops0.get(k, 0)}
    snmp = H.udp_snmp(topo, topo.server)
    socket_drops = snmp["RcvbufErrors"] - snmp0["RcvbufErrors"]
    srv_tun, cli_tun = _tun_counters(topo, topo.server, vpn.SERVER_IF), _tun_counters(topo, c0, "vpn0")
    offered_in = sum(r["sent"] for r in results[:2])
    offered_out = results[2]["sent"]
    delivered_in = srv_tun["rx"] - srv_tun0["rx"]
    delivered_out = cli_tun["rx"] - cli_tun0["rx"]
    offered_pps = (offered_in + offered_out + results[3]["sent"]) / seconds
    r = {"memory_limit_mb": MEMORY_LIMIT_MB, "seconds": seconds, "samples": len(samples),
         "rss_max_kib": max(samples), "rss_min_kib": min(samples),
         "sustainable_pps": round(sustainable_pps), "offered_pps": round(offered_pps),
         "offered_over_sustainable": round(offered_pps / sustainable_pps, 2),
         "in": [offered_in, delivered_in], "out": [offered_out, delivered_out],
         "flood_sent": results[3]["sent"], "socket_drops": socket_drops,
         "tun_drops": srv_tun["dropped"] - srv_tun0["dropped"], "vpnd_drops": drops, "alive": srv.alive()}
    r["client_pings_after"] = vpn.ping(topo, c0, H.SERVER_TUN4, count=3).stdout.count("bytes from")
    report("soak-bounded-memory", **r)
    assert r["alive"], srv.log_tail()
    assert r["samples"] >= seconds - 5, r
    assert r["offered_over_sustainable"] >= 2, r
    assert r["rss_max_kib"] < MEMORY_LIMIT_MB * 1024, r          # under the cap, every second
    # the excess was dropped, and counted: by the kernel at vpnd's socket and TUN, by vpnd
    assert delivered_in < offered_in and socket_drops + r["tun_drops"] > 0, r
    assert drops.get("cookie-sent", 0) > 0 or drops.get("memory-shed", 0) > 0, r
    assert r["client_pings_after"] == 3, r
