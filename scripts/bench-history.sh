#!/usr/bin/env bash
# What chat history costs: the same load through an upstream that plays conversation
# turns, with history off and with the defaults (history on, text and audio, SQLite),
# each gateway alone on core 0 in a fresh directory, the load tool and the upstream on
# core 1. Prints per mode: gateway CPU (user + kernel), UDP round trip p50/p99, RSS at
# the end and per talking device, and the records stored and lost, then the ratio
# on / off. Usage: scripts/bench-history.sh [devices] [seconds] [turn seconds, e.g. 3-6]
# Extra modes: MODES="off on text" (text: history on, audio off).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-300}
SECONDS_=${2:-20}
TURNS=${3:-3-6}
MODES=${MODES:-off on}
B=${B:-$PWD/target/release/xiaozhi-gateway}
[ -x "$B" ] || cargo build --release
export XZ_MQTT__LISTEN=127.0.0.1:18830 XZ_UDP__LISTEN=127.0.0.1:18840 \
       XZ_HTTP__LISTEN=127.0.0.1:18007 XZ_BROKER__LISTEN=127.0.0.1:18841 \
       XZ_LOG__LEVEL=warn XZ_AUTH__SIGNATURE_KEY=bench-key \
       XZ_PIPELINE__XIAOZHI__URLS='["ws://127.0.0.1:18900/xiaozhi/v1/"]'
OUT=$(mktemp -d)
FAILED=0
records() { # records FILE OUTCOME: xiaozhi_history_records_total{outcome=...}, or 0
    awk -v s="xiaozhi_history_records_total{outcome=\"$2\"}" '$1 == s { v = $2 } END { print v + 0 }' "$1"
}
printf '%-5s %8s %22s %10s %10s %9s %10s %9s %6s %6s\n' mode devices "CPU% (user + kernel)" \
    "p50 ms" "p99 ms" "RSS MB" "KB/device" stored lost "frames lost"
for mode in $MODES; do
    dir="$OUT/$mode"; mkdir -p "$dir"
    case $mode in
        off) env=(XZ_HISTORY__ENABLED=false) ;;
        on) env=() ;;
        text) env=(XZ_HISTORY__MODE=text) ;;
        *) echo "unknown mode $mode" >&2; exit 2 ;;
    esac
    taskset -c 1 "$B" bench upstream --listen 127.0.0.1:18900 --turn-secs "$TURNS" \
        > "$dir/upstream.log" 2>&1 &
    UP=$!
    (cd "$dir" && exec env "${env[@]}" taskset -c 0 "$B" serve) > "$dir/serve.log" 2>&1 &
    GW=$!
    for _ in $(seq 100); do curl -sf 127.0.0.1:18007/healthz > /dev/null && break; sleep 0.1; done
    taskset -c 1 "$B" bench load --mqtt 127.0.0.1:18830 --key bench-key --devices "$DEVICES" \
        --connect-rate 200 --warmup 5 --seconds "$SECONDS_" --pid $GW --json --check \
        > "$dir/load.json" || { FAILED=1; echo "$mode: bench load failed (its report: $dir/load.json)" >&2; }
    sleep 2 # let the writer finish the last batch
    curl -sf 127.0.0.1:18007/metrics > "$dir/metrics.txt" || : > "$dir/metrics.txt"
    kill -TERM $GW; wait $GW || true
    kill -TERM $UP; wait $UP || true
    stored=$(records "$dir/metrics.txt" stored)
    lost=$(records "$dir/metrics.txt" lost)
    if [ "$lost" != 0 ]; then FAILED=1; echo "$mode: $lost chat-history records lost" >&2; fi
    python3 - "$dir/load.json" "$mode" "$stored" "$lost" "$OUT/cpu-$mode" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r.get("target") or {}
c = t.get("cpu", {})
n = max(r["in_conversation"], 1)
rss = t.get("rss_end_bytes", 0)
print(f'{sys.argv[2]:<5} {r["in_conversation"]:>8} '
      f'{c.get("total_percent", 0):>7.1f} ({c.get("user_percent", 0):.1f} + {c.get("system_percent", 0):.1f})'
      f'{"":>5} {r["round_trip"]["p50_ms"]:>10.2f} {r["round_trip"]["p99_ms"]:>10.2f} '
      f'{rss / 1e6:>9.1f} {rss / n / 1e3:>10.1f} {sys.argv[3]:>9} {sys.argv[4]:>6} {r["frames_lost"]:>6}'
      f'{"  (tool saturated)" if r["tool"]["saturated"] else ""}'
      f'{"  errors: " + str(r["errors"]) if r["errors"] else ""}')
open(sys.argv[5], "w").write(str(c.get("total_percent", 0)))
PY
done
if [ -f "$OUT/cpu-on" ] && [ -f "$OUT/cpu-off" ]; then
    python3 -c "import sys; on, off = (float(open(f).read()) for f in sys.argv[1:]); print(f'history on / off CPU: {on / max(off, 1e-9):.2f}x')" \
        "$OUT/cpu-on" "$OUT/cpu-off"
fi
echo "reports: $OUT"
exit $FAILED
