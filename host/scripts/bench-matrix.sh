#!/bin/bash
# usage: host/scripts/bench-matrix.sh [CELLS...]
# The benchmark matrix: smtp-source -> relay -> smtp-sink (fsync on) through
# ../shared/bench, Postern side by side with Postfix and Haraka in one
# invocation, for every combination of
#   message size   4 KiB, 100 KiB, 1 MiB
#   recipients     1, 10
#   sessions       20, 200
#   chain          none, five (Postern only: five testkit plugins on every hook)
# Per cell: accepted and end-to-end messages per second (median of RUNS
# batches), the relay's CPU per message, Postern's peak RSS, and Postern's
# ratio to each peer. N per cell is sized so the whole matrix runs in well
# under 45 minutes on a 2-core machine; set SCALE=2 for twice as many. The
# peers, several times slower, send N / PEER_SHARE (default 3, at least 100):
# a rate is a rate, and Haraka at 200 sessions would otherwise take most of
# the time.
# A cell is SIZE_KB:RCPTS:SESSIONS (e.g. 4:1:20); with none given, all 12.
# PEERS="postfix haraka" (default) or a subset; OUT=folder for the logs and
# the table (default target/bench-matrix/<date>).
# Runs as root (the peers' scripts install and start Postfix and Haraka).
set -eu -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BENCH=${BENCH:-$REPO/../shared/bench}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
PEERS=${PEERS:-postfix haraka}
SCALE=${SCALE:-1}
PEER_SHARE=${PEER_SHARE:-3}
export RUNS=${RUNS:-3} WARMUP=${WARMUP:-200}
OUT=${OUT:-$TARGET_DIR/bench-matrix/$(date -u +%Y%m%dT%H%M%SZ)}
PORT=2529; SPORT=2626
mkdir -p "$OUT"

(cd "$REPO" && cargo build --release --quiet -p postern &&
  cargo build --release --quiet --target wasm32-wasip2 -p testkit)
BIN=$TARGET_DIR/release/postern
WASM=$TARGET_DIR/wasm32-wasip2/release/testkit.wasm

cells=("$@")
if [ ${#cells[@]} -eq 0 ]; then
  for kb in 4 100 1024; do for r in 1 10; do for s in 20 200; do cells+=("$kb:$r:$s"); done; done; done
fi

# Messages per cell: about the same bytes on the wire for every size.
count() { # kb rcpts
  local n
  case $1 in 4) n=6000 ;; 100) n=1500 ;; *) n=300 ;; esac
  [ "$2" -gt 1 ] && n=$((n / 2))
  echo $((n * SCALE))
}

# Postern with `chain` (none or five) for one cell; prints "SUMMARY ... | rss KiB".
postern_cell() { # chain n s kb r
  local chain=$1 n=$2 s=$3 kb=$4 r=$5 work pid i
  "$HERE/fresh-caches.sh"
  work=$(mktemp -d /tmp/postern-matrix.XXXXXX)
  mkdir -p "$work/plugins"
  cp "$WASM" "$work/plugins/"
  {
    printf 'hostname = "relay.bench.test"\n[[listener]]\naddress = "127.0.0.1:%s"\n' "$PORT"
    printf '[spool]\npath = "%s/spool"\n[relay]\nnetworks = ["127.0.0.0/8"]\n' "$work"
    printf '[limits]\nmax_message_size = 52428800\n[log]\nlevel = "warn"\n'
    printf '[delivery]\nsmarthost = "smtp://127.0.0.1:%s"\nretry = ["5s", "30s"]\n' "$SPORT"
    printf '[plugins]\nwatch = false\ncache_dir = "%s/cache"\n' "$TARGET_DIR/bench-matrix"
    if [ "$chain" = five ]; then
      for i in 0 1 2 3 4; do
        printf '[[plugin]]\nname = "p%s"\npath = "testkit.wasm"\ngrants = ["kv"]\n' "$i"
      done
    fi
  } > "$work/postern.toml"
  (cd "$work" && exec "$BIN" serve --config postern.toml 2> "$work/log") & pid=$!
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  RELAY_PID=$pid LABEL="postern-$chain" RESULTS="$work/summary" \
    "$BENCH/relay-bench.sh" "127.0.0.1:$PORT" "$SPORT" "$n" "$s" "$kb" "$r" >&2
  local rss
  rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  echo "$(tail -1 "$work/summary" | cut -d' ' -f2-) | rss $rss KiB"
  rm -rf "$work"
}

peer_cell() { # peer n s kb r
  local peer=$1 tmp
  tmp=$(mktemp)
  "$HERE/fresh-caches.sh"
  RESULTS=$tmp "$BENCH/peer-$peer.sh" "$2" "$3" "$4" "$5" >&2
  tail -1 "$tmp" | cut -d' ' -f2-
  rm -f "$tmp"
}

# Fields of a SUMMARY line.
e2e() { sed -n 's/.*e2e median \([0-9]*\) msg\/s.*/\1/p'; }
acc() { sed -n 's/.*accepted median \([0-9]*\) msg\/s.*/\1/p'; }
cpu() { sed -n 's/.*one core, \([0-9]*\) us\/msg.*/\1/p'; }
rss() { sed -n 's/.*| rss \([0-9]*\) KiB/\1/p'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }'; }

table=$OUT/table.md
{
  echo "Postern $(git -C "$REPO" rev-parse --short HEAD), $(nproc) cores, $(date -u +%F); RUNS=$RUNS, medians; the peers sent N / $PEER_SHARE"
  echo
  printf '| size | rcpts | sessions | N | chain | accepted/s | e2e/s | relay CPU us/msg | peak RSS MiB |'
  for p in $PEERS; do printf ' %s e2e/s | ratio to %s |' "$p" "$p"; done
  echo
  printf '| --- | --- | --- | --- | --- | --- | --- | --- | --- |'
  for p in $PEERS; do printf ' --- | --- |'; done
  echo
} > "$table"

for cell in "${cells[@]}"; do
  IFS=: read -r kb r s <<< "$cell"
  n=$(count "$kb" "$r")
  declare -A peer_e2e=()
  peer_n=$((n / PEER_SHARE)); [ "$peer_n" -lt 100 ] && peer_n=100
  started=$SECONDS
  for p in $PEERS; do
    line=$(peer_cell "$p" "$peer_n" "$s" "$kb" "$r")
    echo "$p $cell: $line" >> "$OUT/summary.txt"
    peer_e2e[$p]=$(echo "$line" | e2e)
  done
  for chain in none five; do
    line=$(postern_cell "$chain" "$n" "$s" "$kb" "$r")
    echo "postern-$chain $cell: $line" >> "$OUT/summary.txt"
    ours=$(echo "$line" | e2e)
    {
      printf '| %s KiB | %s | %s | %s | %s | %s | %s | %s | %s |' "$kb" "$r" "$s" "$n" "$chain" \
        "$(echo "$line" | acc)" "$ours" "$(echo "$line" | cpu)" \
        "$(awk -v k="$(echo "$line" | rss)" 'BEGIN { printf "%.0f", k / 1024 }')"
      for p in $PEERS; do printf ' %s | %s |' "${peer_e2e[$p]}" "$(ratio "$ours" "${peer_e2e[$p]}")"; done
      echo
    } >> "$table"
  done
  unset peer_e2e
  echo "cell $cell took $((SECONDS - started)) s" >&2
done
echo
cat "$table"
echo "logs and table in $OUT; the matrix took $((SECONDS / 60)) minutes"
