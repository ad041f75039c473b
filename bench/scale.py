#!/usr/bin/env python3
"""vpnd's memory with many configured peers and many live sessions (VmRSS, /proc/PID/status).

Cases, each on the two-namespace topology of bench/e2e.py (bench/harness.topology; vpnd needs a TUN
device, so root):

  1 key, idle            vpnd with one configured client key: the baseline
  10,000 keys, idle      one config with 10,000 [[client]] keys (X25519 keys generated in-process)
  + 1,000 live sessions  the same vpnd while one Python process in the client namespace drives 1,000
                         handshakes with the sans-IO core (vpncore.proto.client.ClientConnection, one
                         UDP socket per session), keeps them alive (persistent keepalive), then sends
                         one ICMPv6 echo through every session to show each is live end to end
  after close            the same vpnd after every session sent its close message

The server's pool is IPv6 only (2001:2:0:100::/64): a 1,000-session run does not fit the /24 of
198.19.0.0. Handshakes are paced (50 every 0.5 s) below vpnd's under-load threshold; a cookie reply
would only delay a session by its 5 s retry.

Prints one JSON line with the figures (last line) and stores them in the day's results (section
"scale"). `--driver` is the internal client-namespace mode.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import host  # noqa: E402
from tests.e2e.vpn import POOL6, PORT, SERVER_TUN6  # noqa: E402

PACE_BATCH, PACE_INTERVAL = 50, 0.5


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def gen_keys(n: int) -> list[tuple[bytes, bytes]]:
    """n X25519 (private, public) pairs (vpncore.keys.genkey: clamped as RFC 7748 does)."""
    from nacl.bindings import crypto_scalarmult_base

    from vpncore.keys import genkey
    out = []
    for _ in range(n):
        k = base64.b64decode(genkey())
        out.append((k, crypto_scalarmult_base(k)))
    return out


def mb(kib) -> float | None:
    return round(kib / 1024, 1) if kib is not None else None


# --------------------------------------------------------------------------------------------------
# driver: runs inside the client namespace

def icmp6_echo(src: bytes, dst: bytes, ident: int, seq: int) -> bytes:
    payload = b"vpnbench-scale--"
    body = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + payload
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58) + body
    if len(pseudo) % 2:
        pseudo += b"\0"
    s = sum(struct.unpack(f"!{len(pseudo) // 2}H", pseudo))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    csum = ~s & 0xFFFF
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    return struct.pack("!IHBB", 0x60000000, len(body), 58, 64) + src + dst + body


def driver(args) -> int:
    import ipaddress
    import resource

    from vpncore.proto.client import ClientConnection
    from vpncore.proto.events import ControlReceived, ServerClosed

    with open(args.keys_path) as f:
        spec = json.load(f)
    keys = [base64.b64decode(k) for k in spec["client_private"]][: args.sessions]
    spub = base64.b64decode(spec["server_public"])
    n = len(keys)
    want = n + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    wall = time.time() - time.monotonic()
    conns, socks, by_fd = [], [], {}
    ep = select.epoll()
    for i, k in enumerate(keys):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect((args.server, PORT))
        c = ClientConnection(private_key=k, server_public=spub, rng=os.urandom, wall_offset=wall,
                             persistent_keepalive=args.keepalive)
        conns.append(c)
        socks.append(s)
        by_fd[s.fileno()] = i
        ep.register(s.fileno(), select.EPOLLIN)
    addr6: list[bytes | None] = [None] * n
    pinged = [False] * n
    closed_by_server = 0
    stats = {"send_errors": 0}

    def flush(i):
        for dg in conns[i].datagrams_to_send():
            try:
                socks[i].send(dg)
            except OSError:
                stats["send_errors"] += 1

    def say(**kw):
        print(json.dumps(kw), flush=True)

    def poll_once(timeout):
        nonlocal closed_by_server
        for fd, _ in ep.poll(timeout):
            i = by_fd[fd]
            c, s = conns[i], socks[i]
            now = time.monotonic()
            while True:
                try:
                    dg = s.recv(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                pkt = c.receive_datagram(dg, now)
                if pkt is not None and len(pkt) >= 48 and pkt[0] >> 4 == 6 and pkt[6] == 58 and pkt[40] == 129:
                    pinged[i] = True
            while (ev := c.next_event()) is not None:
                if isinstance(ev, ControlReceived) and ev.msg.get("type") == "config" and ev.msg.get("ipv6"):
                    addr6[i] = ipaddress.ip_interface(ev.msg["ipv6"]).ip.packed
                elif isinstance(ev, ServerClosed):
                    closed_by_server += 1
            flush(i)

    last_timers = 0.0

    def timers(upto):
        nonlocal last_timers
        now = time.monotonic()
        if now - last_timers < 0.2:
            return
        last_timers = now
        for i in range(upto):
            t = conns[i].get_timer()
            if t is not None and now >= t:
                conns[i].handle_timer(now)
                flush(i)

    t0 = time.monotonic()
    started = 0
    next_batch = t0
    deadline = t0 + args.establish_timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        if started < n and now >= next_batch:
            for i in range(started, min(n, started + PACE_BATCH)):
                conns[i].connect(now)
                flush(i)
            started = min(n, started + PACE_BATCH)
            next_batch = now + PACE_INTERVAL
        poll_once(0.05)
        timers(started)
        if started == n and all(a is not None for a in addr6):
            break
    est = sum(a is not None for a in addr6)
    say(event="established", sessions=est, of=n, seconds=round(time.monotonic() - t0, 2))

    # hold: keepalives only
    hold_end = time.monotonic() + args.hold
    while time.monotonic() < hold_end:
        poll_once(0.1)
        timers(n)
    # one echo through every session
    dst = ipaddress.ip_address(SERVER_TUN6).packed
    for i in range(n):
        if addr6[i] is not None:
            conns[i].send_packet(icmp6_echo(addr6[i], dst, i & 0xFFFF, 1), time.monotonic())
            flush(i)
        if i % 100 == 99:
            poll_once(0.01)
    end = time.monotonic() + 5
    while time.monotonic() < end and sum(pinged) < est:
        poll_once(0.05)
        timers(n)
    say(event="pinged", answered=sum(pinged), of=n, closed_by_server=closed_by_server,
        send_errors=stats["send_errors"])

    # keep alive until the parent closes our stdin (bounded), then close every session
    end = time.monotonic() + args.max_wait
    stdin_fd = sys.stdin.fileno()
    ep.register(stdin_fd, select.EPOLLIN | select.EPOLLHUP)
    by_fd_stdin = stdin_fd
    while time.monotonic() < end:
        done = False
        for fd, _ in ep.poll(0.1):
            if fd == by_fd_stdin:
                if not os.read(stdin_fd, 4096):
                    done = True
                continue
            i = by_fd[fd]
            now = time.monotonic()
            while True:
                try:
                    dg = socks[i].recv(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                conns[i].receive_datagram(dg, now)
            while conns[i].next_event() is not None:
                pass
            flush(i)
        if done:
            break
        timers(n)
    now = time.monotonic()
    for i in range(n):
        if conns[i].state != "closed":
            conns[i].close(now)
            flush(i)
    say(event="closed", sessions=n)
    return 0


# --------------------------------------------------------------------------------------------------
# parent

def write_server_config(path: str, server_private: bytes, client_publics: list[bytes]) -> None:
    sock = os.path.join(os.path.dirname(path), "vpnd.sock")    # the default /run/vpnd/vpnd0.sock is global
    parts = [f'[server]\nprivate_key = "{b64(server_private)}"\nlisten = ["0.0.0.0:{PORT}"]\n'
             f'interface = "vpnd0"\naddress_pool6 = "{POOL6}"\nmtu = 1420\nlog_level = "verbose"\n'
             f'control_socket = "{sock}"\n']
    parts += [f'\n[[client]]\npublic_key = "{b64(p)}"\n' for p in client_publics]
    with open(path, "w") as f:
        f.write("".join(parts))


def active_sessions(text: str) -> int | None:
    """vpnd's own count from its last 'a session started/ended active=N' line (verbose log level)."""
    import re
    found = re.findall(r"active=(\d+)", text)
    return int(found[-1]) if found else None


def sample(pid: int, seconds: float, every: float = 0.5) -> dict:
    """VmRSS over `seconds`: last and max; VmHWM at the end."""
    rss = []
    end = time.monotonic() + seconds
    while True:
        st = host.proc_status(pid)
        rss.append(st["VmRSS"])
        if time.monotonic() >= end:
            break
        time.sleep(every)
    return {"rss_kib": rss[-1], "rss_max_kib": max(rss), "hwm_kib": st["VmHWM"], "threads": st.get("Threads")}


def parent(args) -> dict:
    from bench.harness.peers import start_vpnd_config
    from bench.harness.topology import BenchTopology

    rows, result = [], {"date": datetime.date.today().isoformat(), "keys": args.keys,
                        "sessions": args.sessions}
    t0 = time.monotonic()
    pairs = gen_keys(args.keys + 1)
    result["keygen_s"] = round(time.monotonic() - t0, 2)
    (ssk, spk), clients = pairs[0], pairs[1:]
    with BenchTopology() as t:       # IPv6 is on in both namespaces (netns.Topology)
        # 1 key, idle: the baseline
        write_server_config(t.path("one.toml"), ssk, [clients[0][1]])
        p, start_s = start_vpnd_config(t, t.path("one.toml"), "vpnd-one.log")
        s = sample(p.pid, args.idle)
        rows.append({"case": "1 configured key, idle", "rss_mb": mb(s["rss_kib"]), "hwm_mb": mb(s["hwm_kib"]),
                     "notes": f"start {start_s:.1f} s"})
        t.stop(p)
        # 10,000 keys, idle
        write_server_config(t.path("many.toml"), ssk, [c[1] for c in clients])
        cfg_mb = os.path.getsize(t.path("many.toml")) / 1e6
        p, start_s = start_vpnd_config(t, t.path("many.toml"), "vpnd-many.log")
        s = sample(p.pid, args.idle)
        rows.append({"case": f"{args.keys:,} configured keys, idle", "rss_mb": mb(s["rss_kib"]),
                     "hwm_mb": mb(s["hwm_kib"]), "notes": f"config {cfg_mb:.1f} MB, start {start_s:.1f} s"})
        result["rss_keys_idle_mb"] = mb(s["rss_kib"])
        # + 1,000 live sessions
        with open(t.path("keys.json"), "w") as f:
            json.dump({"server_public": b64(spk),
                       "client_private": [b64(c[0]) for c in clients[: args.sessions]]}, f)
        with open(t.path("driver.err"), "wb") as err:     # stopped by PID in close() whatever happens
            drv = t.popen(t.client, sys.executable, os.path.abspath(__file__), "--driver",
                          "--keys-file", t.path("keys.json"), "--server", t.link.server_ip4,
                          "--sessions", str(args.sessions), "--hold", str(args.hold),
                          "--keepalive", str(args.keepalive), "--establish-timeout", str(args.establish_timeout),
                          "--max-wait", "120", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

        def read_event(timeout):
            r, _, _ = select.select([drv.stdout], [], [], timeout)
            if not r:
                raise RuntimeError(f"session driver silent for {timeout:.0f} s: {t.log('driver.err')[-400:]}")
            line = drv.stdout.readline()
            if not line:
                raise RuntimeError(f"session driver exited ({drv.poll()}): {t.log('driver.err')[-600:]}")
            return json.loads(line)

        ev = read_event(args.establish_timeout + 30)
        result["established"] = ev["sessions"]
        result["establish_s"] = ev["seconds"]
        s = sample(p.pid, args.hold - 1)
        ev2 = read_event(60)
        result["ping_answered"] = ev2["answered"]
        result["closed_by_server"] = ev2["closed_by_server"]
        s2 = sample(p.pid, 0)
        result["server_active_live"] = active_sessions(t.log("vpnd-many.log"))
        rss_live = max(s["rss_kib"], s2["rss_kib"])
        rows.append({"case": f"{args.keys:,} keys + {ev['sessions']:,} live sessions", "rss_mb": mb(rss_live),
                     "hwm_mb": mb(s2["hwm_kib"]),
                     "notes": f"{ev['sessions']}/{args.sessions} established in {ev['seconds']:.1f} s; "
                              f"{ev2['answered']}/{args.sessions} answered an ICMPv6 echo through the tunnel "
                              f"after {args.hold:.0f} s of keepalives only; vpnd reports active="
                              f"{result['server_active_live']}"})
        result["rss_keys_sessions_mb"] = mb(rss_live)
        drv.stdin.close()          # the driver closes every session and exits
        ev3 = read_event(60)
        drv.wait(30)
        time.sleep(2)
        s3 = sample(p.pid, 2)
        result["server_active_after_close"] = active_sessions(t.log("vpnd-many.log"))
        rows.append({"case": f"{args.keys:,} keys, after every session closed", "rss_mb": mb(s3["rss_kib"]),
                     "hwm_mb": mb(s3["hwm_kib"]), "notes": f"{ev3['sessions']} close messages sent; vpnd reports active="
                                                          f"{result['server_active_after_close']}"})
        t.stop(p)
    result["rows"] = rows
    result["target"] = {"goal": f"{args.keys:,} configured peers in <= 150 MB RSS",
                        "met": result.get("rss_keys_idle_mb") is not None and result["rss_keys_idle_mb"] <= 150}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=10_000, help="configured client keys (default 10,000)")
    ap.add_argument("--sessions", type=int, default=1_000, help="live sessions (default 1,000)")
    ap.add_argument("--idle", type=float, default=5, help="seconds idle before an RSS reading (default 5)")
    ap.add_argument("--hold", type=float, default=15, help="seconds the sessions stay up (default 15)")
    ap.add_argument("--keepalive", type=int, default=5, help="persistent keepalive, s (default 5)")
    ap.add_argument("--establish-timeout", type=float, default=120)
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--max-wait", type=float, default=120, help=argparse.SUPPRESS)
    ap.add_argument("--keys-file", dest="keys_path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.driver:
        return driver(args)
    if not 1 <= args.sessions <= args.keys or args.hold < 2:
        ap.error("--sessions must be from 1 to --keys, --hold at least 2")
    try:
        import nacl  # noqa: F401
        import vpncore  # noqa: F401
    except ImportError:
        print("bench/scale.py needs the project's venv: run it with .venv/bin/python (make venv)", file=sys.stderr)
        return 1
    host.prepare("bench/scale.py", ["ip"])
    try:
        result = parent(args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        result = {"date": datetime.date.today().isoformat(), "error": f"{type(e).__name__}: {e}", "rows": []}
    for row in result.get("rows", []):
        print(f"{row['case']:45s} VmRSS {row['rss_mb']:7.1f} MB  VmHWM {row['hwm_mb']:7.1f} MB  {row['notes']}")
    from bench.harness.results import update_results
    jpath, mpath = update_results("scale", result)
    print(f"wrote {jpath}, {mpath}")
    summary = {k: result.get(k) for k in ("keys", "sessions", "rss_keys_idle_mb", "rss_keys_sessions_mb", "established",
                                          "ping_answered", "establish_s", "keygen_s", "error") if k in result}
    summary["rss_1key_idle_mb"] = next((r["rss_mb"] for r in result.get("rows", []) if r["case"].startswith("1 ")), None)
    print(json.dumps(summary))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    host.script_main(main)
