#!/usr/bin/env bash
# Throughput benchmark of the whole pipeline on this machine: starts the backing services,
# builds release binaries, runs one uplink-api and WORKERS uplink-workers under a queue prefix
# and database of their own, drives them with uplink-loadgen, prints its figures, then stops
# everything and deletes the benchmark's queues and database. It asserts nothing.
#
# Usage: deploy/bench.sh            (settings through the environment:)
#   USERS=200 BATCHES=20 OPS=5 CONCURRENCY=64 WORKERS=2 PARTITIONS=8
#   ACK_MODE=confirm|apply  TRANSACTIONS=auto|off  SDK=1 (op_id/client_id: checkpoints + dedupe)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
"$repo/deploy/local/services.sh" >/dev/null

users=${USERS:-200} batches=${BATCHES:-20} ops=${OPS:-5} concurrency=${CONCURRENCY:-64}
workers=${WORKERS:-2} partitions=${PARTITIONS:-8}
ack_mode=${ACK_MODE:-confirm} transactions=${TRANSACTIONS:-auto}

# A target directory of its own, so benchmarking does not evict the test build.
export CARGO_TARGET_DIR="$repo/target-bench"
cargo build --release -q -p uplink-api -p uplink-worker --bins
cargo build --release -q -p uplink-tests --bin uplink-loadgen
bin="$CARGO_TARGET_DIR/release"

run_id="bench$(date +%s)"
logs="$repo/.local/logs/$run_id"
mkdir -p "$logs"
amqp_url="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
mongo="mongodb://127.0.0.1:${UPLINK_LOCAL_MONGO_PORT:-27017}"
api_port=18080
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ((i = 0; i < partitions; i++)); do rabbitmqctl -q delete_queue "$run_id.uploads.$i" >/dev/null 2>&1 || true; done
    rabbitmqctl -q delete_queue "$run_id.dead" >/dev/null 2>&1 || true
    "$repo/.local/venv/bin/python" -c "import pymongo,sys; pymongo.MongoClient(sys.argv[1]).drop_database(sys.argv[2])" "$mongo" "$run_id" || true
}
trap cleanup EXIT

common_env=(AMQP_URL="$amqp_url" UPLINK_QUEUE_PREFIX="$run_id" UPLINK_PARTITIONS="$partitions" UPLINK_LOG_FORMAT=json RUST_LOG=warn)
env "${common_env[@]}" UPLINK_DEV=1 POWERSYNC_URL=http://localhost:$api_port UPLINK_API_ADDR=127.0.0.1:$api_port \
    UPLINK_ACK_MODE="$ack_mode" "$bin/uplink-api" >"$logs/api.log" 2>&1 &
pids+=($!)
worker_args=()
for ((i = 1; i <= workers; i++)); do
    port=$((19090 + i))
    env "${common_env[@]}" MONGO_URI="$mongo/$run_id" UPLINK_WORKER_ADMIN_ADDR=127.0.0.1:$port \
        UPLINK_WORKER_ID="$run_id-w$i" UPLINK_TRANSACTIONS="$transactions" "$bin/uplink-worker" run >"$logs/worker-$i.log" 2>&1 &
    pids+=($!)
    worker_args+=(--worker "http://127.0.0.1:$port")
done
for url in "http://127.0.0.1:$api_port/readyz" "${worker_args[@]/--worker/}"; do
    url=${url# }
    [[ $url == */readyz ]] || url="$url/readyz"
    for _ in $(seq 1 100); do curl -fs "$url" >/dev/null 2>&1 && break; sleep 0.2; done
done

echo "bench: $users users × $batches batches × $ops ops, concurrency $concurrency, $workers workers, $partitions partitions, ack $ack_mode, transactions $transactions, $(nproc) cores"
sdk_flag=()
[[ ${SDK:-0} == 1 ]] && sdk_flag=(--sdk)
"$bin/uplink-loadgen" --api "http://127.0.0.1:$api_port" --users "$users" --batches "$batches" --ops "$ops" \
    --concurrency "$concurrency" "${sdk_flag[@]}" "${worker_args[@]}"
