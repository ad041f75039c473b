"""The tunnels compared (DESIGN §7), each started on a fresh BenchTopology:

    tunnel  198.19.0.1 (server ns)  ·  198.19.0.2 (client ns), MTU 1420 for every tunnel

`veth` (no tunnel: the ceiling), `vpnd` (`vpnd serve` + `vpnclient up`, started with the tests'
helpers in tests/e2e/vpn.py), `wireguard-go`, `openvpn-aes` and `openvpn-chacha`. A starter returns a
`Tunnel` once a ping passes through it.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from tests.e2e import vpn

from .host import run, wait_until
from .topology import BenchTopology

SERVER_TUN, CLIENT_TUN = vpn.SERVER_TUN4, "198.19.0.2"
TUN_MTU = 1420


class Tunnel:
    """A running tunnel: where the server answers, and the PIDs whose CPU time counts."""

    def __init__(self, server_ip: str, pids: list[int], info: dict | None = None):
        self.server_ip, self.pids, self.info = server_ip, pids, info or {}


def wait_tunnel_ping(t: BenchTopology, ip: str, timeout: float = 20) -> bool:
    return wait_until(lambda: t.run(t.client, "ping", "-n", "-c1", "-W1", ip, check=False).returncode == 0,
                      timeout, 0.2)


def require_venv() -> None:
    for exe in (vpn.VPND, vpn.VPNCLIENT):
        if not os.path.exists(exe):
            raise RuntimeError(f"{exe} not found; run 'make venv' and the benchmark with .venv/bin/python")


def start_veth(t: BenchTopology) -> Tunnel:
    return Tunnel(t.link.server_ip4, [])


def start_vpnd(t: BenchTopology) -> Tunnel:
    require_venv()
    wd = Path(t.tmp)
    sk, ck = vpn.genkeys(), vpn.genkeys()
    config = vpn.write_server_config(wd / "vpnd.toml", sk, [ck], log_level="info", extra=f"mtu = {TUN_MTU}\n")
    s = vpn.start_server(t, wd, config=config, timeout=15)
    # the kill switch stays on (the product as users run it); resolver and state files in our folder
    c = vpn.start_client(t, t.client, wd, ck, sk.public, f"{t.link.server_ip4}:{vpn.PORT}", name="vpnclient")
    status = vpn.wait_connected(t, c, 20, server=s)
    if not any(a.startswith(CLIENT_TUN + "/") for a in status.get("addresses") or []):
        raise RuntimeError(f"vpnclient established without {CLIENT_TUN} (status {status})")
    if not wait_tunnel_ping(t, SERVER_TUN):
        raise RuntimeError(f"vpnd tunnel established but ping {SERVER_TUN} fails")
    return Tunnel(SERVER_TUN, [s.pid, c.pid], {"client_status": status})


def start_wireguard_go(t: BenchTopology, listen_port: int = 51820) -> Tunnel:
    sk, ck = run(["wg", "genkey"]).stdout.strip(), run(["wg", "genkey"]).stdout.strip()
    spub = run(["wg", "pubkey"], input=sk).stdout.strip()
    cpub = run(["wg", "pubkey"], input=ck).stdout.strip()
    # The UAPI socket lives in the (shared) file system: one name per side and per topology.
    sif, cif = f"wgs{t.suffix}", f"wgc{t.suffix}"
    confs = {
        sif: f"[Interface]\nPrivateKey = {sk}\nListenPort = {listen_port}\n\n"
             f"[Peer]\nPublicKey = {cpub}\nAllowedIPs = {CLIENT_TUN}/32\n",
        cif: f"[Interface]\nPrivateKey = {ck}\n\n"
             f"[Peer]\nPublicKey = {spub}\nEndpoint = {t.link.server_ip4}:{listen_port}\n"
             f"AllowedIPs = 198.19.0.0/24\n",
    }
    pids = []
    for ns, ifname, addr in ((t.server, sif, SERVER_TUN), (t.client, cif, CLIENT_TUN)):
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


def _cert(t: BenchTopology, name: str) -> str:
    """Self-signed P-256 certificate + key in tmp; returns its SHA-256 fingerprint."""
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", t.path(f"{name}.key"), "-out", t.path(f"{name}.crt"), "-days", "2", "-subj", f"/CN={name}"])
    out = run(["openssl", "x509", "-in", t.path(f"{name}.crt"), "-noout", "-fingerprint", "-sha256"]).stdout
    return out.strip().split("=", 1)[1]


def start_openvpn(t: BenchTopology, cipher: str, port: int = 1194) -> Tunnel:
    sfp, cfp = _cert(t, "server"), _cert(t, "client")
    server_ul = t.link.server_ip4
    common = ["--dev-type", "tun", "--proto", "udp4", "--dh", "none", "--data-ciphers", cipher,
              "--disable-dco", "--tun-mtu", str(TUN_MTU), "--verb", "3", "--auth-nocache"]
    s = t.popen(t.server, "openvpn", "--dev", "tunovs", *common, "--tls-server", "--local", server_ul,
                "--lport", str(port), "--cert", t.path("server.crt"), "--key", t.path("server.key"),
                "--peer-fingerprint", cfp, "--ifconfig", SERVER_TUN, CLIENT_TUN, log="ovpn-s.log")
    c = t.popen(t.client, "openvpn", "--dev", "tunovc", *common, "--tls-client", "--nobind",
                "--remote", server_ul, str(port), "--cert", t.path("client.crt"), "--key", t.path("client.key"),
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
ALL_VPNS = list(STARTERS)
TUNNEL_UDP_PORT = {"vpnd": vpn.PORT, "wireguard-go": 51820, "openvpn-aes": 1194, "openvpn-chacha": 1194}


def commands_for(vpns) -> list[str]:
    """The programs a run of these VPNs needs (for host.prepare)."""
    need = ["ip", "iperf3", "ping"]
    need += ["wireguard-go", "wg"] if "wireguard-go" in vpns else []
    need += ["openvpn", "openssl"] if any(v.startswith("openvpn") for v in vpns) else []
    return need


def parse_vpns(ap, text: str) -> list[str]:
    """A --vpns list, checked against STARTERS (ap.error otherwise)."""
    vpns = text.split(",")
    bad = [v for v in vpns if v not in STARTERS]
    if bad:
        ap.error(f"unknown VPN(s) {bad}; choose from {ALL_VPNS}")
    return vpns


def start_vpnd_config(t: BenchTopology, config: str, log: str, timeout: float = 120):
    """`vpnd serve` with a config of the caller's (scale.py: 10,000 keys, IPv6 pool only), ready once
    its log says started. Returns (process, seconds to start)."""
    require_venv()
    t0 = time.monotonic()
    p = t.popen(t.server, vpn.VPND, "serve", "--config", config, log=log)
    if not wait_until(lambda: "started" in t.log(log) or p.poll() is not None, timeout):
        raise RuntimeError(f"vpnd did not start in {timeout:.0f} s: {t.log(log)[-300:]}")
    if p.poll() is not None:
        raise RuntimeError(f"vpnd exited ({p.returncode}): {t.log(log)[-300:]}")
    return p, time.monotonic() - t0
