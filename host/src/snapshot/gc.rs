//! Garbage collection: reclaim chunks that no snapshot references.
//!
//! Runs alone (exclusive repository lock). Steps, each safe to interrupt at any point:
//! 1. Read every catalogued snapshot's manifest and collect the chunks they reference. If a
//!    manifest cannot be read, stop: without it we cannot know what is live.
//! 2. Delete manifests that no catalogued snapshot owns (left by a crash between writing a
//!    manifest and committing it, or between uncataloguing and deleting it), unless a soft
//!    lock names one: that one is kept, and its chunks are live too. Such manifests are read
//!    before any orphan is deleted; if one cannot be read, stop.
//! 3. For each pack: if none of its chunks is live, delete it (index first, then pack). If
//!    more than [`REPACK_THRESHOLD`] of its bytes are dead, copy its live chunks (verified)
//!    into new packs, make those durable, and only then delete the old pack.
//! 4. Delete indexes whose pack is gone, and packs without a readable index or trailer.
//!
//! A chunk that is live is always in at least one pack with an index: new copies are durable
//! before any old copy is removed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;

use super::load_manifest;
use crate::chunk;
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::repo::pack::{self, PackBuilder, PackIndex};
use crate::state::Node;

/// Repack a pack when more than this fraction of its stored bytes is garbage.
pub const REPACK_THRESHOLD: f64 = 0.25;

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcReport {
    pub dry_run: bool,
    pub snapshots: u64,
    pub live_chunks: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub packs_written: u64,
    pub orphan_manifests_deleted: u64,
    pub stale_indexes_deleted: u64,
    pub bytes_freed: u64,
    /// Dead bytes left in packs that stay (too little of them is dead to repack).
    pub dead_bytes_kept: u64,
    /// Packs holding those bytes.
    pub packs_partly_dead: u64,
    pub notes: Vec<String>,
    #[serde(skip)]
    pub elapsed: Duration,
}

pub async fn gc(node: &Node, dry_run: bool, progress: &ProgressBar) -> Result<GcReport> {
    let lock = node.lock_repo_exclusive()?;
    gc_locked(node, dry_run, progress, lock).await
}

/// Runs gc, waiting (off the async threads) for whatever holds the repository now to finish:
/// the daemon's gc after deletions that an always busy repository has put off long enough.
pub async fn gc_waiting(node: Arc<Node>, progress: &ProgressBar) -> Result<GcReport> {
    let n = node.clone();
    // In the kernel's queue for the lock (a poller could be starved by readers that overlap),
    // but given up when the process is asked to stop: the waiting thread then drops the lock
    // as soon as it gets it.
    let waiting = tokio::task::spawn_blocking(move || n.lock_repo_exclusive());
    let lock = tokio::select! {
        r = waiting => r
            .map_err(|e| Error::internal(format!("waiting for the repository lock: {e}")))??,
        _ = crate::shutdown::wait() => {
            return Err(Error::unavailable_msg(
                "gc was interrupted while it waited for the repository lock (the process was \
                 asked to stop); nothing was done",
            ));
        }
    };
    gc_locked(&node, false, progress, lock).await
}

/// Runs gc now if nothing is writing or reading snapshots on this node, else returns `None`
/// (the daemon's scheduled gc: it tries again next time rather than hold up other jobs).
pub async fn gc_when_idle(node: &Node, progress: &ProgressBar) -> Result<Option<GcReport>> {
    match node.try_lock_repo_exclusive()? {
        Some(lock) => Ok(Some(gc_locked(node, false, progress, lock).await?)),
        None => Ok(None),
    }
}

async fn gc_locked(
    node: &Node,
    dry_run: bool,
    progress: &ProgressBar,
    _lock: crate::state::RepoLock,
) -> Result<GcReport> {
    let started = Instant::now();
    let mut report = GcReport {
        dry_run,
        ..Default::default()
    };
    // What deletions had left when this gc started (deletions from here on wait for the next).
    let counted = node.catalog.gc_state()?;

    // 1. What is live.
    let snaps = node.catalog.all_snapshots()?;
    report.snapshots = snaps.len() as u64;
    let mut live: HashSet<ChunkId> = HashSet::new();
    let mut owned = HashSet::new();
    for rec in &snaps {
        let m = load_manifest(&node.repo, rec).await.map_err(|e| {
            Error::corrupt(format!(
                "gc stopped before deleting anything: {e}; run `holdfast verify` and repair \
                 or delete that snapshot first"
            ))
        })?;
        live.extend(m.blocks.ids());
        owned.insert((rec.volume.clone(), rec.id));
    }

    // 2. Orphan manifests. A manifest of a snapshot someone holds a lock on is never
    // removed, catalogued or not (a commit lost in a crash, a catalog restored from an older
    // copy), and neither are the chunks it names, or keeping it would keep nothing. Those are
    // read first, so that an unreadable one stops gc before anything is deleted.
    let mut orphans = Vec::new();
    for (vol, id) in node.repo.list_manifests().await? {
        if owned.contains(&(vol.clone(), id)) {
            continue;
        }
        let locks = node.catalog.locks().locks_on(&vol, &id)?;
        if locks.is_empty() {
            orphans.push((vol, id));
            continue;
        }
        let what = format!("{vol}@{id}");
        let m = node
            .repo
            .read_manifest(&vol, &id)
            .await
            .and_then(|raw| super::Manifest::decode(&raw, &what))
            .map_err(|e| {
                let mut holders: Vec<String> = locks.iter().map(|l| l.holder.to_string()).collect();
                holders.sort();
                holders.dedup();
                let e = format!(
                    "gc stopped before deleting anything: {what} has no catalog entry and is \
                     locked by {}, so its data is kept, but its manifest is unreadable: {e}; \
                     if that data is not needed, release the locks (`holdfast lock release \
                     --volume {vol} --holder HOLDER`) and run gc again",
                    holders.join(", ")
                );
                Error::corrupt(e)
            })?;
        live.extend(m.blocks.ids());
        report.notes.push(format!(
            "{what} has no catalog entry but is locked: its manifest and chunks were kept"
        ));
    }
    for (vol, id) in orphans {
        report.orphan_manifests_deleted += 1;
        if !dry_run {
            node.repo.delete_manifest(&vol, &id).await?;
        }
    }
    report.live_chunks = live.len() as u64;

    // 3. Packs.
    let packs: HashMap<PackId, u64> = node.repo.list_packs().await?.into_iter().collect();
    let indexed: HashSet<PackId> = node.repo.list_indexes().await?.into_iter().collect();
    for id in indexed.difference(&packs.keys().copied().collect()) {
        report.stale_indexes_deleted += 1;
        if !dry_run {
            node.repo.delete_index(id).await?;
        }
    }
    // Each live chunk keeps exactly one copy: the first pack (in id order) that holds it.
    let mut pack_ids: Vec<PackId> = packs.keys().copied().collect();
    pack_ids.sort();
    let mut indexes: Vec<PackIndex> = Vec::new();
    for id in &pack_ids {
        let pi = if indexed.contains(id) {
            node.repo.read_index(id).await
        } else {
            Err(Error::not_found("no index"))
        };
        let pi = match pi {
            Ok(pi) => pi,
            // An unreachable store stops gc rather than guessing.
            Err(e) if !matches!(e, Error::Corrupt(_) | Error::NotFound(_)) => return Err(e),
            // No usable index: the trailer inside the pack has the same list.
            Err(_) => match node
                .repo
                .read_pack(id)
                .await
                .and_then(|b| pack::read_trailer(id, &b))
            {
                Ok(pi) => {
                    report.notes.push(format!(
                        "pack {} had no readable index; rebuilt it from the pack's trailer",
                        id.short()
                    ));
                    if !dry_run {
                        // A damaged index object must go before the rebuilt one is written.
                        node.repo.delete_index(id).await?;
                        node.repo.put_index(&pi).await?;
                    }
                    pi
                }
                // Neither index nor trailer can be read: what it holds is unknown, and it
                // may hold live chunks. Keep it and say so; `verify` reports what is missing.
                Err(e @ Error::Corrupt(_)) => {
                    report.notes.push(format!(
                        "pack {} is unreadable and was kept (it may hold live chunks): {e}",
                        id.short()
                    ));
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        indexes.push(pi);
    }
    let mut claimed: HashSet<ChunkId> = HashSet::new();
    let mut to_delete: Vec<PackId> = Vec::new();
    let mut to_repack: Vec<(PackIndex, Vec<usize>, u64)> = Vec::new();
    for pi in indexes {
        let mut keep = Vec::new();
        let mut live_bytes = 0u64;
        for (i, e) in pi.entries.iter().enumerate() {
            if live.contains(&e.id) && claimed.insert(e.id) {
                keep.push(i);
                live_bytes += e.length as u64;
            }
        }
        let total = pi.stored_bytes().max(1);
        let dead_fraction = 1.0 - live_bytes as f64 / total as f64;
        if keep.is_empty() {
            to_delete.push(pi.pack);
        } else if dead_fraction > REPACK_THRESHOLD {
            to_repack.push((pi, keep, live_bytes));
        } else if live_bytes < total {
            report.dead_bytes_kept += total - live_bytes;
            report.packs_partly_dead += 1;
        }
    }
    if report.dead_bytes_kept > 0 {
        report.notes.push(format!(
            "{} dead bytes stay in {} packs that are less than {}% dead (rewriting them would \
             cost more than it frees); they go once more of each pack is dead",
            report.dead_bytes_kept,
            report.packs_partly_dead,
            (REPACK_THRESHOLD * 100.0) as u32
        ));
    }
    progress.set_length((to_delete.len() + to_repack.len()) as u64);

    // Repack: write every new pack durably before deleting any old one. A repack that a crash
    // interrupted is redone with the same layout, so it can "write" a pack that already exists
    // and that this run had planned to delete as a duplicate: never delete what we wrote.
    let mut written: HashSet<PackId> = HashSet::new();
    if !dry_run && !to_repack.is_empty() {
        let mut builder = PackBuilder::new();
        for (pi, keep, _) in &to_repack {
            let ranges: Vec<_> = keep
                .iter()
                .map(|&i| {
                    let e = &pi.entries[i];
                    e.offset..e.offset + e.length as u64
                })
                .collect();
            let blobs = node.repo.read_pack_ranges(&pi.pack, &ranges).await?;
            for (&i, blob) in keep.iter().zip(blobs) {
                let e = &pi.entries[i];
                // Copy the stored bytes as they are, but only after checking them.
                chunk::decode(&e.id, e.encoding, &blob, e.raw_length as usize).map_err(|err| {
                    Error::corrupt(format!(
                        "gc stopped: a live chunk is damaged ({err}); nothing was deleted; \
                         run `holdfast verify` to see which snapshots it affects"
                    ))
                })?;
                builder.add(e.id, e.encoding, &blob, e.raw_length as usize);
                if builder.is_full() {
                    let new = std::mem::take(&mut builder).finish()?;
                    node.repo.put_pack(&new).await?;
                    written.insert(new.index.pack);
                    report.packs_written += 1;
                }
            }
        }
        if !builder.is_empty() {
            let new = builder.finish()?;
            node.repo.put_pack(&new).await?;
            written.insert(new.index.pack);
            report.packs_written += 1;
        }
    }
    for (pi, _, live_bytes) in to_repack
        .iter()
        .filter(|(pi, _, _)| !written.contains(&pi.pack))
    {
        report.packs_repacked += 1;
        report.bytes_freed += packs[&pi.pack].saturating_sub(*live_bytes);
        if !dry_run {
            node.repo.delete_pack(&pi.pack).await?;
        }
        progress.inc(1);
    }
    for id in to_delete.iter().filter(|id| !written.contains(id)) {
        report.packs_deleted += 1;
        report.bytes_freed += packs[id];
        if !dry_run {
            node.repo.delete_pack(id).await?;
        }
        progress.inc(1);
    }
    if !dry_run {
        node.clean_staging_files();
    }
    report.elapsed = started.elapsed();
    if !dry_run {
        let done = crate::catalog::LastGc {
            finished_unix_ms: crate::now_unix_ms(),
            millis: started.elapsed().as_millis() as u64,
            bytes_freed: report.bytes_freed,
            packs_deleted: report.packs_deleted,
            packs_repacked: report.packs_repacked,
            dead_bytes_kept: report.dead_bytes_kept,
        };
        if let Err(e) = node.catalog.gc_done(&counted, done) {
            tracing::warn!("could not record the gc in the catalog: {e}");
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::SnapshotRecord;
    use crate::catalog::VolumeRecord;
    use crate::id::VolumeName;
    use crate::softlock::{LockType, NewLock};
    use rand::{RngCore, SeedableRng};
    use std::os::unix::fs::FileExt;

    const BS: usize = 64 << 10;

    /// A node with one image volume of 64 KiB blocks of incompressible bytes, each block made
    /// from a seed, so that a test knows which chunks two snapshots share.
    struct Vol {
        dir: tempfile::TempDir,
        node: Arc<Node>,
        image: std::path::PathBuf,
        v: VolumeName,
    }

    fn block(seed: u64) -> Vec<u8> {
        let mut b = vec![0u8; BS];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut b);
        b
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    impl Vol {
        async fn new(blocks: u64) -> Vol {
            let dir = tempfile::tempdir().unwrap();
            let node = Node::init(&dir.path().join("state"), None).await.unwrap();
            let image = dir.path().join("v.img");
            let mut bytes = Vec::with_capacity(blocks as usize * BS);
            for i in 0..blocks {
                bytes.extend_from_slice(&block(i));
            }
            std::fs::write(&image, bytes).unwrap();
            let v: VolumeName = "v".parse().unwrap();
            node.catalog
                .add_volume(&VolumeRecord::image(v.clone(), image.clone(), BS as u32))
                .unwrap();
            Vol {
                dir,
                node: Arc::new(node),
                image,
                v,
            }
        }

        /// Gives block `i` the content of `seed`.
        fn write(&self, i: u64, seed: u64) {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.image)
                .unwrap();
            f.write_all_at(&block(seed), i * BS as u64).unwrap();
        }

        async fn snap(&self) -> SnapshotRecord {
            let pb = ProgressBar::hidden();
            crate::snapshot::create::create(&self.node, &self.v, Default::default(), &pb)
                .await
                .unwrap()
                .record
        }

        async fn delete(&self, rec: &SnapshotRecord) {
            crate::snapshot::delete(&self.node, rec, None)
                .await
                .unwrap();
        }

        async fn packs(&self) -> HashMap<PackId, u64> {
            self.node
                .repo
                .list_packs()
                .await
                .unwrap()
                .into_iter()
                .collect()
        }

        async fn indexes(&self) -> HashSet<PackId> {
            self.node
                .repo
                .list_indexes()
                .await
                .unwrap()
                .into_iter()
                .collect()
        }

        async fn chunks(&self, rec: &SnapshotRecord) -> HashSet<ChunkId> {
            let m = load_manifest(&self.node.repo, rec).await.unwrap();
            m.blocks.ids().iter().copied().collect()
        }

        /// Every chunk of `rec` is in a pack with a readable index.
        async fn assert_whole(&self, rec: &SnapshotRecord) {
            let wanted = self.chunks(rec).await;
            let (found, problems) = self.node.find_chunks(&wanted).await.unwrap();
            assert!(problems.is_empty(), "{problems:?}");
            for c in &wanted {
                assert!(found.contains(c), "chunk {c} of {} is gone", rec.id);
            }
        }

        fn repo_path(&self) -> std::path::PathBuf {
            self.dir.path().join("state/repo")
        }

        fn pack_file(&self, id: &PackId) -> std::path::PathBuf {
            let hex = id.to_hex();
            self.repo_path().join("packs").join(&hex[..2]).join(hex)
        }
    }

    /// (live bytes, stored bytes) of a pack, given what is live.
    fn live_and_total(pi: &PackIndex, live: &HashSet<ChunkId>) -> (u64, u64) {
        let live_bytes = pi
            .entries
            .iter()
            .filter(|e| live.contains(&e.id))
            .map(|e| e.length as u64)
            .sum();
        (live_bytes, pi.stored_bytes())
    }

    #[test]
    fn gc_frees_the_packs_no_snapshot_needs_and_a_dry_run_only_counts_them() {
        run(async {
            let t = Vol::new(16).await;
            let a = t.snap().await;
            let pa: HashSet<PackId> = t.packs().await.into_keys().collect();
            for i in 0..16 {
                t.write(i, 1000 + i);
            }
            let b = t.snap().await;
            assert!(t.chunks(&a).await.is_disjoint(&t.chunks(&b).await));
            t.delete(&a).await;
            // What a write that a crash interrupted leaves: a staging file.
            let staging = t.repo_path().join("leftover#123");
            std::fs::write(&staging, b"x").unwrap();
            let before = t.packs().await;
            let a_bytes: u64 = pa.iter().map(|p| before[p]).sum();
            let n = pa.len() as u64;

            let pb = ProgressBar::hidden();
            let dry = gc(&t.node, true, &pb).await.unwrap();
            assert!(dry.dry_run);
            assert_eq!(dry.snapshots, 1);
            assert_eq!(dry.live_chunks, t.chunks(&b).await.len() as u64);
            assert_eq!(
                (dry.packs_deleted, dry.packs_repacked, dry.packs_written),
                (n, 0, 0),
                "{dry:?}"
            );
            assert_eq!(dry.bytes_freed, a_bytes);
            assert_eq!((dry.dead_bytes_kept, dry.packs_partly_dead), (0, 0));
            assert!(dry.notes.is_empty(), "{:?}", dry.notes);
            assert_eq!(t.packs().await, before, "a dry run deleted packs");
            assert!(staging.exists(), "a dry run removed a staging file");
            let state = t.node.catalog.gc_state().unwrap();
            assert_eq!(state.deleted_snapshots, 1);
            assert!(state.last.is_none(), "a dry run was recorded as a gc");

            let pb = ProgressBar::hidden();
            let done = gc(&t.node, false, &pb).await.unwrap();
            assert!(!done.dry_run);
            assert_eq!(
                (done.packs_deleted, done.packs_repacked, done.packs_written),
                (n, 0, 0),
                "{done:?}"
            );
            assert_eq!(done.bytes_freed, a_bytes);
            assert!(done.notes.is_empty(), "{:?}", done.notes);
            assert_eq!((pb.length(), pb.position()), (Some(n), n));
            let after = t.packs().await;
            assert_eq!(after.len(), before.len() - pa.len());
            assert!(pa.iter().all(|p| !after.contains_key(p)));
            assert!(
                t.indexes().await.is_disjoint(&pa),
                "an index outlived its pack"
            );
            assert!(!staging.exists(), "gc left a staging file");
            let state = t.node.catalog.gc_state().unwrap();
            assert_eq!(state.deleted_snapshots, 0);
            let last = state.last.expect("the gc is recorded");
            assert_eq!((last.bytes_freed, last.packs_deleted), (a_bytes, n));
            t.assert_whole(&b).await;

            let again = gc(&t.node, false, &ProgressBar::hidden()).await.unwrap();
            assert_eq!(
                (again.packs_deleted, again.bytes_freed),
                (0, 0),
                "{again:?}"
            );
            assert_eq!(t.packs().await, after);
        });
    }

    #[test]
    fn packs_mostly_dead_are_repacked_into_new_packs_before_they_go() {
        run(async {
            // 40 MiB: the first snapshot fills several packs, and what stays live of them
            // fills more than one new pack.
            let blocks = 640;
            let t = Vol::new(blocks).await;
            let a = t.snap().await;
            let pa: HashSet<PackId> = t.packs().await.into_keys().collect();
            for i in (0..blocks).step_by(2) {
                t.write(i, 10_000 + i);
            }
            let b = t.snap().await;
            t.delete(&a).await;
            let live = t.chunks(&b).await;
            let before = t.packs().await;
            let mut live_bytes = 0;
            let mut freed = 0;
            let mut kept: HashSet<ChunkId> = HashSet::new();
            for p in &pa {
                let pi = t.node.repo.read_index(p).await.unwrap();
                let (l, total) = live_and_total(&pi, &live);
                assert!(l > 0 && 1.0 - l as f64 / total as f64 > REPACK_THRESHOLD);
                live_bytes += l;
                freed += before[p] - l;
                kept.extend(pi.entries.iter().map(|e| e.id).filter(|c| live.contains(c)));
            }
            assert!(live_bytes > pack::TARGET_PACK_BYTES as u64);
            let n = pa.len() as u64;

            let dry = gc(&t.node, true, &ProgressBar::hidden()).await.unwrap();
            assert_eq!(
                (dry.packs_repacked, dry.packs_written, dry.packs_deleted),
                (n, 0, 0),
                "{dry:?}"
            );
            assert_eq!(dry.bytes_freed, freed);
            assert_eq!(t.packs().await, before, "a dry run changed packs");

            let pb = ProgressBar::hidden();
            let done = gc(&t.node, false, &pb).await.unwrap();
            assert_eq!(
                (done.packs_repacked, done.packs_deleted),
                (n, 0),
                "{done:?}"
            );
            assert_eq!(done.bytes_freed, freed);
            assert_eq!((pb.length(), pb.position()), (Some(n), n));
            let after = t.packs().await;
            assert!(pa.iter().all(|p| !after.contains_key(p)));
            let new: Vec<PackId> = after
                .keys()
                .filter(|p| !before.contains_key(p))
                .copied()
                .collect();
            assert!(done.packs_written >= 2, "{done:?}");
            assert_eq!(new.len() as u64, done.packs_written);
            let mut copied = HashSet::new();
            for p in &new {
                let pi = t.node.repo.read_index(p).await.unwrap();
                copied.extend(pi.entries.iter().map(|e| e.id));
            }
            assert_eq!(copied, kept, "the new packs hold exactly the live chunks");
            t.assert_whole(&b).await;
        });
    }

    #[test]
    fn a_pack_no_more_than_a_quarter_dead_stays_and_its_dead_bytes_are_reported() {
        run(async {
            let t = Vol::new(16).await;
            let a = t.snap().await;
            let pa: Vec<PackId> = t.packs().await.into_keys().collect();
            assert_eq!(pa.len(), 1);
            // A quarter of the blocks change: exactly a quarter of the pack is dead.
            for i in [1, 5, 9, 13] {
                t.write(i, 1000 + i);
            }
            let b = t.snap().await;
            t.delete(&a).await;
            let live = t.chunks(&b).await;
            let pi = t.node.repo.read_index(&pa[0]).await.unwrap();
            assert!(pi.entries.iter().all(|e| e.length == pi.entries[0].length));
            let (l, total) = live_and_total(&pi, &live);
            assert_eq!(4 * (total - l), total);
            let before = t.packs().await;

            let done = gc(&t.node, false, &ProgressBar::hidden()).await.unwrap();
            assert_eq!(
                (done.packs_repacked, done.packs_deleted, done.bytes_freed),
                (0, 0, 0),
                "{done:?}"
            );
            // b's own pack is all live: it is not partly dead.
            assert_eq!(
                (done.dead_bytes_kept, done.packs_partly_dead),
                (total - l, 1)
            );
            assert!(
                done.notes.iter().any(|n| n.contains("dead bytes stay")),
                "{:?}",
                done.notes
            );
            assert_eq!(t.packs().await, before);
            let last = t.node.catalog.gc_state().unwrap().last.unwrap();
            assert_eq!(last.dead_bytes_kept, total - l);
            t.assert_whole(&b).await;
        });
    }

    #[test]
    fn orphan_manifests_and_indexes_without_a_pack_go_and_a_dry_run_keeps_them() {
        run(async {
            let t = Vol::new(4).await;
            let a = t.snap().await;
            let pa: Vec<PackId> = t.packs().await.into_keys().collect();
            for i in 0..4 {
                t.write(i, 1000 + i);
            }
            let b = t.snap().await;
            // A crash inside a delete: a's catalog entry is gone, its manifest is not. And a
            // pack file went while its index stayed.
            t.node
                .catalog
                .remove_snapshot(&t.v, &a.id, |_, _| Ok(()))
                .unwrap();
            for p in &pa {
                std::fs::remove_file(t.pack_file(p)).unwrap();
            }
            let n = pa.len() as u64;

            let dry = gc(&t.node, true, &ProgressBar::hidden()).await.unwrap();
            assert_eq!(
                (dry.orphan_manifests_deleted, dry.stale_indexes_deleted),
                (1, n),
                "{dry:?}"
            );
            assert!(t.node.repo.read_manifest(&t.v, &a.id).await.is_ok());
            let idx = t.indexes().await;
            assert!(pa.iter().all(|p| idx.contains(p)));

            let done = gc(&t.node, false, &ProgressBar::hidden()).await.unwrap();
            assert_eq!(
                (done.orphan_manifests_deleted, done.stale_indexes_deleted),
                (1, n),
                "{done:?}"
            );
            assert!(t.node.repo.read_manifest(&t.v, &a.id).await.is_err());
            assert!(t.indexes().await.is_disjoint(&pa.iter().copied().collect()));
            t.assert_whole(&b).await;

            let again = gc(&t.node, false, &ProgressBar::hidden()).await.unwrap();
            assert_eq!(
                (again.orphan_manifests_deleted, again.stale_indexes_deleted),
                (0, 0)
            );
        });
    }

    #[test]
    fn a_missing_or_damaged_index_is_rebuilt_from_the_pack_and_an_unreadable_pack_is_kept() {
        run(async {
            let t = Vol::new(4).await;
            let a = t.snap().await;
            let p1: Vec<PackId> = t.packs().await.into_keys().collect();
            for i in 0..4 {
                t.write(i, 1000 + i);
            }
            let b = t.snap().await;
            let p2: Vec<PackId> = t
                .packs()
                .await
                .into_keys()
                .filter(|p| !p1.contains(p))
                .collect();
            for i in 0..4 {
                t.write(i, 2000 + i);
            }
            let c = t.snap().await;
            let p3: Vec<PackId> = t
                .packs()
                .await
                .into_keys()
                .filter(|p| !p1.contains(p) && !p2.contains(p))
                .collect();
            assert_eq!((p1.len(), p2.len(), p3.len()), (1, 1, 1));
            let (p1, p2, p3) = (p1[0], p2[0], p3[0]);
            let i1 = t.node.repo.read_index(&p1).await.unwrap();
            let i2 = t.node.repo.read_index(&p2).await.unwrap();
            // p1 lost its index, p2's is damaged, p3's is gone and so is its trailer.
            t.node.repo.delete_index(&p1).await.unwrap();
            t.node
                .repo
                .put_object(&format!("index/{p2}"), b"not an index".to_vec())
                .await
                .unwrap();
            t.node.repo.delete_index(&p3).await.unwrap();
            let f = t.pack_file(&p3);
            let len = std::fs::metadata(&f).unwrap().len();
            std::fs::write(&f, vec![0u8; len as usize]).unwrap();
            let before = t.packs().await;

            let dry = gc(&t.node, true, &ProgressBar::hidden()).await.unwrap();
            let rebuilt = |r: &GcReport| {
                r.notes
                    .iter()
                    .filter(|n| n.contains("rebuilt it from the pack's trailer"))
                    .count()
            };
            assert_eq!(rebuilt(&dry), 2, "{:?}", dry.notes);
            assert!(t.node.repo.read_index(&p1).await.is_err());
            assert!(t.node.repo.read_index(&p2).await.is_err());

            let done = gc(&t.node, false, &ProgressBar::hidden()).await.unwrap();
            assert_eq!(rebuilt(&done), 2, "{:?}", done.notes);
            assert!(
                done.notes
                    .iter()
                    .any(|n| n.contains(&p3.short()) && n.contains("unreadable and was kept")),
                "{:?}",
                done.notes
            );
            assert_eq!(
                t.node.repo.read_index(&p1).await.unwrap().entries,
                i1.entries
            );
            assert_eq!(
                t.node.repo.read_index(&p2).await.unwrap().entries,
                i2.entries
            );
            assert_eq!(done.packs_deleted, 0, "{done:?}");
            assert_eq!(
                t.packs().await,
                before,
                "gc deleted a pack it could not read"
            );
            t.assert_whole(&a).await;
            t.assert_whole(&b).await;
            let _ = c;
        });
    }

    #[test]
    fn the_daemons_gc_skips_a_busy_repository_or_waits_for_it() {
        run(async {
            let t = Vol::new(4).await;
            let a = t.snap().await;
            let pa: HashSet<PackId> = t.packs().await.into_keys().collect();
            for i in 0..4 {
                t.write(i, 1000 + i);
            }
            let b = t.snap().await;
            t.delete(&a).await;

            // A snapshot being read holds the repository shared.
            let reader = t.node.lock_repo_shared().await.unwrap();
            let pb = ProgressBar::hidden();
            assert!(gc_when_idle(&t.node, &pb).await.unwrap().is_none());
            let now = t.packs().await;
            assert!(pa.iter().all(|p| now.contains_key(p)));
            let node = t.node.clone();
            let waiting =
                tokio::spawn(async move { gc_waiting(node, &ProgressBar::hidden()).await });
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!waiting.is_finished(), "gc did not wait for the reader");
            drop(reader);
            let r = waiting.await.unwrap().unwrap();
            assert_eq!(r.packs_deleted, pa.len() as u64, "{r:?}");
            let after = t.packs().await;
            assert!(pa.iter().all(|p| !after.contains_key(p)));

            let pb_: HashSet<PackId> = after.into_keys().collect();
            for i in 0..4 {
                t.write(i, 2000 + i);
            }
            let c = t.snap().await;
            t.delete(&b).await;
            let r = gc_when_idle(&t.node, &pb)
                .await
                .unwrap()
                .expect("nothing holds it");
            assert_eq!(r.packs_deleted, pb_.len() as u64, "{r:?}");
            assert!(t.packs().await.keys().all(|p| !pb_.contains(p)));
            t.assert_whole(&c).await;
        });
    }

    #[test]
    fn a_locked_manifest_without_a_catalog_entry_keeps_its_chunks() {
        // A snapshot's catalog entry is gone (a commit lost in a crash, an older catalog) but
        // a lock names it: gc keeps its manifest, and every chunk the manifest names.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let node = Node::init(&dir.path().join("state"), None).await.unwrap();
            let image = dir.path().join("v.img");
            crate::sample::write_mixed_image(&image, 1 << 20, 64 << 10, 7).unwrap();
            let v: VolumeName = "v".parse().unwrap();
            node.catalog
                .add_volume(&VolumeRecord::image(v.clone(), image, 64 << 10))
                .unwrap();
            let pb = ProgressBar::hidden();
            let created = crate::snapshot::create::create(&node, &v, Default::default(), &pb)
                .await
                .unwrap();
            let id = created.record.id;
            node.catalog
                .locks()
                .add(
                    &v,
                    &"app:keeper".parse().unwrap(),
                    NewLock {
                        snapshot: id,
                        lock_type: LockType::Application,
                        value: "x".into(),
                        lease_ms: None,
                        path: vec![],
                    },
                )
                .unwrap();
            node.catalog
                .remove_snapshot(&v, &id, |_, _| Ok(()))
                .unwrap();

            let report = gc(&node, false, &pb).await.unwrap();
            assert_eq!(report.orphan_manifests_deleted, 0, "{report:?}");
            let raw = node.repo.read_manifest(&v, &id).await.unwrap();
            let m = super::super::Manifest::decode(&raw, "v").unwrap();
            let wanted: HashSet<ChunkId> = m.blocks.ids().iter().copied().collect();
            assert!(!wanted.is_empty());
            let (found, problems) = node.find_chunks(&wanted).await.unwrap();
            assert!(problems.is_empty(), "{problems:?}");
            for c in &wanted {
                assert!(
                    found.contains(c),
                    "gc deleted chunk {c} of a locked manifest"
                );
            }
        });
    }
}
