"""End to end: a fleet of three vpnd servers on one PostgreSQL registry (issue 14).

A real PostgreSQL server (tests/pgserver.py, its own for this test: it is stopped and started
again) holds the registry; `vpnd registry init --reader` lets the role the servers connect as read
it and nothing more. Each server runs in its own Topology (network namespaces made here); the
servers reach the database over its unix socket. Every change goes through the real admin
commands with the owner's URL, never a server's config or key.

- a device registered through the device API (`vpnd api`, on loopback) while the servers run
  connects to each of them (registration-to-session time printed); the plan's device limit is
  refused at registration, once for the whole fleet: 409 from the API, one line from the CLI;
- suspension cuts the account off on all three (change-to-effect time per server, printed);
- the database stopped: the servers say so in one line each and keep their clients' traffic;
  started again: they catch up (a removal made meanwhile takes effect on all three).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e import vpn
from tests.e2e.netns import Topology, require_root, wait_until
from tests.e2e.vpn import PORT, SERVER_TUN4
from tests.pgserver import PostgresServer
from tests.test_api import call

pytestmark = pytest.mark.netns

SERVERS = 3
LOST = "vpnd: the accounts registry cannot be reached: serving with what it last read, retrying"
BACK = "vpnd: the accounts registry is reachable again: changes made meanwhile applied"
REFUSED = "vpnclient: the server refused this device: "


def start_api(workdir: Path, owner: str, servers) -> tuple[subprocess.Popen, str]:
    from tests.test_api import free_port
    port = free_port()
    cfg = workdir / "api.toml"
    cfg.write_text(f'[api]\nregistry = "{owner}"\nlisten = "127.0.0.1:{port}"\n' + "".join(
        f'\n[[server]]\nname = "s{i}"\nlocation = "l{i}"\nendpoint = "{ep}"\npublic_key = "{pub}"\n'
        for i, (ep, pub) in enumerate(servers)))
    log = open(workdir / "api.log", "wb")
    proc = subprocess.Popen([vpn.VPND, "api", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    base = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: proc.poll() is not None or _up(base), 30) and proc.poll() is None, \
        (workdir / "api.log").read_text()
    return proc, base


def _up(base: str) -> bool:
    try:
        urllib.request.urlopen(base + "/v1/servers", timeout=2).read()
        return True
    except OSError:
        return False


@pytest.fixture
def fleet():
    require_root()
    workdir = Path(tempfile.mkdtemp(prefix="vpnd-fleet-"))
    pg = topos = None
    try:
        pg = PostgresServer()
        pg.start()
        pg.create_database("fleet")
        pg.create_role("vpnd_reader", "reader-pw", read_only=True, database="fleet")
        topos = [Topology(clients=1) for _ in range(SERVERS)]
        yield pg, topos, workdir
    finally:
        for t in topos or []:
            t.close()
        if pg is not None:
            pg.close()
        shutil.rmtree(workdir, ignore_errors=True)


def admin(url: str, *argv: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([vpn.VPND, *argv, "--registry", url], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert "Traceback" not in r.stderr, r.stderr
    if ok:
        assert r.returncode == 0 and r.stderr == "", f"{argv}: {r.returncode} {r.stdout}{r.stderr}"
    return r


def test_three_servers_one_postgresql_registry(fleet):
    run_fleet(fleet)


def run_fleet(fleet) -> dict:
    """The scenario (also run by tests/soak/test_timing_soak.py, which holds it to 1 s); returns
    the measured figures."""
    pg, topos, workdir = fleet
    owner = pg.passfile_url("vpnd_admin", pg.password, "fleet")
    reader = pg.passfile_url("vpnd_reader", "reader-pw", "fleet")
    assert "pw" not in owner.split("?")[0] and "reader-pw" not in reader
    admin(owner, "registry", "init", "--reader", "vpnd_reader")
    admin(owner, "plan", "set", "trio", "--devices", "3")
    admin(owner, "account", "add", "alice", "--plan", "trio")
    # The servers' role may read and nothing more.
    r = admin(reader, "account", "add", "mallory", ok=False)
    assert r.returncode == 1 and "refused this role" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr

    servers = []
    for i, topo in enumerate(topos):
        keys = vpn.genkeys()
        cfg = vpn.write_server_config(workdir / f"vpnd{i}.toml", keys, [],
                                      extra=f'accounts = "{reader}"\n')
        servers.append((keys, vpn.start_server(topo, workdir, config=cfg, name=f"vpnd{i}")))

    api, base = start_api(workdir, owner, [(f"{t.links[0].server_ip4}:{PORT}", k.public)
                                           for t, (k, _) in zip(topos, servers)])
    try:
        assert [s["public_key"] for s in call(base, "GET", "/v1/servers")[1]["servers"]] == \
            [k.public for k, _ in servers]
        # Devices registered through the API while the servers run: one per server, each connects.
        devices = [vpn.genkeys() for _ in range(SERVERS)]
        clients = []
        for i, (topo, (skeys, _), dev) in enumerate(zip(topos, servers, devices)):
            t0 = time.monotonic()
            assert call(base, "POST", "/v1/devices", "alice", {"public_key": dev.public, "name": f"device {i}"}) \
                == (201, {"public_key": dev.public, "name": f"device {i}"})
            link = topo.links[0]
            c = vpn.start_client(topo, topo.clients[0], workdir, dev, skeys.public, f"{link.server_ip4}:{PORT}",
                                 name=f"client{i}")
            vpn.wait_connected(topo, c, timeout=60, server=servers[i][1])
            print(f"\nserver {i}: device registered (API) -> session up in {(time.monotonic() - t0) * 1000:.0f} ms")
            assert vpn.ping(topo, topo.clients[0], SERVER_TUN4, count=2).returncode == 0
            clients.append(c)

        # The plan's limit holds across the fleet, at registration.
        status, doc = call(base, "POST", "/v1/devices", "alice", {"public_key": vpn.genkeys().public})
        assert status == 409 and "as many as plan 'trio' allows" in doc["error"], doc
    finally:
        api.terminate()
        api.wait(10)
    r = admin(owner, "device", "add", "alice", vpn.genkeys().public, ok=False)
    assert r.returncode == 1 and r.stderr == ("vpnd: error: account 'alice' has 3 devices, as many as plan 'trio' "
                                              "allows; remove one first ('vpnd device remove')\n"), r.stderr
    listed = json.loads(admin(owner, "device", "list", "alice", "--json").stdout)
    assert sorted(d["name"] for d in listed) == ["device 0", "device 1", "device 2"]

    # The database goes away: every server says so once, and keeps serving what it knew.
    pg.stop()
    for i, (_, server) in enumerate(servers):
        assert wait_until(lambda: LOST in server.log.read_text(), 30), \
            server.log_tail()
    for topo, c in zip(topos, clients):
        assert c.proc.poll() is None
        assert vpn.ping(topo, topo.clients[0], SERVER_TUN4, count=3).returncode == 0, c.log_tail() + "\n".join(s.log_tail(40) for _, s in servers)
    pg.start()
    for _, server in servers:
        assert wait_until(lambda: BACK in server.log.read_text(), 30), server.log_tail()
        assert server.log.read_text().count(LOST) == 1, server.log_tail()

    # Suspension reaches all three: each client is cut off; the time from the command's return to
    # each client's exit (an upper bound of the server's change-to-effect time), printed.
    exited: dict[int, float] = {}
    waiters = [threading.Thread(target=lambda i=i, c=c: (c.proc.wait(), exited.__setitem__(i, time.monotonic())),
                                daemon=True) for i, c in enumerate(clients)]
    for w in waiters:
        w.start()
    admin(owner, "account", "suspend", "alice")
    t_done = time.monotonic()
    for w in waiters:
        w.join(30)
    assert sorted(exited) == list(range(SERVERS)), {c.name: c.log_tail() for c in clients}
    for i, c in enumerate(clients):
        assert c.proc.returncode == 1 and REFUSED + "account suspended" in c.log.read_text(), c.log_tail()
    suspension_ms = [max(0.0, exited[i] - t_done) * 1000 for i in sorted(exited)]
    print("suspension -> client cut off: " + ", ".join(f"server {i} {ms:.0f} ms" for i, ms in enumerate(suspension_ms)))

    # Resume and remove while a server's database link is down at the time of the change: it
    # catches up when it is back (here: the whole database restarts between the changes).
    admin(owner, "account", "resume", "alice")
    again = []
    for i, (topo, c) in enumerate(zip(topos, clients)):
        n = vpn.restart_client(topo, c)
        vpn.wait_connected(topo, n, timeout=60, server=servers[i][1])
        again.append(n)
    pg.stop()
    pg.start()
    admin(owner, "account", "remove", "alice")
    t_done = time.monotonic()
    for i, n in enumerate(again):
        assert vpn.wait_exit(n, 30) == 1, n.log_tail()
        print(f"removal after a database restart: server {i} cut off by {(time.monotonic() - t_done) * 1000:.0f} ms")
    for _, server in servers:
        assert server.proc.poll() is None, server.log_tail()
    # No client address reached the database's files or its log.
    log = pg.log_text()
    stored = b"".join(p.read_bytes() for p in Path(pg.data_dir).rglob("*") if p.is_file())
    assert len(stored) > 1_000_000                       # the cluster's files were read
    for topo in topos:
        for ip in (topo.links[0].client_ip4, topo.links[0].client_ip6):
            assert ip not in log and ip.encode() not in stored, ip
    return {"suspension_ms": suspension_ms}
