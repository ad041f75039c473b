"""tests/soak/test_soak.py runs only when asked for (`make soak` sets VPN_SOAK=1); `make test` also
ignores this whole folder (`--ignore=tests/soak`)."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("VPN_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="long soak test: run it with 'make soak' (VPN_SOAK=1)")
    for item in items:
        if str(item.fspath).replace(os.sep, "/").endswith("tests/soak/test_soak.py"):
            item.add_marker(skip)
