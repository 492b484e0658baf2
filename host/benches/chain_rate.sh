#!/bin/sh
# End-to-end rate of the relay with no plugins and with a chain of testkit
# plugins (each handling every hook, helo and delivered included):
# Postfix's smtp-source -> Postern -> smtp-sink on 127.0.0.1:2628, 20
# sessions, 4 KiB messages, fsync on. A run ends when the sink has every
# message. Prints messages per second for each round (one run of the base,
# one of the chain) and the median cost over the rounds.
#   host/benches/chain_rate.sh [MESSAGES] [ROUNDS]
# CHAIN says which chain is measured, BASE what it is measured against
# (`none`, no plugins, unless set):
#   none      no plugins
#   five      five plugins (the default CHAIN)
#   quiet     five plugins, `delivered` not called (hooks narrowed), so
#             CHAIN=five BASE=quiet is what the delivered hook costs
#   twice     the same plugin listed twice
#   shadow    one plugin with the same plugin as its shadow, so
#             CHAIN=shadow BASE=twice is a shadow against listing it twice
# INSTANCES=transaction (or fresh) sets the plugins' `instances`; unset, the
# relay's default (per-call).
# Needs target/release/postern and the testkit plugin built for wasm32-wasip2.
set -eu
N=${1:-20000}
ROUNDS=${2:-5}
CHAIN=${CHAIN:-five}
BASE=${BASE:-none}
INSTANCES=${INSTANCES:-}
TARGET=${CARGO_TARGET_DIR:-$(dirname "$0")/../../target}
BIN=$TARGET/release/postern
WASM=$TARGET/wasm32-wasip2/release/testkit.wasm
WORK=$(mktemp -d)
PID=
SINK=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; [ -n "$SINK" ] && kill $SINK 2>/dev/null; rm -rf "$WORK"' EXIT
# smtp-sink refuses to run as root without -u; -c writes its counters to stdout.
smtp-sink -c -u nobody -m 1000 127.0.0.1:2628 1024 > "$WORK/sink.cnt" & SINK=$!
sunk() { tail -c 200 "$WORK/sink.cnt" | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 | sed 's/mesg=//;s/^$/0/'; }
mkdir -p "$WORK/plugins"
cp "$WASM" "$WORK/plugins/"
run() { # $1 = the chain's name
    "$(dirname "$0")/../scripts/fresh-caches.sh"
    rm -rf "$WORK/spool"
    {
        printf '[[listener]]\naddress = "127.0.0.1:2598"\n[relay]\nnetworks = ["127.0.0.0/8"]\n'
        printf '[delivery]\nsmarthost = "smtp://127.0.0.1:2628"\n'
        printf '[plugins]\nwatch = false\ncache_dir = "cache"\n[log]\nlevel = "warn"\n'
        count=0
        extra=
        [ -n "$INSTANCES" ] && extra="instances = \"$INSTANCES\""
        case $1 in
            none) ;;
            five) count=5 ;;
            quiet) count=5
                extra="$extra
hooks = [\"connect\", \"helo\", \"mail_from\", \"rcpt\", \"data\", \"route\"]" ;;
            twice) count=2 ;;
            shadow) count=1; extra="$extra
shadow = \"testkit.wasm\"" ;;
            *) echo "unknown chain $1" >&2; exit 2 ;;
        esac
        i=0
        while [ $i -lt $count ]; do
            printf '[[plugin]]\nname = "p%s"\npath = "testkit.wasm"\ngrants = ["kv"]\n%s\n' $i "$extra"
            i=$((i + 1))
        done
    } > "$WORK/postern.toml"
    "$BIN" serve --config "$WORK/postern.toml" 2>"$WORK/log" &
    PID=$!
    # Wait until it listens (the first run compiles the plugin).
    until smtp-source -m 1 -f a@b.test -t c@d.test 127.0.0.1:2598 2>/dev/null; do sleep 0.2; done
    until [ "$(sunk)" -gt 0 ]; do sleep 0.1; done
    base=$(sunk)
    start=$(date +%s.%N)
    smtp-source -s 20 -m "$N" -l 4096 -f a@b.test -t c@d.test 127.0.0.1:2598
    while [ $(($(sunk) - base)) -lt "$N" ]; do sleep 0.02; done
    end=$(date +%s.%N)
    kill $PID; wait $PID 2>/dev/null || true
    echo "$N / ($end - $start)" | bc -l
}
# Rounds alternate the two setups, so drift in the machine's speed during the
# benchmark touches both alike; each round gives one ratio.
: > "$WORK/rates"
round=1
while [ $round -le "$ROUNDS" ]; do
    base=$(run "$BASE")
    chain=$(run "$CHAIN")
    echo "$base $chain" >> "$WORK/rates"
    echo "round $round: $BASE $base msg/s, $CHAIN $chain msg/s, cost $(echo "100 * (1 - $chain / $base)" | bc -l | cut -c1-5)%"
    round=$((round + 1))
done
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "median: $BASE $(cut -d' ' -f1 "$WORK/rates" | median) msg/s, $CHAIN $(cut -d' ' -f2 "$WORK/rates" | median) msg/s, cost $(awk '{ print 100 * (1 - $2 / $1) }' "$WORK/rates" | median)% (median of the rounds' costs)"
