# Every target that compiles runs `setup` first: on a fresh machine `make test`
# (or `make run`) is the one command that installs, builds and runs.
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all setup build release test lint fmt clean run

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

## test: every test, the privileged network-namespace lab tests included (they need root)
test: setup
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

## lint: formatting and clippy for the workspace and the BPF crate
lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd bpf/xdp && rustup run nightly cargo fmt -- --check
	cd bpf/xdp && env -u RUSTC -u RUSTUP_TOOLCHAIN rustup run nightly cargo clippy --release -- -D warnings

fmt:
	$(CARGO) fmt --all
	cd bpf/xdp && rustup run nightly cargo fmt

clean:
	$(CARGO) clean
	cd bpf/xdp && rustup run nightly cargo clean
