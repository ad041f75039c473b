"""The demo (`make demo`): a full tunnel across a small internet, then a clean machine.

Builds `tests.e2e.internet.Internet` in network namespaces: a client behind a NATing home router,
the VPN server and a web host on an "internet" router (the server is not on the client's link).
Generates keys with `vpnd genkey`, starts vpnd (`full_tunnel = true`) and `vpnclient up` as real
processes, asks the web host which address it sees for the client over IPv4 and IPv6 (the server's;
before the tunnel, the home router's), pings through the tunnel, moves 100 MiB of TCP each way with
iperf3, shows `vpnclient status`, disconnects with `vpnclient down`, shows that the web host never
saw the client's own address while connected, and removes every namespace, link, process and file
it made, whatever happened. Exit status 0 only if every step worked.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e import internet as net
from tests.e2e import vpn
from tests.e2e.netns import Topology, is_root, link_exists, netns_list

TRANSFER = "100M"          # iperf3 -n: 100 MiB = 104,857,600 bytes per direction
IPERF_PORT = 5201
POOL6 = "fd00:100::/64"    # a ULA pool: vpnd NATs IPv6 out of its egress interface too
SERVER_TUN6 = vpn.server_tun6(POOL6)


class DemoFailed(Exception):
    pass


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def info(text: str) -> None:
    print(f"    {text}", flush=True)


def check(ok: object, what: str) -> None:
    if not ok:
        raise DemoFailed(what)


def _rtt(ping_output: str) -> str:
    m = re.search(r"= [\d.]+/([\d.]+)/", ping_output)
    return f"avg rtt {m.group(1)} ms" if m else "rtt unknown"


def ping_step(topo: Topology, addr: str, results: dict, key: str) -> None:
    r = vpn.ping(topo, topo.client, addr, count=5, wait=2)
    check(r.returncode == 0 and " 5 received" in r.stdout, f"ping {addr} through the tunnel failed:\n{r.stdout}")
    results[key] = _rtt(r.stdout)
    info(f"5/5 replies from {addr}, {results[key]}")


def iperf_step(topo: Topology, workdir: Path, reverse: bool) -> tuple[float, int, int, int]:
    """One iperf3 transfer of TRANSFER bytes; returns (Mbit/s received, bytes sent, bytes received, retransmits)."""
    with open(workdir / "iperf3-server.log", "ab") as log:   # one-off server, foreground: we own its PID
        server = topo.popen(topo.server, "iperf3", "-s", "-1", "-B", vpn.SERVER_TUN4, "-p", str(IPERF_PORT),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        check(vpn.wait_tcp_listening(topo, topo.server, IPERF_PORT), "the iperf3 server did not start")
        argv = ["iperf3", "-c", vpn.SERVER_TUN4, "-p", str(IPERF_PORT), "-n", TRANSFER, "-J"]
        r = topo.run(topo.client, *argv, *(["-R"] if reverse else []), check=False, timeout=180)
        try:
            res = json.loads(r.stdout)
        except ValueError:
            res = {"error": r.stderr.strip() or "no output"}
        check(r.returncode == 0 and "error" not in res, f"iperf3 failed: {res.get('error')}")
        sent, recv = res["end"]["sum_sent"], res["end"]["sum_received"]
        return recv["bits_per_second"] / 1e6, int(sent["bytes"]), int(recv["bytes"]), int(sent.get("retransmits", 0))
    finally:
        topo.stop(server)


def web_step(topo: net.Internet, summary: dict, key: str, expect: str, ipv6: bool, why: str) -> None:
    seen = None
    for _ in range(20):                      # the tunnel's first seconds: retried, bounded
        seen = topo.seen_by_web(ipv6=ipv6, timeout=2)
        if seen == expect:
            break
        time.sleep(0.25)
    check(seen == expect, f"the web host saw {seen or 'nothing'} over IPv{6 if ipv6 else 4}, not {expect} ({why})")
    summary[key] = seen
    info(f"the web host saw {seen} over IPv{6 if ipv6 else 4} ({why})")


def run(workdir: Path, summary: dict) -> None:
    step("building a small internet: client -> home router (NAT) -> internet <- VPN server, web host")
    topo = net.Internet(servers=1)
    try:
        summary["namespaces"] = list(topo.namespaces)
        info(f"client {topo.client}: {net.CLIENT4}, {net.CLIENT6}; home router {topo.home} NATs to {net.HOME_OUT4}")
        info(f"server {topo.server}: {net.SERVERS4[0]}, {net.SERVERS6[0]}; web host {topo.web}: "
             f"{net.WEB4}, {net.WEB6}")
        seen_log = workdir / "web-access.log"
        topo.start_web(seen_log)
        web_step(topo, summary, "web4_before", net.HOME_OUT4, False, "no VPN yet: the home router's address")
        web_step(topo, summary, "web6_before", net.CLIENT6, True, "no VPN yet: the client's own address")
        seen_log.write_text("")

        step("generating keys with 'vpnd genkey' / 'vpnd pubkey'")
        server_keys, client_keys = vpn.genkeys(), vpn.genkeys()
        info(f"server public key {server_keys.public}")
        info(f"client public key {client_keys.public}")

        step(f"starting vpnd in {topo.server} (full_tunnel = true, UDP {vpn.PORT}, IPv4 and IPv6)")
        server = vpn.start_server(topo, workdir, server_keys, [client_keys], pool6=POOL6,
                                  extra="full_tunnel = true\n")
        info(f"vpnd pid {server.pid}, {vpn.SERVER_IF} has {vpn.SERVER_TUN4} and {SERVER_TUN6}")

        endpoint = f"{net.SERVERS4[0]}:{vpn.PORT}"
        step(f"starting 'vpnclient up' in {topo.client} (server {endpoint}, two routers away)")
        client = vpn.start_client(topo, topo.client, workdir, client_keys, server_keys.public, endpoint)
        st = vpn.wait_connected(topo, client, server=server)
        info(f"vpnclient pid {client.pid}: {st['state']}, addresses {', '.join(st['addresses'])}, "
             f"routes {', '.join(st['routes'])}")
        summary["addresses"] = st["addresses"]

        step("HTTP to the web host through the tunnel: which address does it see?")
        web_step(topo, summary, "web4", net.SERVERS4[0], False, "the VPN server's")
        web_step(topo, summary, "web6", net.SERVERS6[0], True, "the VPN server's")

        step(f"ping over IPv4 through the tunnel: {vpn.SERVER_TUN4}")
        ping_step(topo, vpn.SERVER_TUN4, summary, "ping4")
        step(f"ping over IPv6 through the tunnel: {SERVER_TUN6}")
        ping_step(topo, SERVER_TUN6, summary, "ping6")

        for reverse in (False, True):
            direction = "server -> client" if reverse else "client -> server"
            step(f"iperf3: {TRANSFER}iB of TCP {direction} through the tunnel")
            mbps, sent, received, retrans = iperf_step(topo, workdir, reverse)
            # iperf3's receiver stops counting at the sender's end message: a few hundred kB may be
            # uncounted, though TCP delivered them (iperf3 exited 0).
            check(sent >= 100 * 1024 * 1024 and received >= 100_000_000,
                  f"iperf3 moved only {sent} bytes sent, {received} received")
            info(f"{sent / 1e6:.1f} MB sent, {received / 1e6:.1f} MB counted by the receiver "
                 f"at {mbps:.0f} Mbit/s ({retrans} TCP retransmits)")
            summary["download" if reverse else "upload"] = f"{mbps:.0f} Mbit/s ({sent / 1e6:.0f} MB)"

        step("vpnclient status")
        r = topo.run(topo.client, vpn.VPNCLIENT, "status", "--socket", str(client.socket), check=False)
        check(r.returncode == 0, f"vpnclient status failed: {r.stderr.strip()}")
        for line in r.stdout.splitlines():
            info(line)

        seen = sorted(set(seen_log.read_text().split()))
        check(seen == sorted({net.SERVERS4[0], net.SERVERS6[0]}), f"while connected the web host saw {seen}")
        summary["web_saw"] = seen
        info(f"while connected the web host saw only {', '.join(seen)}; never {net.HOME_OUT4} or {net.CLIENT6}")

        step("vpnclient down")
        r = topo.run(topo.client, vpn.VPNCLIENT, "down", "--socket", str(client.socket), check=False)
        check(r.returncode == 0, f"vpnclient down failed: {r.stderr.strip()}")
        code = vpn.wait_exit(client)
        check(code == 0, f"'vpnclient up' ended with status {code}\n{client.log_tail()}")
        check(not link_exists(client.interface, topo.client), f"{client.interface} still exists after down")
        info(f"'vpnclient up' exited 0 and {client.interface} is gone")
        web_step(topo, summary, "web4_after", net.HOME_OUT4, False, "after down: the home router's again")

        step("stopping vpnd (SIGTERM)")
        code = vpn.stop(topo, server)
        check(code == 0, f"vpnd ended with status {code}\n{server.log_tail()}")
        info("vpnd exited 0")
    finally:
        step("cleaning up: processes, namespaces, links")
        topo.close()


def main() -> int:
    if not is_root():
        print("demo: needs root (it creates network namespaces, veth pairs and TUN devices); "
              "run 'sudo make demo'", file=sys.stderr)
        return 1
    missing = [c for c in ("ip", "ping", "iperf3", "ss") if shutil.which(c) is None]
    if missing:
        print(f"demo: missing {', '.join(missing)}; run 'make deps-system'", file=sys.stderr)
        return 1
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="vpn-demo-"))
    summary: dict = {}
    error = None
    try:
        run(workdir, summary)
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as exc:   # one clear line (plus the daemon log it may carry), never a traceback
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DemoFailed) else str(exc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    left = [ns for ns in summary.get("namespaces", []) if ns in netns_list()]
    if left or workdir.exists():
        error = (error + "; " if error else "") + f"cleanup incomplete: {left or workdir}"
    if error:
        print(f"demo: FAILED: {error}", file=sys.stderr)
        return 1
    print()
    print("Summary")
    print(f"  tunnel addresses  {', '.join(summary['addresses'])}")
    print(f"  web host saw      {summary['web4']} and {summary['web6']} (the server's), "
          f"never {summary['web4_before']} or {summary['web6_before']} (the client's)")
    print(f"  ping IPv4         {summary['ping4']}")
    print(f"  ping IPv6         {summary['ping6']}")
    print(f"  TCP upload        {summary['upload']}")
    print(f"  TCP download      {summary['download']}")
    print(f"  cleaned up        namespaces, links, processes and {workdir}")
    print(f"  total time        {time.monotonic() - started:.1f} s")
    print("demo: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
