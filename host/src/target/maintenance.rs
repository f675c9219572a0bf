//! Retention, space reclamation and verification inside a target.

use std::collections::{BTreeMap, HashSet};

use indicatif::ProgressBar;
use serde::Serialize;

use crate::catalog::SnapshotRecord;
use crate::error::{Error, Result};
use crate::id::{ChunkId, NodeId, VolumeName};
use crate::repo::Repository;
use crate::snapshot::Manifest;

use super::lease::{live_leases, still_leased};
use super::*;

// ---------------------------------------------------------------------------------------
// Retention and space reclamation inside a target.

/// What a prune of a target did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetPruneReport {
    pub dry_run: bool,
    pub plan: crate::retention::PrunePlan,
    pub pruned: Vec<String>,
    pub locked_meanwhile: Vec<String>,
}

/// Retention inside a target, honouring its lock records (re-read before each deletion).
pub async fn prune(
    repo: &Repository,
    volume: &VolumeName,
    rules: &crate::retention::KeepRules,
    dry_run: bool,
) -> Result<TargetPruneReport> {
    repo.check().await?;
    let snaps: Vec<SnapshotRecord> = snapshots(repo, volume)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let locks = locked(repo, volume).await?;
    let plan =
        crate::retention::PrunePlan::compute(volume, &snaps, &locks, rules, crate::now_unix_ms())?;
    let mut report = TargetPruneReport {
        dry_run,
        plan,
        pruned: vec![],
        locked_meanwhile: vec![],
    };
    if dry_run {
        return Ok(report);
    }
    for e in report.plan.entries.iter().filter(|e| e.prune) {
        if locked(repo, volume).await?.contains_key(&e.id) {
            report.locked_meanwhile.push(e.snapshot.clone());
            continue;
        }
        repo.delete_manifest(volume, &e.id).await?;
        report.pruned.push(e.snapshot.clone());
    }
    Ok(report)
}

/// What a gc of a target did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetGcReport {
    pub dry_run: bool,
    pub snapshots: usize,
    pub live_chunks: usize,
    pub packs_deleted: usize,
    pub bytes_freed: u64,
    pub packs_kept_partly_live: usize,
}

/// Deletes the target's packs that no manifest references (whole packs; a partly live pack
/// stays). Runs under the gc lease, so no push is between writing packs and their manifest.
pub async fn gc(repo: &Repository, me: &NodeId, dry_run: bool) -> Result<TargetGcReport> {
    repo.check().await?;
    let lease = lease_gc(repo, me).await?;
    let r = gc_leased(repo, &lease, dry_run).await;
    let released = lease.release(repo).await;
    let r = r?;
    released?;
    Ok(r)
}

async fn gc_leased(repo: &Repository, lease: &LeaseGuard, dry_run: bool) -> Result<TargetGcReport> {
    let mut live: HashSet<ChunkId> = HashSet::new();
    let manifests = repo.list_manifests().await?;
    for (v, id) in &manifests {
        // Pruned since the listing: its chunks are no longer referenced by it.
        let Some(raw) = repo.read_manifest_if_present(v, id).await? else {
            continue;
        };
        // A manifest that cannot be read could reference anything: stop before deleting.
        let m = Manifest::decode(&raw, &format!("{v}@{id} in {}", repo.location()))?;
        live.extend(m.blocks.iter().flatten().copied());
    }
    let (index, problems) = repo.load_index().await?;
    if !problems.is_empty() {
        return Err(Error::corrupt(format!(
            "gc stopped before deleting anything: {}",
            problems.join("; ")
        )));
    }
    let mut report = TargetGcReport {
        dry_run,
        snapshots: manifests.len(),
        live_chunks: live.len(),
        ..Default::default()
    };
    // Before deleting: still ours, and no push slipped in (it would have seen our lease).
    still_leased(repo, lease).await?;
    if let Some((_, l)) = live_leases(repo, &lease.key).await?.first() {
        return Err(Error::Unavailable {
            message: format!(
                "a {} by {} is running on {} since gc started; nothing was deleted, gc again \
                 later",
                l.kind,
                l.owner,
                repo.location()
            ),
            source: None,
        });
    }
    let sizes: BTreeMap<crate::id::PackId, u64> = repo.list_packs().await?.into_iter().collect();
    for (pack, pi) in &index.packs {
        if pi.entries.iter().any(|e| live.contains(&e.id)) {
            report.packs_kept_partly_live +=
                usize::from(pi.entries.iter().any(|e| !live.contains(&e.id)));
            continue;
        }
        report.packs_deleted += 1;
        report.bytes_freed += sizes.get(pack).copied().unwrap_or(0);
        if !dry_run {
            repo.delete_pack(pack).await?;
        }
    }
    Ok(report)
}

/// Verifies every snapshot in the target (every chunk re-read and re-hashed).
pub async fn verify(
    repo: &Repository,
    progress: &ProgressBar,
) -> Result<crate::snapshot::VerifyReport> {
    repo.check().await?;
    let mut snaps = Vec::new();
    let mut volumes: Vec<VolumeName> = repo
        .list_manifests()
        .await?
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    volumes.sort();
    volumes.dedup();
    for v in volumes {
        snaps.extend(snapshots(repo, &v).await?.into_iter().map(|(s, _)| s));
    }
    crate::snapshot::verify::verify_snapshots(repo, &snaps, progress).await
}
