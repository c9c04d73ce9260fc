#!/usr/bin/env sh
# Fuzzes the upload parser (`uplink_common::Batch::parse`) for SECONDS (default 60):
#
#   fuzz/run.sh [SECONDS]
#
# Crashes land in fuzz/artifacts/batch_parse/; reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run batch_parse fuzz/artifacts/batch_parse/<file>   (from fuzz/..)
# The corpus grows in fuzz/corpus/batch_parse/ (git-ignored); fuzz/seeds/ holds the committed seeds.
#
# cargo-fuzz passes nightly-only compiler flags (-Z sanitizer=..., sanitizer-coverage options);
# RUSTC_BOOTSTRAP=1 makes a stable toolchain accept them, so no nightly install is needed.
set -eu
cd "$(dirname "$0")/.."

seconds="${1:-60}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
mkdir -p fuzz/corpus/batch_parse

# `-s none`: the code under test is safe Rust (the workspace forbids `unsafe`), so AddressSanitizer
# would only slow the search; panics and failed assertions are what the target looks for.
RUSTC_BOOTSTRAP=1 exec cargo fuzz run --fuzz-dir fuzz -s none batch_parse \
    fuzz/corpus/batch_parse fuzz/seeds/batch_parse -- \
    -max_total_time="$seconds" -dict=fuzz/json.dict -max_len=4096 -print_final_stats=1
