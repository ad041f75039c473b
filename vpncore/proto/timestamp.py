"""TAI64N timestamps carried in the initiation (SPEC §4.3)."""

import struct

from .constants import TIMESTAMP_GRANULARITY_NS

_TAI64N = struct.Struct(">QI")
_TAI64_BASE = 2**62 + 10  # TAI is ahead of UTC by 10 s at the epoch of TAI64's label


def tai64n(unix_time: float) -> bytes:
    seconds = int(unix_time)
    nanos = int((unix_time - seconds) * 1e9)
    nanos -= nanos % TIMESTAMP_GRANULARITY_NS   # coarse: no fine clock reading leaves the client
    return _TAI64N.pack(_TAI64_BASE + seconds, nanos)
