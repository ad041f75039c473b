"""Issue 12, client side, end to end: full tunnel with the server off-link, cleanup, a kill switch
that fails closed, and the client's choices (exclude, allow_lan, bypass).

Topology (tests/e2e/paths.py RoutedPath with the "attacker" namespace as a host beyond the server):

    client 198.18.210.2 -- .1 router 198.18.201.2 -- 198.18.201.1 server 198.18.202.1 -- 198.18.202.2 beyond
                                                                                          203.0.113.7 (lo)

vpnd refuses to forward to its own networks (198.18.201-202), so the host beyond answers on
203.0.113.7, which the server routes via 198.18.202.2. The client's default route goes via the
router, which has no route to 203.0.113.0/24 and none to the tunnel pool: a ping to the host
beyond the server answers only through the tunnel, and a ping to
the router's outside addresses only outside it (their replies to a tunnel address have no way back).
vpnd pushes 0.0.0.0/0 and ::/0; the server namespace forwards by hand (no NAT needed: the host
beyond routes back through the server).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e import vpn
from tests.e2e.netns import require_root, wait_until
from tests.e2e.paths import ATTACKER, ROUTER_OUT, SERVER_OUT, RoutedPath

pytestmark = pytest.mark.netns

BEYOND = "203.0.113.7"                # a host behind the server (on the attacker namespace's lo)
ROUTER_OUT3 = "198.18.201.3"          # the router's second outside address (bypass target)
PUSH = 'push_routes = ["0.0.0.0/0", "::/0"]\n'
KS_TABLE = ("inet", "vpnclient_killswitch")


@pytest.fixture
def net(tmp_path):
    require_root()
    topo = RoutedPath(clients=1, attacker=True)
    try:
        topo.run(topo.server, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        topo.add_address(topo.attacker, "lo", f"{BEYOND}/32")
        topo.run(topo.server, "ip", "route", "add", f"{BEYOND}/32", "via", ATTACKER)
        # the "before" snapshot must not race the kernel adding the underlay's link-local address
        assert wait_until(lambda: _link_local_ready(topo, topo.clients[0]), 10)
        topo.add_address(topo.router, topo.router_out_if, f"{ROUTER_OUT3}/24")
        yield topo
    finally:
        topo.close()


def _link_local_ready(topo, ns) -> bool:
    out = topo.run(ns, "ip", "-6", "addr", "show", "scope", "link").stdout
    return "fe80::" in out and "tentative" not in out


def tables(topo, ns) -> str:
    """Everything the full tunnel may touch, as text: rules, every routing table, the sysctl, nft."""
    parts = []
    for argv in (["ip", "rule"], ["ip", "-6", "rule"], ["ip", "route", "show", "table", "all"],
                 ["ip", "-6", "route", "show", "table", "all"], ["nft", "list", "ruleset"],
                 ["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"]):
        parts.append(topo.run(ns, *argv).stdout)
    return "\n".join(parts)


def start(topo, wd: Path, ckeys, skeys, extra: str = "", nsenter: bool = False, name: str = "cl") -> vpn.Daemon:
    """`vpnclient up` in the client namespace with extra [client] lines (or under nsenter, which keeps
    the host's /sys and so its cgroup v2 mount, for bypass)."""
    ns = topo.clients[0]
    sock = wd / f"{name}.sock"
    cfg = vpn.write_client_config(wd / f"{name}.toml", ckeys, skeys.public, f"{SERVER_OUT}:{vpn.PORT}", sock)
    text = cfg.read_text().replace("[client]\n", "[client]\n" + extra, 1)
    cfg.write_text(text)
    argv = [vpn.VPNCLIENT, "up", "--config", str(cfg), "--log-level", "verbose"]
    log = wd / f"{name}.log"
    with open(log, "ab") as out:
        if nsenter:
            proc = topo.popen(None, "nsenter", f"--net=/run/netns/{ns}", *argv, stdout=out,
                              stderr=subprocess.STDOUT)
        else:
            proc = topo.popen(ns, *argv, stdout=out, stderr=subprocess.STDOUT)
    return vpn.Daemon(name, ns, cfg, log, proc, vpn.CLIENT_IF, sock)


def client_cmd(topo, d: vpn.Daemon, *args: str) -> subprocess.CompletedProcess:
    return topo.run(d.ns, vpn.VPNCLIENT, *args, "--config", str(d.config), check=False)


def ks_present(topo, ns) -> bool:
    return topo.run(ns, "nft", "list", "table", *KS_TABLE, check=False).returncode == 0


def route_dev(topo, ns, dst: str, *fam: str) -> str:
    words = topo.run(ns, "ip", *fam, "route", "get", *dst.split()).stdout.split()
    return words[words.index("dev") + 1]


def up_and_connected(net, tmp_path, extra: str = "", nsenter: bool = False):
    skeys, ckeys = vpn.genkeys(), vpn.genkeys()
    server = vpn.start_server(net, tmp_path, skeys, [ckeys], extra=PUSH)
    client = start(net, tmp_path, ckeys, skeys, extra, nsenter=nsenter)
    st = vpn.wait_connected(net, client, server=server)
    assert wait_until(lambda: vpn.status(net, client).get("full_tunnel") == ["IPv4", "IPv6"], 5), \
        client.log_tail()
    return server, client, st, (skeys, ckeys)


def test_full_tunnel_off_link_and_clean_after_down_and_sigkill(net, tmp_path):
    ns = net.clients[0]
    before = tables(net, ns)
    server, client, st, _ = up_and_connected(net, tmp_path)
    # the handshake went to an off-link server while 0.0.0.0/0 was pushed: the endpoint is exempt by mark
    assert vpn.ping(net, ns, BEYOND, count=2).returncode == 0, client.log_tail()
    assert route_dev(net, ns, BEYOND) == vpn.CLIENT_IF
    assert route_dev(net, ns, "2001:db8::1", "-6") == vpn.CLIENT_IF
    assert route_dev(net, ns, SERVER_OUT) == vpn.CLIENT_IF          # unmarked, the server is in the tunnel,
    assert route_dev(net, ns, f"{SERVER_OUT} mark 0xca6c") != vpn.CLIENT_IF    # the tunnel's socket is not
    main = net.run(ns, "ip", "route", "show", "table", "main").stdout
    assert "default via" in main and f"default dev {vpn.CLIENT_IF}" not in main    # main table untouched
    assert net.run(ns, "sysctl", "-n", "net.ipv4.conf.all.src_valid_mark").stdout.strip() == "1"
    assert vpn.ping(net, ns, vpn.SERVER_TUN6).returncode == 0
    r = client_cmd(net, client, "down")
    assert r.returncode == 0, r.stderr
    assert vpn.wait_exit(client) == 0
    assert tables(net, ns) == before
    # SIGKILL: the rules stay (harmless: nothing routes to the table without the device) until down
    client = vpn.restart_client(net, client)
    vpn.wait_connected(net, client, server=server)
    assert wait_until(lambda: "32762" in net.run(ns, "ip", "rule").stdout, 5)
    vpn.kill(client)
    assert "32762" in net.run(ns, "ip", "rule").stdout and ks_present(net, ns)
    r = client_cmd(net, client, "down")
    assert r.returncode == 0 and "full tunnel off" in r.stdout, r.stdout + r.stderr
    assert tables(net, ns) == before


def test_kill_switch_stays_after_a_runtime_error(net, tmp_path):
    ns = net.clients[0]
    before = tables(net, ns)
    net.run(ns, "ip", "route", "del", "default")              # the endpoint is unreachable: exit 1
    skeys, ckeys = vpn.genkeys(), vpn.genkeys()
    client = start(net, tmp_path, ckeys, skeys)
    assert vpn.wait_exit(client, 15) == 1, client.log_tail()
    log = client.log.read_text()
    assert "kill switch stays on" in log and "vpnclient down" in log, log
    assert ks_present(net, ns)
    assert vpn.ping(net, ns, "198.18.210.1").returncode != 0          # the router: blocked
    r = client_cmd(net, client, "down")
    assert r.returncode == 0 and not ks_present(net, ns), r.stdout + r.stderr
    assert vpn.ping(net, ns, "198.18.210.1").returncode == 0
    net.run(ns, "ip", "route", "add", "default", "via", "198.18.210.1")
    assert tables(net, ns) == before


def test_permanent_kill_switch_blocks_with_no_client_until_disabled(net, tmp_path):
    ns = net.clients[0]
    before = tables(net, ns)
    server, client, st, _ = up_and_connected(net, tmp_path, 'kill_switch = "always"\n')
    r = client_cmd(net, client, "down")
    assert r.returncode == 0 and vpn.wait_exit(client) == 0, r.stdout + r.stderr
    assert "--disable-kill-switch" in r.stdout, r.stdout
    assert ks_present(net, ns) and not vpn.tun_exists(net, client)
    assert vpn.ping(net, ns, "198.18.210.1").returncode != 0          # nothing leaves, no client running
    r = client_cmd(net, client, "down")                                # a plain down keeps it
    assert ks_present(net, ns), r.stdout + r.stderr
    r = client_cmd(net, client, "down", "--disable-kill-switch")
    assert r.returncode == 0 and not ks_present(net, ns), r.stdout + r.stderr
    assert vpn.ping(net, ns, "198.18.210.1").returncode == 0
    assert tables(net, ns) == before


def test_exclude_allow_lan_and_bypass_leave_outside_the_tunnel(net, tmp_path):
    ns = net.clients[0]
    extra = f'allow_lan = true\nexclude = ["{ROUTER_OUT}/32"]\n'
    before = tables(net, ns)
    server, client, st, _ = up_and_connected(net, tmp_path, extra, nsenter=True)
    assert vpn.ping(net, ns, BEYOND).returncode == 0                    # the tunnel works
    # allow_lan: the router on the client's link, past the kill switch, outside the tunnel
    assert vpn.ping(net, ns, "198.18.210.1").returncode == 0
    assert route_dev(net, ns, "198.18.210.1") != vpn.CLIENT_IF
    # exclude: the router's outside address, off-link, reached only outside the tunnel
    assert route_dev(net, ns, ROUTER_OUT) != vpn.CLIENT_IF
    assert vpn.ping(net, ns, ROUTER_OUT).returncode == 0
    # bypass: ROUTER_OUT3 is not excluded: through the tunnel its reply has no way back ...
    assert vpn.ping(net, ns, ROUTER_OUT3).returncode != 0
    cgroup = vpn.status(net, client).get("bypass_cgroup")
    if not cgroup:
        pytest.skip(f"no cgroup v2 with BPF here: {vpn.status(net, client).get('bypass_unavailable')}")
    r = net.run(None, "nsenter", f"--net=/run/netns/{ns}", vpn.VPNCLIENT, "bypass", "--config",
                str(client.config), "--", "ping", "-n", "-c", "1", "-W", "2", ROUTER_OUT3, check=False)
    assert r.returncode == 0, r.stdout + r.stderr                      # ... outside it, it answers
    r = net.run(None, "nsenter", f"--net=/run/netns/{ns}", vpn.VPNCLIENT, "down", "--config",
                str(client.config), check=False)
    assert r.returncode == 0 and vpn.wait_exit(client) == 0, r.stdout + r.stderr
    assert not os.path.exists(cgroup)
    assert tables(net, ns) == before


def test_bypass_without_a_running_client_is_one_line(tmp_path):
    require_root()
    sock = tmp_path / "none.sock"
    r = subprocess.run([vpn.VPNCLIENT, "bypass", "--socket", str(sock), "--", "true"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
