VENV ?= .venv
PY = $(VENV)/bin/python

SYSTEM_PACKAGES = iproute2 iputils-ping iperf3 nftables procps python3-venv tcpdump conntrack iptables postgresql wireguard-go wireguard-tools systemd strace util-linux
SYSTEM_COMMANDS = ping iperf3 nft ip sysctl tcpdump conntrack iptables pg_ctlcluster wireguard-go wg systemd-analyze strace setpriv

.PHONY: all deps-system venv test soak demo clean deps-bench bench bench-quick

all: test

# Installs the system tools the end-to-end tests need, only when one is missing (fast otherwise).
# apt-get update runs only when the install fails (stale or empty package lists).
deps-system:
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv(system)"; \
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

# ---- Install (issue 18) ---------------------------------------------------------------------------
# make install: a virtual environment $(VENVDIR) made by the machine's Python (Debian 12 refuses
# system-wide pip) with this checkout installed into it (not editable); wrappers $(BINDIR)/vpnd and
# $(BINDIR)/vpnclient that run it; the systemd units; $(SYSCONFDIR)/vpnd and $(SYSCONFDIR)/vpnclient
# with an example config each; man pages and bash/zsh completions generated from the argparse parsers
# (tools/gen_docs.py); README and LICENSE in $(DOCDIR), where the units' Documentation= points; the
# system user $(SYSTEM_USER). Units are installed, never enabled or started.
# DESTDIR stages all of it under a scratch root, laid out for the final one (every file names the
# final paths): nothing outside DESTDIR is touched, no user is created, systemctl is not run.
#   make install   [DESTDIR=/tmp/root] [PREFIX=/usr/local] [PIP_INSTALL_ARGS='--no-index --find-links DIR']
#   make uninstall [DESTDIR=/tmp/root] [UNINSTALL_USER=1]
# uninstall removes what install put there. An example config the operator changed, and any other
# file in the config directories (vpnd.toml, keys), stay, and so does their directory. The user stays
# unless UNINSTALL_USER=1. It refuses while a unit is enabled or running.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
SYSCONFDIR ?= /etc
VENVDIR ?= /opt/vpncore
UNITDIR ?= $(PREFIX)/lib/systemd/system
BASHCOMPDIR ?= /usr/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
DOCDIR ?= /usr/share/doc/vpncore
# The interpreter the venv is made from (bin/python links to it): the distribution's, which systemd
# units can reach (ProtectHome=yes hides a pyenv or conda Python under /root or /home).
INSTALL_PYTHON ?= /usr/bin/python3
PIP_INSTALL_ARGS ?=
DOC_TOOLS ?= argparse-manpage shtab
SYSTEM_USER ?= vpnd
# the user of vpnclient@.service
CLIENT_USER ?= vpnclient
UNINSTALL_USER ?=
UNITS = vpnd.service vpnclient@.service
# The venv at its location during the install (under DESTDIR), and where it is built first.
INSTALLED_PY = $(DESTDIR)$(VENVDIR)/bin/python
VENV_BUILD = $(DESTDIR)$(VENVDIR).new
# Parents of what install writes: empty ones are removed from a DESTDIR tree by uninstall.
INSTALL_DIRS = $(BINDIR) $(UNITDIR) $(MANDIR)/man8 $(BASHCOMPDIR) $(ZSHCOMPDIR) $(DOCDIR) \
	$(SYSCONFDIR)/vpnd $(SYSCONFDIR)/vpnclient $(dir $(VENVDIR))

.PHONY: install install-check install-venv install-wrappers install-units install-config install-docs \
	install-user uninstall

install: install-venv install-wrappers install-units install-config install-docs install-user
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then echo "systemctl daemon-reload"; systemctl daemon-reload; fi
	@for u in $(UNITS); do \
		if [ "$(UNITDIR)" != "$(SYSCONFDIR)/systemd/system" ] && [ -e "$(DESTDIR)$(SYSCONFDIR)/systemd/system/$$u" ]; then \
			echo "install: note: $(SYSCONFDIR)/systemd/system/$$u overrides the installed $(UNITDIR)/$$u; remove it to use the new one"; \
		fi; \
	done
	@echo "install: done ($(if $(DESTDIR),staged in $(DESTDIR),$(VENVDIR))). Running units use the new code after 'systemctl try-restart vpnd \"vpnclient@*\"'."
	@echo "install: next: $(SYSCONFDIR)/vpnd/vpnd.example.toml -> vpnd.toml, $(SYSCONFDIR)/vpnclient/vpnclient.example.toml -> vpn0.toml (each says how)"

install-check:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
		echo "install: installing into the system needs root; or stage it: make install DESTDIR=/some/dir" >&2; exit 1; fi
	@case "$(VENVDIR)" in /*/|/) echo "install: VENVDIR must be an absolute path without a trailing /" >&2; exit 1;; /?*) ;; \
		*) echo "install: VENVDIR must be an absolute path without a trailing /" >&2; exit 1;; esac
	@$(INSTALL_PYTHON) -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "install: $(INSTALL_PYTHON) must be Python 3.11 or later with venv and ensurepip (Debian: apt-get install python3-venv)" >&2; exit 1; }

# Built beside the installed venv and moved into place once it works: a failed build leaves a working
# install alone. The project is copied out of the checkout first so that setuptools' build/ and
# egg-info go to a scratch directory (a stale build/lib would ship deleted modules). umask 022 whatever
# the caller's: vpnd.service runs as the user vpnd, which must read the venv. Shared directories are
# made with mkdir -p, which leaves existing ones (a setgid root:staff /usr/local/bin) as they are;
# install -d would chmod them.
install-venv: install-check
	rm -rf "$(VENV_BUILD)" "$(DESTDIR)$(VENVDIR).old"
	umask 022 && mkdir -p "$(dir $(DESTDIR)$(VENVDIR))"
	umask 022 && $(INSTALL_PYTHON) -m venv "$(VENV_BUILD)"
	umask 022 && src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	tar -C "$(CURDIR)" -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
		--exclude=./bench/results --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
		--exclude=.hypothesis . | tar -C "$$src" -xf - && \
	"$(VENV_BUILD)/bin/python" -m pip install --disable-pip-version-check --no-input -q $(PIP_INSTALL_ARGS) "$$src"
	umask 022 && "$(VENV_BUILD)/bin/python" -I tools/relocate_venv.py "$(VENV_BUILD)" "$(VENVDIR)"
	"$(VENV_BUILD)/bin/python" -I -m vpnd --version
	"$(VENV_BUILD)/bin/python" -I -m vpnclient --version
	if [ -e "$(DESTDIR)$(VENVDIR)" ]; then mv "$(DESTDIR)$(VENVDIR)" "$(DESTDIR)$(VENVDIR).old"; fi
	mv "$(VENV_BUILD)" "$(DESTDIR)$(VENVDIR)"
	rm -rf "$(DESTDIR)$(VENVDIR).old"

# Small sh wrappers (packaging/wrapper.sh.in) that exec the venv's Python by its final absolute path.
install-wrappers: install-check
	umask 022 && mkdir -p "$(DESTDIR)$(BINDIR)"
	for m in vpnd vpnclient; do \
		sed -e 's|@VENVDIR@|$(VENVDIR)|g' -e "s|@MODULE@|$$m|g" packaging/wrapper.sh.in > "$(DESTDIR)$(BINDIR)/.$$m.tmp" && \
		chmod 0755 "$(DESTDIR)$(BINDIR)/.$$m.tmp" && mv -f "$(DESTDIR)$(BINDIR)/.$$m.tmp" "$(DESTDIR)$(BINDIR)/$$m" || exit 1; \
	done

# The units name /usr/local/bin and /etc: rewritten when BINDIR or SYSCONFDIR differ (else unchanged).
install-units: install-check
	umask 022 && mkdir -p "$(DESTDIR)$(UNITDIR)"
	for u in $(UNITS); do \
		sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/etc/vpnd/|$(SYSCONFDIR)/vpnd/|g' \
			-e 's|/etc/vpnclient/|$(SYSCONFDIR)/vpnclient/|g' "packaging/$$u" > "$(DESTDIR)$(UNITDIR)/.$$u.tmp" && \
		chmod 0644 "$(DESTDIR)$(UNITDIR)/.$$u.tmp" && mv -f "$(DESTDIR)$(UNITDIR)/.$$u.tmp" "$(DESTDIR)$(UNITDIR)/$$u" || exit 1; \
	done

# The directories are made only when missing (an operator's modes and owners stay): /etc/vpnd 0750
# group vpnd, /etc/vpnclient 0750 group vpnclient (the units' users read them). The examples are always refreshed; vpnd.toml and vpn0.toml are the
# operator's and never written. A copy of each example in the venv tells uninstall whether the
# operator changed it (even when this checkout has a newer one by then).
install-config: install-check install-user install-venv
	if [ ! -d "$(DESTDIR)$(SYSCONFDIR)/vpnd" ]; then install -d -m 0750 "$(DESTDIR)$(SYSCONFDIR)/vpnd" && \
		if [ -z "$(DESTDIR)" ] && getent group $(SYSTEM_USER) >/dev/null; then chgrp $(SYSTEM_USER) "$(SYSCONFDIR)/vpnd"; fi; fi
	if [ ! -d "$(DESTDIR)$(SYSCONFDIR)/vpnclient" ]; then install -d -m 0750 "$(DESTDIR)$(SYSCONFDIR)/vpnclient" && \
		if [ -z "$(DESTDIR)" ] && getent group $(CLIENT_USER) >/dev/null; then chgrp $(CLIENT_USER) "$(SYSCONFDIR)/vpnclient"; fi; fi
	install -m 0644 packaging/vpnd.example.toml "$(DESTDIR)$(SYSCONFDIR)/vpnd/vpnd.example.toml"
	install -m 0644 packaging/vpnclient.example.toml "$(DESTDIR)$(SYSCONFDIR)/vpnclient/vpnclient.example.toml"
	install -d -m 0755 "$(DESTDIR)$(VENVDIR)/share/vpncore"
	install -m 0644 packaging/vpnd.example.toml packaging/vpnclient.example.toml "$(DESTDIR)$(VENVDIR)/share/vpncore/"

# Generated by the installed venv's Python (the pages describe the installed code), with
# argparse-manpage and shtab pip-installed into a temporary directory, not into the venv.
install-docs: install-venv
	umask 022 && tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	"$(INSTALLED_PY)" -m pip install --disable-pip-version-check --no-input -q --target "$$tmp/lib" $(PIP_INSTALL_ARGS) $(DOC_TOOLS) && \
	"$(INSTALLED_PY)" -I tools/gen_docs.py --lib "$$tmp/lib" --out "$$tmp/out" && \
	mkdir -p "$(DESTDIR)$(MANDIR)/man8" "$(DESTDIR)$(BASHCOMPDIR)" "$(DESTDIR)$(ZSHCOMPDIR)" "$(DESTDIR)$(DOCDIR)" && \
	install -m 0644 "$$tmp/out/vpnd.8" "$$tmp/out/vpnclient.8" "$(DESTDIR)$(MANDIR)/man8/" && \
	install -m 0644 "$$tmp/out/bash/vpnd" "$$tmp/out/bash/vpnclient" "$(DESTDIR)$(BASHCOMPDIR)/" && \
	install -m 0644 "$$tmp/out/zsh/_vpnd" "$$tmp/out/zsh/_vpnclient" "$(DESTDIR)$(ZSHCOMPDIR)/"
	install -m 0644 README.md LICENSE "$(DESTDIR)$(DOCDIR)/"

install-user: install-check
	@for u in $(SYSTEM_USER) $(CLIENT_USER); do \
		if [ -n "$(DESTDIR)" ]; then echo "install: DESTDIR is set: not creating the system user $$u"; \
		elif ! getent passwd $$u >/dev/null; then \
			echo "useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $$u"; \
			useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
				--comment "$$u (vpncore)" $$u; \
		fi; \
	done

uninstall:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then echo "uninstall: needs root; or DESTDIR=/some/dir" >&2; exit 1; fi
	@enabled=$$(ls "$(DESTDIR)$(SYSCONFDIR)"/systemd/system/*.wants/vpnd.service \
		"$(DESTDIR)$(SYSCONFDIR)"/systemd/system/*.wants/vpnclient@*.service 2>/dev/null); \
	active=""; if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		active=$$(systemctl list-units --plain --no-legend --state=active vpnd.service 'vpnclient@*.service' | cut -d' ' -f1); fi; \
	if [ -n "$$enabled$$active" ]; then \
		echo "uninstall: units still in use:" $$active $$enabled; \
		echo "uninstall: stop and disable them first, e.g. systemctl disable --now vpnd vpnclient@vpn0" >&2; exit 1; fi
	for m in vpnd vpnclient; do \
		f="$(DESTDIR)$(BINDIR)/$$m"; if [ -e "$$f" ] && ! grep -q "installed by vpncore's 'make install'" "$$f"; then \
			echo "uninstall: keeping $$f: not the wrapper make install writes"; else rm -f "$$f"; fi; \
	done
	rm -f $(foreach u,$(UNITS),"$(DESTDIR)$(UNITDIR)/$(u)")
	rm -f "$(DESTDIR)$(MANDIR)/man8/vpnd.8" "$(DESTDIR)$(MANDIR)/man8/vpnclient.8"
	rm -f "$(DESTDIR)$(BASHCOMPDIR)/vpnd" "$(DESTDIR)$(BASHCOMPDIR)/vpnclient"
	rm -f "$(DESTDIR)$(ZSHCOMPDIR)/_vpnd" "$(DESTDIR)$(ZSHCOMPDIR)/_vpnclient"
	rm -f "$(DESTDIR)$(DOCDIR)/README.md" "$(DESTDIR)$(DOCDIR)/LICENSE"
	rmdir "$(DESTDIR)$(DOCDIR)" 2>/dev/null || true
	for pair in vpnd/vpnd.example.toml vpnclient/vpnclient.example.toml; do \
		d="$(DESTDIR)$(SYSCONFDIR)/$${pair%/*}"; f="$(DESTDIR)$(SYSCONFDIR)/$$pair"; \
		if [ -f "$$f" ]; then if cmp -s "$(DESTDIR)$(VENVDIR)/share/vpncore/$${pair#*/}" "$$f" || \
			cmp -s "packaging/$${pair#*/}" "$$f"; then rm -f "$$f"; \
			else echo "uninstall: keeping $$f: changed since make install"; fi; fi; \
		if [ -d "$$d" ]; then rmdir "$$d" 2>/dev/null || echo "uninstall: keeping $$d: it holds your files"; fi; \
	done
	case "$(VENVDIR)" in /*/|/) echo "uninstall: VENVDIR must be an absolute path" >&2; exit 1;; /?*) ;; \
		*) echo "uninstall: VENVDIR must be an absolute path" >&2; exit 1;; esac
	for v in "$(DESTDIR)$(VENVDIR)" "$(VENV_BUILD)" "$(DESTDIR)$(VENVDIR).old"; do \
		if [ -f "$$v/pyvenv.cfg" ]; then rm -rf "$$v"; elif [ -e "$$v" ]; then echo "uninstall: keeping $$v: not a venv"; fi; \
	done
	@if [ "$(UNINSTALL_USER)" = 1 ]; then for u in $(SYSTEM_USER) $(CLIENT_USER); do \
		if [ -n "$(DESTDIR)" ]; then echo "uninstall: DESTDIR is set: not removing the system user $$u"; \
		elif getent passwd $$u >/dev/null; then echo "userdel $$u"; userdel $$u; fi; \
	done; fi
	@if [ -n "$(DESTDIR)" ] && [ -d "$(DESTDIR)" ]; then cd "$(DESTDIR)" && \
		for d in $(patsubst /%,%,$(INSTALL_DIRS)); do \
			while [ "$$d" != . ] && [ "$$d" != / ] && { [ ! -e "$$d" ] || rmdir "$$d" 2>/dev/null; }; do d=$$(dirname "$$d"); done; \
		done; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then echo "systemctl daemon-reload"; systemctl daemon-reload; fi
