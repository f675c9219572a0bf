//! Taking a snapshot: read, hash, deduplicate, compress, pack, commit.
//!
//! The work is a pipeline so that both cores stay busy and the disk never waits:
//!
//! ```text
//! reader thread --segments--> compute (rayon: hash every block, compress new ones)
//!     --sealed packs--> uploader (tokio tasks, bounded) --> repository
//! ```
//!
//! Only blocks whose hash the repository does not hold yet are compressed and written, so an
//! incremental snapshot costs one read and one hash of the image plus the changed blocks.
//! After the last pack is durable the manifest is written (atomically, create-only), and only
//! then is the snapshot recorded in the catalog, which makes it visible.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use rayon::prelude::*;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::{MANIFEST_FORMAT, Manifest, block_count};
use crate::catalog::{SnapshotRecord, SnapshotStats};
use crate::chunk;
use crate::error::{Error, Result};
use crate::id::{ChunkId, SnapshotId, SnapshotName, VolumeName};
use crate::repo::ChunkIndex;
use crate::repo::pack::{FinishedPack, PackBuilder};
use crate::state::Node;
use crate::volume::FileVolume;

/// Bytes read from the image per pipeline step: big enough to amortise the hand-offs.
const SEGMENT_BYTES: usize = 8 << 20;
/// Pack uploads in flight: two keep a local disk busy; more only add memory.
const UPLOAD_CONCURRENCY: usize = 2;

#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    pub name: Option<SnapshotName>,
    pub labels: BTreeMap<String, String>,
}

/// What `create` did.
#[derive(Clone, Debug)]
pub struct CreateReport {
    pub record: SnapshotRecord,
    pub bytes_read: u64,
    pub elapsed: Duration,
}

/// Takes a snapshot of `volume`.
pub async fn create(
    node: &Node,
    volume: &VolumeName,
    opts: CreateOptions,
    progress: &ProgressBar,
) -> Result<CreateReport> {
    let started = Instant::now();
    let vol = node.catalog.volume(volume)?;
    let existing = node.catalog.snapshots(volume)?;
    let name = match opts.name {
        Some(n) => {
            if existing.iter().any(|s| s.name == n) {
                return Err(Error::conflict(format!(
                    "volume {volume} already has a snapshot named {:?}; choose another --name",
                    n.as_str()
                )));
            }
            n
        }
        None => default_name(&existing, crate::now_unix_ms()),
    };
    let image = FileVolume::open(&vol.image)?;
    let size = image.size();
    let block_size = vol.block_size;

    // gc must not remove a chunk this snapshot reuses between loading the index and committing.
    let _repo_lock = node.lock_repo_shared()?;
    let (index, problems) = node.repo.load_index().await?;
    for p in problems {
        tracing::warn!("{p}; its chunks will be stored again");
    }

    progress.set_length(size);
    let (pack_tx, mut pack_rx) = mpsc::channel::<FinishedPack>(2);
    let pb = progress.clone();
    let compute =
        tokio::task::spawn_blocking(move || compute(image, block_size, index, pack_tx, pb));

    // Upload sealed packs as they come, a bounded number at a time. Spawned tasks make
    // progress on their own while this loop waits for the next pack.
    let sem = Arc::new(Semaphore::new(UPLOAD_CONCURRENCY));
    let mut uploads: JoinSet<Result<()>> = JoinSet::new();
    let mut upload_error: Option<Error> = None;
    while let Some(pack) = pack_rx.recv().await {
        let permit = sem.clone().acquire_owned().await.expect("never closed");
        let repo = node.repo.clone();
        uploads.spawn(async move {
            let r = repo.put_pack(&pack).await;
            drop(permit);
            r
        });
        while let Some(done) = uploads.try_join_next() {
            if let Err(e) = flatten(done) {
                upload_error = Some(e);
            }
        }
        if upload_error.is_some() {
            // Dropping the receiver stops the compute side at its next pack.
            break;
        }
    }
    drop(pack_rx);
    while let Some(done) = uploads.join_next().await {
        if let Err(e) = flatten(done) {
            upload_error.get_or_insert(e);
        }
    }
    let computed = compute
        .await
        .map_err(|e| Error::internal(format!("snapshot worker failed: {e}")));
    if let Some(e) = upload_error {
        return Err(e);
    }
    let (blocks, stats) = computed??;
    debug_assert_eq!(blocks.len() as u64, block_count(size, block_size));

    let now = crate::now_unix_ms();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: SnapshotId::generate(now),
        volume: volume.clone(),
        name,
        created_unix_ms: now,
        size,
        block_size,
        labels: opts.labels,
        parent: existing.last().map(|s| s.id),
        blocks,
    };
    node.repo
        .put_manifest(volume, &manifest.id, manifest.encode()?)
        .await?;
    let record = manifest.record(stats);
    if let Err(e) = node.catalog.commit_snapshot(&record) {
        // Not visible; remove the manifest now rather than leaving it to gc.
        let _ = node.repo.delete_manifest(volume, &manifest.id).await;
        return Err(e);
    }
    tracing::info!(
        snapshot = %record.display_ref(),
        id = %record.id,
        new_chunks = record.stats.new_chunks,
        "snapshot committed"
    );
    Ok(CreateReport {
        record,
        bytes_read: size,
        elapsed: started.elapsed(),
    })
}

fn flatten(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.map_err(|e| Error::internal(format!("pack upload task failed: {e}")))?
}

/// A default name: the creation time (UTC, to the second), made unique within the volume.
fn default_name(existing: &[SnapshotRecord], now_ms: u64) -> SnapshotName {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(now_ms);
    let base = humantime::format_rfc3339_seconds(t).to_string();
    let taken: HashSet<&str> = existing.iter().map(|s| s.name.as_str()).collect();
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(name.as_str()) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name.parse().expect("a timestamp is a valid name")
}

type Segment = (u64, Vec<u8>);

/// The compute side of the pipeline; runs on a blocking thread and uses rayon inside.
fn compute(
    image: FileVolume,
    block_size: u32,
    index: ChunkIndex,
    packs: mpsc::Sender<FinishedPack>,
    progress: ProgressBar,
) -> Result<(Vec<Option<ChunkId>>, SnapshotStats)> {
    let bs = block_size as usize;
    let size = image.size();
    let seg_bytes = (SEGMENT_BYTES / bs).max(1) * bs;
    let (seg_tx, seg_rx) = sync_channel::<Result<Segment>>(2);
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(4);

    let mut blocks: Vec<Option<ChunkId>> =
        Vec::with_capacity(block_count(size, block_size) as usize);
    let mut stats = SnapshotStats::default();
    let mut pending: HashSet<ChunkId> = HashSet::new();
    let mut builder = PackBuilder::new();

    std::thread::scope(|s| -> Result<()> {
        let image = &image;
        s.spawn(move || read_segments(image, seg_bytes, seg_tx, free_rx));
        // Owned by this closure: an early return drops it, which stops the reader thread
        // (its next send fails) instead of leaving the scope waiting for it.
        let segments = seg_rx;
        for seg in segments.iter() {
            let (_offset, buf) = seg?;
            let parts: Vec<&[u8]> = buf.chunks(bs).collect();
            let hashed: Vec<Option<ChunkId>> = parts
                .par_iter()
                .map(|b| (!chunk::is_zero(b)).then(|| chunk::hash(b)))
                .collect();
            let mut new: Vec<usize> = Vec::new();
            for (i, h) in hashed.iter().enumerate() {
                match h {
                    None => stats.zero_blocks += 1,
                    Some(id) if !index.contains(id) && pending.insert(*id) => new.push(i),
                    Some(_) => {}
                }
            }
            let encoded: Vec<Result<(chunk::Encoding, Vec<u8>)>> =
                new.par_iter().map(|&i| chunk::encode(parts[i])).collect();
            for (&i, enc) in new.iter().zip(encoded) {
                let (encoding, stored) = enc?;
                let id = hashed[i].expect("new blocks are non-zero");
                stats.new_chunks += 1;
                stats.new_bytes += parts[i].len() as u64;
                stats.new_stored_bytes += stored.len() as u64;
                builder.add(id, encoding, &stored, parts[i].len());
                if builder.is_full() {
                    let full = std::mem::take(&mut builder).finish()?;
                    send_pack(&packs, full)?;
                }
            }
            stats.blocks += hashed.len() as u64;
            blocks.extend(hashed);
            progress.inc(buf.len() as u64);
            // Hand the buffer back to the reader; if it has finished, just drop it.
            let _ = free_tx.try_send(buf);
        }
        Ok(())
    })?;
    if !builder.is_empty() {
        send_pack(&packs, builder.finish()?)?;
    }
    image.check_size_unchanged()?;
    if blocks.len() as u64 != block_count(size, block_size) {
        return Err(Error::conflict(format!(
            "volume image {} ended early (read {} of {} blocks); nothing was committed",
            image.path().display(),
            blocks.len(),
            block_count(size, block_size)
        )));
    }
    Ok((blocks, stats))
}

fn send_pack(packs: &mpsc::Sender<FinishedPack>, pack: FinishedPack) -> Result<()> {
    packs
        .blocking_send(pack)
        .map_err(|_| Error::internal("the pack uploader stopped early"))
}

/// The reader thread: reads the image in segments, reusing buffers handed back.
fn read_segments(
    image: &FileVolume,
    seg_bytes: usize,
    out: SyncSender<Result<Segment>>,
    free: Receiver<Vec<u8>>,
) {
    let size = image.size();
    let mut offset = 0u64;
    while offset < size {
        let want = ((size - offset) as usize).min(seg_bytes);
        let mut buf = free.try_recv().unwrap_or_default();
        buf.resize(want, 0);
        let r = image.read_at(offset, &mut buf).and_then(|n| {
            if n < want {
                Err(Error::conflict(format!(
                    "volume image {} shrank while it was read (short read at offset {}); \
                     nothing was committed",
                    image.path().display(),
                    offset + n as u64
                )))
            } else {
                Ok(())
            }
        });
        let failed = r.is_err();
        if out.send(r.map(|()| (offset, buf))).is_err() || failed {
            return;
        }
        offset += want as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_unique_within_the_volume() {
        // Two snapshots in the same second get distinct names.
        let a = default_name(&[], 1_700_000_000_000);
        assert_eq!(a.as_str(), "2023-11-14T22:13:20Z");
        let rec = SnapshotRecord {
            id: SnapshotId::generate(1),
            volume: "v".parse().unwrap(),
            name: a.clone(),
            created_unix_ms: 1,
            size: 0,
            block_size: 4096,
            labels: Default::default(),
            parent: None,
            stats: Default::default(),
        };
        assert_eq!(
            default_name(&[rec], 1_700_000_000_000).as_str(),
            "2023-11-14T22:13:20Z-2"
        );
    }
}
