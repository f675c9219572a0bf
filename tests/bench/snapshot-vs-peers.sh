#!/usr/bin/env bash
# Benchmark: holdfast snapshot create (full, incremental) and restore against restic and
# borg on the same deterministic mixed image. Release build; medians of RUNS runs.
#
#   tests/bench/snapshot-vs-peers.sh            # 1 GiB image, 3 runs
#   SIZE=2GiB RUNS=5 tests/bench/snapshot-vs-peers.sh
#
# Then the same full snapshot of an ext4 image of real system files (SYS_SIZE, 2 GiB: what
# fits of /usr/bin, /usr/lib/x86_64-linux-gnu and /usr/share, copied in with mkfs.ext4 -d),
# holdfast against borg (fixed 64 KiB, zstd 3): time and repository size. SYS_SIZE=0 skips it.
#
# Needs restic and borgbackup (Debian packages); installs them with apt-get when missing.
# All three read the image from the page cache (it was just written), so the comparison is
# of the tools, not of the disk's read speed.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=${SIZE:-1GiB}
RUNS=${RUNS:-3}
CHANGE=${CHANGE:-0.01}
WORK=${WORK:-$(mktemp -d /var/tmp/holdfast-bench.XXXXXX)}
HOLDFAST_BIN=${HOLDFAST_BIN:-target/release/holdfast}

if [ "${HOLDFAST_BIN}" = target/release/holdfast ]; then
  cargo build --release -p holdfast --bin holdfast >&2
fi
H=$(realpath "$HOLDFAST_BIN")
for tool in restic borg; do
  if ! command -v $tool >/dev/null; then
    echo "installing restic and borgbackup (Debian packages)..." >&2
    apt-get install -y restic borgbackup >&2
  fi
done
trap 'rm -rf "$WORK"' EXIT
export RESTIC_PASSWORD=bench BORG_PASSPHRASE= BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes \
  BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

"$H" -q sample write "$WORK/base.img" --size "$SIZE" --seed 1
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l; }
size_of() { du -sb "$1" | cut -f1; }

declare -A R
record() { R[$1]="${R[$1]:-} $2"; }

for run in $(seq 1 "$RUNS"); do
  echo "run $run/$RUNS" >&2
  d="$WORK/run$run"; mkdir -p "$d"
  cp "$WORK/base.img" "$d/vol.img"; sync
  # holdfast
  export HOLDFAST_STATE="$d/hf"
  "$H" -q init >/dev/null
  "$H" -q volume add vol --image "$d/vol.img"
  t=$(now); "$H" -q snapshot create vol --name full >/dev/null; record hf_full "$(since "$t")"
  s1=$(size_of "$d/hf/repo")
  cp "$d/vol.img" "$d/vol.base.img"
  "$H" -q sample rewrite "$d/vol.img" --fraction "$CHANGE" --seed "$((run + 1))" >/dev/null; sync
  t=$(now); "$H" -q snapshot create vol --name incr >/dev/null; record hf_incr "$(since "$t")"
  s2=$(size_of "$d/hf/repo"); record hf_repo "$s1"; record hf_growth "$((s2 - s1))"
  t=$(now); "$H" -q snapshot restore vol@incr --to "$d/hf.out"; record hf_restore "$(since "$t")"
  cmp -s "$d/hf.out" "$d/vol.img" || { echo "holdfast restore differs!" >&2; exit 1; }
  rm -f "$d/hf.out"
  # restic (local repository); back up the image under one path so the second run is incremental
  cp "$d/vol.base.img" "$d/r.img"; sync
  restic -q init -r "$d/restic" >/dev/null
  t=$(now); restic -q -r "$d/restic" backup "$d/r.img" >/dev/null; record restic_full "$(since "$t")"
  s1=$(size_of "$d/restic")
  cp "$d/vol.img" "$d/r.img"; sync
  t=$(now); restic -q -r "$d/restic" backup "$d/r.img" >/dev/null; record restic_incr "$(since "$t")"
  s2=$(size_of "$d/restic"); record restic_repo "$s1"; record restic_growth "$((s2 - s1))"
  t=$(now); restic -q -r "$d/restic" restore latest --target "$d/restic.out" >/dev/null
  record restic_restore "$(since "$t")"
  rm -rf "$d/restic.out"
  # borg, fixed 64 KiB chunks and zstd level 3: the design closest to ours
  cp "$d/vol.base.img" "$d/r.img"; sync
  borg init --encryption none "$d/borg" >/dev/null 2>&1
  t=$(now); borg create --chunker-params fixed,65536 --compression zstd,3 "$d/borg::a" "$d/r.img"
  record borg_full "$(since "$t")"
  s1=$(size_of "$d/borg")
  cp "$d/vol.img" "$d/r.img"; sync
  t=$(now); borg create --chunker-params fixed,65536 --compression zstd,3 "$d/borg::b" "$d/r.img"
  record borg_incr "$(since "$t")"
  s2=$(size_of "$d/borg"); record borg_repo "$s1"; record borg_growth "$((s2 - s1))"
  rm -rf "$d"
done

# An ext4 image of real system files: executables, libraries, text.
SYS_SIZE=${SYS_SIZE:-2GiB}
if [ "$SYS_SIZE" != 0 ]; then
  stage="$WORK/sys"; mkdir -p "$stage"
  budget=$(( $(numfmt --from=iec-i "${SYS_SIZE%B}") * 3 / 4 ))
  python3 - "$stage" "$budget" <<'PY'
import os, shutil, sys
stage, budget = sys.argv[1], int(sys.argv[2])
used = 0
for src in ["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share"]:
    for root, dirs, files in os.walk(src):
        dirs.sort(); files.sort()
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            n = os.path.getsize(p)
            if used + n > budget:
                sys.exit(0)
            dst = stage + p
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                shutil.copy2(p, dst)
                used += n
            except OSError:
                pass
PY
  truncate -s "$SYS_SIZE" "$WORK/sys.img"
  mkfs.ext4 -q -F -d "$stage" "$WORK/sys.img" >/dev/null
  rm -rf "$stage"
  for run in $(seq 1 "$RUNS"); do
    echo "system image run $run/$RUNS" >&2
    d="$WORK/sys$run"; mkdir -p "$d"; sync
    export HOLDFAST_STATE="$d/hf"
    "$H" -q init >/dev/null
    "$H" -q volume add sys --image "$WORK/sys.img"
    t=$(now); "$H" -q snapshot create sys >/dev/null; record sys_hf_full "$(since "$t")"
    record sys_hf_repo "$(size_of "$d/hf/repo")"
    borg init --encryption none "$d/borg" >/dev/null 2>&1
    t=$(now); borg create --chunker-params fixed,65536 --compression zstd,3 "$d/borg::a" "$WORK/sys.img"
    record sys_borg_full "$(since "$t")"
    record sys_borg_repo "$(size_of "$d/borg")"
    rm -rf "$d"
  done
fi

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
m() { median "${R[$1]}"; }
changed=$(python3 -c "print(round($(numfmt --from=iec-i "${SIZE%B}" 2>/dev/null || echo 1073741824)/65536*$CHANGE)*65536)")
printf '\n%-28s %12s %12s %12s\n' "median of $RUNS ($SIZE)" holdfast restic borg
printf '%-28s %12.2f %12.2f %12.2f\n' "full snapshot (s)" "$(m hf_full)" "$(m restic_full)" "$(m borg_full)"
printf '%-28s %12.2f %12.2f %12.2f\n' "incremental, ${CHANGE} (s)" "$(m hf_incr)" "$(m restic_incr)" "$(m borg_incr)"
printf '%-28s %12.2f %12.2f %12s\n' "restore (s)" "$(m hf_restore)" "$(m restic_restore)" "-"
printf '%-28s %12d %12d %12d\n' "repository after full (B)" "$(m hf_repo)" "$(m restic_repo)" "$(m borg_repo)"
printf '%-28s %12d %12d %12d\n' "growth per incremental (B)" "$(m hf_growth)" "$(m restic_growth)" "$(m borg_growth)"
echo
r() { echo "scale=3; $1 / $2" | bc -l; }
echo "ratios (goal in brackets):"
echo "  full vs restic        $(r "$(m hf_full)" "$(m restic_full)")  [<= 0.35]"
echo "  full vs borg          $(r "$(m hf_full)" "$(m borg_full)")  [<= 0.40]"
echo "  incremental vs borg   $(r "$(m hf_incr)" "$(m borg_incr)")  [<= 0.30]"
echo "  growth / changed data $(r "$(m hf_growth)" "$changed")  [<= 1.10]"
echo "  restore vs restic     $(r "$(m hf_restore)" "$(m restic_restore)")  [<= 0.60]"
echo "  repository vs borg    $(r "$(m hf_repo)" "$(m borg_repo)")  [<= 1.00]"
if [ "$SYS_SIZE" != 0 ]; then
  echo
  printf '%-28s %12s %12s\n' "system files ($SYS_SIZE ext4)" holdfast borg
  printf '%-28s %12.2f %12.2f\n' "full snapshot (s)" "$(m sys_hf_full)" "$(m sys_borg_full)"
  printf '%-28s %12d %12d\n' "repository (B)" "$(m sys_hf_repo)" "$(m sys_borg_repo)"
  echo "  system: full vs borg       $(r "$(m sys_hf_full)" "$(m sys_borg_full)")  [<= 0.35]"
  echo "  system: repository vs borg $(r "$(m sys_hf_repo)" "$(m sys_borg_repo)")  [<= 1.00]"
fi
