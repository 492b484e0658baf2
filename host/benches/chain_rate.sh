#!/bin/sh
# Accept rate of the relay with no plugins and with a chain of five (each
# handling every hook), loaded by Postfix's smtp-source: 20 sessions, 4 KiB
# messages, fsync on. Prints messages per second, median of three runs each.
#   host/benches/chain_rate.sh [MESSAGES]
# Needs target/release/postern and the testkit plugin built for wasm32-wasip2.
set -eu
N=${1:-3000}
TARGET=${CARGO_TARGET_DIR:-$(dirname "$0")/../../target}
BIN=$TARGET/release/postern
WASM=$TARGET/wasm32-wasip2/release/testkit.wasm
WORK=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/plugins"
cp "$WASM" "$WORK/plugins/"
run() { # $1 = number of plugins
    rm -rf "$WORK/spool"
    {
        printf '[[listener]]\naddress = "127.0.0.1:2598"\n[relay]\nnetworks = ["127.0.0.0/8"]\n'
        # Messages stay queued: the smart host is a loopback port with nothing
        # behind it, so no lookup leaves the machine.
        printf '[delivery]\nsmarthost = "smtp://127.0.0.1:9"\n'
        printf '[plugins]\nwatch = false\ncache_dir = "cache"\n[log]\nlevel = "warn"\n'
        i=0
        while [ $i -lt "$1" ]; do
            printf '[[plugin]]\nname = "p%s"\npath = "testkit.wasm"\ngrants = ["kv"]\n' $i
            i=$((i + 1))
        done
    } > "$WORK/postern.toml"
    "$BIN" serve --config "$WORK/postern.toml" 2>"$WORK/log" &
    PID=$!
    # Wait until it listens (the first run compiles the plugin).
    until smtp-source -m 1 -f a@b.test -t c@d.test 127.0.0.1:2598 2>/dev/null; do sleep 0.2; done
    start=$(date +%s.%N)
    smtp-source -s 20 -m "$N" -l 4096 -f a@b.test -t c@d.test 127.0.0.1:2598
    end=$(date +%s.%N)
    kill $PID; wait $PID 2>/dev/null || true
    echo "$N / ($end - $start)" | bc -l
}
for plugins in 0 5; do
    rates=$( (run $plugins; run $plugins; run $plugins) | sort -n)
    echo "plugins=$plugins msgs/s (runs sorted): $(echo $rates)  median: $(echo "$rates" | sed -n 2p)"
done
