#!/bin/bash
# usage: host/scripts/million.sh [N=1000000] [SIZE_KB=2] [SOURCES=4]
# A queue of a million: N messages of SIZE_KB queued while their next hop is
# down (SOURCES smtp-source processes of 20 sessions each), then
#   1. Postern's peak RSS while they are queued;
#   2. a restart: seconds until it serves SMTP again, and until
#      `postern queue summary` answers;
#   3. the next hop back (`queue flush`): the drain rate, and meanwhile fresh
#      mail to another destination (1,000 messages to a second sink) with the
#      time it takes to arrive, so a backlog is seen not to starve fresh mail;
#   4. peak RSS over the drain.
# Needs the spool's disk to hold N * (SIZE_KB + 1) KiB. Runs as root (smtp-sink
# needs -u). env: SPOOL=/tmp/postern-million-spool PORT=2531.
set -eu -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
N=${1:-1000000}; KB=${2:-2}; SOURCES=${3:-4}
PORT=${PORT:-2531}; HOP=2632; FRESH=2633
SPOOL=${SPOOL:-/tmp/postern-million-spool}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
(cd "$REPO" && cargo build --release --quiet -p postern)
BIN=$TARGET_DIR/release/postern
work=$(mktemp -d /tmp/postern-million.XXXXXX)
rm -rf "$SPOOL"
cat > "$work/postern.toml" <<CONF
hostname = "relay.million.test"
[[listener]]
address = "127.0.0.1:$PORT"
[spool]
path = "$SPOOL"
[relay]
networks = ["127.0.0.0/8"]
[log]
level = "warn"
[delivery]
retry = ["1h"]
max_age = "5d"
[delivery.routes]
"backlog.test" = "smtp://127.0.0.1:$HOP"
"fresh.test" = "smtp://127.0.0.1:$FRESH"
CONF
pid=; sinks=()
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  for s in "${sinks[@]}"; do kill "$s" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }
hwm() { awk '/^VmHWM:/ { printf "%.0f MiB", $2 / 1024 }' "/proc/$pid/status"; }
start() {
  "$BIN" serve --config "$work/postern.toml" 2>> "$work/log" & pid=$!
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
# Messages a sink has counted so far (0 before its first count line).
sink_count() {
  local n
  n=$(tail -c 300 "$1" | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 | sed 's/mesg=//')
  echo "${n:-0}"
}

start
until listening; do sleep 0.1; done
echo "== queueing $N x $KB KiB with the next hop down ($SOURCES smtp-source x 20 sessions)"
t0=$(now)
per=$((N / SOURCES))
for i in $(seq "$SOURCES"); do
  smtp-source -s 20 -m "$per" -l $((KB * 1024)) -f a@origin.test -t b@backlog.test "127.0.0.1:$PORT" &
done
wait $(jobs -p | grep -v "^$pid$") 2>/dev/null || true
echo "queued in $(since "$t0") s; peak RSS while queueing: $(hwm)"

echo "== restart"
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
t0=$(now)
start
until listening; do sleep 0.05; done
echo "serving SMTP $(since "$t0") s after start"
t1=$(now)
"$BIN" queue summary --config "$work/postern.toml" > "$work/summary.txt"
echo "queue summary answered in $(since "$t1") s:"; head -5 "$work/summary.txt"

echo "== next hop back: drain, with fresh mail to another destination"
smtp-sink -c -u nobody -m 1000 "127.0.0.1:$HOP" 1024 > "$work/hop.cnt" & sinks+=($!)
smtp-sink -c -u nobody "127.0.0.1:$FRESH" 256 > "$work/fresh.cnt" & sinks+=($!)
sleep 0.5
t0=$(now)
"$BIN" queue flush --config "$work/postern.toml" >/dev/null
tf=$(now)
smtp-source -s 5 -m 1000 -l 2048 -f a@origin.test -t c@fresh.test "127.0.0.1:$PORT"
while [ "$(sink_count "$work/fresh.cnt")" -lt 1000 ]; do sleep 0.05; done
echo "1000 fresh messages through in $(since "$tf") s while the backlog drained (backlog delivered so far: $(sink_count "$work/hop.cnt"))"
while [ "$(sink_count "$work/hop.cnt")" -lt "$((per * SOURCES))" ]; do sleep 0.5; done
d=$(since "$t0")
echo "drained $((per * SOURCES)) in $d s = $(awk -v n=$((per * SOURCES)) -v d="$d" 'BEGIN { printf "%.0f", n / d }') msg/s; peak RSS of the restarted relay: $(hwm)"
