#!/usr/bin/env bash
# Measures a backlog read: one device's 100,000 inbox entries read in pages from the
# embedded store and from the CQL store on a real Cassandra node, with the time and the
# process's peak RSS growth while reading (beside the same read of 10,000 entries:
# paging keeps memory bounded whatever the length). Starts Cassandra with
# scripts/cassandra-up unless HERALD_CASSANDRA names one, and stops what it started.
#
# Usage: bench/backlog.sh [ENTRIES [PAGE]]   (defaults 100000 and 256)
# The target dir follows CARGO_TARGET_DIR (default: target/).
set -euo pipefail
cd "$(dirname "$0")/.."
entries="${1:-100000}"
page="${2:-256}"
target="${CARGO_TARGET_DIR:-target}"

cargo build --release --quiet -p herald-projections --features cql --example backlog
if [ -z "${HERALD_CASSANDRA:-}" ]; then
  export HERALD_CASSANDRA_DIR="$(mktemp -d /tmp/herald-cassandra.XXXXXX)"
  trap 'scripts/cassandra-down' EXIT
  eval "$(scripts/cassandra-up)"
fi
"$target/release/examples/backlog" --entries "$entries" --page "$page" --cassandra "$HERALD_CASSANDRA"
