#!/usr/bin/env bash
# Installs what a fresh Debian machine of this project's kind lacks to build
# and test the relay: Debian packages, the nightly toolchain's rust-src for
# the BPF crate, and bpf-linker linked against the nightly's own LLVM.
# Idempotent: a machine that has everything is checked in a few seconds.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- Debian packages --------------------------------------------------------
# libelf-dev, zlib1g-dev, pkg-config: libbpf-sys builds its vendored libbpf.
# protobuf-compiler: tonic's code generator for proto/.
# bpftool, ethtool, iproute2: the lab and verifier logs.
# coturn: the reference TURN server, peer and load generator for tests/bench.
# prometheus: promtool, to check the shipped scrape config, rules and metrics.
# chromium, chromium-driver: tests/tests/browser.rs, a real browser's WebRTC through
# the relay over WebDriver; libnss3-tools: certutil, to make that Chromium trust
# the test's CA.
packages=(build-essential pkg-config libelf-dev zlib1g-dev protobuf-compiler
          bpftool ethtool iproute2 coturn prometheus tcpdump
          chromium chromium-driver libnss3-tools)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # policy-rc.d keeps the packaged coturn and prometheus services from starting.
    as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"
    as_root rm -f /usr/sbin/policy-rc.d
fi

# --- Rust toolchains ----------------------------------------------------------
command -v rustup >/dev/null || { log "rustup is required"; exit 1; }
if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    log "adding rust-src to nightly (the BPF crate builds core with -Z build-std)"
    rustup component add rust-src --toolchain nightly
fi
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

# --- bpf-linker ---------------------------------------------------------------
# bpf-linker must be linked against the LLVM that produced the bitcode it
# links, i.e. the nightly's own libLLVM; Debian's LLVM is too old.
BPF_LINKER_VERSION=0.13.0
cargo_home=${CARGO_HOME:-$HOME/.cargo}
nightly_sysroot=$(rustc +nightly --print sysroot)
llvm_major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
llvm_lib=$(find "$nightly_sysroot/lib" -maxdepth 1 -name "libLLVM.so.${llvm_major}*-rust-*" | head -n1)
[ -n "$llvm_lib" ] || { log "no libLLVM.so.${llvm_major} in $nightly_sysroot/lib"; exit 1; }
# A stable prefix: the built binary keeps the path to this directory.
llvm_prefix="$cargo_home/bpf-linker-llvm-$llvm_major"
stamp="$llvm_prefix/installed-$BPF_LINKER_VERSION-$(basename "$llvm_lib")"

if [ -x "$cargo_home/bin/bpf-linker" ] && [ -f "$stamp" ] \
    && "$cargo_home/bin/bpf-linker" --version >/dev/null 2>&1; then
    :
else
    log "building bpf-linker $BPF_LINKER_VERSION against $(basename "$llvm_lib") (about 2 minutes)"
    mkdir -p "$llvm_prefix/lib"
    ln -sf "$llvm_lib" "$llvm_prefix/lib/libLLVM.so"
    ln -sf "$llvm_lib" "$llvm_prefix/lib/$(basename "$llvm_lib")"
    LLVM_PREFIX="$llvm_prefix" cargo install "bpf-linker@$BPF_LINKER_VERSION" --locked \
        --no-default-features --features "llvm-$llvm_major" --force
    rm -f "$llvm_prefix"/installed-*
    touch "$stamp"
fi

# --- cargo-fuzz ---------------------------------------------------------------
# tests/fuzz: libFuzzer targets, run by `make fuzz` and `make test` (tests/fuzz/run.sh).
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz (about 3 minutes)"
    cargo install cargo-fuzz --locked
fi

# --- kubernetes-validate ------------------------------------------------------
# tests/tests/kubernetes.rs validates the rendered deploy/kubernetes manifests offline
# against the Kubernetes JSON schemas (PyPI's kubernetes-validate, in its own venv; the
# test finds it there). kubectl (for `kubectl kustomize`) is not installed here.
KUBERNETES_VALIDATE_VERSION=1.37.0
kv_venv=${XDG_CACHE_HOME:-$HOME/.cache}/xdp-turn/kubernetes-validate
if ! "$kv_venv/bin/kubernetes-validate" --version 2>/dev/null \
    | grep -qx "$KUBERNETES_VALIDATE_VERSION"; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        log "installing python3-venv"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends python3-venv
    fi
    log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION in $kv_venv"
    python3 -m venv "$kv_venv"
    "$kv_venv/bin/pip" install -q --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
command -v kubectl >/dev/null \
    || log "kubectl is missing: tests/tests/kubernetes.rs needs it (CI=true fails without it)"

log "ok: $(bpf-linker --version 2>/dev/null || echo bpf-linker), nightly LLVM $llvm_major"
