//! Pushing a node's snapshots into a target.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;

use crate::catalog::SnapshotRecord;
use crate::error::{Error, Result};
use crate::id::{SnapshotId, VolumeName};
use crate::repo::Repository;
use crate::snapshot::Manifest;
use crate::softlock::{HolderId, LockType, NewLock};
use crate::state::Node;

use super::*;
use super::{index::remember_indexes, lease::still_leased, sink::copy_chunks};

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
pub async fn push(
    node: &Node,
    rec: &TargetRecord,
    volume: &VolumeName,
    progress: &ProgressBar,
) -> Result<TransferReport> {
    let t0 = Instant::now();
    let repo = open(rec)?;
    // A push writes format-2 manifests: a version-1 target is marked version 2 first.
    repo.check_for_writing().await?;
    let ours = node.catalog.snapshots(volume)?;
    node.catalog.volume(volume)?;
    // One push of a volume at a time from this node (the daemon's [[push]] and a CLI run).
    let _volume_lock = crate::mirror::lock_volume(node, volume).await?;
    let lease = lease_push(&repo, &node.info.node_id, Duration::from_secs(60)).await?;
    let result = push_leased(node, rec, &repo, &lease, volume, &ours, progress).await;
    let released = lease.release(&repo).await;
    let mut report = result?;
    released?;
    report.seconds = t0.elapsed().as_secs_f64();
    tracing::info!(volume = %volume, target = %rec.name, kind = %report.kind, snapshots = report.transferred.len(), stored_bytes = report.stored_bytes, seconds = report.seconds, outcome = "ok", "push");
    Ok(report)
}

async fn push_leased(
    node: &Node,
    rec: &TargetRecord,
    repo: &Repository,
    lease: &LeaseGuard,
    volume: &VolumeName,
    ours: &[SnapshotRecord],
    progress: &ProgressBar,
) -> Result<TransferReport> {
    let theirs: HashSet<SnapshotId> = repo
        .list_manifests()
        .await?
        .into_iter()
        .filter(|(v, _)| v == volume)
        .map(|(_, id)| id)
        .collect();
    let base = ours.iter().rev().find(|s| theirs.contains(&s.id));
    let holder = HolderId::mirror(&node.info.node_id, volume);
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
    let kind = match (wanted.is_empty(), base.is_some() || !theirs.is_empty()) {
        (true, _) => crate::mirror::TransferKind::UpToDate,
        (false, false) => crate::mirror::TransferKind::Baseline,
        (false, true) => crate::mirror::TransferKind::Incremental,
    };
    let mut report = TransferReport {
        volume: volume.clone(),
        target: rec.name.clone(),
        kind,
        base: base.map(|b| b.display_ref()),
        transferred: vec![],
        chunks: 0,
        plain_bytes: 0,
        stored_bytes: 0,
        seconds: 0.0,
    };
    if !wanted.is_empty() {
        let _repo_lock = node.lock_repo_shared().await?;
        let (local_index, _) = node.load_index().await?;
        let (mut target_index, problems) = load_index(node, rec, repo).await?;
        for p in problems {
            tracing::warn!("{p}; its chunks will be pushed again");
        }
        let mut sink = PackSink::new(repo, &mut target_index);
        for s in &wanted {
            let raw = node.repo.read_manifest(volume, &s.id).await?;
            let m = Manifest::decode(&raw, &s.display_ref())?;
            copy_chunks(&node.repo, &local_index, &m, &mut sink, progress).await?;
            // Without our lease a gc may have run: the chunks could be gone. Commit nothing.
            still_leased(repo, lease).await?;
            match repo.put_manifest(volume, &s.id, raw.to_vec()).await {
                Ok(()) | Err(Error::Conflict(_)) => {} // another pusher of the same snapshot
                Err(e) => return Err(e),
            }
            report.transferred.push(s.display_ref());
        }
        remember_indexes(node, rec, &sink.stored)?;
        report.chunks = sink.stats.new_chunks;
        report.plain_bytes = sink.stats.new_bytes;
        report.stored_bytes = sink.stats.new_stored_bytes;
    }
    // After: the new base replaces the old one.
    if let Some(newest) = ours.last().filter(|_| !wanted.is_empty()).or(base) {
        write_lock_record(repo, volume, &holder, record_of(newest.id)).await?;
        lock_base_locally(node, rec, volume, Some(newest.id))?;
    }
    Ok(report)
}
