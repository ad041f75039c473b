"""vpncore.proto.wireguard against the stock wireguard-go (issue 15, part 1).

Client namespace: `wireguard-go -f wgXXXX` configured with `wg setconf`, tunnel 198.19.0.2/24.
Server namespace: tests/e2e/wg_peer.py (our module + a UDP socket on 51820, tunnel 198.19.0.1),
which answers ICMP echo requests itself. Kernel `ping` through wireguard-go must get its replies:
  - wireguard-go initiates, we respond;
  - the same with our responder under load: wireguard-go must take our cookie reply and come back
    with a valid mac2 (its retry after REKEY_TIMEOUT, ~5 s);
  - we initiate towards wireguard-go listening, and our echo requests are answered by its kernel.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.netns import Topology, require_root, wait_until
from vpncore.proto.noise import public_key

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("wg_peer.py")
SERVER_TUN, CLIENT_TUN = "198.19.0.1", "198.19.0.2"
PORT = 51820


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _keypair() -> tuple[str, str]:
    private = bytearray(os.urandom(32))
    private[0] &= 248
    private[31] = (private[31] & 127) | 64
    return _b64(bytes(private)), _b64(public_key(bytes(private)))


@pytest.fixture
def wg_topology():
    require_root()
    missing = [c for c in ("wireguard-go", "wg") if shutil.which(c) is None]
    if missing:
        pytest.fail(f"missing {' '.join(missing)}: apt-get install -y --no-install-recommends "
                    "wireguard-go wireguard-tools", pytrace=False)
    topo = Topology(clients=1)
    ifname = f"wg{topo.suffix}"
    try:
        yield topo, ifname
    finally:
        try:
            topo.close()
        finally:
            for leftover in (f"/var/run/wireguard/{ifname}.sock", f"/var/run/wireguard/{ifname}.name"):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass


def _start_wireguard_go(topo: Topology, ifname: str, tmp: Path, conf: str):
    log = open(tmp / "wireguard-go.log", "wb")
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="verbose")
    proc = topo.popen(topo.client, "env", *(f"{k}={env[k]}" for k in ("WG_PROCESS_FOREGROUND", "LOG_LEVEL")),
                      "wireguard-go", "-f", ifname, stdout=log, stderr=subprocess.STDOUT)
    uapi = f"/var/run/wireguard/{ifname}.sock"
    assert wait_until(lambda: os.path.exists(uapi) or proc.poll() is not None, 10), "no UAPI socket"
    assert proc.poll() is None, (tmp / "wireguard-go.log").read_text()
    (tmp / "wg.conf").write_text(conf)
    topo.run(topo.client, "wg", "setconf", ifname, str(tmp / "wg.conf"))
    topo.run(topo.client, "ip", "addr", "add", f"{CLIENT_TUN}/24", "dev", ifname)
    topo.run(topo.client, "ip", "link", "set", ifname, "mtu", "1420", "up")
    return proc


def _start_driver(topo: Topology, tmp: Path, *args: str, name: str = "driver"):
    out = open(tmp / f"{name}.log", "wb")
    return topo.popen(topo.server, sys.executable, str(DRIVER), *args, stdout=out, stderr=subprocess.STDOUT,
                      cwd=str(ROOT))


def _log(tmp: Path, name: str) -> str:
    p = tmp / f"{name}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def _ping(topo: Topology, deadline: int = 10) -> subprocess.CompletedProcess:
    return topo.run(topo.client, "ping", "-n", "-c", "3", "-i", "0.5", "-w", str(deadline), SERVER_TUN,
                    check=False, timeout=deadline + 10)


def _received(ping_out: str) -> int:
    m = re.search(r"(\d+) received", ping_out)
    return int(m.group(1)) if m else 0


def _responder_case(wg_topology, tmp_path, under_load: bool, psk: str | None = None, keepalive: bool = False):
    topo, ifname = wg_topology
    our_priv, our_pub = _keypair()
    their_priv, their_pub = _keypair()
    driver = _start_driver(topo, tmp_path, "--private-key", our_priv, "--peer-public", their_pub,
                           "--listen", f"0.0.0.0:{PORT}", "--tunnel-ip", SERVER_TUN,
                           *(["--under-load"] if under_load else []), *(["--psk", psk] if psk else []))
    assert wait_until(lambda: "ready" in _log(tmp_path, "driver") or driver.poll() is not None, 10), \
        _log(tmp_path, "driver")
    conf = (f"[Interface]\nPrivateKey = {their_priv}\n\n"
            f"[Peer]\nPublicKey = {our_pub}\nEndpoint = {topo.link.server_ip4}:{PORT}\n"
            f"AllowedIPs = {SERVER_TUN}/32\n"
            + (f"PresharedKey = {psk}\n" if psk else "") + ("PersistentKeepalive = 1\n" if keepalive else ""))
    _start_wireguard_go(topo, ifname, tmp_path, conf)
    r = _ping(topo, deadline=20 if under_load else 10)
    print(r.stdout)
    log = _log(tmp_path, "driver")
    # with -w, ping keeps sending until 3 replies came: under load the queued ones arrive together
    assert _received(r.stdout) >= 3 and r.returncode == 0, f"{r.stdout}\n--- driver:\n{log}\n--- wireguard-go:\n" \
                                     f"{_log(tmp_path, 'wireguard-go')[-3000:]}"
    assert "handshake responder" in log
    assert log.count("echo-reply") >= 3
    show = topo.run(topo.client, "wg", "show", ifname, "latest-handshakes").stdout
    assert our_pub in show and not show.strip().endswith("\t0")
    return log


def test_wireguard_go_initiates_ping_answered(wg_topology, tmp_path):
    log = _responder_case(wg_topology, tmp_path, under_load=False)
    assert "cookie-sent" not in log


def test_wireguard_go_with_psk_and_keepalives(wg_topology, tmp_path):
    log = _responder_case(wg_topology, tmp_path, under_load=False, psk=_b64(os.urandom(32)), keepalive=True)
    assert wait_until(lambda: "keepalive" in _log(tmp_path, "driver"), 5), log


def test_wireguard_go_takes_our_cookie_under_load(wg_topology, tmp_path):
    log = _responder_case(wg_topology, tmp_path, under_load=True)
    # the first initiation (mac2 zero) got a cookie reply; a later one carried a valid mac2
    assert "cookie-sent" in log
    assert log.index("cookie-sent") < log.index("handshake responder")


def test_we_initiate_towards_wireguard_go(wg_topology, tmp_path):
    topo, ifname = wg_topology
    our_priv, our_pub = _keypair()
    their_priv, their_pub = _keypair()
    conf = (f"[Interface]\nPrivateKey = {their_priv}\nListenPort = {PORT}\n\n"
            f"[Peer]\nPublicKey = {our_pub}\nAllowedIPs = {SERVER_TUN}/32\n")
    _start_wireguard_go(topo, ifname, tmp_path, conf)
    driver = _start_driver(topo, tmp_path, "--private-key", our_priv, "--peer-public", their_pub,
                           "--listen", "0.0.0.0:0", "--tunnel-ip", SERVER_TUN,
                           "--initiate", f"{topo.link.client_ip4}:{PORT}", "--ping", CLIENT_TUN, "--count", "3")
    try:
        rc = driver.wait(40)
    except subprocess.TimeoutExpired:
        rc = None
    log = _log(tmp_path, "driver")
    assert rc == 0, f"driver rc={rc}\n{log}\n--- wireguard-go:\n{_log(tmp_path, 'wireguard-go')[-3000:]}"
    assert "handshake initiator" in log and "done 3 of 3" in log
