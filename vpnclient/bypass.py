"""`vpnclient bypass -- COMMAND`: one program whose traffic skips the tunnel (issue 12; cf. mullvad-exclude).

`up` creates a cgroup v2 `vpnclient-bypass-<interface>` (with the network namespace's inode
appended when it is not PID 1's: cgroups are global, network namespaces are not, so two clients
in two namespaces must not share one) and attaches a four-instruction BPF program of type
CGROUP_SOCK at BPF_CGROUP_INET_SOCK_CREATE that sets `sk_mark = fwmark` on every socket created
inside it. `bypass` writes its own PID to the cgroup's `cgroup.procs` and execs COMMAND, so
COMMAND and its children open sockets that carry the tunnel's mark from the start: the
full tunnel's `not fwmark` rule sends them to the main table (routing.py), the route lookup of
connect() already picks the underlay's source address, and the kill switch accepts the mark.

Why not nftables (`socket cgroupv2 level 1 "..." meta mark set M` in a route chain): the mark is
set after connect() chose the tunnel's source address, so every bypassed flow needs a masquerade
rule too, and nft finds the cgroup only under /sys/fs/cgroup (a hybrid host mounts cgroup v2 at
/sys/fs/cgroup/unified). The BPF program marks the socket itself; nothing to rewrite.

The cgroup must be visible where `up` and `bypass` run: `ip netns exec` mounts a fresh /sys
without the cgroup mounts (use `nsenter --net=/run/netns/NAME` there). Without a cgroup v2
mount, `up` runs without bypass and `bypass` says why (exit status 1). `teardown` detaches the
program and removes the cgroup (if programs still run in it, it stays, unmarked).
"""

from __future__ import annotations

import ctypes
import os
import struct

from vpncore.cli import UserError

SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH = 5, 8, 9
BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_CGROUP_INET_SOCK_CREATE = 2
BPF_SOCK_MARK_OFFSET = 16           # struct bpf_sock: bound_dev_if, family, type, protocol, mark
ATTR_SIZE = 128


def cgroup2_root() -> str | None:
    """Where the cgroup v2 hierarchy is mounted in this mount namespace (/sys/fs/cgroup preferred)."""
    roots = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    roots.append(left.split()[4])
    except OSError:
        return None
    return "/sys/fs/cgroup" if "/sys/fs/cgroup" in roots else (roots[0] if roots else None)


def cgroup_name(interface: str) -> str:
    name = f"vpnclient-bypass-{interface}"
    try:
        mine, host = os.stat("/proc/self/ns/net").st_ino, os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return name
    return name if mine == host else f"{name}-{mine}"


def program(mark: int) -> bytes:
    """r2 = mark; ((struct bpf_sock *)r1)->mark = r2; return 1 (allow)."""
    return b"".join([
        struct.pack("<BBhi", 0xB7, 0x02, 0, mark - (1 << 32) if mark >= 1 << 31 else mark),  # mov r2, imm
        struct.pack("<BBhi", 0x63, 0x21, BPF_SOCK_MARK_OFFSET, 0),                          # stx w [r1+16], r2
        struct.pack("<BBhi", 0xB7, 0x00, 0, 1),                                             # mov r0, 1
        struct.pack("<BBhi", 0x95, 0x00, 0, 0),                                             # exit
    ])


def _bpf(cmd: int, attr: bytes) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr.ljust(ATTR_SIZE, b"\0"), ATTR_SIZE)
    r = libc.syscall(SYS_BPF, cmd, buf, ATTR_SIZE)
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r


def _attach(path: str, mark: int) -> None:
    insns = ctypes.create_string_buffer(program(mark))
    license_ = ctypes.create_string_buffer(b"GPL")
    prog = _bpf(BPF_PROG_LOAD, struct.pack("<IIQQ", BPF_PROG_TYPE_CGROUP_SOCK, len(insns.raw) // 8,
                                           ctypes.addressof(insns), ctypes.addressof(license_)))
    cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _bpf(BPF_PROG_ATTACH, struct.pack("<IIII", cg, prog, BPF_CGROUP_INET_SOCK_CREATE, 0))
    finally:
        os.close(cg)
        os.close(prog)              # the attachment holds the program


def setup(interface: str, mark: int) -> tuple[str | None, str]:
    """Create the cgroup and attach the marking program: (path, "") or (None, why not)."""
    root = cgroup2_root()
    if root is None:
        return None, ("no cgroup v2 hierarchy is mounted here (mount -t cgroup2 none /sys/fs/cgroup; under "
                      "'ip netns exec' /sys is fresh: use nsenter --net=/run/netns/NAME)")
    path = os.path.join(root, cgroup_name(interface))
    try:
        os.makedirs(path, exist_ok=True)
        _attach(path, mark)
    except OSError as exc:
        teardown(path)
        return None, f"cannot mark the sockets of cgroup {path} ({exc.strerror}; BPF cgroup programs are needed)"
    return path, ""


def teardown(path: str | None) -> None:
    """Detach the program and remove the cgroup (kept, unmarked, while programs still run in it)."""
    if not path or not os.path.isdir(path):
        return
    try:
        cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _bpf(BPF_PROG_DETACH, struct.pack("<IIII", cg, 0, BPF_CGROUP_INET_SOCK_CREATE, 0))
        finally:
            os.close(cg)
    except OSError:
        pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def run(path: str | None, why: str, argv: list[str]) -> int:
    """Move this process into the bypass cgroup and exec `argv` (returns only on failure)."""
    if not argv:
        raise UserError("say which program to run: vpnclient bypass -- COMMAND [ARGS...]")
    if not path:
        raise UserError(f"the running vpnclient offers no bypass: {why or 'it has no bypass cgroup'}", 1)
    if not os.path.isdir(path):
        raise UserError(f"cannot see the bypass cgroup {path} from here; run bypass where /sys/fs/cgroup is "
                        f"the one 'up' sees (not under 'ip netns exec': use nsenter --net=...)", 1)
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        raise UserError(f"cannot enter the bypass cgroup {path} ({exc.strerror}); run bypass as root", 1) from None
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise UserError(f"cannot run {argv[0]!r}: {exc.strerror}", 1) from None
    return 1
