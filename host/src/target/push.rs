//! Pushing a node's snapshots into a target.

use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;

use crate::catalog::SnapshotRecord;
use crate::error::{Error, Result};
use crate::id::{SnapshotId, VolumeName};
use crate::repo::Repository;
use crate::snapshot::Manifest;
use crate::softlock::{HolderId, LockType, NewLock};
use crate::state::Node;

use super::pending::{self, PushView};
use super::*;
use super::{index::remember_indexes, sink::copy_chunks};

/// What a push or a pull did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TransferReport {
    pub volume: VolumeName,
    pub target: String,
    pub kind: crate::mirror::TransferKind,
    pub base: Option<String>,
    pub transferred: Vec<String>,
    pub chunks: u64,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    /// Chunks stored again because a gc condemned their packs while the push ran.
    pub restored_chunks: u64,
    /// This node's interrupted pushes that this one finished ("VOL@ID committed|dropped").
    pub finished_pending: Vec<String>,
    /// Snapshots this push could not store, each with why (the push went on with the next).
    pub skipped: Vec<String>,
    pub seconds: f64,
}

/// The holder of a node's target locks in its own registry: `app:target.NAME`.
pub fn local_holder(target: &str) -> Result<HolderId> {
    HolderId::application(&format!("target.{target}"))
}

/// Sets the node's own lock for the target's base (replacing the previous one).
fn lock_base_locally(
    node: &Node,
    rec: &TargetRecord,
    volume: &VolumeName,
    base: Option<SnapshotId>,
) -> Result<()> {
    let holder = local_holder(&rec.name)?;
    node.catalog.locks().replace_own_set(
        volume,
        holder,
        base.into_iter()
            .map(|snapshot| NewLock {
                snapshot,
                lock_type: LockType::DestinationPath,
                value: rec.url.clone(),
                lease_ms: None,
                path: vec![node.info.node_id.clone()],
            })
            .collect(),
    )?;
    Ok(())
}

/// Pushes the node's snapshots of `volume` that are newer than the target's newest.
///
/// Each snapshot: its missing chunks into new packs, an intent, the manifest, then the check
/// that every chunk it names is in a pack no gc has condemned (storing again what was), and
/// only then the intent goes (`pending.rs`). No lease: gcs and other pushes may run meanwhile.
pub async fn push(
    node: &Node,
    rec: &TargetRecord,
    volume: &VolumeName,
    progress: &ProgressBar,
) -> Result<TransferReport> {
    let result = push_volume(node, rec, volume, progress).await;
    crate::transfers::record(
        &node.catalog,
        crate::transfers::Relation::Push {
            volume: volume.clone(),
            target: rec.name.clone(),
        },
        result.as_ref().map(|r| crate::transfers::Outcome {
            kind: r.kind.to_string(),
            bytes: r.stored_bytes,
            summary: r.summary(),
            report: serde_json::to_value(r).unwrap_or_default(),
        }),
    );
    result
}

impl TransferReport {
    /// One line for logs and `status`.
    pub fn summary(&self) -> String {
        format!(
            "{}{} push to {}: {} snapshot(s), {} chunks, {} bytes stored in {:.2}s",
            self.kind,
            self.base
                .as_deref()
                .map_or_else(String::new, |b| format!(" (base {b})")),
            self.target,
            self.transferred.len(),
            self.chunks,
            self.stored_bytes,
            self.seconds
        )
    }
}

async fn push_volume(
    node: &Node,
    rec: &TargetRecord,
    volume: &VolumeName,
    progress: &ProgressBar,
) -> Result<TransferReport> {
    let t0 = Instant::now();
    let repo = open(rec).await?;
    // A push writes salted packs and intents (format 3): an older target is marked first.
    repo.check_for_writing().await?;
    node.catalog.volume(volume)?;
    // One push of a volume at a time from this node (the daemon's [[push]] and a CLI run).
    // Holding it also proves that an intent of this node for this volume is left by a push
    // that stopped, which this one may finish.
    let _volume_lock = crate::mirror::lock_volume(node, volume).await?;
    let ours = node.catalog.snapshots(volume)?;
    let mut report = push_locked(node, rec, &repo, volume, &ours, progress).await?;
    report.seconds = t0.elapsed().as_secs_f64();
    tracing::info!(volume = %volume, target = %rec.name, kind = %report.kind, snapshots = report.transferred.len(), stored_bytes = report.stored_bytes, restored_chunks = report.restored_chunks, seconds = report.seconds, outcome = "ok", "push");
    Ok(report)
}

/// What a push loads once it has something to move: the node's repository (held shared, so
/// the node's own gc waits) and its index, and the push's view of the target.
struct Session {
    _repo_lock: crate::state::RepoLock,
    local_index: crate::repo::ChunkIndex,
    view: PushView,
}

impl Session {
    async fn load(node: &Node, rec: &TargetRecord, repo: &Repository) -> Result<Session> {
        let repo_lock = node.lock_repo_shared().await?;
        let (local_index, _) = node.load_index().await?;
        let (view, problems) = PushView::load(node, rec, repo).await?;
        for p in problems {
            tracing::warn!("{p}; its chunks will be pushed again");
        }
        Ok(Session {
            _repo_lock: repo_lock,
            local_index,
            view,
        })
    }
}

async fn session<'s>(
    s: &'s mut Option<Session>,
    node: &Node,
    rec: &TargetRecord,
    repo: &Repository,
) -> Result<&'s mut Session> {
    if s.is_none() {
        *s = Some(Session::load(node, rec, repo).await?);
    }
    Ok(s.as_mut().expect("loaded"))
}

async fn push_locked(
    node: &Node,
    rec: &TargetRecord,
    repo: &Repository,
    volume: &VolumeName,
    ours: &[SnapshotRecord],
    progress: &ProgressBar,
) -> Result<TransferReport> {
    let me = &node.info.node_id;
    let mut loaded: Option<Session> = None;
    let mut report = TransferReport {
        volume: volume.clone(),
        target: rec.name.clone(),
        kind: crate::mirror::TransferKind::UpToDate,
        base: None,
        transferred: vec![],
        chunks: 0,
        plain_bytes: 0,
        stored_bytes: 0,
        restored_chunks: 0,
        finished_pending: vec![],
        skipped: vec![],
        seconds: 0.0,
    };

    // 1. This node's unfinished pushes of the volume (stopped: we hold the volume's lock).
    for intent in pending::intents(repo, Some(volume))
        .await?
        .into_iter()
        .filter(|i| &i.node == me)
    {
        let s = session(&mut loaded, node, rec, repo).await?;
        let src = Some((&node.repo, &s.local_index));
        // The snapshot is still here: the push of it is completed, not dropped.
        let local = match ours.iter().find(|o| o.id == intent.snapshot) {
            Some(o) => Some(node.repo.read_manifest(volume, &o.id).await?),
            None => None,
        };
        let outcome = pending::finish(
            &mut s.view,
            repo,
            src,
            &intent,
            local.as_deref(),
            None,
            progress,
        )
        .await?;
        let said = match outcome {
            pending::Finished::Committed => match pending::intents(repo, Some(volume))
                .await?
                .into_iter()
                .find(|i| i.snapshot == intent.snapshot)
            {
                Some(other) => format!(
                    "confirmed (visible once node {} finishes its push of it)",
                    other.node
                ),
                None => "committed".to_string(),
            },
            pending::Finished::NoManifest | pending::Finished::Dropped => "dropped".to_string(),
            pending::Finished::Damaged => "damaged (kept hidden)".to_string(),
            pending::Finished::Incomplete { missing } => {
                tracing::warn!(
                    "{volume}@{}: this node's unfinished push names {missing} chunks that are \
                     neither safely in the target nor here any more; it stays hidden (`holdfast \
                     target check {}`)",
                    intent.snapshot,
                    rec.name
                );
                format!("incomplete ({missing} chunks missing)")
            }
        };
        report
            .finished_pending
            .push(format!("{volume}@{} {said}", intent.snapshot));
    }

    // 2. The base: the newest of our snapshots committed in the target.
    let theirs = pending::committed_ids(repo, volume).await?;
    let base = ours.iter().rev().find(|s| theirs.contains(&s.id));
    report.base = base.map(|b| b.display_ref());
    let holder = HolderId::mirror(me, volume);
    let record_of = |id: SnapshotId| {
        vec![TargetLock {
            snapshot: id,
            lock_type: LockType::DestinationPath,
            value: rec.url.clone(),
        }]
    };
    // Before: the base stays, here and in the target.
    lock_base_locally(node, rec, volume, base.map(|b| b.id))?;
    if let Some(b) = base {
        write_lock_record(repo, volume, &holder, record_of(b.id)).await?;
    }
    let newest_theirs = theirs.iter().max().copied();
    let wanted: Vec<&SnapshotRecord> = ours
        .iter()
        .filter(|s| newest_theirs.is_none_or(|n| s.id > n))
        .collect();
    // (Snapshots of the volume in the target but none of this node's: a resync, where
    // deduplication spares what it can.)
    report.kind =
        crate::mirror::TransferKind::of(wanted.is_empty(), theirs.is_empty(), base.is_some());

    // 3. Each new snapshot, oldest first.
    let mut newest_pushed: Option<&SnapshotRecord> = None;
    for s in &wanted {
        // Asked to stop: a safe point between snapshots (those before are committed).
        crate::shutdown::check(&format!("the push of {} to {}", s.display_ref(), rec.name))?;
        let sess = session(&mut loaded, node, rec, repo).await?;
        // A fenced key is known before any chunk is sent (a fenced newest snapshot must not
        // cost an upload at every push).
        if let pending::AtKey::Fence = pending::at_key(repo, volume, &s.id).await? {
            let why = format!("{}: {FENCED}", s.display_ref());
            tracing::warn!("not pushed to {}: {why}", rec.name);
            report.skipped.push(why);
            continue;
        }
        let raw = node.repo.read_manifest(volume, &s.id).await?;
        let m = Manifest::decode(&raw, &s.display_ref())?;
        let mut sink = PackSink::into_target(repo, &mut sess.view.index);
        copy_chunks(
            &node.repo,
            &sess.local_index,
            m.blocks.ids(),
            &mut sink,
            progress,
        )
        .await?;
        let (stats, stored) = (sink.stats.clone(), std::mem::take(&mut sink.stored));
        drop(sink);
        remember_indexes(node, rec, &stored)?;
        report.chunks += stats.new_chunks;
        report.plain_bytes += stats.new_bytes;
        report.stored_bytes += stats.new_stored_bytes;
        match commit(sess, node, repo, volume, s, &m, raw, progress).await? {
            Committed::Whole { restored } => {
                report.restored_chunks += restored;
                report.transferred.push(s.display_ref());
                newest_pushed = Some(*s);
            }
            Committed::Hidden { restored, by } => {
                report.restored_chunks += restored;
                let why = format!(
                    "{}: stored and confirmed, and visible once node {by} finishes its own push \
                     of it (`holdfast target check {}`)",
                    s.display_ref(),
                    rec.name
                );
                tracing::warn!("{why}");
                report.skipped.push(why);
            }
            Committed::Skipped(why) => {
                tracing::warn!("not pushed to {}: {why}", rec.name);
                report.skipped.push(why);
            }
        }
    }

    // After: the new base replaces the old one.
    if let Some(newest) = newest_pushed.or(base) {
        write_lock_record(repo, volume, &holder, record_of(newest.id)).await?;
        lock_base_locally(node, rec, volume, Some(newest.id))?;
    }
    Ok(report)
}

/// Commits one snapshot whose chunks are stored: intent, manifest, confirmation, and the
/// intent removed. Returns how many chunks had to be stored again (a gc condemned their packs
/// while this push ran). On an error after the manifest the intent stays, so the snapshot
/// stays hidden until this node's next push of the volume finishes it.
#[allow(clippy::too_many_arguments)]
async fn commit(
    sess: &mut Session,
    node: &Node,
    repo: &Repository,
    volume: &VolumeName,
    s: &SnapshotRecord,
    m: &Manifest,
    raw: bytes::Bytes,
    progress: &ProgressBar,
) -> Result<Committed> {
    let intent = pending::write_intent(repo, volume, &s.id, &node.info.node_id).await?;
    crate::pause_point("target-push-before-manifest");
    match repo.put_manifest(volume, &s.id, raw.to_vec()).await {
        Ok(()) => {}
        Err(Error::Conflict(_)) => {
            // Another node pushed the same snapshot (the same volume mirrored to both): it
            // must be the same manifest, which this push then confirms like its own. Anything
            // else at the key stays: a fence (a push of this snapshot was given up by
            // finishing it) or an object of other blocks. Nothing is ever written over it.
            let what = format!("{volume}@{} in {}", s.id, repo.location());
            let why = match pending::at_key(repo, volume, &s.id).await? {
                pending::AtKey::Manifest(existing) => match Manifest::decode(&existing, &what) {
                    Ok(theirs)
                        if theirs.blocks == m.blocks
                            && theirs.id == m.id
                            && theirs.volume == m.volume =>
                    {
                        None
                    }
                    Ok(_) => Some("its key holds a manifest of other blocks (verify both)"),
                    Err(_) => Some("its key holds an object that is not a manifest"),
                },
                pending::AtKey::Fence => Some(FENCED),
                pending::AtKey::Absent => Some(
                    "its key held an object that was then removed (a prune or a drop by another \
                     node); it is not pushed again",
                ),
            };
            if let Some(why) = why {
                repo.delete_object(&intent).await?;
                return Ok(Committed::Skipped(format!("{}: {why}", s.display_ref())));
            }
        }
        // The write may have landed all the same (a reply lost after the last retry): the
        // intent stays, and this node's next push finishes the snapshot either way.
        Err(e) => return Err(e),
    }
    crate::pause_point("target-push-before-confirm");
    let src = Some((&node.repo, &sess.local_index));
    let restored = match pending::confirm(&mut sess.view, repo, src, m.blocks.ids(), progress)
        .await?
    {
        pending::Confirmed::Whole { restored } => restored,
        pending::Confirmed::Incomplete { missing } => {
            return Err(Error::corrupt(format!(
                "{missing} chunks of {} are neither safely in {} nor in this node's repository; \
                 run `holdfast verify`; the snapshot stays hidden in the target",
                s.display_ref(),
                repo.location()
            )));
        }
    };
    // Only this push's own intent goes. Another node's intent for the same snapshot stays
    // until that node finishes it (its push may be paused before its manifest write: with
    // its intent gone, that write could land after a prune, unconfirmed and visible).
    repo.delete_object(&intent).await?;
    if let Some(other) = pending::intents(repo, Some(volume))
        .await?
        .into_iter()
        .find(|i| i.snapshot == s.id)
    {
        return Ok(Committed::Hidden {
            restored,
            by: other.node,
        });
    }
    Ok(Committed::Whole { restored })
}

/// Why a snapshot whose key is fenced is not pushed.
const FENCED: &str = "an earlier push of it was given up and its key fenced (`target check`); \
                      later snapshots are pushed instead";

/// What [`commit`] did with one snapshot.
enum Committed {
    /// Committed; this many chunks had to be stored again.
    Whole { restored: u64 },
    /// Stored and confirmed, but another node's unfinished push of the same snapshot still
    /// hides it: it becomes visible when that node finishes (or an operator clears it).
    Hidden {
        restored: u64,
        by: crate::id::NodeId,
    },
    /// Not stored, for this reason; nothing of it is visible.
    Skipped(String),
}
