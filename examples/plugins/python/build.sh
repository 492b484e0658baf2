#!/usr/bin/env bash
# Builds tagger.py into a component: target/example-plugins/tagger-py.wasm,
# or the path given. The first build installs the pinned componentize-py
# (sdk/python/requirements.txt) into target/sdk-tools.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../../target/example-plugins/tagger-py.wasm}"
exec python3 "$here/../../../sdk/python/build.py" "$here/tagger.py" -o "$out"
