//! Writing pack objects into a local repository with direct I/O.
//!
//! A buffered write copies every byte into the page cache, and on this kind of machine that
//! copy costs as much CPU as compressing the data. Packs are written once and read rarely, so
//! they bypass the cache (`O_DIRECT`): the aligned bulk goes straight from our buffer to the
//! disk, the short unaligned tail is appended normally. The result is the same durable,
//! create-only object `LocalFileSystem` would write: a staging file (`name#digits`, which gc
//! clears after a crash), fsynced, then hard-linked to its final name (an existing object of
//! that name, with the same content-derived name, wins), and the directory fsynced.
//! Filesystems without direct I/O (tmpfs) get a buffered write.

use std::io::{self, Write};

use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};

const ALIGN: usize = 4096;

/// Writes `bytes` as `rel` (a `/`-separated key made of validated ids) under `root`.
pub fn write_durable(root: &Dir, rel: &str, bytes: &[u8]) -> io::Result<()> {
    let (parent, name) = rel.rsplit_once('/').unwrap_or((".", rel));
    if !root.exists(parent) {
        root.create_dir_all(parent)?;
        // Make the new directory entries durable too.
        if let Some((grand, _)) = parent.rsplit_once('/') {
            root.open(grand)?.sync_all()?;
        }
        root.open(".")?.sync_all()?;
    }
    let dir = root.open_dir(parent)?;
    if dir.exists(name) {
        // Another writer may have linked it and not yet synced the directory: make sure the
        // entry is durable before reporting the pack as stored.
        return dir.open(".")?.sync_all();
    }
    let staging = format!("{name}#{}", rand::random::<u32>());
    let result = write_staging(&dir, &staging, bytes).and_then(|()| {
        match dir.hard_link(&staging, &dir, name) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    });
    let _ = dir.remove_file(&staging);
    result?;
    dir.open(".")?.sync_all()
}

fn write_staging(dir: &Dir, staging: &str, bytes: &[u8]) -> io::Result<()> {
    let aligned_len = bytes.len() / ALIGN * ALIGN;
    let mut written = 0;
    if aligned_len > 0 {
        let mut o = OpenOptions::new();
        o.write(true).create_new(true).custom_flags(libc::O_DIRECT);
        match dir.open_with(staging, &o) {
            Ok(mut f) => {
                let r = if (bytes.as_ptr() as usize).is_multiple_of(ALIGN) {
                    f.write_all(&bytes[..aligned_len])
                } else {
                    f.write_all(aligned_copy(&bytes[..aligned_len]).as_slice_aligned())
                };
                match r {
                    Ok(()) => written = aligned_len,
                    // The filesystem refused direct I/O after all: start over buffered.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        f.set_len(0)?;
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let mut o = OpenOptions::new();
    o.write(true).create(true).append(true);
    let mut f = dir.open_with(staging, &o)?;
    f.write_all(&bytes[written..])?;
    f.sync_all()
}

/// A copy of `data` starting at a 4 KiB boundary.
struct AlignedCopy {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedCopy {
    fn as_slice_aligned(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

fn aligned_copy(data: &[u8]) -> AlignedCopy {
    let mut buf: Vec<u8> = Vec::with_capacity(data.len() + ALIGN);
    let start = buf.as_ptr().align_offset(ALIGN);
    buf.resize(start, 0);
    buf.extend_from_slice(data);
    AlignedCopy {
        buf,
        start,
        len: data.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_of_every_length_are_written_whole_and_only_once() {
        // Aligned, unaligned and tiny lengths; a second write of the same name is a no-op.
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority()).unwrap();
        for len in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 17, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let rel = format!("packs/ab/obj{len}");
            write_durable(&root, &rel, &data).unwrap();
            assert_eq!(
                std::fs::read(tmp.path().join(&rel)).unwrap(),
                data,
                "len {len}"
            );
            write_durable(&root, &rel, b"other").unwrap();
            assert_eq!(std::fs::read(tmp.path().join(&rel)).unwrap(), data);
        }
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("packs/ab"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains('#'))
            .collect();
        assert!(leftovers.is_empty());
    }
}
