#!/usr/bin/env bash
# Pushes at fleet scale: PUSH_DEVICES idle devices receive one group push while TALKERS
# devices keep talking (echo pipeline), and the talkers' audio round trip is compared with
# a run without the push. Prints the single-push delivery latency (POST to the device's
# read), the group push's span and rate against push.rate_per_sec, and the talkers' p50/p99
# with and without it. The queue is the default: SQLite (history on), in a temporary
# directory.
# Usage: scripts/bench-push.sh [push devices] [talkers] [rate per second]
#   GATEWAY=<another build> to compare
set -euo pipefail
cd "$(dirname "$0")/.."
PUSH_DEVICES=${1:-5000}
TALKERS=${2:-200}
RATE=${3:-500}
B=${B:-$PWD/target/release/xiaozhi-gateway}
[ -x "$B" ] || cargo build --release
GATEWAY=${GATEWAY:-$B}
OUT=$(mktemp -d)
export XZ_MQTT__LISTEN=127.0.0.1:18830 XZ_UDP__LISTEN=127.0.0.1:18840 \
       XZ_HTTP__LISTEN=127.0.0.1:18007 XZ_BROKER__LISTEN=127.0.0.1:18841 \
       XZ_LOG__LEVEL=warn XZ_AUTH__SIGNATURE_KEY=bench-key \
       XZ_HISTORY__DATABASE_URL="sqlite://$OUT/history.db" XZ_HISTORY__JOURNAL_DIR="$OUT/journal" \
       XZ_MQTT__CONNECT_RATE_PER_SOURCE=0 XZ_MQTT__MAX_CONNECTIONS_PER_SOURCE=0 \
       XZ_MQTT__MAX_CONNECTIONS=20000 XZ_PUSH__RATE_PER_SEC="$RATE" XZ_PUSH__SETTLE_MS=500
(cd "$OUT" && exec "$GATEWAY" serve) > "$OUT/server.log" 2>&1 &
SRV=$!
trap 'kill -TERM $SRV 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (echo > /dev/tcp/127.0.0.1/18830) 2> /dev/null && break; sleep 0.1
done
FAILED=0
talk() { # $1: report file; the talkers for 20 s
    "$B" bench load --mqtt 127.0.0.1:18830 --key bench-key --devices "$TALKERS" \
        --connect-rate 200 --warmup 3 --seconds 20 --pid $SRV --json --check \
        --first-device "$2" > "$1" || { FAILED=1; echo "bench load failed: $1" >&2; }
}
echo "== $TALKERS talkers without pushes"
talk "$OUT/talk-alone.json" 0
echo "== $PUSH_DEVICES idle devices, one group push at $RATE/s, $TALKERS talkers beside it"
"$B" bench push --mqtt 127.0.0.1:18830 --http 127.0.0.1:18007 --key bench-key \
    --devices "$PUSH_DEVICES" --connect-rate 1000 --singles 200 --check > "$OUT/push.txt" &
PUSH=$!
# The talkers start once the idle devices are connected, so the group push (after the
# singles) lands in their measured window.
sleep $(( PUSH_DEVICES / 1000 ))
talk "$OUT/talk-with-push.json" 100000
wait $PUSH || { FAILED=1; echo "bench push failed" >&2; }
cat "$OUT/push.txt"
python3 - "$OUT" <<'PY'
import json, sys
d = sys.argv[1]
for name in ("talk-alone", "talk-with-push"):
    r = json.load(open(f"{d}/{name}.json"))
    rt = r["round_trip"]
    print(f'{name:<15} {r["in_conversation"]} talking: round trip p50 {rt["p50_ms"]:.2f} ms, p99 {rt["p99_ms"]:.2f} ms, lost {r["frames_lost"]}, gateway CPU {r["target"]["cpu"]["total_percent"]:.1f}%')
PY
echo "reports: $OUT"
exit $FAILED
