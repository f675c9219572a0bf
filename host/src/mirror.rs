//! One mirror update, pulled by the downstream (DESIGN.md, "The flow of one mirror update"):
//!
//! 1. list the upstream's snapshots of the volume;
//! 2. compute the lock set: the base of this transfer, the locks this node's policies and
//!    applications hold, and every lock held here by this node's own downstreams, each only
//!    for snapshots that exist upstream;
//! 3. send it **before** the transfer (a set with an older generation is ignored upstream);
//! 4. fetch only the chunks this node lacks, verify each against its id, write them into
//!    packs that are durable before the manifest naming them is written, commit each snapshot
//!    (oldest first) in the catalog, which makes it visible;
//! 5. apply the upstream's deletions here, except snapshots locked here;
//! 6. send the new lock set **after** the transfer: the new base replaces the old.
//!
//! A crash anywhere leaves no half snapshot visible; chunks already in durable packs are not
//! fetched again on the next run.
//!
//! Each new manifest arrives as a delta against one this node holds (the base, then each
//! snapshot received), checked against the sender's digest of the whole block list. Only the
//! changed blocks are looked up in the repository: the others name chunks of a snapshot
//! committed here, which are here unless the repository is damaged, and finding such damage
//! is `verify`'s job. When reading the pack indexes reports a problem, every block is looked
//! up, and what is missing is fetched again.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::catalog::{SnapshotRecord, SnapshotStats, VolumeRecord};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::id::{ChunkId, NodeId, SnapshotId, VolumeName};
use crate::peer::client::{ManifestAnswer, PeerClient};
use crate::peer::{MAX_CHUNKS_PER_REQUEST, parse_frames};
use crate::repo::ChunkIndex;
use crate::repo::pack::PackBuilder;
use crate::snapshot::{self, Manifest, ManifestDelta};
use crate::softlock::{LockSetUpdate, LockType, NewLock, ReplaceOutcome};
use crate::state::Node;

/// Chunk requests in flight at once: keeps the link and both sides' disks busy.
const FETCH_CONCURRENCY: usize = 4;
/// Snapshots whose manifests one update holds at once (a catch-up goes in batches of this),
/// and most blocks they may list together (about 140 MB of block lists).
const RECEIVE_BATCH: usize = 16;
const RECEIVE_BLOCKS: u64 = 1 << 22;
/// Chunks per request: up to 16 MiB of blocks (256 of 64 KiB).
const CHUNKS_PER_REQUEST: usize = 256;
const CHUNKS_PER_REQUEST_BYTES: usize = 16 << 20;

/// Whether an update copied everything, only changes, or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransferKind {
    /// Nothing was here: everything was copied.
    Baseline,
    /// Only what changed since a base both ends hold.
    Incremental,
    /// Snapshots were here but none in common with the other end (the base was lost): only
    /// chunks found here by content were spared, and the report names no base.
    Resync,
    UpToDate,
}

impl TransferKind {
    /// What a transfer is: nothing to fetch, nothing here yet, no base in common, or an
    /// increment from a base.
    pub fn of(nothing_to_fetch: bool, nothing_here: bool, has_base: bool) -> TransferKind {
        if nothing_to_fetch {
            TransferKind::UpToDate
        } else if nothing_here {
            TransferKind::Baseline
        } else if !has_base {
            TransferKind::Resync
        } else {
            TransferKind::Incremental
        }
    }
}

impl std::fmt::Display for TransferKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransferKind::Baseline => "baseline",
            TransferKind::Incremental => "incremental",
            TransferKind::Resync => "resync",
            TransferKind::UpToDate => "up-to-date",
        })
    }
}

/// What one update did.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MirrorReport {
    pub volume: VolumeName,
    /// The region of the upstream's volume this relation mirrors, if only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<crate::id::RegionName>,
    pub upstream: NodeId,
    pub kind: TransferKind,
    /// The common snapshot the transfer started from, if any.
    pub base: Option<String>,
    pub received: Vec<String>,
    pub chunks_fetched: u64,
    /// Bytes received (what crossed the wire, compressed): chunk frames and manifests.
    pub bytes_fetched: u64,
    /// Plain bytes of those chunks.
    pub plain_bytes_fetched: u64,
    /// Of `bytes_fetched`, the manifests' (whole, or as deltas against the base).
    #[serde(default)]
    pub manifest_bytes_fetched: u64,
    /// Manifests received as a delta against the one before (the others came whole).
    #[serde(default)]
    pub manifest_deltas: u64,
    /// Snapshots deleted here because the upstream deleted them.
    pub deleted: Vec<String>,
    /// Deleted upstream but kept here because a lock holds them.
    pub kept_locked: Vec<String>,
    pub locks_sent_before: usize,
    pub locks_sent_after: usize,
    pub seconds: f64,
}

impl MirrorReport {
    /// A report of an update that did nothing (yet).
    fn nothing(volume: &VolumeName, upstream: &NodeId, started: Instant) -> MirrorReport {
        MirrorReport {
            volume: volume.clone(),
            region: None,
            upstream: upstream.clone(),
            kind: TransferKind::UpToDate,
            base: None,
            received: vec![],
            chunks_fetched: 0,
            bytes_fetched: 0,
            plain_bytes_fetched: 0,
            manifest_bytes_fetched: 0,
            manifest_deltas: 0,
            deleted: vec![],
            kept_locked: vec![],
            locks_sent_before: 0,
            locks_sent_after: 0,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// One line for logs and `status`.
    pub fn summary(&self) -> String {
        format!(
            "{}{}{} from {}: {} snapshot(s), {} chunks, {} bytes on the wire in {:.2}s; {} \
             deleted, {} kept for locks; locks sent {}/{}",
            self.kind,
            self.region
                .as_ref()
                .map_or_else(String::new, |r| format!(" of region {r}")),
            self.base
                .as_deref()
                .map_or_else(String::new, |b| format!(" (base {b})")),
            self.upstream,
            self.received.len(),
            self.chunks_fetched,
            self.bytes_fetched,
            self.seconds,
            self.deleted.len(),
            self.kept_locked.len(),
            self.locks_sent_before,
            self.locks_sent_after
        )
    }

    fn count_manifest(&mut self, bytes: usize, delta: bool) {
        self.bytes_fetched += bytes as u64;
        self.manifest_bytes_fetched += bytes as u64;
        self.manifest_deltas += delta as u64;
    }
}

/// The holder-visible value of a mirror's base lock: `holdfast://NODE/VOLUME`.
pub fn base_lock_value(node: &NodeId, volume: &VolumeName) -> String {
    format!("holdfast://{node}/{volume}")
}

/// The lock set this node sends upstream for `volume`: its base, the snapshots the transfer
/// about to run will fetch (sent before it, so that the upstream keeps them until they are
/// here; the set sent after it releases them), and every lock held here (applications,
/// policies, downstreams) on a snapshot the upstream has. `region` is the one the replica
/// holds, if only one (its base lock is then a qtree-name lock).
pub fn lock_set(
    node: &Node,
    volume: &VolumeName,
    region: Option<&crate::id::RegionName>,
    upstream_has: &HashSet<SnapshotId>,
    base: Option<SnapshotId>,
    transfer: &[SnapshotId],
) -> Result<Vec<NewLock>> {
    let me = &node.info.node_id;
    let mut out = Vec::new();
    let mut mine: Vec<SnapshotId> = base.into_iter().chain(transfer.iter().copied()).collect();
    mine.sort();
    mine.dedup();
    // A replica of one region holds a qtree: its base lock says which (`VOLUME/REGION`).
    let (lock_type, value) = match region {
        Some(region) => (LockType::QtreeName, format!("{volume}/{region}")),
        None => (LockType::DestinationPath, base_lock_value(me, volume)),
    };
    for s in mine.into_iter().filter(|s| upstream_has.contains(s)) {
        out.push(NewLock {
            snapshot: s,
            lock_type: lock_type.clone(),
            value: value.clone(),
            lease_ms: None,
            path: vec![me.clone()],
        });
    }
    for set in node.catalog.locks().sets(Some(volume))? {
        for l in set.locks {
            if !upstream_has.contains(&l.snapshot) {
                continue;
            }
            let mut path = l.path.clone();
            if path.last() != Some(me) {
                path.push(me.clone());
            }
            if path.len() >= crate::softlock::MAX_LOCK_PATH {
                tracing::warn!(
                    holder = %set.holder,
                    "a lock on {volume}@{} came through {} nodes; it is not passed further up",
                    l.snapshot,
                    path.len()
                );
                continue;
            }
            out.push(NewLock {
                snapshot: l.snapshot,
                lock_type: l.lock_type,
                value: l.value,
                lease_ms: None,
                path,
            });
        }
    }
    Ok(out)
}

/// A generation newer than any this process sent before (microseconds since the epoch).
fn next_generation() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::now_unix_us();
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// Sends a lock set; if the upstream holds a newer generation (clock skew, another process),
/// sends again just above it. If the upstream refuses the set (over its limits for this node),
/// this node's own locks (its base, its transfer, its applications' and policies') go without
/// those of its downstreams, with a warning: a downstream's excess must not stop this node
/// from mirroring.
async fn send_lock_set(
    client: &PeerClient,
    volume: &VolumeName,
    me: &NodeId,
    locks: Vec<NewLock>,
) -> Result<usize> {
    match send_lock_set_once(client, volume, me, locks.clone()).await {
        Err(Error::Denied(why)) => send_own_locks(client, volume, me, locks, why).await,
        other => other,
    }
}

/// After the upstream refused `locks` (saying `why`): this node's own locks without those of
/// its downstreams, or the refusal if none of them are its downstreams'.
async fn send_own_locks(
    client: &PeerClient,
    volume: &VolumeName,
    me: &NodeId,
    locks: Vec<NewLock>,
    why: String,
) -> Result<usize> {
    let passed_on = locks.iter().filter(|l| l.path.len() > 1).count();
    if passed_on == 0 {
        return Err(Error::Denied(why));
    }
    tracing::warn!(
        "upstream {} refused this node's lock set for {volume} ({why}); sending this node's \
         own locks without the {passed_on} of its downstreams",
        client.upstream
    );
    let own: Vec<NewLock> = locks.into_iter().filter(|l| l.path.len() <= 1).collect();
    send_lock_set_once(client, volume, me, own).await
}

async fn send_lock_set_once(
    client: &PeerClient,
    volume: &VolumeName,
    me: &NodeId,
    locks: Vec<NewLock>,
) -> Result<usize> {
    let n = locks.len();
    let mut update = LockSetUpdate {
        volume: volume.clone(),
        holder: crate::softlock::HolderId::mirror(me, volume),
        generation: next_generation(),
        locks,
    };
    for _ in 0..3 {
        match client.put_lock_set(&update).await? {
            ReplaceOutcome::IgnoredStale { stored, .. } => {
                update.generation = stored.checked_add(1).ok_or_else(|| {
                    Error::denied(format!(
                        "upstream {} says it holds generation {stored} of this node's lock set \
                         for {volume}, which no lock set can follow; its registry needs repair",
                        client.upstream
                    ))
                })?;
            }
            _ => return Ok(n),
        }
    }
    Err(Error::conflict(format!(
        "upstream {} keeps refusing this node's lock set for {volume} as older than its own",
        client.upstream
    )))
}

/// Takes the per-volume mirror lock (one update of a volume at a time, across processes),
/// waiting for an update that is running (the daemon's, say) to finish.
pub(crate) async fn lock_volume(node: &Node, volume: &VolumeName) -> Result<cap_std::fs::File> {
    let mut o = cap_std::fs::OpenOptions::new();
    o.read(true).write(true).create(true);
    let name = format!("mirror.{volume}.lock");
    let f = node
        .dir
        .open_with(&name, &o)
        .map_err(|e| Error::io(format!("opening {}/{name}", node.path.display()), e))?
        .into_std();
    match f.try_lock() {
        Ok(()) => Ok(cap_std::fs::File::from_std(f)),
        Err(std::fs::TryLockError::WouldBlock) => {
            tracing::warn!(
                "another mirror update of {volume} is running on this node; waiting for it"
            );
            crate::state::wait_for_lock(&f, false, &name).await?;
            Ok(cap_std::fs::File::from_std(f))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(format!("locking {name}"), e)),
    }
}

/// How many of `rest` the next batch of a transfer takes: as many snapshots as fit the batch
/// limits, at least one.
fn next_batch(rest: &[&SnapshotRecord]) -> usize {
    let mut n = 0;
    let mut blocks = 0u64;
    while n < rest.len().min(RECEIVE_BATCH) {
        blocks += snapshot::block_count(rest[n].size, rest[n].block_size);
        if n > 0 && blocks > RECEIVE_BLOCKS {
            break;
        }
        n += 1;
    }
    n
}

/// Checks every record an upstream listed before any of it is used, and returns them oldest
/// first: each must name this volume, have a valid block size (the same for all, and the
/// replica's own where one exists), a size whose block list a manifest can hold, labels that
/// pass the local rules, and an id listed once. Anything else is an upstream that is broken
/// or hostile: the update stops, refused (exit 9), and nothing is changed.
/// How far ahead of this node's clock a listed snapshot's id may lie.
const MAX_CLOCK_AHEAD_MS: u64 = 24 * 3_600_000;

pub fn check_listing(
    upstream: &NodeId,
    volume: &VolumeName,
    local_block_size: Option<u32>,
    mut list: Vec<SnapshotRecord>,
) -> Result<Vec<SnapshotRecord>> {
    let refuse = |what: String| {
        Error::denied(format!(
            "upstream {upstream} sent {what}; nothing was changed"
        ))
    };
    let mut block_size = local_block_size;
    let mut seen = HashSet::new();
    for r in &list {
        let it = format!("snapshot {} ({})", r.name, r.id);
        if &r.volume != volume {
            return Err(refuse(format!(
                "{it} of volume {} when asked for {volume}",
                r.volume
            )));
        }
        if let Err(e) = crate::volume::validate_block_size(r.block_size as u64) {
            return Err(refuse(format!("{it} with a bad block size: {e}")));
        }
        match block_size {
            Some(bs) if bs != r.block_size => {
                return Err(refuse(format!(
                    "{it} with block size {}, but the replica's is {bs}",
                    r.block_size
                )));
            }
            _ => block_size = Some(r.block_size),
        }
        if let Err(e) = snapshot::check_block_count(r.size, r.block_size, &it) {
            return Err(refuse(format!("{it} whose size cannot be held: {e}")));
        }
        for (k, v) in &r.labels {
            if let Err(e) = crate::id::validate_name("label key", k).and_then(|()| {
                crate::id::validate_text("label value", v, crate::id::MAX_LABEL_VALUE_BYTES)
            }) {
                return Err(refuse(format!("{it} with a label this node refuses: {e}")));
            }
        }
        if !seen.insert(r.id) {
            return Err(refuse(format!("{it} twice")));
        }
        // An id is made from its snapshot's creation time: one from far in the future would
        // sort after everything the upstream ever makes, and the replica would stop following.
        let now = crate::now_unix_ms();
        if r.id.unix_ms() > now.saturating_add(MAX_CLOCK_AHEAD_MS) {
            return Err(refuse(format!(
                "{it} made {} h from now by its id (an upstream's clock may run at most a day \
                 ahead of this node's)",
                (r.id.unix_ms() - now) / 3_600_000
            )));
        }
        if r.regions.len() > crate::region::MAX_REGIONS {
            return Err(refuse(format!(
                "{it} with {} regions (a volume has at most {})",
                r.regions.len(),
                crate::region::MAX_REGIONS
            )));
        }
        for (name, e) in &r.regions {
            let bs = r.block_size as u64;
            if e.length == 0
                || !e.offset.is_multiple_of(bs)
                || e.offset
                    .checked_add(e.length)
                    .is_none_or(|end| end > r.size)
            {
                return Err(refuse(format!(
                    "{it} with region {name} at bytes {}+{}, which is not a region of it",
                    e.offset, e.length
                )));
            }
        }
    }
    list.sort_by_key(|r| r.id);
    Ok(list)
}

/// The snapshots of a listing as a replica of `region` holds them: those that have the
/// region, each the size of the region, whose one region is all of it.
pub fn region_records(
    upstream: &NodeId,
    list: &[SnapshotRecord],
    region: &crate::id::RegionName,
) -> Result<Vec<SnapshotRecord>> {
    let out: Vec<SnapshotRecord> = list
        .iter()
        .filter_map(|r| {
            let e = r.regions.get(region)?;
            let mut x = r.clone();
            x.size = e.length;
            x.regions = BTreeMap::from([(
                region.clone(),
                crate::region::Extent {
                    offset: 0,
                    length: e.length,
                },
            )]);
            Some(x)
        })
        .collect();
    if out.is_empty()
        && let Some(newest) = list.last()
    {
        return Err(Error::not_found(format!(
            "no snapshot of {} on upstream {upstream} has a region {region} (its newest has {}); \
             name it there with `holdfast volume region add`, and it is mirrored from the next \
             snapshot on",
            newest.volume,
            if newest.regions.is_empty() {
                "none".to_string()
            } else {
                newest
                    .regions
                    .keys()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )));
    }
    if let (Some(newest), Some(last)) = (list.last(), out.last())
        && newest.id != last.id
    {
        tracing::warn!(
            "the newest snapshots of {} on upstream {upstream} have no region {region} (removed \
             there?); this replica stays at {}",
            newest.volume,
            last.name
        );
    }
    Ok(out)
}

/// Runs one update of `volume` from its configured upstream, and records how it went in the
/// node's transfer log (which `status` and the metrics read, whoever ran it).
pub async fn run(
    node: &Node,
    cfg: &NodeConfig,
    volume: &VolumeName,
    engine: Option<&crate::policy::PolicyEngine>,
    progress: &ProgressBar,
) -> Result<MirrorReport> {
    let upstream = cfg.mirror_of(volume).map(|r| r.upstream.to_string());
    let result = update(node, cfg, volume, engine, progress).await;
    if let Ok(upstream) = upstream {
        crate::transfers::record(
            &node.catalog,
            crate::transfers::Relation::Mirror {
                volume: volume.clone(),
                upstream,
            },
            result.as_ref().map(|r| crate::transfers::Outcome {
                kind: r.kind.to_string(),
                bytes: r.bytes_fetched,
                summary: r.summary(),
                report: serde_json::to_value(r).unwrap_or_default(),
            }),
        );
    }
    result
}

/// One update (see the module's doc for its steps).
async fn update(
    node: &Node,
    cfg: &NodeConfig,
    volume: &VolumeName,
    engine: Option<&crate::policy::PolicyEngine>,
    progress: &ProgressBar,
) -> Result<MirrorReport> {
    let started = Instant::now();
    let relation = cfg.mirror_of(volume)?;
    let upstream = cfg.upstream(&relation.upstream)?;
    let client = PeerClient::new(cfg, &node.info.node_id, upstream)?;
    let _volume_lock = lock_volume(node, volume).await?;
    let mut u = Update {
        node,
        client: &client,
        volume,
        engine,
        started,
        region: relation.region.as_ref(),
        holds: None,
        make: None,
        batch_cap: AtomicUsize::new(usize::MAX),
    };

    // 1. The upstream's snapshots, each checked before anything of it is used; of a region
    //    relation, those that have the region, as the region.
    let (listed, holds) = u.list().await?;
    let upstream_has: HashSet<SnapshotId> = listed.iter().map(|s| s.id).collect();
    let theirs = match &relation.region {
        Some(region) => region_records(&relation.upstream, &listed, region)?,
        None => listed,
    };
    // A region the upstream no longer lists at all (a grant that changed, say) is an error,
    // never a reason to release this replica's base or delete its snapshots.
    if let (Some(region), true) = (&relation.region, theirs.is_empty())
        && node.catalog.snapshots(volume).is_ok_and(|s| !s.is_empty())
    {
        return Err(Error::not_found(format!(
            "upstream {} lists no snapshot of {volume} with region {region} any more, though \
             this replica holds some; nothing was changed (is this node still granted the \
             region there?)",
            relation.upstream
        )));
    }
    u.make = match u.replica(&relation.upstream, &theirs, &holds)? {
        Replica::NothingYet => {
            return Ok(MirrorReport::nothing(volume, &relation.upstream, started));
        }
        Replica::Ready => None,
        Replica::Make(rec) => Some(*rec),
    };
    u.holds = holds;
    let ours = node.catalog.snapshots(volume)?;
    let base = ours
        .iter()
        .rev()
        .find(|s| upstream_has.contains(&s.id))
        .cloned();
    u.decide_policy_locks(crate::policy::Phase::BeforeMirror)?;
    // What this update fetches: the snapshots newer than our newest, oldest first.
    let newest_ours = ours.last().map(|s| s.id);
    let wanted: Vec<&SnapshotRecord> = theirs
        .iter()
        .filter(|s| newest_ours.is_none_or(|n| s.id > n))
        .collect();
    let mut report = MirrorReport::nothing(volume, &relation.upstream, started);
    report.region = relation.region.clone();
    report.kind = TransferKind::of(wanted.is_empty(), ours.is_empty(), base.is_some());
    report.base = base.as_ref().map(|b| b.display_ref());

    // 2–3. The lock set, before the transfer: the base and what the transfer fetches first.
    //      (A catch-up goes in batches; before each later batch, the set moves on to it, so
    //      that a set never pins more than a batch besides the base and what others hold.)
    let first: Vec<SnapshotId> = wanted[..next_batch(&wanted)].iter().map(|s| s.id).collect();
    u.stop_point(&report)?;
    report.locks_sent_before = u
        .pin(&upstream_has, base.as_ref().map(|b| b.id), &first)
        .await?
        .0;

    // 4. Fetch, verify and commit them, oldest first.
    if !wanted.is_empty() {
        u.transfer(&wanted, base.as_ref(), &upstream_has, &mut report, progress)
            .await?;
    }

    // 5. The upstream's deletions, except what a lock holds here.
    u.apply_deletions(&upstream_has, &mut report).await?;

    // 6. The lock set after the transfer: the new base replaces the old one. The base is the
    //    newest snapshot both ends hold, which is not always the newest here: one the upstream
    //    no longer has (a lock broken there) is kept here, and a base lock on it would pin
    //    nothing, leaving the snapshot the next update builds on unpinned upstream.
    u.decide_policy_locks(crate::policy::Phase::AfterMirror)?;
    let base_after = newest_in_common(node, volume, &upstream_has)?;
    report.locks_sent_after = u.send_locks(&upstream_has, base_after, &[]).await?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// One update under way: what its steps share.
struct Update<'a> {
    node: &'a Node,
    client: &'a PeerClient,
    volume: &'a VolumeName,
    engine: Option<&'a crate::policy::PolicyEngine>,
    started: Instant,
    /// The region of the upstream's volume this relation mirrors, if only one.
    region: Option<&'a crate::id::RegionName>,
    /// The region the replica holds (this relation's, or the one the upstream's volume holds).
    holds: Option<crate::id::RegionName>,
    /// The replica's record when this update makes it: written with its first snapshot.
    make: Option<VolumeRecord>,
    /// The most snapshots a batch may pin upstream: one, once the upstream refused a set
    /// pinning a whole batch (over the snapshots it lets this node pin).
    batch_cap: AtomicUsize,
}

/// Where an update writes.
enum Replica {
    /// Nothing here and nothing listed: there is nothing to mirror yet.
    NothingYet,
    /// The replica as it is.
    Ready,
    /// A replica made with the first snapshot committed (nothing is created before).
    Make(Box<VolumeRecord>),
}

/// The block size a listing must match: the local volume's, once it holds a snapshot. A
/// replica without snapshots (one an older release made before refusing an update) is made
/// again as the upstream lists it: what a refused listing said must not pin it.
fn replica_block_size(node: &Node, volume: &VolumeName) -> Result<Option<u32>> {
    match node.catalog.volume(volume) {
        Ok(v) if !node.catalog.snapshots(volume)?.is_empty() => Ok(Some(v.block_size)),
        Ok(_) | Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Update<'_> {
    fn debug(&self, what: &str) {
        tracing::debug!(ms = self.started.elapsed().as_millis(), "{what}");
    }

    /// A safe point between steps: on a stop request (SIGINT or SIGTERM to `mirror run`, a
    /// daemon stopping) the update ends here, keeping the snapshots it committed so far; the
    /// lock set sent last still holds what they and the next ones need.
    fn stop_point(&self, report: &MirrorReport) -> Result<()> {
        if !crate::shutdown::requested() {
            return Ok(());
        }
        Err(Error::unavailable_msg(format!(
            "the update of {} from upstream {} was interrupted (the process was asked to stop) \
             after receiving {} snapshot(s), which are kept; the next update goes on from there",
            self.volume,
            self.client.upstream,
            report.received.len()
        )))
    }

    /// Step 1: the upstream's snapshots of the volume, checked, oldest first, and the region
    /// the replica holds (this relation's, or the one the upstream's volume holds).
    async fn list(&self) -> Result<(Vec<SnapshotRecord>, Option<crate::id::RegionName>)> {
        let listed = self.client.snapshots(self.volume).await?;
        self.debug("listed the upstream's snapshots");
        let local_block_size = replica_block_size(self.node, self.volume)?;
        let holds = self.region.cloned().or(listed.region);
        let list = check_listing(
            &self.client.upstream,
            self.volume,
            local_block_size,
            listed.snapshots,
        )?;
        Ok((list, holds))
    }

    /// The local replica, if it exists, or the record it is made with when its first snapshot
    /// is committed: nothing is created before every check of the update has passed. A local
    /// volume of the same name is never written into, nor a replica of another region.
    fn replica(
        &self,
        upstream: &NodeId,
        theirs: &[SnapshotRecord],
        holds: &Option<crate::id::RegionName>,
    ) -> Result<Replica> {
        let (node, volume) = (self.node, self.volume);
        let marker = format!("mirror of {upstream}");
        let what = |r: &Option<crate::id::RegionName>| match r {
            Some(r) => format!("region {r} of {volume}"),
            None => format!("all of {volume}"),
        };
        let make = || match theirs.first() {
            None => Replica::NothingYet,
            Some(first) => {
                let mut rec =
                    VolumeRecord::replica(volume.clone(), first.block_size, marker.clone());
                rec.region = holds.clone();
                Replica::Make(Box::new(rec))
            }
        };
        match node.catalog.volume(volume) {
            // Empty: made again as this listing says (see `replica_block_size`).
            Ok(v)
                if v.upstream.as_deref() == Some(marker.as_str())
                    && node.catalog.snapshots(volume)?.is_empty() =>
            {
                Ok(make())
            }
            Ok(v) if v.upstream.is_some() && &v.region != holds => Err(Error::conflict(format!(
                "volume {volume} on this node holds {}, but this relation mirrors {}; a replica \
                 keeps what it was made of (mirror into another node, or delete the replica's \
                 snapshots and `holdfast volume remove {volume}` to start over)",
                what(&v.region),
                what(holds)
            ))),
            Ok(v) if v.upstream.as_deref() == Some(marker.as_str()) => Ok(Replica::Ready),
            Ok(v)
                if v.upstream
                    .as_deref()
                    .is_some_and(|u| u.starts_with("seeded from target ")) =>
            {
                // Seeded from a bucket (`mirror pull --target`): the snapshot ids are the
                // upstream's, so mirroring continues incrementally from here.
                node.catalog.modify_volume(volume, |now| {
                    now.upstream = Some(marker.clone());
                    Ok(())
                })?;
                Ok(Replica::Ready)
            }
            Ok(v) => Err(Error::conflict(format!(
                "volume {volume} on this node is {}; a mirror writes only into its own replica \
                 (remove the volume or mirror into another name)",
                v.upstream
                    .clone()
                    .unwrap_or_else(|| format!("a local volume of {}", v.source_label()))
            ))),
            Err(Error::NotFound(_)) => Ok(make()),
            Err(e) => Err(e),
        }
    }

    /// The locks of the policies that handle `phase`, brought up to date.
    fn decide_policy_locks(&self, phase: crate::policy::Phase) -> Result<()> {
        if let Some(engine) = self.engine {
            crate::policy::registry::decide_locks(
                self.node,
                engine,
                self.volume,
                phase,
                crate::policy::registry::Asked::HandlingPhase,
                true,
            )?;
        }
        Ok(())
    }

    /// Steps 3 and 6: this node's lock set, sent to the upstream (with its downstreams'
    /// locks left out if the upstream refuses the whole set: see [`send_lock_set`]).
    async fn send_locks(
        &self,
        upstream_has: &HashSet<SnapshotId>,
        base: Option<SnapshotId>,
        transfer: &[SnapshotId],
    ) -> Result<usize> {
        let set = self.set_of(upstream_has, base, transfer)?;
        let n = send_lock_set(self.client, self.volume, &self.node.info.node_id, set).await?;
        self.debug("sent the lock set");
        Ok(n)
    }

    fn set_of(
        &self,
        upstream_has: &HashSet<SnapshotId>,
        base: Option<SnapshotId>,
        transfer: &[SnapshotId],
    ) -> Result<Vec<NewLock>> {
        lock_set(
            self.node,
            self.volume,
            self.holds.as_ref(),
            upstream_has,
            base,
            transfer,
        )
    }

    /// Sends the lock set that pins `ids`, the next batch to fetch, besides the base and the
    /// locks held here. An upstream that refuses it (more snapshots than it lets this node
    /// pin: a long catch-up, or many locks here, against a small `max_snapshots`) is asked
    /// to pin the first of them alone, then none of them, and only then to take this node's
    /// own locks without its downstreams': a pin only saves a refetch, a downstream's lock
    /// protects what it depends on. The transfer then goes on one snapshot at a time; without
    /// a pin the upstream may delete the snapshot meanwhile, which fails this update and lets
    /// the next go on. Without all that, such a replica could never catch up. Returns the
    /// locks sent and how many of `ids` the batch fetches.
    async fn pin(
        &self,
        upstream_has: &HashSet<SnapshotId>,
        base: Option<SnapshotId>,
        ids: &[SnapshotId],
    ) -> Result<(usize, usize)> {
        let me = &self.node.info.node_id;
        let mut why = String::new();
        let mut sizes = vec![ids.len()];
        sizes.extend([1, 0].into_iter().filter(|&n| n < ids.len()));
        for take in sizes {
            let set = self.set_of(upstream_has, base, &ids[..take])?;
            match send_lock_set_once(self.client, self.volume, me, set).await {
                Err(Error::Denied(w)) => why = w,
                other => {
                    let n = other?;
                    if take < ids.len() {
                        self.batch_cap.store(1, Ordering::Relaxed);
                        tracing::warn!(
                            "upstream {} refused a lock set pinning the {} snapshot(s) of {} to \
                             fetch next ({why}); fetching them one at a time, {}",
                            self.client.upstream,
                            ids.len(),
                            self.volume,
                            if take == 0 {
                                "unpinned (if the upstream deletes one meanwhile, this update \
                                 fails and the next goes on)"
                            } else {
                                "each pinned"
                            }
                        );
                    }
                    self.debug("sent the lock set");
                    return Ok((n, take.max(1).min(ids.len())));
                }
            }
        }
        // Even the base and the locks held here with nothing pinned are too many: this node's
        // own locks go without its downstreams' (as `send_lock_set` does), or the refusal
        // stands.
        self.batch_cap.store(1, Ordering::Relaxed);
        let set = self.set_of(upstream_has, base, &[])?;
        let n = send_own_locks(self.client, self.volume, me, set, why).await?;
        Ok((n, ids.len().min(1)))
    }

    /// Step 4: fetches, verifies and commits `wanted`, oldest first, in batches whose
    /// manifests are looked up in the repository together.
    async fn transfer(
        &self,
        wanted: &[&SnapshotRecord],
        base: Option<&SnapshotRecord>,
        upstream_has: &HashSet<SnapshotId>,
        report: &mut MirrorReport,
        progress: &ProgressBar,
    ) -> Result<()> {
        let (node, client) = (self.node, self.client);
        // gc must not remove a pack this update reuses or writes before it is committed.
        let _repo_lock = node.lock_repo_shared().await?;
        // The base's manifest: the upstream sends each new manifest as a delta against the
        // one before it.
        let mut prev = match base {
            Some(b) => snapshot::load_manifest(&node.repo, b)
                .await
                .inspect_err(|e| tracing::warn!("{e}; asking the upstream for whole manifests"))
                .ok(),
            None => None,
        };
        self.debug("loaded the base");
        // Where the chunks this update looks for are held here (filled as it goes).
        let mut index = ChunkIndex::default();
        let mut rest: &[&SnapshotRecord] = wanted;
        let mut first_batch = true;
        while !rest.is_empty() {
            let mut n = next_batch(rest).min(self.batch_cap.load(Ordering::Relaxed));
            self.stop_point(report)?;
            if !std::mem::take(&mut first_batch) {
                // The set moves on: the newest received is the base, this batch is pinned.
                let ids: Vec<SnapshotId> = rest[..n].iter().map(|s| s.id).collect();
                let newest = node.catalog.snapshots(self.volume)?.last().map(|s| s.id);
                n = self.pin(upstream_has, newest, &ids).await?.1;
            }
            let (batch, later) = rest.split_at(n);
            rest = later;
            // The batch's manifests first, each a delta against the one before, so that one
            // look-up in the repository serves them all (a catch-up of many snapshots).
            let mut got = Vec::with_capacity(batch.len());
            for rec in batch {
                self.stop_point(report)?;
                let received = Receive {
                    node,
                    client,
                    rec,
                    prev: got.last().map(|g: &Received| &g.manifest).or(prev.as_ref()),
                    region: self.region,
                    make: None,
                }
                .manifest(report)
                .await?;
                got.push(received);
            }
            self.debug("received the manifests");
            look_up_all(node, &mut index, &mut got).await?;
            self.debug("looked up the chunks");
            for (rec, received) in batch.iter().zip(got) {
                let r = Receive {
                    node,
                    client,
                    rec,
                    prev: None,
                    region: self.region,
                    make: self.make.as_ref(),
                };
                prev = Some(r.store(received, &mut index, report, progress).await?);
                tracing::debug!(ms = self.started.elapsed().as_millis(), snapshot = %rec.display_ref(), "committed");
                report.received.push(rec.display_ref());
                crate::peer::client::crash_point(&node.info.node_id, "mirror-committed").await;
            }
        }
        Ok(())
    }

    /// Step 5: deletes here what the upstream deleted, except what a lock holds here; the
    /// newest snapshot stays (the next update fetches what is newer than it).
    async fn apply_deletions(
        &self,
        upstream_has: &HashSet<SnapshotId>,
        report: &mut MirrorReport,
    ) -> Result<()> {
        let ours = self.node.catalog.snapshots(self.volume)?;
        let newest = ours.last().map(|s| s.id);
        for s in &ours {
            if upstream_has.contains(&s.id) || Some(s.id) == newest {
                continue;
            }
            match snapshot::delete(self.node, s, None).await {
                Ok(_) => report.deleted.push(s.display_ref()),
                Err(Error::Locked(_)) => report.kept_locked.push(s.display_ref()),
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.debug("applied deletions");
        Ok(())
    }
}

/// Sends this node's current lock set for `volume` to its upstream without a transfer: run
/// when a downstream's lock set changed here, so that locks cross every hop of a cascade
/// within moments instead of waiting for each hop's next scheduled update. It holds the
/// volume's mirror lock, so it never races an update's own lock sets.
pub async fn forward_locks(node: &Node, cfg: &NodeConfig, volume: &VolumeName) -> Result<usize> {
    let relation = cfg.mirror_of(volume)?;
    let upstream = cfg.upstream(&relation.upstream)?;
    let client = PeerClient::new(cfg, &node.info.node_id, upstream)?;
    let _volume_lock = lock_volume(node, volume).await?;
    let listed = client.snapshots(volume).await?;
    let local_block_size = replica_block_size(node, volume)?;
    let theirs = check_listing(&client.upstream, volume, local_block_size, listed.snapshots)?;
    let upstream_has: HashSet<SnapshotId> = theirs.iter().map(|s| s.id).collect();
    let base = newest_in_common(node, volume, &upstream_has)?;
    let region = node.catalog.volume(volume).ok().and_then(|v| v.region);
    let locks = lock_set(node, volume, region.as_ref(), &upstream_has, base, &[])?;
    send_lock_set(&client, volume, &node.info.node_id, locks).await
}

/// The newest snapshot of `volume` held here and upstream: the base of this node's lock set.
fn newest_in_common(
    node: &Node,
    volume: &VolumeName,
    upstream_has: &HashSet<SnapshotId>,
) -> Result<Option<SnapshotId>> {
    Ok(node
        .catalog
        .snapshots(volume)?
        .iter()
        .rev()
        .find(|s| upstream_has.contains(&s.id))
        .map(|s| s.id))
}

/// One snapshot to fetch, verify and commit.
struct Receive<'a> {
    node: &'a Node,
    client: &'a PeerClient,
    rec: &'a SnapshotRecord,
    /// The manifest of a snapshot held here and upstream, to receive this one as a delta of.
    prev: Option<&'a Manifest>,
    /// The region of it to receive, if only one.
    region: Option<&'a crate::id::RegionName>,
    /// The replica's record, when this update makes it with its first commit.
    make: Option<&'a VolumeRecord>,
}

/// A manifest received, and what to look for in the repository before its chunks are fetched.
struct Received {
    manifest: Manifest,
    /// Its stored form.
    stored: Vec<u8>,
    /// The blocks that differ from the manifest it came as a delta of (`None`: it came whole).
    changed: Option<Vec<u64>>,
    /// The blocks whose chunks this node may lack: the changed ones (the others name chunks
    /// of a snapshot committed here), or every block.
    candidates: Vec<(usize, ChunkId)>,
}

impl Received {
    fn candidates(&self, every_block: bool) -> Vec<(usize, ChunkId)> {
        let m = &self.manifest;
        match self.changed.as_deref().filter(|_| !every_block) {
            Some(changed) => changed
                .iter()
                .filter_map(|&i| {
                    m.blocks
                        .get(i as usize)
                        .flatten()
                        .map(|id| (i as usize, id))
                })
                .collect(),
            None => m.blocks.data().collect(),
        }
    }
}

/// Finds where this node holds the chunks of the `got` manifests' candidate blocks, in one
/// look-up. When reading the pack indexes reports a problem (a pack whose chunks may belong
/// to the base too), every block of every manifest becomes a candidate.
async fn look_up_all(node: &Node, index: &mut ChunkIndex, got: &mut [Received]) -> Result<()> {
    for r in got.iter_mut() {
        r.candidates = r.candidates(false);
    }
    let all: Vec<(usize, ChunkId)> = got.iter().flat_map(|r| r.candidates.clone()).collect();
    let mut problems = look_up(node, index, &all).await?;
    if !problems.is_empty() && got.iter().any(|r| r.changed.is_some()) {
        for r in got.iter_mut() {
            r.candidates = r.candidates(true);
        }
        let all: Vec<(usize, ChunkId)> = got.iter().flat_map(|r| r.candidates.clone()).collect();
        problems = look_up(node, index, &all).await?;
    }
    for p in problems {
        tracing::warn!("{p}; its chunks will be fetched again");
    }
    Ok(())
}

/// A whole manifest from an upstream: format 2 only (what was asked for; format 1 is zstd JSON
/// that a few KiB can inflate to gigabytes), decoded off the async threads.
async fn full_manifest(raw: bytes::Bytes, what: &str) -> Result<Manifest> {
    if !snapshot::manifest::is_format_2(&raw) {
        return Err(Error::denied(format!(
            "{what}: the upstream answered with a manifest in another format than the format 2 \
             asked for"
        )));
    }
    let what = what.to_string();
    tokio::task::spawn_blocking(move || Manifest::decode(&raw, &what))
        .await
        .map_err(|e| Error::internal(format!("manifest decoder: {e}")))?
}

impl Receive<'_> {
    fn what(&self) -> String {
        format!(
            "{} from upstream {}",
            self.rec.display_ref(),
            self.client.upstream
        )
    }

    /// The manifest, as a delta against `prev` when there is one, checked against the listing.
    async fn manifest(&self, report: &mut MirrorReport) -> Result<Received> {
        let what = &self.what();
        let rec = self.rec;
        let limit = crate::peer::client::manifest_limit(rec.size, rec.block_size);
        let answer = self
            .client
            .manifest(
                &rec.volume,
                &rec.id,
                self.prev.map(|p| p.id),
                (rec.size, rec.block_size),
                self.region,
            )
            .await?;
        let (m, changed) = match answer {
            ManifestAnswer::Delta(raw) => {
                // The manifest crosses the wire too: count it.
                report.count_manifest(raw.len(), true);
                let prev = self.prev.ok_or_else(|| {
                    Error::corrupt(format!(
                        "{what}: the upstream sent a delta nobody asked for"
                    ))
                })?;
                let (raw2, what2) = (raw.clone(), what.clone());
                let delta = tokio::task::spawn_blocking(move || {
                    ManifestDelta::decode_at_most(&raw2, &what2, limit as u64)
                })
                .await
                .map_err(|e| Error::internal(format!("manifest decoder: {e}")))??;
                match delta.apply(prev, what) {
                    Ok(m) => {
                        let mut changed: Vec<u64> = delta.changes.iter().map(|(i, _)| *i).collect();
                        // A block the delta leaves as it was may change its length when the
                        // size changes (the old and the new last block): check those too.
                        if m.size != prev.size {
                            for n in [prev.blocks.len(), m.blocks.len()] {
                                if let Some(last) = n.checked_sub(1).filter(|l| *l < m.blocks.len())
                                {
                                    changed.push(last as u64);
                                }
                            }
                            changed.sort_unstable();
                            changed.dedup();
                        }
                        (m, Some(changed))
                    }
                    Err(e) => {
                        // A diverged copy of the base here: take the whole manifest instead.
                        tracing::warn!("{e}; fetching the whole manifest");
                        let raw = match self
                            .client
                            .manifest(
                                &rec.volume,
                                &rec.id,
                                None,
                                (rec.size, rec.block_size),
                                self.region,
                            )
                            .await?
                        {
                            ManifestAnswer::Full(raw) => raw,
                            ManifestAnswer::Delta(_) => {
                                return Err(Error::corrupt(format!(
                                    "{what}: the upstream sent a delta nobody asked for"
                                )));
                            }
                        };
                        report.count_manifest(raw.len(), false);
                        (full_manifest(raw, what).await?, None)
                    }
                }
            }
            ManifestAnswer::Full(raw) => {
                report.count_manifest(raw.len(), false);
                (full_manifest(raw, what).await?, None)
            }
        };
        let mut m = m;
        if m.id != rec.id
            || m.volume != rec.volume
            || m.size != rec.size
            || m.block_size != rec.block_size
        {
            return Err(Error::corrupt(format!(
                "the manifest of {what} does not match the snapshot it was listed as"
            )));
        }
        // What this node stores is the block list it received under the header it checked:
        // the name and labels of the listing, which passed the local rules.
        m.name = rec.name.clone();
        m.labels = rec.labels.clone();
        let m2 = m.clone();
        let stored = tokio::task::spawn_blocking(move || m2.encode())
            .await
            .map_err(|e| Error::internal(format!("manifest encoder: {e}")))??;
        Ok(Received {
            manifest: m,
            stored,
            changed,
            candidates: vec![],
        })
    }

    /// Fetches the chunks of a received manifest this node lacks, verifies them, and commits
    /// the snapshot; returns its manifest (the next batch's base).
    async fn store(
        self,
        received: Received,
        index: &mut ChunkIndex,
        report: &mut MirrorReport,
        progress: &ProgressBar,
    ) -> Result<Manifest> {
        let (node, client, rec) = (self.node, self.client, self.rec);
        let what = self.what();
        let t = Instant::now();
        let Received {
            manifest: m,
            stored: stored_manifest,
            candidates,
            ..
        } = received;
        // The chunks we lack, each once.
        let mut seen = HashSet::new();
        let needed: Vec<ChunkId> = candidates
            .iter()
            .map(|(_, id)| id)
            .filter(|id| !index.contains(id) && seen.insert(**id))
            .copied()
            .collect();
        progress.set_length(progress.length().unwrap_or(0) + needed.len() as u64);
        let mut stats = SnapshotStats {
            blocks: m.blocks.len() as u64,
            zero_blocks: m.blocks.zero_blocks() as u64,
            ..Default::default()
        };

        let mut builder = PackBuilder::new();
        // Up to 16 MiB of blocks per request, whatever the block size.
        let per_request =
            (CHUNKS_PER_REQUEST_BYTES / rec.block_size as usize).clamp(1, CHUNKS_PER_REQUEST);
        let mut batches = needed.chunks(per_request).map(<[ChunkId]>::to_vec);
        let mut inflight: JoinSet<Result<(usize, Vec<ChunkId>, bytes::Bytes)>> = JoinSet::new();
        let mut order = 0usize;
        let mut pending: BTreeMap<usize, (Vec<ChunkId>, bytes::Bytes)> = BTreeMap::new();
        let mut next_to_store = 0usize;
        let client = Arc::new(client.clone());
        loop {
            // Asked to stop: a safe point. What was stored is made durable (the next run does
            // not fetch it again); the snapshot is not committed.
            if crate::shutdown::requested() {
                if !builder.is_empty() {
                    seal(node, std::mem::take(&mut builder), index).await?;
                }
                return Err(Error::unavailable_msg(format!(
                    "{what} was interrupted (the process was asked to stop) and not committed; \
                     the chunks fetched for it are kept, and so are the {} snapshot(s) received \
                     before it: the next update goes on from there",
                    report.received.len()
                )));
            }
            // Answers that came early wait in `pending` for their turn: together with those
            // in flight they never exceed the concurrency, so memory stays bounded even if
            // the upstream holds back the one answer everything waits for.
            while inflight.len() + pending.len() < FETCH_CONCURRENCY {
                let Some(batch) = batches.next() else { break };
                let (c, vol, id, n) = (client.clone(), rec.volume.clone(), rec.id, order);
                let region = self.region.cloned();
                let block_size = rec.block_size;
                order += 1;
                inflight.spawn(async move {
                    let body =
                        fetch_with_retry(&c, &vol, &id, batch.clone(), block_size, region.as_ref())
                            .await?;
                    Ok((n, batch, body))
                });
            }
            // A stop request is a safe point even while waiting on the upstream.
            let done = tokio::select! {
                d = inflight.join_next() => d,
                _ = crate::shutdown::wait() => continue,
            };
            let Some(done) = done else {
                break;
            };
            let (n, batch, body) =
                done.map_err(|e| Error::internal(format!("chunk fetch task failed: {e}")))??;
            pending.insert(n, (batch, body));
            // Store in request order so packs fill deterministically.
            while let Some((batch, body)) = pending.remove(&next_to_store) {
                next_to_store += 1;
                report.bytes_fetched += body.len() as u64;
                let asked: HashSet<ChunkId> = batch.iter().copied().collect();
                tracing::debug!(
                    ms = t.elapsed().as_millis(),
                    bytes = body.len(),
                    "fetched chunks"
                );
                let (body, verified) = tokio::task::spawn_blocking(move || {
                    verify_frames(&body, &asked).map(|v| (body, v))
                })
                .await
                .map_err(|e| Error::internal(format!("chunk verifier failed: {e}")))??;
                for (id, encoding, at, raw_len) in verified {
                    let stored = &body[at];
                    report.chunks_fetched += 1;
                    report.plain_bytes_fetched += raw_len as u64;
                    stats.new_chunks += 1;
                    stats.new_bytes += raw_len as u64;
                    stats.new_stored_bytes += stored.len() as u64;
                    builder.add(id, encoding, stored, raw_len);
                    progress.inc(1);
                    if builder.is_full() {
                        seal(node, std::mem::take(&mut builder), index).await?;
                    }
                }
            }
        }
        tracing::debug!(ms = t.elapsed().as_millis(), "verified chunks");
        if !builder.is_empty() {
            seal(node, builder, index).await?;
        }
        tracing::debug!(ms = t.elapsed().as_millis(), "stored the chunks");
        crate::peer::client::crash_point(&node.info.node_id, "mirror-chunks-stored").await;
        // Every block must now be readable here, from a chunk of its length (a region's cut
        // last block is shorter than the whole block the upstream holds).
        for (i, id) in &candidates {
            let Some(loc) = index.get(id) else {
                return Err(Error::corrupt(format!(
                    "{what}: block {i} needs chunk {id}, which the upstream did not send"
                )));
            };
            let want = snapshot::block_len(m.size, m.block_size, *i as u64);
            if loc.raw_length as usize != want {
                return Err(Error::corrupt(format!(
                    "{what}: block {i} is {want} bytes, but the chunk {id} the upstream named \
                     for it has {}",
                    loc.raw_length
                )));
            }
        }
        match node
            .repo
            .put_manifest(&rec.volume, &rec.id, stored_manifest.clone())
            .await
        {
            Ok(()) => {}
            // A run that stopped between the manifest and the commit left it: the same
            // manifest is this one (the catalog does not have the snapshot: it was never
            // committed); anything else stops the update.
            Err(Error::Conflict(_))
                if node
                    .repo
                    .read_manifest_if_present(&rec.volume, &rec.id)
                    .await?
                    .is_some_and(|b| b[..] == stored_manifest[..]) =>
            {
                tracing::info!("{what}: using the manifest an interrupted update left");
            }
            Err(e) => return Err(e),
        }
        tracing::debug!(ms = t.elapsed().as_millis(), "stored the manifest");
        crate::peer::client::crash_point(&node.info.node_id, "mirror-manifest-stored").await;
        let mut local = m.record(stats);
        local.labels = rec.labels.clone();
        local.regions = rec.regions.clone();
        let committed = match self.make {
            Some(volume) => node.catalog.commit_first_replica_snapshot(volume, &local),
            None => node.catalog.commit_replica_snapshot(&local),
        };
        if let Err(e) = committed {
            let _ = node.repo.delete_manifest(&rec.volume, &rec.id).await;
            return Err(e);
        }
        tracing::info!(snapshot = %local.display_ref(), id = %local.id, new_chunks = local.stats.new_chunks, "received");
        Ok(m)
    }
}

/// Adds to `index` where this node holds the chunks of `blocks` it does not know yet;
/// returns the problems found with the repository's pack indexes.
async fn look_up(
    node: &Node,
    index: &mut ChunkIndex,
    blocks: &[(usize, ChunkId)],
) -> Result<Vec<String>> {
    let wanted: HashSet<ChunkId> = blocks
        .iter()
        .map(|(_, id)| *id)
        .filter(|id| !index.contains(id))
        .collect();
    if wanted.is_empty() {
        return Ok(vec![]);
    }
    let (found, problems) = node.find_chunks(&wanted).await?;
    index.merge(found);
    Ok(problems)
}

/// Seals a pack, makes it durable and adds it to the index.
async fn seal(node: &Node, builder: PackBuilder, index: &mut ChunkIndex) -> Result<()> {
    let pack = tokio::task::spawn_blocking(move || builder.finish())
        .await
        .map_err(|e| Error::internal(format!("pack sealer failed: {e}")))??;
    node.repo.put_pack(&pack).await?;
    node.remember_packs(std::slice::from_ref(&pack.index));
    index.insert(pack.index);
    Ok(())
}

/// Verified chunks: id, encoding, where its stored bytes lie in the body, plain length.
type Verified = Vec<(
    ChunkId,
    crate::chunk::Encoding,
    std::ops::Range<usize>,
    usize,
)>;

/// Checks that the frames are exactly the chunks asked for and that each decodes to its id.
fn verify_frames(body: &[u8], asked: &HashSet<ChunkId>) -> Result<Verified> {
    use rayon::prelude::*;
    let frames = parse_frames(body)?;
    if frames.len() != asked.len() {
        return Err(Error::corrupt(format!(
            "the upstream sent {} chunks for {} asked",
            frames.len(),
            asked.len()
        )));
    }
    // As many frames as chunks asked, each asked and none twice: then every one asked came.
    let mut seen = HashSet::with_capacity(frames.len());
    if let Some(f) = frames.iter().find(|f| !seen.insert(f.id)) {
        return Err(Error::corrupt(format!(
            "the upstream sent chunk {} twice",
            f.id
        )));
    }
    frames
        .par_iter()
        .map(|f| {
            if !asked.contains(&f.id) {
                return Err(Error::corrupt(format!(
                    "the upstream sent chunk {} that was not asked for",
                    f.id
                )));
            }
            crate::chunk::decode(&f.id, f.encoding, f.stored, f.raw_len)?;
            Ok((
                f.id,
                f.encoding,
                f.offset..f.offset + f.stored.len(),
                f.raw_len,
            ))
        })
        .collect()
}

async fn fetch_with_retry(
    client: &PeerClient,
    volume: &VolumeName,
    id: &SnapshotId,
    batch: Vec<ChunkId>,
    block_size: u32,
    region: Option<&crate::id::RegionName>,
) -> Result<bytes::Bytes> {
    debug_assert!(batch.len() <= MAX_CHUNKS_PER_REQUEST);
    let mut delay = Duration::from_millis(200);
    for attempt in 1.. {
        match client
            .chunks(volume, id, batch.clone(), block_size, region)
            .await
        {
            Err(e) if e.is_transient() && attempt < 4 => {
                tracing::warn!(attempt, "fetching chunks failed, retrying: {e}");
                crate::back_off(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    unreachable!("the loop returns")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Extent;
    use crate::snapshot::manifest::tests::{c, manifest};

    const BS: u32 = 64 << 10;

    fn rec(volume: &str, unix_ms: u64, size: u64, block_size: u32) -> SnapshotRecord {
        let mut m = manifest(size, block_size, vec![]);
        m.volume = volume.parse().unwrap();
        m.id = SnapshotId::generate(unix_ms);
        m.name = format!("s{unix_ms}").parse().unwrap();
        m.record(Default::default())
    }

    fn check(local: Option<u32>, list: Vec<SnapshotRecord>) -> Result<Vec<SnapshotRecord>> {
        check_listing(&"up".parse().unwrap(), &"v".parse().unwrap(), local, list)
    }

    /// The listing is refused as an upstream's fault (exit 9), and the message says why.
    #[track_caller]
    fn refused(r: Result<Vec<SnapshotRecord>>, why: &str) {
        match r {
            Err(Error::Denied(m)) => {
                assert!(m.contains(why), "{m:?} does not say {why:?}");
                assert!(m.contains("upstream up sent"), "{m:?}");
            }
            other => panic!("not refused ({why}): {other:?}"),
        }
    }

    #[test]
    fn a_good_listing_comes_back_oldest_first() {
        let now = crate::now_unix_ms();
        let (a, b, c) = (
            rec("v", now - 2000, 4 * BS as u64, BS),
            rec("v", now - 1000, 4 * BS as u64, BS),
            rec("v", now, 5 * BS as u64, BS),
        );
        let got = check(Some(BS), vec![c.clone(), a.clone(), b.clone()]).unwrap();
        assert_eq!(got, vec![a, b, c]);
        assert_eq!(check(None, vec![]).unwrap(), vec![]);
    }

    #[test]
    fn a_listing_that_does_not_fit_this_replica_is_refused() {
        let now = crate::now_unix_ms();
        let ok = || rec("v", now, 4 * BS as u64, BS);
        refused(check(None, vec![rec("w", now, 4096, BS)]), "of volume w");
        refused(
            check(None, vec![rec("v", now, 4096, 3000)]),
            "bad block size",
        );
        refused(
            check(Some(2 * BS), vec![ok()]),
            &format!("but the replica's is {}", 2 * BS),
        );
        // Two records that disagree with each other, with no replica yet.
        refused(
            check(None, vec![ok(), rec("v", now + 1, 4096, 2 * BS)]),
            &format!("but the replica's is {BS}"),
        );
        let too_big = (crate::snapshot::manifest::MAX_BLOCKS + 1) * 4096;
        refused(
            check(None, vec![rec("v", now, too_big, 4096)]),
            "cannot be held",
        );
        // Exactly the most blocks a manifest lists is fine.
        check(
            None,
            vec![rec(
                "v",
                now,
                crate::snapshot::manifest::MAX_BLOCKS * 4096,
                4096,
            )],
        )
        .unwrap();
    }

    #[test]
    fn labels_ids_and_clocks_an_upstream_cannot_send() {
        let now = crate::now_unix_ms();
        let ok = || rec("v", now, 4 * BS as u64, BS);
        let mut bad_key = ok();
        bad_key.labels.insert("no spaces here".into(), "x".into());
        refused(check(None, vec![bad_key]), "label this node refuses");
        let mut bad_value = ok();
        bad_value
            .labels
            .insert("k".into(), "x".repeat(crate::id::MAX_LABEL_VALUE_BYTES + 1));
        refused(check(None, vec![bad_value]), "label this node refuses");
        let twice = ok();
        refused(check(None, vec![twice.clone(), twice]), "twice");
        let hour = 3_600_000;
        refused(
            check(None, vec![rec("v", now + 25 * hour + hour / 2, 4096, BS)]),
            "made 25 h from now",
        );
        // Less than a day ahead: a clock that runs fast, not a hostile id.
        check(None, vec![rec("v", now + 23 * hour, 4096, BS)]).unwrap();
    }

    #[test]
    fn regions_must_lie_inside_their_snapshot() {
        let now = crate::now_unix_ms();
        let size = 8 * BS as u64;
        let with = |extents: &[(u64, u64)]| {
            let mut r = rec("v", now, size, BS);
            for (i, &(offset, length)) in extents.iter().enumerate() {
                r.regions
                    .insert(format!("r{i}").parse().unwrap(), Extent { offset, length });
            }
            check(None, vec![r])
        };
        let bs = BS as u64;
        // The whole volume, and the last block, are regions of it.
        with(&[(0, size), (size - bs, bs)]).unwrap();
        for (offset, length) in [
            (0, 0),                // empty
            (bs / 2, bs),          // not on a block boundary
            (size - bs, bs + 1),   // past the end
            (size, bs),            // after the end
            (bs, u64::MAX - 1000), // wraps around
        ] {
            refused(with(&[(offset, length)]), "which is not a region of it");
        }
        let most: Vec<(u64, u64)> = vec![(0, bs); crate::region::MAX_REGIONS];
        with(&most).unwrap();
        let more: Vec<(u64, u64)> = vec![(0, bs); crate::region::MAX_REGIONS + 1];
        refused(with(&more), "regions (a volume has at most");
    }

    fn frames(chunks: &[(ChunkId, crate::chunk::Encoding, Vec<u8>, u32)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (id, enc, stored, raw) in chunks {
            crate::peer::write_frame(&mut body, id, *enc, *raw, stored);
        }
        body
    }

    #[test]
    fn received_chunks_are_exactly_those_asked_for_and_each_is_its_hash() {
        let datas: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 10_000]).collect();
        let chunks: Vec<_> = datas
            .iter()
            .map(|d| {
                let (enc, stored) = crate::chunk::encode(d).unwrap();
                (crate::chunk::hash(d), enc, stored, d.len() as u32)
            })
            .collect();
        let asked: HashSet<ChunkId> = chunks.iter().map(|c| c.0).collect();
        let body = frames(&chunks);
        let got = verify_frames(&body, &asked).unwrap();
        assert_eq!(got.len(), 3);
        for ((id, enc, range, raw), (cid, cenc, stored, craw)) in got.iter().zip(&chunks) {
            assert_eq!((id, enc, *raw), (cid, cenc, *craw as usize));
            assert_eq!(&body[range.clone()], &stored[..], "where {id}'s bytes lie");
        }

        let err = |body: &[u8], asked: &HashSet<ChunkId>| match verify_frames(body, asked) {
            Err(Error::Corrupt(m)) => m,
            other => panic!("accepted: {other:?}"),
        };
        // One missing, one more than asked.
        let m = err(&frames(&chunks[..2]), &asked);
        assert!(m.contains("sent 2 chunks for 3 asked"), "{m}");
        let fewer: HashSet<ChunkId> = chunks[..2].iter().map(|c| c.0).collect();
        assert!(err(&body, &fewer).contains("sent 3 chunks for 2 asked"));
        // As many as asked, but one of them another.
        let other = vec![9u8; 100];
        let mut swapped = chunks[..2].to_vec();
        swapped.push((
            crate::chunk::hash(&other),
            crate::chunk::Encoding::Raw,
            other,
            100,
        ));
        let m = err(&frames(&swapped), &asked);
        assert!(m.contains("not asked for"), "{m}");
        // As many as asked, all asked for, but one twice in place of another.
        let twice = [chunks[0].clone(), chunks[1].clone(), chunks[0].clone()];
        let m = err(&frames(&twice), &asked);
        assert!(m.contains("twice"), "{m}");
        // Bytes stored raw that decode cleanly, but to something else: the hash catches it.
        let raw = vec![5u8; 100];
        let mut flipped = raw.clone();
        flipped[50] ^= 1;
        let id = crate::chunk::hash(&raw);
        let one: HashSet<ChunkId> = [id].into();
        let body = frames(&[(id, crate::chunk::Encoding::Raw, flipped, 100)]);
        assert!(verify_frames(&body, &one).is_err());
        let body = frames(&[(id, crate::chunk::Encoding::Raw, raw, 100)]);
        assert_eq!(verify_frames(&body, &one).unwrap().len(), 1);
    }

    #[test]
    fn a_delta_fetches_only_its_changed_blocks_unless_every_block_is_asked() {
        let m = manifest(5 * 4096, 4096, vec![c(1), c(2), None, c(4), c(5)]);
        let got = |changed: Option<Vec<u64>>, every: bool| {
            Received {
                manifest: m.clone(),
                stored: vec![],
                changed,
                candidates: vec![],
            }
            .candidates(every)
        };
        let all: Vec<(usize, ChunkId)> = [(0, 1), (1, 2), (3, 4), (4, 5)]
            .map(|(i, n)| (i, c(n).unwrap()))
            .into();
        // Block 2 is a hole: nothing to fetch for it.
        assert_eq!(
            got(Some(vec![1, 2, 4]), false),
            vec![(1, c(2).unwrap()), (4, c(5).unwrap())]
        );
        assert_eq!(got(Some(vec![1, 2, 4]), true), all);
        assert_eq!(got(None, false), all);
        assert_eq!(got(None, true), all);
    }

    #[test]
    fn a_whole_manifest_must_be_format_2() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let m = manifest(3 * 4096, 4096, vec![c(1), None, c(3)]);
        let two = m.encode().unwrap();
        let got = rt
            .block_on(full_manifest(two.into(), "v@s from upstream up"))
            .unwrap();
        assert_eq!(got.blocks, m.blocks);
        let one = m.encode_format_1().unwrap();
        match rt.block_on(full_manifest(one.into(), "v@s from upstream up")) {
            Err(Error::Denied(msg)) => assert!(msg.contains("format 2"), "{msg}"),
            other => panic!("a format 1 manifest was taken: {other:?}"),
        }
    }
}
