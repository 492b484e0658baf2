#!/usr/bin/env bash
# Runs the whole test suite. Installs first what the tests use: Debian's swaks
# and postfix (for smtp-source/smtp-sink) as real peers, redis-server for the
# shared kv store, Python for smtplib clients, openssl, curl for the admin
# API, prometheus for promtool (which checks the /metrics page), haproxy in
# front of the relay for the PROXY protocol, chromium (headless) to load the
# status page, the wasm32-wasip2 target for the plugins, and pyspf and dkimpy
# from PyPI. The Python and JavaScript SDKs' pinned toolchains
# (componentize-py from PyPI, componentize-js from npm) are installed once
# into target/sdk-tools, and the example plugins in those languages are built
# beside the Rust build; both are skipped when their inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/../.."

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v swaks >/dev/null || missing+=(swaks)
command -v smtp-source >/dev/null || missing+=(postfix)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v python3 >/dev/null || missing+=(python3)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
command -v promtool >/dev/null || missing+=(prometheus)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v nmap >/dev/null || missing+=(nmap)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
# Independent checkers of SPF, DKIM and ARC (PyPI): pyspf, dkimpy with
# authres (ARC) and PyNaCl (Ed25519), over dnspython.
if ! python3 -c "import spf, dkim, dns.resolver, authres, nacl" 2>/dev/null; then
  echo "installing pyspf dkimpy dnspython authres pynacl" >&2
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-pip >/dev/null
  fi
  python3 -m pip install -q pyspf==2.0.14 dkimpy==1.1.8 dnspython==2.9.2 authres==1.2.0 pynacl==1.6.2 2>/dev/null \
    || python3 -m pip install -q --break-system-packages pyspf==2.0.14 dkimpy==1.1.8 dnspython==2.9.2 authres==1.2.0 pynacl==1.6.2
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The Python and JavaScript plugins the tests load (host/tests/it/support/
# lang.rs finds them up to date), built while cargo compiles.
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target/lang-plugins"
examples/plugins/python/build.sh "$target/lang-plugins/tagger-py.wasm" > "$target/lang-plugins/python.log" 2>&1 &
py=$!
examples/plugins/js/build.sh "$target/lang-plugins/tagger-js.wasm" > "$target/lang-plugins/js.log" 2>&1 &
js=$!
node sdk/js/build.mjs host/tests/fixtures/plugins/hoard-js/hoard.js -o "$target/lang-plugins/hoard-js.wasm" > "$target/lang-plugins/hoard.log" 2>&1 &
hoard=$!
cargo test --workspace --no-run
for job in "$py:python" "$js:js" "$hoard:hoard"; do
  if ! wait "${job%%:*}"; then
    # The tests build it again and fail with the reason; show it here too.
    echo "building the ${job#*:} plugin failed:" >&2
    cat "$target/lang-plugins/${job#*:}.log" >&2
  fi
done
# The relay, the SDK and every first-party plugin's own tests.
cargo test --workspace "$@" 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary, and the
# last of them is the doc tests').
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  END { printf "Total: %d passed, %d failed\n", p, f }' "$log"
