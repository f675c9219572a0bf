#!/usr/bin/env bash
# Benchmark: live volumes (the NBD client, changed-block tracking, point-in-time snapshots of a
# running writer). Release build; medians of RUNS runs; the page cache is dropped before each
# timed snapshot when the machine allows it (root).
#   - 2 GiB and 8 GiB qcow2 images holding the sample mix; the same number of 64 KiB blocks
#     (1 % of the smaller image's) rewritten at random offsets in each. An incremental snapshot
#     with a dirty bitmap (--qcow2) against today's full-read incremental of the same change in
#     the same data as a raw file (--image); and the 8 GiB incremental against the 2 GiB one
#     (the same change: the cost should follow the change, not the volume); and both
#     incrementals again with only the data cold (holdfast, qemu-img, qemu-nbd and their
#     libraries read back into the cache first: programs run every few minutes stay cached).
#   - A full snapshot over NBD (qemu-nbd serving the raw file on a unix socket, --nbd) against
#     the same full snapshot read from the raw file (--image).
#   - A guest writing through qemu-storage-daemon: its write throughput alone, and while a
#     live snapshot (--qmp, fleecing on) of the 2 GiB disk runs.
#   - The disk itself: the raw file read by `cat` (holes cost it no disk reads, as for
#     holdfast), so that the ratios can be set against the disk they were measured on (a full
#     read's cost follows the disk; a bitmap incremental's mostly does not).
# Usage: tests/bench/live.sh     (RUNS=3, SIZES="2 8" in GiB; HOLDFAST_BIN to use a binary;
#   DISK_MBPS=N runs every timed snapshot in a cgroup whose reads from the disk holding the work
#   directory are throttled to N MB/s, to see the figures on a slower disk than this one: needs
#   root and cgroup v1's blkio or cgroup v2's io controller)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
SIZES=${SIZES:-"2 8"}
H=${HOLDFAST_BIN:-$PWD/target/release/holdfast}
if [ -z "${HOLDFAST_BIN:-}" ]; then cargo build --release -p holdfast --bin holdfast >&2; fi
for tool in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
  command -v $tool >/dev/null || { echo "needs $tool (apt-get install qemu-utils)" >&2; exit 2; }
done
WORK=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" holdfast-live-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
  if [ -n "${CG:-}" ]; then rmdir "$CG" || echo "left the cgroup $CG behind" >&2; fi
}
trap cleanup EXIT
cd "$WORK"
export HOLDFAST_STATE=$WORK/st

drop_caches() { sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
median() { python3 -c "import statistics,sys; print(round(statistics.median(float(x) for x in sys.argv[1:]), 3))" "$@"; }
now() { date +%s.%N; }
# The end time is taken before python3 starts (its start-up is 20-30 ms, a tenth of an
# incremental snapshot with a dirty bitmap).
since() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))" "$1" "$(now)"; }
declare -A R
record() { R[$1]="${R[$1]:-} $2"; }
# qemu-io commands rewriting CHANGED random 64 KiB blocks of a $1-byte disk (seed $2).
first=$(echo $SIZES | cut -d' ' -f1)
CHANGED=${CHANGED:-$((first * 16384 / 100))}
changes() {
  python3 - "$1" "$2" "$CHANGED" <<'PY'
import random, sys
size, seed, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
blocks = size // 65536
rng = random.Random(seed)
for b in rng.sample(range(blocks), n):
    print(f"-c\nwrite -P {rng.randrange(1, 255)} {b * 65536} 64k")
PY
}
apply() { # image format seed
  local size; size=$(qemu-img info --output=json -f "$2" "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['virtual-size'])")
  mapfile -t args < <(changes "$size" "$3")
  qemu-io -f "$2" "${args[@]}" "$1" >/dev/null
}
# Runs a command in the throttled cgroup when DISK_MBPS is set, else as it is.
CG=
if [ -n "${DISK_MBPS:-}" ]; then
  dev=$(findmnt -no SOURCE -T "$WORK"); parent=$(lsblk -no PKNAME "$dev" 2>/dev/null | head -1)
  majmin=$(lsblk -dno MAJ:MIN "${parent:+/dev/$parent}${parent:-$dev}" | tr -d ' ')
  bps=$((DISK_MBPS * 1000000))
  if [ -d /sys/fs/cgroup/blkio ]; then
    CG=/sys/fs/cgroup/blkio/holdfast-bench-$$; mkdir "$CG"
    echo "$majmin $bps" > "$CG/blkio.throttle.read_bps_device"
  elif grep -qw io /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    echo +io > /sys/fs/cgroup/cgroup.subtree_control
    CG=/sys/fs/cgroup/holdfast-bench-$$; mkdir "$CG"
    echo "$majmin rbps=$bps" > "$CG/io.max"
  else
    echo "DISK_MBPS needs cgroup v1's blkio or v2's io controller" >&2; exit 2
  fi
  echo "reads from $dev ($majmin) throttled to $DISK_MBPS MB/s" >&2
fi
throttled() {
  if [ -n "$CG" ]; then bash -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG" "$@"; else "$@"; fi
}
# The same for a server started in the background: `throttled_exec CMD... &`, in a subshell
# that becomes CMD, so that $! is the server's own PID.
throttled_exec() {
  if [ -n "$CG" ]; then echo "$BASHPID" > "$CG/cgroup.procs"; fi
  exec "$@"
}
timed_snapshot() { # volume -> seconds
  drop_caches
  local t; t=$(now); throttled "$H" -q snapshot create "$1" >/dev/null; since "$t"
}
PROGRAMS=("$H")
for tool in qemu-img qemu-nbd; do
  p=$(command -v $tool); PROGRAMS+=("$p")
  mapfile -t -O "${#PROGRAMS[@]}" PROGRAMS < <(ldd "$p" | awk '$3 ~ /^\// {print $3}')
done
warm_snapshot() { # volume -> seconds, with only the data cold
  drop_caches; cat "${PROGRAMS[@]}" >/dev/null
  local t; t=$(now); throttled "$H" -q snapshot create "$1" >/dev/null; since "$t"
}

for gib in $SIZES; do
  echo "== ${gib} GiB" >&2
  "$H" -q sample write base.raw --size "${gib}GiB" --seed 1
  for run in $(seq "$RUNS"); do
    echo "run $run/$RUNS" >&2
    rm -rf st d.raw d.qcow2; "$H" -q init >/dev/null
    cp --sparse=always base.raw d.raw
    qemu-img convert -O qcow2 base.raw d.qcow2
    "$H" -q volume add raw --image "$WORK/d.raw"
    "$H" -q volume add q --qcow2 "$WORK/d.qcow2"
    record "disk_$gib" "$(drop_caches; t=$(now); throttled cat d.raw >/dev/null; since "$t")"
    record "raw_full_$gib" "$(timed_snapshot raw)"
    "$H" -q snapshot create q >/dev/null
    apply d.raw raw "$run"; apply d.qcow2 qcow2 "$run"
    record "raw_incr_$gib" "$(timed_snapshot raw)"
    record "cbt_incr_$gib" "$(timed_snapshot q)"
    # The same two again with the programs (holdfast, qemu-img, qemu-nbd and their
    # libraries) read back into the cache first and only the data cold: snapshots taken
    # every few minutes find their programs cached (the daemon takes them in its own
    # process), and starting 60 MB of programs from disk is a fixed cost, not a read of
    # the volume.
    apply d.raw raw "$((run + 100))"; apply d.qcow2 qcow2 "$((run + 100))"
    record "raw_warm_$gib" "$(warm_snapshot raw)"
    record "cbt_warm_$gib" "$(warm_snapshot q)"
    if [ "$gib" = "$(echo $SIZES | cut -d' ' -f1)" ]; then
      # The same raw file over NBD, from qemu-nbd on a unix socket.
      throttled_exec qemu-nbd --read-only --persistent --shared=4 -f raw -x d -k "$WORK/n.sock" "$WORK/d.raw" &
      PIDS+=($!); while [ ! -S "$WORK/n.sock" ]; do sleep 0.05; done
      "$H" -q volume add n --nbd "nbd+unix:///d?socket=$WORK/n.sock"
      record "nbd_full_$gib" "$(timed_snapshot n)"
      kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; rm -f "$WORK/n.sock"
    fi
  done
done

# A guest writing 64 KiB blocks through qemu-storage-daemon (a small NBD writer), alone and
# during a live snapshot of its disk.
rm -rf st; "$H" -q init >/dev/null
qemu-img convert -O qcow2 base.raw g.qcow2
throttled_exec qemu-storage-daemon --blockdev driver=file,node-name=f0,filename="$WORK/g.qcow2",cache.direct=on \
  --blockdev driver=qcow2,node-name=disk0,file=f0 \
  --nbd-server addr.type=unix,addr.path="$WORK/g.sock" \
  --export type=nbd,id=guest,node-name=disk0,name=disk0,writable=on \
  --chardev socket,path="$WORK/qmp.sock",server=on,wait=off,id=m --monitor chardev=m &
PIDS+=($!); while [ ! -S "$WORK/qmp.sock" ] || [ ! -S "$WORK/g.sock" ]; do sleep 0.05; done
"$H" -q volume add live --qmp "$WORK/qmp.sock" --node disk0 --nbd-server "nbd+unix:///?socket=$WORK/g.sock"
guest() { # seconds -> MiB/s written by the guest in that time
  python3 - "$WORK/g.sock" "$1" <<'PY'
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
def rd(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise SystemExit("closed")
        b += c
    return b
rd(18); s.sendall(struct.pack(">I", 3))
name = b"disk0"
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
size = None
while True:
    _, _, kind, ln = struct.unpack(">QIII", rd(20)); d = rd(ln)
    if kind == 3 and struct.unpack(">H", d[:2])[0] == 0: size = struct.unpack(">Q", d[2:10])[0]
    if kind == 1: break
data = bytes(range(256)) * 256
end = time.time() + float(sys.argv[2]); n = 0; cookie = 0; off = 0
while time.time() < end:
    cookie += 1
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, cookie, off, len(data)) + data)
    rd(16); n += 1; off = (off + 7 * 65536 * 13) % (size - 65536) // 65536 * 65536
print(round(n * 65536 / (1 << 20) / float(sys.argv[2]), 1))
PY
}
"$H" -q snapshot create live >/dev/null   # the first (full) read, to start the bitmap chain
for run in $(seq "$RUNS"); do
  record guest_alone "$(guest 5)"
  drop_caches
  ( "$H" -q snapshot create live --before true >/dev/null ) & snap=$!
  t=$(now); record guest_during "$(guest 3)"; wait $snap; record live_snapshot "$(since "$t")"
done
# A full live read (first snapshot after the chain is broken on purpose) with the guest on.
"$H" -q snapshot delete "live@$("$H" snapshot list live --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["name"])')" >/dev/null
( sleep 0.2; drop_caches; t=$(now); "$H" -q snapshot create live >/dev/null; echo "$(since "$t")" > full.t ) & snap=$!
record guest_during_full "$(guest 4)"; wait $snap; record live_full "$(cat full.t)"

m() { median ${R[$1]}; }
r() { python3 -c "import sys; print(round(float(sys.argv[1]) / float(sys.argv[2]), 2))" "$1" "$2"; }
echo
printf '%-58s %10s\n' "median of $RUNS" "seconds"
for gib in $SIZES; do
  printf '%-58s %10s\n' "${gib} GiB raw file read by cat (the disk alone)" "$(m disk_$gib)"
  printf '%-58s %10s\n' "${gib} GiB raw file: full snapshot" "$(m raw_full_$gib)"
  printf '%-58s %10s\n' "${gib} GiB raw file: incremental, $CHANGED blocks changed (full read)" "$(m raw_incr_$gib)"
  printf '%-58s %10s\n' "${gib} GiB qcow2: incremental with a dirty bitmap" "$(m cbt_incr_$gib)"
  printf '%-58s %10s\n' "${gib} GiB raw file: incremental, programs cached" "$(m raw_warm_$gib)"
  printf '%-58s %10s\n' "${gib} GiB qcow2: incremental with a bitmap, programs cached" "$(m cbt_warm_$gib)"
done
printf '%-58s %10s\n' "$first GiB over NBD (qemu-nbd, unix socket): full snapshot" "$(m nbd_full_$first)"
echo
echo "goals:"
for gib in $SIZES; do
  echo "  ${gib} GiB: full-read incremental / bitmap incremental  $(r "$(m raw_incr_$gib)" "$(m cbt_incr_$gib)")x  [>= 10]"
  echo "  ${gib} GiB: the same, programs cached              $(r "$(m raw_warm_$gib)" "$(m cbt_warm_$gib)")x  [>= 10]"
done
last=$(echo $SIZES | awk '{print $NF}')
echo "  bitmap incremental, $last GiB / $first GiB              $(r "$(m cbt_incr_$last)" "$(m cbt_incr_$first)")  [<= 1.3]"
echo "  full over NBD / full from the raw file ($first GiB)       $(r "$(m nbd_full_$first)" "$(m raw_full_$first)")  [<= 1.3]"
echo
echo "guest writing through qemu-storage-daemon ($first GiB disk, 64 KiB writes):"
echo "  alone                                      $(m guest_alone) MiB/s"
echo "  during an incremental live snapshot        $(m guest_during) MiB/s ($(m live_snapshot) s)"
echo "  during a full live snapshot                $(m guest_during_full) MiB/s ($(m live_full) s)"
