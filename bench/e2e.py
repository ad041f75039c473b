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

Needs root. Cleans up namespaces, processes (only its own, by PID) and temp files on every exit path,
Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")

SERVER_UL, CLIENT_UL = "198.18.0.1", "198.18.0.2"
SERVER_TUN, CLIENT_TUN = "198.19.0.1", "198.19.0.2"
TUN_MTU = 1420
UDP_LEN = TUN_MTU - 28          # one IPv4/UDP datagram that fits the tunnel MTU unfragmented
UDP_RATE = "2G"
IPERF_PORT = 5201
PING_INTERVAL = 0.01

ALL_VPNS = ["veth", "vpnd", "wireguard-go", "openvpn-aes", "openvpn-chacha"]
QUICK_VPNS = ["veth", "vpnd", "wireguard-go", "openvpn-aes"]
NS_PREFIX = "vpnb-"


# --------------------------------------------------------------------------------------------------
# helpers

def venv_bin() -> str:
    """Where vpnd/vpnclient live: next to the running interpreter (make runs us with the venv's)."""
    here = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(here, "vpnd")):
        return here
    return os.path.join(REPO, ".venv", "bin")


def run(argv, *, check=True, timeout=30, input=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")
    return r


def wait_until(pred, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C, so every `finally` (teardown) runs."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)


def require_root(prog: str) -> None:
    if os.geteuid() != 0:
        print(f"{prog}: needs root (creates network namespaces, veth pairs and TUN devices); "
              f"run it with sudo or as root", file=sys.stderr)
        sys.exit(1)


def require_commands(names) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        print(f"missing commands: {' '.join(missing)}; run 'make deps-bench' first", file=sys.stderr)
        sys.exit(1)


LOCK_PATH = "/run/lock/vpnbench.lock"


def bench_lock(timeout: float = 1800):
    """Hold an exclusive lock while benchmarking (two benchmarks at once measure each other).
    Waits at most `timeout` seconds; the lock is released when the process exits."""
    import fcntl
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    f = open(LOCK_PATH, "a")
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.close()
                print(f"another benchmark holds {LOCK_PATH} for more than {timeout:.0f} s; giving up",
                      file=sys.stderr)
                sys.exit(1)
            if not told:
                print(f"waiting for another benchmark to finish ({LOCK_PATH}) ...", file=sys.stderr)
                told = True
            time.sleep(1)


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])     # fields 14 and 15 of proc(5)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values, p: float):
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


# --------------------------------------------------------------------------------------------------
# topology

class Topology:
    """Two namespaces joined by one veth pair; owns every process it starts and a temp directory.

    `segment=True` sets gso_max_segs 1 on both veth ends: GSO trains are segmented before the veth, so
    every datagram is its own packet on the underlay (see the README: "underlay modes").

    Names are unique (`vpnb-<hex>-s`, `vpnb-<hex>-c`, veth `vbs<hex>`/`vbc<hex>`). `close()` (idempotent)
    ends our processes by PID (SIGTERM, 5 s, SIGKILL), deletes the namespaces (which takes the veth
    and TUN devices with them), any veth left in the root namespace, and the temp directory.
    """

    def __init__(self, segment: bool = False) -> None:
        sfx = secrets.token_hex(3)
        self.segment = segment
        self.srv, self.cli = f"{NS_PREFIX}{sfx}-s", f"{NS_PREFIX}{sfx}-c"
        self.srv_if, self.cli_if = f"vbs{sfx}", f"vbc{sfx}"
        self.sfx = sfx
        self.tmp = tempfile.mkdtemp(prefix="vpnbench-")
        self.procs: list[subprocess.Popen] = []
        self._ns: list[str] = []
        self._files: list[str] = []       # files outside tmp we may have caused (UAPI sockets)
        self._closed = False
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        for ns in (self.srv, self.cli):
            run(["ip", "netns", "add", ns])
            self._ns.append(ns)
            self.run(ns, "ip", "link", "set", "lo", "up")
        run(["ip", "link", "add", "name", self.cli_if, "netns", self.cli, "type", "veth",
             "peer", "name", self.srv_if, "netns", self.srv])
        for ns, ifname, addr in ((self.srv, self.srv_if, SERVER_UL), (self.cli, self.cli_if, CLIENT_UL)):
            self.run(ns, "ip", "addr", "add", f"{addr}/24", "dev", ifname)
            if self.segment:
                # Every GSO skb (a UDP_SEGMENT train, a TSO burst) is cut into wire-sized packets before
                # it enters the veth, as on a real link; by default veth carries 64 KiB skbs whole.
                self.run(ns, "ip", "link", "set", "dev", ifname, "gso_max_segs", "1")
            self.run(ns, "ip", "link", "set", ifname, "up")
        if not wait_until(lambda: self.run(self.cli, "ping", "-c1", "-W1", SERVER_UL,
                                           check=False).returncode == 0, 10):
            raise RuntimeError("underlay veth does not pass ping")

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def run(self, ns, *argv, check=True, timeout=30, input=None):
        return run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout, input=input)

    def popen(self, ns, *argv, log: str | None = None) -> subprocess.Popen:
        """Start argv in ns (ip netns exec execs: the PID is the program's), output to tmp/<log>."""
        out = open(self.path(log), "ab") if log else subprocess.DEVNULL
        try:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *map(str, argv)], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT)
        finally:
            if log:
                out.close()
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        try:
            with open(self.path(name), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def remember_file(self, path: str) -> None:
        self._files.append(path)

    @staticmethod
    def stop(p: subprocess.Popen, timeout: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A second Ctrl-C/SIGTERM must not cut the teardown short: hold signals until it is done.
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self._teardown()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _teardown(self) -> None:
        errors = []
        for p in reversed(self.procs):     # clients before servers: started later, stopped first
            try:
                self.stop(p)
            except Exception as e:          # keep tearing down
                errors.append(f"pid {p.pid}: {e}")
        for ns in reversed(self._ns):
            r = run(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0:
                errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
        for ifname in (self.srv_if, self.cli_if):
            if run(["ip", "link", "show", "dev", ifname], check=False).returncode == 0:
                run(["ip", "link", "del", "dev", ifname], check=False)
        for f in self._files:
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
            except OSError as e:
                errors.append(f"unlink {f}: {e}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            print("warning: cleanup: " + "; ".join(errors), file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------------
# the VPNs

class Tunnel:
    """A running tunnel: where the server answers, and the PIDs whose CPU time counts."""

    def __init__(self, server_ip: str, pids: list[int], info: dict | None = None):
        self.server_ip, self.pids, self.info = server_ip, pids, info or {}


def wait_tunnel_ping(t: Topology, ip: str, timeout: float = 20) -> bool:
    return wait_until(lambda: t.run(t.cli, "ping", "-n", "-c1", "-W1", ip, check=False).returncode == 0,
                      timeout, 0.2)


def start_veth(t: Topology) -> Tunnel:
    return Tunnel(SERVER_UL, [])


def start_vpnd(t: Topology, listen_port: int = 51820) -> Tunnel:
    vb = venv_bin()
    vpnd, vpnclient = os.path.join(vb, "vpnd"), os.path.join(vb, "vpnclient")
    for exe in (vpnd, vpnclient):
        if not os.path.exists(exe):
            raise RuntimeError(f"{exe} not found; run 'make venv' first")
    sk = run([vpnd, "genkey"]).stdout.strip()
    ck = run([vpnd, "genkey"]).stdout.strip()
    spub = run([vpnd, "pubkey"], input=sk).stdout.strip()
    cpub = run([vpnd, "pubkey"], input=ck).stdout.strip()
    sock = t.path("c.sock")
    with open(t.path("vpnd.toml"), "w") as f:
        f.write(f'[server]\nprivate_key = "{sk}"\nlisten = ["0.0.0.0:{listen_port}"]\n'
                f'interface = "vpnd0"\naddress_pool4 = "198.19.0.0/24"\nmtu = {TUN_MTU}\n'
                f'log_level = "info"\ncontrol_socket = "{t.path("vpnd.sock")}"\n\n'
                f'[[client]]\npublic_key = "{cpub}"\n')
    with open(t.path("resolv.conf"), "w") as f:
        f.write("nameserver 198.18.0.1\n")
    with open(t.path("vpnclient.toml"), "w") as f:
        # the kill switch stays on (the product as users run it); resolver and state files in our folder
        f.write(f'[client]\nprivate_key = "{ck}"\ninterface = "vpn0"\ncontrol_socket = "{sock}"\n'
                f'resolv_conf = "{t.path("resolv.conf")}"\nstate_dir = "{t.path("state")}"\n\n'
                f'[server]\nendpoint = "{SERVER_UL}:{listen_port}"\npublic_key = "{spub}"\n')
    s = t.popen(t.srv, vpnd, "serve", "--config", t.path("vpnd.toml"), log="vpnd.log")
    if not wait_until(lambda: "started" in t.log("vpnd.log") or s.poll() is not None, 15):
        raise RuntimeError("vpnd did not start within 15 s: " + t.log("vpnd.log")[-500:])
    if s.poll() is not None:
        raise RuntimeError(f"vpnd exited ({s.returncode}): " + t.log("vpnd.log")[-500:])
    c = t.popen(t.cli, vpnclient, "up", "--config", t.path("vpnclient.toml"), log="vpnclient.log")
    status = {}

    def established():
        nonlocal status
        if c.poll() is not None or not os.path.exists(sock):
            return False
        r = t.run(t.cli, vpnclient, "status", "--socket", sock, "--json", check=False, timeout=10)
        try:
            status = json.loads(r.stdout)
        except ValueError:
            return False
        return status.get("state") == "established" and any(
            a.startswith(CLIENT_TUN + "/") for a in status.get("addresses") or [])

    if not wait_until(established, 20, 0.2):
        raise RuntimeError(f"vpnclient not established with {CLIENT_TUN} within 20 s (status {status}); "
                           f"client log: {t.log('vpnclient.log')[-400:]!r}; server log: "
                           f"{t.log('vpnd.log')[-400:]!r}")
    if not wait_tunnel_ping(t, SERVER_TUN):
        raise RuntimeError("vpnd tunnel established but ping 198.19.0.1 fails")
    return Tunnel(SERVER_TUN, [s.pid, c.pid], {"client_status": status})


def start_wireguard_go(t: Topology, listen_port: int = 51820) -> Tunnel:
    sk, ck = run(["wg", "genkey"]).stdout.strip(), run(["wg", "genkey"]).stdout.strip()
    spub = run(["wg", "pubkey"], input=sk).stdout.strip()
    cpub = run(["wg", "pubkey"], input=ck).stdout.strip()
    # The UAPI socket lives in the (shared) file system: one name per side and per topology.
    sif, cif = f"wgs{t.sfx}", f"wgc{t.sfx}"
    confs = {
        sif: f"[Interface]\nPrivateKey = {sk}\nListenPort = {listen_port}\n\n"
             f"[Peer]\nPublicKey = {cpub}\nAllowedIPs = {CLIENT_TUN}/32\n",
        cif: f"[Interface]\nPrivateKey = {ck}\n\n"
             f"[Peer]\nPublicKey = {spub}\nEndpoint = {SERVER_UL}:{listen_port}\nAllowedIPs = 198.19.0.0/24\n",
    }
    pids = []
    for ns, ifname, addr in ((t.srv, sif, SERVER_TUN), (t.cli, cif, CLIENT_TUN)):
        uapi = f"/var/run/wireguard/{ifname}.sock"
        t.remember_file(uapi)
        p = t.popen(ns, "wireguard-go", "-f", ifname, log=f"{ifname}.log")
        pids.append(p.pid)
        if not wait_until(lambda: os.path.exists(uapi) or p.poll() is not None, 10):
            raise RuntimeError(f"wireguard-go {ifname}: no UAPI socket within 10 s: {t.log(ifname + '.log')[-400:]}")
        if p.poll() is not None:
            raise RuntimeError(f"wireguard-go exited ({p.returncode}): {t.log(ifname + '.log')[-400:]}")
        with open(t.path(f"{ifname}.conf"), "w") as f:
            f.write(confs[ifname])
        t.run(ns, "wg", "setconf", ifname, t.path(f"{ifname}.conf"))
        t.run(ns, "ip", "addr", "add", f"{addr}/24", "dev", ifname)
        t.run(ns, "ip", "link", "set", ifname, "mtu", str(TUN_MTU), "up")
    if not wait_tunnel_ping(t, SERVER_TUN):
        raise RuntimeError("wireguard-go tunnel does not pass ping")
    return Tunnel(SERVER_TUN, pids)


def _cert(t: Topology, name: str) -> str:
    """Self-signed P-256 certificate + key in tmp; returns its SHA-256 fingerprint."""
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", t.path(f"{name}.key"), "-out", t.path(f"{name}.crt"), "-days", "2", "-subj", f"/CN={name}"])
    out = run(["openssl", "x509", "-in", t.path(f"{name}.crt"), "-noout", "-fingerprint", "-sha256"]).stdout
    return out.strip().split("=", 1)[1]


def start_openvpn(t: Topology, cipher: str, port: int = 1194) -> Tunnel:
    sfp, cfp = _cert(t, "server"), _cert(t, "client")
    common = ["--dev-type", "tun", "--proto", "udp4", "--dh", "none", "--data-ciphers", cipher,
              "--disable-dco", "--tun-mtu", str(TUN_MTU), "--verb", "3", "--auth-nocache"]
    s = t.popen(t.srv, "openvpn", "--dev", "tunovs", *common, "--tls-server", "--local", SERVER_UL,
                "--lport", str(port), "--cert", t.path("server.crt"), "--key", t.path("server.key"),
                "--peer-fingerprint", cfp, "--ifconfig", SERVER_TUN, CLIENT_TUN, log="ovpn-s.log")
    c = t.popen(t.cli, "openvpn", "--dev", "tunovc", *common, "--tls-client", "--nobind",
                "--remote", SERVER_UL, str(port), "--cert", t.path("client.crt"), "--key", t.path("client.key"),
                "--peer-fingerprint", sfp, "--ifconfig", CLIENT_TUN, SERVER_TUN, log="ovpn-c.log")
    done = "Initialization Sequence Completed"
    if not wait_until(lambda: (done in t.log("ovpn-s.log") and done in t.log("ovpn-c.log"))
                      or s.poll() is not None or c.poll() is not None, 30, 0.2):
        raise RuntimeError("openvpn not ready in 30 s: " + t.log("ovpn-c.log")[-400:])
    if s.poll() is not None or c.poll() is not None:
        raise RuntimeError("openvpn exited: " + (t.log("ovpn-s.log") + t.log("ovpn-c.log"))[-600:])
    m = re.search(r"Data Channel: cipher '([^']+)'", t.log("ovpn-c.log"))
    negotiated = m.group(1) if m else None
    if negotiated and negotiated != cipher:
        raise RuntimeError(f"openvpn negotiated {negotiated}, not {cipher}")
    if not wait_tunnel_ping(t, SERVER_TUN):
        raise RuntimeError("openvpn tunnel does not pass ping")
    return Tunnel(SERVER_TUN, [s.pid, c.pid], {"data_cipher": negotiated})


STARTERS = {
    "veth": start_veth,
    "vpnd": start_vpnd,
    "wireguard-go": start_wireguard_go,
    "openvpn-aes": lambda t: start_openvpn(t, "AES-256-GCM"),
    "openvpn-chacha": lambda t: start_openvpn(t, "CHACHA20-POLY1305"),
}
TUNNEL_UDP_PORT = {"vpnd": 51820, "wireguard-go": 51820, "openvpn-aes": 1194, "openvpn-chacha": 1194}


# --------------------------------------------------------------------------------------------------
# measurements

class IperfServer:
    """A one-off iperf3 server (-1) in the server namespace, started per test: a failed test cannot
    leave a busy server behind."""

    def __init__(self, t: Topology, port: int = IPERF_PORT):
        self.t, self.port = t, port
        self.log = f"iperf3-s-{secrets.token_hex(3)}.log"
        self.p = t.popen(t.srv, "iperf3", "-s", "-1", "-p", str(port), log=self.log)

        def listening():
            r = t.run(t.srv, "ss", "-Hltn", f"sport = :{port}", check=False)
            return r.returncode == 0 and f":{port}" in r.stdout

        if not wait_until(lambda: self.p.poll() is not None or listening(), 10, 0.05) or self.p.poll() is not None:
            raise RuntimeError("iperf3 server did not start: " + t.log(self.log)[-300:])

    def finish(self) -> None:
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.t.stop(self.p)


def iperf(t: Topology, server_ip: str, seconds: float, *args: str) -> dict:
    srv = IperfServer(t)
    try:
        r = t.run(t.cli, "iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
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


def tcp_test(t: Topology, tun: Tunnel, seconds: float, *args: str) -> dict:
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


def udp_test(t: Topology, tun: Tunnel, seconds: float) -> dict:
    d = iperf(t, tun.server_ip, seconds, "-u", "-b", UDP_RATE, "-l", str(UDP_LEN))
    sent, recv = d["end"]["sum_sent"], d["end"]["sum_received"]
    return {"recv_mbps": recv["bits_per_second"] / 1e6, "sent_mbps": sent["bits_per_second"] / 1e6,
            "loss_pct": recv.get("lost_percent"), "packets": recv.get("packets")}


PING_RE = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")


def ping_test(t: Topology, ip: str, count: int) -> dict:
    deadline = int(count * PING_INTERVAL + 10)
    r = t.run(t.cli, "ping", "-n", "-i", str(PING_INTERVAL), "-c", str(count), "-W", "2", "-w", str(deadline),
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


def loaded_ping_test(t: Topology, tun: Tunnel, seconds: float) -> dict:
    """ping while one TCP stream uploads (client -> server): the queueing delay a user would feel."""
    srv = IperfServer(t)
    load = t.popen(t.cli, "iperf3", "-c", tun.server_ip, "-p", str(IPERF_PORT), "-t", str(seconds + 2),
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


def measure(t: Topology, tun: Tunnel, seconds: float) -> dict:
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
    return out


def run_one(vpn: str, seconds: float, segment: bool = False) -> dict:
    """One repetition of one VPN on a fresh topology; errors are recorded, never raised (but Ctrl-C is)."""
    t0 = time.monotonic()
    load_before = loadavg()
    try:
        with Topology(segment) as t:
            tun = STARTERS[vpn](t)
            res = measure(t, tun, seconds)
            res["info"] = tun.info
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}"}
    res["wall_s"] = time.monotonic() - t0
    res["loadavg_before"], res["loadavg_after"] = load_before, loadavg()
    return res


# --------------------------------------------------------------------------------------------------
# summary, results files

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
    vb = venv_bin()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "python": first([os.path.join(vb, "python"), "--version"], r"Python (\S+)") or platform.python_version(),
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


# --------------------------------------------------------------------------------------------------

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
    vpns = args.vpns.split(",") if args.vpns else (QUICK_VPNS if args.quick else ALL_VPNS)
    bad = [v for v in vpns if v not in STARTERS]
    if bad:
        ap.error(f"unknown VPN(s) {bad}; choose from {ALL_VPNS}")
    if args.reps < 1 or not 1 <= args.seconds <= 120:
        ap.error("--reps must be >= 1 and --seconds from 1 to 120")
    require_root("bench/e2e.py")
    need = ["ip", "iperf3", "ping"]
    need += ["wireguard-go", "wg"] if "wireguard-go" in vpns else []
    need += ["openvpn", "openssl"] if any(v.startswith("openvpn") for v in vpns) else []
    require_commands(need)
    install_signal_handlers()
    lock = bench_lock()   # noqa: F841 (held until exit)

    machine = machine_info()
    raw: dict[str, list] = {v: [] for v in vpns}
    started = time.monotonic()
    for rep in range(args.reps):
        for v in vpns:
            print(f"[rep {rep + 1}/{args.reps}] {v} ...", end=" ", flush=True)
            res = run_one(v, args.seconds, args.segment_underlay)
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
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: cleaned up", file=sys.stderr)
        sys.exit(130)
