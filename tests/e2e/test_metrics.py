"""Metrics without logs and `vpnd stats` off the packet loops (issue 18, points 3 and 4).

vpnd runs in a Topology (network namespaces made here) with `metrics_listen` on its loopback; a
real vpnclient carries pings. The endpoint is scraped from inside the server namespace during
traffic: the counters move, the gauge is rounded, and no label holds anything but a fixed
direction, reason or counter name (no account, address, key or port). `vpnd stats` in a loop
during traffic: nftables' counters are read in a worker thread (asserted from the server's own
thread names is not possible from outside, so the test checks the mechanism in-process too).
"""

from __future__ import annotations

import re
import sys
import threading

import pytest
import trio

from tests.e2e import vpn
from tests.e2e.netns import Topology
from tests.e2e.vpn import PORT, SERVER_TUN4

pytestmark = pytest.mark.netns

SCRAPE = ("import sys, urllib.request; "
          "print(urllib.request.urlopen('http://127.0.0.1:9586/metrics', timeout=5).read().decode(), end='')")
LINE = re.compile(r'^(vpnd_[a-z_]+)(\{(direction|reason|counter)="([a-z0-9_-]+)"\})? (\d+)$')


def scrape(topo: Topology) -> dict[str, int]:
    text = topo.run(topo.server, sys.executable, "-c", SCRAPE).stdout
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = LINE.match(line)
        assert m, f"a metrics line of an unexpected shape: {line!r}"
        out[m.group(1) + (f"{{{m.group(4)}}}" if m.group(2) else "")] = int(m.group(5))
    return out


def test_metrics_move_with_traffic_and_carry_no_identity(workdir, topology):
    topo = topology      # (workdir first: it is removed after the topology's processes ended)
    keys, dev = vpn.genkeys(), vpn.genkeys()
    server = vpn.start_server(topo, workdir, keys, [dev], extra='metrics_listen = "127.0.0.1:9586"\n')
    link = topo.links[0]
    client = vpn.start_client(topo, topo.clients[0], workdir, dev, keys.public, f"{link.server_ip4}:{PORT}")
    vpn.wait_connected(topo, client, server=server)
    before = scrape(topo)
    assert vpn.ping(topo, topo.clients[0], SERVER_TUN4, count=5).returncode == 0
    after = scrape(topo)
    print(f"\nmetrics: {after}")
    assert after["vpnd_transport_bytes_total{in}"] > before["vpnd_transport_bytes_total{in}"]
    assert after["vpnd_transport_bytes_total{out}"] > before["vpnd_transport_bytes_total{out}"]
    assert after["vpnd_sessions_started_total"] >= 1
    assert after["vpnd_sessions_active"] % 10 == 0            # 1 live session reads as 0: rounded
    text = topo.run(topo.server, sys.executable, "-c", SCRAPE).stdout
    for secret in (link.client_ip4, link.client_ip6, dev.public, keys.public, str(PORT)):
        assert secret not in text, secret
    # anything but GET /metrics: 404, and the endpoint is on the server's loopback only
    r = topo.run(topo.server, sys.executable, "-c",
                 "import urllib.request, urllib.error\ntry:\n urllib.request.urlopen('http://127.0.0.1:9586/x')\n"
                 "except urllib.error.HTTPError as e:\n print(e.code)", check=False)
    assert r.stdout.strip() == "404", r.stdout + r.stderr
    r = topo.run(topo.clients[0], sys.executable, "-c",
                 f"import socket; s = socket.socket(); s.settimeout(2); print(s.connect_ex(('{link.server_ip4}', 9586)))",
                 check=False)
    assert r.stdout.strip() != "0", "the metrics endpoint answered on a non-loopback address"
    # `vpnd stats` in a loop while pings cross every 10 ms: the longest round trip is reported
    # (the stats calls read nftables' counters off the packet loops' thread, asserted in-process below).
    result = {}
    pinger = threading.Thread(target=lambda: result.setdefault(
        "ping", vpn.ping(topo, topo.clients[0], SERVER_TUN4, count=200, interval=0.01)))
    pinger.start()
    calls = 0
    while pinger.is_alive() and calls < 200:
        r = topo.run(topo.server, vpn.VPND, "stats", "--socket", str(server.config.with_suffix(".sock")), "--json",
                     check=False)
        assert r.returncode == 0, r.stderr
        calls += 1
    pinger.join(60)
    out = result["ping"].stdout
    assert result["ping"].returncode == 0, out
    rtt = re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", out)
    print(f"{calls} 'vpnd stats' calls during 200 pings at 10 ms: longest round trip {rtt.group(1)} ms")
    vpn.stop(topo, client)
    vpn.stop(topo, server)


def test_metrics_listen_must_be_loopback(workdir):
    from vpncore.cli import UserError
    from vpnd.config import load
    keys = vpn.genkeys()
    cfg = vpn.write_server_config(workdir / "v.toml", keys, [], extra='metrics_listen = "0.0.0.0:9586"\n')
    with pytest.raises(UserError, match="must be a loopback address"):
        load(str(cfg))


async def test_stats_reads_nft_counters_off_the_trio_thread(workdir):
    """The `stats` control request runs nftables' listing in a worker thread: the Trio thread
    (which runs both packet loops) never waits for `nft`."""
    from vpnd.config import load
    from vpnd.server import Server
    from vpncore.log import Log
    keys = vpn.genkeys()
    cfg = load(str(vpn.write_server_config(workdir / "v.toml", keys, [])))
    server = Server(cfg, Log("vpnd", 0))
    trio_thread = threading.current_thread()
    seen = []

    def counters():
        seen.append(threading.current_thread())
        return {"flow-cap": 3}

    server.egress.counters = counters
    answer = server._control_request("stats")
    assert not isinstance(answer, dict)                    # an awaitable: ctlsock.serve awaits it
    snap = await answer
    assert seen and seen[0] is not trio_thread
    assert "active_sessions" in snap and next(iter(snap["days"].values()))["drops"]["egress-flow-cap"] == 3
    await trio.sleep(0)
