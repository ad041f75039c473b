"""The namespace harness and vpncore.net.tun against the real kernel (DESIGN §5)."""

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.netns import Topology, link_exists, netns_list, require_root, wait_until
from vpncore.net import tun as tunmod
from vpncore.net.tun import TUN_F_CSUM, TunError, open_tun

REPO = Path(__file__).resolve().parents[2]


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _ping(topo, ns, addr):
    return topo.run(ns, "ping", "-c1", "-W2", addr, check=False, timeout=10)


# -- namespaces and underlay ----------------------------------------------------------------


@pytest.mark.netns
def test_topology_underlay_ping_v4_and_v6(topology):
    link = topology.link
    assert topology.server in netns_list() and topology.client in netns_list()
    assert link_exists(link.client_if, topology.client)
    assert link_exists(link.server_if, topology.server)
    assert not link_exists(link.client_if) and not link_exists(link.server_if)  # not in root ns
    for addr in (link.server_ip4, link.server_ip6):
        r = _ping(topology, topology.client, addr)
        assert r.returncode == 0, f"ping {addr} failed: {r.stdout}{r.stderr}"
        assert "1 received" in r.stdout
    r = _ping(topology, topology.server, link.client_ip6)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.netns
def test_topology2_each_client_has_its_own_link(topology2):
    assert len(topology2.clients) == 2 and len(set(topology2.namespaces)) == 3
    for link in topology2.links:
        for addr in (link.server_ip4, link.server_ip6):
            r = _ping(topology2, link.client_ns, addr)
            assert r.returncode == 0, f"{link.client_ns} -> {addr}: {r.stdout}{r.stderr}"
    # No forwarding in the server namespace: client 0 cannot reach client 1's underlay.
    other = topology2.links[1].client_ip4
    assert _ping(topology2, topology2.clients[0], other).returncode != 0


@pytest.mark.netns
def test_close_removes_namespaces_links_and_processes():
    require_root()
    topo = Topology(clients=2)
    names = list(topo.namespaces)
    veths = [n for link in topo.links for n in (link.client_if, link.server_if)]
    # Ignores SIGTERM, so close() must escalate to SIGKILL (after its 5 s grace: keep one such).
    stubborn = topo.popen(topo.server, sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('ready', flush=True); time.sleep(60)",
                          stdout=subprocess.PIPE, text=True)
    polite = topo.popen(topo.client, "sleep", "60")
    assert stubborn.stdout.readline().strip() == "ready"
    assert set(names) <= set(netns_list())
    topo.close()
    topo.close()  # idempotent
    assert stubborn.returncode == -9 and polite.returncode == -15
    assert not set(names) & set(netns_list())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    for v in veths:
        assert v not in links
    assert topo.suffix not in links


# -- TUN devices inside a namespace -----------------------------------------------------------

_TUN_CHILD = textwrap.dedent("""
    import json, sys
    from vpncore.net.tun import (TunError, open_tun, set_mtu, add_address, add_route, link_up)
    t = open_tun("vtt0")
    set_mtu(t.name, 1380)
    add_address(t.name, "198.19.7.1/24")
    add_address(t.name, "2001:2:0:77::1/64")
    link_up(t.name)
    add_route(t.name, "198.19.8.0/24")
    v = open_tun("vtv0", vnet_hdr=True)
    auto = open_tun("")
    try:
        open_tun("vtt0")
        busy = "no error"
    except TunError as e:
        busy = str(e)
    out = dict(name=t.name, vnet=[v.name, v.vnet_hdr, v.offloads], auto=auto.name, busy=busy,
               blocking=[__import__("os").get_blocking(x.fd) for x in (t, v, auto)])
    print(json.dumps(out), flush=True)
    sys.stdin.read()          # keep the devices until the test closes our stdin
    for x in (t, v, auto):
        x.close()
    t.close()                 # twice is fine
    print("closed", flush=True)
""")


@pytest.mark.netns
def test_open_tun_in_namespace_gets_name_mtu_addresses(topology):
    ns = topology.server
    child = topology.popen(ns, sys.executable, "-c", _TUN_CHILD, env=_child_env(),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    line = child.stdout.readline()
    assert line, f"child failed: {child.stderr.read() if child.poll() is not None else ''}"
    info = json.loads(line)
    assert info["name"] == "vtt0"
    assert info["vnet"][0] == "vtv0" and info["vnet"][1] is True
    assert info["vnet"][2] & TUN_F_CSUM
    assert info["auto"].startswith("tun")
    assert info["blocking"] == [False, False, False]
    assert "busy" in info["busy"] and "vtt0" in info["busy"], info["busy"]

    (dev,) = json.loads(topology.run(ns, "ip", "-j", "-d", "link", "show", "dev", "vtt0").stdout)
    assert dev["mtu"] == 1380
    assert "UP" in dev["flags"]
    assert dev["linkinfo"]["info_kind"] == "tun"
    assert dev["linkinfo"]["info_data"]["type"] == "tun"
    (addrs,) = json.loads(topology.run(ns, "ip", "-j", "addr", "show", "dev", "vtt0").stdout)
    local = {(a["local"], a["prefixlen"]) for a in addrs["addr_info"]}
    assert {("198.19.7.1", 24), ("2001:2:0:77::1", 64)} <= local
    v6 = [a for a in addrs["addr_info"] if a["local"] == "2001:2:0:77::1"][0]
    assert not v6.get("tentative"), "IPv6 address should be usable at once (nodad)"
    routes = topology.run(ns, "ip", "-4", "route", "show", "dev", "vtt0").stdout
    assert "198.19.8.0/24" in routes
    assert link_exists("vtv0", ns) and link_exists(info["auto"], ns)
    assert not link_exists("vtt0")  # the root namespace is untouched

    out, err = child.communicate("", timeout=10)
    assert child.returncode == 0, err
    assert out.strip() == "closed"
    # Non-persistent TUN devices vanish with their last fd.
    assert wait_until(lambda: not link_exists("vtt0", ns) and not link_exists("vtv0", ns), 5)


# -- TunError for what a user can cause (no root needed) --------------------------------------


@pytest.mark.parametrize("name", ["x" * 16, "bad/name", "has space", "a:b", ".."])
def test_open_tun_bad_name_raises_tunerror(name):
    with pytest.raises(TunError, match="invalid interface name"):
        open_tun(name)


def _fake_ioctl_error(monkeypatch, err):
    closed = []
    real_close, real_open = os.close, os.open

    def fake_ioctl(fd, req, arg=0, *rest):
        if req == tunmod.TUNSETIFF:
            raise OSError(err, os.strerror(err))
        raise AssertionError("unexpected ioctl")

    def fake_open(path, flags, *a):
        assert path == "/dev/net/tun"
        return real_open(os.devnull, os.O_RDWR)

    def tracking_close(fd):
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(tunmod.fcntl, "ioctl", fake_ioctl)
    monkeypatch.setattr(tunmod.os, "open", fake_open)
    monkeypatch.setattr(tunmod.os, "close", tracking_close)
    return closed


@pytest.mark.parametrize("err,words", [
    (errno.EPERM, "run as root or grant CAP_NET_ADMIN"),
    (errno.EBUSY, "busy"),
    (errno.EINVAL, "choose another name"),
])
def test_tunsetiff_errors_become_tunerror_and_fd_is_closed(monkeypatch, err, words):
    closed = _fake_ioctl_error(monkeypatch, err)
    with pytest.raises(TunError, match=words):
        open_tun("vtx0")
    assert len(closed) == 1


@pytest.mark.parametrize("err,words", [
    (errno.ENOENT, "modprobe tun"),
    (errno.EACCES, "permission denied; run as root or grant CAP_NET_ADMIN"),
])
def test_dev_net_tun_open_errors_become_tunerror(monkeypatch, err, words):
    def fake_open(path, flags, *a):
        raise OSError(err, os.strerror(err), path)

    monkeypatch.setattr(tunmod.os, "open", fake_open)
    with pytest.raises(TunError, match=words):
        open_tun("vtx0")


def test_open_tun_without_privilege_raises_tunerror():
    """For real: as an unprivileged user, open_tun raises TunError and nothing else."""
    if os.geteuid() != 0:
        with pytest.raises(TunError, match="root|CAP_NET_ADMIN"):
            open_tun("vtnopriv0")
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, try, report, exit without running pytest's cleanup
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                open_tun("vtnopriv0")
                msg = "opened"
            except TunError as e:
                msg = "TunError: " + str(e)
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                msg = f"{type(e).__name__}: {e}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    assert msg.startswith("TunError: "), msg
    assert "CAP_NET_ADMIN" in msg


def test_link_helpers_raise_tunerror():
    with pytest.raises(TunError, match="invalid address"):
        tunmod.add_address("lo", "not-an-address")
    with pytest.raises(TunError, match="invalid network"):
        tunmod.add_route("lo", "300.1.1.0/24")
    with pytest.raises(TunError, match="cannot set MTU"):
        tunmod.set_mtu("vpnt-nonexist0", 1400)
    with pytest.raises(TunError, match="cannot bring"):
        tunmod.link_up("vpnt-nonexist0")
