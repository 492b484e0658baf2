#!/usr/bin/env bash
# Builds tagger.js into a component: target/example-plugins/tagger-js.wasm,
# or the path given. The first build installs the pinned componentize-js
# (sdk/js/package-lock.json) into target/sdk-tools.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../../target/example-plugins/tagger-js.wasm}"
exec node "$here/../../../sdk/js/build.mjs" "$here/tagger.js" -o "$out"
