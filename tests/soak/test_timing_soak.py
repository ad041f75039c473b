"""The timing, rate and fraction limits of the resilience, tunnel and failover tests (`make soak`).

tests/e2e/test_resilience.py, test_tunnel.py and test_leaks.py (in `make test`) assert only what must
hold on any machine, with generous bounded deadlines, and print their figures. A busy machine can
miss these figures without a defect, so they are asserted here, on the same scenarios (the functions
those modules export, not a copy):

- roaming with NAT rebinding: no gap over 1 s in the transfer; at least 90 % of the forged datagrams
  reach the server, vpnd drops at least 30 % of them on the tag and 5 % on the replay window; each
  mapping carries at least 20 of the server's datagrams, and under 20 go to a mapping already gone;
- the client's own underlay address replaced: no gap over 1 s;
- NAT keepalive: at least idle / 4 keepalives while idle (one every 2 s expected);
- server kill -9 and restart with 20 clients: every client's ping within 10 s of the restart;
- one client, server restart (test_tunnel): the client's ping within 10 s of the restart;
- spoofed inner sources (test_tunnel): at least 10 of the 20 genuine datagrams arrive;
- failover (test_leaks): TCP through the second server within 10 s of the first's kill -9, and back
  through the first within 10 s of the second's SIGTERM;
- a fleet of three servers on one PostgreSQL (test_fleet): a suspension cuts the account's client
  off on every server within 1 s of the admin command's return (issue 14).

The path MTU limits (no stall, no gap over 1 s) are in test_resilience_soak.py.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e import test_fleet as F
from tests.e2e import test_leaks as L
from tests.e2e import test_resilience as R
from tests.e2e import test_tunnel as T

topos = R.topos                              # the fixtures (workdir: tests/conftest.py)
one, net2, fleet = T.one, L.net2, F.fleet           # (topology, workdir: tests/conftest.py)

pytestmark = pytest.mark.netns

RECOVERY_S = 10
FAILOVER_S = 10


def show(name: str, figures: dict) -> None:
    print(f"\nFIGURES {name}: {json.dumps(figures)}")


def test_roaming_nat_rebinding_strict(topos, workdir):
    f = R.roaming_nat_rebinding(topos, workdir)
    R.record("soak-roaming", **f)
    sent = f["forged_sent"]
    seen, drops = f["forged_arrived"], f["drops"]
    assert f["max_gap_s"] < 1.0, f"a gap of {f['max_gap_s']} s in the transfer"
    assert seen["forged-from-attacker-net"] + seen["forged-as-nat-address"] >= 0.9 * sent, (seen, sent)
    assert drops.get("tag", 0) >= 0.3 * sent, (drops, sent)
    assert drops.get("replay", 0) >= 0.05 * sent, (drops, sent)
    b1, b2, after = f["server_sent_before_rebind1"], f["server_sent_before_rebind2"], f["server_sent"]
    assert b1["map1"] >= 20 and b2["map2"] >= 20 and after["map3"] >= 20, (b1, b2, after)
    assert max(f["leftovers"]) < 20, f["leftovers"]


def test_roaming_client_address_change_strict(topos, workdir):
    f = R.roaming_client_address_change(topos, workdir)
    R.record("soak-roaming-client-address", **f)
    assert f["max_gap_s"] < 1.0, f"a gap of {f['max_gap_s']} s in the transfer"


def test_nat_keepalive_strict(topos, workdir):
    f = R.nat_keepalive(topos, workdir)
    R.record("soak-nat-keepalive", **f)
    assert f["keepalives_sent_while_idle"] >= f["idle_counted_s"] // 4, f   # ~idle / 2 expected


def test_server_restart_20_clients_recover_within_10s(topos, workdir):
    f = R.server_restart_clients(topos, workdir, 20)
    R.record("soak-server-restart", **f)
    slow = {i: r for i, r in enumerate(f["recovery_after_restart_s"]) if r > RECOVERY_S}
    assert not slow, f"clients recovered later than {RECOVERY_S} s after the restart: {slow}"


def test_server_restart_client_recovers_within_10s(one):
    elapsed = T.server_restart_recovery(one)
    show("soak-tunnel-server-restart", {"recovered_after_restart_s": round(elapsed, 2)})
    assert elapsed < RECOVERY_S, f"client recovered {elapsed:.1f} s after the restart (limit {RECOVERY_S} s)"


def test_spoofed_inner_source_nearly_all_genuine_arrive(one):
    f = T.spoofed_inner_source(one)
    show("soak-spoofed-inner-source", f)
    assert f["genuine_arrived"] >= 10, f     # loss-free veth: nearly all of the 20 arrive


def test_failover_within_10s(net2, tmp_path):
    f = L.failover_two_servers(net2, tmp_path)
    show("soak-failover", f)
    assert f["failover_after_kill_s"] < FAILOVER_S, f"TCP through the second server only {f} later"
    assert f["back_after_stop_s"] < FAILOVER_S, f"TCP back through the first only {f} later"


def test_fleet_suspension_within_1s(fleet):
    figures = F.run_fleet(fleet)
    assert max(figures["suspension_ms"]) < 1000, figures
