#!/bin/sh
# End-to-end rate with a Python or JavaScript example plugin in the chain
# against none: Postfix's smtp-source -> Postern -> smtp-sink on
# 127.0.0.1:2629, 20 sessions, 4 KiB messages whose Subject the tagger's
# rule matches (so each message is tagged, counted in the kv store and
# routed by its class), fsync on. A run ends when the sink has every
# message. Rounds alternate the two setups; prints messages per second for
# each and the median cost.
#   host/benches/lang_rate.sh python|js [MESSAGES] [ROUNDS]
# Needs target/release/postern (or $BIN), smtp-source and smtp-sink; builds
# the example with its script.
set -eu
LANG_=${1:?python or js}
N=${2:-20000}
ROUNDS=${3:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
TARGET=${CARGO_TARGET_DIR:-$HERE/../../target}
BIN=${BIN:-$TARGET/release/postern}
case $LANG_ in
    python) WASM=tagger-py.wasm ;;
    js) WASM=tagger-js.wasm ;;
    *) echo "python or js, not $LANG_" >&2; exit 2 ;;
esac
WORK=$(mktemp -d)
PID=
SINK=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; [ -n "$SINK" ] && kill $SINK 2>/dev/null; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/plugins"
"$HERE/../../examples/plugins/$LANG_/build.sh" "$WORK/plugins/$WASM" >&2
# smtp-sink refuses to run as root without -u; -c writes its counters to stdout.
smtp-sink -c -u nobody -m 1000 127.0.0.1:2629 1024 > "$WORK/sink.cnt" & SINK=$!
sunk() { tail -c 200 "$WORK/sink.cnt" | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 | sed 's/mesg=//;s/^$/0/'; }
run() { # $1 = none or plugin
    "$HERE/../scripts/fresh-caches.sh"
    rm -rf "$WORK/spool"
    {
        printf '[[listener]]\naddress = "127.0.0.1:2599"\n[relay]\nnetworks = ["127.0.0.0/8"]\n'
        printf '[spool]\npath = "spool"\n[delivery]\nsmarthost = "smtp://127.0.0.1:2629"\n'
        printf '[plugins]\nwatch = false\ncache_dir = "cache"\n[log]\nlevel = "warn"\n'
        if [ "$1" = plugin ]; then
            printf '[[plugin]]\nname = "tagger"\npath = "%s"\ngrants = ["kv", "log"]\n' "$WASM"
            printf '[plugin.config]\n[[plugin.config.rules]]\nclass = "bulk"\nsubject = ["smtp-source"]\n'
            printf '[plugin.config.routes]\nbulk = "smtp://127.0.0.1:2629"\n'
        fi
    } > "$WORK/postern.toml"
    "$BIN" serve --config "$WORK/postern.toml" 2>"$WORK/log" &
    PID=$!
    # Wait until it listens (the first run compiles the plugin).
    until smtp-source -m 1 -f a@b.test -t c@d.test 127.0.0.1:2599 2>/dev/null; do sleep 0.2; done
    until [ "$(sunk)" -gt 0 ]; do sleep 0.1; done
    base=$(sunk)
    start=$(date +%s.%N)
    # -S: smtp-source's default Subject is "smtp-source"; say it outright.
    smtp-source -s 20 -m "$N" -l 4096 -S smtp-source -f a@b.test -t c@d.test 127.0.0.1:2599
    while [ $(($(sunk) - base)) -lt "$N" ]; do sleep 0.02; done
    end=$(date +%s.%N)
    kill $PID; wait $PID 2>/dev/null || true
    PID=
    if grep -q 'plugin failed' "$WORK/log"; then
        echo "the plugin failed calls:" >&2
        grep 'plugin failed' "$WORK/log" | head -3 >&2
        exit 1
    fi
    echo "$N / ($end - $start)" | bc -l
}
: > "$WORK/rates"
round=1
while [ $round -le "$ROUNDS" ]; do
    base=$(run none)
    with=$(run plugin)
    echo "$base $with" >> "$WORK/rates"
    echo "round $round: no plugins $base msg/s, $LANG_ tagger $with msg/s, cost $(echo "100 * (1 - $with / $base)" | bc -l | cut -c1-5)%"
    round=$((round + 1))
done
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "median: no plugins $(cut -d' ' -f1 "$WORK/rates" | median) msg/s, $LANG_ tagger $(cut -d' ' -f2 "$WORK/rates" | median) msg/s, cost $(awk '{ print 100 * (1 - $2 / $1) }' "$WORK/rates" | median)%"
