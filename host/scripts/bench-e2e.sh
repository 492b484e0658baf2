#!/bin/bash
# usage: host/scripts/bench-e2e.sh [N=20000] [SESSIONS=20] [SIZE_KB=4] [RCPTS=1]
# End-to-end benchmark: smtp-source -> postern -> smtp-sink, with the harness in
# ../shared/bench (relay-bench.sh: warm-up, RUNS measured batches, medians).
# Builds the release binary, writes a config that accepts from 127.0.0.0/8 on
# 127.0.0.1:$PORT and smart-hosts everything to the sink on 127.0.0.1:$SINK_PORT,
# spool on local disk with fsync on (the only mode there is), runs the harness
# with RELAY_PID set (relay CPU per message), then stops postern with SIGTERM.
# With PEER=postfix it also runs ../shared/bench/peer-postfix.sh in the same
# invocation, so the two figures come from the same machine state.
# env: PORT=2529 SINK_PORT=2626 SPOOL=/tmp/postern-bench-spool PEER= and the
#      harness's RUNS, WARMUP, RESULTS, OTHER_MAX.
set -eu -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BENCH=${BENCH:-$REPO/../shared/bench}
N=${1:-20000}; S=${2:-20}; KB=${3:-4}; R=${4:-1}
PORT=${PORT:-2529}; SPORT=${SINK_PORT:-2626}
SPOOL=${SPOOL:-/tmp/postern-bench-spool}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}

(cd "$REPO" && cargo build --release --quiet)
BIN=$TARGET_DIR/release/postern

work=$(mktemp -d /tmp/postern-bench.XXXXXX)
rm -rf "$SPOOL"
cat > "$work/postern.toml" <<CONF
hostname = "relay.bench.test"
[[listener]]
address = "127.0.0.1:$PORT"
[spool]
path = "$SPOOL"
[relay]
networks = ["127.0.0.0/8"]
[limits]
max_connections = 4000
max_connections_per_client = 4000
[log]
level = "warn"
[delivery]
smarthost = "smtp://127.0.0.1:$SPORT"
retry = ["5s", "30s"]
CONF

"$BIN" serve --config "$work/postern.toml" 2> "$work/postern.log" & PID=$!
cleanup() { kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

echo "postern $(git -C "$REPO" rev-parse --short HEAD) on 127.0.0.1:$PORT, pid $PID"
RELAY_PID=$PID LABEL=postern "$BENCH/relay-bench.sh" "127.0.0.1:$PORT" "$SPORT" "$N" "$S" "$KB" "$R"
left=$(find "$SPOOL/queue" -maxdepth 1 -type f | wc -l)
echo "postern spool files left after the runs: $left"
grep -E " (WARN|ERROR) " "$work/postern.log" | tail -5 || true

if [ "${PEER:-}" = postfix ]; then
  kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
  "$BENCH/peer-postfix.sh" "$N" "$S" "$KB" "$R"
fi
