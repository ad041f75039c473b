"""The system resolver while the tunnel is up: save it, point it at the tunnel, put it back exactly.

Two ways, behind `snapshot` / `point_at` / `restore`:

- **a resolver file** (`resolv_conf`, default /etc/resolv.conf): `snapshot` records what is there
  byte for byte (a regular file: its bytes, mode, owner; a symlink: its target; or nothing), the
  caller stores that in the state file *before* `point_at` replaces the file (atomically: a temporary
  file renamed over it; in place when the path is a mount point, as in containers or under
  `ip netns exec` with /etc/netns/NS/resolv.conf); `restore` writes the recorded state back the
  same way, also from a state file after a crash.
- **systemd-resolved**, when it runs and `resolv_conf` is the default: `resolvectl dns/domain/
  default-route` on the tunnel interface (per-link settings the kernel drops with the interface,
  so there is nothing to restore after a crash). Not on every machine; kept to `_resolved_*`.
"""

from __future__ import annotations

import base64
import errno
import os
import shutil
import stat
import subprocess

from vpncore import atomicfile
from vpncore.cli import UserError

DEFAULT = "/etc/resolv.conf"
HEADER = "# Written by vpnclient while the tunnel is up: DNS goes through the tunnel.\n" \
         "# 'vpnclient down' puts back the original, byte for byte.\n"


def resolved_active(path: str) -> bool:
    """systemd-resolved runs here and the config leaves the resolver file at its default."""
    return path == DEFAULT and shutil.which("resolvectl") is not None and os.path.isdir("/run/systemd/resolve")


def _named_netns() -> str | None:
    """The name `ip netns` gives the network namespace we run in, if any."""
    try:
        me = os.stat("/proc/self/ns/net")
        names = os.listdir("/run/netns")
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(os.path.join("/run/netns", name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
            return name
    return None


def shared_with_host(path: str) -> bool:
    """True when we run in a network namespace of our own but `path` is the file the host's
    namespace uses too, so changing it would point the host's resolver at a tunnel it does not have.

    Only the default path is checked (a configured path is the operator's choice). Under
    `ip netns exec NS`, /etc/resolv.conf is NS's own only if /etc/netns/NS/resolv.conf exists (it
    is bind-mounted over it). Otherwise, compared with PID 1's view where that is readable; when
    in doubt in a foreign namespace, it counts as shared (leaving it alone is the safe mistake)."""
    if path != DEFAULT:
        return False
    name = _named_netns()
    if name is not None:
        return not os.path.exists(os.path.join("/etc/netns", name, "resolv.conf"))
    try:
        if os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino:
            return False
        mine, host = os.stat(path), os.stat("/proc/1/root" + path)
    except OSError:
        return False        # no named namespace and PID 1 unreadable: a container or the host itself
    return (mine.st_dev, mine.st_ino) == (host.st_dev, host.st_ino)


def snapshot(path: str) -> dict:
    """What is at `path` now, as a JSON-able dict for the state file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"path": path, "kind": "absent"}
    except OSError as exc:
        raise UserError(f"cannot read the resolver file {path} ({exc.strerror}); check 'resolv_conf'", 1) from None
    if stat.S_ISLNK(st.st_mode):
        return {"path": path, "kind": "symlink", "target": os.readlink(path)}
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"the resolver file {path} is not a regular file; point 'resolv_conf' at a file", 1)
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise UserError(f"cannot read the resolver file {path} ({exc.strerror}); check 'resolv_conf'", 1) from None
    return {"path": path, "kind": "file", "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "data": base64.b64encode(data).decode()}


def content(nameservers: list[str]) -> bytes:
    return (HEADER + "".join(f"nameserver {ns}\n" for ns in nameservers)).encode()


def _replace(path: str, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    """Atomically replace `path` (a file or a symlink) with a regular file holding `data`."""
    try:
        atomicfile.replace(path, data, mode, owner)
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        _in_place(path, data, mode, owner)      # a bind-mounted file cannot be renamed over


def _in_place(path: str, data: bytes, mode: int, owner) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def point_at(saved: dict, nameservers: list[str]) -> None:
    """Make the resolver use `nameservers` (the tunnel's DNS). `saved` is this path's snapshot."""
    path = saved["path"]
    if saved["kind"] == "resolved":
        _resolved_set(saved["interface"], nameservers)
        return
    mode = saved.get("mode", 0o644) | 0o444 if saved["kind"] == "file" else 0o644
    owner = (saved["uid"], saved["gid"]) if saved["kind"] == "file" else None
    try:
        _replace(path, content(nameservers), mode, owner)
    except OSError as exc:
        raise UserError(f"cannot write the resolver file {path} ({exc.strerror}); check 'resolv_conf'", 1) from None


def restore(saved: dict) -> None:
    """Put back exactly what `snapshot` recorded."""
    path, kind = saved["path"], saved["kind"]
    try:
        if kind == "resolved":
            _resolved_revert(saved["interface"])
        elif kind == "absent":
            _unlink(path)
        elif kind == "symlink":
            tmp = f"{path}.vpnclient-tmp"
            _unlink(tmp)
            os.symlink(saved["target"], tmp)
            try:
                os.replace(tmp, path)
            except OSError:
                _unlink(tmp)
                raise
        else:
            _replace(path, base64.b64decode(saved["data"]), saved["mode"], (saved["uid"], saved["gid"]))
    except OSError as exc:
        raise UserError(f"cannot restore the resolver file {path} ({exc.strerror}); the original is saved "
                        f"in the state file", 1) from None


# --- systemd-resolved (only where it runs) ------------------------------------------------------

def resolved_snapshot(interface: str) -> dict:
    return {"path": DEFAULT, "kind": "resolved", "interface": interface}


def _resolvectl(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["resolvectl", *argv], capture_output=True, text=True, timeout=10)


def _resolved_set(interface: str, nameservers: list[str]) -> None:
    for argv in (("dns", interface, *nameservers), ("domain", interface, "~."), ("default-route", interface, "yes")):
        r = _resolvectl(*argv)
        if r.returncode != 0:
            raise UserError(f"resolvectl {argv[0]} failed ({r.stderr.strip()[:100]}); set resolv_conf to a "
                            f"file to manage it directly", 1)


def _resolved_revert(interface: str) -> None:
    try:
        _resolvectl("revert", interface)     # fails harmlessly once the interface is gone
    except (OSError, subprocess.TimeoutExpired):
        pass
