//! Volumes: the sources a snapshot reads. Raw image files and block devices are read here;
//! NBD exports through [`nbd`], qcow2 images through [`qemu`], running QEMU disks through
//! [`qmp`].
//!
//! Images are read a block at a time with `pread` by the workers that hash them (memory does
//! not grow with the image), holes of sparse files are found with `SEEK_DATA`/`SEEK_HOLE` and
//! never read, and what was read is dropped from the page cache behind the reader.
//!
//! An image may change size between snapshots (volumes grow); each snapshot records the
//! size it saw. It must not change size *while* a snapshot reads it: that is reported as an
//! error and nothing is committed. holdfast reads an image as it is; for a consistent image
//! of a live device, snapshot it underneath first (LVM, a paused VM, a frozen filesystem: the
//! hooks of `snapshot create`), or read a running QEMU's disk through [`qmp`].

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub mod nbd;
pub mod qemu;
pub mod qmp;

use nbd::{Client, Extent, NbdUri};

/// Smallest and largest accepted block sizes.
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
pub const MAX_BLOCK_SIZE: u32 = 4 << 20;
/// The default block size, 64 KiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;

/// Checks a block size: a power of two between 4 KiB and 4 MiB.
pub fn validate_block_size(bs: u64) -> Result<u32> {
    if !(MIN_BLOCK_SIZE as u64..=MAX_BLOCK_SIZE as u64).contains(&bs) || !bs.is_power_of_two() {
        return Err(Error::invalid(format!(
            "invalid block size {bs}: use a power of two from 4KiB to 4MiB (default 64KiB)"
        )));
    }
    Ok(bs as u32)
}

/// An open image file or block device.
#[derive(Debug)]
pub struct FileVolume {
    path: PathBuf,
    file: File,
    size: u64,
    /// A regular file (which may have holes), not a block device.
    is_file: bool,
}

impl FileVolume {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::not_found(format!(
                    "volume image {} does not exist; check the path given to `volume add`",
                    path.display()
                ))
            } else {
                Error::io(format!("opening volume image {}", path.display()), e)
            }
        })?;
        let size = current_size(&file, path)?;
        let is_file = file.metadata().is_ok_and(|m| m.file_type().is_file());
        Ok(FileVolume {
            path: path.to_path_buf(),
            file,
            size,
            is_file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` from `offset` (short only at the end of the image).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!(
                            "reading volume image {} at offset {}",
                            self.path.display(),
                            offset + done as u64
                        ),
                        e,
                    ));
                }
            }
        }
        Ok(done)
    }

    /// The parts of `range` that hold data, as the filesystem reports them (`SEEK_DATA` and
    /// `SEEK_HOLE`): the rest is holes, which read as zeros and need not be read at all. For
    /// a block device, or a filesystem that cannot tell, the whole range is data.
    pub fn data_ranges(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        use rustix::fs::SeekFrom;
        if !self.is_file || range.is_empty() {
            return Ok(vec![range]);
        }
        let mut out = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let Some(data) = self.next_data(at)? else {
                break;
            };
            if data >= range.end {
                break;
            }
            let hole = rustix::fs::seek(&self.file, SeekFrom::Hole(data)).unwrap_or(range.end);
            out.push(data..hole.min(range.end));
            at = hole.max(data + 1);
        }
        Ok(out)
    }

    /// Where the first data at or after `at` starts (`SEEK_DATA`); `None` when only holes
    /// follow (or the file shrank: the size check at the end of a snapshot says so). For a
    /// block device, or a filesystem that cannot tell, that is `at` itself.
    pub fn next_data(&self, at: u64) -> Result<Option<u64>> {
        use rustix::fs::SeekFrom;
        use rustix::io::Errno;
        if !self.is_file {
            return Ok(Some(at));
        }
        match rustix::fs::seek(&self.file, SeekFrom::Data(at)) {
            Ok(d) => Ok(Some(d)),
            Err(Errno::NXIO) => Ok(None),
            Err(Errno::INVAL | Errno::NOTSUP) => Ok(Some(at)),
            Err(e) => Err(Error::io(
                format!("finding the data of {} after {at}", self.path.display()),
                e.into(),
            )),
        }
    }

    /// Tells the kernel that `range` was read and will not be needed again, so that a
    /// snapshot of a large image does not evict the rest of the machine's page cache.
    pub fn done_with(&self, range: Range<u64>) {
        if let Some(len) = std::num::NonZeroU64::new(range.end - range.start) {
            let _ = rustix::fs::fadvise(
                &self.file,
                range.start,
                Some(len),
                rustix::fs::Advice::DontNeed,
            );
        }
    }

    /// Fails if the image's size changed since it was opened.
    pub fn check_size_unchanged(&self) -> Result<()> {
        let now = current_size(&self.file, &self.path)?;
        if now != self.size {
            return Err(Error::conflict(format!(
                "volume image {} changed size while it was read ({} -> {} bytes); nothing was \
                 committed; take the snapshot again when the image is quiet",
                self.path.display(),
                self.size,
                now
            )));
        }
        Ok(())
    }
}

fn current_size(file: &File, path: &Path) -> Result<u64> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?;
    let ft = meta.file_type();
    if ft.is_file() {
        Ok(meta.len())
    } else if ft.is_block_device() {
        let mut f = file;
        f.seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("measuring block device {}", path.display()), e))
    } else {
        Err(Error::invalid(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        )))
    }
}

/// Makes an image path given by the user absolute, checking it can be opened. Symbolic links
/// are kept as given, never resolved: `/dev/vg0/lv` must not become `/dev/dm-3`, which names
/// another device after a reboot or when an LVM snapshot is made again; each read resolves
/// the link anew.
pub fn check_image(path: &Path) -> Result<PathBuf> {
    FileVolume::open(path)?;
    std::path::absolute(path).map_err(|e| Error::io(format!("resolving {}", path.display()), e))
}

/// Where a volume's data comes from, as registered with `volume add`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SourceSpec {
    /// An NBD export that someone else serves (`--nbd URI`).
    Nbd { uri: String },
    /// A QEMU disk image that holdfast serves to itself through `qemu-nbd` (`--qcow2 PATH`),
    /// with changed-block tracking through the image's persistent dirty bitmaps.
    Qcow2 { path: PathBuf },
    /// The disk (block node `node`) of a running QEMU or qemu-storage-daemon, reached through
    /// its QMP monitor (`--qmp SOCKET --node NODE`): point-in-time snapshots while it runs.
    Qmp {
        monitor: PathBuf,
        node: String,
        /// The NBD server that QEMU already runs, if any (`--nbd-server URI`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nbd_server: Option<String>,
    },
}

/// An open source of a snapshot: an image file or block device read directly, or an NBD
/// export (possibly served by a `qemu-nbd` that holdfast started).
#[derive(Debug)]
pub enum Source {
    File(FileVolume),
    Nbd(Box<NbdVolume>),
}

impl Source {
    pub fn size(&self) -> u64 {
        match self {
            Source::File(f) => f.size(),
            Source::Nbd(n) => n.size,
        }
    }

    /// For messages: "volume image PATH" or "NBD export URI".
    pub fn describe(&self) -> String {
        match self {
            Source::File(f) => format!("volume image {}", f.path().display()),
            Source::Nbd(n) => n.describe.clone(),
        }
    }

    /// Where the first data at or after `at` starts; `None` when only zeros follow.
    pub fn next_data(&self, at: u64) -> Result<Option<u64>> {
        match self {
            Source::File(f) => f.next_data(at),
            Source::Nbd(n) => n.next_data(at),
        }
    }

    /// The parts of `range` that may hold data (the rest reads as zeros).
    pub fn data_ranges(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        match self {
            Source::File(f) => f.data_ranges(range),
            Source::Nbd(n) => n.data_ranges(range),
        }
    }

    /// The parts of `range` that may hold data, asking the source again (after a read, to see
    /// holes filled meanwhile).
    pub fn data_ranges_now(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        match self {
            Source::File(f) => f.data_ranges(range),
            Source::Nbd(n) => n.data_ranges_now(range),
        }
    }

    pub fn done_with(&self, range: Range<u64>) {
        if let Source::File(f) = self {
            f.done_with(range)
        }
    }

    pub fn check_size_unchanged(&self) -> Result<()> {
        match self {
            Source::File(f) => f.check_size_unchanged(),
            Source::Nbd(_) => Ok(()),
        }
    }

    /// Fills `buf` from `offset`, which with `buf` lies inside the source.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::File(f) => {
                let n = f.read_at(offset, buf)?;
                // A file that shrank under the read reads as zeros past its end, as its
                // snapshot will tell.
                buf[n..].fill(0);
                Ok(())
            }
            Source::Nbd(n) => {
                let len = buf.len() as u64;
                let range = offset..offset + len;
                n.read_ranges(offset, buf, std::slice::from_ref(&range))
            }
        }
    }
}

/// A [`Source`] as a `Read + Seek` stream, for parsers that take one (partition tables).
pub struct SourceReader<'a> {
    source: &'a Source,
    at: u64,
}

impl<'a> SourceReader<'a> {
    pub fn new(source: &'a Source) -> Self {
        SourceReader { source, at: 0 }
    }
}

impl std::io::Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.source.size().saturating_sub(self.at);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.source
            .read_exact_at(self.at, &mut buf[..n])
            .map_err(std::io::Error::other)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for SourceReader<'_> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let size = self.source.size() as i128;
        let to = match pos {
            std::io::SeekFrom::Start(n) => n as i128,
            std::io::SeekFrom::End(d) => size + d as i128,
            std::io::SeekFrom::Current(d) => self.at as i128 + d as i128,
        };
        if to < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start",
            ));
        }
        self.at = to as u64;
        Ok(self.at)
    }
}

/// An NBD export being read for a snapshot.
///
/// The reads and the allocation map go over one connection that negotiated only
/// `base:allocation`; a dirty bitmap is read once, at connection time, over a second one that
/// negotiated only the bitmap. (A block-status request answers for every context the connection
/// negotiated: with both on one connection, each allocation query would make the server walk the
/// bitmap too.)
pub struct NbdVolume {
    client: std::sync::Mutex<Client>,
    size: u64,
    describe: String,
    /// The `base:allocation` context, if the server offers it.
    allocation: Option<u32>,
    /// The allocation extents fetched last: a window of the export, asked for in large pieces
    /// so that a long run of holes or data costs one request.
    map: std::sync::Mutex<Vec<Extent>>,
    /// What the dirty bitmap marked, when reading changed blocks only.
    dirty: Option<Vec<Range<u64>>>,
    /// What keeps the export alive (the `qemu-nbd` serving a `--qcow2` image, the fleece in
    /// a running QEMU): dropped after the connection, which it outlives.
    _kept: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for NbdVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

/// The meta context that tells holes and zeros.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// How much of the allocation map one block-status request asks for.
const MAP_WINDOW: u64 = 1 << 30;

impl NbdVolume {
    /// Connects to an export. `bitmap` names a dirty bitmap whose changed blocks are wanted
    /// (`qemu:dirty-bitmap:NAME`); `base:allocation` is asked for when the server has it.
    pub fn connect(uri: &NbdUri, bitmap: Option<&str>) -> Result<NbdVolume> {
        let main = match Client::connect(uri, &[BASE_ALLOCATION]) {
            // A server without base:allocation still serves reads (every block is data).
            Err(Error::NotFound(m)) if m.contains(BASE_ALLOCATION) => Client::connect(uri, &[])?,
            r => r?,
        };
        Self::open(uri, main, bitmap, None, format!("NBD export {uri}"))
    }

    /// Serves a QEMU image with `qemu-nbd` and connects to it.
    pub fn serve(image: &Path, format: &str, bitmap: Option<&str>) -> Result<NbdVolume> {
        let mut served = qemu::Served::start(image, format, bitmap)?;
        let uri = served.uri().clone();
        // The first connection waits until qemu-nbd listens; it stays open for the reads
        // (qemu-nbd leaves when its last client does).
        let main = served.connect(&[BASE_ALLOCATION])?;
        Self::open(
            &uri,
            main,
            bitmap,
            Some(Box::new(served)),
            format!("{format} image {}", image.display()),
        )
    }

    /// Connects to an export that `kept` keeps alive (it is dropped after the connection).
    pub fn connect_kept(
        uri: &NbdUri,
        bitmap: Option<&str>,
        kept: Box<dyn std::any::Any + Send + Sync>,
        describe: String,
    ) -> Result<NbdVolume> {
        let main = Client::connect(uri, &[BASE_ALLOCATION])?;
        Self::open(uri, main, bitmap, Some(kept), describe)
    }

    /// Completes a volume around its main connection: reads the dirty bitmap, if one is
    /// wanted, over a second connection.
    fn open(
        uri: &NbdUri,
        client: Client,
        bitmap: Option<&str>,
        kept: Option<Box<dyn std::any::Any + Send + Sync>>,
        describe: String,
    ) -> Result<NbdVolume> {
        let dirty = match bitmap {
            None => None,
            Some(b) => {
                let ctx = format!("qemu:dirty-bitmap:{b}");
                let mut c = Client::connect(uri, &[&ctx])?;
                let id = c.context_id(&ctx).expect("negotiated");
                let size = c.size();
                Some(merge(
                    extents(&mut c, id, 0..size)?
                        .into_iter()
                        .filter(|e| e.flags & nbd::STATE_DIRTY != 0)
                        .map(|e| e.range()),
                ))
            }
        };
        Ok(NbdVolume {
            size: client.size(),
            allocation: client.context_id(BASE_ALLOCATION),
            map: std::sync::Mutex::new(Vec::new()),
            dirty,
            client: std::sync::Mutex::new(client),
            describe,
            _kept: kept,
        })
    }

    fn client(&self) -> std::sync::MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The allocation extent that holds `at` (< size).
    fn extent_at(&self, ctx: u32, at: u64) -> Result<Extent> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let found = |map: &[Extent]| {
            let i = map.partition_point(|e| e.offset + e.len <= at);
            map.get(i).filter(|e| e.offset <= at).copied()
        };
        if let Some(e) = found(&map) {
            return Ok(e);
        }
        let to = self.size.min(at.saturating_add(MAP_WINDOW));
        let mut status = self.client().block_status(at..to)?;
        *map = status.remove(&ctx).unwrap_or_default();
        found(&map).ok_or_else(|| Error::internal("block status did not cover its start"))
    }

    fn next_data(&self, at: u64) -> Result<Option<u64>> {
        let Some(ctx) = self.allocation else {
            return Ok((at < self.size).then_some(at));
        };
        let mut pos = at;
        while pos < self.size {
            let e = self.extent_at(ctx, pos)?;
            if e.flags & nbd::STATE_ZERO == 0 {
                return Ok(Some(pos));
            }
            pos = e.offset + e.len;
        }
        Ok(None)
    }

    fn data_ranges(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let Some(ctx) = self.allocation else {
            return Ok(vec![range]);
        };
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut pos = range.start;
        while pos < range.end {
            let e = self.extent_at(ctx, pos)?;
            let end = (e.offset + e.len).min(range.end);
            add_data(&mut out, &e, pos..end);
            pos = end;
        }
        Ok(out)
    }

    /// The parts of `range` that may hold data, asking the server about `range` alone (after a
    /// read, to see holes filled meanwhile). The map of the rest is kept: asking again for the
    /// whole window each time measured 232,000 `lseek`s in qemu-nbd (3.3 s of its CPU) for
    /// one snapshot of a 2 GiB sparse image, where once per window is a few thousand.
    fn data_ranges_now(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let Some(ctx) = self.allocation else {
            return Ok(vec![range]);
        };
        let mut out: Vec<Range<u64>> = Vec::new();
        for e in extents(&mut self.client(), ctx, range.clone())? {
            let part = e.offset.max(range.start)..(e.offset + e.len).min(range.end);
            if part.start < part.end {
                add_data(&mut out, &e, part);
            }
        }
        Ok(out)
    }

    /// The parts of the export the dirty bitmap marks as written since it was started.
    pub fn dirty_ranges(&self) -> Result<Vec<Range<u64>>> {
        self.dirty
            .clone()
            .ok_or_else(|| Error::internal("no dirty bitmap on this export"))
    }

    /// Reads `ranges` (inside `base .. base + buf.len()`) into `buf`.
    pub fn read_ranges(&self, base: u64, buf: &mut [u8], ranges: &[Range<u64>]) -> Result<()> {
        self.client().read_ranges(base, buf, ranges)
    }

    /// Reads `ranges` one after the other into `buf`, many requests in flight.
    pub fn read_gather(&self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<()> {
        self.client().read_gather(ranges, buf)
    }
}

/// Adds `part` of extent `e` to the data ranges `out` (in order) if `e` may hold data. Holes
/// shorter than the smallest block are read as data: a server that describes its export a
/// byte at a time costs no more than one that describes it by blocks.
fn add_data(out: &mut Vec<Range<u64>>, e: &Extent, part: Range<u64>) {
    if e.flags & nbd::STATE_ZERO == 0 {
        match out.last_mut() {
            Some(last) if last.end + MIN_BLOCK_SIZE as u64 > part.start => last.end = part.end,
            _ => out.push(part),
        }
    }
}

/// The extents of `ctx` over `range`, asking as often as the server needs.
fn extents(c: &mut Client, ctx: u32, range: Range<u64>) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let mut status = c.block_status(at..range.end)?;
        let ext = status.remove(&ctx).unwrap_or_default();
        let Some(last) = ext.last() else {
            return Err(Error::internal("block status without extents"));
        };
        at = last.offset + last.len;
        out.extend(ext);
    }
    Ok(out)
}

/// Joins touching or overlapping ranges (given in order of their starts).
pub(crate) fn merge(ranges: impl Iterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Opens a volume's source for reading. For a `--qcow2` image, `bitmap` names the dirty
/// bitmap to export as well.
pub fn open_source(
    image: &Path,
    spec: Option<&SourceSpec>,
    bitmap: Option<&str>,
) -> Result<Source> {
    match spec {
        None => Ok(Source::File(FileVolume::open(image)?)),
        Some(SourceSpec::Nbd { uri }) => Ok(Source::Nbd(Box::new(NbdVolume::connect(
            &uri.parse()?,
            bitmap,
        )?))),
        Some(SourceSpec::Qcow2 { path }) => Ok(Source::Nbd(Box::new(NbdVolume::serve(
            path, "qcow2", bitmap,
        )?))),
        Some(SourceSpec::Qmp { .. }) => Err(Error::internal(
            "a running QEMU's disk is opened with its fleece (snapshot::create)",
        )),
    }
}
