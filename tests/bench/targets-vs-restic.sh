#!/usr/bin/env bash
# Benchmark: pushing to an S3-compatible bucket (a local moto server on 127.0.0.1) against
# restic backing up the same image to the same server. Release build; medians of RUNS runs.
#   - holdfast: snapshot create (image -> node repository) and mirror push (-> bucket), the
#     baseline and then after 1% of the 64 KiB blocks changed; both steps timed apart;
#   - restic: backup of the same image, then of the changed image, to s3:... on the same server;
#   - S3 requests per push, counted from the server's request log;
#   - the same pushes into an encrypted bucket (`target add --encrypt`), and a restore of the
#     incremental snapshot from it against `restic restore` of the same backup.
# Each bucket has a moto server of its own, started fresh each run: moto slows down as it
# holds more (measured: the second 1 GiB push into one server took 0.1-0.4 s longer than
# the first, whichever came first), so a shared server would favour whatever runs first.
# Usage: tests/bench/targets-vs-restic.sh      (SIZE=1GiB RUNS=3 CHANGE=0.01)
# Needs restic (Debian package; installed with apt-get when missing) and moto (from
# target/moto-venv, which ./test.sh installs, or $HOLDFAST_MOTO_VENV).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SIZE=${SIZE:-1GiB}
RUNS=${RUNS:-3}
CHANGE=${CHANGE:-0.01}
H=${HOLDFAST_BIN:-$ROOT/target/release/holdfast}
if [ -z "${HOLDFAST_BIN:-}" ]; then cargo build --release -p holdfast --bin holdfast >&2; fi
command -v restic >/dev/null || { echo "installing restic (Debian package)" >&2; apt-get install -y restic >&2; }
VENV=${HOLDFAST_MOTO_VENV:-$ROOT/target/moto-venv}
"$VENV/bin/python" -c 'import moto' 2>/dev/null || { echo "no moto in $VENV: run ./test.sh once (it installs it)" >&2; exit 1; }
WORK=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" holdfast-target-bench.XXXXXX)
MOTO_PIDS=()
stop_moto() { for p in "${MOTO_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; MOTO_PIDS=(); }
trap 'stop_moto; rm -rf "$WORK"' EXIT
cd "$WORK"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export RESTIC_PASSWORD=bench HOLDFAST_PASSPHRASE=bench
now() { date +%s.%N; }
since() { python3 -c "print($(now) - $1)"; }
median() { python3 -c "import statistics,sys; print(round(statistics.median(float(x) for x in sys.argv[1:]), 3))" "$@"; }
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }
# Requests server $1 has logged so far (werkzeug logs one line per request).
requests() { grep -cE '(GET|PUT|POST|DELETE|HEAD) /[^ ]* HTTP/' "moto-$1.log" || true; }
# A fresh moto server holding bucket $1 (named so too); its endpoint in EP[$1].
declare -A EP
start_moto() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  EP[$1]=http://127.0.0.1:$port
  "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"moto-$1.log" 2>&1 & MOTO_PIDS+=($!)
  for _ in $(seq 100); do
    "$VENV/bin/python" - "${EP[$1]}" "$1" <<'PY' 2>/dev/null && return
import boto3, sys
boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])
PY
    sleep 0.1
  done
  echo "moto did not start" >&2; exit 1
}

"$H" -q sample write base.img --size "$SIZE" --seed 1
# The three pushes of a snapshot (plain, passphrase, key file) take turns at going first:
# whichever ran second into its own fresh server measured 0.1-0.3 s slower (the servers'
# CPU time per push rose by a third), so a fixed order favoured the plain push.
ORDER=(bucket enc enckf)
declare -A PREFIX=([bucket]=hf [enc]=enc [enckf]=kf)
declare -A BUCKET=([bucket]=holdfast-bench [enc]=holdfast-enc [enckf]=holdfast-enckf)
push() { # target full|incr baseline|incremental
  local q0 q1 t p=${PREFIX[$1]}
  q0=$(requests "${BUCKET[$1]}")
  t=$(now); "$H" -q mirror push vol --target "$1" --json > p.json; record "${p}_push_$2" "$(since "$t")"
  [ "$(j 'd["kind"]' < p.json)" = "$3" ] || { echo "$1: not a push of kind $3" >&2; exit 1; }
  q1=$(requests "${BUCKET[$1]}")
  if [ "$1" = bucket ]; then
    record "hf_req_$2" "$((q1 - q0))"; record "hf_stored_$2" "$(j 'd["stored-bytes"]' < p.json)"
    [ "$2" = full ] || record hf_chunks_incr "$(j 'd["chunks"]' < p.json)"
  fi
}
declare -A R
record() { R[$1]="${R[$1]:-} $2"; }
for run in $(seq "$RUNS"); do
  echo "run $run/$RUNS" >&2
  for b in holdfast-bench holdfast-enc holdfast-enckf restic-bench; do start_moto $b; done
  cp base.img vol.img; cp base.img r.img; sync
  # holdfast
  export HOLDFAST_STATE=$WORK/hf
  rm -rf hf; "$H" -q init >/dev/null
  "$H" -q volume add vol --image "$WORK/vol.img" --block-size 64KiB
  "$H" -q target add bucket --url s3://holdfast-bench/site --endpoint "${EP[holdfast-bench]}" --allow-http >/dev/null
  "$H" -q target add enc --url s3://holdfast-enc/site --endpoint "${EP[holdfast-enc]}" --allow-http --encrypt >/dev/null
  [ -f key ] || "$H" -q key new "$WORK/key"
  "$H" -q target add enckf --url s3://holdfast-enckf/site --endpoint "${EP[holdfast-enckf]}" --allow-http --encrypt --key-file "$WORK/key" >/dev/null
  t=$(now); "$H" -q snapshot create vol --name full >/dev/null; record hf_snap_full "$(since "$t")"
  for i in 0 1 2; do push "${ORDER[$(((i + run) % 3))]}" full baseline; done
  "$H" -q sample rewrite vol.img --fraction "$CHANGE" --seed "$((run + 1))" >/dev/null; sync
  t=$(now); "$H" -q snapshot create vol --name incr >/dev/null; record hf_snap_incr "$(since "$t")"
  for i in 0 1 2; do push "${ORDER[$(((i + run) % 3))]}" incr incremental; done
  rm -f out.img; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t=$(now); "$H" -q snapshot restore vol@incr --target bucket --to "$WORK/out.img" >/dev/null; record hf_restore "$(since "$t")"
  rm -f out.img; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t=$(now); "$H" -q snapshot restore vol@incr --target enc --to "$WORK/out.img" >/dev/null; record enc_restore "$(since "$t")"
  cmp -s out.img vol.img || { echo "the restore from the encrypted bucket differs" >&2; exit 1; }
  rm -f out.img
  # restic, same image, same server
  R_EP=${EP[restic-bench]}
  q0=$(requests restic-bench)
  restic -q -r "s3:$R_EP/restic-bench" init >/dev/null
  t=$(now); restic -q -r "s3:$R_EP/restic-bench" backup "$WORK/r.img" >/dev/null; record restic_full "$(since "$t")"
  q1=$(requests restic-bench); record restic_req_full "$((q1 - q0))"
  cp vol.img r.img; sync
  q0=$(requests restic-bench)
  t=$(now); restic -q -r "s3:$R_EP/restic-bench" backup "$WORK/r.img" >/dev/null; record restic_incr "$(since "$t")"
  q1=$(requests restic-bench); record restic_req_incr "$((q1 - q0))"
  rm -rf rr; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t=$(now); restic -q -r "s3:$R_EP/restic-bench" restore latest --target "$WORK/rr" >/dev/null; record restic_restore "$(since "$t")"
  rm -rf rr
  stop_moto
done

m() { median ${R[$1]}; }
python3 - "$SIZE" "$CHANGE" "$RUNS" \
  "$(m hf_snap_full)" "$(m hf_push_full)" "$(m hf_snap_incr)" "$(m hf_push_incr)" \
  "$(m restic_full)" "$(m restic_incr)" \
  "$(m hf_req_full)" "$(m hf_req_incr)" "$(m restic_req_full)" "$(m restic_req_incr)" \
  "$(m hf_stored_full)" "$(m hf_stored_incr)" "$(m hf_chunks_incr)" \
  "$(m enc_push_full)" "$(m enc_push_incr)" "$(m enc_restore)" "$(m restic_restore)" \
  "$(m kf_push_full)" "$(m kf_push_incr)" "$(m hf_restore)" <<'PY'
import json, sys
a = sys.argv[1:]
size, change, runs = a[0], float(a[1]), a[2]
sf, pf, si, pi, rf, ri, qf, qi, rqf, rqi, bf, bi, ci, ef, ei, er, rr, kf, ki, hr = map(float, a[3:])
print(f"\nPush to a local S3 server (moto), {size} mixed image, {change:.0%} of blocks changed, medians of {runs} runs")
print(f"{'':34}{'baseline':>12}{'incremental':>14}")
print(f"{'holdfast snapshot create':34}{sf:>11.2f}s{si:>13.2f}s")
print(f"{'holdfast mirror push':34}{pf:>11.2f}s{pi:>13.2f}s")
print(f"{'holdfast snapshot + push':34}{sf+pf:>11.2f}s{si+pi:>13.2f}s")
print(f"{'restic backup':34}{rf:>11.2f}s{ri:>13.2f}s")
print(f"{'restic / holdfast (snapshot+push)':34}{rf/(sf+pf):>11.1f}x{ri/(si+pi):>13.1f}x")
print(f"{'restic / holdfast (push alone)':34}{rf/pf:>11.1f}x{ri/pi:>13.1f}x")
print(f"{'S3 requests, holdfast push':34}{qf:>12.0f}{qi:>14.0f}")
print(f"{'S3 requests, restic backup':34}{rqf:>12.0f}{rqi:>14.0f}")
print(f"{'holdfast bytes stored in bucket':34}{bf:>12.0f}{bi:>14.0f}")
print(f"{'holdfast chunks pushed':34}{'':>12}{ci:>14.0f}")
print(f"goal baseline >= 2x faster than restic: {'met' if rf/(sf+pf) >= 2 else 'NOT met'} (snapshot+push)")
print(f"goal incremental >= 3x faster than restic: {'met' if ri/(si+pi) >= 3 else 'NOT met'} (snapshot+push)")
print(f"\nEncrypted bucket (target add --encrypt), same data, same server")
print(f"{'':34}{'baseline':>12}{'incremental':>14}")
print(f"{'holdfast mirror push, encrypted':34}{ef:>11.2f}s{ei:>13.2f}s")
print(f"{'encrypted / plain push':34}{ef/pf:>11.2f}x{ei/pi:>13.2f}x")
print(f"{'  the same with a key file':34}{kf:>11.2f}s{ki:>13.2f}s")
print(f"{'  key file / plain push':34}{kf/pf:>11.2f}x{ki/pi:>13.2f}x")
print(f"{'encrypted push / restic backup':34}{ef/rf:>11.2f}x{ei/ri:>13.2f}x")
print(f"{'restore: holdfast (encrypted)':34}{er:>11.2f}s")
print(f"{'restore: holdfast (plain)':34}{hr:>11.2f}s")
print(f"{'restore: restic':34}{rr:>11.2f}s")
print(f"goal encrypted push <= 1.1x plain push: {'met' if ef/pf <= 1.1 else 'NOT met'} ({ef/pf:.2f}x)")
print(f"goal encrypted incremental push <= 0.33x restic incremental: {'met' if ei/ri <= 0.33 else 'NOT met'} ({ei/ri:.2f}x)")
print(f"goal encrypted restore <= 0.5x restic restore: {'met' if er/rr <= 0.5 else 'NOT met'} ({er/rr:.2f}x)")
print(json.dumps({"size": size, "keyfile_push_full_s": kf, "keyfile_push_incr_s": ki,
    "hf_restore_s": hr, "enc_push_full_s": ef, "enc_push_incr_s": ei, "enc_restore_s": er,
    "restic_restore_s": rr, "hf_snapshot_full_s": sf, "hf_push_full_s": pf, "hf_snapshot_incr_s": si,
    "hf_push_incr_s": pi, "restic_full_s": rf, "restic_incr_s": ri, "hf_requests_full": qf,
    "hf_requests_incr": qi, "restic_requests_full": rqf, "restic_requests_incr": rqi,
    "hf_stored_full": bf, "hf_stored_incr": bi, "hf_chunks_incr": ci}))
PY
