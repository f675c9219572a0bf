//! Restoring a snapshot to a file or block device, every chunk verified on the way.
//!
//! Chunks are read pack by pack (ranges of one pack in one request), decoded and verified in
//! parallel, and written at their blocks' offsets. A regular file is written under a temporary
//! name beside the destination and renamed into place once complete and synced, so a failed
//! or interrupted restore never leaves a file that looks whole. All-zero blocks are holes in a
//! new file; on a block device they are written as zeros. An NBD export (`--to nbd://...`)
//! is written in place like a device (zero runs with `NBD_CMD_WRITE_ZEROES`, which leaves
//! holes where the server can) and flushed at the end.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;

use super::Manifest;
use crate::chunk;
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::repo::{ChunkIndex, ChunkLocation, Repository};

/// Bytes of zeros written to a device at once.
const ZERO_WRITE: usize = 1 << 20;
/// Packs being read at once, by default (`HOLDFAST_RESTORE_PACKS`): each holds its stored
/// bytes (a pack is about 16 MiB) until it is decoded.
const PACK_CONCURRENCY: usize = 5;
/// Packs being decoded at once, at most: each also holds up to [`DECODED_BUDGET`] decoded
/// and a run of blocks being gathered for a write ([`MAX_RUN_BYTES`]).
const DECODERS: usize = 3;
/// Decoded bytes one pack holds before its blocks are written.
const DECODED_BUDGET: usize = 16 << 20;

/// How many packs a restore reads at once: `HOLDFAST_RESTORE_PACKS` (1 to 64, default 5).
/// More is faster from a store with a long round trip and costs about 16 MiB each; up to 3 of
/// them are decoded at once, with about 28 MiB more each.
pub fn pack_concurrency() -> Result<usize> {
    match std::env::var("HOLDFAST_RESTORE_PACKS") {
        Err(_) => Ok(PACK_CONCURRENCY),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n @ 1..=64) => Ok(n),
            _ => Err(Error::invalid(format!(
                "HOLDFAST_RESTORE_PACKS={v:?}: give a number of packs from 1 to 64 (default \
                 {PACK_CONCURRENCY}); each costs about 16 MiB of memory while it is read"
            ))),
        },
    }
}

/// Whether `to` may be written, as [`restore_cut`] will check it again: said before a
/// caller spends time reading a repository's index (an NBD export is checked when connected).
pub fn check_destination(to: &Path, force: bool) -> Result<()> {
    if is_nbd(to) {
        return Ok(());
    }
    match std::fs::metadata(to) {
        Ok(meta) if meta.is_dir() => Err(Error::invalid(format!(
            "{} is a directory; give the path of the image file to write",
            to.display()
        ))),
        Ok(_) if !force => Err(Error::conflict(format!(
            "{} already exists; pass --force to overwrite it",
            to.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("inspecting {}", to.display()), e)),
    }
}

fn is_nbd(to: &Path) -> bool {
    to.to_str().is_some_and(|t| {
        ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]
            .iter()
            .any(|p| t.starts_with(p))
    })
}

#[derive(Clone, Debug)]
pub struct RestoreReport {
    pub path: PathBuf,
    pub bytes_written: u64,
    pub chunks_verified: u64,
    pub elapsed: Duration,
}

/// Restores `m` to `to`. An existing destination is overwritten only with `force`.
pub async fn restore(
    repo: &Repository,
    m: &Manifest,
    to: &Path,
    force: bool,
    progress: &ProgressBar,
) -> Result<RestoreReport> {
    let (index, _) = repo.load_index().await?;
    restore_cut(repo, m, &index, false, to, force, progress).await
}

/// [`restore`]; with `cut_last`, the last block of `m` (a region that ends inside a block of
/// its volume: see [`crate::region::slice`]) may name a longer chunk, of which it takes the
/// start. `index` is `repo`'s (read by the caller while it read the manifest).
pub async fn restore_cut(
    repo: &Repository,
    m: &Manifest,
    index: &ChunkIndex,
    cut_last: bool,
    to: &Path,
    force: bool,
    progress: &ProgressBar,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let what = format!("{}@{}", m.volume, m.name);
    pack_concurrency()?; // a bad setting is refused before anything is opened
    let nbd = match to.to_str() {
        Some(t) if is_nbd(to) => Some(open_nbd(t, m.size, force).await?),
        _ => None,
    };
    check_destination(to, force)?;
    let is_device = nbd.is_some()
        || match std::fs::metadata(to) {
            Ok(meta) => meta.file_type().is_block_device(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(format!("inspecting {}", to.display()), e)),
        };

    // Which blocks each chunk fills, grouped by pack.
    let mut by_pack: HashMap<PackId, HashMap<ChunkId, (ChunkLocation, Vec<u64>)>> = HashMap::new();
    for (i, id) in m.blocks.data() {
        let loc = index.get(&id).ok_or_else(|| {
            Error::corrupt(format!(
                "snapshot {what} block {i} needs chunk {id}, which is missing from the \
                 repository; run `holdfast verify` to see all damage"
            ))
        })?;
        by_pack
            .entry(loc.pack)
            .or_default()
            .entry(id)
            .or_insert_with(|| (*loc, Vec::new()))
            .1
            .push(i as u64);
    }

    let (out, tmp) = match nbd {
        Some(client) => (Output::Nbd(Box::new(std::sync::Mutex::new(client))), None),
        None => open_destination(to, is_device, m.size)?,
    };
    let file = Arc::new(out);
    progress.set_length(m.size);
    let result = write_all(
        repo, m, &what, by_pack, is_device, cut_last, &file, progress,
    )
    .await;
    if result.is_err() {
        // Workers still decoding other packs write nothing more.
        file.abandon();
    }
    // Whatever goes wrong from here (an error, a panic), no half-written file stays behind.
    let _cleanup = TempFile(tmp.clone());
    let chunks_verified = result?;
    file.sync(to)?;
    if let Some(tmp) = tmp {
        std::fs::rename(&tmp, to)
            .map_err(|e| Error::io(format!("renaming {} into place", tmp.display()), e))?;
        if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(format!("syncing {}", parent.display()), e))?;
        }
    }
    Ok(RestoreReport {
        path: to.to_path_buf(),
        bytes_written: m.size,
        chunks_verified,
        elapsed: started.elapsed(),
    })
}

/// A temporary restore file, removed when dropped unless it was renamed into place.
struct TempFile(Option<std::path::PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            // Gone already once renamed into place.
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Where restored blocks go.
enum Output {
    File(FileOutput),
    Nbd(Box<std::sync::Mutex<crate::volume::nbd::Client>>),
}

/// Bytes whose writeback was started and not yet waited for (see [`FileOutput`]).
const WRITEBACK_WINDOW: u64 = 64 << 20;

/// A file or block device written through the page cache. Writeback of each run starts as
/// soon as it is written (`sync_file_range`), and runs more than [`WRITEBACK_WINDOW`] behind
/// are waited for and dropped from the cache: the disk is kept busy with large, merged
/// writes while the blocks after are decoded, the final sync has little left to do, and a
/// restore of a large volume leaves the machine's own cache alone. (Measured on a 1 GiB
/// image with a third of its blocks zero: 0.70 s against 1.06 s with synchronous direct
/// writes, whose short runs between holes waited on the disk one by one.) On overlayfs (a
/// container's root) `sync_file_range` reaches no disk: writeback is then the kernel's, and
/// the final sync does it all.
struct FileOutput {
    file: File,
    /// Bytes the file or device ends at once restored (the last sync's reach).
    size: u64,
    /// Bytes written so far (for the test hook `restore-window`).
    written: std::sync::atomic::AtomicU64,
    /// Set once the restore has failed: workers still running stop writing.
    abandoned: AtomicBool,
    /// Runs whose writeback was started, oldest first, and their bytes in all.
    started: std::sync::Mutex<(std::collections::VecDeque<(u64, u64)>, u64)>,
    /// Cleared when the file system cannot start writeback of a range: its writes are then
    /// left to the final sync.
    start_writeback: AtomicBool,
}

impl Output {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        match self {
            Output::File(f) => {
                if f.abandoned.load(Ordering::Relaxed) {
                    return Err(std::io::Error::other("the restore was abandoned"));
                }
                f.write_at(data, offset)
            }
            Output::Nbd(c) => c
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_at(offset, data)
                .map_err(|e| std::io::Error::other(e.to_string())),
        }
    }

    /// Makes `len` bytes at `offset` read as zeros, on a device or export that may hold
    /// older data there.
    fn write_zeros(&self, offset: u64, len: u64, zeros: &[u8]) -> Result<()> {
        if let Output::Nbd(c) = self {
            return c
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_zeroes(offset, len);
        }
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], at)
                .map_err(|e| Error::io(format!("writing zeros at offset {at}"), e))?;
            at += n as u64;
        }
        Ok(())
    }

    fn sync(&self, to: &Path) -> Result<()> {
        match self {
            Output::File(f) => {
                f.file
                    .sync_all()
                    .map_err(|e| Error::io(format!("syncing {}", to.display()), e))?;
                // Written and durable: what is still cached of it is not needed here (of a
                // device, only what this restore wrote).
                let _ = rustix::fs::fadvise(
                    &f.file,
                    0,
                    std::num::NonZeroU64::new(f.size),
                    rustix::fs::Advice::DontNeed,
                );
                Ok(())
            }
            Output::Nbd(c) => c.lock().unwrap_or_else(|p| p.into_inner()).flush(),
        }
    }

    /// Stops the workers still writing (a restore that failed).
    fn abandon(&self) {
        if let Output::File(f) = self {
            f.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

/// Connects to the NBD export a restore writes to; it must be writable and hold the snapshot.
async fn open_nbd(uri: &str, size: u64, force: bool) -> Result<crate::volume::nbd::Client> {
    let parsed: crate::volume::nbd::NbdUri = uri.parse()?;
    if !force {
        return Err(Error::conflict(format!(
            "restoring into {uri} overwrites the export; pass --force to do so"
        )));
    }
    let client =
        tokio::task::spawn_blocking(move || crate::volume::nbd::Client::connect(&parsed, &[]))
            .await
            .map_err(|e| Error::internal(format!("NBD connect failed: {e}")))??;
    if client.read_only() {
        return Err(Error::denied(format!(
            "the NBD export at {uri} is read-only"
        )));
    }
    if client.size() > size {
        tracing::warn!(
            "the NBD export at {uri} holds {} bytes, more than the snapshot's {size}: the rest of \
             it keeps what it held",
            client.size()
        );
    }
    if client.size() < size {
        return Err(Error::invalid(format!(
            "the NBD export at {uri} holds {} bytes, the snapshot {size}; make it larger first",
            client.size()
        )));
    }
    Ok(client)
}

impl FileOutput {
    fn new(file: File, size: u64) -> Self {
        FileOutput {
            file,
            size,
            written: Default::default(),
            abandoned: AtomicBool::new(false),
            started: Default::default(),
            start_writeback: AtomicBool::new(true),
        }
    }

    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)?;
        let len = data.len() as u64;
        let before = self.written.fetch_add(len, Ordering::Relaxed);
        if before < PAUSE_AFTER && before + len >= PAUSE_AFTER {
            crate::pause_point("restore-window");
        }
        if data.is_empty() || !self.start_writeback.load(Ordering::Relaxed) {
            return Ok(());
        }
        match sync_file_range(&self.file, offset, len, libc::SYNC_FILE_RANGE_WRITE) {
            Ok(()) => {}
            // No such system call (or a sandbox that refuses it): the final sync does all.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                if !self.start_writeback.swap(false, Ordering::Relaxed) {
                    return Ok(());
                }
                tracing::info!(
                    "sync_file_range is not available ({e}): the restore's writes are flushed \
                     at the end"
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let behind = {
            let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
            let (runs, bytes) = &mut *started;
            runs.push_back((offset, len));
            *bytes += len;
            let mut behind = Vec::new();
            while *bytes > WRITEBACK_WINDOW {
                let Some(run) = runs.pop_front() else { break };
                *bytes -= run.1;
                behind.push(run);
            }
            behind
        };
        for (offset, len) in behind {
            // The wait reports a write-back error of any part of the file, once: the final
            // sync will not see it again. It must end the restore; never retry or ignore it.
            sync_file_range(
                &self.file,
                offset,
                len,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("the disk failed to store blocks written earlier: {e}"),
                )
            })?;
            let _ = rustix::fs::fadvise(
                &self.file,
                offset,
                std::num::NonZeroU64::new(len),
                rustix::fs::Advice::DontNeed,
            );
        }
        Ok(())
    }
}

/// `sync_file_range(2)` on `len` bytes of `file` from `offset`.
fn sync_file_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: a plain system call on a descriptor `file` keeps open for its duration; it
    // touches no memory of this process.
    #[allow(unsafe_code)]
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Bytes written after which a debug build stops at the test hook `restore-window` (see
/// `holdfast::pause_point`): a test looks at the page cache mid-restore.
const PAUSE_AFTER: u64 = 128 << 20;

/// Opens what to write: the device itself, or a temporary file beside the destination.
fn open_destination(to: &Path, is_device: bool, size: u64) -> Result<(Output, Option<PathBuf>)> {
    let (file, tmp) = if is_device {
        let f = OpenOptions::new()
            .write(true)
            .open(to)
            .map_err(|e| Error::io(format!("opening {}", to.display()), e))?;
        (f, None)
    } else {
        let file_name = to
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{} names no file", to.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(".holdfast-restore");
        let tmp = to.with_file_name(tmp_name);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        f.set_len(size)
            .map_err(|e| Error::io(format!("sizing {}", tmp.display()), e))?;
        (f, Some(tmp))
    };
    Ok((Output::File(FileOutput::new(file, size)), tmp))
}

/// Longest run of adjacent blocks written with one call.
const MAX_RUN_BYTES: usize = 8 << 20;

/// What one pack's worker decodes into and writes from, reused pack after pack.
struct Scratch {
    /// Decoded chunks, back to back (up to about [`DECODED_BUDGET`]). Adjacent blocks whose
    /// chunks lie side by side here (most of them: a pack holds a volume's new blocks in
    /// order) are written straight from it.
    plains: Vec<u8>,
    /// A run of adjacent blocks whose chunks do not lie side by side, gathered for one write.
    run: Vec<u8>,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            plains: Vec::with_capacity(DECODED_BUDGET + crate::volume::MAX_BLOCK_SIZE as usize),
            run: Vec::with_capacity(MAX_RUN_BYTES),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_all(
    repo: &Repository,
    m: &Manifest,
    what: &str,
    by_pack: HashMap<PackId, HashMap<ChunkId, (ChunkLocation, Vec<u64>)>>,
    is_device: bool,
    cut_last: bool,
    file: &Arc<Output>,
    progress: &ProgressBar,
) -> Result<u64> {
    let last = m.blocks.len().saturating_sub(1) as u64;
    let bs = m.block_size as u64;
    // Zero blocks: a file is already all holes there (it was sized, not written); a device
    // gets zeros written, a run at a time.
    let zeros = vec![0u8; (ZERO_WRITE as u64).max(bs) as usize];
    for run in m.blocks.zero_runs() {
        let (start, end) = (run.start as u64 * bs, (run.end as u64 * bs).min(m.size));
        if is_device {
            file.write_zeros(start, end - start, &zeros)?;
        }
        progress.inc(end - start);
    }

    let (size, block_size) = (m.size, m.block_size);
    let concurrency = pack_concurrency()?;
    // Buffers a pack's worker decodes and writes through, handed on to the next pack's: fresh
    // ones for each pack would be fresh pages, faulted in and zeroed by the kernel each time
    // (measured: a third of a restore's system time).
    let pool: Arc<std::sync::Mutex<Vec<Scratch>>> = Arc::default();
    // Reading a pack waits on the store; decoding it on the cores: more packs are read at once
    // than are decoded, so the store is kept busy while the decoders are.
    let decoders = Arc::new(tokio::sync::Semaphore::new(DECODERS.min(concurrency)));
    let counts: Vec<u64> = futures::stream::iter(by_pack)
        .map(|(pack, chunks)| {
            let file = file.clone();
            let progress = progress.clone();
            let what = what.to_string();
            let pool = pool.clone();
            let decoders = decoders.clone();
            async move {
                let mut chunks: Vec<(ChunkId, (ChunkLocation, Vec<u64>))> =
                    chunks.into_iter().collect();
                chunks.sort_by_key(|(_, (loc, _))| loc.offset);
                let ranges: Vec<_> = chunks
                    .iter()
                    .map(|(_, (l, _))| l.offset..l.offset + l.length as u64)
                    .collect();
                let blobs = repo.read_pack_ranges(&pack, &ranges).await?;
                let permit = decoders
                    .acquire_owned()
                    .await
                    .map_err(|e| Error::internal(format!("restore decoders: {e}")))?;
                tokio::task::spawn_blocking(move || -> Result<u64> {
                    let _permit = permit;
                    let taken = pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    let Scratch {
                        mut plains,
                        mut run,
                    } = taken.unwrap_or_else(Scratch::new);
                    // Decode and verify the chunks of this pack in pack order (each appended
                    // to `plains`, its span kept), and write their blocks in offset order,
                    // adjacent ones together, whenever the decoded chunks held reach
                    // DECODED_BUDGET (and at the end): what a pack decodes to is bounded by
                    // the budget, not by how well its chunks compressed.
                    let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
                    let mut writes: Vec<(u64, usize)> = Vec::new();
                    // Writes the run of blocks from `first`: where it lies in `plains`
                    // (`direct`), or gathered in `run`.
                    let flush = |plains: &[u8],
                                 run: &mut Vec<u8>,
                                 first: Option<u64>,
                                 direct: Option<std::ops::Range<usize>>|
                     -> Result<()> {
                        if let Some(b) = first {
                            let data = match direct {
                                Some(d) => &plains[d],
                                None => &run[..],
                            };
                            file.write_at(data, b * bs)
                                .map_err(|e| Error::io(format!("writing block {b}"), e))?;
                            progress.inc(data.len() as u64);
                        }
                        run.clear();
                        Ok(())
                    };
                    let write_group = |writes: &mut Vec<(u64, usize)>,
                                       spans: &mut Vec<std::ops::Range<usize>>,
                                       plains: &mut Vec<u8>,
                                       run: &mut Vec<u8>|
                     -> Result<()> {
                        writes.sort_unstable();
                        let mut first: Option<u64> = None;
                        let mut direct: Option<std::ops::Range<usize>> = None;
                        let (mut next_block, mut run_len) = (0u64, 0usize);
                        for &(b, p) in writes.iter() {
                            let at = spans[p].start;
                            let data = at..at + super::block_len(size, block_size, b);
                            let adjacent = first.is_some() && b == next_block;
                            if !adjacent || run_len + data.len() > MAX_RUN_BYTES {
                                flush(plains, run, first, direct.take())?;
                                (first, run_len) = (Some(b), 0);
                                direct = Some(data.start..data.start);
                            }
                            match direct.as_mut() {
                                Some(d) if d.end == data.start => d.end = data.end,
                                _ => {
                                    // Not side by side (a chunk that fills several blocks, or
                                    // chunks out of order): gathered in `run` from here on.
                                    if let Some(d) = direct.take() {
                                        run.extend_from_slice(&plains[d]);
                                    }
                                    run.extend_from_slice(&plains[data.clone()]);
                                }
                            }
                            run_len += data.len();
                            next_block = b + 1;
                        }
                        flush(plains, run, first, direct)?;
                        writes.clear();
                        spans.clear();
                        plains.clear();
                        Ok(())
                    };
                    for ((id, (loc, blocks)), blob) in chunks.iter().zip(blobs) {
                        let at = plains.len();
                        chunk::decode_into(
                            id,
                            loc.encoding,
                            &blob,
                            loc.raw_length as usize,
                            &mut plains,
                        )
                        .map_err(|e| {
                            Error::corrupt(format!(
                                "snapshot {what} block {}: {e}; the restore was abandoned and \
                                 nothing was left at the destination",
                                blocks[0]
                            ))
                        })?;
                        let plain_len = plains.len() - at;
                        for &b in blocks {
                            let len = super::block_len(size, block_size, b);
                            let cut = cut_last && b == last && plain_len > len;
                            if len != plain_len && !cut {
                                return Err(Error::corrupt(format!(
                                    "snapshot {what} block {b} is {len} bytes but its chunk \
                                     has {plain_len}"
                                )));
                            }
                            writes.push((b, spans.len()));
                        }
                        spans.push(at..plains.len());
                        if plains.len() >= DECODED_BUDGET {
                            write_group(&mut writes, &mut spans, &mut plains, &mut run)?;
                        }
                    }
                    write_group(&mut writes, &mut spans, &mut plains, &mut run)?;
                    pool.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Scratch { plains, run });
                    Ok(chunks.len() as u64)
                })
                .await
                .map_err(|e| Error::internal(format!("restore worker failed: {e}")))?
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    Ok(counts.iter().sum())
}
