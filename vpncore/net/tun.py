"""TUN devices: open, offloads and link configuration (DESIGN §3a).

This is the only module that opens TUN devices. `open_tun` returns a `Tun` whose non-blocking fd
carries bare IP packets (IFF_TUN | IFF_NO_PI); with ``vnet_hdr=True`` every read and write starts
with a 10-byte virtio_net_hdr and the kernel may hand over TCP/UDP super-packets (TUNSETOFFLOAD).
python-pytun cannot set offloads, so the ioctls are done here with `fcntl.ioctl`.

The link helpers shell out to `ip` (iproute2) in the current network namespace. Every failure a
user can cause is raised as `TunError` with one sentence saying what is wrong and how to fix it.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import struct
import subprocess

__all__ = [
    "TunError", "Tun", "open_tun", "set_mtu", "set_gso_max_size", "add_address", "add_route", "link_up",
    "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_TSO_ECN", "TUN_F_USO4", "TUN_F_USO6",
    "VNET_HDR_LEN",
]

TUN_PATH = "/dev/net/tun"

# ioctl numbers and flags (linux/if_tun.h)
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

from ..proto.constants import VNET_HDR_LEN  # noqa: E402  (the default TUNSETVNETHDRSZ)

_OFFLOADS_FULL = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6
_OFFLOADS_NO_USO = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

_IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name[IFNAMSIZ], ifr_flags, padding
IFNAMSIZ = 16


class TunError(Exception):
    """A TUN device could not be opened or configured; str() is one sentence for the user."""


class Tun:
    """An open TUN device: a non-blocking fd plus what the kernel agreed to."""

    __slots__ = ("fd", "name", "vnet_hdr", "offloads")

    def __init__(self, fd: int, name: str, vnet_hdr: bool, offloads: int) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.offloads = offloads  # TUN_F_* bits accepted by TUNSETOFFLOAD (0 without vnet_hdr)

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the fd (a non-persistent TUN device disappears with it). Safe to call twice."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "Tun":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Tun {self.name!r} fd={self.fd} vnet_hdr={self.vnet_hdr} offloads={self.offloads:#x}>"


def _check_name(name: str) -> bytes:
    """The kernel's dev_valid_name rules, checked up front for a clear message ('' = kernel picks)."""
    raw = name.encode("utf-8", "surrogateescape")
    bad = (
        len(raw) >= IFNAMSIZ
        or name in (".", "..")
        or any(c in name for c in "/:\0")
        or any(c.isspace() for c in name)
    )
    if bad:
        raise TunError(
            f"invalid interface name {name!r}: use at most 15 characters without '/', ':' or spaces"
        )
    return raw


def _open_error(e: OSError) -> TunError:
    if e.errno == errno.ENOENT:
        return TunError(
            f"cannot open {TUN_PATH}: no such file; load the tun module (modprobe tun) or, "
            "in a container, pass the device in (--device /dev/net/tun)"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return TunError(
            f"cannot open {TUN_PATH}: permission denied; run as root or grant CAP_NET_ADMIN"
        )
    if e.errno in (errno.ENODEV, errno.ENXIO):
        return TunError(
            f"cannot open {TUN_PATH}: the kernel has no TUN support; load the tun module (modprobe tun)"
        )
    return TunError(f"cannot open {TUN_PATH}: {e.strerror or e}")


def _setiff_error(e: OSError, name: str) -> TunError:
    shown = repr(name) if name else "(kernel-chosen name)"
    if e.errno in (errno.EPERM, errno.EACCES):
        return TunError(
            f"cannot create TUN device {shown}: operation not permitted; "
            "run as root or grant CAP_NET_ADMIN"
        )
    if e.errno == errno.EBUSY:
        return TunError(
            f"TUN device {shown} is busy: another process has it open; "
            "stop that process or choose another name"
        )
    if e.errno == errno.EINVAL:
        return TunError(
            f"cannot create TUN device {shown}: an interface of another kind (or a TAP/multi-queue "
            "device) already has that name; delete it or choose another name"
        )
    return TunError(f"cannot create TUN device {shown}: {e.strerror or e}")


def _set_offloads(fd: int) -> int:
    """Enable the widest offload set the kernel accepts; return the accepted TUN_F_* bits."""
    for flags in (_OFFLOADS_FULL, _OFFLOADS_NO_USO):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise TunError(f"cannot enable TUN offloads: {e.strerror or e}") from None
    return 0  # kernel took none: reads still carry a virtio_net_hdr, packets are never merged


def open_tun(name: str, *, vnet_hdr: bool = False) -> Tun:
    """Open (create or attach to) the TUN device `name`; `.name` is the kernel's actual name."""
    raw = _check_name(name)
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise _open_error(e) from None
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        try:
            out = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, flags))
        except OSError as e:
            raise _setiff_error(e, name) from None
        actual = _IFREQ.unpack(out)[0].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        offloads = _set_offloads(fd) if vnet_hdr else 0
        os.set_blocking(fd, False)
        return Tun(fd, actual, vnet_hdr, offloads)
    except BaseException:
        os.close(fd)
        raise


# -- link configuration via iproute2 (current network namespace) -------------------------------


def _ip(what: str, *args: str) -> None:
    try:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise TunError(f"cannot {what}: the 'ip' command is missing; install iproute2") from None
    except subprocess.TimeoutExpired:
        raise TunError(f"cannot {what}: 'ip {' '.join(args)}' did not finish within 10 s") from None
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit status {r.returncode}"
        reason = reason.removeprefix("Error: ").removeprefix("RTNETLINK answers: ").rstrip(".")
        hint = ""
        if "not permitted" in reason:
            hint = "; run as root or grant CAP_NET_ADMIN"
        elif "not up" in reason:
            hint = f"; bring {args[args.index('dev') + 1]} up first (link_up)" if "dev" in args else ""
        raise TunError(f"cannot {what}: {reason}{hint}")


def _parse(cidr: str, *, network: bool) -> tuple[str, str]:
    """-> (ip family option, normalised cidr); a network keeps only its prefix bits."""
    try:
        obj = ipaddress.ip_network(cidr, strict=False) if network else ipaddress.ip_interface(cidr)
    except (ValueError, TypeError):
        kind = "network" if network else "address"
        raise TunError(
            f"invalid {kind} {cidr!r}: use a form like 198.18.0.1/24 or 2001:2::1/64"
        ) from None
    return ("-6" if obj.version == 6 else "-4"), str(obj)


def set_mtu(name: str, mtu: int) -> None:
    """Set the interface MTU (IPv6 needs at least 1280)."""
    _ip(f"set MTU {mtu} on {name}", "link", "set", "dev", name, "mtu", str(int(mtu)))


def set_gso_max_size(name: str, size: int) -> None:
    """The largest super-packet the kernel hands over (a TCP connection reads it when it connects)."""
    _ip(f"set gso_max_size {size} on {name}", "link", "set", "dev", name, "gso_max_size", str(int(size)))


def add_address(name: str, cidr: str) -> None:
    """Add an address like '198.18.0.1/24' or '2001:2::1/64' (IPv6 with nodad: usable at once)."""
    fam, cidr = _parse(cidr, network=False)
    extra = ["nodad"] if fam == "-6" else []
    _ip(f"add address {cidr} to {name}", fam, "addr", "add", cidr, "dev", name, *extra)


def add_route(name: str, cidr: str) -> None:
    """Route the network `cidr` through interface `name`."""
    fam, cidr = _parse(cidr, network=True)
    _ip(f"add route {cidr} via {name}", fam, "route", "replace", cidr, "dev", name)


def link_up(name: str) -> None:
    """Bring the interface up."""
    _ip(f"bring {name} up", "link", "set", "dev", name, "up")


def del_address(name: str, cidr: str) -> None:
    """Remove an address added with add_address."""
    fam, cidr = _parse(cidr, network=False)
    _ip(f"remove address {cidr} from {name}", fam, "addr", "del", cidr, "dev", name)
