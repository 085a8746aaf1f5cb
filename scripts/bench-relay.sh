#!/usr/bin/env bash
# The gateway's relay against the relay floor: the same devices through the same
# `bench upstream`, once to `bench floor --upstream` (the least a UDP <-> one-WebSocket-
# per-conversation relay can do) and once to the gateway with chat history off (add
# MODES="floor off on" for the defaults too). Each server alone on core 0, the load tool
# and the upstream on core 1. Prints CPU (user + kernel), round trip p50/p99, RSS and
# frames lost per server, then the gateway / floor CPU ratio.
# Usage: scripts/bench-relay.sh [devices] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-300}
SECONDS_=${2:-20}
MODES=${MODES:-floor off}
B=${B:-$PWD/target/release/xiaozhi-gateway}
[ -x "$B" ] || cargo build --release
GATEWAY=${GATEWAY:-$B}   # another build of the gateway to compare, same tools
export XZ_MQTT__LISTEN=127.0.0.1:18830 XZ_UDP__LISTEN=127.0.0.1:18840 \
       XZ_HTTP__LISTEN=127.0.0.1:18007 XZ_BROKER__LISTEN=127.0.0.1:18841 \
       XZ_LOG__LEVEL=warn XZ_AUTH__SIGNATURE_KEY=bench-key
URL=ws://127.0.0.1:18900/xiaozhi/v1/
OUT=$(mktemp -d)
FAILED=0
printf '%-6s %8s %22s %10s %10s %9s %6s\n' server devices "CPU% (user + kernel)" "p50 ms" "p99 ms" "RSS MB" lost
for mode in $MODES; do
    dir="$OUT/$mode"; mkdir -p "$dir"
    taskset -c 1 "$B" bench upstream --listen 127.0.0.1:18900 > "$dir/upstream.log" 2>&1 &
    UP=$!
    case $mode in
        floor)
            taskset -c 0 "$B" bench floor --key bench-key --upstream "$URL" > "$dir/server.log" 2>&1 &
            MQTT=127.0.0.1:18930 ;;
        off|on)
            hist=true; [ "$mode" = off ] && hist=false
            (cd "$dir" && exec env XZ_HISTORY__ENABLED=$hist XZ_PIPELINE__XIAOZHI__URLS="[\"$URL\"]" \
                taskset -c 0 "$GATEWAY" serve) > "$dir/server.log" 2>&1 &
            MQTT=127.0.0.1:18830 ;;
        *) echo "unknown mode $mode" >&2; exit 2 ;;
    esac
    SRV=$!
    sleep 1
    for _ in $(seq 100); do
        (echo > /dev/tcp/${MQTT%:*}/${MQTT#*:}) 2> /dev/null && break; sleep 0.1
    done
    taskset -c 1 "$B" bench load --mqtt "$MQTT" --key bench-key --devices "$DEVICES" \
        --connect-rate 200 --warmup 5 --seconds "$SECONDS_" --pid $SRV --json --check \
        > "$dir/load.json" || { FAILED=1; echo "$mode: bench load failed (its report: $dir/load.json)" >&2; }
    kill -TERM $SRV; wait $SRV || true
    kill -TERM $UP; wait $UP || true
    python3 - "$dir/load.json" "$mode" "$OUT/cpu-$mode" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r.get("target") or {}
c = t.get("cpu", {})
print(f'{sys.argv[2]:<6} {r["in_conversation"]:>8} '
      f'{c.get("total_percent", 0):>7.1f} ({c.get("user_percent", 0):.1f} + {c.get("system_percent", 0):.1f})'
      f'{"":>5} {r["round_trip"]["p50_ms"]:>10.2f} {r["round_trip"]["p99_ms"]:>10.2f} '
      f'{t.get("rss_end_bytes", 0) / 1e6:>9.1f} {r["frames_lost"]:>6}'
      f'{"  (tool saturated)" if r["tool"]["saturated"] else ""}'
      f'{"  errors: " + str(r["errors"]) if r["errors"] else ""}')
open(sys.argv[3], "w").write(str(c.get("total_percent", 0)))
PY
done
for mode in off on; do
    if [ -f "$OUT/cpu-$mode" ] && [ -f "$OUT/cpu-floor" ]; then
        python3 -c "import sys; g, f = (float(open(p).read()) for p in sys.argv[2:]); print(f'gateway ({sys.argv[1]}) / relay floor CPU: {g / max(f, 1e-9):.2f}x')" \
            "$mode" "$OUT/cpu-$mode" "$OUT/cpu-floor"
    fi
done
echo "reports: $OUT"
exit $FAILED
