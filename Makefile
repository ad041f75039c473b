VENV ?= .venv
PY = $(VENV)/bin/python

SYSTEM_PACKAGES = iproute2 iputils-ping iperf3 nftables procps python3-venv tcpdump conntrack iptables postgresql
SYSTEM_COMMANDS = ping iperf3 nft ip sysctl tcpdump conntrack iptables pg_ctlcluster

.PHONY: all deps-system venv test soak demo clean deps-bench bench bench-quick

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
	$(PY) -m pytest -q tests --ignore=tests/soak

# Long attack and fault tests and the strict timing limits (tests/soak, about 8 minutes) and the parsers' fuzz at 50,000 examples
# each (about 9 minutes): run by hand, not in CI.
soak: deps-system venv
	VPN_SOAK=1 VPN_FUZZ_EXAMPLES=50000 $(PY) -m pytest -q tests/soak tests/test_parsers_fuzz.py

demo: deps-system venv
	$(PY) -m tests.e2e.demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Benchmarks (bench/README.md). The peers we compare against, iperf3 and matplotlib (into the venv),
# installed only when missing.
BENCH_PACKAGES = wireguard-go wireguard-tools openvpn openssl iperf3
BENCH_COMMANDS = wireguard-go wg openvpn openssl iperf3

deps-bench: venv
	@missing=""; for c in $(BENCH_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
		echo "deps-bench: missing:$$missing; installing $(BENCH_PACKAGES)"; \
		if [ "$$(id -u)" != 0 ]; then echo "deps-bench: run as root (apt-get install needs it)" >&2; exit 1; fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y --no-install-recommends $(BENCH_PACKAGES) || \
		{ apt-get update && apt-get install -y --no-install-recommends $(BENCH_PACKAGES); }; \
	fi
	@$(PY) -c 'import matplotlib' >/dev/null 2>&1 || $(PY) -m pip install --disable-pip-version-check -q matplotlib

# Full run (about 30 minutes): end to end (3 x 10 s, all VPNs), loss, memory, micro if present.
bench: deps-system venv deps-bench
	$(PY) bench/e2e.py
	$(PY) bench/loss.py
	$(PY) bench/scale.py
	@if [ -f bench/micro.py ]; then echo "$(PY) bench/micro.py"; $(PY) bench/micro.py; fi

# One 5 s repetition of veth, vpnd, wireguard-go, openvpn-aes; the last line printed is a JSON summary.
bench-quick: deps-system venv deps-bench
	@$(PY) bench/e2e.py --quick
