#!/usr/bin/env bash
# The whole test suite, from a fresh checkout on a fresh machine:
#   ./test.sh
# It installs what the machine lacks (the Rust toolchain's wasm32-wasip2 target, named in
# rust-toolchain.toml), builds the holdfast binary and the policy components once, and runs
# every test (unit tests, property tests, and the end-to-end tests that drive real holdfast
# processes, real WebAssembly policies, real daemons on 127.0.0.1 and a real S3-compatible
# server, moto, installed from PyPI into target/moto-venv), and real NBD servers and QEMU tools
# (qemu-nbd, qemu-img, qemu-io, qemu-storage-daemon, nbdkit, nbdinfo, nbdcopy, and openssl
# for the TLS test's certificates; binutils and man-db for the test that builds, installs and
# purges the Debian package; restic for the backup application example; headless Chromium and
# chromedriver for the web page's browser test: Debian packages, installed with apt-get when
# missing). The policies in Python and JavaScript are built with
# tools from PyPI and npm (plugins/build-py-js.sh; Node.js itself comes from PyPI when the
# machine has no node 20 or newer).
set -euo pipefail
cd "$(dirname "$0")"

echo "== toolchain" >&2
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install "$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)"
rustup target add wasm32-wasip2 >/dev/null

echo "== S3-compatible test server (moto, into target/moto-venv)" >&2
if ! target/moto-venv/bin/python -c 'import moto, boto3' 2>/dev/null \
  || ! cmp -s tests/s3/requirements.txt target/moto-venv/requirements.txt; then
  rm -rf target/moto-venv
  python3 -m venv target/moto-venv
  target/moto-venv/bin/pip install --quiet --disable-pip-version-check -r tests/s3/requirements.txt
  cp tests/s3/requirements.txt target/moto-venv/requirements.txt
fi

echo "== QEMU and NBD tools, restic, fincore, Chromium (Debian packages)" >&2
missing=()
for tool in qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils \
  nbdkit:nbdkit nbdinfo:libnbd-bin \
  nbdcopy:libnbd-bin openssl:openssl sgdisk:gdisk strip:binutils objdump:binutils \
  man:man-db restic:restic fincore:util-linux-extra chromium:chromium \
  chromedriver:chromium-driver; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
# qemu-storage-daemon: part of qemu-utils from QEMU 8 on (the backports' 10.0 that apt picks);
# with Debian 12's own 7.2 it is in qemu-system-common, which conflicts with qemu-utils 10.
if ! command -v qemu-storage-daemon >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  [ ${#missing[@]} -gt 0 ] || $sudo apt-get update -qq
  $sudo apt-get install -y -qq qemu-system-common >/dev/null
fi

echo "== build" >&2
cargo build --workspace --all-targets --locked
# The policies (and the misbehaving components the tests need) as WebAssembly components.
# --target-dir: the tests look for them in plugins/target, whatever CARGO_TARGET_DIR says.
(cd plugins && cargo build --locked --target-dir target)
(cd plugins && cargo test --locked --target "$(rustc -vV | sed -n 's/^host: //p')" -p holdfast-policy -p gfs-retention)
# The policies written in Python (componentize-py, from PyPI) and JavaScript (componentize-js,
# from npm), into the same folder.
plugins/build-py-js.sh

echo "== test" >&2
rm -f target/test-skips.txt
status=0
cargo test --workspace --locked -- "$@" || status=$?
# The fuzzers, a few seconds per target, from their committed corpora (tests/fuzz/run.sh
# installs a nightly toolchain and cargo-fuzz; a long run is `tests/fuzz/run.sh 3600 TARGET`).
# Skipped when the tests were filtered.
if [ $# -eq 0 ]; then
  echo "== fuzz (tests/fuzz/run.sh)" >&2
  tests/fuzz/run.sh 5 || status=$?
fi
# Tests that could not run on this machine say so here (cargo hides a passing test's output).
if [ -s target/test-skips.txt ]; then
  echo "== skipped here (see each reason)" >&2
  sort -u target/test-skips.txt >&2
fi
exit $status
