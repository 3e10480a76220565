#!/usr/bin/env bash
# Run the MQTT client benchmark matrix against a private Mosquitto instance.
#
#   bash docs/decisions/mqtt-client/run_all.sh            # N=50000, 3 repetitions
#   N=20000 REPS=1 bash docs/decisions/mqtt-client/run_all.sh
#
# Starts its own Mosquitto on a free 127.0.0.1 port with a temp config, runs every
# library x throughput scenario REPS times (each in a fresh process, bounded by
# `timeout`), then the feature probes once per library, stops the broker by its PID
# and writes one JSON line per run to docs/decisions/mqtt-client/results.jsonl (the evidence behind
# docs/decisions/mqtt-client.md).
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
# The third-party clients live in their own virtualenv (gmqtt ships a top-level `tests` package that
# would shadow the project's); it holds the gateway too, for the `gateway` / `gateway311` rows.
VENV="${VENV:-$HERE/.venv}"  # git ignores every .venv/
if [ -z "${PY:-}" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q -e "$ROOT" -r "$HERE/requirements.txt"
    fi
    PY="$VENV/bin/python"
fi
MOSQUITTO="${MOSQUITTO:-/usr/sbin/mosquitto}"
N="${N:-50000}"
REPS="${REPS:-3}"
RUN_TIMEOUT="${RUN_TIMEOUT:-60}"
MAX_INFLIGHT="${MAX_INFLIGHT:-0}"   # broker max_inflight_messages (brief: 0 = unlimited)
LIBS="${LIBS:-aiomqtt gmqtt zmqtt paho paho_aio mqtt5raw gateway gateway311}"
SCENARIOS="${SCENARIOS:-pubsub_qos0 pubsub_qos1 recv_qos1_queued}"
FEATURES="${FEATURES-feat_manual_ack feat_resend feat_props feat_flow}"
NAIVE="${NAIVE:-1}"   # also run zmqtt's naive subscribe-then-iterate variant once
OUT="${OUT:-$HERE/results.jsonl}"
LOG="${LOG:-$HERE/run_all.log}"

TMP="$(mktemp -d /tmp/mqtt_bench.XXXXXX)"
BROKER_PID=""
PORT=""

start_broker() {
    PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    cat > "$TMP/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
max_inflight_messages $MAX_INFLIGHT
max_queued_messages 1000000
max_queued_bytes 0
persistence false
log_dest stderr
log_type error
log_type warning
log_type notice
EOF
    "$MOSQUITTO" -c "$TMP/mosquitto.conf" 2>>"$TMP/mosquitto.log" &
    BROKER_PID=$!
    for _ in $(seq 50); do
        "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
        sleep 0.1
    done
    echo "# mosquitto pid=$BROKER_PID port=$PORT conf=$TMP/mosquitto.conf" | tee -a "$LOG"
}

stop_broker() {
    if [ -n "$BROKER_PID" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
        kill "$BROKER_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$BROKER_PID" 2>/dev/null
        wait "$BROKER_PID" 2>/dev/null
    fi
    BROKER_PID=""
}

cleanup() {
    stop_broker
    if [ -f "$TMP/mosquitto.log" ]; then
        {
            echo "# ---- mosquitto log: $(grep -c 'New client connected' "$TMP/mosquitto.log") client connects; other lines (max 200): ----"
            grep -v -E 'New connection from|New client connected|disconnected\.$|closed its connection\.$' "$TMP/mosquitto.log" | tail -n 200
        } >> "$LOG"
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

run_one() {  # lib scenario rep [extra args...]
    local lib="$1" scen="$2" rep="$3"; shift 3
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
        echo "# broker died before $lib/$scen/$rep - restarting" | tee -a "$LOG"
        start_broker
    fi
    local line rc
    timeout -k 5 "$RUN_TIMEOUT" "$PY" "$HERE/bench.py" --lib "$lib" --scenario "$scen" --port "$PORT" \
        --n "$N" --run "$rep" --broker-pid "$BROKER_PID" --broker-max-inflight "$MAX_INFLIGHT" "$@" > "$TMP/out.json" 2>>"$LOG"
    rc=$?
    line="$(tail -n 1 "$TMP/out.json")"
    if [ -z "$line" ]; then
        line="{\"lib\": \"$lib\", \"scenario\": \"$scen\", \"n\": $N, \"run\": $rep, \"ok\": false, \"error\": \"no output (exit/timeout rc=$rc, limit ${RUN_TIMEOUT}s)\"}"
    fi
    echo "$line" >> "$OUT"
    echo "$line" | "$PY" -c 'import json,sys; d=json.loads(sys.stdin.read()); g=d.get; print("%-9s %-17s run=%s ok=%s msgs/s=%s recv=%s %s %s" % (g("lib"), g("scenario"), g("run"), g("ok"), g("msgs_per_s"), g("received"), g("variant", ""), g("error", "")))' | tee -a "$LOG"
}

: > "$OUT"
echo "# run_all $(date -Is) N=$N REPS=$REPS MAX_INFLIGHT=$MAX_INFLIGHT nproc=$(nproc) $("$MOSQUITTO" -h 2>/dev/null | head -n 1)" | tee "$LOG"
start_broker

for rep in $(seq 1 "$REPS"); do
    for scen in $SCENARIOS; do
        for lib in $LIBS; do
            run_one "$lib" "$scen" "$rep"
        done
    done
done

# zmqtt's documented subscribe-then-iterate pattern on a resumed session (expected to hang)
if [[ "$NAIVE" == 1 && " $LIBS " == *" zmqtt "* && " $SCENARIOS " == *" recv_qos1_queued "* ]]; then
    run_one zmqtt recv_qos1_queued 1 --naive-subscribe --deadline 15
fi

for feat in $FEATURES; do
    for lib in $LIBS; do
        run_one "$lib" "$feat" 1
    done
done

echo "# done $(date -Is); results in $OUT" | tee -a "$LOG"
