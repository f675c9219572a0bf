#!/usr/bin/env bash
# Mutation testing of the modules that carry holdfast's invariants (DESIGN.md, "Invariants"):
# cargo-mutants changes the code one small way at a time (a condition negated, a result
# replaced, an operator swapped) and checks that some test fails. A mutant no test catches is a
# gap in the tests, or an equivalent change to explain. Not part of ./test.sh: every mutant is
# a rebuild, hours in all on 2 cores.
#
#   tests/mutants.sh [FILE...]
#
# FILE...  the files to mutate (default: the invariant modules below).
# Each mutant is tested with the host's unit and property tests (cargo test -p holdfast --lib).
# The end-to-end tests are not run: they drive target/debug/holdfast, which `cargo test` in
# cargo-mutants' scratch copy does not rebuild per mutant (the command line lives in the
# binary crate), so they would test a stale binary. A mutant missed here may still be caught by
# them: check a missed one by hand (patch it in, `cargo build`, run the e2e tests that cover it).
# Results: target/mutants/mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked --version 27.1.0

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
  )
fi
args=()
for f in "${files[@]}"; do args+=(--file "$f"); done
# cargo-mutants builds in a scratch copy of the tree; one target directory kept between runs
# spares it rebuilding every dependency (wasmtime is minutes) each time.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/mutants-build}"
cargo mutants --package holdfast --test-package holdfast --output target/mutants \
  "${args[@]}" -- --lib
