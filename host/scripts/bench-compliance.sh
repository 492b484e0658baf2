#!/bin/bash
# usage: host/scripts/bench-compliance.sh [N_TEXT=4000] [N_ATTACH=300] [SESSIONS=20]
# The compliance plugin's cost on the end-to-end rate: smtp-source ->
# postern -> smtp-sink, once without plugins and once with `compliance`
# (card and IBAN detectors, a regex, the executables rule with signatures
# and zip listing, encrypted archives, a footer), for 4 KiB text messages
# and for messages with a 1 MB attachment (a zip of 1 MB, so the zip
# listing runs, and a 4 KiB text body). Prints messages per second
# accepted (the data hook runs before each 250) for each case.
# env: PORT=2531 SINK_PORT=2631 CARGO_TARGET_DIR (the release build to use)
set -eu -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
NT=${1:-4000}; NA=${2:-300}; S=${3:-20}
PORT=${PORT:-2531}; SPORT=${SINK_PORT:-2631}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}

(cd "$REPO" && cargo build --release --quiet -p postern \
  && cargo build --release --quiet --target wasm32-wasip2 -p compliance)
BIN=$TARGET_DIR/release/postern
WASM=$TARGET_DIR/wasm32-wasip2/release/compliance.wasm

work=$(mktemp -d /tmp/postern-bench-compliance.XXXXXX)
SINK_PID=
PID=
cleanup() {
  [ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/plugins"
cp "$WASM" "$work/plugins/"

# The 1 MB attachment message: a text body and a stored zip of random data.
python3 - "$work/attach.eml" <<'PY'
import base64, io, os, sys, zipfile
b = io.BytesIO()
with zipfile.ZipFile(b, 'w', zipfile.ZIP_STORED) as z:
    z.writestr('data.bin', os.urandom(1024 * 1024 - 200))
    z.writestr('readme.txt', 'see data.bin\n')
att = base64.encodebytes(b.getvalue()).decode()
text = ('Quarterly figures attached; nothing confidential in here. ' * 70 + '\n') * 1
with open(sys.argv[1], 'w') as f:
    f.write('From: a@corp.test\nTo: b@dest.test\nSubject: figures\nMIME-Version: 1.0\n'
            'Content-Type: multipart/mixed; boundary="m"\n\n--m\nContent-Type: text/plain\n\n'
            + text + '--m\nContent-Type: application/zip; name="data.zip"\n'
            'Content-Disposition: attachment; filename="data.zip"\nContent-Transfer-Encoding: base64\n\n'
            + att + '--m--\n')
PY

smtp-sink -u nobody "127.0.0.1:$SPORT" 2000 & SINK_PID=$!

run() { # label chain-toml n extra-smtp-source-args...
  local label=$1 chain=$2 n=$3; shift 3
  rm -rf "$work/spool"
  cat > "$work/postern.toml" <<CONF
hostname = "relay.bench.test"
[[listener]]
address = "127.0.0.1:$PORT"
[spool]
path = "spool"
[relay]
networks = ["127.0.0.0/8"]
[limits]
max_connections = 4000
max_connections_per_client = 4000
[log]
level = "warn"
[delivery]
smarthost = "smtp://127.0.0.1:$SPORT"
[plugins]
dir = "plugins"
watch = false
$chain
CONF
  (cd "$work" && exec "$BIN" serve --config postern.toml 2> "$work/postern.log") & PID=$!
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
  done
  # Warm-up: plugin instances and connections.
  smtp-source -s "$S" -m 200 -f a@corp.test -t b@dest.test "$@" "127.0.0.1:$PORT"
  local t0 t1
  t0=$(date +%s.%N)
  smtp-source -s "$S" -m "$n" -f a@corp.test -t b@dest.test "$@" "127.0.0.1:$PORT"
  t1=$(date +%s.%N)
  python3 -c "import sys; n, a, b = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]); print(f'{sys.argv[4]:<40} {n} messages in {b - a:6.2f} s: {n / (b - a):8.1f} msg/s')" "$n" "$t0" "$t1" "$label"
  if grep -E " (WARN|ERROR) " "$work/postern.log" | grep -v "plugin compiled" | tail -3 | grep .; then :; fi
  kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; PID=
}

COMPLIANCE='[[plugin]]
name = "compliance"
path = "compliance.wasm"
timeouts = { data = 5000 }
[plugin.config]
remove_headers = ["X-Internal-Route"]
rules = [
  { name = "cards", data = "cards", action = "reject" },
  { name = "ibans", data = "ibans", min_count = 3, action = "quarantine" },
  { name = "falcon", pattern = "(?i)project\\s+falcon", action = "tag" },
  { name = "executables", extensions = ["executables"], double_extensions = true, signatures = ["pe", "elf", "macho", "script", "office-macro"], action = "strip" },
  { name = "encrypted", encrypted_archives = true, action = "quarantine" },
  { name = "disclaimer", sender_domains = ["corp.test"], action = "footer", text = "Confidential." },
]'

echo "postern $(git -C "$REPO" rev-parse --short HEAD), $S sessions"
run "4 KiB text, no plugins" "" "$NT" -l 4096
run "4 KiB text, compliance" "$COMPLIANCE" "$NT" -l 4096
run "1 MB zip attachment, no plugins" "" "$NA" -F "$work/attach.eml"
run "1 MB zip attachment, compliance" "$COMPLIANCE" "$NA" -F "$work/attach.eml"
