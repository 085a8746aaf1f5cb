#!/usr/bin/env bash
# Fuzz smoke run (docs/fuzzing.md): builds every fuzz target once, then runs each for
# ${FUZZ_SECONDS:-60} seconds, two at a time, starting from the committed seeds in
# fuzz/seeds/<target>/. Exits non-zero, naming the target and the crash artifact, if any
# target crashes, hangs or runs out of memory.
#
# Works from a clean checkout: installs cargo-fuzz if it is missing, builds with the stable
# toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only flags), and keeps
# everything it writes under fuzz/target, fuzz/corpus and fuzz/artifacts (ignored by git).
#
# Environment:
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_JOBS      targets run at once (default 2: the machine has 2 cores)
#   FUZZ_TARGETS   space-separated subset of targets (default: all)
#   FUZZ_SANITIZER cargo fuzz's sanitizer (default none: see docs/fuzzing.md, "Build
#                  time"; "address" is cargo-fuzz's own default)
#   FUZZ_RSS_MB    memory limit per target in MB (default 2048)
#   FUZZ_TARGET_DIR where cargo builds the targets (default fuzz/target; .ci/run keeps it
#                  in its build cache, outside the clone)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

seconds="${FUZZ_SECONDS:-60}"
jobs="${FUZZ_JOBS:-2}"
sanitizer="${FUZZ_SANITIZER:-none}"
rss_mb="${FUZZ_RSS_MB:-2048}"
all_targets="device_mqtt device_json udp_datagram upstream_frames config history_query"
targets="${FUZZ_TARGETS:-$all_targets}"
export RUSTC_BOOTSTRAP=1
# The fuzz build has flags of its own (coverage instrumentation): it needs a target
# directory of its own, never the main build's.
target_dir=()
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
    target_dir=(--target-dir "$FUZZ_TARGET_DIR")
fi
unset CARGO_TARGET_DIR

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/smoke.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "fuzz/smoke.sh: building all fuzz targets (sanitizer: $sanitizer)"
build_start=$(date +%s)
cargo fuzz build "${target_dir[@]}" --sanitizer "$sanitizer"
build_end=$(date +%s)
echo "fuzz/smoke.sh: build took $((build_end - build_start)) s"

# The largest input worth trying: the config seeds are whole TOML files.
max_len() {
    case "$1" in
        config) echo 16384 ;;
        device_mqtt) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

logs="$here/target/smoke-logs"
mkdir -p "$logs"

# Runs one target; its log says everything, the exit status whether it held.
run_one() {
    local target="$1"
    mkdir -p "corpus/$target" "artifacts/$target"
    # The first corpus folder receives what the fuzzer finds; the seeds are only read.
    nice cargo fuzz run "${target_dir[@]}" --sanitizer "$sanitizer" "$target" \
        "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb="$rss_mb" \
        -max_len="$(max_len "$target")" -print_final_stats=1 \
        >"$logs/$target.log" 2>&1
}

report() {
    local target="$1" status="$2" log="$logs/$1.log"
    local execs
    execs=$(grep -Eo '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || true)
    if [ "$status" -eq 0 ]; then
        echo "fuzz/smoke.sh: $target ok (${execs:-?} executions in ${seconds} s)"
    else
        echo "fuzz/smoke.sh: $target FAILED (exit $status); log: $log"
        grep -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY:|Test unit written to|Running: ' "$log" | head -n 20 || true
        local artifact
        artifact=$(grep -Eo 'Test unit written to [^ ]+' "$log" | tail -n 1 | sed 's/Test unit written to //' || true)
        if [ -n "$artifact" ]; then
            case "$artifact" in
                /*) ;;
                *) artifact="$here/${artifact#./}" ;;
            esac
            echo "fuzz/smoke.sh: crash artifact of $target: $artifact"
            echo "fuzz/smoke.sh: reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $target ${artifact}"
        fi
    fi
}

failed=""
declare -A pids=()
for target in $targets; do
    # Keep at most $jobs running.
    while [ "${#pids[@]}" -ge "$jobs" ]; do
        set +e
        wait -n -p done_pid "${!pids[@]}"
        status=$?
        set -e
        done_target="${pids[$done_pid]}"
        unset "pids[$done_pid]"
        report "$done_target" "$status"
        [ "$status" -eq 0 ] || failed="$failed $done_target"
    done
    echo "fuzz/smoke.sh: fuzzing $target for $seconds s"
    run_one "$target" &
    pids[$!]="$target"
done
while [ "${#pids[@]}" -gt 0 ]; do
    set +e
    wait -n -p done_pid "${!pids[@]}"
    status=$?
    set -e
    done_target="${pids[$done_pid]}"
    unset "pids[$done_pid]"
    report "$done_target" "$status"
    [ "$status" -eq 0 ] || failed="$failed $done_target"
done

if [ -n "$failed" ]; then
    echo "fuzz/smoke.sh: FAILED:$failed (turn each crash into a regression: docs/fuzzing.md)"
    exit 1
fi
echo "fuzz/smoke.sh: all fuzz targets ran ${seconds} s without a crash"
