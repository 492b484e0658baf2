#!/usr/bin/env bash
# Builds the relay, the Rust example plugins and the Python and JavaScript
# taggers, then runs the relay in the foreground with
# examples/plugins/postern.toml (SMTP on 127.0.0.1:2525). The first run
# installs the SDKs' pinned toolchains into target/sdk-tools. Try:
#   swaks --server 127.0.0.1:2525 --to a@example.test --header "Subject: our newsletter"
# and find the message in target/example-local/bulk, tagged X-Postern-Class.
set -euo pipefail
cd "$(dirname "$0")/../.."
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release -p postern
cargo build --release --target wasm32-wasip2 -p blocklist -p router
mkdir -p target/example-plugins
cp target/wasm32-wasip2/release/{blocklist,router}.wasm target/example-plugins/
examples/plugins/python/build.sh
examples/plugins/js/build.sh
exec target/release/postern serve --config examples/plugins/postern.toml "$@"
