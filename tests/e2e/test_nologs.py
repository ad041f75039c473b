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

from tests.e2e import vpnd_harness
from tests.e2e.netns import Topology, require_root, wait_until
from vpncore.configfile import encode_key

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


def write_vpnd_config(cfg: Path, server_key: bytes, sock: Path, clients, extra: str = "") -> Path:
    """vpnd at its most verbose, one [[client]] per (private, public) pair."""
    cfg.write_text(
        "[server]\n"
        f'private_key = "{encode_key(server_key)}"\n'
        'listen = ["0.0.0.0:51820", "[::]:51820"]\n'
        'interface = "vpnd0"\n'
        'address_pool4 = "198.19.0.0/24"\n'
        'address_pool6 = "2001:2:0:100::/64"\n'
        'log_level = "debug"\n'
        f'control_socket = "{sock}"\n' + extra
        + "".join(f'\n[[client]]\npublic_key = "{encode_key(pub)}"\n' for _, pub in clients))
    cfg.chmod(0o600)
    return cfg


class World:
    """A server namespace running vpnd (most verbose; tests/e2e/vpnd_harness.py with its hooks) and a client namespace
    carrying every canary address on its veth."""

    def __init__(self, topo: Topology, tmp: Path, reject_after: float | None = None, registry: str | None = None,
                 clients=None):
        """`registry`: a registry URL whose account holds `clients` as devices (pg_registry): vpnd then
        reads it (issue 14) instead of listing the clients in its config."""
        self.topo, self.tmp = topo, tmp
        self.server_key, self.server_pub = make_keys(1)[0]
        self.clients = clients or make_keys(len(CANARIES4) + len(CANARIES6))
        self.sock = tmp / "vpnd.sock"
        listed, extra = self.clients, ""
        if registry is not None:
            listed, extra = [], f'accounts = "{registry}"\n'
        cfg = write_vpnd_config(tmp / "vpnd.toml", self.server_key, self.sock, listed, extra)
        for c in CANARIES4:
            topo.add_address(topo.client, topo.link.client_if, f"{c}/24")
        for c in CANARIES6:
            topo.add_address(topo.client, topo.link.client_if, f"{c}/64")
        self.out = open(tmp / "vpnd.stdout", "wb")
        self.err = open(tmp / "vpnd.stderr", "wb")
        self.proc = topo.popen(topo.server, *vpnd_harness.argv(cfg, reject_after=reject_after),
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


def pg_registry(pg, clients) -> str:
    """A registry in the suite's PostgreSQL holding `clients` as one account's devices; returns the
    URL of a role that may only read it."""
    from vpnd.registry import Plan, open_registry
    name = f"audit_{os.getpid()}_{time.monotonic_ns()}"
    pg.create_database(name)
    reg = open_registry(pg.passfile_url("vpnd_admin", pg.password, name), create=True)
    try:
        reg.put_plan(Plan("audit", len(clients)))
        reg.add_account("audit", "audit", "2026-01-01")
        for _, pub in clients:
            reg.add_device("audit", pub)
        reader = f"reader_{name}"
        pg.create_role(reader, "reader-pw", read_only=True, database=name)
        reg.grant_reader(reader)
    finally:
        reg.close()
    return pg.passfile_url(reader, "reader-pw", name)


@pytest.mark.parametrize("engine", ["static", "postgresql"])
def test_no_logs_audit(world_factory, tmp_path, tmp_path_factory, engine, request):
    """Also with the clients as devices in a PostgreSQL registry: its files and its server log are
    among the files scanned (the suite's database lives outside this test's folder)."""
    start = time.time() - 1
    registry, clients = None, None
    if engine == "postgresql":
        clients = make_keys(len(CANARIES4) + len(CANARIES6))
        registry = pg_registry(request.getfixturevalue("postgres"), clients)
    w = world_factory(registry=registry, clients=clients)
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
        # (the other tests' own folders under pytest's base directory hold their canaries on purpose)
        files = modified_files(start, exclude=[str(tmp_path_factory.getbasetemp()), str(REPO / ".git")])
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


# --- memory: after sessions end, vpnd's memory holds no client address and no queried name -------
# (issue 12 part 5; vpnd/forget.py says what is overwritten and what is not). Canaries of their own:
# an extra underlay /24 whose packed bytes hold no 0x00 or 0xff (c6 12 c9 93..), random IPv6
# interface IDs, and names with a marker label, so that chance matches are ruled out (the fresh
# vpnd is scanned for the same canaries first and must be silent).

MEM_NET4 = "198.18.201.0/24"


def _mem_canaries(n4: int = 10, n6: int = 6, names_each: int = 4):
    import secrets as _secrets
    from tests.e2e.memscan import ipv4_canaries

    c4 = ipv4_canaries(MEM_NET4, n4)
    c6 = [str(ipaddress.ip_address("2001:2::") + ((_secrets.randbits(64) | (1 << 63) | 0x0101010101010101)
                                                  & ~0x8080808080808080 | (1 << 63)))
          for _ in range(n6)]
    names = [[f"cnry{_secrets.token_hex(5)}.nologs-audit.test" for _ in range(names_each)] for _ in c4 + c6]
    return c4, c6, names


class DnsWorld:
    """vpnd (test hooks, short reject time) with its DNS forwarder asking a test DNS server in the
    server namespace; clients from canary addresses asking canary names through the tunnel."""

    def __init__(self, topo: Topology, tmp: Path):
        from tests.e2e.memscan import Canaries

        self.topo, self.tmp = topo, tmp
        self.c4, self.c6, self.names = _mem_canaries()
        self.all_names = [n for ns in self.names for n in ns]
        self.canaries = Canaries(self.c4 + self.c6, self.all_names)
        link = topo.link
        topo.add_address(topo.server, link.server_if, MEM_NET4.replace(".0/24", ".1/24"))
        for c in self.c4:
            topo.add_address(topo.client, link.client_if, f"{c}/24")
        for c in self.c6:
            topo.add_address(topo.client, link.client_if, f"{c}/64")
        self.server_key, self.server_pub = make_keys(1)[0]
        self.clients = make_keys(len(self.c4) + len(self.c6))
        self.sock = tmp / "vpnd.sock"
        ready = tmp / "dns.ready"
        # the DNS server gets the names in its argv: it is another process, not scanned
        self.dns = topo.popen(topo.server, sys.executable, str(REPO / "tests/e2e/dnsserver.py"), "127.0.0.1",
                              "53", str(ready), *[f"{n}=192.0.2.7" for n in self.all_names],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(ready.exists, 10), "test DNS server did not start"
        cfg = write_vpnd_config(tmp / "vpnd.toml", self.server_key, self.sock, self.clients,
                                'dns_upstream = ["127.0.0.1:53"]\n')
        self.out = open(tmp / "vpnd.stdout", "wb")
        self.proc = topo.popen(topo.server, *vpnd_harness.argv(cfg, reject_after=3),
                               stdout=self.out, stderr=subprocess.STDOUT, cwd=str(tmp))
        assert wait_until(lambda: self.sock.exists() or self.proc.poll() is not None, 10), "vpnd did not start"
        assert self.proc.poll() is None, (tmp / "vpnd.stdout").read_text()

    def drive(self) -> dict:
        srcs = self.c4 + self.c6
        sessions = [{"src": s, "key": k.hex(), "names": self.names[i]} for i, (s, (k, _)) in
                    enumerate(zip(srcs, self.clients))]
        plan = self.tmp / "dns-plan.json"
        plan.write_text(json.dumps({"server": [MEM_NET4.replace(".0/24", ".1"), 51820],
                                    "server6": ["2001:2::1", 51820], "server_public": self.server_pub.hex(),
                                    "sessions": sessions, "close": list(range(0, len(srcs), 2))}))
        r = self.topo.run(self.topo.client, sys.executable, "-m", "tests.e2e.dns_canary_driver", str(plan),
                          timeout=90)
        plan.unlink()
        return json.loads(r.stdout.strip().splitlines()[-1])

    def query(self, command: str) -> dict:
        r = self.topo.run(self.topo.server, sys.executable, "-c",
                          "import json,sys; from vpncore.net.ctlsock import query; "
                          "print(json.dumps(query(sys.argv[1], sys.argv[2], 'vpnd')))",
                          str(self.sock), command)
        return json.loads(r.stdout)

    def wait_forgotten(self) -> None:
        """Every session ended, then one scrub ran after the last end (events, not a time bound)."""
        assert wait_until(lambda: self.query("stats")["active_sessions"] == 0, 20), "sessions did not end"
        assert wait_until(lambda: not self.query("scrubs")["due"], 10), "no scrub after the sessions ended"

    def stop(self) -> int:
        self.topo.stop(self.proc)
        self.topo.stop(self.dns)
        self.out.close()
        return self.proc.returncode


@pytest.fixture
def dns_world(tmp_path):
    require_root()
    topo = Topology()
    try:
        yield DnsWorld(topo, tmp_path)
    finally:
        topo.close()


def _planted(data_hex: str) -> subprocess.Popen:
    """A process holding the bytes `data_hex` (XOR-masked on its command line) until its stdin closes."""
    masked = bytes(b ^ 0x5A for b in bytes.fromhex(data_hex)).hex()
    code = ("import sys; k = bytes(b ^ 0x5A for b in bytes.fromhex(sys.argv[1])); "
            "print('ready', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, masked], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"
    return p


def test_memory_holds_no_client_address_or_name(dns_world):
    from tests.e2e.memscan import scan_pid, summary, wire_name

    w = dns_world
    # the scanner is silent on a vpnd that never saw the canaries: no chance matches
    fresh = scan_pid(w.proc.pid, w.canaries)
    assert fresh["hits"] == [] and fresh["bytes"] > 10 << 20, summary(fresh["hits"])
    # ... and finds them where they are: planted in a process (packed IPv4, IPv6 text, a name's wire form)
    plant = ipaddress.ip_address(w.c4[3]).packed + w.c6[1].encode() + wire_name(w.all_names[5])
    p = _planted(plant.hex())
    try:
        got = {(h["canary"], h["form"]) for h in scan_pid(p.pid, w.canaries)["hits"]}
    finally:
        p.stdin.close()
        p.wait(10)
    assert {(w.c6[1], "text"), (w.all_names[5], "wire")} <= got, got
    assert any(c == w.c4[3] and form != "text" for c, form in got), got        # found in binary form

    result = w.drive()
    n = len(w.c4) + len(w.c6)
    assert result["established"] == n, result
    assert result["answers"] == result["sent"] == len(w.all_names), result   # every name went through vpnd
    during = scan_pid(w.proc.pid, w.canaries)
    assert any(h["canary"] in w.c4 + w.c6 for h in during["hits"]), summary(during["hits"])  # live endpoints
    assert w.query("stats")["dns"]["answers"] == len(w.all_names)

    w.wait_forgotten()
    after = scan_pid(w.proc.pid, w.canaries)
    assert after["hits"] == [], f"left in vpnd's memory after the sessions ended: {summary(after['hits'])}"
    assert w.stop() == 0


def _conntrack_entries(topo: Topology) -> str:
    r = topo.run(topo.server, "conntrack", "-L", check=False)
    r6 = topo.run(topo.server, "conntrack", "-L", "-f", "ipv6", check=False)
    assert r.returncode == 0 or "0 flow entries" in r.stderr, r.stderr
    return r.stdout + r6.stdout


def test_conntrack_holds_no_client_address_after_sessions(dns_world):
    import shutil

    if shutil.which("conntrack") is None:
        pytest.skip("needs the conntrack tool (Debian package conntrack)")
    w = dns_world
    result = w.drive()
    assert result["established"] == len(w.c4) + len(w.c6), result
    w.wait_forgotten()
    table = _conntrack_entries(w.topo)
    left = sorted({c for c in w.c4 + w.c6 if re.search(rf"src={re.escape(c)}\b|dst={re.escape(c)}\b", table)})
    assert left == [], f"conntrack in the server namespace still lists client addresses: {left}"
    assert w.stop() == 0
