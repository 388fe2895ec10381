#!/usr/bin/env bash
# Measures `herald replay` offline: builds release, writes a log of EVENTS events
# (default 1,000,000) into a temporary data dir with ingest/examples/gen_log.rs, then
# times a full replay to /dev/null and prints events/s. With --decrypt as the first
# argument, every push payload is opened too.
#
# Usage: bench/replay.sh [--decrypt] [EVENTS]
# The target dir follows CARGO_TARGET_DIR (default: target/).
set -euo pipefail

cd "$(dirname "$0")/.."
extra=()
if [[ "${1:-}" == "--decrypt" ]]; then
    extra=(--decrypt)
    shift
fi
events="${1:-1000000}"
target="${CARGO_TARGET_DIR:-target}"

cargo build --release --quiet --bin herald
cargo build --release --quiet -p herald-ingest --example gen_log

dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
"$target/release/examples/gen_log" "$dir/data" "$events"

# Opening the log is timed too: it reads every record once and checks its checksum.
start=$(date +%s%N)
"$target/release/herald" replay --data-dir "$dir/data" "${extra[@]}" >/dev/null
end=$(date +%s%N)

lines=$("$target/release/herald" replay --data-dir "$dir/data" | wc -l)
if [[ "$lines" -ne "$events" ]]; then
    echo "replay printed $lines lines, expected $events" >&2
    exit 1
fi
elapsed_ns=$((end - start))
awk -v n="$events" -v ns="$elapsed_ns" -v mode="${extra[*]:-sealed}" 'BEGIN {
    s = ns / 1e9
    printf "herald replay (offline, %s): %d events in %.3f s = %.0f events/s\n", mode, n, s, n / s
}'
