//! Pulling a target's snapshots into a node (seeding a replica, disaster recovery).

use std::time::Instant;

use indicatif::ProgressBar;

use crate::catalog::{SnapshotRecord, SnapshotStats, VolumeRecord};
use crate::error::{Error, Result};
use crate::id::VolumeName;
use crate::snapshot::Manifest;
use crate::state::Node;

use super::sink::copy_chunks;
use super::*;

/// Copies the target's snapshots of `volume` newer than the node's newest into the node,
/// seeding a replica (on a new node, say, before normal mirroring continues).
pub async fn pull(
    node: &Node,
    rec: &TargetRecord,
    volume: &VolumeName,
    progress: &ProgressBar,
) -> Result<TransferReport> {
    let t0 = Instant::now();
    let repo = open(rec).await?;
    let theirs = snapshots(&repo, volume).await?;
    let marker = format!("seeded from target {}", rec.name);
    match node.catalog.volume(volume) {
        Ok(v) if v.upstream.is_some() => {}
        Ok(_) => {
            return Err(Error::conflict(format!(
                "volume {volume} is a local volume on this node; pull into another name"
            )));
        }
        Err(Error::NotFound(_)) => {
            let Some((first, _)) = theirs.first() else {
                return Err(Error::not_found(format!(
                    "target {} has no snapshot of {volume}",
                    rec.name
                )));
            };
            node.catalog.add_volume(&VolumeRecord::replica(
                volume.clone(),
                first.block_size,
                marker,
            ))?;
        }
        Err(e) => return Err(e),
    }
    let ours = node.catalog.snapshots(volume)?;
    let newest = ours.last().map(|s| s.id);
    let wanted: Vec<&(SnapshotRecord, bytes::Bytes)> = theirs
        .iter()
        .filter(|(s, _)| newest.is_none_or(|n| s.id > n))
        .collect();
    let mut report = TransferReport {
        volume: volume.clone(),
        target: rec.name.clone(),
        kind: if wanted.is_empty() {
            crate::mirror::TransferKind::UpToDate
        } else if ours.is_empty() {
            crate::mirror::TransferKind::Baseline
        } else {
            crate::mirror::TransferKind::Incremental
        },
        base: ours.last().map(|s| s.display_ref()),
        transferred: vec![],
        chunks: 0,
        plain_bytes: 0,
        stored_bytes: 0,
        restored_chunks: 0,
        finished_pending: vec![],
        skipped: vec![],
        seconds: 0.0,
    };
    if !wanted.is_empty() {
        let _repo_lock = node.lock_repo_shared().await?;
        let (mut target_index, _) = load_index(node, rec, &repo).await?;
        // Only packs that exist: an index can outlive its pack in a target.
        let packs = repo.pack_listing().await?;
        target_index.retain_packs(|p| packs.contains_key(p));
        let (mut local_index, _) = node.load_index().await?;
        for (s, raw) in wanted {
            let m = Manifest::decode(raw, &s.display_ref())?;
            // A target is storage someone else may write: its labels pass the local rules.
            for (k, v) in &m.labels {
                crate::id::validate_name("label key", k)
                    .and_then(|()| {
                        crate::id::validate_text("label value", v, crate::id::MAX_LABEL_VALUE_BYTES)
                    })
                    .map_err(|e| {
                        Error::corrupt(format!(
                            "{} in target {} has a label this node refuses ({e}); nothing of \
                             it was committed",
                            s.display_ref(),
                            rec.name
                        ))
                    })?;
            }
            let mut sink = PackSink::new(&node.repo, &mut local_index);
            copy_chunks(&repo, &target_index, m.blocks.ids(), &mut sink, progress).await?;
            let stats = SnapshotStats {
                blocks: m.blocks.len() as u64,
                zero_blocks: m.blocks.zero_blocks() as u64,
                ..sink.stats.clone()
            };
            report.chunks += stats.new_chunks;
            report.plain_bytes += stats.new_bytes;
            report.stored_bytes += stats.new_stored_bytes;
            node.repo.put_manifest(volume, &s.id, raw.to_vec()).await?;
            if let Err(e) = node.catalog.commit_replica_snapshot(&m.record(stats)) {
                let _ = node.repo.delete_manifest(volume, &s.id).await;
                return Err(e);
            }
            report.transferred.push(s.display_ref());
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}
