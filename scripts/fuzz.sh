#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets/) for a bounded time, for developers. Needs
# nightly Rust and cargo-fuzz (`rustup toolchain install nightly && cargo install cargo-fuzz`).
#
# CI does not run this (it has only stable Rust): it replays every committed input in
# fuzz/corpus/<target>/ through the same harness (fuzz/harness/mod.rs) with
# tests/fuzz_corpus.rs, part of `cargo test --release`.
#
#   scripts/fuzz.sh                  every target, FUZZ_SECONDS each
#   scripts/fuzz.sh publish_body     just these targets
#
# Environment:
#   FUZZ_SECONDS=60    time per target
#   FUZZ_RSS_MB=2048   libFuzzer's memory limit
#   FUZZ_MINIMIZE=1    afterwards, shrink each corpus to a set covering the same edges (keeps
#                      the hand-written seed-* and the crash-* inputs); do this before committing
#
# New inputs land in fuzz/corpus/<target>/. A crash stops the script and leaves the input in
# fuzz/artifacts/<target>/: fix the bug, then commit the input as fuzz/corpus/<target>/crash-<what>.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"

SECONDS_EACH="${FUZZ_SECONDS:-60}"
RSS_MB="${FUZZ_RSS_MB:-2048}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs nightly and cargo-fuzz: rustup toolchain install nightly && cargo install cargo-fuzz" >&2
    exit 1
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

for t in "${targets[@]}"; do
    echo "== fuzz $t for ${SECONDS_EACH}s"
    # One target at a time, one job: the corpus directory is shared with the committed one.
    cargo +nightly fuzz run "$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb="$RSS_MB"
done

if [ "${FUZZ_MINIMIZE:-0}" = 1 ]; then
    host="$(rustc +nightly -vV | sed -n 's/^host: //p')"
    for t in "${targets[@]}"; do
        bin="target/$host/release/$t"
        tmp="$(mktemp -d)"
        # Edge coverage only (no hit counts): a few hundred files at most.
        "$bin" -set_cover_merge=1 -use_counters=0 -rss_limit_mb="$RSS_MB" "$tmp" "corpus/$t" 2>/dev/null
        find "corpus/$t" -type f ! -name 'seed-*' ! -name 'crash-*' -delete
        cp -n "$tmp"/* "corpus/$t/" 2>/dev/null || true
        rm -rf "$tmp"
        echo "== $t: $(find "corpus/$t" -type f | wc -l) inputs kept"
    done
fi
