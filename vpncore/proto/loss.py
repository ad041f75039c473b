"""How big our super-packets may be, and whether they carry parity, from the peer's loss reports
(SPEC §5.5, §6.3 `loss`).

One lost fragment loses its whole super-packet: at 1 % datagram loss a 64 KiB super-packet (46
fragments) is lost 37 % of the time, which TCP reads as heavy congestion, while a 16 KiB one (12
fragments) is lost 11 % of the time, and 0.7 % with a parity fragment (which rebuilds any one lost
fragment). Without loss the big ones without parity cost the least CPU per byte. So: start big
without parity (a clean path is the common case: cutting and parity during the first seconds of a
fresh tunnel halved its throughput then, ~1,400 against ~3,600 Mbit/s), go small with parity as
soon as the peer reports lost super-packets (it reports within LOSS_REPORT_EARLY, 0.1 s), and big
without parity again after GROW_AFTER clean reports in a row. The server keeps one governor per
peer: one client's lossy path does not cut another's super-packets.

"Small" is done by cutting TUN reads bigger than SMALL into TCP super-packets of whole segments
(gso.split), not by lowering the TUN's gso_max_size: a TCP connection takes that size once, when it
connects, and the kernel segments a connection's bigger skbs in software for a device whose
gso_max_size went down under it, so the TUN then hands over one MTU-sized packet per read. Measured
(bench/loss.py, segmented underlay, 1 % loss on a connection started after 10 clean seconds):
lowering gso_max_size gave ~760 Mbit/s (about 50 super-packets a second: the rest came as single
packets); cutting reads gives ~1,250, the same as a connection that ran small from its start.
"""

from __future__ import annotations

from .constants import SUPER_MAX_FRAGMENTS, VNET_HDR_LEN
from .gso import split

GSO_MAX_BYTES = 65507           # the largest UDP payload: the most one UDP GSO or GRO train carries

LARGE = 65536
SMALL = 16384
SHRINK_AT = 0.02        # share of super-packets lost in one report
GROW_AFTER = 3          # clean reports (about seconds) before growing
SPLIT_ABOVE = SMALL + VNET_HDR_LEN      # reads bigger than this are cut while small
SPLIT_PAYLOAD = SMALL - 256             # TCP payload per piece (headers of up to 256 bytes)


def tun_gso_max_size(mtu: int) -> int:
    """The TUN's gso_max_size for a tunnel MTU: the biggest IP super-packet whose fragments (of
    MTU + 16 bytes, §5.5) fit one UDP GSO train of GSO_MAX_BYTES, so that the receiver gets each
    super-packet as one GRO train and takes it whole (superpacket.whole_in_train). At MTU 1420:
    64,579 bytes in 45 fragments, instead of 65,536 in 46 (two trains, then fragment by fragment)."""
    chunk = mtu + 16
    n = max(1, min(SUPER_MAX_FRAGMENTS, GSO_MAX_BYTES // (chunk + 16)))
    return max(mtu, min(65536, n * chunk - 16 - 15 - VNET_HDR_LEN))     # tag, padding, virtio_net_hdr


class GsoGovernor:
    def __init__(self):
        self.size = LARGE
        self._clean = 0
        self.parity = False                  # add parity fragments (where the peer takes them)

    def report(self, done: int, lost: int, repaired: int = 0) -> None:
        total = done + lost
        if not total:
            return
        if lost or repaired:
            self.parity = True
        if lost / total >= SHRINK_AT:
            self._clean = 0
            self.size = SMALL
        elif not lost and not repaired:
            self._clean += 1
            if self._clean >= GROW_AFTER:
                self.parity = False
                self.size = LARGE

    def pieces(self, read: bytes) -> list[bytes]:
        """The super-packets to send for one TUN read bigger than SPLIT_ABOVE: cut while small."""
        return split(read, SPLIT_PAYLOAD) if self.size == SMALL else [read]
