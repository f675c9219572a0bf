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
) -> Result<(Vec<Option<ChunkId>>, SnapshotStats, u64)> {
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
        bytes_read: 0,
    };
    // A reader thread fills a fixed pool of buffers while this thread hashes and compresses:
    // memory stays bounded whatever the image's size, and holes are never read.
    let buffers = read_buffers(seg_bytes);
    let (seg_tx, seg_rx) = sync_channel::<Result<Segment>>(buffers.saturating_sub(2).max(1));
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(buffers);
    for _ in 0..buffers {
        free_tx
            .send(Vec::with_capacity(seg_bytes))
            .expect("room for every buffer");
    }
    std::thread::scope(|s| -> Result<()> {
        let image = &image;
        s.spawn(move || read_segments(image, bs, seg_bytes, seg_tx, free_rx));
        // Owned by this closure: an early return drops it, which stops the reader thread
        // (its next send fails) instead of leaving the scope waiting for it.
        // The same for the free-buffer sender, which the reader may be waiting on.
        let segments = seg_rx;
        let free_tx = free_tx;
        for seg in segments.iter() {
            let seg = seg?;
            match seg.buf {
                None => b.add_holes(seg.len, bs),
                Some(buf) => {
                    b.add_segment(&buf[..seg.len as usize], &seg.holes)?;
                    // Hand the buffer back; if the reader has finished, just drop it.
                    let _ = free_tx.try_send(buf);
                }
            }
        }
        Ok(())
    })?;
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

/// Bytes of read buffers by default (`HOLDFAST_READ_BUFFER`, at least two segments): the
/// reader reads ahead into them while blocks are hashed. More can help a slow device with a
/// fast CPU; memory use follows it, not the image's size.
const READ_BUFFER_BYTES: usize = 32 << 20;

fn read_buffers(seg_bytes: usize) -> usize {
    let bytes = std::env::var("HOLDFAST_READ_BUFFER")
        .ok()
        .and_then(|v| v.parse::<bytesize::ByteSize>().ok())
        .map_or(READ_BUFFER_BYTES, |b| b.as_u64() as usize);
    (bytes / seg_bytes.max(1)).clamp(2, 256)
}

/// One segment of the image as read: `buf` holds its bytes (`None` when all of it is a
/// hole, and nothing was read), `holes` marks the blocks that are holes (not read; zeros).
struct Segment {
    len: u64,
    buf: Option<Vec<u8>>,
    holes: Vec<bool>,
}

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
    /// Bytes read from the image (holes are not read).
    bytes_read: u64,
}

impl Blocks {
    /// Adds `len` bytes of holes: zero blocks, nothing read or hashed.
    fn add_holes(&mut self, len: u64, block_size: usize) {
        let n = len.div_ceil(block_size as u64);
        self.blocks.extend(std::iter::repeat_n(None, n as usize));
        self.stats.zero_blocks += n;
        self.stats.blocks += n;
        self.progress.inc(len);
    }

    /// Adds the next segment of the image, read into our own buffer; the blocks `holes`
    /// marks were not read (zeros).
    fn add_segment(&mut self, seg: &[u8], holes: &[bool]) -> Result<()> {
        let parts: Vec<&[u8]> = seg.chunks(self.block_size).collect();
        self.bytes_read += parts
            .iter()
            .zip(holes)
            .filter(|(_, h)| !**h)
            .map(|(p, _)| p.len() as u64)
            .sum::<u64>();
        // One parallel pass: hash each block and compress it unless it is zero or the
        // repository already has it. A block repeated within this run is compressed more
        // than once and stored once (rare; cheaper than a shared set across threads).
        let index = &self.index;
        let done: Vec<Result<Block>> = parts
            .par_iter()
            .zip(holes.par_iter())
            .map(|(b, &hole)| {
                if hole || chunk::is_zero(b) {
                    return Ok(Block::Zero);
                }
                classify(index, b)
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

/// The reader thread: reads the image in segments, reusing buffers handed back. Holes are
/// not read: a segment that is all hole goes without a buffer, and within a segment only the
/// blocks that overlap data are read. After reading, the segment's hole map is asked again:
/// a block that was a hole and holds data now (a writer filled it meanwhile) is read again, so
/// each block is as it was either before or after, never a mix of the two maps. Each segment
/// leaves the page cache once read.
fn read_segments(
    image: &FileVolume,
    block_size: usize,
    seg_bytes: usize,
    out: SyncSender<Result<Segment>>,
    free: Receiver<Vec<u8>>,
) {
    let size = image.size();
    let mut offset = 0u64;
    while offset < size {
        let want = ((size - offset) as usize).min(seg_bytes);
        let r = read_segment(image, block_size, offset, want, &free);
        let failed = r.is_err();
        let stop = match r {
            Ok(None) => return, // the consumer stopped
            Ok(Some(seg)) => out.send(Ok(seg)).is_err(),
            Err(e) => out.send(Err(e)).is_err(),
        };
        if stop || failed {
            return;
        }
        image.done_with(offset..offset + want as u64);
        offset += want as u64;
    }
}

fn read_segment(
    image: &FileVolume,
    block_size: usize,
    offset: u64,
    want: usize,
    free: &Receiver<Vec<u8>>,
) -> Result<Option<Segment>> {
    let end = offset + want as u64;
    let blocks = want.div_ceil(block_size);
    let holes_of = |data: &[std::ops::Range<u64>]| -> Vec<bool> {
        (0..blocks)
            .map(|i| {
                let b = offset + (i * block_size) as u64;
                let e = (b + block_size as u64).min(end);
                !data.iter().any(|r| r.start < e && r.end > b)
            })
            .collect()
    };
    let data = image.data_ranges(offset..end)?;
    if data.is_empty() {
        return Ok(Some(Segment {
            len: want as u64,
            buf: None,
            holes: vec![true; blocks],
        }));
    }
    // Wait for a free buffer: the pool bounds memory and avoids fresh allocations.
    let Ok(mut buf) = free.recv() else {
        return Ok(None);
    };
    // Recycled buffers are already full-size; only the first use zero-fills.
    buf.resize(want, 0);
    let mut holes = holes_of(&data);
    read_blocks(image, block_size, offset, &mut buf, &holes)?;
    // Blocks that were holes and hold data now were filled while this segment was read:
    // read them (again) after the change.
    if holes.iter().any(|h| *h) {
        let now = holes_of(&image.data_ranges(offset..end)?);
        let filled: Vec<bool> = holes
            .iter()
            .zip(&now)
            .map(|(was, is)| *was && !is)
            .collect();
        if filled.iter().any(|f| *f) {
            let not_filled: Vec<bool> = filled.iter().map(|f| !f).collect();
            read_blocks(image, block_size, offset, &mut buf, &not_filled)?;
            for (h, f) in holes.iter_mut().zip(&filled) {
                *h &= !f;
            }
        }
    }
    Ok(Some(Segment {
        len: want as u64,
        buf: Some(buf),
        holes,
    }))
}

/// Reads into `buf` (the segment at `offset`) every block that `skip` does not mark, one
/// `pread` per run of adjacent blocks.
fn read_blocks(
    image: &FileVolume,
    block_size: usize,
    offset: u64,
    buf: &mut [u8],
    skip: &[bool],
) -> Result<()> {
    let mut i = 0;
    while i < skip.len() {
        if skip[i] {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < skip.len() && !skip[j] {
            j += 1;
        }
        let (from, to) = (i * block_size, (j * block_size).min(buf.len()));
        let n = image.read_at(offset + from as u64, &mut buf[from..to])?;
        if n < to - from {
            return Err(Error::conflict(format!(
                "volume image {} shrank while it was read (short read at offset {}); \
                 nothing was committed",
                image.path().display(),
                offset + (from + n) as u64
            )));
        }
        i = j;
    }
    Ok(())
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
