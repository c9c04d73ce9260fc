#!/usr/bin/env bash
# Ensures the two services uplink needs locally are installed and running:
#   - RabbitMQ from Debian's packages on 127.0.0.1:5672 (guest/guest);
#   - SecantusDB, a MongoDB-wire-compatible server from PyPI, on
#     127.0.0.1:${UPLINK_LOCAL_MONGO_PORT:-27017}, in its own venv under .local/.
# Idempotent: a service that already answers is reused, never restarted.
# Prints the MONGO_URI to use as its last line of standard output.
#
# MongoDB itself is not installable from the package registries this project reaches, so
# development and CI use SecantusDB. It is GPL-licensed: it only ever runs as a separate
# process, and nothing of it is vendored.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
local_dir="$repo/.local"
venv="$local_dir/venv"
logs="$local_dir/logs"
pids="$local_dir/pids"
mongo_data="$local_dir/mongo-data"
mongo_port="${UPLINK_LOCAL_MONGO_PORT:-27017}"
amqp_port=5672
# The pre-release pin is required: pip skips pre-releases otherwise.
secantus_spec='SecantusDB==0.7.0b3'

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$logs" "$pids" "$mongo_data"

# up.sh and test.sh may run at the same time; without the lock both could find the port
# free and start two servers on one storage directory.
exec 9>"$local_dir/services.lock"
flock 9

apt_updated=0
apt_install() {
    [[ $(id -u) -eq 0 ]] || die "need root to install $* (apt-get install -y $*)"
    if [[ $apt_updated -eq 0 ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# True when something on 127.0.0.1:$1 speaks AMQP 0-9-1: RabbitMQ answers the protocol
# header with a Connection.Start method frame (frame type 1). An open port alone is not
# enough, the listener may belong to something else.
amqp_answers() {
    local first
    # The single-quoted script is expanded by the inner bash, which `timeout` can bound.
    # shellcheck disable=SC2016
    first="$(timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3
        head -c 1 <&3 | od -An -tx1
    ' _ "$1" 2>/dev/null)" || return 1
    [[ ${first//[[:space:]]/} == 01 ]]
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

install_rabbitmq() {
    # Without systemd (a container) the package's own attempt to start the service can fail
    # and with it the whole install. Debian's policy-rc.d hook tells the package not to try;
    # this script then starts the node itself. Debian's container images already ship one.
    local policy=/usr/sbin/policy-rc.d added=0 status=0
    if [[ ! -d /run/systemd/system && ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        added=1
    fi
    apt_install rabbitmq-server || status=$?
    if ((added)); then rm -f "$policy"; fi
    return "$status"
}

ensure_rabbitmq() {
    if amqp_answers "$amqp_port"; then
        log "RabbitMQ already answers on 127.0.0.1:$amqp_port"
        return
    fi
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        log "installing rabbitmq-server from Debian's packages"
        install_rabbitmq
        # The package's maintainer scripts may have started it (where an init system runs).
        if amqp_answers "$amqp_port"; then
            log "RabbitMQ started by its package"
            return
        fi
    fi
    if port_open "$amqp_port"; then
        die "127.0.0.1:$amqp_port is taken by something that does not speak AMQP"
    fi
    log "starting RabbitMQ (rabbitmq-server -detached)"
    # 9>&-: the node must not inherit the lock, or it would hold it for as long as it runs.
    rabbitmq-server -detached >&2 9>&-
    # await_startup needs the node to be reachable first; the loop covers both the node's
    # boot and its listener opening, whichever comes last.
    local deadline=$((SECONDS + 120))
    until amqp_answers "$amqp_port"; do
        if ((SECONDS > deadline)); then
            tail -n 40 /var/log/rabbitmq/*.log >&2 2>/dev/null || true
            die "RabbitMQ did not answer on 127.0.0.1:$amqp_port within 120 s"
        fi
        sleep 1
    done
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    log "RabbitMQ is up on 127.0.0.1:$amqp_port"
}

ensure_venv() {
    if [[ -x $venv/bin/secantusd-py && -x $venv/bin/python ]]; then
        return
    fi
    command -v python3 >/dev/null 2>&1 || apt_install python3
    # A failed `python3 -m venv` (Debian without python3-venv lacks ensurepip) leaves a
    # half-made directory behind; start over from nothing each time.
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        log "python3 -m venv failed; installing python3-venv"
        apt_install python3-venv
        python3 -m venv "$venv"
    fi
    log "installing $secantus_spec into .local/venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$secantus_spec" >&2
}

# True when a MongoDB-wire server on 127.0.0.1:$1 answers `hello`.
mongo_answers() {
    "$venv/bin/python" - "$1" <<'PY' >/dev/null 2>&1
import sys
from pymongo import MongoClient
client = MongoClient("127.0.0.1", int(sys.argv[1]), directConnection=True,
                     serverSelectionTimeoutMS=2000, connectTimeoutMS=2000)
client.admin.command("hello")
PY
}

ensure_mongo() {
    ensure_venv
    if mongo_answers "$mongo_port"; then
        log "MongoDB-wire server already answers on 127.0.0.1:$mongo_port"
        return
    fi
    if port_open "$mongo_port"; then
        die "127.0.0.1:$mongo_port is taken by something that does not answer MongoDB's hello (set UPLINK_LOCAL_MONGO_PORT to use another port)"
    fi
    local pidfile="$pids/mongo.pid" logfile="$logs/mongo.log"
    log "starting SecantusDB on 127.0.0.1:$mongo_port (storage .local/mongo-data, log .local/logs/mongo.log)"
    # setsid: the server outlives this script and a Ctrl-C in the terminal that ran it.
    # 9>&-: it must not inherit the lock, or it would hold it for as long as it runs.
    # --enable-test-commands: tests inject transient errors with failCommand, as they would
    # against a mongod started with enableTestCommands=1; it binds to loopback only.
    setsid nohup "$venv/bin/secantusd-py" --host 127.0.0.1 --port "$mongo_port" \
        --storage-path "$mongo_data" --enable-test-commands \
        >>"$logfile" 2>&1 </dev/null 9>&- &
    local pid=$!
    echo "$pid" >"$pidfile"
    local deadline=$((SECONDS + 60))
    until mongo_answers "$mongo_port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$pidfile"
            tail -n 40 "$logfile" >&2
            die "SecantusDB exited during start-up (log above)"
        fi
        if ((SECONDS > deadline)); then
            tail -n 40 "$logfile" >&2
            die "SecantusDB did not answer on 127.0.0.1:$mongo_port within 60 s (log above)"
        fi
        sleep 0.5
    done
    log "SecantusDB is up on 127.0.0.1:$mongo_port (pid $pid)"
}

ensure_rabbitmq
ensure_mongo
echo "MONGO_URI=mongodb://127.0.0.1:$mongo_port/powersync"
