"""vpnd for the end-to-end tests: the real vpnd.server.Server, run as `vpnd serve` runs it, with what
a test needs injected here instead of in the shipped daemon.

    python -m tests.e2e.vpnd_harness --config FILE [--reject-after 3] [--fault-rate 0.01] [--hooks]

--reject-after: the protocol's reject time in seconds (sessions end and are forgotten sooner).
--fault-rate:   this share of TUN reads and datagrams raises inside the pump (containment tests).
--hooks:        control commands `gc-scan HEX,...` (live objects holding the XOR-0x5A-masked byte
                strings) and `scrubs` (how many freed-memory scrubs ran, and whether one is due).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys

from vpncore.cli import run_cli
from vpnd.__main__ import serve
from vpnd.datapath import ServerSide
from vpnd.server import Server


def argv(config, *, reject_after: float | None = None, fault_rate: float = 0.0, hooks: bool = True) -> list[str]:
    """The command line that runs this harness (in a namespace: with the repository on PYTHONPATH)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    out = ["env", f"PYTHONPATH={path}", sys.executable, "-m", "tests.e2e.vpnd_harness", "--config", str(config)]
    if reject_after:
        out += ["--reject-after", str(reject_after)]
    if fault_rate:
        out += ["--fault-rate", str(fault_rate)]
    return out + (["--hooks"] if hooks else [])


class FaultySide(ServerSide):
    """vpnd's side of the pump, failing `rate` of the reads it routes and the datagrams it opens."""

    rate = 0.0

    def route(self, read, now):
        dest = super().route(read, now)
        if dest is not None and random.random() < self.rate:
            raise RuntimeError("fault injected by a test")
        return dest

    def open(self, dg, src, now):
        if random.random() < self.rate:
            raise RuntimeError("fault injected by a test")
        return super().open(dg, src, now)

    def open_train(self, buf, seg, src, now):
        if random.random() < self.rate:
            raise RuntimeError("fault injected by a test")
        return super().open_train(buf, seg, src, now)


class HarnessServer(Server):
    side_class = FaultySide

    def __init__(self, cfg, log, *, reject_after=None, fault_rate=0.0, hooks=False):
        super().__init__(cfg, log)
        self.side.rate = fault_rate
        if reject_after:
            self.proto.reject_after = reject_after
        self.hooks = hooks
        self.scrubs = 0

    def _scrub(self) -> None:
        super()._scrub()
        self.scrubs += 1

    def _control_request(self, line: str) -> dict:
        cmd, _, arg = line.partition(" ")
        if self.hooks and cmd == "scrubs":
            return {"scrubs": self.scrubs, "due": self._scrub_due}
        if self.hooks and cmd == "gc-scan":
            return gc_scan(arg)
        return super()._control_request(line)


def gc_scan(masked_hex: str) -> dict:
    """How many live objects hold any of the given byte strings (or their text).

    The patterns arrive XOR-masked with 0x5A so the request itself never holds them; the
    unmasked copies are excluded from the scan by identity.
    """
    from vpncore.proto.server import Peer
    from vpncore.proto.keypair import Keypair

    patterns = [bytes(b ^ 0x5A for b in bytes.fromhex(h)) for h in masked_hex.split(",") if h]
    texts = [p.decode("latin-1") for p in patterns]
    mine = {id(x) for x in patterns + texts} | {id(patterns), id(texts)}
    hits = peers = keypairs = 0
    for obj in gc.get_objects():
        if isinstance(obj, Peer):
            peers += 1
        elif isinstance(obj, Keypair):
            keypairs += 1
        if id(obj) in mine:
            continue
        refs = gc.get_referents(obj)
        # tuples of atoms (an endpoint ("198.18.0.9", 5000)) are not tracked by gc: look inside
        refs += [x for r in refs if type(r) is tuple for x in r]
        for ref in refs:
            if id(ref) in mine:
                continue
            if isinstance(ref, (bytes, bytearray)):
                hits += any(p in ref for p in patterns)
            elif isinstance(ref, str):
                hits += any(t in ref for t in texts)
    return {"hits": hits, "peers": peers, "keypairs": keypairs}


def main(args=None) -> int:
    p = argparse.ArgumentParser(prog="vpnd_harness", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--reject-after", type=float, default=None)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--hooks", action="store_true")
    a = p.parse_args(args)
    return serve(a.config, lambda cfg, log: HarnessServer(cfg, log, reject_after=a.reject_after,
                                                         fault_rate=a.fault_rate, hooks=a.hooks))


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="vpnd"))
