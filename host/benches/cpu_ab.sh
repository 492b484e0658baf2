#!/bin/sh
# The relay's CPU per message for two builds, in alternating rounds:
# Postfix's smtp-source -> Postern (no plugins) -> smtp-sink on 127.0.0.1:2628,
# 20 sessions, fsync on. Per run it prints the relay's CPU per message (user
# and system, then user alone, from /proc/PID/stat around the load), its
# context switches per message, its peak RSS and smtp-source's rate. On a
# noisy machine a figure moves by ±10% between runs; a change shows as the
# same sign in every round, whichever build ran first.
#   host/benches/cpu_ab.sh OLD_BINARY NEW_BINARY [MESSAGES] [ROUNDS] [SIZE_KB]
# Keep a copy of the old build (cp target/release/postern /tmp/postern-old)
# before building the new one.
set -eu
OLD=$1
NEW=$2
N=${3:-20000}
ROUNDS=${4:-4}
KB=${5:-4}
WORK=$(mktemp -d)
PID=
SINK=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; [ -n "$SINK" ] && kill $SINK 2>/dev/null; rm -rf "$WORK"' EXIT
# smtp-sink refuses to run as root without -u.
smtp-sink -u nobody -m 1000 127.0.0.1:2628 1024 & SINK=$!
printf '[[listener]]\naddress = "127.0.0.1:2598"\n[relay]\nnetworks = ["127.0.0.0/8"]\n[spool]\npath = "spool"\n[delivery]\nsmarthost = "smtp://127.0.0.1:2628"\n[log]\nlevel = "warn"\n' > "$WORK/postern.toml"
ticks() { awk "{ print \$$1 }" "/proc/$PID/stat"; } # 14 user, 15 system, in 1/100 s
switches() { cat /proc/$PID/task/*/status | awk '/ctxt_switches/ { s += $2 } END { print s }'; }
run() { # $1 = label, $2 = binary
    "$(dirname "$0")/../scripts/fresh-caches.sh"
    rm -rf "$WORK/spool"
    (cd "$WORK" && exec "$2" serve --config postern.toml 2> "$WORK/log") & PID=$!
    until smtp-source -m 1 -f a@b.test -t c@d.test 127.0.0.1:2598 2>/dev/null; do sleep 0.2; done
    sleep 1
    u0=$(ticks 14); s0=$(ticks 15); c0=$(switches)
    start=$(date +%s.%N)
    smtp-source -s 20 -m "$N" -l $((KB * 1024)) -f a@b.test -t c@d.test 127.0.0.1:2598
    end=$(date +%s.%N)
    # Let delivery finish: its CPU is the relay's too.
    sleep 2
    u1=$(ticks 14); s1=$(ticks 15); c1=$(switches)
    rss=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$PID/status")
    kill $PID; wait $PID 2>/dev/null || true
    PID=
    echo "$1: relay CPU $(( (u1 - u0 + s1 - s0) * 10000 / N )) us/msg (user $(( (u1 - u0) * 10000 / N ))), $(echo "($c1 - $c0) / $N" | bc -l | cut -c1-5) context switches/msg, peak RSS $rss MiB, $(echo "$N / ($end - $start)" | bc) msg/s accepted"
}
round=1
while [ $round -le "$ROUNDS" ]; do
    echo "round $round"
    # Each build goes first in every other round: the second run of a round
    # can find the disk still writing back the first's spool.
    if [ $((round % 2)) -eq 1 ]; then
        run old "$OLD"
        run new "$NEW"
    else
        run new "$NEW"
        run old "$OLD"
    fi
    round=$((round + 1))
done
