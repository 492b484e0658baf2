#!/usr/bin/env bash
# Builds the relay and the example plugins, then runs the relay in the
# foreground with the example config (examples/postern.toml: SMTP on
# 127.0.0.1:2525 and [::1]:2525, the blocklist and router plugins in the hook
# chain). The plugins are copied to target/example-plugins, the folder the relay
# watches: copy a new .wasm there and new sessions use it. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/../.."
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release -p postern
cargo build --release --target wasm32-wasip2 -p blocklist -p router -p archive
mkdir -p target/example-plugins
cp target/wasm32-wasip2/release/{blocklist,router,archive}.wasm target/example-plugins/
exec target/release/postern serve --config examples/postern.toml "$@"
