//! Volumes: reading raw image files and block devices.
//!
//! An image may change size between snapshots (volumes grow); each snapshot records the
//! size it saw. It must not change size *while* a snapshot reads it: that is reported as an
//! error and nothing is committed. holdfast reads the image as it is; for a consistent image
//! of a live device, snapshot it underneath first (LVM, a paused VM, a frozen filesystem).

use std::fs::File;
use std::io::{Seek, SeekFrom};
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
        Ok(FileVolume {
            path: path.to_path_buf(),
            file,
            size,
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

    /// Maps a regular image file into memory, so reading it copies nothing (the pages of the
    /// page cache are hashed and compressed in place). `None` for block devices, empty
    /// images, or where mapping fails; callers then use [`FileVolume::read_at`].
    pub fn map(&self) -> Option<memmap2::Mmap> {
        let meta = self.file.metadata().ok()?;
        if !meta.file_type().is_file() || self.size == 0 {
            return None;
        }
        // SAFETY: the mapping is read-only and private. Another process may still write the
        // image while it is mapped; that gives torn data exactly as read(2) would, which is
        // why a consistent snapshot needs a quiet image (module docs). A process that
        // *truncates* the image meanwhile makes this process fault (SIGBUS) on the lost
        // pages: it dies before committing anything, which the crash-safety of
        // `snapshot::create` covers. ripgrep maps files for the same reason (no copy).
        #[allow(unsafe_code)]
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(self.size as usize)
                .map(&self.file)
        };
        map.ok()
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
