//! Snapshots (PCPIs): manifests, and the operations on them — create, restore, diff, delete,
//! verify and garbage collection.
//!
//! A snapshot is a [`Manifest`] in the repository (one chunk id per block, `None` for an
//! all-zero block) plus a [`SnapshotRecord`] in the node's catalog. It becomes visible when
//! the catalog records it, which happens only after the manifest and every chunk it names
//! are durable; it never changes afterwards (DESIGN.md invariant 1).

pub mod blocks;
pub mod create;
pub mod gc;
pub mod hooks;
pub mod manifest;
pub mod read;
pub mod restore;
pub mod verify;

use serde::Serialize;

pub use blocks::BlockList;
pub use create::{CreateOptions, CreateReport, create};
pub use gc::{GcReport, gc};
pub use manifest::{
    MANIFEST_FORMAT, Manifest, ManifestDelta, block_count, block_len, check_block_count,
};
pub use restore::{RestoreReport, restore};
pub use verify::{Damage, VerifyReport, verify};

use crate::catalog::SnapshotRecord;
use crate::error::{Error, Result};

use crate::repo::Repository;
use crate::softlock::{BreakLocks, SoftLock, guard_delete};
use crate::state::Node;

/// Reads and checks the manifest of a catalogued snapshot.
pub async fn load_manifest(repo: &Repository, rec: &SnapshotRecord) -> Result<Manifest> {
    let bytes = repo.read_manifest(&rec.volume, &rec.id).await?;
    if bytes.is_empty() {
        // In a mirror target, a fence: the snapshot was given up (or dropped) since it was
        // listed (`target/pending.rs`).
        return Err(Error::not_found(format!(
            "the manifest of {} is gone from {} (removed since it was listed)",
            rec.display_ref(),
            repo.location()
        )));
    }
    let m = Manifest::decode(&bytes, &rec.display_ref())?;
    if m.id != rec.id || m.volume != rec.volume {
        return Err(Error::corrupt(format!(
            "the manifest stored for {} describes {}@{}",
            rec.display_ref(),
            m.volume,
            m.id
        )));
    }
    Ok(m)
}

/// What deleting `snaps[pos]` alone would free, at most: its blocks (and their bytes) that
/// neither neighbour (`snaps[pos - 1]`, `snaps[pos + 1]`, the volume's snapshots oldest first)
/// shares, each distinct chunk counted once. `lock explain` and the web page's pinned bytes
/// both ask this. Reads three manifests.
pub async fn exclusive_size(
    repo: &Repository,
    snaps: &[SnapshotRecord],
    pos: usize,
) -> Result<ExclusiveSize> {
    let rec = &snaps[pos];
    let prev = pos.checked_sub(1).map(|i| &snaps[i]);
    let next = snaps.get(pos + 1);
    let m = load_manifest(repo, rec).await?;
    let mut shared = std::collections::HashSet::new();
    for n in [prev, next].into_iter().flatten() {
        shared.extend(load_manifest(repo, n).await?.blocks.ids().iter().copied());
    }
    let mut counted = std::collections::HashSet::new();
    let mut size = ExclusiveSize::default();
    for (i, id) in m.blocks.data() {
        if !shared.contains(&id) && counted.insert(id) {
            size.blocks += 1;
            size.bytes += m.block_len(i as u64) as u64;
        }
    }
    Ok(size)
}

/// See [`exclusive_size`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExclusiveSize {
    pub blocks: u64,
    pub bytes: u64,
}

/// A run of changed blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChangedRange {
    pub offset: u64,
    pub length: u64,
    pub first_block: u64,
    pub blocks: u64,
}

/// What changed between two snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Diff {
    pub from: String,
    pub to: String,
    pub block_size: u32,
    pub from_size: u64,
    pub to_size: u64,
    pub changed_blocks: u64,
    pub changed_bytes: u64,
    pub ranges: Vec<ChangedRange>,
}

/// Compares two manifests block by block (a pure function of the two).
pub fn diff(a: &Manifest, b: &Manifest) -> Result<Diff> {
    if a.block_size != b.block_size {
        return Err(Error::invalid(format!(
            "cannot compare snapshots with different block sizes ({} and {})",
            a.block_size, b.block_size
        )));
    }
    let bs = a.block_size as u64;
    let end = a.size.max(b.size);
    // Blocks whose ids differ, plus the short last block of the smaller snapshot when the
    // sizes differ (same id, different length): past the end of one snapshot is changed.
    let common = a.size.min(b.size);
    let short_last = (!common.is_multiple_of(bs) && a.size != b.size).then(|| common / bs);
    let mut changed: Vec<u64> = a.blocks.differing(&b.blocks).map(|i| i as u64).collect();
    if let Some(i) = short_last
        && let Err(at) = changed.binary_search(&i)
    {
        changed.insert(at, i);
    }
    let mut ranges: Vec<ChangedRange> = Vec::new();
    for i in changed {
        match ranges.last_mut() {
            Some(r) if r.first_block + r.blocks == i => r.blocks += 1,
            _ => ranges.push(ChangedRange {
                offset: i * bs,
                length: 0,
                first_block: i,
                blocks: 1,
            }),
        }
    }
    for r in &mut ranges {
        r.length = ((r.first_block + r.blocks) * bs).min(end) - r.offset;
    }
    Ok(Diff {
        from: format!("{}@{}", a.volume, a.name),
        to: format!("{}@{}", b.volume, b.name),
        block_size: a.block_size,
        from_size: a.size,
        to_size: b.size,
        changed_blocks: ranges.iter().map(|r| r.blocks).sum(),
        changed_bytes: ranges.iter().map(|r| r.length).sum(),
        ranges,
    })
}

/// Deletes a snapshot unless a soft lock holds it (or `brk` overrides the locks, which is
/// recorded): first from the catalog (so it is gone at once), then its manifest. Its chunks
/// stay until `gc`. Returns the removed record and the locks that were broken.
pub async fn delete(
    node: &Node,
    rec: &SnapshotRecord,
    brk: Option<&BreakLocks>,
) -> Result<(SnapshotRecord, Vec<SoftLock>)> {
    let now = crate::now_unix_ms();
    let mut broken = Vec::new();
    let removed = node
        .catalog
        .remove_snapshot(&rec.volume, &rec.id, |tx, current| {
            broken = guard_delete(tx, current, brk, now)?;
            Ok(())
        })?;
    // A crash here leaves an orphan manifest, invisible; gc removes it.
    crate::pause_point("snapshot-delete-uncatalogued");
    crate::peer::client::crash_point(&node.info.node_id, "snapshot-delete-uncatalogued").await;
    node.repo.delete_manifest(&rec.volume, &rec.id).await?;
    Ok((removed, broken))
}

#[cfg(test)]
mod tests {
    use super::manifest::tests::{c, manifest};
    use super::*;
    use crate::id::ChunkId;
    use proptest::prelude::*;

    #[test]
    fn diff_merges_adjacent_changed_blocks() {
        // Blocks 1-2 and 4 changed: two ranges, three blocks.
        let a = manifest(5 * 4096, 4096, vec![c(0), c(1), c(2), c(3), c(4)]);
        let b = manifest(5 * 4096, 4096, vec![c(0), c(9), None, c(3), c(8)]);
        let d = diff(&a, &b).unwrap();
        assert_eq!(d.changed_blocks, 3);
        assert_eq!(d.changed_bytes, 3 * 4096);
        assert_eq!(d.ranges.len(), 2);
        assert_eq!((d.ranges[0].offset, d.ranges[0].length), (4096, 8192));
    }

    #[test]
    fn diff_counts_growth_up_to_the_new_size() {
        // A volume that grew by half a block: the new tail is changed, bytes end at the size.
        let a = manifest(4096, 4096, vec![c(1)]);
        let b = manifest(4096 + 2048, 4096, vec![c(1), c(2)]);
        let d = diff(&a, &b).unwrap();
        assert_eq!(d.changed_bytes, 2048);
        assert_eq!(diff(&a, &a).unwrap().changed_blocks, 0);
    }

    proptest! {
        #[test]
        fn diff_of_identical_manifests_is_empty_and_symmetric_in_size(
            ids in proptest::collection::vec(proptest::option::of(0u8..4), 1..50),
            flips in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            // Changing k distinct blocks is seen as exactly those blocks, in both directions.
            let blocks: Vec<_> = ids.iter().map(|o| o.map(|n| ChunkId([n; 32]))).collect();
            let a = manifest(blocks.len() as u64 * 4096, 4096, blocks.clone());
            let mut changed = blocks.clone();
            let mut set = std::collections::BTreeSet::new();
            for f in &flips {
                let i = f.index(blocks.len());
                changed[i] = Some(ChunkId([200; 32]));
                if blocks[i] != changed[i] { set.insert(i as u64); }
            }
            let b = manifest(a.size, 4096, changed);
            prop_assert_eq!(diff(&a, &a).unwrap().changed_blocks, 0);
            let d = diff(&a, &b).unwrap();
            prop_assert_eq!(d.changed_blocks, set.len() as u64);
            prop_assert_eq!(diff(&b, &a).unwrap().changed_blocks, d.changed_blocks);
        }
    }
}
