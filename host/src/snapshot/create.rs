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
use crate::repo::pack::PackBuilder;
use crate::repo::pack::PackIndex;
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
    if let Some(from) = &vol.upstream {
        return Err(Error::invalid(format!(
            "volume {volume} is a replica ({from}); its snapshots arrive by `holdfast mirror run`,              it has no image to snapshot"
        )));
    }
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
    super::manifest::check_block_count(size, block_size, &format!("volume {volume}"))?;

    // gc must not remove a chunk this snapshot reuses between loading the index and committing.
    let _repo_lock = node.lock_repo_shared().await?;
    let (index, problems) = node.load_index().await?;
    for p in problems {
        tracing::warn!("{p}; its chunks will be stored again");
    }

    progress.set_length(size);
    let (pack_tx, mut pack_rx) = mpsc::channel::<PackBuilder>(2);
    let pb = progress.clone();
    let compute =
        tokio::task::spawn_blocking(move || compute(image, block_size, index, pack_tx, pb));

    // Upload sealed packs as they come, a bounded number at a time. Spawned tasks make
    // progress on their own while this loop waits for the next pack.
    let sem = Arc::new(Semaphore::new(UPLOAD_CONCURRENCY));
    let mut uploads: JoinSet<Result<PackIndex>> = JoinSet::new();
    let mut stored: Vec<PackIndex> = Vec::new();
    let mut upload_error: Option<Error> = None;
    while let Some(pack) = pack_rx.recv().await {
        let permit = sem.clone().acquire_owned().await.expect("never closed");
        let repo = node.repo.clone();
        uploads.spawn(async move {
            // Sealing (trailer, hash) happens here, off the compute thread.
            let r = async {
                let pack = tokio::task::spawn_blocking(move || pack.finish())
                    .await
                    .map_err(|e| Error::internal(format!("pack sealer failed: {e}")))??;
                repo.put_pack(&pack).await.map(|()| pack.index)
            }
            .await;
            drop(permit);
            r
        });
        while let Some(done) = uploads.try_join_next() {
            match flatten(done) {
                Ok(pi) => stored.push(pi),
                Err(e) => upload_error = Some(e),
            }
        }
        if upload_error.is_some() {
            // Dropping the receiver stops the compute side at its next pack.
            break;
        }
    }
    drop(pack_rx);
    while let Some(done) = uploads.join_next().await {
        match flatten(done) {
            Ok(pi) => stored.push(pi),
            Err(e) => {
                upload_error.get_or_insert(e);
            }
        }
    }
    // The next snapshot or mirror update on this node need not read these indexes back.
    node.remember_packs(&stored);
    let computed = compute
        .await
        .map_err(|e| Error::internal(format!("snapshot worker failed: {e}")));
    if let Some(e) = upload_error {
        return Err(e);
    }
    let (blocks, stats) = computed??;
    debug_assert_eq!(blocks.len() as u64, block_count(size, block_size));

    let now = crate::now_unix_ms();
    // Ids sort by creation time, and mirrors and pushes send what is newer than their base
    // by that order: a clock that went back must not give this snapshot an id below the
    // volume's newest (it would never be sent).
    let id_ms = id_time(&existing, now);
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: SnapshotId::generate(id_ms),
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

fn flatten(r: std::result::Result<Result<PackIndex>, tokio::task::JoinError>) -> Result<PackIndex> {
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

/// One block after the parallel pass.
enum Block {
    Zero,
    Known(ChunkId),
    /// New: its id and its stored form (compressed, or raw when incompressible).
    New(ChunkId, chunk::Encoding, Vec<u8>),
}

thread_local! {
    /// Each worker's private copy of the block it is working on (see `add_segment`).
    static PRIVATE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Hashes `data` (a private copy of a mapped block, or a block in our own buffer) and, if the repository
/// lacks it, encodes it.
fn classify(index: &ChunkIndex, data: &[u8]) -> Result<Block> {
    let id = chunk::hash(data);
    if index.contains(&id) {
        return Ok(Block::Known(id));
    }
    let (encoding, stored) = chunk::encode(data)?;
    Ok(Block::New(id, encoding, stored))
}

/// The compute side of the pipeline; runs on a blocking thread and uses rayon inside.
fn compute(
    image: FileVolume,
    block_size: u32,
    index: ChunkIndex,
    packs: mpsc::Sender<PackBuilder>,
    progress: ProgressBar,
) -> Result<(Vec<Option<ChunkId>>, SnapshotStats)> {
    let bs = block_size as usize;
    let size = image.size();
    let seg_bytes = (SEGMENT_BYTES / bs).max(1) * bs;
    let mut b = Blocks {
        block_size: bs,
        index,
        packs,
        progress,
        blocks: Vec::with_capacity(block_count(size, block_size) as usize),
        stats: SnapshotStats::default(),
        pending: HashSet::new(),
        builder: PackBuilder::new(),
    };
    if let Some(map) = image.map() {
        // Regular files: hash and compress the page cache's pages in place, in larger steps
        // (no buffers to hold) so the threads meet less often.
        for seg in map.chunks(seg_bytes * 4) {
            b.add_segment(seg, true)?;
        }
    } else {
        // Block devices: a reader thread fills a fixed pool of buffers while we work.
        let (seg_tx, seg_rx) = sync_channel::<Result<Segment>>(2);
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(READ_BUFFERS);
        for _ in 0..READ_BUFFERS {
            free_tx
                .send(Vec::with_capacity(seg_bytes))
                .expect("room for every buffer");
        }
        std::thread::scope(|s| -> Result<()> {
            let image = &image;
            s.spawn(move || read_segments(image, seg_bytes, seg_tx, free_rx));
            // Owned by this closure: an early return drops it, which stops the reader thread
            // (its next send fails) instead of leaving the scope waiting for it.
            // The same for the free-buffer sender, which the reader may be waiting on.
            let segments = seg_rx;
            let free_tx = free_tx;
            for seg in segments.iter() {
                let (_offset, buf) = seg?;
                b.add_segment(&buf, false)?;
                // Hand the buffer back; if the reader has finished, just drop it.
                let _ = free_tx.try_send(buf);
            }
            Ok(())
        })?;
    }
    if !b.builder.is_empty() {
        send_pack(&b.packs, b.builder)?;
    }
    image.check_size_unchanged()?;
    if b.blocks.len() as u64 != block_count(size, block_size) {
        return Err(Error::conflict(format!(
            "volume image {} ended early (read {} of {} blocks); nothing was committed",
            image.path().display(),
            b.blocks.len(),
            block_count(size, block_size)
        )));
    }
    Ok((b.blocks, b.stats))
}

/// Buffers the reader thread cycles through (read-ahead of two segments, two in use).
const READ_BUFFERS: usize = 4;

/// The state of a snapshot being computed, segment by segment.
struct Blocks {
    block_size: usize,
    index: ChunkIndex,
    packs: mpsc::Sender<PackBuilder>,
    progress: ProgressBar,
    blocks: Vec<Option<ChunkId>>,
    stats: SnapshotStats,
    /// New chunks already packed in this run (a block repeated within the image).
    pending: HashSet<ChunkId>,
    builder: PackBuilder,
}

impl Blocks {
    /// Adds the next segment of the image; `shared` when it is a mapping of the image file
    /// (another process may write it meanwhile), rather than our own buffer.
    fn add_segment(&mut self, seg: &[u8], shared: bool) -> Result<()> {
        let parts: Vec<&[u8]> = seg.chunks(self.block_size).collect();
        // One parallel pass: hash each block and compress it unless it is zero or the
        // repository already has it. A block repeated within this run is compressed more
        // than once and stored once (rare; cheaper than a shared set across threads).
        let index = &self.index;
        let done: Vec<Result<Block>> = parts
            .par_iter()
            .map(|b| {
                if chunk::is_zero(b) {
                    return Ok(Block::Zero);
                }
                if !shared {
                    return classify(index, b);
                }
                // The mapped image can change under us: hash, compress and store one private
                // copy, so a chunk's bytes always match its id (invariant 5).
                PRIVATE.with(|copy| {
                    let mut copy = copy.borrow_mut();
                    copy.clear();
                    copy.extend_from_slice(b);
                    classify(index, &copy)
                })
            })
            .collect();
        for (part, block) in parts.iter().zip(done) {
            match block? {
                Block::Zero => {
                    self.stats.zero_blocks += 1;
                    self.blocks.push(None);
                }
                Block::Known(id) => self.blocks.push(Some(id)),
                Block::New(id, encoding, stored) => {
                    self.blocks.push(Some(id));
                    if !self.pending.insert(id) {
                        continue;
                    }
                    self.stats.new_chunks += 1;
                    self.stats.new_bytes += part.len() as u64;
                    self.stats.new_stored_bytes += stored.len() as u64;
                    self.builder.add(id, encoding, &stored, part.len());
                    if self.builder.is_full() {
                        send_pack(&self.packs, std::mem::take(&mut self.builder))?;
                    }
                }
            }
        }
        self.stats.blocks += parts.len() as u64;
        self.progress.inc(seg.len() as u64);
        Ok(())
    }
}

fn send_pack(packs: &mpsc::Sender<PackBuilder>, pack: PackBuilder) -> Result<()> {
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
        // Wait for a free buffer: the pool bounds memory and avoids fresh allocations.
        let Ok(mut buf) = free.recv() else { return };
        // Recycled buffers are already full-size; only the first use zero-fills.
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

/// The time part of a new snapshot's id: now, or just after the volume's newest if the clock
/// went back.
fn id_time(existing: &[SnapshotRecord], now: u64) -> u64 {
    existing
        .iter()
        .map(|s| s.id.unix_ms() + 1)
        .max()
        .map_or(now, |next| next.max(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_that_went_back_still_gives_a_newer_id() {
        // A snapshot taken after the clock was set back sorts after the volume's newest.
        let rec = |ms| SnapshotRecord {
            id: SnapshotId::generate(ms),
            volume: "v".parse().unwrap(),
            name: "s".parse().unwrap(),
            created_unix_ms: ms,
            size: 0,
            block_size: 4096,
            labels: Default::default(),
            parent: None,
            stats: Default::default(),
        };
        assert_eq!(id_time(&[], 500), 500);
        assert_eq!(id_time(&[rec(100)], 500), 500);
        assert_eq!(id_time(&[rec(100), rec(900)], 500), 901);
        let next = SnapshotId::generate(id_time(&[rec(900)], 500));
        assert!(next > rec(900).id);
    }

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
