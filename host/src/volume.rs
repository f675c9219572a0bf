//! Volumes: reading raw image files and block devices.
//!
//! Images are read with `pread` into a fixed pool of buffers (memory does not grow with the
//! image), holes of sparse files are found with `SEEK_DATA`/`SEEK_HOLE` and never read, and
//! what was read is dropped from the page cache behind the reader.
//!
//! An image may change size between snapshots (volumes grow); each snapshot records the
//! size it saw. It must not change size *while* a snapshot reads it: that is reported as an
//! error and nothing is committed. holdfast reads the image as it is; for a consistent image
//! of a live device, snapshot it underneath first (LVM, a paused VM, a frozen filesystem).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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
