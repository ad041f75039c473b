"""Measurements through a Tunnel on a BenchTopology: iperf3 TCP and UDP, ping idle and under load,
and one repetition of a benchmark on a fresh topology (`one_rep`)."""

from __future__ import annotations

import json
import re
import secrets
import statistics
import subprocess
import time

from tests.e2e.vpn import wait_tcp_listening

from .host import CLK_TCK, cpu_ticks, loadavg, percentile
from .peers import STARTERS, TUN_MTU, Tunnel
from .topology import BenchTopology

UDP_LEN = TUN_MTU - 28          # one IPv4/UDP datagram that fits the tunnel MTU unfragmented
UDP_RATE = "2G"
IPERF_PORT = 5201
PING_INTERVAL = 0.01


class IperfServer:
    """A one-off iperf3 server (-1) in the server namespace, started per test: a failed test cannot
    leave a busy server behind."""

    def __init__(self, t: BenchTopology, port: int = IPERF_PORT):
        self.t, self.port = t, port
        self.log = f"iperf3-s-{secrets.token_hex(3)}.log"
        self.p = t.popen(t.server, "iperf3", "-s", "-1", "-p", str(port), log=self.log)
        if not wait_tcp_listening(t, t.server, port, 10) or self.p.poll() is not None:
            raise RuntimeError("iperf3 server did not start: " + t.log(self.log)[-300:])

    def finish(self) -> None:
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.t.stop(self.p)


def iperf(t: BenchTopology, server_ip: str, seconds: float, *args: str) -> dict:
    srv = IperfServer(t)
    try:
        r = t.run(t.client, "iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
                  "--connect-timeout", "5000", *args, check=False, timeout=seconds + 30)
    finally:
        srv.finish()
    try:
        d = json.loads(r.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 {' '.join(args)}: no JSON ({r.returncode}): {r.stderr.strip()[-300:]}")
    if "error" in d:
        raise RuntimeError(f"iperf3 {' '.join(args)}: {d['error']}")
    return d


def tcp_test(t: BenchTopology, tun: Tunnel, seconds: float, *args: str) -> dict:
    before = {pid: cpu_ticks(pid) for pid in tun.pids}
    t0 = time.monotonic()
    d = iperf(t, tun.server_ip, seconds, *args)
    wall = time.monotonic() - t0
    after = {pid: cpu_ticks(pid) for pid in tun.pids}
    end = d["end"]
    res = {
        "mbps": end["sum_received"]["bits_per_second"] / 1e6,
        "sender_mbps": end["sum_sent"]["bits_per_second"] / 1e6,
        "retransmits": end["sum_sent"].get("retransmits"),
        "seconds": end["sum_received"]["seconds"],
    }
    if tun.pids:
        cpu = sum(after[p] - before[p] for p in tun.pids) / CLK_TCK
        res["cpu_s"] = cpu
        res["cpu_s_by_side"] = [(after[p] - before[p]) / CLK_TCK for p in tun.pids]   # [server, client]
        res["cpu_cores"] = cpu / wall
        gbit = end["sum_received"]["bytes"] * 8 / 1e9
        res["cpu_s_per_gbit"] = cpu / gbit if gbit else None
    return res


def udp_test(t: BenchTopology, tun: Tunnel, seconds: float) -> dict:
    d = iperf(t, tun.server_ip, seconds, "-u", "-b", UDP_RATE, "-l", str(UDP_LEN))
    sent, recv = d["end"]["sum_sent"], d["end"]["sum_received"]
    return {"recv_mbps": recv["bits_per_second"] / 1e6, "sent_mbps": sent["bits_per_second"] / 1e6,
            "loss_pct": recv.get("lost_percent"), "packets": recv.get("packets")}


PING_RE = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")


def ping_test(t: BenchTopology, ip: str, count: int) -> dict:
    deadline = int(count * PING_INTERVAL + 10)
    r = t.run(t.client, "ping", "-n", "-i", str(PING_INTERVAL), "-c", str(count), "-W", "2", "-w", str(deadline),
              ip, check=False, timeout=deadline + 10)
    seen: dict[int, float] = {}
    for m in PING_RE.finditer(r.stdout):
        seen.setdefault(int(m.group(1)), float(m.group(2)))   # ignore duplicates
    times = list(seen.values())
    if not times:
        raise RuntimeError(f"ping {ip}: no replies: {r.stdout[-200:]} {r.stderr[-200:]}")
    return {"sent": count, "received": len(times), "loss_pct": 100.0 * (count - len(times)) / count,
            "avg_ms": statistics.fmean(times), "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99),
            "max_ms": max(times), "times_ms": [round(x, 3) for x in times]}


def loaded_ping_test(t: BenchTopology, tun: Tunnel, seconds: float) -> dict:
    """ping while one TCP stream uploads (client -> server): the queueing delay a user would feel."""
    srv = IperfServer(t)
    load = t.popen(t.client, "iperf3", "-c", tun.server_ip, "-p", str(IPERF_PORT), "-t", str(seconds + 2),
                   "-J", "--connect-timeout", "5000", log="iperf3-load.json")
    try:
        time.sleep(1.0)                 # past slow start: queues are full
        res = ping_test(t, tun.server_ip, int(seconds / PING_INTERVAL))
        load.wait(seconds + 30)
    finally:
        t.stop(load)
        srv.finish()
    try:
        d = json.loads(t.log("iperf3-load.json"))
        res["load_mbps"] = d["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        res["load_mbps"] = None
    return res


def measure(t: BenchTopology, tun: Tunnel, seconds: float) -> dict:
    """Every figure of the end-to-end table for one tunnel (bench/e2e.py)."""
    out = {}
    up = tcp_test(t, tun, seconds)
    out["tcp_up_mbps"], out["tcp_up_retrans"] = up["mbps"], up["retransmits"]
    for k in ("cpu_s", "cpu_cores", "cpu_s_per_gbit", "cpu_s_by_side"):
        if k in up:
            out[f"tcp_up_{k}"] = up[k]
    down = tcp_test(t, tun, seconds, "-R")
    out["tcp_down_mbps"], out["tcp_down_retrans"] = down["mbps"], down["retransmits"]
    if "cpu_s" in down:
        out["tcp_down_cpu_s"] = down["cpu_s"]
    p4 = tcp_test(t, tun, seconds, "-P", "4")
    out["tcp4_up_mbps"], out["tcp4_up_retrans"] = p4["mbps"], p4["retransmits"]
    udp = udp_test(t, tun, seconds)
    out["udp_recv_mbps"], out["udp_sent_mbps"], out["udp_loss_pct"] = udp["recv_mbps"], udp["sent_mbps"], udp["loss_pct"]
    idle = ping_test(t, tun.server_ip, int(min(seconds, 5) / PING_INTERVAL))
    out["rtt_idle_avg_ms"], out["rtt_idle_p99_ms"], out["rtt_idle_loss_pct"] = idle["avg_ms"], idle["p99_ms"], idle["loss_pct"]
    loaded = loaded_ping_test(t, tun, seconds)
    out["rtt_loaded_avg_ms"], out["rtt_loaded_p99_ms"] = loaded["avg_ms"], loaded["p99_ms"]
    out["rtt_loaded_loss_pct"], out["rtt_loaded_load_mbps"] = loaded["loss_pct"], loaded["load_mbps"]
    out["_ping_idle_ms"], out["_ping_loaded_ms"] = idle["times_ms"], loaded["times_ms"]
    out["info"] = tun.info
    return out


def one_rep(vpn: str, segment: bool, body) -> dict:
    """One repetition of one VPN on a fresh topology: `body(t, tunnel, res)` puts the figures in `res`.
    Errors are recorded (`error`, next to what `res` holds by then), never raised (but Ctrl-C is);
    wall time and load average are added."""
    t0 = time.monotonic()
    load_before = loadavg()
    res: dict = {}
    try:
        with BenchTopology(segment) as t:
            body(t, STARTERS[vpn](t), res)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    res["wall_s"] = time.monotonic() - t0
    res["loadavg_before"], res["loadavg_after"] = load_before, loadavg()
    return res
