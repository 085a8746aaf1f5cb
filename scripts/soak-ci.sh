#!/usr/bin/env bash
# The CI soak: 5 minutes at the default load (1,320 devices) with every fault (database,
# Redis and upstream cut for 30 s each, the upstream restarted), against the local
# MariaDB and Redis. Exits non-zero when the exactly-once check, the RSS bound, the task
# bounds or the gateway's clean shutdown fail (see docs/soak.md).
#
#   scripts/soak-ci.sh [REPORT_DIR] [extra soak flags...]
#
# Environment: XZ_SOAK_BIN (default target/release/xiaozhi-gateway, built if missing),
# XZ_SOAK_MYSQL (default mysql://root@127.0.0.1:3306/test),
# XZ_SOAK_REDIS (default redis://127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")/.."

report="${1:-soak-report-ci}"
shift || true
bin="${XZ_SOAK_BIN:-target/release/xiaozhi-gateway}"
if [ ! -x "$bin" ]; then
    cargo build --release
fi
# The plot needs Node.js, console/node_modules and Chromium; CI without them skips it.
plot=()
if ! command -v node >/dev/null || [ ! -d console/node_modules/playwright-core ]; then
    plot=(--no-plot)
fi
exec "$bin" soak --minutes 5 --fault-secs 30 --faults db,redis,upstream,restart \
    --mysql "${XZ_SOAK_MYSQL:-mysql://root@127.0.0.1:3306/test}" \
    --redis "${XZ_SOAK_REDIS:-redis://127.0.0.1:6379}" \
    --report "$report" --progress-secs 30 "${plot[@]}" "$@"
