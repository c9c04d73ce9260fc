#!/usr/bin/env bash
# Stops what deploy/local/up.sh started: the api and the workers. With --all it also stops
# the SecantusDB server that deploy/local/services.sh started. RabbitMQ is left alone: it
# is a system service that other things on the machine may use.
#
# Usage: deploy/local/down.sh [--all]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
pids="$repo/.local/pids"

all=0
for arg in "$@"; do
    case "$arg" in
        --all) all=1 ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) echo "down: unknown argument $arg (expected --all)" >&2; exit 2 ;;
    esac
done

log() { printf 'down: %s\n' "$*" >&2; }

# stop NAME PROGRAM GRACE: SIGTERM the process in .local/pids/NAME.pid, wait up to GRACE
# seconds for it to exit, then SIGKILL it. The pid only counts while its command line still
# names PROGRAM, so a stale pid file never stops an unrelated process that reused the pid.
stop() {
    local name=$1 program=$2 grace=$3 pidfile="$pids/$1.pid" pid
    [[ -f $pidfile ]] || return 0
    pid="$(cat "$pidfile")"
    if [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- "$program"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + grace))
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS > deadline)); then
                log "$name did not stop within $grace s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
    fi
    rm -f "$pidfile"
}

# Workers and api get the same grace as in Kubernetes: a worker finishes the batch in hand,
# which may be retrying a transient error, before it acks and exits. They stop in parallel.
stop api uplink-api 30 &
for pidfile in "$pids"/worker-*.pid; do
    [[ -e $pidfile ]] || continue
    name="$(basename "$pidfile" .pid)"
    stop "$name" uplink-worker 60 &
done
wait

if ((all)); then
    stop mongo secantusd-py 30
fi
