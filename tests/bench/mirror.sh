#!/usr/bin/env bash
# Mirror benchmark over loopback, release build, medians of RUNS runs:
#   - baseline of a SIZE mixed image A -> B (a fresh B each run);
#   - incremental after 1% of its 64 KiB blocks changed;
#   - the same number of changed blocks on a BIG volume (does the update grow with the volume?);
#   - bytes on the wire against the changed data compressed (A's stored bytes of the change);
#   - baseline throughput against this disk's sequential write speed (dd, direct I/O);
#   - lock propagation through three hops: from the end of C's update until A holds C's new base.
# Dirty pages are flushed (sync) before each timed incremental.
# Usage: tests/bench/mirror.sh            (SIZE=1GiB BIG=4GiB RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=${SIZE:-1GiB}
BIG=${BIG:-4GiB}
RUNS=${RUNS:-3}
H=${HOLDFAST_BIN:-$PWD/target/release/holdfast}
if [ -z "${HOLDFAST_BIN:-}" ]; then cargo build --release -p holdfast >&2; fi
WORK=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" holdfast-mirror-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
cd "$WORK"
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }
median() { python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

"$H" -q tls self-signed --cert node.crt --key node.key
TOK_B=$("$H" token new); TOK_C=$("$H" token new)
PA=$(port); PB=$(port); PC=$(port)

# node NAME PORT UPSTREAM_NAME UPSTREAM_PORT DOWNSTREAM_NAME DOWNSTREAM_TOKEN MY_TOKEN
config() {
  local n=$1 p=$2 up=$3 upp=$4 dn=$5 dtok=$6 mytok=$7
  {
    printf 'state = "%s"\n[listen]\naddress = "127.0.0.1:%s"\ntls_cert = "node.crt"\ntls_key = "node.key"\n' "$WORK/state-$n" "$p"
    if [ -n "$up" ]; then
      printf '[[upstream]]\nname = "%s"\nurl = "https://127.0.0.1:%s"\ntoken = "%s"\nca = "node.crt"\n' "$up" "$upp" "$mytok"
      printf '[[mirror]]\nvolume = "vm1"\nupstream = "%s"\nevery = "24h"\n' "$up"
    fi
    if [ -n "$dn" ]; then
      printf '[[downstream]]\nname = "%s"\ntoken = "%s"\nvolumes = ["vm1"]\n' "$dn" "$dtok"
    fi
  } > "$n.toml"
}
start() { "$H" daemon --config "$1.toml" 2>"$1.log" & PIDS+=($!);
  for _ in $(seq 200); do "$H" -q --state "state-$1" status --json >/dev/null 2>&1 && return; sleep 0.05; done; echo "daemon $1 did not start" >&2; exit 1; }
fresh() { rm -rf "state-$1"; "$H" -q --state "state-$1" init --node-id "$1" >/dev/null; }
mirror() { "$H" -q --state "state-$1" mirror run vm1 --config "$1.toml" --json; }

echo "disk: sequential write, 1 GiB, direct I/O" >&2
DISK_MBS=$(dd if=/dev/zero of=ddtest bs=4M count=256 oflag=direct conv=fsync 2>&1 | python3 -c '
import re,sys
t=sys.stdin.read(); m=re.search(r"(\d+) bytes.*?, ([\d.]+) s,", t); print(round(int(m.group(1))/float(m.group(2))/1e6,1))')
rm -f ddtest

# bench_volume SIZE FRACTION LABEL: baselines and incrementals for one volume size.
bench_volume() {
  local size=$1 frac=$2 label=$3
  fresh a
  "$H" -q sample write "vm-$label.img" --size "$size" --seed 1
  "$H" -q --state state-a volume add vm1 --image "$WORK/vm-$label.img" --block-size 64KiB
  "$H" -q --state state-a snapshot create vm1 --name base >/dev/null
  config a "$PA" "" "" b "$TOK_B" ""
  config b "$PB" a "$PA" "" "" "$TOK_B"
  start a
  local vol_bytes; vol_bytes=$(stat -c %s "vm-$label.img")
  local base_s=() inc_s=() inc_b=() changed=()
  for r in $(seq "$RUNS"); do
    if [ "$label" = small ] || [ "$r" = 1 ]; then
      fresh b
      t0=$(now); mirror b > m.json; t1=$(now)
      [ "$(j 'd["kind"]' < m.json)" = baseline ] || { echo "not a baseline" >&2; exit 1; }
      base_s+=("$(python3 -c "print($t1-$t0)")")
    fi
    "$H" -q sample rewrite "vm-$label.img" --fraction "$frac" --seed "$((r + 100))" >/dev/null
    "$H" -q --state state-a snapshot create vm1 --name "r$r" >/dev/null
    changed+=("$("$H" -q --state state-a snapshot show "vm1@r$r" --json | j 'd["stats"]["new-stored-bytes"]')")
    # Time the update, not the write-back of the baseline and snapshot before it (gigabytes
    # of dirty pages, four times more for the big volume, that would contend with its fsyncs).
    sync
    t0=$(now); mirror b > m.json; t1=$(now)
    [ "$(j 'd["kind"]' < m.json)" = incremental ] || { echo "not incremental" >&2; exit 1; }
    inc_s+=("$(python3 -c "print($t1-$t0)")")
    inc_b+=("$(j 'd["bytes-fetched"]' < m.json)")
  done
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'
  echo "  $label: incremental seconds per run: ${inc_s[*]}" >&2
  echo "$label $vol_bytes $(median "${base_s[@]}") $(median "${inc_s[@]}") $(median "${inc_b[@]}") $(median "${changed[@]}")"
}

echo "volume $SIZE: baseline and 1% incremental, $RUNS runs" >&2
read -r _ VOL1 BASE1 INC1 WIRE1 CHG1 < <(bench_volume "$SIZE" 0.01 small)
BLOCKS_SMALL=$(python3 -c "print(int($VOL1 / 65536 * 0.01))")
echo "volume $BIG: the same number of changed blocks ($BLOCKS_SMALL), $RUNS runs" >&2
BIGBYTES=$(python3 -c "
s='$BIG'; u={'KiB':1<<10,'MiB':1<<20,'GiB':1<<30}
print(next(int(float(s[:-3])*v) for k,v in u.items() if s.endswith(k)))")
FRAC_BIG=$(python3 -c "print($VOL1 * 0.01 / $BIGBYTES)")
read -r _ VOL4 BASE4 INC4 WIRE4 CHG4 < <(bench_volume "$BIG" "$FRAC_BIG" big)

echo "lock propagation through three hops, $RUNS runs" >&2
fresh a; fresh b; fresh c
"$H" -q sample write vm-prop.img --size 16MiB --seed 3
"$H" -q --state state-a volume add vm1 --image "$WORK/vm-prop.img" --block-size 64KiB
config a "$PA" "" "" b "$TOK_B" ""
config b "$PB" a "$PA" c "$TOK_C" "$TOK_B"
config c "$PC" b "$PB" "" "" "$TOK_C"
start a; start b
PROP=()
for r in $(seq "$RUNS"); do
  "$H" -q sample rewrite vm-prop.img --fraction 0.01 --seed "$r" >/dev/null
  id=$("$H" -q --state state-a snapshot create vm1 --name "p$r")
  mirror b >/dev/null
  mirror c >/dev/null
  t0=$(now)
  until "$H" -q --state state-a lock list --json | grep -A4 "\"$id\"" | grep -q 'holdfast://c/vm1'; do
    sleep 0.005
    python3 -c "import sys; sys.exit(0 if $(now) - $t0 < 10 else 1)" || { echo "C's lock never reached A" >&2; exit 1; }
  done
  t1=$(now)
  PROP+=("$(python3 -c "print($t1-$t0)")")
done
PROP_S=$(median "${PROP[@]}")

python3 - "$DISK_MBS" "$VOL1" "$BASE1" "$INC1" "$WIRE1" "$CHG1" "$VOL4" "$INC4" "$WIRE4" "$CHG4" "$PROP_S" <<'PY'
import sys
disk, vol1, base1, inc1, wire1, chg1, vol4, inc4, wire4, chg4, prop = map(float, sys.argv[1:])
mb = lambda b: f"{b/1e6:,.1f} MB"
tput = vol1 / base1 / 1e6
rows = [
    ("baseline A -> B", f"{vol1/2**30:.0f} GiB", f"{base1:.2f} s", f"{tput:,.0f} MB/s (disk {disk:,.0f} MB/s)"),
    ("incremental, 1% changed", f"{vol1/2**30:.0f} GiB", f"{inc1:.3f} s", f"{mb(wire1)} on the wire, change {mb(chg1)} compressed"),
    ("same change, bigger volume", f"{vol4/2**30:.0f} GiB", f"{inc4:.3f} s", f"{mb(wire4)} on the wire, change {mb(chg4)} compressed"),
    ("lock propagation, 3 hops", "", f"{prop:.3f} s", "from the end of C's update until A holds C's new base"),
]
print("| measurement | volume | median | |")
print("|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
checks = [
    ("incremental time, big/small volume", inc4 / inc1, 1.3),
    ("incremental bytes, big/small volume", wire4 / wire1, 1.3),
    ("bytes on the wire / changed data compressed", max(wire1 / chg1, wire4 / chg4), 1.2),
    ("disk write speed / baseline throughput", disk / tput, 2.0),
    ("lock propagation seconds", prop, 1.0),
]
print()
ok = True
for name, v, goal in checks:
    good = v <= goal
    ok &= good
    print(f"{name}: {v:.3f} (goal <= {goal}) {'ok' if good else 'MISSED'}")
sys.exit(0 if ok else 1)
PY
