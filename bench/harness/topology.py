"""The benchmarks' topology: tests/e2e/netns.Topology with one client, plus what a benchmark needs.

    server ns  198.18.0.1/24 ── veth ── 198.18.0.2/24  client ns      (underlay, MTU 1500)

(the tests' link 0; IPv6 2001:2:0:0::1/64 and ::2 are there too, unused here). Added on top: a temp
folder for configs and logs (`path`, `log`, `popen(..., log=NAME)`), files outside it to remove
(`remember_file`: WireGuard UAPI sockets), a ping check of the underlay before use, and
`segment=True`: gso_max_segs 1 on both veth ends, so GSO trains are segmented before the veth and
every datagram is its own packet on the underlay (bench/README.md: "underlay modes").

`close()` (idempotent; signals held until it is done) ends our processes by PID, the latest started
first, then deletes the namespaces and veths (netns.Topology.close), the remembered files and the
temp folder. A cleanup failure is printed as a warning, never raised.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from tests.e2e.netns import Topology, wait_until


class BenchTopology(Topology):
    def __init__(self, segment: bool = False) -> None:
        self.segment = segment
        self.tmp = tempfile.mkdtemp(prefix="vpnbench-")
        self._files: list[str] = []
        self._bench_closed = False
        try:
            super().__init__(clients=1)
            if segment:
                # Every GSO skb (a UDP_SEGMENT train, a TSO burst) is cut into wire-sized packets before
                # it enters the veth, as on a real link; by default veth carries 64 KiB skbs whole.
                for ns, ifname in ((self.server, self.link.server_if), (self.client, self.link.client_if)):
                    self.run(ns, "ip", "link", "set", "dev", ifname, "gso_max_segs", "1")
            if not wait_until(lambda: self.run(self.client, "ping", "-c1", "-W1", self.link.server_ip4,
                                               check=False).returncode == 0, 10):
                raise RuntimeError("underlay veth does not pass ping")
        except BaseException:
            self.close()
            raise

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def log(self, name: str) -> str:
        try:
            with open(self.path(name), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def popen(self, ns, *argv, log: str | None = None, **kw) -> subprocess.Popen:
        """Start argv in ns; output to tmp/<log> if given, else wherever kw says (default /dev/null)."""
        if log is None:
            kw.setdefault("stdout", subprocess.DEVNULL)
            kw.setdefault("stderr", subprocess.STDOUT)
            return super().popen(ns, *argv, **kw)
        with open(self.path(log), "ab") as out:     # the child keeps its own copy of the fd
            return super().popen(ns, *argv, stdout=out, stderr=subprocess.STDOUT, **kw)

    def remember_file(self, path: str) -> None:
        self._files.append(path)

    def close(self) -> None:
        if self._bench_closed:
            return
        self._bench_closed = True
        # A second Ctrl-C/SIGTERM must not cut the teardown short: hold signals until it is done.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        try:
            errors = []
            self._procs.reverse()            # clients before servers: started later, stopped first
            try:
                super().close()
            except RuntimeError as e:
                errors.append(str(e))
            for f in self._files:
                try:
                    os.unlink(f)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    errors.append(f"unlink {f}: {e}")
            shutil.rmtree(self.tmp, ignore_errors=True)
            if errors:
                print("warning: cleanup: " + "; ".join(errors), file=sys.stderr)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
