#!/usr/bin/env bash
# Builds the relay and the first-party plugins, then runs the relay in the
# foreground with a config from examples/ (default examples/postern.toml:
# SMTP on 127.0.0.1:2525 and [::1]:2525, the blocklist and router plugins in
# the hook chain):
#
#   ./host/scripts/run.sh                               # examples/postern.toml
#   ./host/scripts/run.sh examples/gateway.toml         # any other example
#   ./host/scripts/run.sh examples/postern.toml --log-format json
#
# The plugins are copied to target/example-plugins, the folder the examples
# watch: copy a new .wasm there and new sessions use it. The examples that
# speak TLS or sign with DKIM find a self-signed certificate and a DKIM key in
# target/example-tls, made here the first time. Ctrl-C stops the relay.
set -euo pipefail
cd "$(dirname "$0")/../.."
config=examples/postern.toml
if [ $# -gt 0 ] && [[ "$1" == *.toml ]]; then
  config=$1
  shift
fi
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
plugins=(blocklist router archive forward ratelimit access)
cargo build --release -p postern
packages=()
for p in "${plugins[@]}"; do packages+=(-p "$p"); done
cargo build --release --target wasm32-wasip2 "${packages[@]}"
mkdir -p target/example-plugins
for p in "${plugins[@]}"; do
  cp "target/wasm32-wasip2/release/$p.wasm" target/example-plugins/
done
tls=target/example-tls
mkdir -p "$tls"
if [ ! -f "$tls/cert.pem" ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
    -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null
  chmod 600 "$tls/key.pem"
fi
if [ ! -f "$tls/dkim-example.test.pem" ]; then
  # Prints the TXT record to publish at app._domainkey.example.test.
  target/release/postern dkim keygen --domain example.test --selector app \
    --out "$tls/dkim-example.test.pem" >"$tls/dkim-example.test.txt"
fi
exec target/release/postern serve --config "$config" "$@"
