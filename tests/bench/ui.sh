#!/usr/bin/env bash
# Benchmark: the web page on a large node (issue: a web page for the cascade). A daemon with
# 100 volumes, one of them with 10,000 snapshots and 100,000 locks (ten holders locking every
# snapshot); headless Chromium logs in and measures, from inside the page, the median of five
# answers of each API route, and the volume page's time to fetch and draw (and from the start
# of loading to drawn) over five fresh loads. Release build of holdfast; the test binary is the
# suite's (ui::a_large_node_answers_and_renders, ignored in ./test.sh).
# Usage: tests/bench/ui.sh   (HOLDFAST_UI_SNAPSHOTS, HOLDFAST_UI_VOLUMES to change the scale;
#                             HOLDFAST_BIN to use a given binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${HOLDFAST_BIN:-}" ]; then
  cargo build --release -p holdfast --bin holdfast >&2
  export HOLDFAST_BIN=$PWD/target/release/holdfast
fi
command -v chromedriver >/dev/null || {
  echo "needs Debian's chromium and chromium-driver (./test.sh installs them)" >&2
  exit 2
}
cargo test -p holdfast-tests --test e2e --locked -- --ignored --exact \
  ui::a_large_node_answers_and_renders --nocapture 2>&1 |
  grep -E '^(made|node of|volume page|test result|thread|SKIPPED)' 
