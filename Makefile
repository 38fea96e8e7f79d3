# Every target that compiles runs `setup` first: on a fresh machine `make test`
# (or `make run`) is the one command that installs, builds and runs.
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all setup build release test lint fmt clean run lab

all: build

## setup: install what a fresh machine lacks (Debian packages, nightly rust-src, bpf-linker)
setup:
	@bash tests/setup.sh

## build: build every crate (the XDP program is compiled from Rust by xdp-agent's build script)
build: setup
	$(CARGO) build --workspace --all-targets

## release: optimised binaries in target/release
release: setup
	$(CARGO) build --workspace --release

## run: a development TURN relay on 127.0.0.1:3478 (credential printed at start-up, metrics on 127.0.0.1:9641)
run: setup
	$(CARGO) build -p turn-control --release
	target/release/turn-control --dev

## lab: the whole relay live in a namespace lab (root): both daemons, XDP, coturn's clients; Ctrl-C ends it
lab: setup
	$(CARGO) build --workspace --bins
	target/debug/lab

## test: every test, the privileged network-namespace lab tests included (they need root)
test: setup
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast
	FUZZ_SECONDS=$${FUZZ_SECONDS:-60} bash tests/fuzz/run.sh

## lint: formatting and clippy for the workspace and the BPF crate
lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd bpf/xdp && rustup run nightly cargo fmt -- --check
	cd bpf/xdp && env -u RUSTC -u RUSTUP_TOOLCHAIN rustup run nightly cargo clippy --release -- -D warnings

## fuzz: every cargo-fuzz target in tests/fuzz for FUZZ_SECONDS each (default 60); fails on a crash
.PHONY: fuzz
fuzz: setup
	bash tests/fuzz/run.sh $(FUZZ_SECONDS)

## soak: allocations and channels churned through the lab for SOAK_SECONDS (default 600; needs root)
.PHONY: soak
soak: setup
	$(CARGO) build --workspace --bins
	SOAK_SECONDS=$${SOAK_SECONDS:-600} $(CARGO) test -p tests --test soak -- --nocapture

## bench: the relays measured in isolation (in-kernel XDP generator and sink, coturn beside
## turn-control, XDP and the floor); writes BENCHMARKS.md and tests/bench/bench.png. Needs
## root (sudo is used otherwise). BENCH_QUICK=1: a smoke run; BENCH_RUNS, BENCH_SECONDS.
.PHONY: bench
bench: setup
	$(CARGO) build --release -p xdp-agent -p turn-control -p tests --bins
	$(if $(filter 0,$(shell id -u)),,sudo -E) $(or $(CARGO_TARGET_DIR),target)/release/bench \
		--out BENCHMARKS.md --png tests/bench/bench.png

fmt:
	$(CARGO) fmt --all
	cd bpf/xdp && rustup run nightly cargo fmt

clean:
	$(CARGO) clean
	cd bpf/xdp && rustup run nightly cargo clean

## install: release binaries, systemd units, sysusers/tmpfiles, configs (never overwritten)
## and the Prometheus/Grafana files; honours DESTDIR and PREFIX (default /usr/local)
.PHONY: install install-files
PREFIX ?= /usr/local
UNITDIR ?= /lib/systemd/system
SYSUSERSDIR ?= /usr/lib/sysusers.d
TMPFILESDIR ?= /usr/lib/tmpfiles.d
CONFDIR ?= /etc/xdp-turn
SYSCTLDIR ?= /etc/sysctl.d
# Where install-files takes the binaries from.
BINDIR_BUILT ?= $(or $(CARGO_TARGET_DIR),target)/release

install: setup
	$(CARGO) build --release -p turn-control -p xdp-agent
	$(MAKE) --no-print-directory install-files

## install-files: what install copies, without building (BINDIR_BUILT=dir of built binaries)
install-files:
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
		$(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(CONFDIR) $(DESTDIR)$(SYSCTLDIR) \
		$(DESTDIR)$(PREFIX)/share/xdp-turn/prometheus \
		$(DESTDIR)$(PREFIX)/share/xdp-turn/grafana
	install -m 0755 $(BINDIR_BUILT)/turn-control $(BINDIR_BUILT)/xdp-agent \
		$(BINDIR_BUILT)/xdp-agent-ctl $(DESTDIR)$(PREFIX)/bin/
	for unit in xdp-agent turn-control; do \
		sed 's|/usr/local/|$(PREFIX)/|g' deploy/systemd/$$unit.service > $(DESTDIR)$(UNITDIR)/$$unit.service \
			&& chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit.service || exit 1; \
	done
	install -m 0644 deploy/sysusers.d/xdp-turn.conf $(DESTDIR)$(SYSUSERSDIR)/xdp-turn.conf
	install -m 0644 deploy/tmpfiles.d/xdp-turn.conf $(DESTDIR)$(TMPFILESDIR)/xdp-turn.conf
	test -e $(DESTDIR)$(SYSCTLDIR)/90-xdp-turn.conf || \
		install -m 0644 deploy/sysctl.d/xdp-turn.conf $(DESTDIR)$(SYSCTLDIR)/90-xdp-turn.conf
	test -e $(DESTDIR)$(CONFDIR)/xdp-agent.env || install -m 0644 deploy/xdp-agent.env $(DESTDIR)$(CONFDIR)/xdp-agent.env
	test -e $(DESTDIR)$(CONFDIR)/turn-control.toml || \
		install -m 0640 deploy/turn-control.example.toml $(DESTDIR)$(CONFDIR)/turn-control.toml
	install -m 0644 deploy/README.md deploy/turn-control.example.toml deploy/xdp-agent.env \
		$(DESTDIR)$(PREFIX)/share/xdp-turn/
	install -d $(DESTDIR)$(PREFIX)/share/xdp-turn/systemd/turn-control.service.d
	install -m 0644 deploy/systemd/turn-control.service.d/tls.conf \
		$(DESTDIR)$(PREFIX)/share/xdp-turn/systemd/turn-control.service.d/
	install -m 0644 deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml \
		deploy/prometheus/alerts_test.yml $(DESTDIR)$(PREFIX)/share/xdp-turn/prometheus/
	install -m 0644 deploy/grafana/xdp-turn.json $(DESTDIR)$(PREFIX)/share/xdp-turn/grafana/
	@echo "Installed. Then, as root: systemd-sysusers xdp-turn.conf; systemd-tmpfiles --create xdp-turn.conf;"
	@echo "edit $(CONFDIR)/xdp-agent.env (--iface), $(SYSCTLDIR)/90-xdp-turn.conf (the same interfaces;"
	@echo "then sysctl --system) and $(CONFDIR)/turn-control.toml;"
	@echo "systemctl daemon-reload; systemctl enable --now xdp-agent turn-control"
