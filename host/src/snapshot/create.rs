//! Taking a snapshot: read, hash, deduplicate, compress, pack, commit.
//!
//! The work is a pipeline so that both cores stay busy and the disk never waits:
//!
//! ```text
//! compute (rayon, segment by segment: read each block that is not a hole, hash it,
//!          compress it if new)
//!     --sealed packs--> uploader (tokio tasks, bounded) --> repository
//! ```
//!
//! Only blocks whose hash the repository does not hold yet are compressed and written, so an
//! incremental snapshot costs one read and one hash of the image plus the changed blocks.
//! After the last pack is durable the manifest is written (atomically, create-only), and only
//! then is the snapshot recorded in the catalog, which makes it visible.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use rayon::prelude::*;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::{BlockList, MANIFEST_FORMAT, Manifest, block_count};
use crate::catalog::{Checkpoint, VolumeRecord};
use crate::catalog::{SnapshotRecord, SnapshotStats};
use crate::chunk;
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId, SnapshotId, SnapshotName, VolumeName};
use crate::repo::ChunkIndex;
use crate::repo::pack::PackBuilder;
use crate::repo::pack::PackIndex;
use crate::state::Node;
use crate::volume::{FileVolume, Source, SourceSpec, qemu};

/// Bytes read from the image per pipeline step: big enough to amortise the hand-offs.
const SEGMENT_BYTES: usize = 8 << 20;
/// Pack uploads in flight: two keep a local disk busy; more only add memory.
const UPLOAD_CONCURRENCY: usize = 2;

#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    pub name: Option<SnapshotName>,
    pub labels: BTreeMap<String, String>,
    /// Commands run before the source is read and after the snapshot (see [`super::hooks`]).
    pub hooks: super::hooks::Hooks,
    /// When to read everything although changed-block tracking could be used.
    pub full_read: FullRead,
}

/// When a source with changed-block tracking is read whole anyway.
#[derive(Clone, Copy, Debug, Default)]
pub struct FullRead {
    /// This time (`snapshot create --full-read`).
    pub now: bool,
    /// When the chain's last full read is older than this (`full_read_every` of a schedule):
    /// a bitmap can miss a change nobody can detect (cleared by hand, say); a periodic full
    /// read bounds how long such a change stays unseen.
    pub every: Option<Duration>,
}

impl FullRead {
    /// Why the snapshot after checkpoint `cp` must read everything whatever its bitmap says,
    /// if it must.
    fn forced(self, cp: &crate::catalog::Checkpoint) -> Option<String> {
        if self.now {
            return Some("a full read was asked for (--full-read)".into());
        }
        let every = self.every?;
        let age = crate::now_unix_ms().saturating_sub(cp.full_read_unix_ms);
        (age > every.as_millis() as u64).then(|| {
            format!(
                "the last full read was {} ago (full_read_every = {})",
                humantime::format_duration(Duration::from_secs(age / 1000)),
                humantime::format_duration(every)
            )
        })
    }
}

/// What `create` did.
#[derive(Clone, Debug)]
pub struct CreateReport {
    pub record: SnapshotRecord,
    pub bytes_read: u64,
    pub elapsed: Duration,
    /// For a source with changed-block tracking: whether this snapshot read only the changed
    /// blocks, and if not, why.
    pub tracking: Option<Tracking>,
}

/// How a snapshot of a source with changed-block tracking was read.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Tracking {
    /// Only the blocks the dirty bitmap marks were read; the rest came from `base`.
    pub changed_blocks_only: bool,
    /// The snapshot the unchanged blocks came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Why the whole volume was read, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_read_reason: Option<String>,
    /// Bytes the dirty bitmap marked as written since the base.
    pub dirty_bytes: u64,
    /// Bytes the bitmap did not mark that hold data in the base and read as zeros now: read
    /// again (a disk shrunk and grown back, a bitmap changed by hand).
    #[serde(skip_serializing_if = "is_zero")]
    pub unmarked_zero_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Takes a snapshot of `volume`, running its hooks around it.
pub async fn create(
    node: &Node,
    volume: &VolumeName,
    mut opts: CreateOptions,
    progress: &ProgressBar,
) -> Result<CreateReport> {
    let started = Instant::now();
    let vol = node.catalog.volume(volume)?;
    if let Some(from) = &vol.upstream {
        return Err(Error::invalid(format!(
            "volume {volume} is a replica ({from}); its snapshots arrive by `holdfast mirror run`, \
             it has no image to snapshot"
        )));
    }
    let existing = node.catalog.snapshots(volume)?;
    let name = match opts.name.take() {
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
    let hooks = std::mem::take(&mut opts.hooks);
    let env = super::hooks::HookEnv {
        volume: volume.to_string(),
        snapshot: name.to_string(),
        source: vol.source_label(),
    };
    hooks.before(&env).await?;
    let r = take(
        node, vol, existing, name, opts, progress, started, &hooks, &env,
    )
    .await;
    hooks.after(&env, &r).await;
    r
}

/// Takes the snapshot itself (after the `before` hook).
#[allow(clippy::too_many_arguments)]
async fn take(
    node: &Node,
    vol: crate::catalog::VolumeRecord,
    existing: Vec<SnapshotRecord>,
    name: SnapshotName,
    opts: CreateOptions,
    progress: &ProgressBar,
    started: Instant,
    hooks: &super::hooks::Hooks,
    env: &super::hooks::HookEnv,
) -> Result<CreateReport> {
    let volume = &vol.name;
    let block_size = vol.block_size;
    // The chunk index and the manifest of the snapshot a changed-block read would build on
    // are loaded while the source opens (starting qemu-nbd, freezing a running QEMU): with
    // few blocks changed, loading them is most of the work that grows with the volume.
    let mut opening = {
        let vol = vol.clone();
        let existing = existing.clone();
        // (An error here fails the opening below, after which `frozen` still runs.)
        let run_dir = node.run_dir();
        let full = opts.full_read;
        let (hooks, env) = (hooks.clone(), env.clone());
        let rt = tokio::runtime::Handle::current();
        // On a thread of its own, `frozen` included: however long the loading below keeps
        // this task busy, the view is released as soon as it is fixed.
        tokio::task::spawn_blocking(move || {
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_dir.and_then(|dir| open_source(&vol, &existing, &dir, full))
            }));
            // The view is fixed now (a running QEMU's is frozen), or opening failed (a panic
            // included): either way what `before` froze may go.
            rt.block_on(hooks.frozen(&env));
            opened.unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    };
    // gc must not remove a chunk this snapshot reuses between loading the index and
    // committing: the repository's shared lock is taken first. With a `frozen` hook, only
    // once it has run (it may run `holdfast gc`, which waits for every holder of the lock):
    // the loading goes on without it meanwhile and is checked under it ([`under_lock`]).
    let lock_first = hooks.frozen.is_none();
    let loading = async {
        let lock = if lock_first {
            Some(node.lock_repo_shared().await)
        } else {
            None
        };
        let index = node.load_index().await;
        let likely_base = match &vol.checkpoint {
            Some(cp) if opts.full_read.forced(cp).is_none() => {
                existing.iter().find(|s| s.id == cp.snapshot)
            }
            _ => None,
        };
        let manifest = match (likely_base, &index) {
            (Some(prev), Ok((index, _))) => {
                let m = super::load_manifest(&node.repo, prev).await;
                Some((prev.id, m.and_then(|m| held_base(m, prev, index))))
            }
            _ => None,
        };
        crate::pause_point("snapshot-index-loaded");
        (lock, (index, manifest))
    };
    tokio::pin!(loading);
    let mut loaded = None;
    let opened = loop {
        tokio::select! {
            o = &mut opening => break o,
            l = &mut loading, if loaded.is_none() => loaded = Some(l),
        }
    };
    // A source that could not be opened fails the snapshot at once, without waiting for the
    // loading (or for a gc it waits for).
    let (image, plan) =
        opened.map_err(|e| Error::internal(format!("opening the source failed: {e}")))??;
    let (lock, loaded) = match loaded {
        Some(l) => l,
        None => loading.await,
    };
    let checked = async {
        match lock {
            Some(lock) => Ok((lock?, loaded)),
            None => {
                let lock = node.lock_repo_shared().await?;
                Ok((lock, under_lock(node, loaded).await?))
            }
        }
    };
    let (_repo_lock, (index, likely_base)) = match checked.await {
        Ok(l) => l,
        Err(e) => {
            drop(image);
            return Err(abandon(&plan, e));
        }
    };
    // The regions as this view of the volume has them (its own partition table).
    let (image, regions) = if vol.regions.is_empty() {
        (image, Ok(Default::default()))
    } else {
        let (name, defs, bs) = (vol.name.clone(), vol.regions.clone(), vol.block_size);
        let read = tokio::task::spawn_blocking(move || {
            let size = image.size();
            let map = crate::region::resolve(
                &name,
                &defs,
                &mut crate::volume::SourceReader::new(&image),
                size,
                bs,
            );
            (image, map)
        })
        .await;
        match read {
            Ok(x) => x,
            Err(e) => {
                return Err(abandon(
                    &plan,
                    Error::internal(format!("reading the regions failed: {e}")),
                ));
            }
        }
    };
    let regions = match regions {
        Ok(map) => map,
        Err(why) => {
            drop(image);
            return Err(abandon(
                &plan,
                Error::corrupt(format!(
                    "{why}; nothing was committed (fix the partition table, or `holdfast \
                     volume region remove` the region)"
                )),
            ));
        }
    };
    let size = image.size();
    let prepared = async {
        super::manifest::check_block_count(size, block_size, &format!("volume {volume}"))?;
        let (index, problems) = index?;
        for p in problems {
            tracing::warn!("{p}; its chunks will be stored again");
        }
        let base = match &plan {
            Some(TrackingPlan {
                base: Some((prev, dirty)),
                ..
            }) => {
                let loaded = likely_base.filter(|(id, _)| *id == prev.id).map(|(_, m)| m);
                Some((
                    base_blocks(node, prev, loaded, size, block_size, &index).await?,
                    align(dirty, block_size as u64, size),
                ))
            }
            _ => None,
        };
        Ok::<_, Error>((index, base))
    };
    let (index, base) = match prepared.await {
        Ok(x) => x,
        Err(e) => {
            // qemu-nbd holds the image until its client leaves.
            drop(image);
            return Err(abandon(&plan, e));
        }
    };

    progress.set_length(size);
    let (pack_tx, mut pack_rx) = mpsc::channel::<PackBuilder>(2);
    let pb = progress.clone();
    let compute =
        tokio::task::spawn_blocking(move || compute(image, block_size, index, pack_tx, pb, base));

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
        if let Some(plan) = &plan {
            plan.abandoned();
        }
        return Err(e);
    }
    let Computed {
        blocks,
        stats,
        bytes_read,
        unmarked,
    } = match computed
        .and_then(|r| r)
        // The last point to stop at: nothing is committed yet.
        .and_then(|r| crate::shutdown::check("the snapshot").map(|()| r))
    {
        Ok(r) => r,
        Err(e) => {
            if let Some(plan) = &plan {
                plan.abandoned();
            }
            return Err(e);
        }
    };
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
    let mut record = manifest.record(stats);
    record.regions = regions;
    if let Err(e) = node.catalog.commit_snapshot(&record) {
        // Not visible; remove the manifest now rather than leaving it to gc.
        let _ = node.repo.delete_manifest(volume, &manifest.id).await;
        return Err(e);
    }
    let tracking = match plan {
        Some(plan) => Some(plan.committed(node, &vol, &record, unmarked).await),
        None => None,
    };
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
        tracking,
    })
}

/// Changed-block tracking for a snapshot of a `--qcow2` image: the bitmap this snapshot
/// starts (it records every write from before the read on), and the base it may build on.
struct TrackingPlan {
    host: BitmapHost,
    /// The bitmap started for this snapshot.
    new_bitmap: String,
    /// The bitmap the previous checkpoint started, if any (removed once this one commits).
    old_bitmap: Option<String>,
    /// The previous snapshot and the ranges its bitmap marks as written since, when the
    /// chain holds.
    base: Option<(SnapshotRecord, Vec<Range<u64>>)>,
    /// Why the whole volume is read, when it is.
    reason: Option<String>,
}

impl TrackingPlan {
    /// A plan whose base is decided once the source is open (see [`tracked`]).
    fn new(
        host: BitmapHost,
        new_bitmap: String,
        old: Option<&str>,
        reason: Option<String>,
    ) -> Self {
        TrackingPlan {
            host,
            new_bitmap,
            old_bitmap: old.map(str::to_string),
            base: None,
            reason,
        }
    }

    /// After the snapshot committed: the new bitmap becomes the checkpoint and the old one
    /// goes. A failure here costs only a full read next time, never a wrong incremental.
    async fn committed(
        self,
        node: &Node,
        vol: &VolumeRecord,
        rec: &SnapshotRecord,
        unmarked: u64,
    ) -> Tracking {
        // The chain's last full read: this snapshot's, or the one the chain started from.
        let full_read_unix_ms = match (&self.base, &vol.checkpoint) {
            (Some(_), Some(cp)) => cp.full_read_unix_ms,
            _ => rec.created_unix_ms,
        };
        let checkpoint = Checkpoint {
            bitmap: self.new_bitmap.clone(),
            snapshot: rec.id,
            full_read_unix_ms,
        };
        // Only the checkpoint changes (a region added meanwhile stays).
        let recorded = node.catalog.modify_volume(&vol.name, |now| {
            now.checkpoint = Some(checkpoint);
            Ok(())
        });
        if let Err(e) = recorded {
            tracing::warn!(
                "could not record the checkpoint of {}: {e}",
                rec.display_ref()
            );
        } else if let Some(old) = self.old_bitmap.clone() {
            let host = self.host.clone();
            let r = tokio::task::spawn_blocking(move || host.remove(&old)).await;
            if let Ok(Err(e)) = r {
                tracing::warn!("{e}; the next snapshot removes it");
            }
        }
        self.report(unmarked)
    }

    /// The snapshot failed: its bitmap is not needed (the next snapshot also removes it).
    fn abandoned(&self) {
        if let Err(e) = self.host.remove(&self.new_bitmap) {
            tracing::debug!(
                "could not remove the unused bitmap {}: {e}",
                self.new_bitmap
            );
        }
    }

    fn report(&self, unmarked: u64) -> Tracking {
        Tracking {
            unmarked_zero_bytes: unmarked,
            changed_blocks_only: self.base.is_some(),
            base: self.base.as_ref().map(|(b, _)| b.display_ref()),
            full_read_reason: self.reason.clone(),
            dirty_bytes: self
                .base
                .as_ref()
                .map_or(0, |(_, d)| d.iter().map(|r| r.end - r.start).sum()),
        }
    }
}

/// Opens a volume's source; for a `--qcow2` image or a running QEMU (`--qmp`), decides
/// whether the dirty-bitmap chain allows reading only the changed blocks, and starts the next
/// bitmap. Any doubt means a full read, with the reason.
fn open_source(
    vol: &VolumeRecord,
    existing: &[SnapshotRecord],
    run_dir: &std::path::Path,
    full: FullRead,
) -> Result<(Source, Option<TrackingPlan>)> {
    match &vol.source {
        Some(SourceSpec::Qcow2 { path }) => open_qcow2(vol, existing, path, full),
        Some(SourceSpec::Qmp {
            monitor,
            node,
            nbd_server,
        }) => open_qmp(
            vol,
            existing,
            monitor,
            node,
            nbd_server.as_deref(),
            run_dir,
            full,
        ),
        _ => Ok((
            crate::volume::open_source(&vol.image, vol.source.as_ref(), None)?,
            None,
        )),
    }
}

/// Whether the checkpoint's bitmap still marks every block written since its snapshot: the
/// base to build on, or why not.
fn chain(
    vol: &VolumeRecord,
    existing: &[SnapshotRecord],
    bitmaps: &[qemu::Bitmap],
    size: u64,
    full: FullRead,
) -> (Option<SnapshotRecord>, Option<String>) {
    let Some(cp) = &vol.checkpoint else {
        return (
            None,
            Some("no dirty bitmap yet: the first snapshot reads everything".into()),
        );
    };
    if let Some(why) = full.forced(cp) {
        return (None, Some(why));
    }
    let prev = existing.iter().find(|s| s.id == cp.snapshot);
    let bitmap = bitmaps.iter().find(|b| b.name == cp.bitmap);
    let why = match (prev, bitmap) {
        (None, _) => format!(
            "the snapshot that dirty bitmap {} started at was deleted",
            cp.bitmap
        ),
        (_, None) => format!("dirty bitmap {} is missing (removed or renamed)", cp.bitmap),
        (_, Some(b)) if b.in_use() => format!(
            "dirty bitmap {} is inconsistent (QEMU did not close the image cleanly)",
            cp.bitmap
        ),
        (_, Some(b)) if !b.enabled() => format!(
            "dirty bitmap {} was disabled, so it may have missed writes",
            cp.bitmap
        ),
        (Some(p), _) if p.size != size => {
            format!("the disk changed size ({} -> {size} bytes)", p.size)
        }
        (Some(p), _) if p.block_size != vol.block_size => "the block size changed".into(),
        (Some(p), Some(_)) => return (Some(p.clone()), None),
    };
    (None, Some(why))
}

fn open_qcow2(
    vol: &VolumeRecord,
    existing: &[SnapshotRecord],
    path: &std::path::Path,
    full: FullRead,
) -> Result<(Source, Option<TrackingPlan>)> {
    let info = qemu::info(path)?;
    if info.format != "qcow2" {
        return Err(Error::invalid(format!(
            "{} is a {} image now, not qcow2",
            path.display(),
            info.format
        )));
    }
    let prefix = format!("holdfast.{}.", vol.name);
    let (base, reason) = chain(vol, existing, &info.bitmaps, info.virtual_size, full);
    // Bitmaps of this volume that no checkpoint names were left by a snapshot that failed
    // or crashed: they only slow the writer down.
    let keep = vol.checkpoint.as_ref().map(|c| c.bitmap.as_str());
    for b in &info.bitmaps {
        if b.name.starts_with(&prefix) && Some(b.name.as_str()) != keep {
            tracing::info!(
                "removing the stale dirty bitmap {} of {}",
                b.name,
                path.display()
            );
            qemu::remove_bitmap(path, &b.name)?;
        }
    }
    if let Some(r) = &reason {
        tracing::info!("volume {}: reading everything: {r}", vol.name);
    }
    // Started before the read: every write from now on is marked for the next snapshot.
    let new_bitmap = format!("{prefix}{:016x}", rand::random::<u64>());
    qemu::add_bitmap(path, &new_bitmap, vol.block_size)?;
    let host = BitmapHost::Image(path.to_path_buf());
    let opened = crate::volume::NbdVolume::serve(path, "qcow2", base.as_ref().and(keep));
    let plan = TrackingPlan::new(host, new_bitmap, keep, reason);
    tracked(opened, plan, base)
}

/// A running QEMU's disk: freeze a point-in-time view (see [`crate::volume::qmp`]) and read it.
fn open_qmp(
    vol: &VolumeRecord,
    existing: &[SnapshotRecord],
    monitor: &std::path::Path,
    node: &str,
    nbd_server: Option<&str>,
    run_dir: &std::path::Path,
    full: FullRead,
) -> Result<(Source, Option<TrackingPlan>)> {
    use crate::volume::qmp::{self, Fleece, Names, Qmp};
    let nbd_server = nbd_server
        .map(str::parse::<crate::volume::nbd::NbdUri>)
        .transpose()?;
    let t = qmp::Target {
        monitor,
        node,
        nbd_server: nbd_server.as_ref(),
        run_dir,
    };
    let names = Names::new(vol.name.as_str());
    let keep = vol.checkpoint.as_ref().map(|c| c.bitmap.as_str());
    let mut q = Qmp::connect(monitor)?;
    Fleece::clean_up(&mut q, &t, &names, keep)?;
    let info = qmp::node_info(&mut q, node)?;
    let (base, reason) = chain(vol, existing, &info.bitmaps, info.size, full);
    if let Some(r) = &reason {
        tracing::info!("volume {}: reading everything: {r}", vol.name);
    }
    let new_bitmap = format!("{}{:016x}", names.bitmap_prefix, rand::random::<u64>());
    let host = BitmapHost::Qmp {
        monitor: monitor.to_path_buf(),
        node: node.to_string(),
    };
    let old = base.as_ref().and(keep);
    let opened = (|| {
        // The bitmap is persistent where the disk's format can keep it (qcow2).
        let fleece = Fleece::start(
            q,
            &t,
            &names,
            info.size,
            info.driver == "qcow2",
            (&new_bitmap, vol.block_size),
            old,
        )?;
        let uri = fleece.uri.clone();
        let bitmap = fleece.bitmap().map(str::to_string);
        crate::volume::NbdVolume::connect_kept(
            &uri,
            bitmap.as_deref(),
            Box::new(fleece),
            format!("the disk {node:?} of QEMU (monitor {})", monitor.display()),
        )
    })();
    let plan = TrackingPlan::new(host, new_bitmap, keep, reason);
    tracked(opened, plan, base)
}

/// Completes opening a tracked source: on success the plan gets its base and the dirty ranges;
/// on failure (the export already gone) the bitmap this snapshot started is removed.
fn tracked(
    opened: Result<crate::volume::NbdVolume>,
    mut plan: TrackingPlan,
    base: Option<SnapshotRecord>,
) -> Result<(Source, Option<TrackingPlan>)> {
    let opened = opened.and_then(|nbd| {
        let dirty = match &base {
            Some(_) => Some(nbd.dirty_ranges()?),
            None => None,
        };
        Ok((nbd, dirty))
    });
    match opened {
        Ok((nbd, dirty)) => {
            plan.base = base.zip(dirty);
            Ok((Source::Nbd(Box::new(nbd)), Some(plan)))
        }
        Err(e) => {
            if let Err(e) = plan.host.remove(&plan.new_bitmap) {
                tracing::debug!("{e}");
            }
            Err(e)
        }
    }
}

/// Where a volume's dirty bitmaps live.
#[derive(Clone)]
enum BitmapHost {
    /// In a qcow2 image, changed with qemu-img.
    Image(std::path::PathBuf),
    /// In a running QEMU, changed through its monitor.
    Qmp {
        monitor: std::path::PathBuf,
        node: String,
    },
}

impl BitmapHost {
    fn remove(&self, name: &str) -> Result<()> {
        match self {
            BitmapHost::Image(path) => qemu::remove_bitmap(path, name),
            BitmapHost::Qmp { monitor, node } => {
                crate::volume::qmp::remove_bitmap(monitor, node, name)
            }
        }
    }
}

/// The chunk index and base manifest loaded without the repository lock (while the source
/// opened), brought up to date now that it is held. If a pack the index names is gone (gc
/// deletes a pack's index before the pack), it is loaded again; packs new since (another
/// snapshot's, or those a repack wrote while the listing was read) are read. The manifest is
/// kept only if it was checked against an index that lost nothing; otherwise [`base_blocks`]
/// loads and checks it again. A loading that failed or found damage is done again: a gc
/// running meanwhile may have caused it.
async fn under_lock(node: &Node, (index, manifest): Loaded) -> Result<Loaded> {
    let mut index = match index {
        Ok((index, problems)) if problems.is_empty() => index,
        _ => return Ok((node.load_index().await, None)),
    };
    let before: Vec<PackId> = index.packs.keys().copied().collect();
    let problems = index.refresh(&node.repo).await?;
    let lost = before.iter().any(|p| !index.packs.contains_key(p));
    if lost {
        tracing::debug!("packs went while the source opened (a gc): the index was loaded again");
    }
    let manifest = manifest.filter(|(_, m)| m.is_ok() && !lost);
    Ok((Ok((index, problems)), manifest))
}

/// What is loaded while the source opens: the chunk index (and the problems found in it),
/// and the manifest of the likely base of a changed-block read, by id.
type Loaded = (
    Result<(ChunkIndex, Vec<String>)>,
    Option<(SnapshotId, Result<Manifest>)>,
);

/// The blocks of `prev`, the base of a changed-block snapshot, checked under the repository
/// lock: it is still committed (a snapshot deleted meanwhile may have lost its chunks to a
/// gc), its shape matches, and the repository holds every chunk it names, since they are
/// taken without being read.
///
/// `loaded` is its manifest if it was read already (while the source opened).
async fn base_blocks(
    node: &Node,
    prev: &SnapshotRecord,
    loaded: Option<Result<super::manifest::Manifest>>,
    size: u64,
    block_size: u32,
    index: &ChunkIndex,
) -> Result<BlockList> {
    crate::pause_point("snapshot-base-chosen");
    if !node
        .catalog
        .snapshots(&prev.volume)?
        .iter()
        .any(|s| s.id == prev.id)
    {
        return Err(Error::conflict(format!(
            "{} was deleted while this snapshot started; run it again (it will read everything)",
            prev.display_ref()
        )));
    }
    let m = match loaded {
        Some(m) => m?,
        None => held_base(super::load_manifest(&node.repo, prev).await?, prev, index)?,
    };
    if m.size != size || m.block_size != block_size {
        return Err(Error::internal(format!(
            "the base {} of a changed-block snapshot has another size",
            prev.display_ref()
        )));
    }
    Ok(m.blocks)
}

/// `m`, the manifest of `prev`, if the repository (`index`) holds every chunk it names.
fn held_base(
    m: super::manifest::Manifest,
    prev: &SnapshotRecord,
    index: &ChunkIndex,
) -> Result<super::manifest::Manifest> {
    if let Some(missing) = m.blocks.ids().iter().find(|id| !index.contains(id)) {
        return Err(Error::corrupt(format!(
            "{} names chunk {missing}, which the repository does not hold, so it cannot be the \
             base of a changed-block snapshot; run `holdfast verify`",
            prev.display_ref()
        )));
    }
    Ok(m)
}

/// Gives up the bitmap a failed snapshot started, and passes on the error.
fn abandon(plan: &Option<TrackingPlan>, e: Error) -> Error {
    if let Some(plan) = plan {
        plan.abandoned();
    }
    e
}

/// Widens ranges to whole blocks (clipped to `size`) and joins them.
fn align(ranges: &[Range<u64>], bs: u64, size: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        let a = r.start / bs * bs;
        let b = r.end.div_ceil(bs).saturating_mul(bs).min(size);
        if a >= b {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end >= a => last.end = last.end.max(b),
            _ => out.push(a..b),
        }
    }
    out
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

/// Hashes `data` (a block read into a worker's buffer) and, if the repository
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
///
/// The image is taken a segment at a time. Holes are never read: the segment's hole map says
/// which blocks hold data, and only those are read, each by the rayon worker that then hashes
/// (and, if new, compresses) it, so reading and hashing overlap on every core with one block
/// buffer per worker. After the segment, its hole map is asked again: a block that was a hole
/// and holds data now (a writer filled it meanwhile) is read after the change, so each block is
/// as it was either before or after, never a mix of the two maps. Each segment leaves the page
/// cache once read. Memory holds one segment's new chunks at most, whatever the image's size.
fn compute(
    image: Source,
    block_size: u32,
    index: ChunkIndex,
    packs: mpsc::Sender<PackBuilder>,
    progress: ProgressBar,
    base: Option<(BlockList, Vec<Range<u64>>)>,
) -> Result<Computed> {
    let bs = block_size as usize;
    let size = image.size();
    let mut b = Blocks {
        block_size: bs,
        index,
        packs,
        progress,
        blocks: BlockList::with_capacity(block_count(size, block_size) as usize),
        stats: SnapshotStats::default(),
        pending: HashSet::new(),
        builder: PackBuilder::new(),
        bytes_read: 0,
        buf: Vec::new(),
        unmarked: 0,
    };
    match &base {
        None => b.add_range(&image, 0..size)?,
        // Changed-block tracking: only the blocks written since the base are read (the
        // ranges are whole blocks, in order); the others are the base's, whatever their
        // number, at the cost of a word per 64 blocks.
        Some((prev, dirty)) => {
            // A bitmap does not see every change: a disk shrunk and grown back reads zeros
            // where its bitmap says nothing was written. Blocks the base holds data in, that
            // the source reads as zeros and the bitmap did not mark, are read again.
            let Survey {
                unmarked,
                dirty_data,
            } = survey(&image, prev, dirty, bs as u64, size)?;
            if !unmarked.is_empty() {
                b.unmarked = unmarked.iter().map(|r| r.end - r.start).sum();
                tracing::warn!(
                    "{} reads as zeros in {} bytes that the dirty bitmap did not mark; they are \
                     read again (was the disk shrunk and grown, or the bitmap changed?)",
                    image.describe(),
                    b.unmarked
                );
            }
            // What may hold data: the dirty ranges' data, and the unmarked blocks, read whole
            // (what reads as zeros there is stored as zero blocks).
            let known = union(&dirty_data, &unmarked);
            b.add_changed(&image, prev, &union(dirty, &unmarked), &known, size)?;
        }
    }
    if !b.builder.is_empty() {
        send_pack(&b.packs, b.builder)?;
    }
    image.check_size_unchanged()?;
    if b.blocks.len() as u64 != block_count(size, block_size) {
        return Err(Error::conflict(format!(
            "{} ended early (read {} of {} blocks); nothing was committed",
            image.describe(),
            b.blocks.len(),
            block_count(size, block_size)
        )));
    }
    Ok(Computed {
        blocks: b.blocks,
        stats: b.stats,
        bytes_read: b.bytes_read,
        unmarked: b.unmarked,
    })
}

/// What the compute side produced.
struct Computed {
    blocks: BlockList,
    stats: SnapshotStats,
    bytes_read: u64,
    unmarked: u64,
}

/// One front-to-back pass over the source's allocation map where a changed-block snapshot
/// needs it (a map read twice from the start costs the server its whole walk twice): the
/// base's runs of data blocks and the `dirty` ranges (ordered, apart, whole blocks) no longer
/// than a segment, joined where they meet, asked about once each, in order. It finds:
/// - the blocks (as byte ranges, in order) that `prev` holds data in, that the source reports
///   as reading zeros, wholly or in part, and that the bitmap did not mark (a marked block is
///   read anyway: a guest's discard or write of zeros marks what it clears);
/// - the parts of those dirty ranges that may hold data, in order ([`Blocks::add_changed`]
///   reads a longer range as [`Blocks::add_range`] does, asking as it goes).
fn survey(
    image: &Source,
    prev: &BlockList,
    dirty: &[Range<u64>],
    bs: u64,
    size: u64,
) -> Result<Survey> {
    let bytes =
        move |blocks: Range<usize>| blocks.start as u64 * bs..(blocks.end as u64 * bs).min(size);
    let mut data_blocks = prev.data().map(|(i, _)| i).peekable();
    let mut runs = std::iter::from_fn(move || {
        let first = data_blocks.next()?;
        let mut end = first + 1;
        while data_blocks.next_if_eq(&end).is_some() {
            end += 1;
        }
        Some(bytes(first..end))
    })
    .peekable();
    let mut asked = dirty
        .iter()
        .filter(|r| r.end - r.start <= SEGMENT_BYTES as u64)
        .peekable();
    let mut found = Survey {
        unmarked: Vec::new(),
        dirty_data: Vec::new(),
    };
    // The first dirty range that may still meet a block of the base (the blocks come in order).
    let mut marked = 0;
    loop {
        // The next region: from the first run or range left, with all that meets it.
        let start = match (runs.peek(), asked.peek()) {
            (None, None) => break,
            (r, d) => r
                .map_or(u64::MAX, |r| r.start)
                .min(d.map_or(u64::MAX, |d| d.start)),
        };
        let mut region = start..start;
        let (mut in_runs, mut in_asked) = (Vec::new(), Vec::new());
        loop {
            if let Some(r) = runs.next_if(|r| r.start <= region.end) {
                region.end = region.end.max(r.end);
                in_runs.push(r);
            } else if let Some(d) = asked.next_if(|d| d.start <= region.end) {
                region.end = region.end.max(d.end);
                in_asked.push(d.clone());
            } else {
                break;
            }
        }
        let data = image.data_ranges(region)?;
        let mut from = 0;
        for d in &in_asked {
            for x in overlapping(&data, &mut from, d) {
                found
                    .dirty_data
                    .push(x.start.max(d.start)..x.end.min(d.end));
            }
        }
        let mut at = 0;
        for run in in_runs {
            for blk in run.start / bs..run.end.div_ceil(bs) {
                let r = blk * bs..((blk + 1) * bs).min(size);
                while marked < dirty.len() && dirty[marked].end <= r.start {
                    marked += 1;
                }
                if marked < dirty.len() && dirty[marked].start < r.end {
                    continue;
                }
                while at < data.len() && data[at].end <= r.start {
                    at += 1;
                }
                // Wholly data: as the base has it. Partly or wholly zeros now (a shrink may
                // cut a block in two): read again.
                if at < data.len() && data[at].start <= r.start && data[at].end >= r.end {
                    continue;
                }
                match found.unmarked.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => found.unmarked.push(r),
                }
            }
        }
    }
    Ok(found)
}

/// What [`survey`] found.
#[derive(Debug, PartialEq)]
struct Survey {
    unmarked: Vec<Range<u64>>,
    dirty_data: Vec<Range<u64>>,
}

/// The ranges of ordered, apart `data` that overlap `r`, from `*from` on (moved past those
/// that end before `r`: the next `r` must not start before this one).
fn overlapping<'a>(data: &'a [Range<u64>], from: &mut usize, r: &Range<u64>) -> &'a [Range<u64>] {
    while *from < data.len() && data[*from].end <= r.start {
        *from += 1;
    }
    let mut to = *from;
    while to < data.len() && data[to].start < r.end {
        to += 1;
    }
    &data[*from..to]
}

/// The union of two ordered lists of ranges, ordered and joined.
fn union(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a.iter().chain(b).cloned().collect();
    all.sort_by_key(|r| r.start);
    crate::volume::merge(all.into_iter())
}

/// The state of a snapshot being computed, segment by segment.
struct Blocks {
    block_size: usize,
    index: ChunkIndex,
    packs: mpsc::Sender<PackBuilder>,
    progress: ProgressBar,
    blocks: BlockList,
    stats: SnapshotStats,
    /// New chunks already packed in this run (a block repeated within the image).
    pending: HashSet<ChunkId>,
    builder: PackBuilder,
    /// Bytes read from the image (holes are not read).
    bytes_read: u64,
    /// A segment's data, for sources read a segment at a time (NBD).
    buf: Vec<u8>,
    /// Bytes read although the dirty bitmap did not mark them (see [`survey`]).
    unmarked: u64,
}

/// A block of a segment after the parallel pass: `None` for a hole (not read).
type Done = Option<Result<Block>>;

impl Blocks {
    /// Adds the blocks of `range` (block-aligned, or ending at the end of the image), read
    /// from the image a segment at a time, holes skipped without reading.
    fn add_range(&mut self, image: &Source, range: Range<u64>) -> Result<()> {
        let bs = self.block_size;
        let seg_bytes = (SEGMENT_BYTES / bs).max(1) * bs;
        let mut offset = range.start;
        while offset < range.end {
            crate::shutdown::check("the snapshot")?;
            // Holes up to the block that holds the next data go in one step, whatever their
            // length: a terabyte of holes is a few system calls and a bit per block.
            let next = image.next_data(offset)?.unwrap_or(range.end).min(range.end);
            let holes_to = (next / bs as u64 * bs as u64).max(offset);
            if holes_to > offset {
                self.add_holes(holes_to - offset, bs);
                offset = holes_to;
                continue;
            }
            let len = ((range.end - offset) as usize).min(seg_bytes);
            let end = offset + len as u64;
            let data = image.data_ranges(offset..end)?;
            if data.is_empty() {
                self.add_holes(len as u64, bs);
            } else {
                self.add_segment(image, offset, len, &data)?;
            }
            image.done_with(offset..end);
            offset = end;
        }
        Ok(())
    }

    /// Takes the blocks of `range` from `prev` (the base of a changed-block snapshot).
    fn copy_from(&mut self, prev: &BlockList, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let bs = self.block_size as u64;
        let blocks = (range.start / bs) as usize..range.end.div_ceil(bs) as usize;
        let zeros = self.blocks.zero_blocks();
        let n = blocks.len() as u64;
        self.blocks.extend_from(prev, blocks);
        self.stats.zero_blocks += (self.blocks.zero_blocks() - zeros) as u64;
        self.stats.blocks += n;
        self.progress.inc(range.end - range.start);
    }

    /// Adds `len` bytes of holes: zero blocks, nothing read or hashed.
    fn add_holes(&mut self, len: u64, block_size: usize) {
        let n = len.div_ceil(block_size as u64);
        self.blocks.push_zeros(n as usize);
        self.stats.zero_blocks += n;
        self.stats.blocks += n;
        self.progress.inc(len);
    }

    /// Adds the segment of `len` bytes at `offset`, whose data (as opposed to holes) is
    /// `data`.
    fn add_segment(
        &mut self,
        image: &Source,
        offset: u64,
        len: usize,
        data: &[Range<u64>],
    ) -> Result<()> {
        let bs = self.block_size;
        let end = offset + len as u64;
        let count = len.div_ceil(bs);
        let block = |i: usize| {
            let from = offset + (i * bs) as u64;
            from..(from + bs as u64).min(end)
        };
        let is_hole = |data: &[Range<u64>], i: usize| {
            let r = block(i);
            !data.iter().any(|d| d.start < r.end && d.end > r.start)
        };
        // One parallel pass: read each block that holds data, hash it, and compress it unless
        // it is zero or the repository already has it. A block repeated within this run is
        // compressed more than once and stored once (rare; cheaper than a shared set across
        // threads).
        let index = &self.index;
        let holds_data: Vec<usize> = (0..count).filter(|&i| !is_hole(data, i)).collect();
        let mut done: Vec<Done> = (0..count).map(|_| None).collect();
        for (i, d) in read_blocks(image, index, &mut self.buf, offset, &holds_data, block)? {
            done[i] = d;
        }
        crate::pause_point("snapshot-segment-read");
        // Blocks that were holes and hold data now were filled while this segment was read:
        // read them after the change.
        if done.iter().any(Option::is_none) {
            let now = image.data_ranges_now(offset..end)?;
            let filled: Vec<usize> = (0..count)
                .filter(|&i| done[i].is_none() && !is_hole(&now, i))
                .collect();
            if !filled.is_empty() {
                for (i, d) in read_blocks(image, index, &mut self.buf, offset, &filled, block)? {
                    done[i] = d;
                }
            }
        }
        for (i, d) in done.into_iter().enumerate() {
            let r = block(i);
            self.push_block((r.end - r.start) as usize, d)?;
        }
        self.stats.blocks += count as u64;
        self.progress.inc(len as u64);
        Ok(())
    }

    /// Appends one block of `len` bytes: a hole (`None`, not read) or what reading it gave.
    fn push_block(&mut self, len: usize, d: Done) -> Result<()> {
        let Some(d) = d else {
            self.stats.zero_blocks += 1;
            self.blocks.push(None);
            return Ok(());
        };
        self.bytes_read += len as u64;
        match d? {
            Block::Zero => {
                self.stats.zero_blocks += 1;
                self.blocks.push(None);
            }
            Block::Known(id) => self.blocks.push(Some(id)),
            Block::New(id, encoding, stored) => {
                self.blocks.push(Some(id));
                if self.pending.insert(id) {
                    self.stats.new_chunks += 1;
                    self.stats.new_bytes += len as u64;
                    self.stats.new_stored_bytes += stored.len() as u64;
                    self.builder.add(id, encoding, &stored, len);
                    if self.builder.is_full() {
                        send_pack(&self.packs, std::mem::take(&mut self.builder))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds a changed-block snapshot's blocks: the base's outside `dirty` (ordered,
    /// block-aligned ranges), read ones inside. The dirty blocks are read in batches of up to
    /// a segment, scattered as they are, with many requests in flight: a change spread over a
    /// disk costs its own size in reads, not a round trip per block. `known` holds the parts
    /// of the ranges no longer than a segment that may hold data (ordered, apart; from
    /// [`survey`]): the rest of them are holes, zero blocks not read.
    fn add_changed(
        &mut self,
        image: &Source,
        prev: &BlockList,
        dirty: &[Range<u64>],
        known: &[Range<u64>],
        size: u64,
    ) -> Result<()> {
        let Source::Nbd(nbd) = image else {
            // (Only NBD sources have dirty bitmaps; a file would be read range by range.)
            let mut at = 0u64;
            for r in dirty {
                self.copy_from(prev, at..r.start);
                self.add_range(image, r.clone())?;
                at = r.end;
            }
            self.copy_from(prev, at..size);
            return Ok(());
        };
        let bs = self.block_size as u64;
        let len = |r: &Range<u64>| (r.end - r.start) as usize;
        let mut at = 0u64;
        let mut i = 0;
        let mut next_known = 0;
        while i < dirty.len() {
            crate::shutdown::check("the snapshot")?;
            if len(&dirty[i]) > SEGMENT_BYTES {
                self.copy_from(prev, at..dirty[i].start);
                self.add_range(image, dirty[i].clone())?;
                at = dirty[i].end;
                i += 1;
                continue;
            }
            let mut j = i;
            let mut bytes = 0;
            while j < dirty.len() && len(&dirty[j]) <= SEGMENT_BYTES - bytes {
                bytes += len(&dirty[j]);
                j += 1;
            }
            // Every block of the batch, and where its data lands in the buffer (holes are
            // zero blocks and not read).
            let mut blocks: Vec<(Range<u64>, Option<usize>)> = Vec::new();
            let mut reads: Vec<Range<u64>> = Vec::new();
            let mut filled = 0usize;
            for r in &dirty[i..j] {
                let data = overlapping(known, &mut next_known, r);
                let mut b = r.start;
                while b < r.end {
                    let br = b..(b + bs).min(r.end);
                    let hole = !data.iter().any(|d| d.start < br.end && d.end > br.start);
                    if hole {
                        blocks.push((br.clone(), None));
                    } else {
                        blocks.push((br.clone(), Some(filled)));
                        filled += len(&br);
                        match reads.last_mut() {
                            Some(l) if l.end == br.start => l.end = br.end,
                            _ => reads.push(br.clone()),
                        }
                    }
                    b = br.end;
                }
            }
            self.buf.clear();
            self.buf.resize(filled, 0);
            nbd.read_gather(&reads, &mut self.buf)?;
            let (buf, index) = (&self.buf[..], &self.index);
            let done: Vec<Done> = blocks
                .par_iter()
                .map(|(r, at)| {
                    at.map(|at| {
                        let data = &buf[at..at + (r.end - r.start) as usize];
                        if chunk::is_zero(data) {
                            Ok(Block::Zero)
                        } else {
                            classify(index, data)
                        }
                    })
                })
                .collect();
            let mut done = done.into_iter();
            let mut k = 0;
            for r in &dirty[i..j] {
                self.copy_from(prev, at..r.start);
                while k < blocks.len() && blocks[k].0.start < r.end {
                    let n = len(&blocks[k].0);
                    self.push_block(n, done.next().expect("one per block"))?;
                    self.stats.blocks += 1;
                    k += 1;
                }
                self.progress.inc(r.end - r.start);
                at = r.end;
            }
            i = j;
        }
        self.copy_from(prev, at..size);
        Ok(())
    }
}

fn send_pack(packs: &mpsc::Sender<PackBuilder>, pack: PackBuilder) -> Result<()> {
    packs
        .blocking_send(pack)
        .map_err(|_| Error::internal("the pack uploader stopped early"))
}

/// Reads and classifies the blocks `which` of the segment at `offset` (`block(i)` is block
/// `i`'s range). A file is read block by block by the rayon workers that hash them; an NBD
/// export a segment at a time into `buf`, many requests in flight, then hashed in parallel.
fn read_blocks(
    image: &Source,
    index: &ChunkIndex,
    buf: &mut Vec<u8>,
    offset: u64,
    which: &[usize],
    block: impl Fn(usize) -> Range<u64> + Sync,
) -> Result<Vec<(usize, Done)>> {
    match image {
        Source::File(f) => Ok(which
            .par_iter()
            .map(|&i| (i, Some(read_block(f, index, block(i)))))
            .collect()),
        Source::Nbd(n) => {
            let Some(&last) = which.last() else {
                return Ok(Vec::new());
            };
            let len = (block(last).end - offset) as usize;
            buf.clear();
            buf.resize(len, 0);
            let mut ranges: Vec<Range<u64>> = Vec::new();
            for &i in which {
                let r = block(i);
                match ranges.last_mut() {
                    Some(l) if l.end == r.start => l.end = r.end,
                    _ => ranges.push(r),
                }
            }
            n.read_ranges(offset, buf, &ranges)?;
            let buf = &buf[..];
            Ok(which
                .par_iter()
                .map(|&i| {
                    let r = block(i);
                    let data = &buf[(r.start - offset) as usize..(r.end - offset) as usize];
                    let b = if chunk::is_zero(data) {
                        Ok(Block::Zero)
                    } else {
                        classify(index, data)
                    };
                    (i, Some(b))
                })
                .collect())
        }
    }
}

/// Reads the block at `range` of the image (one `pread`, into the calling worker's own
/// buffer) and classifies it.
fn read_block(image: &FileVolume, index: &ChunkIndex, range: Range<u64>) -> Result<Block> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let len = (range.end - range.start) as usize;
    BUF.with_borrow_mut(|buf| {
        buf.resize(len, 0);
        let buf = &mut buf[..len];
        let n = image.read_at(range.start, buf)?;
        if n < len {
            return Err(Error::conflict(format!(
                "volume image {} shrank while it was read (short read at offset {}); \
                 nothing was committed",
                image.path().display(),
                range.start + n as u64
            )));
        }
        if chunk::is_zero(buf) {
            return Ok(Block::Zero);
        }
        classify(index, buf)
    })
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
            regions: Default::default(),
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
            regions: Default::default(),
        };
        assert_eq!(
            default_name(std::slice::from_ref(&rec), 1_700_000_000_000).as_str(),
            "2023-11-14T22:13:20Z-2"
        );
        let second = SnapshotRecord {
            name: "2023-11-14T22:13:20Z-2".parse().unwrap(),
            ..rec.clone()
        };
        assert_eq!(
            default_name(&[rec, second], 1_700_000_000_000).as_str(),
            "2023-11-14T22:13:20Z-3"
        );
    }

    #[test]
    fn tracking_shows_unmarked_zeros_only_when_there_were_some() {
        let t = |unmarked| Tracking {
            changed_blocks_only: true,
            base: Some("v@s1".into()),
            full_read_reason: None,
            dirty_bytes: 4096,
            unmarked_zero_bytes: unmarked,
        };
        let json = serde_json::to_value(t(0)).unwrap();
        assert!(json.get("unmarked-zero-bytes").is_none(), "{json}");
        assert_eq!(json["dirty-bytes"], 4096, "{json}");
        let json = serde_json::to_value(t(8192)).unwrap();
        assert_eq!(json["unmarked-zero-bytes"], 8192, "{json}");
    }
}

/// The compute side of a snapshot against an image file on disk (holes, written zeros,
/// repeated and known blocks, a short last block, several segments), checked against a
/// reading of the whole file block by block: every block's id, the stats, the bytes read and
/// each new chunk packed once with bytes that decode to it.
#[cfg(test)]
mod compute_tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const BS: usize = 4096;

    use crate::chunk::pseudo_random as bytes;

    /// A sparse image of `size` bytes with `writes` (offset, bytes) written into it.
    fn image(dir: &std::path::Path, name: &str, size: u64, writes: &[(u64, Vec<u8>)]) -> Source {
        let path = dir.join(name);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        for (at, b) in writes {
            f.write_all_at(b, *at).unwrap();
        }
        f.sync_all().unwrap();
        Source::File(FileVolume::open(&path).unwrap())
    }

    /// Each block's id as a plain reading of the whole image gives it (`None`: all zeros).
    fn expected(src: &Source) -> Vec<Option<ChunkId>> {
        expected_in(src, BS)
    }

    fn expected_in(src: &Source, bs: usize) -> Vec<Option<ChunkId>> {
        let size = src.size();
        let mut all = vec![0u8; size as usize];
        src.read_exact_at(0, &mut all).unwrap();
        all.chunks(bs)
            .map(|b| (!chunk::is_zero(b)).then(|| chunk::hash(b)))
            .collect()
    }

    /// Runs `compute`; returns what it computed and every chunk it packed (id, plain bytes).
    fn run(
        src: Source,
        index: ChunkIndex,
        base: Option<(BlockList, Vec<Range<u64>>)>,
    ) -> (Computed, Vec<(ChunkId, Vec<u8>)>) {
        run_in(src, BS, index, base)
    }

    fn run_in(
        src: Source,
        bs: usize,
        index: ChunkIndex,
        base: Option<(BlockList, Vec<Range<u64>>)>,
    ) -> (Computed, Vec<(ChunkId, Vec<u8>)>) {
        let (tx, mut rx) = mpsc::channel::<PackBuilder>(2);
        let drain = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(b) = rx.blocking_recv() {
                let p = b.finish().unwrap();
                for e in &p.index.entries {
                    let stored = &p.bytes[e.offset as usize..e.offset as usize + e.length as usize];
                    let plain =
                        chunk::decode(&e.id, e.encoding, stored, e.raw_length as usize).unwrap();
                    got.push((e.id, plain));
                }
            }
            got
        });
        let c = compute(src, bs as u32, index, tx, ProgressBar::hidden(), base).unwrap();
        (c, drain.join().unwrap())
    }

    /// The blocks a full pass gives for an image of `writes` (the base of a changed-block
    /// pass).
    fn full_pass(dir: &std::path::Path, size: u64, writes: &[(u64, Vec<u8>)]) -> BlockList {
        let (c, _) = run(
            image(dir, "base.img", size, writes),
            ChunkIndex::default(),
            None,
        );
        c.blocks
    }

    /// A changed-block pass's rule, block by block: a block a dirty range touches is as the
    /// image has it now (`fresh`), any other as the base (`prev`) has it.
    fn check_changed_pass(
        got: &[Option<ChunkId>],
        dirty: &[Range<u64>],
        fresh: &[Option<ChunkId>],
        prev: &BlockList,
    ) {
        for (i, got) in got.iter().enumerate() {
            let r = i as u64 * BS as u64..(i as u64 + 1) * BS as u64;
            let in_dirty = dirty.iter().any(|d| d.start < r.end && d.end > r.start);
            let want = if in_dirty {
                fresh[i]
            } else {
                prev.get(i).unwrap()
            };
            assert_eq!(*got, want, "block {i} (dirty: {in_dirty})");
        }
    }

    fn blocks_of(c: &Computed) -> Vec<Option<ChunkId>> {
        c.blocks.iter().collect()
    }

    /// An index that holds `data` as a chunk already.
    fn index_with(data: &[u8]) -> ChunkIndex {
        let mut b = PackBuilder::new();
        let (enc, stored) = chunk::encode(data).unwrap();
        b.add(chunk::hash(data), enc, &stored, data.len());
        let mut index = ChunkIndex::default();
        index.insert(b.finish().unwrap().index);
        index
    }

    #[test]
    fn a_full_pass_gives_every_block_its_id_and_packs_each_new_chunk_once() {
        let dir = tempfile::tempdir().unwrap();
        // Three segments (8 MiB each) and a short last block of 1000 bytes.
        let size = (20 << 20) + 1000;
        let seg = SEGMENT_BYTES as u64;
        let repeated = bytes(BS, 5);
        let known = bytes(BS, 6);
        let writes = vec![
            (0, bytes(BS, 1)),
            // Written zeros: data to the filesystem, a zero block to the snapshot.
            (BS as u64, vec![0; BS]),
            (5 * BS as u64, repeated.clone()),
            (9 * BS as u64, repeated.clone()),
            (12 * BS as u64, known.clone()),
            // Across the first segment boundary, and half a block at its start.
            (seg - 3 * BS as u64, bytes(6 * BS, 2)),
            (seg + 9 * BS as u64, bytes(BS / 2, 3)),
            // The repeated block again, in another segment.
            (2 * seg + 7 * BS as u64, repeated.clone()),
            // The short last block.
            (size - 1000, bytes(1000, 4)),
        ];
        let src = image(dir.path(), "a.img", size, &writes);
        let want = expected(&src);
        let (c, packed) = run(src, index_with(&known), None);
        assert_eq!(blocks_of(&c), want);
        let n = size.div_ceil(BS as u64);
        assert_eq!(c.stats.blocks, n);
        assert_eq!(
            c.stats.zero_blocks,
            want.iter().filter(|b| b.is_none()).count() as u64
        );
        // Read: the blocks the writes touched (whole blocks, the last one short), holes not.
        let written: std::collections::BTreeSet<u64> = writes
            .iter()
            .flat_map(|(at, b)| at / BS as u64..(at + b.len() as u64).div_ceil(BS as u64))
            .collect();
        let read: u64 = written
            .iter()
            .map(|&i| (BS as u64).min(size - i * BS as u64))
            .sum();
        assert_eq!(c.bytes_read, read);
        assert_eq!(c.unmarked, 0);
        // Each new chunk packed once, decoding to its block; the known one not at all.
        let mut new: Vec<ChunkId> = want.iter().flatten().copied().collect();
        new.sort();
        new.dedup();
        new.retain(|id| *id != chunk::hash(&known));
        let mut ids: Vec<ChunkId> = packed.iter().map(|(id, _)| *id).collect();
        ids.sort();
        assert_eq!(ids, new, "each new chunk packed once");
        for (id, plain) in &packed {
            assert_eq!(chunk::hash(plain), *id);
        }
        assert_eq!(c.stats.new_chunks, new.len() as u64);
        let plain: u64 = packed.iter().map(|(_, p)| p.len() as u64).sum();
        assert_eq!(c.stats.new_bytes, plain);
        assert!(
            packed.iter().any(|(_, p)| p.len() == 1000),
            "the short block"
        );
        assert!(c.stats.new_stored_bytes > 0 && c.stats.new_stored_bytes <= plain + 64 * n);
    }

    /// Blocks larger than the filesystem's: data that starts inside a block (a hole before it
    /// in the same block) and holes a segment long, whose first data is not block-aligned.
    #[test]
    fn blocks_larger_than_the_filesystems_are_read_whole_from_where_their_data_starts() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 64 << 10;
        let size = (40 << 20) + 4096;
        let writes = vec![
            (bs as u64 + 4096, bytes(4096, 1)),
            (5 * bs as u64 + 60 * 1024, bytes(8192, 2)),
            // After 20 MiB of holes (more than two segments), 12 KiB into a block.
            ((25 << 20) + 12 * 1024, bytes(4096, 3)),
            (size - 4096, bytes(4096, 4)),
        ];
        let src = image(dir.path(), "big-blocks.img", size, &writes);
        let want = expected_in(&src, bs);
        let (c, packed) = run_in(src, bs, ChunkIndex::default(), None);
        assert_eq!(c.blocks.iter().collect::<Vec<_>>(), want);
        assert_eq!(c.stats.blocks, (size as usize).div_ceil(bs) as u64);
        // Blocks 1, 5, 6 (the 8 KiB cross into it), the one at 25 MiB and the short last.
        assert_eq!(packed.len(), 5);
        assert_eq!(c.bytes_read, 4 * bs as u64 + 4096);
    }

    /// An image that shrinks under the read is a conflict, never a block made of what the
    /// buffer held before (the end-of-snapshot size check cannot see a file that shrank and
    /// grew back).
    #[test]
    fn a_short_read_is_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.img");
        std::fs::write(&path, bytes(4 * BS, 1)).unwrap();
        let f = FileVolume::open(&path).unwrap();
        let index = ChunkIndex::default();
        // Fills this thread's buffer with a whole block.
        assert!(matches!(
            read_block(&f, &index, 0..BS as u64).unwrap(),
            Block::New(..)
        ));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(3 * BS as u64 + 100)
            .unwrap();
        match read_block(&f, &index, 3 * BS as u64..4 * BS as u64) {
            Err(Error::Conflict(m)) => assert!(m.contains("shrank"), "{m}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a short read gave a block"),
        }
    }

    #[test]
    fn a_changed_block_pass_reads_the_dirty_ranges_and_keeps_the_base_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let size = (9 << 20) + 1000;
        let base_writes: Vec<(u64, Vec<u8>)> = (0..40)
            .map(|i| (i * 3 * BS as u64, bytes(BS, 100 + i)))
            .chain([(size - 1000, bytes(1000, 7))])
            .collect();
        let prev = full_pass(dir.path(), size, &base_writes);
        // The image now: blocks 3, 4 and 60 rewritten, block 6 zeroed (all inside the dirty
        // ranges), block 9 rewritten outside them (a change the bitmap does not report: the
        // snapshot keeps the base's block there, as changed-block tracking promises), and the
        // short last block rewritten.
        let mut now = base_writes.clone();
        now.extend([
            (3 * BS as u64, bytes(2 * BS, 200)),
            (6 * BS as u64, vec![0; BS]),
            (9 * BS as u64, bytes(BS, 201)),
            (60 * BS as u64, bytes(BS, 202)),
            (size - 1000, bytes(1000, 203)),
        ]);
        let src = image(dir.path(), "now.img", size, &now);
        let fresh = expected(&src);
        let dirty = vec![
            3 * BS as u64..7 * BS as u64,
            60 * BS as u64..61 * BS as u64,
            size - 1000 - (size - 1000) % BS as u64..size,
        ];
        let (c, packed) = run(
            src,
            ChunkIndex::default(),
            Some((prev.clone(), dirty.clone())),
        );
        let got = blocks_of(&c);
        let n = size.div_ceil(BS as u64) as usize;
        assert_eq!(got.len(), n);
        check_changed_pass(&got, &dirty, &fresh, &prev);
        assert_ne!(got[9], fresh[9], "block 9 is the base's");
        assert_eq!(got[6], None);
        assert_eq!(c.stats.blocks, n as u64);
        assert_eq!(
            c.stats.zero_blocks,
            got.iter().filter(|b| b.is_none()).count() as u64
        );
        // Only the dirty blocks that hold data were read: 3, 4, 5 (a hole: not read), 6 (written
        // zeros), 60 and the short last one.
        assert_eq!(c.bytes_read, (4 * BS + 1000) as u64);
        assert_eq!(c.unmarked, 0);
        // New: blocks 3, 4, 60 and the last; 6 is zeros.
        assert_eq!(c.stats.new_chunks, 4);
        assert_eq!(packed.len(), 4);
        assert_eq!(c.stats.new_bytes, (3 * BS + 1000) as u64);
    }

    /// The changed-block pass over NBD (where dirty bitmaps come from): small dirty ranges
    /// read in batches of up to a segment (a batch fills and the next one starts), a range
    /// larger than a segment streamed a segment at a time, holes inside dirty ranges not read,
    /// written zeros read and stored as zero blocks, a short last block, and a change outside
    /// the dirty ranges left as the base has it. Served by qemu-nbd from the same file, it must
    /// give what the same pass over the file gives, and both what the ranges say.
    #[test]
    fn a_changed_block_pass_over_nbd_is_the_pass_over_the_file() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        // (QEMU serves whole sectors: a short last block of 1000 bytes would be 1024 over NBD.)
        let size = 24 * MIB + 1024;
        // The base: data in every fifth block, and the short last block.
        let base_writes: Vec<(u64, Vec<u8>)> = (0..size / BS as u64)
            .step_by(5)
            .map(|i| (i * BS as u64, bytes(BS, 1000 + i)))
            .chain([(size - 1024, bytes(1024, 7))])
            .collect();
        let prev = full_pass(dir.path(), size, &base_writes);
        let mut now = base_writes.clone();
        let mut dirty = Vec::new();
        // Twelve ranges of 700 KiB, 8.2 MiB in all: one batch takes eleven, the next the last.
        // Each has 300 KiB written at its start, one block of written zeros, and holes.
        for k in 0..12u64 {
            let start = k * MIB + 2 * BS as u64;
            dirty.push(start..start + 700 * 1024);
            now.push((start, bytes(300 * 1024, 2000 + k)));
            now.push((start + 400 * 1024, vec![0; BS]));
        }
        // A change the bitmap does not report: the base's block stays.
        now.push((12 * MIB + 8 * BS as u64, bytes(BS, 3000)));
        // 9.5 MiB, more than a segment: streamed. Data at its start, middle and end.
        let large = 13 * MIB..13 * MIB + 9 * MIB + MIB / 2;
        dirty.push(large.clone());
        for (j, at) in [large.start, large.start + 4 * MIB, large.end - MIB]
            .into_iter()
            .enumerate()
        {
            now.push((at, bytes(MIB as usize / 2, 4000 + j as u64)));
        }
        // The short last block, rewritten.
        let last = size - size % BS as u64;
        dirty.push(last..size);
        now.push((size - 1024, bytes(1024, 5000)));

        let file = image(dir.path(), "now.img", size, &now);
        let fresh = expected(&file);
        let (on_file, _) = run(
            file,
            ChunkIndex::default(),
            Some((prev.clone(), dirty.clone())),
        );
        let served = crate::volume::NbdVolume::serve(&dir.path().join("now.img"), "raw", None)
            .unwrap_or_else(|e| {
                panic!("serving the image with qemu-nbd (Debian package qemu-utils): {e}")
            });
        let (on_nbd, packed) = run(
            Source::Nbd(Box::new(served)),
            ChunkIndex::default(),
            Some((prev.clone(), dirty.clone())),
        );

        let got = blocks_of(&on_nbd);
        let n = size.div_ceil(BS as u64) as usize;
        assert_eq!(got.len(), n);
        check_changed_pass(&got, &dirty, &fresh, &prev);
        let mut read = 0u64;
        for i in 0..n {
            let r = i as u64 * BS as u64..((i as u64 + 1) * BS as u64).min(size);
            let in_dirty = dirty.iter().any(|d| d.start < r.end && d.end > r.start);
            let holds_data = now
                .iter()
                .any(|(at, b)| *at < r.end && at + b.len() as u64 > r.start);
            if in_dirty && holds_data {
                read += r.end - r.start;
            }
        }
        assert_ne!(
            got[(12 * MIB / BS as u64 + 8) as usize],
            fresh[(12 * MIB / BS as u64 + 8) as usize],
            "the unreported change is the base's"
        );
        assert_eq!(on_nbd.bytes_read, read);
        assert_eq!(on_nbd.stats.blocks, n as u64);
        assert_eq!(
            on_nbd.stats.zero_blocks,
            got.iter().filter(|b| b.is_none()).count() as u64
        );
        assert_eq!(on_nbd.unmarked, 0);
        for (id, plain) in &packed {
            assert_eq!(chunk::hash(plain), *id);
        }
        // The same as over the file, block for block and in what it counted.
        assert_eq!(got, blocks_of(&on_file));
        assert_eq!(on_nbd.bytes_read, on_file.bytes_read);
        assert_eq!(on_nbd.stats, on_file.stats);
    }

    /// A block the base holds data in and the image now reads as zeros (a disk shrunk and
    /// grown back) is read again although no dirty range covers it.
    #[test]
    fn blocks_the_bitmap_missed_that_now_read_as_zeros_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * BS as u64;
        let base_writes: Vec<(u64, Vec<u8>)> = (0..8)
            .map(|i| (i * 4 * BS as u64, bytes(BS, 300 + i)))
            .collect();
        let prev = full_pass(dir.path(), size, &base_writes);
        // Blocks 8 and 12 are holes now (13, a hole in the base too, is not read).
        let now: Vec<(u64, Vec<u8>)> = base_writes
            .iter()
            .filter(|(at, _)| ![8, 12].contains(&(at / BS as u64)))
            .cloned()
            .collect();
        let src = image(dir.path(), "now.img", size, &now);
        let fresh = expected(&src);
        let (c, _) = run(src, ChunkIndex::default(), Some((prev.clone(), vec![])));
        let got = blocks_of(&c);
        assert_eq!(got, fresh);
        assert_eq!(got[8], None);
        assert_eq!(got[12], None);
        assert_eq!(c.unmarked, 2 * BS as u64);
        // Both are holes now: nothing is read.
        assert_eq!(c.bytes_read, 0);
    }

    #[test]
    fn unmarked_zeros_names_the_base_blocks_that_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        // Blocks of two filesystem blocks, so that one can be half data.
        let bs = 2 * BS as u64;
        let size = 20 * bs + 100;
        let mut prev = BlockList::new();
        for i in 0..21 {
            prev.push(
                [1, 2, 3, 5, 6, 7, 10, 11, 12, 20]
                    .contains(&i)
                    .then(|| chunk::hash(&[i as u8])),
            );
        }
        // Data in blocks 1, 3 (its first half), 5, 6, 10, 12 and the short block 20; 2, 7
        // and 11 are holes (11 between two blocks of data in one run of the base).
        let src = image(
            dir.path(),
            "z.img",
            size,
            &[
                (bs, bytes(bs as usize, 1)),
                (3 * bs, bytes(BS, 2)),
                (5 * bs, bytes(2 * bs as usize, 3)),
                (10 * bs, bytes(bs as usize, 5)),
                (12 * bs, bytes(bs as usize, 6)),
                (20 * bs, bytes(100, 4)),
            ],
        );
        let unmarked = vec![2 * bs..4 * bs, 7 * bs..8 * bs, 11 * bs..12 * bs];
        let found = |prev: &BlockList, dirty: &[Range<u64>]| survey(&src, prev, dirty, bs, size);
        assert_eq!(
            found(&prev, &[]).unwrap(),
            Survey {
                unmarked: unmarked.clone(),
                dirty_data: vec![]
            }
        );
        // Nothing where the base has nothing.
        assert_eq!(
            found(&BlockList::new(), &[]).unwrap(),
            Survey {
                unmarked: vec![],
                dirty_data: vec![]
            }
        );
        // The data in dirty ranges before, between, inside and after the base's runs: the
        // first half of block 3, block 10, the short block 20 (and none in the holes 8-9).
        // Block 3, half zeros now, is read as the bitmap marked it, not as unmarked.
        let dirty = [0..bs, 3 * bs..4 * bs, 8 * bs..11 * bs, 20 * bs..size];
        let Survey {
            unmarked: again,
            dirty_data: data,
        } = found(&prev, &dirty).unwrap();
        assert_eq!(
            again,
            vec![2 * bs..3 * bs, 7 * bs..8 * bs, 11 * bs..12 * bs]
        );
        assert_eq!(
            data,
            vec![3 * bs..3 * bs + BS as u64, 10 * bs..11 * bs, 20 * bs..size]
        );
        // Each dirty range finds its own data, and only its own, from a moving start.
        let mut from = 0;
        assert_eq!(
            overlapping(&data, &mut from, &(0..bs)),
            &[] as &[Range<u64>]
        );
        assert_eq!(overlapping(&data, &mut from, &(3 * bs..4 * bs)), &data[..1]);
        assert_eq!(
            overlapping(&data, &mut from, &(8 * bs..11 * bs)),
            &data[1..2]
        );
        assert_eq!(overlapping(&data, &mut from, &(20 * bs..size)), &data[2..]);
        assert_eq!(from, 2);
        // Inside a run of the base (block 5), on its hole 7 and past its end (12); then one
        // bridging two runs: marked blocks are never unmarked ones.
        assert_eq!(
            found(&prev, &[5 * bs..6 * bs, 7 * bs..8 * bs, 12 * bs..13 * bs]).unwrap(),
            Survey {
                unmarked: vec![2 * bs..4 * bs, 11 * bs..12 * bs],
                dirty_data: vec![5 * bs..6 * bs, 12 * bs..13 * bs],
            }
        );
        assert_eq!(
            found(&prev, std::slice::from_ref(&(6 * bs..11 * bs))).unwrap(),
            Survey {
                unmarked: vec![2 * bs..4 * bs, 11 * bs..12 * bs],
                dirty_data: vec![6 * bs..7 * bs, 10 * bs..11 * bs],
            }
        );
    }

    #[test]
    fn ranges_are_aligned_to_whole_blocks_clipped_and_joined() {
        let r = |v: &[(u64, u64)]| v.iter().map(|&(a, b)| a..b).collect::<Vec<_>>();
        assert_eq!(align(&r(&[(1, 2)]), 10, 95), r(&[(0, 10)]));
        assert_eq!(
            align(&r(&[(10, 20), (20, 21), (35, 36)]), 10, 95),
            r(&[(10, 40)])
        );
        assert_eq!(align(&r(&[(91, 93)]), 10, 95), r(&[(90, 95)]));
        // In the last block's tail past the end: the short last block; wholly past it: nothing.
        assert_eq!(align(&r(&[(95, 99)]), 10, 95), r(&[(90, 95)]));
        assert_eq!(align(&r(&[(100, 120)]), 10, 95), r(&[]));
        assert_eq!(align(&r(&[(0, 30), (12, 18)]), 10, 95), r(&[(0, 30)]));
        assert_eq!(
            align(&r(&[(0, 10), (21, 22)]), 10, 95),
            r(&[(0, 10), (20, 30)])
        );
        assert_eq!(
            union(&r(&[(0, 10), (40, 50)]), &r(&[(5, 20), (30, 40), (60, 70)])),
            r(&[(0, 20), (30, 50), (60, 70)])
        );
        assert_eq!(union(&r(&[]), &r(&[(3, 4)])), r(&[(3, 4)]));
    }

    /// Every reason a changed-block snapshot falls back to a full read, each on its own, and
    /// the base it builds on when none applies.
    #[test]
    fn a_chain_builds_on_its_base_only_when_its_bitmap_still_marks_every_change() {
        let base = |size: u64, bs: u32| SnapshotRecord {
            id: SnapshotId::from_u128(7 << 32),
            volume: "v".parse().unwrap(),
            name: "s".parse().unwrap(),
            created_unix_ms: 7,
            size,
            block_size: bs,
            labels: Default::default(),
            parent: None,
            stats: Default::default(),
            regions: Default::default(),
        };
        let vol = |cp: bool| VolumeRecord {
            name: "v".parse().unwrap(),
            image: "/i".into(),
            block_size: 4096,
            added_unix_ms: 1,
            upstream: None,
            source: None,
            checkpoint: cp.then(|| Checkpoint {
                bitmap: "holdfast-1".into(),
                snapshot: SnapshotId::from_u128(7 << 32),
                full_read_unix_ms: crate::now_unix_ms() - 60_000,
            }),
            regions: vec![],
            region: None,
        };
        let bitmap = |name: &str, flags: &[&str]| qemu::Bitmap {
            name: name.into(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
            granularity: 65536,
        };
        let good = [bitmap("other", &[]), bitmap("holdfast-1", &["auto"])];
        let full = FullRead::default();
        let why = |r: (Option<SnapshotRecord>, Option<String>)| {
            assert!(r.0.is_none(), "{r:?}");
            r.1.expect("a reason")
        };
        // Builds on the base.
        let (prev, why_not) = chain(&vol(true), &[base(1 << 20, 4096)], &good, 1 << 20, full);
        assert_eq!(prev.map(|p| p.id), Some(SnapshotId::from_u128(7 << 32)));
        assert_eq!(why_not, None);
        // A full read within its period still builds on the base.
        let hour = FullRead {
            now: false,
            every: Some(Duration::from_secs(3600)),
        };
        assert!(
            chain(&vol(true), &[base(1 << 20, 4096)], &good, 1 << 20, hour)
                .0
                .is_some()
        );
        type Chain = (Option<SnapshotRecord>, Option<String>);
        let cases: Vec<(&str, Chain)> = vec![
            (
                "no dirty bitmap yet",
                chain(&vol(false), &[base(1 << 20, 4096)], &good, 1 << 20, full),
            ),
            (
                "--full-read",
                chain(
                    &vol(true),
                    &[base(1 << 20, 4096)],
                    &good,
                    1 << 20,
                    FullRead {
                        now: true,
                        every: None,
                    },
                ),
            ),
            (
                "full_read_every = 30s",
                chain(
                    &vol(true),
                    &[base(1 << 20, 4096)],
                    &good,
                    1 << 20,
                    FullRead {
                        now: false,
                        every: Some(Duration::from_secs(30)),
                    },
                ),
            ),
            ("was deleted", chain(&vol(true), &[], &good, 1 << 20, full)),
            (
                "is missing",
                chain(
                    &vol(true),
                    &[base(1 << 20, 4096)],
                    &good[..1],
                    1 << 20,
                    full,
                ),
            ),
            (
                "inconsistent",
                chain(
                    &vol(true),
                    &[base(1 << 20, 4096)],
                    &[bitmap("holdfast-1", &["auto", "in-use"])],
                    1 << 20,
                    full,
                ),
            ),
            (
                "was disabled",
                chain(
                    &vol(true),
                    &[base(1 << 20, 4096)],
                    &[bitmap("holdfast-1", &[])],
                    1 << 20,
                    full,
                ),
            ),
            (
                "changed size (1048576 -> 2097152",
                chain(&vol(true), &[base(1 << 20, 4096)], &good, 2 << 20, full),
            ),
            (
                "block size changed",
                chain(&vol(true), &[base(1 << 20, 65536)], &good, 1 << 20, full),
            ),
        ];
        for (says, r) in cases {
            let w = why(r);
            assert!(w.contains(says), "{says}: {w}");
        }
    }
}
