#!/usr/bin/env python3
"""End-to-end benchmark: our VPN side by side with wireguard-go and OpenVPN (DESIGN §3, §5, §7).

Every VPN runs on a fresh, identical two-namespace topology (one veth pair):

    server ns  198.18.0.1/24 ── veth ── 198.18.0.2/24  client ns      (underlay, MTU 1500)
    tunnel     198.19.0.1            ·             198.19.0.2         (MTU 1420 for every tunnel)

`veth` is the bare underlay (no tunnel): the ceiling. For each VPN and repetition it measures, with
iperf3 (server in the server namespace, client in the client namespace):

    tcp_up      one TCP stream client -> server, Mbit/s at the receiver, with retransmits
    tcp_down    one TCP stream server -> client (iperf3 -R)
    tcp4_up     four TCP streams client -> server (-P 4)
    udp         UDP at an offered 2 Gbit/s, 1392-byte payloads: received Mbit/s and loss %
    rtt_idle    ping -i 0.01 through the tunnel, nothing else running: average and p99 (ms)
    rtt_loaded  the same while a single TCP stream uploads (client -> server)
    cpu         CPU seconds (utime+stime from /proc/PID/stat) used by the tunnel processes
                (server + client) during tcp_up; n/a for veth

Repetitions are interleaved (rep 1 of every VPN, then rep 2, ...) so machine noise spreads evenly;
each figure is reported as the median with min and max. Results: bench/results/<date>.json (raw and
summary, machine info), <date>.md (tables, ratios vs wireguard-go and OpenVPN), <date>.png.
`--quick` (1 rep of 5 s; veth, vpnd, wireguard-go, openvpn-aes) writes <date>-quick.* instead and
prints a JSON summary as its last line.

The harness is bench/harness (shared with loss.py and scale.py; topology and vpnd/vpnclient from
tests/e2e). Needs root. Cleans up namespaces, processes (only its own, by PID) and temp files on every exit path,
Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import host  # noqa: E402
from bench.harness.measure import PING_INTERVAL, UDP_LEN, UDP_RATE, measure, one_rep  # noqa: E402
from bench.harness.peers import ALL_VPNS, TUN_MTU, commands_for, parse_vpns  # noqa: E402
from bench.harness.results import machine_info, plot, quick_summary, results_paths, summarize, update_results  # noqa: E402

QUICK_VPNS = ["veth", "vpnd", "wireguard-go", "openvpn-aes"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="repetitions per VPN (default 3)")
    ap.add_argument("--seconds", type=float, default=10, help="duration of each test (default 10)")
    ap.add_argument("--vpns", default=None, help=f"comma-separated subset of {','.join(ALL_VPNS)}")
    ap.add_argument("--quick", action="store_true", help="1 rep of 5 s; veth, vpnd, wireguard-go, openvpn-aes")
    ap.add_argument("--segment-underlay", action="store_true",
                    help="gso_max_segs 1 on the veth: every datagram a separate underlay packet, as on a real "
                         "link (results go to <date>-segmented.*)")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.seconds = 1, 5
    vpns = parse_vpns(ap, args.vpns) if args.vpns else (QUICK_VPNS if args.quick else ALL_VPNS)
    if args.reps < 1 or not 1 <= args.seconds <= 120:
        ap.error("--reps must be >= 1 and --seconds from 1 to 120")
    host.prepare("bench/e2e.py", commands_for(vpns))

    machine = machine_info()
    raw: dict[str, list] = {v: [] for v in vpns}
    started = time.monotonic()
    for rep in range(args.reps):
        for v in vpns:
            print(f"[rep {rep + 1}/{args.reps}] {v} ...", end=" ", flush=True)
            res = one_rep(v, args.segment_underlay, lambda t, tun, res: res.update(measure(t, tun, args.seconds)))
            raw[v].append(res)
            if "error" in res:
                print(f"FAILED: {res['error']}", flush=True)
            else:
                print(f"up {res['tcp_up_mbps']:.0f} down {res['tcp_down_mbps']:.0f} x4 {res['tcp4_up_mbps']:.0f} "
                      f"udp {res['udp_recv_mbps']:.0f} Mbit/s ({res['udp_loss_pct']:.1f}% lost), "
                      f"rtt idle {res['rtt_idle_avg_ms']:.3f}/{res['rtt_idle_p99_ms']:.3f} "
                      f"loaded {res['rtt_loaded_avg_ms']:.2f}/{res['rtt_loaded_p99_ms']:.2f} ms"
                      + (f", cpu {res['tcp_up_cpu_s']:.1f} s" if "tcp_up_cpu_s" in res else ""), flush=True)
    summary = {v: summarize(raw[v]) for v in vpns}
    e2e = {"date": datetime.date.today().isoformat(), "reps": args.reps, "seconds": args.seconds,
           "quick": args.quick, "underlay": "segmented" if args.segment_underlay else "veth-default",
           "vpns": vpns, "machine": machine, "summary": summary, "raw": raw,
           "duration_s": round(time.monotonic() - started, 1),
           "settings": {"tunnel_mtu": TUN_MTU, "udp_offered": UDP_RATE, "udp_payload": UDP_LEN,
                        "ping_interval_s": PING_INTERVAL, "openvpn": "p2p TLS, self-signed P-256, "
                        "--peer-fingerprint, --dh none, --disable-dco, --proto udp4, --tun-mtu 1420"}}
    tag = ("-quick" if args.quick else "") + ("-segmented" if args.segment_underlay else "")
    jpath, mpath = update_results("e2e", e2e, tag)
    png = plot(e2e, results_paths(tag)[2])
    with open(mpath) as f:
        print("\n" + f.read())
    print(f"wrote {jpath}, {mpath}" + (f", {png}" if png else ""))
    if args.quick:
        print(json.dumps(quick_summary(summary)))
    return 0


if __name__ == "__main__":
    host.script_main(main)
