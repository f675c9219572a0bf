//! Verification: re-read every chunk the node's snapshots reference and re-hash it.
//!
//! Each chunk is checked once however many blocks use it; damage is reported per snapshot
//! with the blocks affected, so an operator knows exactly what a restore would lose.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use serde::Serialize;

use super::load_manifest;
use crate::chunk;
use crate::error::Result;
use crate::id::{ChunkId, PackId, VolumeName};
use crate::repo::ChunkLocation;
use crate::state::Node;

const PACK_CONCURRENCY: usize = 3;

/// Per pack: chunks checked, stored bytes read, and the chunks found bad with why.
type PackResult = (u64, u64, Vec<(ChunkId, String)>);

/// One problem found, with every block it affects in one snapshot.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Damage {
    pub snapshot: String,
    pub snapshot_id: String,
    /// Blocks affected (empty when the whole manifest is unreadable).
    pub blocks: Vec<u64>,
    pub chunk: Option<String>,
    pub problem: String,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyReport {
    pub snapshots: u64,
    pub chunks: u64,
    pub stored_bytes: u64,
    pub damage: Vec<Damage>,
    /// Problems that affect no snapshot (an unreadable index, say).
    pub notes: Vec<String>,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Verifies every snapshot on the node (or one volume's).
pub async fn verify(
    node: &Node,
    volume: Option<&VolumeName>,
    progress: &ProgressBar,
) -> Result<VerifyReport> {
    // Keep gc from removing packs under us.
    let _lock = node.lock_repo_shared().await?;
    let snaps = match volume {
        Some(v) => {
            node.catalog.volume(v)?;
            node.catalog.snapshots(v)?
        }
        None => node.catalog.all_snapshots()?,
    };
    verify_snapshots(&node.repo, &snaps, progress).await
}

/// Verifies `snaps` in `repo` (a node's own repository, or a mirror target's).
pub async fn verify_snapshots(
    repo: &crate::repo::Repository,
    snaps: &[crate::catalog::SnapshotRecord],
    progress: &ProgressBar,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let mut report = VerifyReport {
        snapshots: snaps.len() as u64,
        ..Default::default()
    };
    // chunk -> (snapshot index -> blocks)
    let mut users: HashMap<ChunkId, BTreeMap<usize, Vec<u64>>> = HashMap::new();
    for (si, rec) in snaps.iter().enumerate() {
        match load_manifest(repo, rec).await {
            Ok(m) => {
                for (bi, id) in m.blocks.data() {
                    users
                        .entry(id)
                        .or_default()
                        .entry(si)
                        .or_default()
                        .push(bi as u64);
                }
            }
            Err(e) => report.damage.push(Damage {
                snapshot: rec.display_ref(),
                snapshot_id: rec.id.to_string(),
                blocks: vec![],
                chunk: None,
                problem: e.to_string(),
            }),
        }
    }
    let (index, problems) = repo.load_index().await?;
    report.notes.extend(problems);

    let mut bad: Vec<(ChunkId, String)> = Vec::new();
    let mut by_pack: HashMap<PackId, Vec<(ChunkId, ChunkLocation)>> = HashMap::new();
    for id in users.keys() {
        match index.get(id) {
            Some(loc) => by_pack.entry(loc.pack).or_default().push((*id, *loc)),
            None => bad.push((*id, "chunk is missing from the repository".into())),
        }
    }
    let total: u64 = by_pack
        .values()
        .flatten()
        .map(|(_, l)| l.length as u64)
        .sum();
    progress.set_length(total);
    let results: Vec<PackResult> = futures::stream::iter(by_pack)
        .map(|(pack, mut chunks)| {
            let progress = progress.clone();
            async move {
                chunks.sort_by_key(|(_, l)| l.offset);
                let ranges: Vec<_> = chunks
                    .iter()
                    .map(|(_, l)| l.offset..l.offset + l.length as u64)
                    .collect();
                let blobs = match repo.read_pack_ranges(&pack, &ranges).await {
                    Ok(b) => b,
                    Err(e) => {
                        let msg = format!("pack {} is unreadable: {e}", pack.short());
                        return Ok((
                            0,
                            0,
                            chunks.iter().map(|(id, _)| (*id, msg.clone())).collect(),
                        ));
                    }
                };
                tokio::task::spawn_blocking(move || {
                    let mut bad = Vec::new();
                    let mut bytes = 0;
                    for ((id, loc), blob) in chunks.iter().zip(blobs) {
                        bytes += blob.len() as u64;
                        if let Err(e) =
                            chunk::decode(id, loc.encoding, &blob, loc.raw_length as usize)
                        {
                            bad.push((*id, format!("{e} (in pack {})", pack.short())));
                        }
                        progress.inc(loc.length as u64);
                    }
                    (chunks.len() as u64, bytes, bad)
                })
                .await
                .map_err(|e| crate::Error::internal(format!("verify worker failed: {e}")))
            }
        })
        .buffer_unordered(PACK_CONCURRENCY)
        .try_collect()
        .await?;
    for (n, bytes, b) in results {
        report.chunks += n;
        report.stored_bytes += bytes;
        bad.extend(b);
    }
    for (id, problem) in bad {
        for (si, blocks) in &users[&id] {
            let rec = &snaps[*si];
            report.damage.push(Damage {
                snapshot: rec.display_ref(),
                snapshot_id: rec.id.to_string(),
                blocks: blocks.clone(),
                chunk: Some(id.to_string()),
                problem: problem.clone(),
            });
        }
    }
    report
        .damage
        .sort_by(|a, b| (&a.snapshot, &a.blocks).cmp(&(&b.snapshot, &b.blocks)));
    report.elapsed = started.elapsed();
    Ok(report)
}
