//! Moving chunks: verified chunks into packs, uploaded in the background.

use std::collections::HashSet;

use indicatif::ProgressBar;

use crate::catalog::SnapshotStats;
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::repo::{ChunkIndex, Repository};

use super::*;

// ---------------------------------------------------------------------------------------
// Moving chunks.

/// How many sealed packs upload at once while the next one fills.
/// (`HOLDFAST_TARGET_UPLOADS` sets it, 1 to 64.)
const UPLOADS_IN_FLIGHT: usize = 4;

fn uploads_in_flight() -> usize {
    std::env::var("HOLDFAST_TARGET_UPLOADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(UPLOADS_IN_FLIGHT, |n| n.clamp(1, 64))
}

/// Verified chunks go into packs of `repo`; each pack is durable before it is indexed.
/// Sealed packs upload in the background (up to [`UPLOADS_IN_FLIGHT`]) while the next one
/// fills; [`PackSink::seal`] returns only when every pack so far is durable, so a manifest
/// written after it never names a chunk that is not stored.
pub struct PackSink<'a> {
    repo: &'a Repository,
    index: &'a mut ChunkIndex,
    builder: crate::repo::pack::PackBuilder,
    /// Chunks in packs that are uploading (not yet in `index`).
    pending: HashSet<ChunkId>,
    uploads: tokio::task::JoinSet<Result<crate::repo::pack::PackIndex>>,
    /// The indexes of the packs this sink stored.
    pub stored: Vec<crate::repo::pack::PackIndex>,
    max_uploads: usize,
    /// Packs get a random salt in their names (a target's packs: `repo/pack.rs`).
    salted: bool,
    pub stats: SnapshotStats,
}

impl<'a> PackSink<'a> {
    /// A sink into a node's own repository.
    pub fn new(repo: &'a Repository, index: &'a mut ChunkIndex) -> Self {
        PackSink {
            repo,
            index,
            builder: Default::default(),
            pending: HashSet::new(),
            uploads: tokio::task::JoinSet::new(),
            stored: Vec::new(),
            max_uploads: uploads_in_flight(),
            salted: false,
            stats: Default::default(),
        }
    }

    /// A sink into a target: every pack name is new (salted), never one a gc condemned.
    pub fn into_target(repo: &'a Repository, index: &'a mut ChunkIndex) -> Self {
        PackSink {
            builder: crate::repo::pack::PackBuilder::salted(),
            salted: true,
            ..Self::new(repo, index)
        }
    }

    fn fresh_builder(&self) -> crate::repo::pack::PackBuilder {
        if self.salted {
            crate::repo::pack::PackBuilder::salted()
        } else {
            crate::repo::pack::PackBuilder::new()
        }
    }

    pub fn has(&self, id: &ChunkId) -> bool {
        self.index.contains(id) || self.pending.contains(id)
    }

    /// Adds a chunk that was verified against its id.
    pub async fn add(
        &mut self,
        id: ChunkId,
        encoding: crate::chunk::Encoding,
        stored: &[u8],
        raw_len: usize,
    ) -> Result<()> {
        self.stats.new_chunks += 1;
        self.stats.new_bytes += raw_len as u64;
        self.stats.new_stored_bytes += stored.len() as u64;
        self.builder.add(id, encoding, stored, raw_len);
        self.pending.insert(id);
        if self.builder.is_full() {
            self.start_upload().await?;
        }
        Ok(())
    }

    /// Seals the pack being filled and starts its upload, first waiting for a slot.
    async fn start_upload(&mut self) -> Result<()> {
        if self.builder.is_empty() {
            return Ok(());
        }
        while self.uploads.len() >= self.max_uploads {
            self.finish_one().await?;
        }
        let next = self.fresh_builder();
        let b = std::mem::replace(&mut self.builder, next);
        let repo = self.repo.clone();
        self.uploads.spawn(async move {
            let pack = tokio::task::spawn_blocking(move || b.finish())
                .await
                .map_err(|e| Error::internal(format!("pack sealer failed: {e}")))??;
            repo.put_pack(&pack).await?;
            Ok(pack.index)
        });
        Ok(())
    }

    /// Waits for one upload; its chunks become indexed.
    async fn finish_one(&mut self) -> Result<()> {
        let Some(done) = self.uploads.join_next().await else {
            return Ok(());
        };
        let pi = done.map_err(|e| Error::internal(format!("pack upload failed: {e}")))??;
        for e in &pi.entries {
            self.pending.remove(&e.id);
        }
        self.stored.push(pi.clone());
        self.index.insert(pi);
        Ok(())
    }

    /// Makes everything added so far durable and indexed. On an error the other uploads
    /// are stopped (dropping the set aborts them; a multipart upload left behind is
    /// invisible and named by its content).
    pub async fn seal(&mut self) -> Result<()> {
        self.start_upload().await?;
        while !self.uploads.is_empty() {
            self.finish_one().await?;
        }
        Ok(())
    }
}

/// Copies the `chunks` (a manifest's, say) that `sink` lacks from `src`, verifying
/// each.
pub(super) async fn copy_chunks(
    src: &Repository,
    src_index: &ChunkIndex,
    chunks: &[ChunkId],
    sink: &mut PackSink<'_>,
    progress: &ProgressBar,
) -> Result<()> {
    let mut seen = HashSet::new();
    let needed: Vec<ChunkId> = chunks
        .iter()
        .filter(|id| !sink.has(id) && seen.insert(**id))
        .copied()
        .collect();
    progress.inc_length(needed.len() as u64);
    for batch in needed.chunks(BATCH) {
        let read = src.read_chunks(src_index, batch).await?;
        let ids = batch.to_vec();
        // Every chunk is verified against its id before it is written anywhere.
        let verified = tokio::task::spawn_blocking(move || -> Result<_> {
            use rayon::prelude::*;
            ids.par_iter()
                .zip(read.par_iter())
                .try_for_each(|(id, (loc, data))| {
                    crate::chunk::decode(id, loc.encoding, data, loc.raw_length as usize)
                        .map(|_| ())
                })?;
            Ok((ids, read))
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
        for (id, (loc, data)) in verified.0.iter().zip(&verified.1) {
            sink.add(*id, loc.encoding, data, loc.raw_length as usize)
                .await?;
            progress.inc(1);
        }
    }
    sink.seal().await
}
