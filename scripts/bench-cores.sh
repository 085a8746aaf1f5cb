#!/usr/bin/env bash
# What a second core buys: the same devices against the gateway on one core (core 0, the
# load tool and the upstream on core 1) and on both cores (everything shares cores 0-1).
# The gateway sizes its runtime and its UDP shards (udp.shards = 0) to the cores it may
# run on, so the two runs differ only in that. Prints CPU per talking device, round trip
# p50/p99, how the work split over the gateway's busiest threads and over its UDP
# shards, and the two-core / one-core CPU ratio per device.
# Usage: scripts/bench-cores.sh [devices] [seconds]
#   PIPE=echo (default) or relay (through `bench upstream`, history off)
#   GATEWAY=<another build> to compare; SHARDS=n to force udp.shards
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-1000}
SECONDS_=${2:-20}
PIPE=${PIPE:-echo}
RUNS=${RUNS:-one two}
B=${B:-$PWD/target/release/xiaozhi-gateway}
[ -x "$B" ] || cargo build --release
GATEWAY=${GATEWAY:-$B}
export XZ_MQTT__LISTEN=127.0.0.1:18830 XZ_UDP__LISTEN=127.0.0.1:18840 \
       XZ_HTTP__LISTEN=127.0.0.1:18007 XZ_BROKER__LISTEN=127.0.0.1:18841 \
       XZ_LOG__LEVEL=warn XZ_AUTH__SIGNATURE_KEY=bench-key XZ_HISTORY__ENABLED=false \
       XZ_MQTT__CONNECT_RATE_PER_SOURCE=0 XZ_MQTT__MAX_CONNECTIONS_PER_SOURCE=0
[ -n "${SHARDS:-}" ] && export XZ_UDP__SHARDS=$SHARDS
URL=ws://127.0.0.1:18900/xiaozhi/v1/
OUT=$(mktemp -d)
FAILED=0
printf '%-5s %8s %22s %12s %8s %8s  %s\n' cores devices "CPU% (user + kernel)" "m% / device" "p50 ms" "p99 ms" "split"
for run in $RUNS; do
    dir="$OUT/$run"; mkdir -p "$dir"
    case $run in
        one) SRV_CPUS=0; LOAD_CPUS=1 ;;
        two) SRV_CPUS=0,1; LOAD_CPUS=0,1 ;;
        *) echo "unknown run $run (one, two)" >&2; exit 2 ;;
    esac
    UP=
    if [ "$PIPE" = relay ]; then
        taskset -c "$LOAD_CPUS" "$B" bench upstream --listen 127.0.0.1:18900 > "$dir/upstream.log" 2>&1 &
        UP=$!
        export XZ_PIPELINE__XIAOZHI__URLS="[\"$URL\"]"
    fi
    (cd "$dir" && exec taskset -c "$SRV_CPUS" "$GATEWAY" serve) > "$dir/server.log" 2>&1 &
    SRV=$!
    for _ in $(seq 100); do
        (echo > /dev/tcp/127.0.0.1/18830) 2> /dev/null && break; sleep 0.1
    done
    taskset -c "$LOAD_CPUS" "$B" bench load --mqtt 127.0.0.1:18830 --key bench-key --devices "$DEVICES" \
        --connect-rate 500 --warmup 5 --seconds "$SECONDS_" --pid $SRV --json --check \
        > "$dir/load.json" || { FAILED=1; echo "$run: bench load failed (its report: $dir/load.json)" >&2; }
    curl -s http://127.0.0.1:18007/metrics > "$dir/metrics.txt" || true
    kill -TERM $SRV; wait $SRV || true
    [ -n "$UP" ] && { kill -TERM $UP; wait $UP || true; }
    python3 - "$dir" "$run" "$OUT/cpu-$run" <<'PY'
import json, re, sys
d, run, out = sys.argv[1:]
r = json.load(open(f"{d}/load.json"))
t = r.get("target") or {}
c = t.get("cpu", {})
n = max(r["in_conversation"], 1)
workers = [x["total_percent"] for x in t.get("busy_threads", []) if x["name"].startswith("tokio-r")]
split = ""
if len(workers) > 1:
    split = "workers " + " / ".join(f"{100 * w / sum(workers):.0f}%" for w in workers)
shards = [float(v) for v in re.findall(r'^xiaozhi_udp_shard_datagrams_total\{shard="\d+"\} (\S+)', open(f"{d}/metrics.txt").read(), re.M)]
if len(shards) > 1:
    split += ("; " if split else "") + "shards " + " / ".join(f"{100 * s / max(sum(shards), 1):.0f}%" for s in shards)
print(f'{run:<5} {r["in_conversation"]:>8} '
      f'{c.get("total_percent", 0):>7.1f} ({c.get("user_percent", 0):.1f} + {c.get("system_percent", 0):.1f})'
      f'{"":>5} {1000 * c.get("total_percent", 0) / n:>12.2f} {r["round_trip"]["p50_ms"]:>8.2f} {r["round_trip"]["p99_ms"]:>8.2f}  {split}'
      f'{"  (tool saturated)" if r["tool"]["saturated"] else ""}'
      f'{"  lost " + str(r["frames_lost"]) if r["frames_lost"] else ""}'
      f'{"  errors: " + str(r["errors"]) if r["errors"] else ""}')
open(out, "w").write(str(c.get("total_percent", 0) / n))
PY
done
if [ -f "$OUT/cpu-one" ] && [ -f "$OUT/cpu-two" ]; then
    python3 -c "import sys; a, b = (float(open(p).read()) for p in sys.argv[1:]); print(f'CPU per device, two cores / one core: {b / max(a, 1e-12):.2f}x')" \
        "$OUT/cpu-one" "$OUT/cpu-two"
fi
echo "reports: $OUT"
exit $FAILED
