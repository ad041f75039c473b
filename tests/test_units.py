"""The systemd units in packaging/: they verify, their exposure stays low, and they say what vpnd and
vpnclient need (README, "Running under systemd"; issue 18).

`systemd-analyze` (Debian package `systemd`) runs on the unit files alone (`verify`, `security
--offline=yes`): no systemd as PID 1 needed, nothing installed. `verify` checks that ExecStart's
binary exists, so it runs on a copy in a temporary directory whose ExecStart names this venv's
console scripts; the template runs as its instance vpnclient@vpn0.service. Also `vpnd check`, the
config check an operator runs before (re)starting the unit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
UNITS = {"vpnd.service": "vpnd.service", "vpnclient@.service": "vpnclient@vpn0.service"}
MAX_EXPOSURE = 2.5
TIMEOUT = 60

# What each unit keeps, and why (the unit's comments say it at length; every one must be named there).
CAPS = {
    "vpnd.service": {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"},
    "vpnclient@.service": {"CAP_NET_ADMIN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_CHOWN", "CAP_BPF"},
}
USERS = {"vpnd.service": "vpnd", "vpnclient@.service": "vpnclient"}


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing: install the Debian package 'systemd'", pytrace=False)
    return exe


def parse(path: Path) -> dict[str, list[str]]:
    """[Service]/[Unit]/[Install] assignments: KEY -> every value, in order (comments skipped)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def comments(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))


@pytest.fixture
def installed(tmp_path):
    """unit name -> a copy under tmp_path whose ExecStart runs this venv's vpnd / vpnclient."""
    out = {}
    for name, instance in UNITS.items():
        text = (REPO / "packaging" / name).read_text()
        assert "ExecStart=/usr/local/bin/" in text
        copy = tmp_path / instance
        copy.write_text(text.replace("ExecStart=/usr/local/bin/", f"ExecStart={BIN}/"))
        out[name] = copy
    for prog in ("vpnd", "vpnclient"):
        assert (BIN / prog).exists(), f"{BIN / prog} is missing; run 'make venv'"
    return out


@pytest.mark.parametrize("name", UNITS)
def test_verify(installed, name):
    path = installed[name]
    r = subprocess.run([_analyze(), "verify", str(path)], capture_output=True, text=True, timeout=TIMEOUT,
                       cwd=path.parent)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if path.name in line or "vpn" in line]
    assert r.returncode == 0 and not ours, f"exit {r.returncode}\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize("name", UNITS)
def test_security_exposure(installed, name):
    path = installed[name]
    r = subprocess.run([_analyze(), "security", "--offline=yes", "--no-pager", str(path)], capture_output=True,
                       text=True, timeout=TIMEOUT, cwd=path.parent)
    m = re.search(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)", r.stdout + r.stderr)
    assert m, f"no exposure level in the output (exit {r.returncode}):\n{r.stdout}{r.stderr}"
    assert m.group(1) == path.name
    level = float(m.group(2))
    print(f"{name}: exposure {level}")
    assert level <= MAX_EXPOSURE, f"{name}: exposure {level} > {MAX_EXPOSURE}\n{r.stdout}"


@pytest.mark.parametrize("name", UNITS)
def test_notify_watchdog_and_restart_semantics(name):
    u = parse(REPO / "packaging" / name)
    assert u["Type"] == ["notify"] and u["NotifyAccess"] == ["main"]
    assert u["WatchdogSec"] == ["30"]
    assert u["Restart"] == ["on-failure"] and u["RestartPreventExitStatus"] == ["2"]   # 2: config mistake
    assert u["KillSignal"] == ["SIGTERM"]                # SIGTERM undoes everything
    assert "LogLevelMax" not in u                        # it would swallow the line saying why a start failed
    assert "ExecStopPost" not in u                       # client: would lift the kill switch after a crash
    prog = "vpnd serve --config /etc/vpnd/vpnd.toml" if name == "vpnd.service" else \
        "vpnclient up --config /etc/vpnclient/%i.toml"
    assert u["ExecStart"] == [f"/usr/local/bin/{prog}"]


def test_client_start_timeout_keeps_the_kill_switch():
    u = parse(REPO / "packaging" / "vpnclient@.service")
    assert u["TimeoutStartFailureMode"] == ["abort"]     # SIGABRT, like a crash: kill switch stays


@pytest.mark.parametrize("name", UNITS)
def test_privileges(name):
    path = REPO / "packaging" / name
    u = parse(path)
    assert u["User"] == [USERS[name]] and u["Group"] == [USERS[name]]
    bounding = set(" ".join(u["CapabilityBoundingSet"]).split())
    ambient = set(" ".join(u["AmbientCapabilities"]).split())
    assert bounding == ambient == CAPS[name]
    notes = comments(path)
    for cap in CAPS[name]:
        assert re.search(rf"#.*{cap}\b", notes), f"{name}: {cap} is kept but not explained in a comment"
    assert u["NoNewPrivileges"] == ["yes"]
    assert u["DevicePolicy"] == ["closed"] and u["DeviceAllow"] == ["/dev/net/tun rw"]
    assert u["ProtectKernelTunables"] == ["yes"] and "/proc/sys/net" in u["ReadWritePaths"]
    assert u["MemoryDenyWriteExecute"] == ["yes"] and u["ProtectSystem"] == ["strict"]
    assert u["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_NETLINK AF_UNIX"]
    assert u["SystemCallFilter"][0] == "@system-service"
    assert u["UMask"] == ["0077"]
    prog = USERS[name]
    assert u["RuntimeDirectory"] == u["StateDirectory"] == u["ConfigurationDirectory"] == [prog]


def test_client_keeps_what_bypass_needs():
    u = parse(REPO / "packaging" / "vpnclient@.service")
    assert u["ProtectControlGroups"] == ["no"]           # its cgroup lives in the cgroup v2 root
    assert "bpf" in " ".join(u["SystemCallFilter"][1:]).split()
    assert u["RuntimeDirectoryPreserve"] == ["yes"]      # a crashed run's control socket path for 'down'


# -- vpnd check: what serve validates, without opening anything --------------------------------

def _check(*args, prefix=(), **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, str(BIN / "vpnd"), "check", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=REPO, **kw)


def _config(tmp_path: Path, extra: str = "") -> Path:
    from vpncore.keys import genkey
    path = tmp_path / "vpnd.toml"
    path.write_text(f'[server]\nprivate_key = "{genkey()}"\naddress_pool4 = "198.19.0.0/24"\n'
                    f'control_socket = "{tmp_path / "ctl" / "vpnd.sock"}"\n' + extra)
    path.chmod(0o600)
    return path


def test_check_ok_opens_nothing(tmp_path):
    r = _check("--config", _config(tmp_path))
    assert (r.returncode, r.stdout, r.stderr) == (0, "vpnd: config OK\n", "")
    assert not (tmp_path / "ctl").exists()               # no control socket, no directory for it


def test_check_needs_no_privileges(tmp_path):
    if os.geteuid() != 0:
        r = _check("--config", _config(tmp_path))
    else:                                                # root with every capability dropped
        r = _check("--config", _config(tmp_path), prefix=["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"])
    assert (r.returncode, r.stdout) == (0, "vpnd: config OK\n"), r.stderr


@pytest.mark.parametrize("extra,words", [
    ("mtu = 9\n", ["mtu"]),
    ("log_file = \"/var/log/vpnd.log\"\n", ["log_file", "no logs"]),
    ("frobnicate = 1\n", ["frobnicate"]),
])
def test_check_reports_the_one_error_with_status_2(tmp_path, extra, words):
    r = _check("--config", _config(tmp_path, extra))
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
    assert lines[0].startswith("vpnd: error: ") and "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0].lower()


def test_check_missing_file_and_usage(tmp_path):
    r = _check("--config", tmp_path / "none.toml")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "none.toml" in r.stderr
    r = _check()
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "--config" in r.stderr


def test_check_includes_the_egress_interface(tmp_path):
    """full_tunnel without a way out is found by check as by serve (here: an empty network namespace)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare, for a network namespace without a default route")
    r = _check("--config", _config(tmp_path, "full_tunnel = true\n"), prefix=["unshare", "--net", "--"])
    assert r.returncode == 2 and "full_tunnel needs a way out" in r.stderr, r.stderr


# -- SystemCallFilter=: every call a tunnel's life makes is allowed -----------------------------

def _group(name: str, cache: dict) -> set[str]:
    """A syscall group (@name) expanded, recursively, as systemd-analyze lists it; a plain name as is."""
    if not name.startswith("@"):
        return {name}
    if name not in cache:
        r = subprocess.run([_analyze(), "syscall-filter", name], capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        out: set[str] = set()
        for line in r.stdout.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith("#"):
                out |= _group(item, cache)
        cache[name] = out
    return cache[name]


def allowed_syscalls(name: str) -> set[str]:
    """What the unit's SystemCallFilter= lines allow: an allow list (plus @default), then '~' lines
    take calls out and plain lines put them back, in order (systemd.exec(5))."""
    cache: dict = {}
    lines = parse(REPO / "packaging" / name)["SystemCallFilter"]
    assert not lines[0].startswith("~"), "the first SystemCallFilter= line must be an allow list"
    allowed = _group("@default", cache)
    for line in lines:
        names = set().union(*(_group(n, cache) for n in line.lstrip("~").split()))
        allowed = allowed - names if line.startswith("~") else allowed | names
    return allowed


def _traced(strace: str, trace: Path, argv: list[str]) -> list[str]:
    """strace -f of argv; the traced program dies with strace (PR_SET_PDEATHSIG), never left behind."""
    launcher = "import ctypes, os, sys\nctypes.CDLL(None).prctl(1, 9, 0, 0, 0)\nos.execvp(sys.argv[1], sys.argv[1:])"
    return [strace, "-f", "-qq", "-o", str(trace), sys.executable, "-c", launcher, *argv]


def _tracee(strace_pid: int, program: str) -> int:
    """The traced program's PID: strace's child running `program` (strace forks probes of its own)."""
    from tests.e2e.netns import wait_until
    found = []

    def child() -> bool:
        try:
            kids = open(f"/proc/{strace_pid}/task/{strace_pid}/children").read().split()
        except OSError:
            return True
        for kid in kids:
            try:
                argv = open(f"/proc/{kid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if os.fsencode(program) in argv:
                found.append(int(kid))
                return True
        return False
    wait_until(child, 10, interval=0.02)
    assert found, f"strace did not start {program}"
    return found[0]


def _syscalls(trace: Path) -> set[str]:
    return set(re.findall(r"^\d+\s+([a-z_0-9]+)\(", trace.read_text(errors="replace"), re.M))


@pytest.mark.netns
def test_every_system_call_of_a_tunnels_life_is_in_the_filter(workdir):
    """vpnd (full tunnel: nft NAT, forwarding sysctls, conntrack) and vpnclient (kill switch, full
    tunnel, resolver file, bypass cgroup) with their helpers, traced from start to SIGTERM; what they
    call must be what their unit's SystemCallFilter= allows (else EPERM under systemd only)."""
    import signal

    from tests.e2e import vpn
    from tests.e2e.netns import Topology, require_root, wait_until

    require_root()
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing: install the Debian package 'strace'", pytrace=False)
    with Topology(clients=1) as topo:
        sk, ck = vpn.genkeys(), vpn.genkeys()
        extra = f'full_tunnel = true\negress_interface = "{topo.link.server_if}"\n'
        cfg = vpn.write_server_config(workdir / "vpnd.toml", sk, [ck], extra=extra)
        slog, strace_s = workdir / "vpnd.log", workdir / "vpnd.trace"
        with open(slog, "ab") as out:
            sproc = topo.popen(topo.server, *_traced(strace, strace_s, [vpn.VPND, "serve", "--config", str(cfg)]),
                               stdout=out, stderr=subprocess.STDOUT)
        server_pid = _tracee(sproc.pid, vpn.VPND)
        assert wait_until(lambda: "vpnd: started" in slog.read_text() or sproc.poll() is not None, 60), \
            slog.read_text()
        sock = workdir / "client.sock"
        ccfg = vpn.write_client_config(workdir / "client.toml", ck, sk.public, f"{topo.link.server_ip4}:{vpn.PORT}",
                                       sock)
        (workdir / "client.resolv.conf").write_text("nameserver 192.0.2.53\n")      # replaced with its owner
        clog, strace_c = workdir / "client.log", workdir / "client.trace"
        with open(clog, "ab") as out:        # nsenter: the host's /sys, so bypass finds its cgroup v2
            cproc = topo.popen(None, "nsenter", f"--net=/run/netns/{topo.client}", "--",
                               *_traced(strace, strace_c, [vpn.VPNCLIENT, "up", "--config", str(ccfg)]),
                               stdout=out, stderr=subprocess.STDOUT)
        client_pid = _tracee(cproc.pid, vpn.VPNCLIENT)
        client = vpn.Daemon("client", topo.client, ccfg, clog, cproc, vpn.CLIENT_IF, sock)
        vpn.wait_connected(topo, client, 60)
        assert vpn.ping(topo, topo.client, vpn.SERVER_TUN4, count=2).returncode == 0
        vpn.status(topo, client)
        for pid, proc in ((client_pid, cproc), (server_pid, sproc)):
            os.kill(pid, signal.SIGTERM)                 # the traced program, for an orderly stop
            assert proc.wait(30) == 0
    for name, trace in (("vpnd.service", strace_s), ("vpnclient@.service", strace_c)):
        used = _syscalls(trace)
        assert {"execve", "socket", "ioctl", "sendto"} <= used, f"{trace} looks empty"
        print(f"{name}: {len(used)} system calls traced; of @privileged: {sorted(used & {'bpf', 'fchown'})}")
        missing = used - allowed_syscalls(name)
        assert not missing, f"{name}: SystemCallFilter= refuses {sorted(missing)}, which a tunnel's life calls"


def test_the_filters_take_out_what_is_not_needed():
    vpnd, client = allowed_syscalls("vpnd.service"), allowed_syscalls("vpnclient@.service")
    for calls in (vpnd, client):
        assert {"mlockall", "prctl", "ioctl", "sendmsg", "prlimit64"} <= calls
        assert not {"mount", "init_module", "reboot", "ptrace", "chroot", "setuid", "setrlimit", "kexec_load"} & calls
    assert not {"bpf", "fchown", "chown"} & vpnd
    assert {"bpf", "fchown"} <= client and "chown" not in client
