//! Taking a snapshot: read, hash, deduplicate, compress, pack, commit.
//!
//! The work is a pipeline so that both cores stay busy and the disk never waits:
//!
//! ```text
//! compute (rayon, segment by segment: read each block that is not a hole, hash it,
//!          compress it if new)
//!     --sealed packs--> uploader (tokio tasks, bounded) --> repository
//! ```
//!
//! Only blocks whose hash the repository does not hold yet are compressed and written, so an
//! incremental snapshot costs one read and one hash of the image plus the changed blocks.
//! After the last pack is durable the manifest is written (atomically, create-only), and only
//! then is the snapshot recorded in the catalog, which makes it visible.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use rayon::prelude::*;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::{BlockList, MANIFEST_FORMAT, Manifest, block_count};
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
    let (blocks, stats, bytes_read) = computed??;
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
        bytes_read,
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

/// One block after the parallel pass.
enum Block {
    Zero,
    Known(ChunkId),
    /// New: its id and its stored form (compressed, or raw when incompressible).
    New(ChunkId, chunk::Encoding, Vec<u8>),
}

/// Hashes `data` (a block read into a worker's buffer) and, if the repository
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
///
/// The image is taken a segment at a time. Holes are never read: the segment's hole map says
/// which blocks hold data, and only those are read, each by the rayon worker that then hashes
/// (and, if new, compresses) it, so reading and hashing overlap on every core with one block
/// buffer per worker. After the segment, its hole map is asked again: a block that was a hole
/// and holds data now (a writer filled it meanwhile) is read after the change, so each block is
/// as it was either before or after, never a mix of the two maps. Each segment leaves the page
/// cache once read. Memory holds one segment's new chunks at most, whatever the image's size.
fn compute(
    image: FileVolume,
    block_size: u32,
    index: ChunkIndex,
    packs: mpsc::Sender<PackBuilder>,
    progress: ProgressBar,
) -> Result<(BlockList, SnapshotStats, u64)> {
    let bs = block_size as usize;
    let size = image.size();
    let seg_bytes = (SEGMENT_BYTES / bs).max(1) * bs;
    let mut b = Blocks {
        block_size: bs,
        index,
        packs,
        progress,
        blocks: BlockList::with_capacity(block_count(size, block_size) as usize),
        stats: SnapshotStats::default(),
        pending: HashSet::new(),
        builder: PackBuilder::new(),
        bytes_read: 0,
    };
    let mut offset = 0u64;
    while offset < size {
        // Holes up to the block that holds the next data go in one step, whatever their
        // length: a terabyte of holes is a few system calls and a bit per block.
        let next = image.next_data(offset)?.unwrap_or(size).min(size);
        let holes_to = (next / bs as u64 * bs as u64).max(offset);
        if holes_to > offset {
            b.add_holes(holes_to - offset, bs);
            offset = holes_to;
            continue;
        }
        let len = ((size - offset) as usize).min(seg_bytes);
        let end = offset + len as u64;
        let data = image.data_ranges(offset..end)?;
        if data.is_empty() {
            b.add_holes(len as u64, bs);
        } else {
            b.add_segment(&image, offset, len, &data)?;
        }
        image.done_with(offset..end);
        offset = end;
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
    Ok((b.blocks, b.stats, b.bytes_read))
}

/// The state of a snapshot being computed, segment by segment.
struct Blocks {
    block_size: usize,
    index: ChunkIndex,
    packs: mpsc::Sender<PackBuilder>,
    progress: ProgressBar,
    blocks: BlockList,
    stats: SnapshotStats,
    /// New chunks already packed in this run (a block repeated within the image).
    pending: HashSet<ChunkId>,
    builder: PackBuilder,
    /// Bytes read from the image (holes are not read).
    bytes_read: u64,
}

/// A block of a segment after the parallel pass: `None` for a hole (not read).
type Done = Option<Result<Block>>;

impl Blocks {
    /// Adds `len` bytes of holes: zero blocks, nothing read or hashed.
    fn add_holes(&mut self, len: u64, block_size: usize) {
        let n = len.div_ceil(block_size as u64);
        self.blocks.push_zeros(n as usize);
        self.stats.zero_blocks += n;
        self.stats.blocks += n;
        self.progress.inc(len);
    }

    /// Adds the segment of `len` bytes at `offset`, whose data (as opposed to holes) is
    /// `data`.
    fn add_segment(
        &mut self,
        image: &FileVolume,
        offset: u64,
        len: usize,
        data: &[Range<u64>],
    ) -> Result<()> {
        let bs = self.block_size;
        let end = offset + len as u64;
        let count = len.div_ceil(bs);
        let block = |i: usize| {
            let from = offset + (i * bs) as u64;
            from..(from + bs as u64).min(end)
        };
        let is_hole = |data: &[Range<u64>], i: usize| {
            let r = block(i);
            !data.iter().any(|d| d.start < r.end && d.end > r.start)
        };
        // One parallel pass: read each block that holds data, hash it, and compress it unless
        // it is zero or the repository already has it. A block repeated within this run is
        // compressed more than once and stored once (rare; cheaper than a shared set across
        // threads).
        let index = &self.index;
        let read = |i: usize| -> Done { Some(read_block(image, index, block(i))) };
        let mut done: Vec<Done> = (0..count)
            .into_par_iter()
            .map(|i| if is_hole(data, i) { None } else { read(i) })
            .collect();
        // Blocks that were holes and hold data now were filled while this segment was read:
        // read them after the change.
        if done.iter().any(Option::is_none) {
            let now = image.data_ranges(offset..end)?;
            let filled: Vec<usize> = (0..count)
                .filter(|&i| done[i].is_none() && !is_hole(&now, i))
                .collect();
            let again: Vec<(usize, Done)> = filled.into_par_iter().map(|i| (i, read(i))).collect();
            for (i, d) in again {
                done[i] = d;
            }
        }
        for (i, d) in done.into_iter().enumerate() {
            let r = block(i);
            let block_len = (r.end - r.start) as usize;
            let Some(d) = d else {
                self.stats.zero_blocks += 1;
                self.blocks.push(None);
                continue;
            };
            self.bytes_read += block_len as u64;
            match d? {
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
                    self.stats.new_bytes += block_len as u64;
                    self.stats.new_stored_bytes += stored.len() as u64;
                    self.builder.add(id, encoding, &stored, block_len);
                    if self.builder.is_full() {
                        send_pack(&self.packs, std::mem::take(&mut self.builder))?;
                    }
                }
            }
        }
        self.stats.blocks += count as u64;
        self.progress.inc(len as u64);
        Ok(())
    }
}

fn send_pack(packs: &mpsc::Sender<PackBuilder>, pack: PackBuilder) -> Result<()> {
    packs
        .blocking_send(pack)
        .map_err(|_| Error::internal("the pack uploader stopped early"))
}

/// Reads the block at `range` of the image (one `pread`, into the calling worker's own
/// buffer) and classifies it.
fn read_block(image: &FileVolume, index: &ChunkIndex, range: Range<u64>) -> Result<Block> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let len = (range.end - range.start) as usize;
    BUF.with_borrow_mut(|buf| {
        buf.resize(len, 0);
        let buf = &mut buf[..len];
        let n = image.read_at(range.start, buf)?;
        if n < len {
            return Err(Error::conflict(format!(
                "volume image {} shrank while it was read (short read at offset {}); \
                 nothing was committed",
                image.path().display(),
                range.start + n as u64
            )));
        }
        if chunk::is_zero(buf) {
            return Ok(Block::Zero);
        }
        classify(index, buf)
    })
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
