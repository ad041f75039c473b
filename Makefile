VENV ?= .venv
PY = $(VENV)/bin/python

SYSTEM_PACKAGES = iproute2 iputils-ping iperf3 nftables procps python3-venv
SYSTEM_COMMANDS = ping iperf3 nft ip sysctl

.PHONY: all deps-system venv test demo clean

all: test

# Installs the system tools the end-to-end tests need, only when one is missing (fast otherwise).
# apt-get update runs only when the install fails (stale or empty package lists).
deps-system:
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "deps-system: missing:$$missing; installing $(SYSTEM_PACKAGES)"; \
		if [ "$$(id -u)" != 0 ]; then echo "deps-system: run as root (apt-get install needs it)" >&2; exit 1; fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES) || \
		{ apt-get update && apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); }; \
	fi

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

test: deps-system venv
	$(PY) -m pytest -q tests

demo: deps-system venv
	$(PY) -m tests.e2e.demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
