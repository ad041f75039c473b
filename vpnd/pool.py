"""Tunnel address pools: the server takes the first host, clients get the lowest free one."""

from __future__ import annotations


class AddressPool:
    def __init__(self, network):
        self.network = network
        hosts = network.hosts() if network.version == 4 else (network[i] for i in range(1, network.num_addresses))
        self.server = next(iter(hosts))
        self._next = 1        # offset from the server address of the lowest never-used address
        self._free: list[int] = []
        self._used: set[int] = set()
        self._limit = network.num_addresses - (3 if network.version == 4 else 2)

    def __repr__(self) -> str:
        return f"AddressPool(used={len(self._used)})"

    def allocate(self):
        """The lowest free client address, or None when the pool is exhausted."""
        if self._free:
            self._free.sort()
            off = self._free.pop(0)
        elif self._next <= self._limit:
            off = self._next
            self._next += 1
        else:
            return None
        self._used.add(off)
        return self.server + off

    def release(self, address) -> None:
        off = int(address) - int(self.server)
        if off in self._used:
            self._used.discard(off)
            self._free.append(off)

    def interface(self, address) -> str:
        return f"{address}/{self.network.prefixlen}"

    def server_interface(self) -> str:
        return self.interface(self.server)

