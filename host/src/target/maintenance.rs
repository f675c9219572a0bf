//! Retention and verification inside a target (space reclamation is `gc.rs`).

use indicatif::ProgressBar;
use serde::Serialize;

use crate::catalog::SnapshotRecord;
use crate::error::Result;
use crate::id::VolumeName;
use crate::repo::Repository;

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

/// Verifies every snapshot in the target (every chunk re-read and re-hashed).
pub async fn verify(
    repo: &Repository,
    progress: &ProgressBar,
) -> Result<crate::snapshot::VerifyReport> {
    repo.check().await?;
    let mut snaps = Vec::new();
    let mut volumes: Vec<VolumeName> = super::pending::listed_manifests(repo)
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
