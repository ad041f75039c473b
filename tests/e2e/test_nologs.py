"""No logs, proven (issue: "No logs by construction"): audit, time to forget, crash drill.

The audit runs vpnd at its most verbose in a namespace while 60 sessions from 60 canary underlay
addresses (50 IPv4, 10 IPv6) handshake, send traffic to canary destinations inside the tunnel and
end. Then every file created or modified anywhere on the machine during the run (outside this
test's own folder), vpnd's stdout/stderr and the `vpnd stats` output are scanned for any canary in
text, packed (4 or 16 bytes) or hex form, and for times finer than a day. The scanner is shown to
work on a canary planted on purpose.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult_base

from tests.e2e.netns import Topology, require_root, wait_until
from vpncore.userror import encode_key

pytestmark = pytest.mark.netns

BIN = Path(sys.executable).parent
VPND = str(BIN / "vpnd")
REPO = Path(__file__).resolve().parents[2]
CANARIES4 = [f"198.18.0.{i}" for i in range(150, 200)]           # client underlay sources
CANARIES6 = [f"2001:2::c{i:03x}" for i in range(10)]
DESTS = [f"198.18.77.{i}" for i in range(150, 200)]             # destinations inside the tunnel
SKIP_DIRS = ("/proc", "/sys", "/dev", "/run/netns", "/var/run/netns")
MAX_FILE = 64 << 20
FINE_TIME = [re.compile(rb"\b\d{1,2}:\d{2}:\d{2}\b"), re.compile(rb"\b1[5-9]\d{8}\b"),
             re.compile(rb"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")]


def forms(address: str) -> list[bytes]:
    """Every encoding of an address the scanner looks for."""
    ip = ipaddress.ip_address(address)
    out = {str(ip).encode(), ip.packed, ip.packed.hex().encode(), ip.packed.hex().upper().encode()}
    if ip.version == 6:
        out.add(ip.exploded.encode())
    return sorted(out)


def find_canaries(data: bytes, canaries: list[str]) -> list[str]:
    return [c for c in canaries for f in forms(c) if f in data]


def modified_files(since: float, exclude: list[str]) -> list[str]:
    """Regular files under / whose contents or inode changed at or after `since`."""
    found = []
    for top, dirs, files in os.walk("/", topdown=True):
        dirs[:] = [d for d in dirs if not os.path.join(top, d).startswith(SKIP_DIRS)
                   and not any(os.path.join(top, d).startswith(e) for e in exclude)]
        for name in files:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if (st.st_mode & 0o170000) == 0o100000 and max(st.st_mtime, st.st_ctime) >= since:
                found.append(path)
    return found


def scan_files(paths: list[str], canaries: list[str]) -> dict[str, list[str]]:
    hits = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE)
        except OSError:
            continue
        got = find_canaries(data, canaries)
        if got:
            hits[path] = got
    return hits


def fine_times(data: bytes) -> list[bytes]:
    return [m.group(0) for p in FINE_TIME for m in p.finditer(data)]


def make_keys(n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(n):
        k = bytearray(os.urandom(32))
        k[0] &= 248
        k[31] = (k[31] & 127) | 64
        out.append((bytes(k), crypto_scalarmult_base(bytes(k))))
    return out


class World:
    """A server namespace running vpnd (most verbose, test hooks on) and a client namespace
    carrying every canary address on its veth."""

    def __init__(self, topo: Topology, tmp: Path, reject_after: float | None = None):
        self.topo, self.tmp = topo, tmp
        self.server_key, self.server_pub = make_keys(1)[0]
        self.clients = make_keys(len(CANARIES4) + len(CANARIES6))
        self.sock = tmp / "vpnd.sock"
        cfg = tmp / "vpnd.toml"
        cfg.write_text(
            "[server]\n"
            f'private_key = "{encode_key(self.server_key)}"\n'
            'listen = ["0.0.0.0:51820", "[::]:51820"]\n'
            'interface = "vpnd0"\n'
            'address_pool4 = "198.19.0.0/24"\n'
            'address_pool6 = "2001:2:0:100::/64"\n'
            'log_level = "debug"\n'
            f'control_socket = "{self.sock}"\n'
            + "".join(f'\n[[client]]\npublic_key = "{encode_key(pub)}"\n' for _, pub in self.clients))
        cfg.chmod(0o600)
        for c in CANARIES4:
            topo.add_address(topo.client, topo.link.client_if, f"{c}/24")
        for c in CANARIES6:
            topo.add_address(topo.client, topo.link.client_if, f"{c}/64")
        env = ["env", "VPND_TEST_HOOKS=1"] + ([f"VPND_TEST_REJECT_AFTER={reject_after}"] if reject_after else [])
        self.out = open(tmp / "vpnd.stdout", "wb")
        self.err = open(tmp / "vpnd.stderr", "wb")
        self.proc = topo.popen(topo.server, *env, VPND, "serve", "--config", str(cfg),
                               stdout=self.out, stderr=self.err, cwd=str(tmp))
        assert wait_until(lambda: self.sock.exists() or self.proc.poll() is not None, 10), "vpnd did not start"
        assert self.proc.poll() is None, (tmp / "vpnd.stderr").read_text()

    def drive(self, close: list[int]) -> dict:
        sessions = []
        for i, (key, _) in enumerate(self.clients):
            src = (CANARIES4 + CANARIES6)[i]
            sessions.append({"src": src, "key": key.hex(), "destinations": [DESTS[i % len(DESTS)]]})
        plan = self.tmp / "plan.json"
        plan.write_text(json.dumps({"server": ["198.18.0.1", 51820], "server6": ["2001:2::1", 51820],
                                    "server_public": self.server_pub.hex(), "sessions": sessions,
                                    "close": close}))
        r = self.topo.run(self.topo.client, sys.executable, "-m", "tests.e2e.canary_driver", str(plan),
                          timeout=90)
        return json.loads(r.stdout.strip().splitlines()[-1])

    def query(self, command: str) -> str:
        r = self.topo.run(self.topo.server, sys.executable, "-c",
                          "import json,sys; from vpncore.net.ctlsock import query; "
                          "print(json.dumps(query(sys.argv[1], sys.argv[2], 'vpnd')))",
                          str(self.sock), command)
        return r.stdout

    def stats_outputs(self) -> bytes:
        text = self.topo.run(self.topo.server, VPND, "stats", "--socket", str(self.sock)).stdout
        js = self.topo.run(self.topo.server, VPND, "stats", "--socket", str(self.sock), "--json").stdout
        return (text + js).encode()

    def stop(self) -> int:
        self.topo.stop(self.proc)
        self.out.close()
        self.err.close()
        return self.proc.returncode


@pytest.fixture
def world_factory(tmp_path):
    require_root()
    made = []

    def make(**kw):
        topo = Topology()
        made.append(topo)
        return World(topo, tmp_path, **kw)
    yield make
    for topo in made:
        topo.close()


def test_no_logs_audit(world_factory, tmp_path):
    start = time.time() - 1
    w = world_factory()
    result = w.drive(close=list(range(0, 60, 2)))
    assert result["established"] >= 50, result
    assert result["replies"] >= 50, result          # traffic really went through the tunnel
    stats = w.stats_outputs()
    snap = json.loads(w.query("stats"))
    today = next(iter(snap["days"].values()))
    assert today["connections"] >= 50 and today["bytes_in"] > 0 and today["bytes_out"] > 0
    assert w.stop() == 0
    out = (tmp_path / "vpnd.stdout").read_bytes() + (tmp_path / "vpnd.stderr").read_bytes()
    assert b"session started" in out                 # verbose logging was really on

    canaries = CANARIES4 + CANARIES6 + DESTS
    # the scanner must see what it looks for: a canary planted on purpose, in a file outside our folder
    plant = Path(f"/var/tmp/vpn-audit-plant-{os.getpid()}")
    plant.write_bytes(b"junk" + ipaddress.ip_address(CANARIES4[7]).packed + b"junk")
    try:
        files = modified_files(start, exclude=[str(tmp_path), str(REPO / ".git")])
        assert str(plant) in files
        hits = scan_files(files, canaries)
        assert hits.pop(str(plant)) == [CANARIES4[7]]
    finally:
        plant.unlink()
    assert find_canaries(b"x" + CANARIES6[3].encode() + b"x", canaries) == [CANARIES6[3]]
    assert hits == {}, f"canary addresses found in files written during the run: {hits}"
    assert find_canaries(out, canaries) == [] and find_canaries(stats, canaries) == []
    assert fine_times(out) == [] and fine_times(stats) == [], (fine_times(out), fine_times(stats))
    assert fine_times(b"at 12:34:56") != []          # and the time check can fail too


def test_time_to_forget(world_factory):
    w = world_factory(reject_after=3)
    result = w.drive(close=list(range(0, 60, 2)))     # half close, half just go silent
    assert result["established"] >= 50, result
    secrets = [ipaddress.ip_address(c).packed.hex() for c in CANARIES4 + CANARIES6]
    secrets += [c.encode().hex() for c in CANARIES4 + CANARIES6]
    secrets += result["session_keys"]
    masked = ",".join(bytes(b ^ 0x5A for b in bytes.fromhex(h)).hex() for h in secrets)
    during = json.loads(w.query(f"gc-scan {masked}"))
    assert during["hits"] > 0 and during["peers"] > 0   # the scan sees live sessions while they exist
    assert wait_until(lambda: json.loads(w.query("stats"))["active_sessions"] == 0, 10)
    time.sleep(0.5)
    after = json.loads(w.query(f"gc-scan {masked}"))
    assert after == {"hits": 0, "peers": 0, "keypairs": 0}, after
    assert w.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT])
def test_crash_leaves_no_core_and_no_address(world_factory, tmp_path, sig):
    def allow_cores():
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    # control: in this folder, with core dumps allowed, an ordinary crashing process leaves a core
    control = subprocess.run([sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(sig)})"],
                             cwd=tmp_path, preexec_fn=allow_cores)
    assert control.returncode == -sig
    control_cores = [p for p in tmp_path.iterdir() if p.name.startswith("core")]
    if pattern.startswith("core"):
        assert control_cores, "the machine writes no core files at all: the drill would prove nothing"
    for p in control_cores:
        p.unlink()

    w = world_factory()
    result = w.drive(close=[])
    assert result["established"] >= 50
    os.kill(w.proc.pid, sig)
    assert w.proc.wait(10) == -sig
    w.out.close()
    w.err.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("core")] == []
    out = (tmp_path / "vpnd.stdout").read_bytes() + (tmp_path / "vpnd.stderr").read_bytes()
    assert find_canaries(out, CANARIES4 + CANARIES6 + DESTS + ["198.18.0.1", "198.19.0.2"]) == []
