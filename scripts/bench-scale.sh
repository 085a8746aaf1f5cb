#!/usr/bin/env bash
# Scale-out figures (docs/scale-out.md): talking devices and CPU for one node against two
# nodes sharing the work on an external broker, each node pinned to its own core, and the
# admin command round trip, direct and forwarded between nodes.
#
#   scripts/bench-scale.sh [DEVICES]        # default 2000 talking devices in all
#
# Needs a release build, mosquitto and the machine's Redis (127.0.0.1:6379). Ports
# 18850-18879 on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${1:-2000}
HALF=$((DEVICES / 2))
B=target/release/xiaozhi-gateway
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
KEY=bench-key
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

printf 'listener 18850 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n' > "$WORK/mosquitto.conf"
"$MOSQ" -c "$WORK/mosquitto.conf" >/dev/null 2>&1 &
PIDS+=($!)
sleep 0.5

# node NAME CORE MQTT_PORT UDP_PORT HTTP_PORT: starts a node on the external bus.
node() {
    env XZ_NODE__ID="$1" XZ_AUTH__SIGNATURE_KEY=$KEY XZ_LOG__LEVEL=warn \
        XZ_BUS__MODE=external XZ_BUS__URL=mqtt://127.0.0.1:18850 \
        XZ_PRESENCE__REDIS_URL=redis://127.0.0.1:6379 XZ_PRESENCE__KEY_PREFIX="bench-scale-$$:" \
        XZ_MQTT__LISTEN=127.0.0.1:$3 XZ_UDP__LISTEN=127.0.0.1:$4 XZ_HTTP__LISTEN=127.0.0.1:$5 \
        XZ_MQTT__CONNECT_RATE_PER_SOURCE=0 XZ_MQTT__MAX_CONNECTIONS_PER_SOURCE=0 \
        XZ_UDP__CHANNEL_RATE=0 XZ_MQTT__MESSAGE_RATE=0 \
        taskset -c "$2" "$B" serve &
    PIDS+=($!)
    LAST=$!
}

load() { # MQTT_PORT DEVICES PID FIRST
    "$B" bench load --mqtt "127.0.0.1:$1" --key $KEY --devices "$2" --connect-rate 500 \
        --seconds 10 --pid "$3" --first-device "$4" --json
}

cat > "$WORK/summary.py" <<'PY'
import json, sys
r = json.load(sys.stdin)
t = r.get("target") or {}
cpu = (t.get("cpu") or {}).get("total_percent", 0.0)
rt = r["round_trip"]
late = r["tool"]["pacer_lateness"]["p99_ms"]
print(f"{r['in_conversation']} talking, server CPU {cpu:.1f}% of a core, "
      f"RSS {t.get('rss_end_bytes', 0) / 1e6:.1f} MB, round trip p50 {rt['p50_ms']:.2f} / "
      f"p99 {rt['p99_ms']:.2f} ms, {r['frames_lost']} of {r['frames_sent']} frames lost, "
      f"tool lateness p99 {late:.2f} ms")
PY
summary() { python3 "$WORK/summary.py"; } # bench load's JSON report on stdin -> one line

echo "== one node on core 0, $DEVICES talking devices (load on core 1)"
node gw-a 0 18851 18852 18853
A=$LAST
sleep 1
taskset -c 1 "$B" bench load --mqtt 127.0.0.1:18851 --key $KEY --devices "$DEVICES" \
    --connect-rate 500 --seconds 10 --pid "$A" --json > "$WORK/one.json"
summary < "$WORK/one.json"

echo "== command round trips, one node (every command direct)"
"$B" bench commands --broker 127.0.0.1:18850 --username "" --nodes 127.0.0.1:18851 --key $KEY \
    --devices 50 --commands 5000 --concurrency 8 --first-device 50000

echo "== two nodes, core 0 and core 1, $HALF talking devices each (the two load tools unpinned)"
node gw-b 1 18861 18862 18863
Bn=$LAST
sleep 1
load 18851 "$HALF" "$A" 0 > "$WORK/two-a.json" &
LA=$!
load 18861 "$HALF" "$Bn" 100000 > "$WORK/two-b.json" &
LB=$!
wait $LA $LB
echo -n "gw-a: "; summary < "$WORK/two-a.json"
echo -n "gw-b: "; summary < "$WORK/two-b.json"

echo "== command round trips, two nodes (commands land on either node)"
"$B" bench commands --broker 127.0.0.1:18850 --username "" \
    --nodes 127.0.0.1:18851,127.0.0.1:18861 --key $KEY \
    --devices 50 --commands 5000 --concurrency 8 --first-device 60000

echo "== the same, one command at a time"
"$B" bench commands --broker 127.0.0.1:18850 --username "" \
    --nodes 127.0.0.1:18851,127.0.0.1:18861 --key $KEY \
    --devices 50 --commands 2000 --concurrency 1 --first-device 70000
