"""Fixtures shared by all tests (tests/e2e/conftest.py adds its own for the end-to-end tests)."""
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.e2e.netns import Topology, require_root
from tests.pgserver import PostgresServer


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (tests/pgserver.py), started on first use and stopped at the end of
    the session. Missing server binaries fail the test (CI installs the package), never skip."""
    try:
        server = PostgresServer()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def workdir():
    """A fresh directory for a test's files (registries, configs, sockets, logs), removed after it:
    after the namespaces and processes of fixtures that take `workdir` as a parameter."""
    d = Path(tempfile.mkdtemp(prefix="vpn-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


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
