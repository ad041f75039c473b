"""vpnd and vpnclient without root: a system user holding CAP_NET_ADMIN, as the units run them (issue 18).

packaging/vpnd.service runs vpnd as user vpnd with AmbientCapabilities=CAP_NET_ADMIN
CAP_NET_BIND_SERVICE; packaging/vpnclient@.service runs vpnclient as user vpnclient with
CAP_NET_ADMIN (plus what the resolver file and bypass need). Here both run as user nobody with
exactly those capabilities in the ambient set (`setpriv`, util-linux), in the namespaces of a
`Topology`, inside a sandbox that copies what the units change for the code:

- /proc/sys read-only except /proc/sys/net (ProtectKernelTunables=yes, ReadWritePaths=/proc/sys/net);
- no memory both writable and executable: PR_SET_MDWE, inherited across execve, before the
  interpreter starts (MemoryDenyWriteExecute=yes; skipped on kernels before 6.3);
- /dev/net/tun mode 0666, as udev makes it on a normal system (50-udev-default.rules): this test
  machine's devtmpfs may leave it 0600. A fresh node is bind-mounted over it in a private mount
  namespace; the host's is not touched.

The venv's interpreter may live where nobody cannot reach it (/root): then the system interpreter
of the same version runs the sources with the venv's packages (as in tests/test_cli_errors.py).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from tests.e2e import vpn
from tests.e2e.netns import Topology, link_exists, require_root, wait_until

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
CAP = {"net_admin": 12, "net_bind_service": 10, "dac_override": 1, "fowner": 3, "chown": 0, "bpf": 39}
SERVER_CAPS = ("net_admin", "net_bind_service")                    # packaging/vpnd.service
CLIENT_UNIT_CAPS = ("net_admin", "dac_override", "fowner", "chown", "bpf")   # packaging/vpnclient@.service
REFUSAL = "needs CAP_NET_ADMIN"

SANDBOX = r"""
set -e
dev="$1"; shift
mount -t tmpfs -o mode=0755,size=64k vpnt-dev "$dev"
mknod -m 0666 "$dev/tun" c 10 200
mount --bind "$dev/tun" /dev/net/tun
mount --bind /proc/sys /proc/sys
mount --bind /proc/sys/net /proc/sys/net
mount -o remount,bind,ro /proc/sys
exec "$@"
"""

MDWE = r"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:      # PR_SET_MDWE, REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE failed: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[1], sys.argv[1:])
"""


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(66, 0, 0, 0, 0) >= 0                             # PR_GET_MDWE


def _base_env() -> dict:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1"}


_PY: list = []


def nobody_python() -> tuple[str, dict]:
    """An interpreter user nobody can run with the project and its packages, and its environment."""
    if not _PY:
        system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}",
                              path="/usr/local/bin:/usr/bin:/bin")
        purelib = sysconfig.get_paths()["purelib"]
        candidates = [(sys.executable, _base_env())]
        if system:
            candidates.append((system, dict(_base_env(), PYTHONPATH=os.pathsep.join([str(REPO), purelib]))))
        found = None
        for exe, env in candidates:
            r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", exe,
                                "-c", "import nacl.bindings, trio, cryptography, vpnd.server, vpnclient.client"],
                               env=env, cwd="/", capture_output=True, timeout=60)
            if r.returncode == 0:
                found = (exe, env)
                break
        _PY.append(found)
    if _PY[0] is None:
        pytest.skip("no interpreter that user nobody can run with this venv's packages")
    return _PY[0]


def as_nobody(caps: tuple[str, ...], *argv: str, ambient: bool = True) -> list[str]:
    """argv run as nobody:nogroup holding `caps` (ambient: kept across execve, as the units give them)."""
    wanted = ",".join(f"+{c}" for c in caps)
    opts = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs",
            f"--inh-caps=-all{',' + wanted if wanted else ''}",
            f"--bounding-set=-all{',' + wanted if wanted else ''}"]
    if ambient and caps:
        opts.append(f"--ambient-caps=-all,{wanted}")
    return ["setpriv", *opts, "--", *argv]


def sandboxed(devdir: Path, argv: list[str]) -> list[str]:
    """argv in a private mount namespace shaped like the units (see the module docstring)."""
    inner = [sys.executable, "-c", MDWE, *argv] if _mdwe_supported() else argv
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", SANDBOX, "sh", str(devdir), *inner]


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def assert_identity(pid: int, caps: tuple[str, ...]) -> None:
    st = proc_status(pid)
    assert st["Uid"].split() == [str(NOBODY)] * 4 and st["Gid"].split() == [str(NOBODY)] * 4, st
    want = sum(1 << CAP[c] for c in caps)
    assert int(st["CapEff"], 16) == want and int(st["CapAmb"], 16) == want, st
    assert st["NoNewPrivs"] == "1"


def sysctl(topo: Topology, ns: str, key: str) -> str:
    return topo.run(ns, "sysctl", "-n", key).stdout.strip()


def own(path: Path, uid: int = NOBODY) -> Path:
    os.chown(path, uid, uid)
    return path


@pytest.fixture
def shared():
    """A directory user nobody owns (configs, sockets, state), outside pytest's root-only tmp_path."""
    require_root()
    d = Path(tempfile.mkdtemp(prefix="vpnt-nonroot-"))
    try:
        d.chmod(0o755)
        own(d)
        (d / "dev").mkdir()
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def topo(shared):
    topology = Topology(clients=1)
    try:
        yield topology
    finally:
        topology.close()


def _spawn(topo: Topology, ns: str | None, log: Path, argv: list[str], env: dict, nsenter: bool = False):
    with open(log, "ab") as out:
        if nsenter:                 # the host's /sys (its cgroup v2 mount, for bypass), not ip netns exec's
            return topo.popen(None, "nsenter", f"--net=/run/netns/{ns}", "--", *argv, stdout=out,
                              stderr=subprocess.STDOUT, env=env)
        return topo.popen(ns, *argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def _server_up(topo: Topology, proc, log: Path) -> bool:
    """Once vpnd said "started" (after its TUN, nftables table and sysctls are in place)."""
    def started() -> bool:
        return "vpnd: started" in log.read_text(errors="replace")
    return wait_until(lambda: proc.poll() is not None or started(), 60) and proc.poll() is None \
        and vpn._server_ready(topo, topo.server)


def test_tunnel_as_nobody_with_cap_net_admin(topo, shared):
    """vpnd (CAP_NET_ADMIN, CAP_NET_BIND_SERVICE) and vpnclient (CAP_NET_ADMIN alone) as nobody: a full
    tunnel comes up (TUN, nftables NAT and kill switch, forwarding sysctls, policy routing,
    src_valid_mark, the DNS forwarder on port 53), pings go through, and SIGTERM undoes it all."""
    py, env = nobody_python()
    sk, ck = vpn.genkeys(), vpn.genkeys()
    extra = f'full_tunnel = true\negress_interface = "{topo.link.server_if}"\n'
    server_cfg = own(vpn.write_server_config(shared / "vpnd.toml", sk, [ck], extra=extra))
    assert sysctl(topo, topo.server, "net.ipv4.ip_forward") == "0"
    slog = shared / "vpnd.log"
    server = _spawn(topo, topo.server, slog, sandboxed(shared / "dev", as_nobody(
        SERVER_CAPS, py, "-m", "vpnd", "serve", "--config", str(server_cfg))), env)
    assert _server_up(topo, server, slog), f"vpnd as nobody did not come up ({server.poll()})\n{slog.read_text()}"
    assert_identity(server.pid, SERVER_CAPS)
    # vpnd turned forwarding on itself, through the read-only /proc/sys's writable net/ branch
    assert sysctl(topo, topo.server, "net.ipv4.ip_forward") == "1"
    assert sysctl(topo, topo.server, "net.ipv6.conf.all.forwarding") == "1"
    assert "table inet vpnd_" in topo.run(topo.server, "nft", "list", "tables").stdout

    sock = shared / "client.sock"
    client_cfg = own(vpn.write_client_config(shared / "client.toml", ck, sk.public,
                                             f"{topo.link.server_ip4}:{vpn.PORT}", sock))
    resolv = shared / "client.resolv.conf"
    resolv.write_bytes(b"nameserver 192.0.2.53\n")
    own(resolv)
    clog = shared / "client.log"
    proc = _spawn(topo, topo.client, clog, sandboxed(shared / "dev", as_nobody(
        ("net_admin",), py, "-m", "vpnclient", "up", "--config", str(client_cfg), "--log-level", "verbose")), env)
    client = vpn.Daemon("client", topo.client, client_cfg, clog, proc, vpn.CLIENT_IF, sock)
    sdaemon = vpn.Daemon("vpnd", topo.server, server_cfg, slog, server, vpn.SERVER_IF)
    st = vpn.wait_connected(topo, client, 60, server=sdaemon)
    assert_identity(proc.pid, ("net_admin",))
    assert st["full_tunnel"] == ["IPv4", "IPv6"] and st["kill_switch"], st
    assert sysctl(topo, topo.client, "net.ipv4.conf.all.src_valid_mark") == "1"
    assert "nameserver 198.19.0.1" in resolv.read_text()
    for addr in (vpn.SERVER_TUN4, vpn.SERVER_TUN6):
        r = vpn.ping(topo, topo.client, addr, count=3)
        assert r.returncode == 0 and " 3 received" in r.stdout, f"{r.stdout}\n{client.log_tail()}"

    assert topo.stop(proc, 20) == 0, client.log_tail()
    assert resolv.read_bytes() == b"nameserver 192.0.2.53\n"
    assert not link_exists(vpn.CLIENT_IF, topo.client)
    assert "vpnclient" not in topo.run(topo.client, "nft", "list", "tables").stdout
    assert topo.stop(server, 20) == 0, sdaemon.log_tail()
    assert not link_exists(vpn.SERVER_IF, topo.server)
    assert sysctl(topo, topo.server, "net.ipv4.ip_forward") == "0"          # put back as it was
    assert "vpnd" not in topo.run(topo.server, "nft", "list", "tables").stdout


def test_client_with_the_units_capabilities_keeps_resolver_owner_and_bypass(topo, shared):
    """vpnclient as nobody with packaging/vpnclient@.service's five capabilities: a resolver file
    root owns is rewritten and put back with its owner and mode, and the bypass cgroup (cgroup v2
    root, BPF program) is set up and usable."""
    py, env = nobody_python()
    sk, ck = vpn.genkeys(), vpn.genkeys()
    server = vpn.start_server(topo, shared, sk, [ck], timeout=60)
    sock = shared / "client.sock"
    client_cfg = own(vpn.write_client_config(shared / "client.toml", ck, sk.public,
                                             f"{topo.link.server_ip4}:{vpn.PORT}", sock))
    resolv = shared / "client.resolv.conf"
    resolv.write_bytes(b"# the host's\nnameserver 192.0.2.53\n")
    resolv.chmod(0o644)
    own(resolv, 0)
    before = os.stat(resolv)
    clog = shared / "client.log"
    proc = _spawn(topo, topo.client, clog, sandboxed(shared / "dev", as_nobody(
        CLIENT_UNIT_CAPS, py, "-m", "vpnclient", "up", "--config", str(client_cfg))), env, nsenter=True)
    client = vpn.Daemon("client", topo.client, client_cfg, clog, proc, vpn.CLIENT_IF, sock)
    st = vpn.wait_connected(topo, client, 60, server=server)
    assert_identity(proc.pid, CLIENT_UNIT_CAPS)
    now = os.stat(resolv)
    assert "nameserver 198.19.0.1" in resolv.read_text()
    assert (now.st_uid, now.st_gid, now.st_mode & 0o7777) == (0, 0, 0o644)
    assert vpn.ping(topo, topo.client, vpn.SERVER_TUN4).returncode == 0
    from vpnclient.bypass import cgroup2_root
    if cgroup2_root() is not None:
        assert st.get("bypass_cgroup") and not st.get("bypass_unavailable"), st
        r = topo.run(None, "nsenter", f"--net=/run/netns/{topo.client}", vpn.VPNCLIENT, "bypass", "--socket",
                     str(sock), "--", "cat", "/proc/self/cgroup", check=False)
        assert r.returncode == 0 and os.path.basename(st["bypass_cgroup"]) in r.stdout, r.stdout + r.stderr
    else:
        print("no cgroup v2 mounted here: bypass not checked")
    assert topo.stop(proc, 20) == 0, client.log_tail()
    after = os.stat(resolv)
    assert resolv.read_bytes() == b"# the host's\nnameserver 192.0.2.53\n"
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    if st.get("bypass_cgroup"):
        assert not os.path.exists(st["bypass_cgroup"])


def _refused(argv: list[str], env: dict, prog: str) -> None:
    r = subprocess.run(["unshare", "--net", "--", *argv], env=env, cwd="/", capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 1, f"exit {r.returncode}\n{r.stderr}{r.stdout}"
    assert lines[0].startswith(f"{prog}: error: ") and REFUSAL in lines[0], lines[0]
    assert "AmbientCapabilities=CAP_NET_ADMIN" in lines[0] and "root" in lines[0]


@pytest.mark.parametrize("caps,ambient", [((), True), (("net_admin",), False), (("net_bind_service",), True)],
                         ids=["no-capabilities", "net-admin-not-ambient", "other-capability"])
def test_without_cap_net_admin_each_refuses_with_one_line(shared, caps, ambient):
    """Without CAP_NET_ADMIN (or with it only where execve drops it: nft and ip would not get it),
    serve and up refuse before opening anything, in one line naming the fix. In an empty network
    namespace, so a wrong acceptance could touch nothing."""
    py, env = nobody_python()
    sk, ck = vpn.genkeys(), vpn.genkeys()
    server_cfg = own(vpn.write_server_config(shared / "vpnd.toml", sk, [ck]))
    client_cfg = own(vpn.write_client_config(shared / "client.toml", ck, sk.public, "198.18.0.1:51820",
                                             shared / "client.sock"))
    _refused(as_nobody(caps, py, "-m", "vpnd", "serve", "--config", str(server_cfg), ambient=ambient), env, "vpnd")
    _refused(as_nobody(caps, py, "-m", "vpnclient", "up", "--config", str(client_cfg), ambient=ambient), env,
             "vpnclient")
    assert not (shared / "client.sock").exists() and not (shared / "vpnd.sock").exists()
    assert not (shared / "client-state").exists()       # nothing written: the check comes first


def test_the_sandbox_is_what_the_units_make(shared):
    """The other tests mean something only if the sandbox holds: /proc/sys read-only but net/,
    W^X memory refused (where the kernel has PR_SET_MDWE), /dev/net/tun 0666. Root, in an empty
    network namespace."""
    probe = r"""
import errno, mmap, os, stat
try:
    open("/proc/sys/kernel/domainname", "w").close()
    print("kernel-writable")
except OSError as e:
    print("kernel-" + errno.errorcode[e.errno])
with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
    f.write("1")
print("net-writable")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("wx-allowed")
except OSError:
    print("wx-refused")
print(oct(stat.S_IMODE(os.stat("/dev/net/tun").st_mode)))
"""
    host_tun = os.stat("/dev/net/tun")
    r = subprocess.run(["unshare", "--net", "--", *sandboxed(shared / "dev", [sys.executable, "-c", probe])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    want = ["kernel-EROFS", "net-writable", "wx-refused" if _mdwe_supported() else "wx-allowed", "0o666"]
    assert r.stdout.split() == want, r.stdout + r.stderr
    now = os.stat("/dev/net/tun")                                          # the host's node is untouched
    assert (now.st_ino, now.st_mode, now.st_uid) == (host_tun.st_ino, host_tun.st_mode, host_tun.st_uid)
