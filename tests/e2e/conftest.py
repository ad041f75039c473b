"""Fixtures for end-to-end tests: `topology` and `topology2` are in tests/conftest.py (shared with
the tests outside tests/e2e that run real processes in namespaces)."""
