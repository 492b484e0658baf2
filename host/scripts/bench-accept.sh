#!/usr/bin/env bash
# usage: bench-accept.sh [N=20000] [SESSIONS=20] [SIZE_KB=4]
# Acceptance throughput of Postern: Postfix's smtp-source sends N messages (one
# per connection, SESSIONS in parallel) to a release build; every 250 means the
# message was fsynced (file and folder). Reports accepted msg/s and Postern's CPU
# per message for RUNS runs (default 3) and their medians. Delivery plays no part
# here: the smart host is a loopback port where nothing listens, so messages stay
# queued and nothing is looked up outside this machine. With COMPARE=postfix it then runs
# ../shared/bench/peer-postfix.sh with the same load, on the same machine, in
# the same run, and prints the ratio of the medians.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bench=${BENCH_DIR:-$repo/../shared/bench}
[ -f "$bench/lib.sh" ] || { echo "needs the shared bench scripts in $bench" >&2; exit 1; }
# shellcheck source=/dev/null
. "$bench/lib.sh"
N=${1:-20000}; S=${2:-20}; KB=${3:-4}; RUNS=${RUNS:-3}; PORT=${PORT:-2540}
need_tools
cargo build --release -p postern --manifest-path "$repo/Cargo.toml" >&2

work=$(mktemp -d /tmp/postern-bench.XXXXXX)
cat > "$work/postern.toml" <<TOML
hostname = "relay.bench.test"
[[listener]]
address = "127.0.0.1:$PORT"
[spool]
path = "$work/spool"
[relay]
networks = ["127.0.0.0/8"]
[delivery]
smarthost = "smtp://127.0.0.1:9"
[log]
level = "warn"
TOML
port_free "$PORT"
"$repo/target/release/postern" serve --config "$work/postern.toml" 2> "$work/postern.log" & PID=$!
trap 'stop_pid $PID; rm -rf "$work"' EXIT
wait_port "$PORT"

run() {
  local n=$1 c0 c1 t0 t1
  c0=$(tree_cpu "$PID"); t0=$(now)
  "$bench/load.sh" "127.0.0.1:$PORT" "$n" "$S" "$KB" 1 > "$work/load.out" || { cat "$work/load.out"; exit 1; }
  t1=$(now); c1=$(tree_cpu "$PID")
  awk -v n="$n" -v t0="$t0" -v t1="$t1" -v c0="$c0" -v c1="$c1" 'BEGIN {
    printf "accepted %.0f msg/s (%.2f s)  postern cpu %.2f s = %.0f%% of one core, %.0f us/msg\n",
      n / (t1 - t0), t1 - t0, c1 - c0, 100 * (c1 - c0) / (t1 - t0), 1e6 * (c1 - c0) / n }'
}

echo "== postern accept: $N msgs x $RUNS runs, $S sessions, $KB KiB; $(date -u +%FT%TZ), $(nproc) cpus"
wait_quiet; echo -n "warm-up (1000 msgs): "; run 1000
: > "$work/runs"
for i in $(seq "$RUNS"); do
  wait_quiet; line=$(run "$N"); echo "run $i: $line"; echo "$line" >> "$work/runs"
done
summary=$(awk '{ a[NR] = $2; u[NR] = $(NF - 1) }
  function med(x, k,   i, j, t) { for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (x[j] < x[i]) { t = x[i]; x[i] = x[j]; x[j] = t }
    return k % 2 ? x[(k + 1) / 2] : (x[k / 2] + x[k / 2 + 1]) / 2 }
  END { printf "%.0f %.0f", med(a, NR), med(u, NR) }' "$work/runs")
read -r acc us <<< "$summary"
echo "SUMMARY postern accept | $N msgs $S sess $KB KiB | accepted median $acc msg/s | cpu median $us us/msg"
stop_pid "$PID"

if [ "${COMPARE:-}" = postfix ]; then
  "$bench/peer-postfix.sh" "$N" "$S" "$KB" 1 | tee "$work/postfix.log"
  pf=$(sed -n 's/.*accepted median \([0-9]*\) msg\/s.*/\1/p' "$work/postfix.log" | tail -1)
  awk -v a="$acc" -v p="$pf" 'BEGIN { printf "RATIO postern/postfix accepted msg/s: %.1fx (%d vs %d)\n", a / p, a, p }'
fi
