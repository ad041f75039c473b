"""Results: summaries (median, min, max), machine info, and the day's files in bench/results:
<date><tag>.json (every section: e2e, loss, scale; raw and summarized), .md (rendered from the whole
JSON by every script) and .png (e2e throughput and RTT bars)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys

from .host import REPO, RESULTS_DIR, run
from .peers import TUN_MTU

METRICS = [  # key, label, unit, higher is better
    ("tcp_up_mbps", "TCP up", "Mbit/s", True),
    ("tcp_down_mbps", "TCP down", "Mbit/s", True),
    ("tcp4_up_mbps", "TCP up x4", "Mbit/s", True),
    ("udp_recv_mbps", "UDP recv", "Mbit/s", True),
    ("udp_loss_pct", "UDP loss", "%", False),
    ("rtt_idle_avg_ms", "RTT idle avg", "ms", False),
    ("rtt_idle_p99_ms", "RTT idle p99", "ms", False),
    ("rtt_loaded_avg_ms", "RTT loaded avg", "ms", False),
    ("rtt_loaded_p99_ms", "RTT loaded p99", "ms", False),
    ("tcp_up_cpu_s", "CPU s (TCP up)", "s", False),
    ("tcp_up_cpu_s_per_gbit", "CPU s/Gbit", "s", False),
    ("tcp_up_retrans", "TCP up retrans", "", False),
]


def summarize(reps: list[dict]) -> dict:
    out = {"reps_ok": sum(1 for r in reps if "error" not in r), "errors": [r["error"] for r in reps if "error" in r]}
    keys = {k for r in reps for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k in sorted(keys):
        vals = [r[k] for r in reps if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def median(summary: dict, vpn: str, key: str):
    v = summary.get(vpn, {}).get(key)
    return v["median"] if v else None


def machine_info() -> dict:
    def first(argv, pat=None):
        try:
            r = run(argv, check=False, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = (r.stdout + r.stderr).strip()
        if pat:
            m = re.search(pat, text)
            return m.group(1) if m else None
        return text.splitlines()[0] if text else None

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "python": first([sys.executable, "--version"], r"Python (\S+)") or platform.python_version(),
        "wireguard_go": first(["wireguard-go", "--version"], r"wireguard-go (\S+)"),
        "openvpn": first(["openvpn", "--version"], r"OpenVPN (\S+)"),
        "openssl": first(["openssl", "version"]),
        "iperf3": first(["iperf3", "--version"], r"iperf (\S+)"),
        "tcp_congestion_control": first(["sysctl", "-n", "net.ipv4.tcp_congestion_control"]),
        "git_commit": first(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool((first(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"]) or "")),
        "tunnel_mtu": TUN_MTU,
    }


def results_paths(tag: str = "") -> tuple[str, str, str]:
    base = os.path.join(RESULTS_DIR, datetime.date.today().isoformat() + tag)
    return base + ".json", base + ".md", base + ".png"


def load_results(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {}


def update_results(section: str, data: dict, tag: str = "") -> tuple[str, str]:
    """Set one section ('e2e', 'loss', 'scale') of the day's results JSON, keep the others, and
    re-render the Markdown from the whole document. Returns (json path, md path)."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    jpath, mpath, _ = results_paths(tag)
    doc = load_results(jpath)
    doc[section] = data
    doc.setdefault("machine", machine_info())
    if section == "e2e":
        doc["machine"] = data.get("machine", doc["machine"])
    tmp = jpath + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, jpath)
    with open(mpath, "w") as f:
        f.write(render_md(doc))
    return jpath, mpath


def _fmt(v, digits=None) -> str:
    if v is None:
        return "n/a"
    if digits is None:
        digits = 0 if abs(v) >= 100 else (1 if abs(v) >= 10 else 2)
    return f"{v:,.{digits}f}"


def _cell(summary: dict, vpn: str, key: str) -> str:
    v = summary.get(vpn, {}).get(key)
    if not v:
        return "n/a"
    d = 0 if key.endswith("retrans") else None
    if v["n"] == 1 or v["min"] == v["max"]:
        return _fmt(v["median"], d)
    return f"{_fmt(v['median'], d)} ({_fmt(v['min'], d)}–{_fmt(v['max'], d)})"


def _ratio(a, b, higher_better=True) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def render_md(doc: dict) -> str:
    m = doc.get("machine", {})
    lines = [f"# Benchmark results {doc.get('e2e', {}).get('date') or m.get('date', '')[:10]}", "",
             f"Machine: {m.get('cpus')} CPUs, {m.get('cpu_model')}; kernel {m.get('kernel')}; "
             f"Python {m.get('python')}; wireguard-go {m.get('wireguard_go')}; OpenVPN {m.get('openvpn')}; "
             f"iperf3 {m.get('iperf3')}; TCP congestion control {m.get('tcp_congestion_control')}; "
             f"repo {m.get('git_commit')}{' (with uncommitted changes)' if m.get('git_dirty') else ''}.", ""]
    e2e = doc.get("e2e")
    if e2e:
        s, vpns = e2e["summary"], e2e["vpns"]
        lines += [f"## End to end ({e2e['reps']} x {e2e['seconds']} s per test; median (min–max))", "",
                  f"Underlay: {e2e.get('underlay', 'veth-default')}. "
                  + UNDERLAY_NOTES.get(e2e.get("underlay", "veth-default"), ""), "",
                  "Two namespaces, one veth pair; tunnel MTU 1420 for every VPN. Throughput in Mbit/s at the "
                  "receiver; UDP offered at 2 Gbit/s; RTT in ms (ping every 10 ms; loaded = during one TCP "
                  "upload); CPU = seconds of CPU used by the tunnel processes (both sides) during the "
                  "single-stream TCP upload.", ""]
        cols = METRICS
        lines.append("| VPN | " + " | ".join(f"{lab}{' (' + u + ')' if u and u not in ('s',) else ''}"
                                              for _, lab, u, _ in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for v in vpns:
            row = [_cell(s, v, k) if not (v == "veth" and k.startswith("tcp_up_cpu")) else "n/a" for k, *_ in cols]
            lines.append(f"| {v} | " + " | ".join(row) + " |")
        errs = {v: s[v]["errors"] for v in vpns if s.get(v, {}).get("errors")}
        if errs:
            lines += ["", "Failed repetitions:"] + [f"- {v}: {e}" for v, es in errs.items() for e in es]
        refs = [r for r in ("wireguard-go", "openvpn-aes", "openvpn-chacha") if r in vpns]
        if refs:
            lines += ["", "### Ratios (median / median of the reference)", "",
                      "| VPN | " + " | ".join(f"{lab} vs {r}" for r in refs
                                               for k, lab, *_ in RATIO_METRICS) + " |",
                      "|---|" + "---|" * (len(refs) * len(RATIO_METRICS))]
            for v in vpns:
                cells = [_ratio(median(s, v, k), median(s, r, k)) for r in refs for k, *_ in RATIO_METRICS]
                lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines += ["", "### Targets (vpnd)", ""] + [f"- {t}" for t in targets(s)]
    loss = doc.get("loss")
    if loss:
        lines += ["", f"## Single TCP stream upload with {loss['loss_pct']}% random loss "
                      f"({loss['reps']} x {loss['seconds']} s; median (min–max))", "", loss.get("note", "")]
        for mode in loss["modes"]:
            ls, vpns_l = mode["summary"], loss["vpns"]
            lines += ["", f"### Underlay: {mode['underlay']}", "", UNDERLAY_NOTES.get(mode["underlay"], ""), "",
                      "| VPN | TCP up with loss (Mbit/s) | vs wireguard-go | same topology without loss (Mbit/s) | "
                      "kept | loss applied (%) | retransmits |", "|---|---|---|---|---|---|---|"]
            for v in vpns_l:
                lines.append(f"| {v} | {_cell(ls, v, 'tcp_up_mbps')} | "
                             f"{_ratio(median(ls, v, 'tcp_up_mbps'), median(ls, 'wireguard-go', 'tcp_up_mbps'))} | "
                             f"{_cell(ls, v, 'tcp_up_noloss_mbps')} | {_cell(ls, v, 'kept_fraction')} | "
                             f"{_cell(ls, v, 'applied_loss_pct')} | {_cell(ls, v, 'tcp_up_retrans')} |")
            ours, wg = median(ls, "vpnd", "tcp_up_mbps"), median(ls, "wireguard-go", "tcp_up_mbps")
            if ours is not None and wg:
                lines += ["", f"- Target (vpnd with {loss['loss_pct']}% loss at least wireguard-go), "
                              f"{mode['underlay']} underlay: {ours:.0f} vs {wg:.0f} Mbit/s ({ours / wg:.2f}x) -> "
                              f"{'met' if ours >= wg else 'NOT met'}"]
            errs = {v: ls[v]["errors"] for v in vpns_l if ls.get(v, {}).get("errors")}
            if errs:
                lines += ["", "Failed repetitions:"] + [f"- {v}: {e}" for v, es in errs.items() for e in es]
    sc = doc.get("scale")
    if sc:
        lines += ["", "## vpnd memory (VmRSS)", "", "| case | VmRSS (MB) | VmHWM (MB) | notes |", "|---|---|---|---|"]
        for row in sc.get("rows", []):
            lines.append(f"| {row['case']} | {_fmt(row.get('rss_mb'), 1)} | {_fmt(row.get('hwm_mb'), 1)} | "
                         f"{row.get('notes', '')} |")
        if sc.get("error"):
            lines += ["", f"Error: {sc['error']}"]
    return "\n".join(lines) + "\n"


UNDERLAY_NOTES = {
    "veth-default": "veth as created (the end-to-end topology): a UDP_SEGMENT train or TSO burst crosses the veth "
                    "as one skb of up to 64 KiB, so the underlay costs nothing per datagram and a loss rule sees "
                    "(and drops) whole trains.",
    "segmented": "gso_max_segs 1 on both veth ends: every datagram crosses the underlay as its own packet, as on "
                 "a real link, so the loss is per datagram.",
}

RATIO_METRICS = [("tcp_up_mbps", "up"), ("tcp_down_mbps", "down"), ("rtt_loaded_p99_ms", "p99 loaded")]


def targets(s: dict) -> list[str]:
    out = []
    up, down = median(s, "vpnd", "tcp_up_mbps"), median(s, "vpnd", "tcp_down_mbps")
    for ref, goal in (("wireguard-go", 4.0), ("openvpn-aes", 3.0), ("openvpn-chacha", 3.0)):
        rup, rdown = median(s, ref, "tcp_up_mbps"), median(s, ref, "tcp_down_mbps")
        if None in (up, down, rup, rdown):
            continue
        ok = up >= goal * rup and down >= goal * rdown
        out.append(f"single TCP stream both directions >= {goal:g}x {ref}: up {up / rup:.2f}x, "
                   f"down {down / rdown:.2f}x -> {'met' if ok else 'NOT met'}")
    p, rp = median(s, "vpnd", "rtt_loaded_p99_ms"), median(s, "wireguard-go", "rtt_loaded_p99_ms")
    if p is not None and rp is not None:
        out.append(f"ping p99 under load no worse than wireguard-go: {p:.2f} ms vs {rp:.2f} ms -> "
                   f"{'met' if p <= rp else 'NOT met'}")
    return out or ["n/a (vpnd or a reference has no result)"]


def plot(e2e: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (make deps-bench installs it)", file=sys.stderr)
        return None
    s, vpns = e2e["summary"], e2e["vpns"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))

    def bars(ax, keys, title, ylabel):
        width = 0.8 / len(keys)
        for i, (k, lab) in enumerate(keys):
            med = [median(s, v, k) or 0 for v in vpns]
            lo = [med[j] - (s.get(v, {}).get(k, {}).get("min", med[j])) for j, v in enumerate(vpns)]
            hi = [(s.get(v, {}).get(k, {}).get("max", med[j])) - med[j] for j, v in enumerate(vpns)]
            xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(vpns))]
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=lab)
        ax.set_xticks(range(len(vpns)))
        ax.set_xticklabels(vpns, rotation=15)
        if any(median(s, v, k) for v in vpns for k, _ in keys):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)

    bars(ax1, [("tcp_up_mbps", "TCP up"), ("tcp_down_mbps", "TCP down"), ("tcp4_up_mbps", "TCP up x4"),
               ("udp_recv_mbps", "UDP received")], "Throughput (median, min-max)", "Mbit/s (log)")
    bars(ax2, [("rtt_idle_avg_ms", "idle avg"), ("rtt_idle_p99_ms", "idle p99"),
               ("rtt_loaded_avg_ms", "loaded avg"), ("rtt_loaded_p99_ms", "loaded p99")],
         "Ping RTT through the tunnel", "ms (log)")
    fig.suptitle(f"{e2e['date']}: {e2e['reps']} x {e2e['seconds']} s, {e2e['machine'].get('cpus')} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def quick_summary(s: dict) -> dict:
    out = {}
    for name, vpn in (("vpnd", "vpnd"), ("wireguard-go", "wireguard-go"), ("openvpn", "openvpn-aes"),
                      ("veth", "veth")):
        d = {k: median(s, vpn, k) for k in ("tcp_up_mbps", "tcp_down_mbps", "rtt_loaded_p99_ms")}
        d = {k: (round(v, 3) if v is not None else None) for k, v in d.items()}
        errs = s.get(vpn, {}).get("errors")
        if errs:
            d["error"] = errs[0]
        out[name] = d
    return out


