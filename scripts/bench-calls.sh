#!/usr/bin/env bash
# Device-to-device call figures (docs/calling.md): device-to-device latency and the
# gateway's CPU per bridged call, on one node and across two nodes of a cluster, beside
# the same devices in echo conversations (the cost of the ordinary audio path).
#
#   scripts/bench-calls.sh [PAIRS]        # default 150 calls (300 talking devices)
#
# Needs a release build (cargo build --release), mosquitto and the machine's Redis
# (127.0.0.1:6379). Uses loopback ports 18950-18979.
set -euo pipefail
cd "$(dirname "$0")/.."

PAIRS=${1:-150}
DEVICES=$((PAIRS * 2))
B=target/release/xiaozhi-gateway
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
KEY=bench-Calls-key
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
[ -x "$B" ] || { echo "error: $B is missing; run cargo build --release first" >&2; exit 1; }

# gateway NAME CORE MQTT UDP HTTP [external]: starts a gateway pinned to CORE.
gateway() {
    local extra=()
    if [ "${6:-}" = external ]; then
        extra=(XZ_BUS__MODE=external XZ_BUS__URL=mqtt://127.0.0.1:18950
            XZ_PRESENCE__REDIS_URL=redis://127.0.0.1:6379 XZ_PRESENCE__KEY_PREFIX="bench-calls-$$:")
    fi
    env XZ_NODE__ID="$1" XZ_AUTH__SIGNATURE_KEY=$KEY XZ_LOG__LEVEL=warn \
        XZ_MQTT__LISTEN=127.0.0.1:$3 XZ_UDP__LISTEN=127.0.0.1:$4 XZ_HTTP__LISTEN=127.0.0.1:$5 \
        XZ_BROKER__LISTEN=127.0.0.1:0 XZ_HISTORY__DATABASE_URL="sqlite://$WORK/$1.db" \
        XZ_HISTORY__JOURNAL_DIR="$WORK/$1-journal" \
        XZ_MQTT__CONNECT_RATE_PER_SOURCE=0 XZ_MQTT__MAX_CONNECTIONS_PER_SOURCE=0 \
        XZ_UDP__CHANNEL_RATE=0 XZ_MQTT__MESSAGE_RATE=0 "${extra[@]}" \
        taskset -c "$2" "$B" serve &
    PIDS+=($!)
    LAST=$!
    for _ in $(seq 1 100); do
        curl -fsS "http://127.0.0.1:$5/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "error: gateway $1 did not start" >&2
    exit 1
}

echo "== one node on core 0: $PAIRS calls ($DEVICES devices) talking both ways (tool on core 1)"
gateway gw-1 0 18951 18952 18953
ONE=$LAST
taskset -c 1 "$B" bench calls --mqtt 127.0.0.1:18951 --http 127.0.0.1:18953 --key $KEY \
    --pairs "$PAIRS" --seconds 10 --pid "$ONE" --check

echo "== the same node, the same $DEVICES devices in echo conversations (the ordinary audio path)"
taskset -c 1 "$B" bench load --mqtt 127.0.0.1:18951 --key $KEY --devices "$DEVICES" \
    --seconds 10 --pid "$ONE" --first-device 700000 --check
kill "$ONE"

echo "== two nodes (core 0 and core 1) on Mosquitto: every call's devices on different nodes"
printf 'listener 18950 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nmax_queued_messages 100000\n' > "$WORK/mosquitto.conf"
"$MOSQ" -c "$WORK/mosquitto.conf" >/dev/null 2>&1 &
PIDS+=($!)
MQ=$!
sleep 0.5
gateway gw-a 0 18961 18962 18963 external
A=$LAST
gateway gw-b 1 18971 18972 18973 external
Bn=$LAST
sleep 1
"$B" bench calls --mqtt 127.0.0.1:18961 --callee-mqtt 127.0.0.1:18971 --http 127.0.0.1:18963 \
    --key $KEY --pairs "$PAIRS" --seconds 10 --pid "$A,$Bn,$MQ" --first-device 800000 --check
