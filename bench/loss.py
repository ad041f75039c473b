#!/usr/bin/env python3
"""Single TCP stream under random underlay loss: vpnd vs wireguard-go (and the bare veth) (DESIGN §3).

netem does not work here, so loss comes from an nftables rule in the server namespace:

    table inet vpnbench { chain input { type filter hook input priority 0; policy accept;
        udp dport <tunnel port> counter
        udp dport <tunnel port> numgen random mod 100 < 1 counter drop } }

It drops 1% of the tunnel's UDP packets arriving at the server (the data direction of an upload);
nothing else is touched. Two underlay modes (both by default):

  segmented     gso_max_segs 1 on both veth ends: a UDP_SEGMENT train is cut into datagrams before the
                veth, so each datagram is a packet on the underlay and the loss is per datagram, as on a
                real link. This is the figure that answers "how does it do with 1% loss".
  veth-default  the end-to-end topology as is: veth carries a 64 KiB GSO skb whole, so the rule sees
                and drops whole trains (1% of trains, not of datagrams).
 For the bare veth (no tunnel) the same rule matches all traffic. The rule's
counters give the loss actually applied. Per VPN and repetition (on a fresh topology, the same one
bench/e2e.py builds: bench/harness) it runs a single-stream iperf3 upload first without the rule and then with it.

Results go into the day's bench/results/<date>.json (section "loss") and .md; the last printed line
is a JSON summary. Needs root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import host  # noqa: E402
from bench.harness.measure import one_rep, tcp_test  # noqa: E402
from bench.harness.peers import ALL_VPNS, TUNNEL_UDP_PORT, commands_for, parse_vpns  # noqa: E402
from bench.harness.results import median, summarize, update_results  # noqa: E402

DEFAULT_VPNS = ["veth", "vpnd", "wireguard-go"]


def nft_rules(port: int | None, pct: float) -> str:
    match = f"udp dport {port} " if port else ""
    return ("table inet vpnbench {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
            f"  {match}counter\n  {match}numgen random mod 100 < {int(pct)} counter drop\n }}\n}}\n")


def nft_counters(t) -> tuple[int, int]:
    """(packets seen by the rule, packets dropped)."""
    r = t.run(t.server, "nft", "-j", "list", "table", "inet", "vpnbench", check=False)
    try:
        items = json.loads(r.stdout)["nftables"]
    except (ValueError, KeyError):
        return (0, 0)
    counts = []
    for it in items:
        rule = it.get("rule")
        if rule:
            for ex in rule.get("expr", []):
                if "counter" in ex:
                    counts.append(ex["counter"]["packets"])
    return (counts[0], counts[1]) if len(counts) >= 2 else (0, 0)


def lossy_upload(t, tun, res: dict, vpn: str, seconds: float, pct: float) -> None:
    """One TCP upload without loss, then the nftables rule, then the same upload with it."""
    res["tcp_up_noloss_mbps"] = tcp_test(t, tun, seconds)["mbps"]
    with open(t.path("loss.nft"), "w") as f:
        f.write(nft_rules(TUNNEL_UDP_PORT.get(vpn), pct))
    t.run(t.server, "nft", "-f", t.path("loss.nft"))
    lossy = tcp_test(t, tun, seconds)
    seen, dropped = nft_counters(t)
    res.update({"tcp_up_mbps": lossy["mbps"], "tcp_up_retrans": lossy["retransmits"],
                "packets_seen": seen, "packets_dropped": dropped,
                "applied_loss_pct": 100.0 * dropped / seen if seen else None})
    if "cpu_s" in lossy:
        res["tcp_up_cpu_s"] = lossy["cpu_s"]
    if res["tcp_up_noloss_mbps"]:
        res["kept_fraction"] = res["tcp_up_mbps"] / res["tcp_up_noloss_mbps"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--loss-pct", type=int, default=1, help="percent of datagrams dropped (default 1)")
    ap.add_argument("--vpns", default=",".join(DEFAULT_VPNS), help=f"default {','.join(DEFAULT_VPNS)}; from {','.join(ALL_VPNS)}")
    ap.add_argument("--quick", action="store_true", help="1 rep of 5 s")
    ap.add_argument("--underlay", choices=["segmented", "veth-default", "both"], default="both",
                    help="segmented: gso_max_segs 1 on the veth, loss per datagram as on a real link; "
                         "veth-default: the end-to-end topology, where GSO trains cross whole (default: both)")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.seconds = 1, 5
    vpns = parse_vpns(ap, args.vpns)
    if args.reps < 1 or not 1 <= args.seconds <= 120 or not 0 < args.loss_pct < 100:
        ap.error("--reps >= 1, --seconds 1..120, --loss-pct 1..99")
    host.prepare("bench/loss.py", commands_for(vpns) + ["nft"])

    underlays = ["segmented", "veth-default"] if args.underlay == "both" else [args.underlay]
    raw: dict[str, dict[str, list]] = {u: {v: [] for v in vpns} for u in underlays}
    for rep in range(args.reps):
        for u in underlays:
            for v in vpns:
                print(f"[loss rep {rep + 1}/{args.reps}, {u}] {v} ...", end=" ", flush=True)
                r = one_rep(v, u == "segmented", lambda t, tun, res: lossy_upload(t, tun, res, v, args.seconds, args.loss_pct))
                raw[u][v].append(r)
                if "error" in r:
                    print(f"FAILED: {r['error']}", flush=True)
                else:
                    print(f"no loss {r['tcp_up_noloss_mbps']:.0f} Mbit/s, with {args.loss_pct}% loss "
                          f"{r['tcp_up_mbps']:.0f} Mbit/s (applied {r['applied_loss_pct'] or 0:.2f}% of "
                          f"{r['packets_seen']} packets), retransmits {r['tcp_up_retrans']}", flush=True)
    modes = [{"underlay": u, "summary": {v: summarize(raw[u][v]) for v in vpns}, "raw": raw[u]}
             for u in underlays]
    data = {"date": datetime.date.today().isoformat(), "reps": args.reps, "seconds": args.seconds,
            "loss_pct": args.loss_pct, "vpns": vpns, "modes": modes,
            "note": f"nftables in the server namespace drops {args.loss_pct}% of the tunnel's UDP packets "
                    f"arriving there (all packets for veth): the data direction of the upload. Tunnels as in "
                    f"the end-to-end table; each repetition measures the same topology first without loss."}
    jpath, mpath = update_results("loss", data)
    print(f"wrote {jpath}, {mpath}")
    out = {}
    for mode in modes:
        sm, o = mode["summary"], {}
        for v in vpns:
            o[v] = {k: (round(x, 3) if (x := median(sm, v, k)) is not None else None)
                    for k in ("tcp_up_mbps", "tcp_up_noloss_mbps", "applied_loss_pct")}
        wg, ours = median(sm, "wireguard-go", "tcp_up_mbps"), median(sm, "vpnd", "tcp_up_mbps")
        if wg and ours is not None:
            o["vpnd_vs_wireguard_go"] = round(ours / wg, 3)
        out[mode["underlay"]] = o
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    host.script_main(main)
