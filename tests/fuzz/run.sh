#!/usr/bin/env bash
# Runs the fuzzers (host/src/fuzz.rs says what each target feeds and checks):
#   tests/fuzz/run.sh                       every target for 5 seconds (what ./test.sh runs)
#   tests/fuzz/run.sh 3600 manifest pack    those targets for an hour each
#   tests/fuzz/run.sh 0                     build only
# It installs what it needs: a nightly toolchain (libFuzzer's instrumentation) and cargo-fuzz.
# Each target starts from its committed corpus (tests/fuzz/corpus/TARGET, read only) and
# writes what it finds under target/fuzz/corpus/TARGET; a failing input is saved under
# target/fuzz/artifacts/TARGET/ and the script exits non-zero, printing how to replay it.
# To keep what a long run found: tests/fuzz/run.sh --merge TARGET (minimised into the
# committed corpus).
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
out="$root/target/fuzz"

rustup run nightly rustc -V >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked --version 0.13.2
fuzz=(cargo +nightly fuzz)
# No sanitizer: the crate forbids unsafe code, and src/lib.rs caps every allocation instead.
opts=(--fuzz-dir . --sanitizer none --target-dir "$out")

merge=0
if [ "${1:-}" = --merge ]; then merge=1; shift; secs=0; else secs=${1:-5}; shift || true; fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir .)

"${fuzz[@]}" build "${opts[@]}"
[ "$secs" != 0 ] || [ $merge = 1 ] || exit 0

status=0
for t in "${targets[@]}"; do
  mkdir -p "$out/corpus/$t" "$out/artifacts/$t" "corpus/$t"
  if [ $merge = 1 ]; then
    # Keeps only inputs that add coverage, from both the committed and the found corpus.
    "${fuzz[@]}" run "${opts[@]}" "$t" "corpus/$t" "$out/corpus/$t" -- -merge=1 \
      -rss_limit_mb=2048 2>&1 | tail -2
    continue
  fi
  echo "== fuzz $t (${secs}s)" >&2
  # -max_len: bigger than any seed; -timeout: one input taking over 10 s is a hang.
  if ! "${fuzz[@]}" run "${opts[@]}" "$t" "$out/corpus/$t" "corpus/$t" -- \
      -max_total_time="$secs" -max_len=262144 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$out/artifacts/$t/" -print_final_stats=1 >"$out/$t.log" 2>&1; then
    status=1
    tail -40 "$out/$t.log" >&2
    echo "fuzz target $t failed; replay: tests/fuzz/run.sh is not needed, run" >&2
    echo "  (cd tests/fuzz && ${fuzz[*]} run ${opts[*]} $t $out/artifacts/$t/<crash file>)" >&2
  else
    grep -E "stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb" "$out/$t.log" \
      | tr '\n' ' ' | sed "s/^/   /" >&2
    echo >&2
  fi
done
exit $status
