#!/usr/bin/env bash
# The whole check, as CI runs it (.ci/run): starts RabbitMQ and the MongoDB-wire server
# (deploy/local/services.sh), then validates deploy/ (deploy/validate.sh), checks formatting
# and clippy, and runs every test of the workspace against those real services. Each step
# runs even when an earlier one failed, so one run reports everything; the exit status is
# non-zero when any step failed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

"$repo/deploy/local/services.sh" >/dev/null

# The tests give each test its own database and vhost or queue prefix on these servers.
export UPLINK_TEST_MONGO_URI="${UPLINK_TEST_MONGO_URI:-mongodb://127.0.0.1:${UPLINK_LOCAL_MONGO_PORT:-27017}}"
export UPLINK_TEST_AMQP_URL="${UPLINK_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

failed=()
# step NAME COMMAND...: runs COMMAND and records NAME when it fails. Nothing is printed after
# a passing test run, so the test runner's own summary stays the last line of the output.
step() {
    local name=$1; shift
    printf '\n==> %s\n' "$*"
    local started=$SECONDS
    if "$@"; then
        [[ $name == tests ]] || printf '==> %s passed (%d s)\n' "$name" $((SECONDS - started))
    else
        printf '==> %s FAILED (%d s)\n' "$name" $((SECONDS - started))
        failed+=("$name")
    fi
}

# Dockerfile, compose, Kubernetes, Prometheus and Grafana files (about 20 s on a clean
# machine, 5 s once its tools are installed in .local/validate/).
step deploy "$repo/deploy/validate.sh"
# rustfmt colours its diff whenever TERM is set, even into a CI log file; cargo and nextest
# already colour only a terminal.
fmt_color=never
[[ -t 1 ]] && fmt_color=auto
step fmt cargo fmt --all -- --check --color "$fmt_color"
step clippy cargo clippy --workspace --all-targets -- -D warnings
# Tests that run real processes (worker kills, `keys generate`) use the binaries next to the
# test executables; build them once here so every test sees the current code.
step build cargo build --workspace --bins
# Queues left by earlier interrupted test runs (each test uses a `t<12 hex>_` prefix and
# deletes its queues when it finishes) would only cost the broker memory.
if command -v rabbitmqctl >/dev/null 2>&1; then
    rabbitmqctl -q list_queues name 2>/dev/null | grep -E '^t[0-9a-f]{12}_' | while read -r q; do
        rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
    done || true
fi
# Settings (threads, timeouts) live in .config/nextest.toml.
if cargo nextest --version >/dev/null 2>&1; then
    step tests cargo nextest run --workspace --no-fail-fast
else
    echo "cargo-nextest is not installed; falling back to cargo test"
    step tests cargo test --workspace --no-fail-fast
fi

if ((${#failed[@]} > 0)); then
    echo "deploy/test.sh: failed steps: ${failed[*]}" >&2
    exit 1
fi
