#!/usr/bin/env bash
# usage: host/scripts/fuzz.sh [SECONDS=60] [TARGET...]
# Runs each fuzz target of host/fuzz for SECONDS with cargo-fuzz on the stable
# toolchain (no sanitizer: `-s none`; the relay has no unsafe code, and every
# target checks its own rules, e.g. that DATA never keeps a bare CR or LF).
# Targets: command, data, bdat, config, spool_record, mime (default: all).
# The corpus grows in target/fuzz-corpus/TARGET; a crash is written to
# host/fuzz/artifacts/TARGET/ and stops the run. Found inputs, once fixed,
# are kept in host/fuzz/regressions/TARGET/ and given to every later run of
# that target as seeds, so a fix that comes undone is found again at once.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(command data bdat config spool_record mime)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in "${targets[@]}"; do
  corpus=target/fuzz-corpus/$t
  mkdir -p "$corpus"
  seeds=()
  [ -d "host/fuzz/regressions/$t" ] && seeds+=("host/fuzz/regressions/$t")
  echo "== $t for ${seconds}s"
  cargo fuzz run --fuzz-dir host/fuzz -s none "$t" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 2>&1 | grep -E "^(#[0-9]+ +DONE|Done|==|INFO: seed)|panicked|ERROR|SUMMARY" || true
  if ls "host/fuzz/artifacts/$t"/crash-* >/dev/null 2>&1; then
    echo "$t: crash inputs in host/fuzz/artifacts/$t" >&2
    exit 1
  fi
done
