//! Streaming a snapshot's image, in order, every chunk verified (`holdfast snapshot read`).
//!
//! Works through the image in windows: the chunks of a window are fetched pack by pack
//! (ranges of one pack in one request), decoded and verified, then written in block order.

use std::collections::HashMap;

use indicatif::ProgressBar;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::Manifest;
use crate::chunk;
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::repo::Repository;

/// Blocks per window: 16 MiB of 64 KiB blocks.
const WINDOW_BLOCKS: usize = 256;

/// Writes the snapshot's image to `out`; returns the bytes written.
pub async fn stream(
    repo: &Repository,
    m: &Manifest,
    out: &mut (impl AsyncWrite + Unpin),
    progress: &ProgressBar,
) -> Result<u64> {
    let what = format!("{}@{}", m.volume, m.name);
    let (index, _) = repo.load_index().await?;
    let zeros = vec![0u8; m.block_size as usize];
    let mut written = 0u64;
    progress.set_length(m.size);
    for first in (0..m.blocks.len()).step_by(WINDOW_BLOCKS) {
        let window: Vec<Option<ChunkId>> =
            m.blocks.iter_range(first..first + WINDOW_BLOCKS).collect();
        let first = first as u64;
        let mut wanted: HashMap<PackId, Vec<ChunkId>> = HashMap::new();
        for (i, b) in window.iter().enumerate() {
            if let Some(id) = b {
                let loc = index.get(id).ok_or_else(|| {
                    Error::corrupt(format!(
                        "snapshot {what} block {} needs chunk {id}, which is missing from the \
                         repository",
                        first + i as u64
                    ))
                })?;
                let ids = wanted.entry(loc.pack).or_default();
                if !ids.contains(id) {
                    ids.push(*id);
                }
            }
        }
        let mut plain: HashMap<ChunkId, Vec<u8>> = HashMap::new();
        for (pack, ids) in wanted {
            let locs: Vec<_> = ids
                .iter()
                .map(|id| *index.get(id).expect("looked up above"))
                .collect();
            let ranges: Vec<_> = locs
                .iter()
                .map(|l| l.offset..l.offset + l.length as u64)
                .collect();
            let blobs = repo.read_pack_ranges(&pack, &ranges).await?;
            let decoded = tokio::task::spawn_blocking(move || {
                ids.into_iter()
                    .zip(locs)
                    .zip(blobs)
                    .map(|((id, l), blob)| {
                        chunk::decode(&id, l.encoding, &blob, l.raw_length as usize)
                            .map(|p| (id, p))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .await
            .map_err(|e| Error::internal(format!("read worker failed: {e}")))?
            .map_err(|e| Error::corrupt(format!("snapshot {what}: {e}")))?;
            plain.extend(decoded);
        }
        for (i, b) in window.iter().enumerate() {
            let len = m.block_len(first + i as u64);
            let data = match b {
                None => &zeros[..len],
                Some(id) => {
                    let p = &plain[id];
                    if p.len() != len {
                        return Err(Error::corrupt(format!(
                            "snapshot {what} block {} is {len} bytes but its chunk has {}",
                            first + i as u64,
                            p.len()
                        )));
                    }
                    p.as_slice()
                }
            };
            out.write_all(data)
                .await
                .map_err(|e| Error::io("writing the image to the output", e))?;
            written += len as u64;
            progress.inc(len as u64);
        }
    }
    out.flush()
        .await
        .map_err(|e| Error::io("writing the image to the output", e))?;
    Ok(written)
}
