#!/usr/bin/env bash
# The whole test suite, from a fresh checkout on a fresh machine:
#   ./test.sh
# It installs what the machine lacks (the Rust toolchain's wasm32-wasip2 target, named in
# rust-toolchain.toml), builds the holdfast binary and the policy components once, and runs
# every test (unit tests, property tests, and the end-to-end tests that drive real holdfast
# processes and real WebAssembly policies).
set -euo pipefail
cd "$(dirname "$0")"

echo "== toolchain" >&2
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install "$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)"
rustup target add wasm32-wasip2 >/dev/null

echo "== build" >&2
cargo build --workspace --all-targets --locked
# The policies (and the misbehaving components the tests need) as WebAssembly components.
(cd plugins && cargo build --locked)
(cd plugins && cargo test --locked --target "$(rustc -vV | sed -n 's/^host: //p')" -p gfs-retention)

echo "== test" >&2
cargo test --workspace --locked -- "$@"
