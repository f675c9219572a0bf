#!/usr/bin/env bash
# Mutation testing of the modules that carry holdfast's invariants (DESIGN.md, "Invariants"):
# cargo-mutants changes the code one small way at a time (a condition negated, a result
# replaced, an operator swapped) and checks that some test fails. A mutant no test catches is a
# gap in the tests, or an equivalent change to explain. Not part of ./test.sh: every mutant is
# a rebuild, hours in all on 2 cores.
#
#   tests/mutants.sh [--unit-only] [FILE...]
#
# FILE...  the files to mutate (default: every invariant module below), one run per file.
#
# Two passes per file, results accumulated in target/mutants/<file>/mutants.out/ (caught.txt,
# missed.txt, timeout.txt, unviable.txt, outcomes.json):
#  1. every mutant against the host's unit and property tests (cargo test -p holdfast --lib),
#     about 25 s a mutant;
#  2. (unless --unit-only) only the mutants pass 1 missed or timed out (cargo-mutants
#     --iterate), against the end-to-end tests that drive that module (E2E below). They run
#     `holdfast-mutant`, the same program built by the tests package (its `mutants` feature)
#     from the mutated library, so every mutant is a real holdfast process on real state
#     directories, peers and a real S3 server; a few minutes a mutant.
# What is left in missed.txt after both passes is a gap in the tests or an equivalent mutant.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked --version 27.1.0

unit_only=0
if [ "${1:-}" = "--unit-only" ]; then unit_only=1; shift; fi

# The end-to-end tests (name filters of the e2e test binary) that exercise each module.
declare -A E2E=(
  [host/src/chunk.rs]="corruption:: snapshots::"
  [host/src/softlock.rs]="locks:: policies::a_refused_deletion"
  [host/src/softlock/registry.rs]="locks:: mirror::offline_downstream"
  [host/src/snapshot/gc.rs]="snapshots::delete_then_gc snapshots::two_gcs crash:: corruption::a_lost_index corruption::a_corrupt_manifest locks::delete_prune_and_gc"
  [host/src/snapshot/create.rs]="snapshots:: crash::killing_snapshot sparse::"
  [host/src/mirror.rs]="mirror:: corruption:: hostile::"
  [host/src/target/locks.rs]="targets::target_locks targets::a_lease targets::concurrent target_gc::"
  [host/src/target/gc.rs]="target_gc:: targets::concurrent targets::a_lease"
  [host/src/target/pending.rs]="target_gc:: targets::interrupted targets::concurrent"
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

for f in "${files[@]}"; do
  out="target/mutants/${f//\//_}"
  mkdir -p "$out"
  echo "== $f: unit tests" >&2
  cargo mutants --package holdfast --test-package holdfast --output "$out" --file "$f" \
    -- --lib || true
  rm -rf "$out/unit.out" && cp -r "$out/mutants.out" "$out/unit.out"  # pass 1 alone, kept
  [ "$unit_only" = 1 ] && continue
  filters=${E2E[$f]:-}
  if [ -z "$filters" ]; then echo "no end-to-end tests named for $f in tests/mutants.sh" >&2; continue; fi
  echo "== $f: end-to-end tests for what the unit tests missed ($filters)" >&2
  # shellcheck disable=SC2086 # the filters are words
  cargo mutants --iterate --package holdfast --test-package holdfast-tests \
    --features holdfast-tests/mutants --cargo-test-arg=--test=e2e --output "$out" --file "$f" \
    -- $filters || true
done
count() { cat "$@" 2>/dev/null | sort -u | wc -l; }
echo "file: unit tests alone (caught/missed/timeout/unviable) -> with the end-to-end tests" >&2
for f in "${files[@]}"; do
  u="target/mutants/${f//\//_}/unit.out"; d="target/mutants/${f//\//_}/mutants.out"
  printf '%-32s %3s/%3s/%3s/%3s -> caught %3s missed %3s timeout %3s\n' "$f" \
    "$(count "$u/caught.txt")" "$(count "$u/missed.txt")" "$(count "$u/timeout.txt")" \
    "$(count "$u/unviable.txt")" \
    "$(count "$d/caught.txt" "$d/previously_caught.txt" | awk -v v="$(count "$u/unviable.txt")" '{print $1 - v}')" \
    "$(count "$d/missed.txt")" "$(count "$d/timeout.txt")"
done
