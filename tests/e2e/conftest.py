"""Fixtures for end-to-end tests: network-namespace topologies (skipped when not root)."""

import pytest

from tests.e2e.netns import Topology, require_root


@pytest.fixture
def topology():
    """One server namespace and one client namespace joined by a veth pair."""
    require_root()
    topo = Topology(clients=1)
    try:
        yield topo
    finally:
        topo.close()


@pytest.fixture
def topology2():
    """One server namespace and two client namespaces, each with its own veth to the server."""
    require_root()
    topo = Topology(clients=2)
    try:
        yield topo
    finally:
        topo.close()
