#!/usr/bin/env bash
# Region mirror benchmark over loopback, release build, medians of RUNS runs:
#   - region: partition 2 (REGION, default 1 GiB of mixed data) of a GPT disk image of DISK
#     (default 8 GiB, sparse: the rest is holes and a small partition 1) mirrored A -> B with
#     `region = "data"`; 1 % of the region's 64 KiB blocks rewritten before each timed update;
#   - whole volume: a volume of REGION's size with the same data, mirrored whole, with the
#     same number of blocks rewritten.
# Goal (issue: region mirroring): update time and bytes on the wire of the region mirror within
# 1.2x of the whole-volume mirror. Dirty pages are flushed (sync) before each timed update.
# Usage: tests/bench/regions.sh            (DISK=8GiB REGION=1GiB RUNS=5)
set -euo pipefail
cd "$(dirname "$0")/../.."
DISK=${DISK:-8GiB}
REGION=${REGION:-1GiB}
RUNS=${RUNS:-5}
H=${HOLDFAST_BIN:-$PWD/target/release/holdfast}
if [ -z "${HOLDFAST_BIN:-}" ]; then cargo build --release -p holdfast >&2; fi
command -v sgdisk >/dev/null || { echo "sgdisk is missing (Debian package gdisk)" >&2; exit 1; }
WORK=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" holdfast-regions-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
cd "$WORK"
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }
median() { python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
bytes() { python3 -c "
s='$1'; u={'KiB':1<<10,'MiB':1<<20,'GiB':1<<30}
print(next(int(float(s[:-3])*v) for k,v in u.items() if s.endswith(k)))"; }
now() { date +%s.%N; }
# rewrite IMAGE OFFSET LENGTH SEED: 1 % of the 64 KiB blocks in OFFSET..OFFSET+LENGTH get
# fresh random bytes (the same blocks, relative to OFFSET, for the same SEED).
rewrite() {
  python3 - "$@" <<'PY'
import os, random, sys
img, off, length, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
n = length // 65536
rng = random.Random(seed)
with open(img, "r+b") as f:
    for b in rng.sample(range(n), max(1, n // 100)):
        f.seek(off + b * 65536)
        f.write(os.urandom(65536))
PY
}

"$H" -q tls self-signed --cert node.crt --key node.key
TOK=$("$H" token new)
PA=$(port); PB=$(port)
REGION_BYTES=$(bytes "$REGION")
PART_START=$((64 << 20))

# config NAME PORT MIRROR_EXTRA DOWNSTREAM_EXTRA
config() {
  {
    printf 'state = "%s"\n[listen]\naddress = "127.0.0.1:%s"\ntls_cert = "node.crt"\ntls_key = "node.key"\n' "$WORK/state-$1" "$2"
    if [ "$1" = b ]; then
      printf '[[upstream]]\nname = "a"\nurl = "https://127.0.0.1:%s"\ntoken = "%s"\nca = "node.crt"\n' "$PA" "$TOK"
      printf '[[mirror]]\nvolume = "vm1"\nupstream = "a"\nevery = "24h"\n%s\n' "$3"
    else
      printf '[[downstream]]\nname = "b"\ntoken = "%s"\nvolumes = ["vm1"]\n' "$TOK"
    fi
  } > "$1.toml"
}
start() { "$H" daemon --config "$1.toml" 2>"$1.log" & PIDS+=($!);
  for _ in $(seq 200); do "$H" -q --state "state-$1" status --json >/dev/null 2>&1 && return; sleep 0.05; done; echo "daemon $1 did not start" >&2; exit 1; }
fresh() { rm -rf "state-$1"; "$H" -q --state "state-$1" init --node-id "$1" >/dev/null; }
mirror() { "$H" -q --state "state-b" mirror run vm1 --config b.toml --json; }

# bench IMAGE OFFSET MIRROR_EXTRA LABEL: baseline, then RUNS timed increments.
bench() {
  local img=$1 off=$2 extra=$3 label=$4
  fresh a; fresh b
  "$H" -q --state state-a volume add vm1 --image "$WORK/$img" --block-size 64KiB
  if [ -n "$extra" ]; then
    "$H" -q --state state-a volume region add vm1 data --partition 2 >&2
  fi
  "$H" -q --state state-a snapshot create vm1 --name base >/dev/null
  config a "$PA" ""; config b "$PB" "$extra"
  start a
  mirror > m.json
  [ "$(j 'd["kind"]' < m.json)" = baseline ] || { echo "$label: not a baseline" >&2; exit 1; }
  local secs=() wire=()
  for r in $(seq "$RUNS"); do
    rewrite "$img" "$off" "$REGION_BYTES" "$r"
    "$H" -q --state state-a snapshot create vm1 --name "r$r" >/dev/null
    sync
    t0=$(now); mirror > m.json; t1=$(now)
    [ "$(j 'd["kind"]' < m.json)" = incremental ] || { echo "$label: not incremental" >&2; cat m.json >&2; exit 1; }
    secs+=("$(python3 -c "print($t1-$t0)")")
    wire+=("$(j 'd["bytes-fetched"]' < m.json)")
  done
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'
  echo "  $label: seconds per update: ${secs[*]}" >&2
  echo "$(median "${secs[@]}") $(median "${wire[@]}")"
}

echo "data: $REGION of mixed blocks" >&2
"$H" -q sample write data.img --size "$REGION" --seed 1
cp --sparse=always data.img whole.img
truncate -s "$DISK" disk.img
sgdisk -n "1:2048:+32M" -n "2:$((PART_START / 512)):+$((REGION_BYTES >> 10))K" -c 2:data disk.img >/dev/null
dd if=data.img of=disk.img bs=4M seek="$((PART_START / (4 << 20)))" conv=notrunc,sparse status=none

echo "whole volume of $REGION, 1% changed, $RUNS runs" >&2
read -r W_S W_B < <(bench whole.img 0 "" whole)
echo "region of $REGION in a $DISK disk, 1% of it changed, $RUNS runs" >&2
read -r R_S R_B < <(bench disk.img "$PART_START" 'region = "data"' region)

python3 - "$W_S" "$W_B" "$R_S" "$R_B" "$REGION" "$DISK" <<'PY'
import sys
ws, wb, rs, rb = map(float, sys.argv[1:5])
region, disk = sys.argv[5:7]
print("| mirror, 1% of the data changed | update (median) | bytes on the wire |")
print("|---|---|---|")
print(f"| whole volume of {region} | {ws:.3f} s | {wb/1e6:,.2f} MB |")
print(f"| region of {region} in a {disk} disk | {rs:.3f} s | {rb/1e6:,.2f} MB |")
ok = True
print()
for name, v in [("update time, region / whole", rs / ws), ("bytes on the wire, region / whole", rb / wb)]:
    good = v <= 1.2
    ok &= good
    print(f"{name}: {v:.3f} (goal <= 1.2) {'ok' if good else 'MISSED'}")
sys.exit(0 if ok else 1)
PY
