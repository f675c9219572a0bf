#!/usr/bin/env bash
# A backup application's life on one holdfast node (see examples/README.md), with restic as its
# backup tool: holdfast streams the snapshot into `restic backup --stdin`, the app-hold policy
# keeps the snapshot until the application relabels it, which it does only after restic
# succeeded; a failed backup leaves the hold in place.
#   HOLDFAST_BIN   the holdfast binary (default: target/debug/holdfast, else target/release)
#   PLUGINS        the policy components (default: plugins/target/wasm32-wasip2/debug)
# Needs restic (Debian: apt-get install restic). Exits non-zero if any step does not behave as
# described (3 if restic is missing).
set -euo pipefail
command -v restic >/dev/null || { echo "restic is not installed (apt-get install restic)" >&2; exit 3; }
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
"$H" policy add gfs --wasm "$P/gfs_retention.wasm" --volume db --config keep-last=1
"$H" policy list

say "hourly snapshots; one is marked for the nightly backup, and the hours go on"
for i in 1 2 3; do
  "$H" sample rewrite "$WORK/db.img" --fraction 0.05 --seed "$i" >/dev/null
  "$H" snapshot create db --name "hour-$i" --label backup=done >/dev/null
done
"$H" sample rewrite "$WORK/db.img" --fraction 0.05 --seed 9 >/dev/null
"$H" snapshot create db --name nightly --label backup=pending >/dev/null
"$H" sample rewrite "$WORK/db.img" --fraction 0.05 --seed 4 >/dev/null
"$H" snapshot create db --name hour-4 --label backup=done >/dev/null
"$H" lock list
"$H" lock list --holder app:policy.hold --json | grep -q '"nightly-backup"' || fail "app-hold did not lock the pending snapshot"

say "retention (keep-last=1) may not take it while the backup is pending"
"$H" prune db --dry-run | tee "$WORK/dry-run"
grep -q "kept   db@nightly: .*locked by app:policy.hold" "$WORK/dry-run" || fail "the dry run does not keep db@nightly for its hold"
"$H" snapshot delete db@nightly 2>/dev/null && fail "a held snapshot was deleted"

say "the backup application's repository: restic, in a local folder"
export RESTIC_REPOSITORY="$WORK/restic" RESTIC_PASSWORD=example-only RESTIC_CACHE_DIR="$WORK/restic-cache"
restic init -q

# The application's nightly job: stream the held snapshot into restic; mark it done only if
# restic succeeded (pipefail: a failure of either side fails the pipeline). If holdfast fails
# in the middle, restic (before 0.16's --stdin-from-command) still saves what it got: each
# attempt is tagged, and a failed attempt's partial snapshot is forgotten.
backup_nightly() {
  local attempt="attempt-$(date +%s%N)"
  if "$H" snapshot read db@nightly --hold-as nightly-backup \
      | restic backup -q --stdin --stdin-filename db.img --tag holdfast-nightly --tag "$attempt"; then
    "$H" snapshot label db@nightly backup=done
  else
    restic forget -q --tag "$attempt" >/dev/null 2>&1 || true
    echo "backup failed: db@nightly stays held for the next attempt" >&2
    return 1
  fi
}

say "a failed backup (restic refuses a wrong password) leaves the hold in place"
RESTIC_PASSWORD=wrong backup_nightly && fail "restic accepted a wrong password"
"$H" lock list --holder app:policy.hold --json | grep -q nightly-backup || fail "the hold went away after a failed backup"
"$H" prune db
"$H" snapshot show db@nightly >/dev/null || fail "retention took a snapshot whose backup failed"
restic snapshots -q --tag holdfast-nightly --json | grep -q '"id"' && fail "a failed attempt left a snapshot in restic"

say "the next attempt succeeds: restic has the snapshot's bytes"
backup_nightly
restic snapshots --tag holdfast-nightly
restic restore latest --target "$WORK/from-restic" -q
"$H" snapshot restore db@nightly --to "$WORK/check.img"
cmp -s "$WORK/from-restic/db.img" "$WORK/check.img" || fail "restic's copy differs from the snapshot"

say "copied and relabelled: the hold is released, and retention takes its course"
"$H" lock list --holder app:policy.hold --json | grep -q nightly-backup && fail "the hold was not released"
"$H" prune db
names=$("$H" snapshot list db --json | grep -o '"name": "[^"]*"' | cut -d'"' -f4 | tr '\n' ' ')
[ "$names" = "hour-4 " ] || fail "unexpected snapshots left: $names"
"$H" verify
"$H" lock history
echo "ok: backup application example passed" >&2
