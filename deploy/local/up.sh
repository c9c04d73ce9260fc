#!/usr/bin/env bash
# Starts uplink on this machine: the backing services (deploy/local/services.sh), then one
# uplink-api on 127.0.0.1:8080 and two uplink-workers (admin ports 9091 and 9092), in the
# background, logging to .local/logs/ and recording pids in .local/pids/.
# Re-running it rebuilds and restarts the api and workers; deploy/local/down.sh stops them.
#
# Usage: deploy/local/up.sh [--release]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$repo/deploy/local"
local_dir="$repo/.local"
logs="$local_dir/logs"
pids="$local_dir/pids"
dev_env="$local_dir/dev.env"

profile=debug
cargo_flags=()
for arg in "$@"; do
    case "$arg" in
        --release) profile=release; cargo_flags+=(--release) ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "up: unknown argument $arg (expected --release)" >&2; exit 2 ;;
    esac
done
bin="$repo/target/$profile"

api_addr=127.0.0.1:8080
worker_ports=(9091 9092)
mongo_uri="mongodb://127.0.0.1:${UPLINK_LOCAL_MONGO_PORT:-27017}/powersync"
amqp_url="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
log_format="${UPLINK_LOG_FORMAT:-json}"

log() { printf 'up: %s\n' "$*" >&2; }

"$here/services.sh" >/dev/null

# The readiness probes and the "try it" commands below use curl, which a minimal Debian
# image lacks.
if ! command -v curl >/dev/null 2>&1; then
    log "installing curl"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >&2
fi

log "building (cargo build --bins ${cargo_flags[*]:-})"
(cd "$repo" && cargo build --bins "${cargo_flags[@]}")

# Stable keys across restarts, so tokens a client already holds keep verifying. Created once
# and kept out of git with the rest of .local/.
if [[ ! -s $dev_env ]]; then
    log "generating a development key pair into .local/dev.env"
    (umask 077 && "$bin/uplink-api" keys generate >"$dev_env.tmp")
    mv "$dev_env.tmp" "$dev_env"
fi
key_env=()
while IFS= read -r line; do
    case "$line" in
        POWERSYNC_PRIVATE_KEY=*|POWERSYNC_PUBLIC_KEY=*) key_env+=("$line") ;;
    esac
done <"$dev_env"
[[ ${#key_env[@]} -eq 2 ]] || { log "error: $dev_env lacks the two POWERSYNC_*_KEY lines; delete it and re-run"; exit 1; }

# A clean restart: whatever a previous up.sh started goes first.
"$here/down.sh"

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 8080 "${worker_ports[@]}"; do
    if port_taken "$port"; then
        log "error: 127.0.0.1:$port is in use by another process; stop it first"
        exit 1
    fi
done

# start NAME ENV... -- COMMAND...: runs COMMAND detached with exactly the given extra
# environment, logging to .local/logs/NAME.log (appended, so a restart keeps the history).
start() {
    local name=$1; shift
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    printf '\n=== %s start %s ===\n' "$name" "$(date -Is)" >>"$logs/$name.log"
    # setsid: the processes outlive this script and a Ctrl-C in its terminal; down.sh stops them.
    setsid nohup env "${envs[@]}" "$@" >>"$logs/$name.log" 2>&1 </dev/null &
    echo $! >"$pids/$name.pid"
}

mkdir -p "$logs" "$pids"
start api \
    UPLINK_DEV=1 \
    POWERSYNC_URL="${POWERSYNC_URL:-http://localhost:8080}" \
    UPLINK_API_ADDR="$api_addr" \
    AMQP_URL="$amqp_url" \
    UPLINK_LOG_FORMAT="$log_format" \
    "${key_env[@]}" \
    -- "$bin/uplink-api" serve
for i in 1 2; do
    start "worker-$i" \
        MONGO_URI="$mongo_uri" \
        AMQP_URL="$amqp_url" \
        UPLINK_WORKER_ADMIN_ADDR="127.0.0.1:${worker_ports[i-1]}" \
        UPLINK_WORKER_ID="worker-$i" \
        UPLINK_LOG_FORMAT="$log_format" \
        -- "$bin/uplink-worker" run
done

# Waits until every /readyz answers 200. A process that exits, or a deadline that passes,
# prints each log's tail and stops what was started, so the next attempt starts clean.
declare -A ready_url=(
    [api]="http://$api_addr/readyz"
    [worker-1]="http://127.0.0.1:${worker_ports[0]}/readyz"
    [worker-2]="http://127.0.0.1:${worker_ports[1]}/readyz"
)
# this_run NAME: the part of NAME's log written since this start, shortened to its first 20
# lines (where a start-up error is) and its last 40 (where a hang shows).
this_run() {
    awk -v marker="=== $1 start" '
        index($0, marker) == 1 { n = 0 }
        { line[++n] = $0 }
        END {
            for (i = 1; i <= n; i++) {
                if (i <= 20 || i > n - 40) print line[i]
                else if (i == 21) print "[...]"
            }
        }' "$logs/$1.log"
}
fail() {
    log "error: $*"
    for name in api worker-1 worker-2; do
        printf '\n--- .local/logs/%s.log, this start ---\n' "$name" >&2
        this_run "$name" >&2 || true
    done
    "$here/down.sh" >&2 || true
    exit 1
}
deadline=$((SECONDS + ${UPLINK_UP_TIMEOUT_SECONDS:-60}))
pending=(api worker-1 worker-2)
while ((${#pending[@]} > 0)); do
    still=()
    for name in "${pending[@]}"; do
        kill -0 "$(cat "$pids/$name.pid")" 2>/dev/null || fail "$name exited during start-up"
        if curl -fsS -o /dev/null --max-time 2 "${ready_url[$name]}" 2>/dev/null; then
            log "$name ready (${ready_url[$name]})"
        else
            still+=("$name")
        fi
    done
    pending=("${still[@]+"${still[@]}"}")
    ((${#pending[@]} == 0)) && break
    ((SECONDS > deadline)) && fail "not ready within ${UPLINK_UP_TIMEOUT_SECONDS:-60} s: ${pending[*]}"
    sleep 1
done

cat <<EOF

uplink is running (development mode: /token is open to anyone).
  api       http://$api_addr   (/token /jwks /upload /healthz /readyz /metrics)
  worker-1  http://127.0.0.1:${worker_ports[0]}   (/healthz /readyz /metrics)
  worker-2  http://127.0.0.1:${worker_ports[1]}   (/healthz /readyz /metrics)
  RabbitMQ  amqp://guest:guest@127.0.0.1:5672/   MongoDB-wire  $mongo_uri
  logs      .local/logs/{api,worker-1,worker-2,mongo}.log

Try it:
  TOKEN=\$(curl -s 'http://$api_addr/token?user_id=alice' | sed -E 's/.*"token":"([^"]+)".*/\\1/')
  curl -s -X POST http://$api_addr/upload \\
    -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' \\
    -d '{"batch":[{"op":"PUT","table":"todos","id":"t1","data":{"title":"hello"}}]}'
  $local_dir/venv/bin/python -c 'import pymongo; print(pymongo.MongoClient("$mongo_uri").powersync.todos.find_one({"_id": "t1"}))'

Stop with deploy/local/down.sh (add --all to stop the MongoDB-wire server too).
EOF
