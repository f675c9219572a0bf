#!/usr/bin/env bash
# A three-node cascade a -> b -> c on this machine, running the "downstream away" scenario:
# c stops; a takes ten snapshots under keep-last-2 while b keeps updating; nothing c depends
# on may disappear; when c returns its update must be incremental; then the old base goes.
#   HOLDFAST_BIN  the holdfast binary (default target/release/holdfast, else target/debug)
#   VOLUME_SIZE   the volume's size (default 64MiB)
# Exits non-zero if an invariant fails. The last line is one JSON object.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
H=${HOLDFAST_BIN:-$ROOT/target/release/holdfast}
case $H in /*) ;; *) H=$PWD/$H;; esac
[ -x "$H" ] || H=$ROOT/target/debug/holdfast
SIZE=${VOLUME_SIZE:-64MiB}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
say() { printf '== %s\n' "$*" >&2; }
fail() { echo "FAILED: $*" >&2; for n in a b c; do echo "--- $n daemon log" >&2; tail -20 "$WORK/$n.log" >&2 || true; done; exit 1; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }

cd "$WORK"
cp "$ROOT"/examples/cascade/{a,b,c}.toml .
# Free ports if the defaults are taken.
for n in a b c; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  case $n in a) old=7401;; b) old=7402;; c) old=7403;; esac
  sed -i "s/127.0.0.1:$old/127.0.0.1:$port/" a.toml b.toml c.toml
done
mkdir -p tls tokens state
"$H" -q tls self-signed --cert tls/node.crt --key tls/node.key
# Tokens are secrets: holdfast refuses a token file other users can read.
(umask 077; "$H" token new > tokens/b; "$H" token new > tokens/c)
for n in a b c; do "$H" -q --state "state/$n" init --node-id "$n"; done

A() { "$H" -q --state state/a "$@"; }
B() { "$H" -q --state state/b "$@"; }
C() { "$H" -q --state state/c "$@"; }
start() { "$H" daemon --config "$1.toml" 2>"$1.log" & PIDS+=($!); eval "PID_$1=$!";
  for _ in $(seq 100); do "$H" -q --state "state/$1" status --json >/dev/null 2>&1 && return; sleep 0.1; done; fail "daemon $1 did not start"; }
stop() { local v="PID_$1"; kill "${!v}"; wait "${!v}" 2>/dev/null || true; }
mirror() { "$H" -q --state "state/$1" mirror run vm1 --config "$1.toml" --json > "m-$1.json" || fail "mirror on $1"; }
ids() { "$H" -q --state "state/$1" snapshot list vm1 --json | json '" ".join(s["id"] for s in d)'; }

say "a: volume vm1 ($SIZE), three daemons on loopback with TLS"
"$H" -q sample write vm1.img --size "$SIZE" --seed 1
A volume add vm1 --image "$WORK/vm1.img" --block-size 64KiB
VOLUME_BYTES=$(stat -c %s vm1.img)
start a; start b; start c

say "baseline a -> b -> c"
S0=$(A snapshot create vm1 --name s0)
mirror b; mirror c; mirror b
[ "$(json 'd["kind"]' < m-c.json)" = baseline ] || fail "c's first update was not a baseline"

say "c goes away; a takes ten snapshots with keep-last-2; b keeps updating"
stop c
for i in $(seq 1 10); do
  "$H" -q sample rewrite vm1.img --fraction 0.01 --seed "$((i + 10))" >/dev/null
  A snapshot create vm1 --name "s$i" >/dev/null
  A prune vm1 --keep-last 2 >/dev/null
  mirror b
  ids a | grep -q "$S0" || fail "a pruned c's base $S0 at step $i"
  ids b | grep -q "$S0" || fail "b dropped c's base $S0 at step $i"
done
A lock list

say "c returns: its daemon catches up at once"
T0=$(date +%s.%N)
RETURNED_MS=$(python3 -c 'import time; print(int(time.time() * 1000))')
start c
for _ in $(seq 600); do
  C status --json > st-c.json
  [ "$(json "(d['relations'][0]['job']['last-finished-unix-ms'] or 0) >= $RETURNED_MS" < st-c.json)" = True ] && break
  sleep 0.1
done
KIND=$(json 'd["relations"][0]["job"]["last-transfer"]["kind"]' < st-c.json)
BASE=$(json 'd["relations"][0]["job"]["last-transfer"]["base"]' < st-c.json)
CATCHUP=$(json 'd["relations"][0]["job"]["last-transfer"]["bytes-fetched"]' < st-c.json)
[ "$KIND" = incremental ] || fail "c's update after its return was $KIND"
[ "$BASE" != None ] || fail "c's update after its return had no base"
[ "$CATCHUP" -lt "$((VOLUME_BYTES / 2))" ] || fail "c fetched $CATCHUP bytes of a $VOLUME_BYTES-byte volume"

say "the old base is released on b and a, and a's retention removes it"
mirror b
T1=$(date +%s.%N)
A lock list --json | json '"\n".join(l["snapshot"] for l in d)' | grep -q "$S0" && fail "a still holds $S0"
A prune vm1 --keep-last 2 >/dev/null
ids a | grep -q "$S0" && fail "a kept $S0 after its release"
mirror b
ids b | grep -q "$S0" && fail "b kept $S0 after a removed it"

say "every node verifies; c's newest equals a's image"
for n in a b c; do "$H" -q --state "state/$n" verify || fail "verify on $n"; done
C snapshot restore vm1@s10 --to restored.img
cmp -s restored.img vm1.img || fail "c's copy of s10 differs from a's image"
C status
stop a; stop b; stop c
PROPAGATION=$(python3 -c "print(round($T1 - $T0, 3))")
echo "{\"volume_bytes\": $VOLUME_BYTES, \"catchup_bytes\": $CATCHUP, \"catchup_kind\": \"$KIND\", \"seconds_from_return_to_release_upstream\": $PROPAGATION, \"ok\": true}"
