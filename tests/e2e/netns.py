"""Network-namespace harness for end-to-end tests and the demo (DESIGN §5).

A `Topology` is one server namespace and N client namespaces; client i is joined to the server by its
own veth pair (no bridge). Underlay addressing for link i (i from 0):

    server side  198.18.i.1/24   2001:2:0:i::1/64
    client side  198.18.i.2/24   2001:2:0:i::2/64

IPv6 addresses are added with `nodad` (usable at once). Everything is created with unique names
(`vpnt-<suffix>-...`, veth `v[cs]<suffix><i>`) and removed by `close()`: the processes started through
`popen` (SIGTERM, 5 s, SIGKILL; by PID, only ours), then the namespaces (which takes their veth ends
and TUN devices with them), then any veth left in the root namespace.

Usable outside pytest (the demo): pytest is imported only inside `require_root()`.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["require_root", "is_root", "wait_until", "Topology", "Link", "CommandFailed",
           "netns_list", "link_exists", "NetnsFiles"]

PREFIX = "vpnt-"
NETNS_ETC = Path("/etc/netns")


def is_root() -> bool:
    return os.geteuid() == 0


def require_root() -> None:
    """Skip the calling test when not root (pytest imported lazily: the demo uses this module too)."""
    if not is_root():
        import pytest

        pytest.skip("needs root: creates network namespaces, veth pairs and TUN devices")


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is truthy (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


class CommandFailed(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the command's stderr."""

    def __str__(self) -> str:
        err = (self.stderr or self.output or "").strip()
        return f"{super().__str__()}{': ' + err if err else ''}"


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise CommandFailed(r.returncode, list(argv), r.stdout, r.stderr)
    return r


def netns_list() -> list[str]:
    """Names of the named network namespaces (`ip netns list`)."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def link_exists(name: str, ns: str | None = None) -> bool:
    """True if interface `name` exists in namespace `ns` (None = the current one)."""
    argv = ["ip", "link", "show", "dev", name]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    return _run(argv, check=False).returncode == 0


@dataclass(frozen=True)
class Link:
    """The veth pair joining client namespace `client_ns` to the server namespace."""

    index: int
    client_ns: str
    client_if: str
    server_if: str
    client_v4: str  # with prefix, e.g. 198.18.0.2/24
    server_v4: str
    client_v6: str
    server_v6: str

    @property
    def client_ip4(self) -> str:
        return self.client_v4.split("/")[0]

    @property
    def server_ip4(self) -> str:
        return self.server_v4.split("/")[0]

    @property
    def client_ip6(self) -> str:
        return self.client_v6.split("/")[0]

    @property
    def server_ip6(self) -> str:
        return self.server_v6.split("/")[0]


class Topology:
    """One server namespace and `clients` client namespaces, each with its own veth to the server.

    Attributes: `server` (ns name), `clients` (ns names), `namespaces` (all), `links` (one `Link`
    per client), `suffix` (the random part of every name). Use as a context manager or call
    `close()` (idempotent) in a `finally`.
    """

    def __init__(self, clients: int = 1) -> None:
        if not 1 <= clients <= 200:
            raise ValueError("clients must be between 1 and 200")
        self.suffix = secrets.token_hex(3)
        self.server = f"{PREFIX}{self.suffix}-srv"
        self.clients = [f"{PREFIX}{self.suffix}-c{i}" for i in range(clients)]
        self.namespaces = [self.server, *self.clients]
        self.links: list[Link] = []
        self._created_ns: list[str] = []
        self._veths: list[str] = []  # names that might be left in the root namespace
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------------

    def _setup(self) -> None:
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            self._created_ns.append(ns)
            # Before any link exists: new links copy the 'default' settings of their namespace.
            self.run(ns, "sysctl", "-q", "-w",
                     "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0")
            self.run(ns, "ip", "link", "set", "dev", "lo", "up")
        for i, cns in enumerate(self.clients):
            self.links.append(self._add_link(i, cns))

    def _add_link(self, i: int, cns: str) -> Link:
        cif, sif = f"vc{self.suffix}{i}", f"vs{self.suffix}{i}"
        self._veths += [cif, sif]
        # Both ends are created straight inside their namespaces: nothing appears in the root one.
        _run(["ip", "link", "add", "name", cif, "netns", cns, "type", "veth",
              "peer", "name", sif, "netns", self.server])
        link = Link(
            index=i, client_ns=cns, client_if=cif, server_if=sif,
            client_v4=f"198.18.{i}.2/24", server_v4=f"198.18.{i}.1/24",
            client_v6=f"2001:2:0:{i:x}::2/64", server_v6=f"2001:2:0:{i:x}::1/64",
        )
        for ns, ifname, v4, v6 in ((cns, cif, link.client_v4, link.client_v6),
                                   (self.server, sif, link.server_v4, link.server_v6)):
            self.add_address(ns, ifname, v4)
            self.add_address(ns, ifname, v6)
            self.run(ns, "ip", "link", "set", "dev", ifname, "up")
        return link

    # -- convenience ----------------------------------------------------------------------------

    @property
    def client(self) -> str:
        """The first client namespace."""
        return self.clients[0]

    @property
    def link(self) -> Link:
        """The first client's link."""
        return self.links[0]

    def add_address(self, ns: str, ifname: str, cidr: str) -> None:
        """Add an address in `ns` (IPv6 with nodad, so it is usable at once)."""
        iface = ipaddress.ip_interface(cidr)
        if iface.version == 6:
            self.run(ns, "ip", "-6", "addr", "add", str(iface), "dev", ifname, "nodad")
        else:
            self.run(ns, "ip", "-4", "addr", "add", str(iface), "dev", ifname)

    def run(self, ns: str | None, *argv: str, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        """Run argv inside namespace `ns` (None = the current one); text output captured."""
        return _run(self._argv(ns, argv), check=check, timeout=timeout)

    def popen(self, ns: str | None, *argv: str, **kw) -> subprocess.Popen:
        """Start argv inside `ns`; `close()` will end it. stdin defaults to /dev/null."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self._argv(ns, argv), **kw)  # ip netns exec execs: same PID
        self._procs.append(proc)
        return proc

    @staticmethod
    def _argv(ns: str | None, argv: Sequence[str]) -> list[str]:
        if not argv:
            raise ValueError("empty command")
        return [str(a) for a in argv] if ns is None else ["ip", "netns", "exec", ns, *map(str, argv)]

    # -- teardown -------------------------------------------------------------------------------

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
        """End one process we started: SIGTERM, wait `timeout` s, then SIGKILL. Returns its status."""
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
            except ProcessLookupError:
                pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        return proc.poll()

    def close(self) -> None:
        """End our processes, delete our namespaces and leftover veths. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for proc in self._procs:
            try:
                self.stop(proc)
            except Exception as e:  # keep tearing down
                errors.append(f"stop pid {proc.pid}: {e}")
        self._procs.clear()
        for ns in reversed(self._created_ns):
            r = _run(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0 and ns in netns_list():
                errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
        self._created_ns.clear()
        for name in self._veths:
            if link_exists(name):
                r = _run(["ip", "link", "del", "dev", name], check=False)
                if r.returncode != 0 and link_exists(name):
                    errors.append(f"ip link del {name}: {r.stderr.strip()}")
        self._veths.clear()
        if errors:
            raise RuntimeError("topology cleanup incomplete: " + "; ".join(errors))

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Topology server={self.server} clients={self.clients}>"


class NetnsFiles:
    """A mixin for topologies with a `client_ns` and a `_created_paths` list: the client namespace's
    /etc/netns/<ns>/resolv.conf (what `ip netns exec` shows as /etc/resolv.conf), removed on close."""

    client_ns: str
    _created_paths: list[Path]
    _closed: bool

    def netns_resolv_conf(self, data: bytes, mode: int = 0o644) -> Path:
        directory = NETNS_ETC / self.client_ns
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._created_paths.append(directory)
        path = directory / "resolv.conf"
        self._created_paths.append(directory / "resolv.conf.vpnclient-tmp")   # if a write was interrupted
        path.write_bytes(data)
        path.chmod(mode)
        self._created_paths.append(path)
        return path

    def close(self) -> None:
        """The topology's own cleanup, then these files; one RuntimeError listing what failed."""
        if self._closed:
            return
        errors = []
        try:
            super().close()
        except RuntimeError as exc:
            errors.append(str(exc))
        errors += self.remove_created_paths()
        if errors:
            raise RuntimeError(f"{type(self).__name__} cleanup incomplete: " + "; ".join(errors))

    def remove_created_paths(self) -> list[str]:
        """Remove what netns_resolv_conf made (newest first); the errors, as lines."""
        errors = []
        for p in reversed(self._created_paths):
            try:
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()
                else:
                    p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"remove {p}: {exc}")
        if self._created_paths:
            # /etc/netns itself goes once empty (another run in parallel may still have its own entry)
            try:
                NETNS_ETC.rmdir()
            except OSError:
                pass
        self._created_paths.clear()
        return errors
