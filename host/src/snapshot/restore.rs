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
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
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
use crate::repo::{ChunkLocation, Repository};

/// Bytes of zeros written to a device at once.
const ZERO_WRITE: usize = 1 << 20;
/// Packs being read and decoded at once, by default (`HOLDFAST_RESTORE_PACKS`): each holds
/// its stored bytes (a pack is about 16 MiB) and at most [`DECODED_BUDGET`] decoded.
const PACK_CONCURRENCY: usize = 3;
/// Decoded bytes one pack holds before its blocks are written.
const DECODED_BUDGET: usize = 32 << 20;

/// How many packs a restore reads and decodes at once: `HOLDFAST_RESTORE_PACKS` (1 to 64,
/// default 3). More is faster from a store with a long round trip and costs about 56 MiB each.
pub fn pack_concurrency() -> Result<usize> {
    match std::env::var("HOLDFAST_RESTORE_PACKS") {
        Err(_) => Ok(PACK_CONCURRENCY),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n @ 1..=64) => Ok(n),
            _ => Err(Error::invalid(format!(
                "HOLDFAST_RESTORE_PACKS={v:?}: give a number of packs from 1 to 64 (default \
                 {PACK_CONCURRENCY}); each costs about 56 MiB of memory"
            ))),
        },
    }
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
    restore_cut(repo, m, false, to, force, progress).await
}

/// [`restore`]; with `cut_last`, the last block of `m` (a region that ends inside a block of
/// its volume: see [`crate::region::slice`]) may name a longer chunk, of which it takes the
/// start.
pub async fn restore_cut(
    repo: &Repository,
    m: &Manifest,
    cut_last: bool,
    to: &Path,
    force: bool,
    progress: &ProgressBar,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let what = format!("{}@{}", m.volume, m.name);
    pack_concurrency()?; // a bad setting is refused before anything is opened
    let nbd = match to.to_str() {
        Some(t)
            if ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]
                .iter()
                .any(|p| t.starts_with(p)) =>
        {
            Some(open_nbd(t, m.size, force).await?)
        }
        _ => None,
    };
    let is_device = nbd.is_some()
        || match std::fs::metadata(to) {
            Ok(meta) => {
                if meta.is_dir() {
                    return Err(Error::invalid(format!(
                        "{} is a directory; give the path of the image file to write",
                        to.display()
                    )));
                }
                if !force {
                    return Err(Error::conflict(format!(
                        "{} already exists; pass --force to overwrite it",
                        to.display()
                    )));
                }
                meta.file_type().is_block_device()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(format!("inspecting {}", to.display()), e)),
        };

    let (index, _) = repo.load_index().await?;
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

/// Where restored blocks go. Runs of whole, aligned blocks are written with direct I/O (no
/// copy through the page cache, and nothing left to flush at the end); the rest (a short
/// last block, or a filesystem without direct I/O) through an ordinary handle.
enum Output {
    File(FileOutput),
    Nbd(Box<std::sync::Mutex<crate::volume::nbd::Client>>),
}

struct FileOutput {
    direct: Option<File>,
    buffered: File,
    /// Set when the filesystem refuses a direct write; everything then goes buffered.
    no_direct: AtomicBool,
}

impl Output {
    fn write_at(&self, data: &[u8], offset: u64, aligned: bool) -> std::io::Result<()> {
        match self {
            Output::File(f) => f.write_at(data, offset, aligned),
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
            self.write_at(&zeros[..n], at, false)
                .map_err(|e| Error::io(format!("writing zeros at offset {at}"), e))?;
            at += n as u64;
        }
        Ok(())
    }

    fn sync(&self, to: &Path) -> Result<()> {
        match self {
            Output::File(f) => f
                .buffered
                .sync_all()
                .map_err(|e| Error::io(format!("syncing {}", to.display()), e)),
            Output::Nbd(c) => c.lock().unwrap_or_else(|p| p.into_inner()).flush(),
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
    fn write_at(&self, data: &[u8], offset: u64, aligned: bool) -> std::io::Result<()> {
        if let Some(d) = self
            .direct
            .as_ref()
            .filter(|_| aligned && !self.no_direct.load(Ordering::Relaxed))
        {
            match d.write_all_at(data, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.no_direct.store(true, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        self.buffered.write_all_at(data, offset)
    }
}

/// Opens what to write: the device itself, or a temporary file beside the destination.
fn open_destination(to: &Path, is_device: bool, size: u64) -> Result<(Output, Option<PathBuf>)> {
    let (buffered, tmp) = if is_device {
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
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(tmp.as_deref().unwrap_or(to))
        .ok();
    Ok((
        Output::File(FileOutput {
            direct,
            buffered,
            no_direct: AtomicBool::new(false),
        }),
        tmp,
    ))
}

/// Direct I/O needs 4 KiB-aligned memory, offsets and lengths.
const ALIGN: usize = 4096;
/// Longest run of adjacent blocks written with one call.
const MAX_RUN_BYTES: usize = 8 << 20;

/// A reusable buffer whose contents start on a 4 KiB boundary.
struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new() -> Self {
        let buf: Vec<u8> = Vec::with_capacity(MAX_RUN_BYTES + ALIGN);
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        let mut b = AlignedBuf { buf, start };
        b.clear();
        b
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.buf.resize(self.start, 0);
    }

    fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The contents, and whether they are still aligned (the Vec never grew past its
    /// capacity, so it never moved).
    fn contents(&self) -> (&[u8], bool) {
        let data = &self.buf[self.start..];
        (data, (data.as_ptr() as usize).is_multiple_of(ALIGN))
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
    let counts: Vec<u64> = futures::stream::iter(by_pack)
        .map(|(pack, chunks)| {
            let file = file.clone();
            let progress = progress.clone();
            let what = what.to_string();
            async move {
                let mut chunks: Vec<(ChunkId, (ChunkLocation, Vec<u64>))> =
                    chunks.into_iter().collect();
                chunks.sort_by_key(|(_, (loc, _))| loc.offset);
                let ranges: Vec<_> = chunks
                    .iter()
                    .map(|(_, (l, _))| l.offset..l.offset + l.length as u64)
                    .collect();
                let blobs = repo.read_pack_ranges(&pack, &ranges).await?;
                tokio::task::spawn_blocking(move || -> Result<u64> {
                    // Decode and verify the chunks of this pack in pack order, and write their
                    // blocks in offset order, adjacent ones together, whenever the decoded
                    // chunks held reach DECODED_BUDGET (and at the end): what a pack decodes
                    // to is bounded by the budget, not by how well its chunks compressed.
                    let mut plains: Vec<Vec<u8>> = Vec::new();
                    let mut held = 0usize;
                    let mut writes: Vec<(u64, usize)> = Vec::new();
                    let mut run = AlignedBuf::new();
                    let flush = |run: &mut AlignedBuf, start: Option<u64>| -> Result<()> {
                        if let Some(b) = start {
                            let (data, aligned) = run.contents();
                            let aligned = aligned && data.len().is_multiple_of(ALIGN);
                            file.write_at(data, b * bs, aligned)
                                .map_err(|e| Error::io(format!("writing block {b}"), e))?;
                            progress.inc(data.len() as u64);
                        }
                        run.clear();
                        Ok(())
                    };
                    let mut write_group =
                        |writes: &mut Vec<(u64, usize)>, plains: &mut Vec<Vec<u8>>| -> Result<()> {
                            writes.sort_unstable();
                            let mut run_start: Option<u64> = None;
                            let mut next_block = 0u64;
                            for &(b, p) in writes.iter() {
                                let data = &plains[p][..super::block_len(size, block_size, b)];
                                let adjacent = run_start.is_some() && b == next_block;
                                if !adjacent || run.len() + data.len() > MAX_RUN_BYTES {
                                    flush(&mut run, run_start)?;
                                    run_start = Some(b);
                                }
                                run.extend(data);
                                next_block = b + 1;
                            }
                            flush(&mut run, run_start)?;
                            writes.clear();
                            plains.clear();
                            Ok(())
                        };
                    for ((id, (loc, blocks)), blob) in chunks.iter().zip(blobs) {
                        let plain = chunk::decode(id, loc.encoding, &blob, loc.raw_length as usize)
                            .map_err(|e| {
                                Error::corrupt(format!(
                                    "snapshot {what} block {}: {e}; the restore was \
                                         abandoned and nothing was left at the destination",
                                    blocks[0]
                                ))
                            })?;
                        for &b in blocks {
                            let len = super::block_len(size, block_size, b);
                            let cut = cut_last && b == last && plain.len() > len;
                            if len != plain.len() && !cut {
                                return Err(Error::corrupt(format!(
                                    "snapshot {what} block {b} is {len} bytes but its chunk \
                                     has {}",
                                    plain.len()
                                )));
                            }
                            writes.push((b, plains.len()));
                        }
                        held += plain.len();
                        plains.push(plain);
                        if held >= DECODED_BUDGET {
                            write_group(&mut writes, &mut plains)?;
                            held = 0;
                        }
                    }
                    write_group(&mut writes, &mut plains)?;
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
