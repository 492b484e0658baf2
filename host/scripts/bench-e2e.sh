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
# With DKIM=rsa|ed25519|dual the relay DKIM-signs every message (smtp-source
# sends From: sender@load.test) with a 2048-bit RSA key, an Ed25519 key, or
# both. With VERIFY=on|off a second postern (port PORT+1, spool SPOOL-verify)
# sits between the first and the sink, for clients it does not trust, with
# SPF, DKIM, DMARC and ARC checks on or off, its DNS a local server
# (bench-dns.py) publishing SPF, DMARC and the DKIM keys of load.test; the
# relay CPU reported is then the second one's, so on minus off is the cost
# of verifying (one signature per key the first relay signs with).
# env: PORT=2529 SINK_PORT=2626 SPOOL=/tmp/postern-bench-spool PEER= DKIM= VERIFY=
#      DNS_PORT=2553 and the harness's RUNS, WARMUP, RESULTS, OTHER_MAX.
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
DKIM=${DKIM:-}; VERIFY=${VERIFY:-}; DNS_PORT=${DNS_PORT:-2553}
NEXT=$SPORT
[ -z "$VERIFY" ] || NEXT=$((PORT + 1))
keys=""; records=()
case "$DKIM" in "") algs="" ;; dual) algs="rsa ed25519" ;; *) algs=$DKIM ;; esac
for alg in $algs; do
  "$BIN" dkim keygen --domain load.test --selector "$alg" --algorithm "$alg" \
    --out "$work/$alg.pem" > "$work/$alg.txt"
  keys+=$'[[dkim.key]]\ndomain = "load.test"\n'"selector = \"$alg\""$'\n'"key = \"$work/$alg.pem\""$'\n'
  records+=("$alg._domainkey.load.test=$(grep ' IN TXT ' "$work/$alg.txt" | grep -o '"[^"]*"' | tr -d '"' | tr -d '\n')")
done
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
smarthost = "smtp://127.0.0.1:$NEXT"
retry = ["5s", "30s"]
$keys
CONF

"$HERE/fresh-caches.sh"
"$BIN" serve --config "$work/postern.toml" 2> "$work/postern.log" & PID=$!
VPID=""; DPID=""
cleanup() {
  for p in $PID $VPID; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -z "$DPID" ] || kill "$DPID" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
if [ -n "$VERIFY" ]; then
  checks=true; [ "$VERIFY" = on ] || checks=false
  python3 "$HERE/bench-dns.py" "$DNS_PORT" "load.test=v=spf1 ip4:127.0.0.0/8 -all" \
    "_dmarc.load.test=v=DMARC1; p=reject" "${records[@]}" & DPID=$!
  rm -rf "$SPOOL-verify"
  cat > "$work/verify.toml" <<CONF
hostname = "verify.bench.test"
[[listener]]
address = "127.0.0.1:$NEXT"
[spool]
path = "$SPOOL-verify"
[relay]
domains = ["sink.test"]
[limits]
max_connections = 4000
max_connections_per_client = 4000
[log]
level = "warn"
[authentication]
spf = $checks
dkim = $checks
dmarc = $checks
arc = $checks
[delivery]
smarthost = "smtp://127.0.0.1:$SPORT"
nameservers = ["127.0.0.1:$DNS_PORT"]
retry = ["5s", "30s"]
CONF
  "$BIN" serve --config "$work/verify.toml" 2> "$work/verify.log" & VPID=$!
fi
for p in $PORT ${VPID:+$NEXT}; do
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break
    sleep 0.1
  done
done

echo "postern $(git -C "$REPO" rev-parse --short HEAD) on 127.0.0.1:$PORT, pid $PID, DKIM=${DKIM:-none} VERIFY=${VERIFY:-none}"
RELAY_PID=${VPID:-$PID} LABEL="postern dkim=${DKIM:-none} verify=${VERIFY:-none}" \
  "$BENCH/relay-bench.sh" "127.0.0.1:$PORT" "$SPORT" "$N" "$S" "$KB" "$R"
left=$(find "$SPOOL/queue" -maxdepth 1 -type f | wc -l)
echo "postern spool files left after the runs: $left"
grep -E " (WARN|ERROR) " "$work/postern.log" | tail -5 || true
[ -z "$VPID" ] || grep -E " (WARN|ERROR) " "$work/verify.log" | tail -5 || true

if [ "${PEER:-}" = postfix ]; then
  kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
  "$HERE/fresh-caches.sh"
  "$BENCH/peer-postfix.sh" "$N" "$S" "$KB" "$R"
fi
