//! Deterministic sample images for the demo, the benchmarks and the tests.
//!
//! A "mixed" image resembles a used disk: about a third all-zero blocks, a quarter random
//! bytes (compressed or encrypted data), and the rest text-like or binary-like content that
//! compresses the way logs, documents and executables do. The same seed gives the same bytes.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::error::{Error, Result};

const WORDS: &[&str] = &[
    "the",
    "volume",
    "snapshot",
    "block",
    "mirror",
    "lock",
    "holder",
    "upstream",
    "downstream",
    "chunk",
    "repository",
    "node",
    "cascade",
    "retention",
    "policy",
    "error",
    "INFO",
    "WARN",
    "2026-11-25T12:00:00Z",
    "request",
    "user",
    "id=",
    "status=200",
    "GET",
    "/api/v1/items",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "with",
    "on",
    "as",
    "database",
    "page",
];

/// Fills `buf` with one block of the given kind (0 zero, 1 random, 2 text, 3 binary-like).
fn fill_block(rng: &mut StdRng, kind: u8, buf: &mut [u8]) {
    match kind {
        0 => buf.fill(0),
        1 => rng.fill_bytes(buf),
        2 => {
            let mut i = 0;
            while i < buf.len() {
                let w = WORDS[rng.random_range(0..WORDS.len())].as_bytes();
                let sep: &[u8] = if rng.random_ratio(1, 12) { b"\n" } else { b" " };
                for &b in w.iter().chain(sep) {
                    if i == buf.len() {
                        break;
                    }
                    buf[i] = b;
                    i += 1;
                }
            }
        }
        _ => {
            // Records of small integers and repeated structure, like tables or executables.
            let base: u32 = rng.random();
            for (j, rec) in buf.chunks_mut(16).enumerate() {
                let v = base.wrapping_add((j as u32) * rng.random_range(0..4));
                let fields = [
                    v.to_le_bytes(),
                    (j as u32).to_le_bytes(),
                    [0, 0, 1, 0],
                    [0xff, 0, 0, 0],
                ];
                for (d, s) in rec.iter_mut().zip(fields.iter().flatten()) {
                    *d = *s;
                }
            }
        }
    }
}

/// The kind of a block: 1/3 zero, 1/4 random, the rest split between text and binary-like.
fn pick_kind(rng: &mut StdRng) -> u8 {
    let x = rng.random_range(0..12);
    match x {
        0..=3 => 0,
        4..=6 => 1,
        7..=9 => 2,
        _ => 3,
    }
}

/// Writes a mixed image of `size` bytes in blocks of `block_size`.
pub fn write_mixed_image(path: &Path, size: u64, block_size: usize, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f =
        File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let mut buf = vec![0u8; block_size];
    let mut out = Vec::with_capacity(8 << 20);
    let mut written = 0u64;
    while written < size {
        let n = ((size - written) as usize).min(block_size);
        let kind = pick_kind(&mut rng);
        fill_block(&mut rng, kind, &mut buf[..n]);
        out.extend_from_slice(&buf[..n]);
        written += n as u64;
        if out.len() >= 8 << 20 {
            f.write_all(&out)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            out.clear();
        }
    }
    f.write_all(&out)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Rewrites `fraction` of the image's blocks, at random offsets, with new non-zero content.
/// Returns the indices of the blocks rewritten.
pub fn rewrite_blocks(
    path: &Path,
    block_size: usize,
    fraction: f64,
    seed: u64,
) -> Result<Vec<u64>> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let size = f
        .metadata()
        .map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?
        .len();
    let blocks = size.div_ceil(block_size as u64);
    let count = ((blocks as f64 * fraction).round() as u64).clamp(1, blocks.max(1));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(rng.random_range(0..blocks));
    }
    let mut buf = vec![0u8; block_size];
    for &b in &chosen {
        let off = b * block_size as u64;
        let n = ((size - off) as usize).min(block_size);
        let kind = 1 + rng.random_range(0..3u8);
        fill_block(&mut rng, kind, &mut buf[..n]);
        f.write_all_at(&buf[..n], off)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    f.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
    Ok(chosen.into_iter().collect())
}
