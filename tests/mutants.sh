#!/usr/bin/env bash
# Mutation testing of the modules that carry holdfast's invariants (DESIGN.md, "Invariants"):
# cargo-mutants changes the code one small way at a time (a condition negated, a result
# replaced, an operator swapped) and checks that some test fails. A mutant no test catches is a
# gap in the tests, or an equivalent change to explain. Not part of ./test.sh: every mutant is
# a rebuild, hours in all on 2 cores.
#
#   tests/mutants.sh [--unit-only | --resume] [--re REGEX] [--exclude-re REGEX] [FILE...]
#
# FILE...  the files to mutate (default: every invariant module below), one run per file.
# --re     only the mutants whose name matches REGEX (cargo-mutants' --re), for example the
#          functions of one step: --re 'verify_frames|Receive<.*>::store'. The default runs of
#          some files have one (FOCUS below).
# --exclude-re  leave out the mutants whose name matches REGEX, for example the rest of a
#          file after its focus: --exclude-re "$(the FOCUS regex)".
#
# Two passes per file, in target/mutants/<file>/:
#  1. every mutant against the host's unit and property tests (cargo test -p holdfast --lib),
#     about 20 s a mutant; cargo-mutants' results in unit.out/ (caught.txt, missed.txt,
#     timeout.txt, unviable.txt, outcomes.json, diff/);
#  2. (unless --unit-only) each mutant pass 1 missed or timed out, against the end-to-end tests
#     that drive that module (E2E below), in a scratch copy of the tree; they run
#     `holdfast-mutant`, the holdfast program the tests package builds (its `mutants` feature)
#     from the mutated library, so each mutant is a real holdfast process on real state
#     directories, peers and a real S3 server; a few minutes a mutant. Results in e2e.txt.
# --resume skips pass 1 for a file that has its results, and in pass 2 the mutants e2e.txt
# already judges. A MISSED line left in e2e.txt is a gap
# in the tests or an equivalent mutant, to be explained.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked --version 27.1.0

unit_only=0 resume=0 re= exclude_re=
while [ $# -gt 0 ]; do
  case "$1" in
    --unit-only) unit_only=1; shift ;;
    --resume) resume=1; shift ;;
    --re) re=${2:?--re needs a regular expression}; shift 2 ;;
    --exclude-re) exclude_re=${2:?--exclude-re needs a regular expression}; shift 2 ;;
    -*) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    *) break ;;
  esac
done

# The end-to-end tests (name filters of the e2e test binary) that exercise each module.
declare -A E2E=(
  [host/src/chunk.rs]="corruption:: snapshots::"
  [host/src/softlock.rs]="locks:: policies::a_refused_deletion"
  [host/src/softlock/registry.rs]="locks:: mirror::offline_downstream"
  [host/src/snapshot/gc.rs]="snapshots::delete_then_gc snapshots::two_gcs crash::killing_delete_and_gc crash::gc_after corruption::a_lost_index corruption::a_corrupt_manifest locks::delete_prune_and_gc soak::"
  [host/src/snapshot/create.rs]="live:: snapshots:: sparse:: crash::killing_snapshot"
  [host/src/mirror.rs]="mirror:: corruption:: hostile::"
  [host/src/target/locks.rs]="targets::target_locks targets::a_lease targets::concurrent target_gc::"
  [host/src/target/gc.rs]="target_gc:: targets::concurrent targets::a_lease"
  [host/src/target/pending.rs]="target_gc:: targets::interrupted targets::concurrent"
)
# The parts of a large file that carry its invariants, when no --re is given: mirror.rs's
# receive step (the listing's checks, the manifest, verification and storage of what arrives)
# and its deletion step.
declare -A FOCUS=(
  [host/src/mirror.rs]="check_listing|full_manifest|Receive<'_>::(manifest|store)|verify_frames|look_up|seal|Received::candidates|Update<'_>::apply_deletions"
)
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  files=(
    host/src/chunk.rs                 # invariant 5: a chunk is its hash
    host/src/softlock.rs              # invariant 2: no deletion of a locked snapshot
    host/src/softlock/registry.rs
    host/src/snapshot/gc.rs           # invariants 1, 2: gc keeps what anything references or locks
    host/src/snapshot/create.rs       # invariant 1: a snapshot is committed whole or not at all
    host/src/mirror.rs                # invariants 3-5: transfers verified, locks before fetches
    host/src/target/locks.rs          # locks and leases in a bucket
    host/src/target/gc.rs
    host/src/target/pending.rs        # a push is committed whole or not at all
  )
fi

# cargo-mutants builds in a scratch copy of the tree (tracked files only); one target directory
# kept between runs spares it rebuilding every dependency (wasmtime is minutes) each time. The
# tests find what the copy lacks (the built policies, the S3 server's environment) here.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/mutants-build}"
export HOLDFAST_PLUGINS="$root/plugins/target/wasm32-wasip2/debug"
export HOLDFAST_MOTO_VENV="$root/target/moto-venv"
[ -d "$HOLDFAST_PLUGINS" ] && [ -x "$HOLDFAST_MOTO_VENV/bin/python" ] \
  || { echo "run ./test.sh once first: it builds the policies and installs the S3 server" >&2; exit 2; }

# Pass 2. cargo-mutants 27.1 runs only the mutated package's tests when --file is given
# (--test-package is ignored), so this pass applies each missed mutant's diff (from pass 1's
# diff/ folder) to a scratch copy of the tree itself and runs the named end-to-end tests there.
# Results: e2e.txt (CAUGHT or MISSED, and the mutant) next to unit.out/.
e2e_pass() {
  local out=$1 filters=$2 scratch="$root/target/mutants/scratch"
  rm -rf "$scratch" && mkdir -p "$scratch"
  git ls-files -z | xargs -0 cp --parents -t "$scratch"
  # --resume keeps the mutants already judged (a pass is hours for a large file).
  [ "$resume" = 1 ] && [ -f "$out/e2e.txt" ] || : >"$out/e2e.txt"
  python3 - "$out/unit.out/outcomes.json" <<'PY' >"$out/e2e-todo.txt"
import json, sys
# The missed first: a timed-out mutant is an endless loop that a test's deadline caught far
# more often than a slow mutant that would have passed, and judging one costs a deadline.
todo = [o for o in json.load(open(sys.argv[1]))["outcomes"]
        if o.get("summary") in ("MissedMutant", "Timeout") and "Mutant" in o["scenario"]]
for o in sorted(todo, key=lambda o: o["summary"] != "MissedMutant"):
    m = o["scenario"]["Mutant"]
    print(o["diff_path"] + "\t" + m["file"] + "\t" + m["name"])
PY
  mkdir -p "$out/e2e-logs"
  # shellcheck disable=SC2086 # the filters are words
  # One filter at a time, stopping at the first that fails: a caught mutant costs only the
  # tests up to the group that catches it (the groups in E2E come most telling first).
  run_e2e() {
    (cd "$scratch" && cargo test -q -p holdfast-tests --features mutants --test e2e --no-run) \
      || return 1
    local f
    for f in $filters; do
      (cd "$scratch" && timeout 1800 cargo test -q -p holdfast-tests --features mutants \
        --test e2e -- "$f") || return 1
    done
  }
  # The unmutated tree must pass, or every mutant would look caught.
  if ! run_e2e >"$out/e2e-logs/baseline.log" 2>&1; then
    echo "the end-to-end tests fail on the unmutated tree: see $out/e2e-logs/baseline.log" >&2
    return 1
  fi
  local n=0
  while IFS=$'\t' read -r diff file name; do
    n=$((n + 1))
    if grep -qF "  $name" "$out/e2e.txt"; then continue; fi
    (cd "$scratch" && patch -s -p0 "$file" <"$root/$out/unit.out/$diff")
    if run_e2e >"$out/e2e-logs/$n.log" 2>&1; then
      echo "MISSED  $name" | tee -a "$out/e2e.txt" >&2
    # A test that fails says so in its summary, a panic, or (under -q, when the group is cut
    # by the 30-minute timeout before its summary) a "NAME --- FAILED" line.
    elif grep -q "^test result: FAILED\|panicked\| --- FAILED$" "$out/e2e-logs/$n.log"; then
      echo "CAUGHT  $name" | tee -a "$out/e2e.txt" >&2
    else
      echo "ERROR   $name (no test failed: see $out/e2e-logs/$n.log)" | tee -a "$out/e2e.txt" >&2
    fi
    (cd "$scratch" && patch -s -R -p0 "$file" <"$root/$out/unit.out/$diff")
  done <"$out/e2e-todo.txt"
}

for f in "${files[@]}"; do
  out="target/mutants/${f//\//_}"
  mkdir -p "$out"
  if [ "$resume" = 0 ] || [ ! -d "$out/unit.out" ]; then
    echo "== $f: unit tests" >&2
    focus=${re:-${FOCUS[$f]:-}}
    # (With --exclude-re, no default focus: the run is what the exclusion leaves.)
    [ -n "$exclude_re" ] && [ -z "$re" ] && focus=
    cargo mutants --package holdfast --test-package holdfast --output "$out" --file "$f" \
      ${focus:+--re "$focus"} ${exclude_re:+--exclude-re "$exclude_re"} -- --lib || true
    rm -rf "$out/unit.out" && mv "$out/mutants.out" "$out/unit.out"
  fi
  [ "$unit_only" = 1 ] && continue
  filters=${E2E[$f]:-}
  if [ -z "$filters" ]; then echo "no end-to-end tests named for $f in tests/mutants.sh" >&2; continue; fi
  echo "== $f: end-to-end tests for what the unit tests missed ($filters)" >&2
  e2e_pass "$out" "$filters"
done
count() { cat "$@" 2>/dev/null | sort -u | wc -l; }
echo "file: unit tests alone (caught/missed/timeout/unviable); the missed ones with the end-to-end tests (caught/missed)" >&2
for f in "${files[@]}"; do
  o="target/mutants/${f//\//_}"; u="$o/unit.out"
  printf '%-32s %3s/%3s/%3s/%3s  e2e %3s/%3s\n' "$f" \
    "$(count "$u/caught.txt")" "$(count "$u/missed.txt")" "$(count "$u/timeout.txt")" \
    "$(count "$u/unviable.txt")" "$(grep -c ^CAUGHT "$o/e2e.txt" 2>/dev/null || echo -)" \
    "$(grep -c ^MISSED "$o/e2e.txt" 2>/dev/null || echo -)"
done
