#!/usr/bin/env bash
# Exactly once after an outage, at a size the test suite cannot afford:
# queues N messages of 2 KiB with smtp-source while the smart host is down,
# optionally restarts the relay (SIGTERM, then start again), starts smtp-sink
# on the smart host's port, runs `postern queue flush`, waits for the queue to
# drain and one retry interval more, then counts what reached the sink.
# (The sink only counts: writing each message out would slow it down enough
# to hide the races this looks for. The test suite's `once` tests count by
# queue id.)
#
#   host/scripts/backlog-once.sh [N=50000] [restart|no-restart] [flush|no-flush]
#
# Prints one line: N, restart, flush, how many arrived, how many more than
# were queued. Exits 1 when that is not zero.
# POSTERN_BIN runs another build of the relay (default: this tree's release build).
set -euo pipefail
cd "$(dirname "$0")/../.."

N=${1:-50000}
RESTART=${2:-restart}
FLUSH=${3:-flush}
RETRY=20

command -v smtp-source >/dev/null || { echo "needs smtp-source and smtp-sink (apt-get install postfix)" >&2; exit 2; }
if [ -z "${POSTERN_BIN:-}" ]; then
  cargo build --release -q -p postern
  POSTERN_BIN=$PWD/target/release/postern
fi

work=$(mktemp -d /dev/shm/postern-once.XXXXXX 2>/dev/null || mktemp -d)
spool=$(mktemp -d "${TMPDIR:-/var/tmp}/postern-once-spool.XXXXXX")
relay_pid=""; sink_pid=""
cleanup() {
  [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null || true
  [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work" "$spool"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); sink_port=$(free_port)
cat >"$work/postern.toml" <<EOF
hostname = "relay.once.test"
[[listener]]
address = "127.0.0.1:$port"
[spool]
path = "$spool"
[relay]
networks = ["127.0.0.0/8"]
[log]
level = "warn"
[delivery]
smarthost = "smtp://127.0.0.1:$sink_port"
retry = ["${RETRY}s"]
EOF

start_relay() {
  "$POSTERN_BIN" serve --config "$work/postern.toml" 2>>"$work/relay.log" &
  relay_pid=$!
  for _ in $(seq 200); do
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "relay did not start; log:" >&2; cat "$work/relay.log" >&2; exit 2
}
queued() { find "$spool/queue" -maxdepth 1 -type f ! -name '*.*' | wc -l; }

start_relay
smtp-source -s 20 -m "$N" -l 2048 -f a@origin.test -t b@dest.test "127.0.0.1:$port"
echo "queued: $(queued)" >&2
if [ "$RESTART" = restart ]; then
  kill -TERM "$relay_pid"; wait "$relay_pid" || true
  start_relay
fi

sink_user=()
[ "$(id -u)" = 0 ] && sink_user=(-u nobody)
smtp-sink "${sink_user[@]}" -c "127.0.0.1:$sink_port" 256 >"$work/sink.out" &
sink_pid=$!
if [ "$FLUSH" = flush ]; then
  # A relay that refuses the command at first is reported, and asked again.
  for try in $(seq 100); do
    "$POSTERN_BIN" queue flush --config "$work/postern.toml" 2>>"$work/flush.err" && break
    sleep 0.1
  done
  [ "$try" -gt 1 ] && echo "flush refused $((try - 1)) time(s): $(head -c 300 "$work/flush.err")" >&2
fi

while [ "$(queued)" -gt 0 ]; do
  kill -0 "$sink_pid" 2>/dev/null || { echo "smtp-sink died" >&2; exit 2; }
  sleep 1
done
sleep $((RETRY + 5))

# smtp-sink -c rewrites one counter line with CRs: the last mesg= is the total.
arrived=$(tr '\r' '\n' <"$work/sink.out" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -n 1)
echo "N=$N $RESTART $FLUSH arrived=$arrived duplicates=$((arrived - N))"
[ "$arrived" -eq "$N" ]
