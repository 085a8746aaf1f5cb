#!/usr/bin/env bash
# Compares the three audio transports on this machine: stock AES-128-CTR over UDP,
# AES-128-GCM over UDP (udp_aead) and QUIC datagrams, each with N talking devices
# against the echo pipeline. The gateway runs alone on core 0, the load tool on core 1.
# Prints, per transport: gateway CPU per talking device, audio round trip p50/p99 and
# UDP payload bytes per frame each way. Usage: scripts/bench-transports.sh [devices] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-1000}
SECONDS_=${2:-20}
B=target/release/xiaozhi-gateway
[ -x "$B" ] || cargo build --release
export XZ_MQTT__LISTEN=127.0.0.1:18830 XZ_UDP__LISTEN=127.0.0.1:18840 \
       XZ_HTTP__LISTEN=127.0.0.1:18007 XZ_BROKER__LISTEN=127.0.0.1:18841 \
       XZ_QUIC__ENABLED=true XZ_QUIC__LISTEN=127.0.0.1:18842 \
       XZ_LOG__LEVEL=warn XZ_AUTH__SIGNATURE_KEY=bench-key XZ_HISTORY__ENABLED=false
OUT=$(mktemp -d)
printf '%-9s %8s %12s %11s %11s %9s %9s %9s %9s %6s\n' transport devices "CPU%/device" "rtt p50 ms" "rtt p99 ms" "B up/frm" "B dn/frm" "pkt up" "pkt dn" lost
for t in ctr gcm quic; do
    taskset -c 0 "$B" serve > "$OUT/serve-$t.log" 2>&1 &
    GW=$!
    for _ in $(seq 50); do curl -sf 127.0.0.1:18007/healthz > /dev/null && break; sleep 0.1; done
    taskset -c 1 "$B" bench load --mqtt 127.0.0.1:18830 --key bench-key --devices "$DEVICES" \
        --connect-rate 500 --warmup 3 --seconds "$SECONDS_" --transport "$t" --pid $GW --json \
        > "$OUT/$t.json" || true
    kill -TERM $GW; wait $GW || true
    python3 - "$OUT/$t.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r.get("target") or {}
print(f'{r["transport"]:<9} {r["in_conversation"]:>8} {t.get("cpu_percent_per_device", 0):>12.4f} '
      f'{r["round_trip"]["p50_ms"]:>11.2f} {r["round_trip"]["p99_ms"]:>11.2f} '
      f'{r["wire_up_bytes_per_frame"]:>9.1f} {r["wire_down_bytes_per_frame"]:>9.1f} '
      f'{r["wire_up_datagrams_per_frame"]:>9.2f} {r["wire_down_datagrams_per_frame"]:>9.2f} {r["frames_lost"]:>6}'
      f'{"  (tool saturated)" if r["tool"]["saturated"] else ""}')
PY
done
echo "reports: $OUT"
