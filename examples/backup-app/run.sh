#!/usr/bin/env bash
# A backup application's life on one holdfast node (see examples/README.md).
#   HOLDFAST_BIN   the holdfast binary (default: target/debug/holdfast, else target/release)
#   PLUGINS        the policy components (default: plugins/target/wasm32-wasip2/debug)
# Exits non-zero if any step does not behave as described.
set -euo pipefail
cd "$(dirname "$0")/../.."
H=${HOLDFAST_BIN:-target/debug/holdfast}
[ -x "$H" ] || H=target/release/holdfast
P=${PLUGINS:-plugins/target/wasm32-wasip2/debug}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HOLDFAST_STATE="$WORK/state"
say() { printf '\n== %s\n' "$*" >&2; }
fail() { echo "FAILED: $*" >&2; exit 1; }

say "a node with one volume"
"$H" init --node-id backup-node >/dev/null
"$H" sample write "$WORK/db.img" --size 8MiB --seed 7
"$H" volume add db --image "$WORK/db.img" --block-size 64KiB

say "the application registers its policies"
"$H" policy add hold --wasm "$P/app_hold.wasm" --volume db \
  --config label=backup:pending --config owner=nightly-backup
"$H" policy add gfs --wasm "$P/gfs_retention.wasm" --volume db --config keep-last=2
"$H" policy list

say "hourly snapshots; the newest one is marked for the nightly backup"
for i in 1 2 3; do
  "$H" sample rewrite "$WORK/db.img" --fraction 0.05 --seed "$i" >/dev/null
  "$H" snapshot create db --name "hour-$i" --label backup=done >/dev/null
done
"$H" sample rewrite "$WORK/db.img" --fraction 0.05 --seed 9 >/dev/null
"$H" snapshot create db --name nightly --label backup=pending >/dev/null
"$H" lock list
"$H" lock list --holder app:policy.hold --json | grep -q '"nightly-backup"' || fail "app-hold did not lock the pending snapshot"

say "retention may not take it while the backup is pending"
"$H" prune db --dry-run
"$H" snapshot delete db@nightly 2>/dev/null && fail "a held snapshot was deleted"

say "the backup tool reads it (any tool that takes stdin: restic backup --stdin, borg create ... -)"
"$H" snapshot read db@nightly --hold-as nightly-backup | sha256sum
"$H" snapshot restore db@nightly --to "$WORK/check.img"
cmp -s <("$H" snapshot read db@nightly --hold-as verify) "$WORK/check.img" || fail "read and restore differ"

say "copied: the application relabels it, and retention takes its course"
"$H" snapshot label db@nightly backup=done
"$H" lock list --holder app:policy.hold --json | grep -q nightly-backup && fail "the hold was not released"
"$H" prune db
names=$("$H" snapshot list db --json | grep -o '"name": "[^"]*"' | cut -d'"' -f4 | tr '\n' ' ')
[ "$names" = "hour-3 nightly " ] || fail "unexpected snapshots left: $names"
"$H" verify
"$H" lock history
echo "ok: backup application example passed" >&2
