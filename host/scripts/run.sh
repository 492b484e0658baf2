#!/usr/bin/env bash
# Builds the relay and runs it in the foreground with the example config
# (examples/postern.toml: SMTP on 127.0.0.1:2525 and [::1]:2525). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p postern
exec target/release/postern serve --config examples/postern.toml "$@"
