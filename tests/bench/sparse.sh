#!/usr/bin/env bash
# Benchmark: sparse and very large images, and what a snapshot costs the machine.
# Release build; medians of RUNS runs.
#   - a 100 GiB sparse image holding 16 MiB: full snapshot, incremental after 1 MiB changed,
#     peak RSS of each;
#   - a 1 TiB sparse image holding 64 MiB: full snapshot, then its restore (time, peak RSS);
#   - a 2 GiB dense image (the sample mix): full snapshot time and peak RSS, and how much the
#     page cache grew ("Cached" in /proc/meminfo, after dropping it first when allowed);
#   - the 1 TiB sparse volume mirrored from a daemon to a second node over loopback TLS: the
#     first update, then one after 1 MiB changed (time, peak RSS of `mirror run`, and the
#     manifest bytes that crossed: whole, then a delta).
# Usage: tests/bench/sparse.sh      (RUNS=3; HOLDFAST_BIN to use a given binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
H=${HOLDFAST_BIN:-$PWD/target/release/holdfast}
if [ -z "${HOLDFAST_BIN:-}" ]; then cargo build --release -p holdfast --bin holdfast >&2; fi
WORK=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" holdfast-sparse-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
MIB=$((1 << 20))

# Runs holdfast; prints "seconds max-rss-kib" of that one process.
timed() {
  python3 - "$H" "$@" <<'PY'
import resource, subprocess, sys, time
t = time.monotonic()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
if r.returncode:
    sys.exit(r.returncode)
print(round(time.monotonic() - t, 3), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
PY
}
# A sparse file of $2 bytes with $3 MiB of random data spread evenly in 1 MiB pieces.
sparse() {
  python3 - "$1" "$2" "$3" <<'PY'
import os, sys
path, size, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "wb") as f:
    f.truncate(size)
    step = size // mib
    for i in range(mib):
        f.seek(i * step)
        f.write(os.urandom(1 << 20))
PY
}
cached_kib() { awk '/^Cached:/ {print $2}' /proc/meminfo; }
drop_caches() { sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
median() { python3 -c "import statistics,sys; m=statistics.median(float(x) for x in sys.argv[1:]); print(int(m) if m == int(m) else m)" "$@"; }
declare -A R
record() { R[$1]="${R[$1]:-} $2"; }

for run in $(seq "$RUNS"); do
  echo "run $run/$RUNS" >&2
  rm -rf st; export HOLDFAST_STATE=$WORK/st
  "$H" -q init >/dev/null
  sparse s100.img $((100 << 30)) 16
  "$H" -q volume add s100 --image "$WORK/s100.img"
  read -r t m < <(timed snapshot create s100 --name full); record s100_full "$t"; record s100_full_rss "$m"
  python3 -c "import os; f=open('s100.img','r+b'); f.seek(50 << 30); f.write(os.urandom(1 << 20))"
  read -r t m < <(timed snapshot create s100 --name incr); record s100_incr "$t"; record s100_incr_rss "$m"
  rm -f s100.img
  sparse s1t.img $((1 << 40)) 64
  "$H" -q volume add s1t --image "$WORK/s1t.img"
  read -r t m < <(timed snapshot create s1t --name full); record s1t_full "$t"; record s1t_full_rss "$m"
  rm -f s1t.img
  read -r t m < <(timed snapshot restore s1t@full --to "$WORK/restored.img"); record s1t_restore "$t"; record s1t_restore_rss "$m"
  rm -f restored.img
  "$H" -q sample write dense.img --size 2GiB --seed 1
  "$H" -q volume add dense --image "$WORK/dense.img"
  drop_caches; c0=$(cached_kib)
  read -r t m < <(timed snapshot create dense --name full); record dense_full "$t"; record dense_rss "$m"
  c1=$(cached_kib); record dense_cache_growth_kib "$((c1 - c0))"
  rm -f dense.img
done
# Mirroring the 1 TiB sparse volume: node a serves it, node b pulls.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$H" -q tls self-signed --cert node.crt --key node.key
(umask 077; "$H" token new > token)
cat > a.toml <<EOF
state = "$WORK/a"
[listen]
address = "127.0.0.1:$port"
tls_cert = "$WORK/node.crt"
tls_key = "$WORK/node.key"
[[downstream]]
name = "b"
token_file = "$WORK/token"
volumes = ["s1t"]
EOF
cat > b.toml <<EOF
state = "$WORK/b"
[[upstream]]
name = "a"
url = "https://127.0.0.1:$port"
token_file = "$WORK/token"
ca = "$WORK/node.crt"
[[mirror]]
volume = "s1t"
upstream = "a"
every = "1h"
EOF
for run in $(seq "$RUNS"); do
  echo "mirror run $run/$RUNS" >&2
  rm -rf a b
  "$H" -q --state a init --node-id a >/dev/null; "$H" -q --state b init --node-id b >/dev/null
  sparse s1t.img $((1 << 40)) 64
  "$H" -q --state a volume add s1t --image "$WORK/s1t.img"
  "$H" -q --state a snapshot create s1t --name one >/dev/null
  "$H" daemon --config a.toml 2>a.log & DAEMON=$!
  for _ in $(seq 100); do "$H" -q --state a status --json >/dev/null 2>&1 && break; sleep 0.1; done
  mirror() {
    python3 - "$H" -q --state b mirror run s1t --config b.toml --json <<'PY2'
import json, resource, subprocess, sys, time
t = time.monotonic()
r = subprocess.run(sys.argv[1:], capture_output=True)
if r.returncode:
    sys.stderr.write(r.stderr.decode()); sys.exit(r.returncode)
d = json.loads(r.stdout)
print(round(time.monotonic() - t, 3), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
      d["manifest-bytes-fetched"], d["kind"])
PY2
  }
  read -r t m mb kind < <(mirror); record mirror_full "$t"; record mirror_full_rss "$m"; record mirror_full_manifest "$mb"
  python3 -c "import os; f=open('s1t.img','r+b'); f.seek(300 << 30); f.write(os.urandom(1 << 20))"
  "$H" -q --state a snapshot create s1t --name two >/dev/null
  read -r t m mb kind < <(mirror); record mirror_incr "$t"; record mirror_incr_rss "$m"; record mirror_incr_manifest "$mb"
  [ "$kind" = incremental ] || { echo "the second mirror update was $kind" >&2; exit 1; }
  kill "$DAEMON"; wait "$DAEMON" 2>/dev/null || true
  rm -f s1t.img
done
m() { median ${R[$1]}; }
printf '\n%-52s %12s\n' "median of $RUNS" value
printf '%-52s %12s s\n' "100 GiB sparse, 16 MiB data: full snapshot" "$(m s100_full)"
printf '%-52s %12s s\n' "same, incremental after 1 MiB of change" "$(m s100_incr)"
printf '%-52s %12s s\n' "1 TiB sparse, 64 MiB data: full snapshot" "$(m s1t_full)"
printf '%-52s %12s s\n' "1 TiB sparse, 64 MiB data: restore" "$(m s1t_restore)"
printf '%-52s %12s MiB\n' "  its peak RSS" "$(python3 -c "print(round($(m s1t_restore_rss)/1024))")"
printf '%-52s %12s MiB\n' "peak RSS, 100 GiB sparse full snapshot" "$(python3 -c "print(round($(m s100_full_rss)/1024))")"
printf '%-52s %12s MiB\n' "peak RSS, 1 TiB sparse full snapshot" "$(python3 -c "print(round($(m s1t_full_rss)/1024))")"
printf '%-52s %12s MiB\n' "peak RSS, 2 GiB dense full snapshot" "$(python3 -c "print(round($(m dense_rss)/1024))")"
printf '%-52s %12s s\n' "2 GiB dense full snapshot" "$(m dense_full)"
printf '%-52s %12s MiB (of 2048)\n' "page cache growth, 2 GiB dense snapshot" "$(python3 -c "print(round($(m dense_cache_growth_kib)/1024))")"
printf '%-52s %12s s\n' "1 TiB sparse: first mirror update" "$(m mirror_full)"
printf '%-52s %12s MiB\n' "  its peak RSS" "$(python3 -c "print(round($(m mirror_full_rss)/1024))")"
printf '%-52s %12s bytes\n' "  manifest bytes received (whole)" "$(m mirror_full_manifest)"
printf '%-52s %12s s\n' "1 TiB sparse: mirror update after 1 MiB changed" "$(m mirror_incr)"
printf '%-52s %12s MiB\n' "  its peak RSS" "$(python3 -c "print(round($(m mirror_incr_rss)/1024))")"
printf '%-52s %12s bytes\n' "  manifest bytes received (delta)" "$(m mirror_incr_manifest)"
