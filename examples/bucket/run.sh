#!/usr/bin/env bash
# A node pushing to an S3-compatible bucket, and disaster recovery on a brand-new node that
# has nothing but the bucket's URL and credentials. The bucket is a local moto server on
# 127.0.0.1 (from target/moto-venv, which ./test.sh installs, or $HOLDFAST_MOTO_VENV; installed into a
# temporary venv from tests/s3/requirements.txt when neither exists).
#   HOLDFAST_BIN  the holdfast binary (default target/release/holdfast, else target/debug)
#   VOLUME_SIZE   the volume's size (default 64MiB)
# For a real bucket, drop the moto part and the --endpoint/--allow-http options, and export
# AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead.
# Exits non-zero if a check fails. The last line is one JSON object.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
H=${HOLDFAST_BIN:-$ROOT/target/release/holdfast}
case $H in /*) ;; *) H=$PWD/$H;; esac
[ -x "$H" ] || H=$ROOT/target/debug/holdfast
SIZE=${VOLUME_SIZE:-64MiB}
WORK=$(mktemp -d)
MOTO_PID=
cleanup() { [ -z "$MOTO_PID" ] || kill "$MOTO_PID" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
say() { printf '== %s\n' "$*" >&2; }
fail() { echo "FAILED: $*" >&2; exit 1; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }

VENV=${HOLDFAST_MOTO_VENV:-$ROOT/target/moto-venv}
if ! "$VENV/bin/python" -c 'import moto, boto3' 2>/dev/null; then
  say "installing moto into a temporary venv"
  VENV=$WORK/venv
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/tests/s3/requirements.txt"
fi

cd "$WORK"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ENDPOINT=http://127.0.0.1:$PORT
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" >moto.log 2>&1 & MOTO_PID=$!
export AWS_ACCESS_KEY_ID=example AWS_SECRET_ACCESS_KEY=example AWS_REGION=us-east-1
for _ in $(seq 100); do
  "$VENV/bin/python" - "$ENDPOINT" <<'PY' 2>/dev/null && break
import boto3, sys
boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket="backups")
PY
  sleep 0.1
done

A() { "$H" -q --state state/a "$@"; }
Z() { "$H" -q --state state/z "$@"; }
add_target() { "$1" target add bucket --url s3://backups/site-a --endpoint "$ENDPOINT" --allow-http >/dev/null; }

say "node a: volume vm1 ($SIZE), target bucket (s3://backups/site-a at $ENDPOINT)"
A init --node-id a >/dev/null
"$H" -q sample write vm1.img --size "$SIZE" --seed 1
A volume add vm1 --image "$WORK/vm1.img" --block-size 64KiB
VOLUME_BYTES=$(stat -c %s vm1.img)
add_target A
A target check bucket >/dev/null

say "baseline push, then an incremental push after 1% of the blocks changed"
A snapshot create vm1 --name s1 >/dev/null
A mirror push vm1 --target bucket --json > p1.json
[ "$(json 'd["kind"]' < p1.json)" = baseline ] || fail "the first push was not a baseline"
"$H" -q sample rewrite vm1.img --fraction 0.01 --seed 2 >/dev/null
A snapshot create vm1 --name s2 >/dev/null
A mirror push vm1 --target bucket --json > p2.json
[ "$(json 'd["kind"]' < p2.json)" = incremental ] || fail "the second push was not incremental"
BASELINE_STORED=$(json 'd["stored-bytes"]' < p1.json)
INCREMENT_STORED=$(json 'd["stored-bytes"]' < p2.json)

say "a keeps the bucket's base: a destination-path lock on s2"
A lock list --volume vm1 --json | json '[l for l in d if l["type"] == "destination-path"][0]["value"]' \
  | grep -q "s3://backups/site-a" || fail "no destination-path lock for the bucket on a"

say "disaster: node z has only the bucket's URL and credentials"
Z init --node-id z >/dev/null
add_target Z
Z snapshot list vm1 --target bucket
Z snapshot restore vm1@s2 --target bucket --to "$WORK/restored.img"
cmp -s restored.img vm1.img || fail "the restore from the bucket differs from the image"
Z mirror pull vm1 --target bucket --json > pull.json
Z verify --volume vm1 >/dev/null || fail "z does not verify after the pull"

say "retention and gc inside the bucket"
A prune vm1 --target bucket --keep-last 1
A gc --target bucket
A verify --target bucket >/dev/null || fail "the bucket does not verify"

printf '{"ok":true,"volume_bytes":%s,"baseline_stored_bytes":%s,"incremental_stored_bytes":%s,"pulled_snapshots":%s}\n' \
  "$VOLUME_BYTES" "$BASELINE_STORED" "$INCREMENT_STORED" "$(json 'len(d["transferred"])' < pull.json)"
