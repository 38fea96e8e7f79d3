#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (argument, else $FUZZ_SECONDS, else 60) and fails if
# any of them finds a crash. Needs nightly and cargo-fuzz (tests/setup.sh installs both).
# New corpus entries go to target/corpus/<target> (not committed); crashes to
# artifacts/<target>/. FUZZ_TARGETS="a b" runs a subset.
set -uo pipefail

seconds=${1:-${FUZZ_SECONDS:-60}}
cd "$(dirname "$0")"
targets=(${FUZZ_TARGETS:-stun_auth server_ops tcp_framing xdp_parse})

log() { printf 'fuzz: %s\n' "$*" >&2; }

cargo +nightly fuzz build --fuzz-dir . || { log "build failed"; exit 1; }

failed=()
for target in "${targets[@]}"; do
    work=target/corpus/$target
    mkdir -p "$work" "artifacts/$target"
    log "$target for ${seconds}s"
    # The first corpus directory receives new inputs; the committed seeds stay as they are.
    cargo +nightly fuzz run --fuzz-dir . "$target" "$work" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        2> >(tee "target/$target.log" >&2)
    status=$?
    stats=$(grep -E '^stat::(number_of_executed_units|peak_rss_mb)|^#[0-9]+ +DONE' "target/$target.log" | tr '\n' ' ')
    if [ "$status" -ne 0 ]; then
        log "$target FAILED (exit $status); reproducer in tests/fuzz/artifacts/$target/"
        failed+=("$target")
    else
        log "$target ok: $stats"
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    log "crashes in: ${failed[*]}"
    exit 1
fi
log "all targets ran ${seconds}s without a crash"
