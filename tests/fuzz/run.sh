#!/usr/bin/env bash
# Runs the fuzzers (host/src/fuzz.rs says what each target feeds and checks):
#   tests/fuzz/run.sh                       every target for 5 seconds (what ./test.sh runs)
#   tests/fuzz/run.sh 3600 manifest pack    those targets for an hour each
#   tests/fuzz/run.sh 0                     build only
# It installs what it needs: a nightly toolchain (libFuzzer's instrumentation) and cargo-fuzz.
# Each target starts from its committed corpus (tests/fuzz/corpus/TARGET, read only) and
# writes what it finds under target/fuzz/corpus/TARGET; a failing input is saved under
# target/fuzz/artifacts/TARGET/ and the script exits non-zero, printing how to replay it.
# To keep what a long run found: tests/fuzz/run.sh --merge [TARGET...] (the committed corpus
# is replaced by a smallest set with all the coverage of both, seeds and past failures kept).
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
out="$root/target/fuzz"

rustup run nightly rustc -V >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked --version 0.13.2
fuzz=(cargo +nightly fuzz)
# No sanitizer: the crate forbids unsafe code, and src/lib.rs caps every allocation instead.
opts=(--fuzz-dir . --sanitizer none --target-dir "$out")

usage="usage: tests/fuzz/run.sh [SECONDS [TARGET...]] | --merge [TARGET...]"
merge=0
if [ "${1:-}" = --merge ]; then merge=1; shift; secs=0; else secs=${1:-5}; shift || true; fi
if ! [[ $secs =~ ^[0-9]+$ ]]; then echo "$usage (not a number of seconds: $secs)" >&2; exit 2; fi
mapfile -t known < <("${fuzz[@]}" list --fuzz-dir .)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${known[@]}")
for t in "${targets[@]}"; do
  if ! printf '%s\n' "${known[@]}" | grep -qx -- "$t"; then
    echo "$usage (no target $t; the targets: ${known[*]})" >&2; exit 2
  fi
done

"${fuzz[@]}" build "${opts[@]}"
[ "$secs" != 0 ] || [ $merge = 1 ] || exit 0

status=0
for t in "${targets[@]}"; do
  mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
  if [ $merge = 1 ]; then
    # A smallest set of inputs with all the coverage of the committed and the found corpus
    # (set cover), plus the seeds and the inputs that once failed, which are always kept.
    fresh="$out/merge/$t"; rm -rf "$fresh"; mkdir -p "$fresh"
    cp corpus/"$t"/seed-* corpus/"$t"/crash-* "$fresh"/ 2>/dev/null || true
    "${fuzz[@]}" run "${opts[@]}" "$t" "$fresh" "corpus/$t" "$out/corpus/$t" -- \
      -set_cover_merge=1 -rss_limit_mb=2048 2>&1 | tail -1
    rm -rf "corpus/$t"; cp -r "$fresh" "corpus/$t"
    echo "corpus/$t: $(ls "corpus/$t" | wc -l) inputs" >&2
    continue
  fi
  echo "== fuzz $t (${secs}s)" >&2
  # -max_len: bigger than any seed; -timeout: one input taking over 10 s is a hang.
  if ! "${fuzz[@]}" run "${opts[@]}" "$t" "$out/corpus/$t" "corpus/$t" -- \
      -max_total_time="$secs" -max_len=262144 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$out/artifacts/$t/" -print_final_stats=1 >"$out/$t.log" 2>&1; then
    status=1
    tail -40 "$out/$t.log" >&2
    echo "fuzz target $t failed on the input saved in $out/artifacts/$t/; replay it with" >&2
    echo "  (cd tests/fuzz && ${fuzz[*]} run ${opts[*]} $t $out/artifacts/$t/FILE)" >&2
    echo "and keep it as a regression test: copy it to tests/fuzz/corpus/$t/crash-NAME" >&2
  else
    grep -E "stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb" "$out/$t.log" \
      | tr '\n' ' ' | sed "s/^/   /" >&2
    echo >&2
  fi
done
exit $status
