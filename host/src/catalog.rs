//! The node catalog: volumes and the headers of committed snapshots, in an embedded redb
//! database inside the state directory.
//!
//! Why redb: every change here is a small ACID transaction (a crash leaves the old state or
//! the new one), lookups by name are indexed, and its multi-writer mode lets the daemon and
//! CLI commands share the file safely. The repository's manifests stay the data of record
//! for a snapshot's blocks; the catalog says which snapshots exist on this node, so a
//! snapshot becomes visible exactly when its catalog transaction commits.
//!
//! # Invariants
//! - A snapshot is in the catalog only after its manifest and every chunk it names are
//!   durable in the repository.
//! - Snapshot names are unique within a volume (checked inside the commit transaction).

use std::collections::BTreeMap;
use std::path::PathBuf;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{SnapshotId, SnapshotName, SnapshotRef, VolumeName, shorten};

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// Key: `volume/snapshot-id`; ids sort by creation time, so a range scan lists in order.
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// One entry, [`GC_KEY`]: what deletions left for gc (see [`GcState`]).
const GC: TableDefinition<&str, &[u8]> = TableDefinition::new("gc");
const GC_KEY: &str = "state";
/// The last [`PRUNED_KEPT`] deletions of each volume's snapshots, for the web page's timeline.
/// Key: `volume/deleted-unix-ms (20 digits)/snapshot-id`, so a volume's deletions list in order.
const PRUNED: TableDefinition<&str, &[u8]> = TableDefinition::new("pruned");
/// Deletions remembered per volume.
pub const PRUNED_KEPT: usize = 1000;

/// A deleted snapshot, as the deletion log remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Pruned {
    pub id: SnapshotId,
    pub name: SnapshotName,
    pub created_unix_ms: u64,
    pub deleted_unix_ms: u64,
}

/// What deletions have left for gc since it last ran, whatever deleted (retention, a mirror
/// applying its upstream's deletions, `snapshot delete`), and how the last gc went.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcState {
    /// Snapshots deleted since the last gc.
    pub deleted_snapshots: u64,
    /// What those snapshots added when they were taken or received (stored bytes): an
    /// estimate of what gc can free, high when later snapshots share their chunks.
    pub dead_bytes_estimate: u64,
    /// When the first of them was deleted.
    pub since_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<LastGc>,
    /// When the daemon's gc of each target it pushes to last finished, and what it did.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, TargetGcDone>,
}

/// The daemon's last gc of one target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetGcDone {
    pub finished_unix_ms: u64,
    pub summary: String,
}

/// A finished gc.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LastGc {
    pub finished_unix_ms: u64,
    pub millis: u64,
    pub bytes_freed: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    /// Dead bytes it left in packs that were not worth repacking.
    pub dead_bytes_kept: u64,
}

/// A registered volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolumeRecord {
    pub name: VolumeName,
    /// The raw image file or block device.
    pub image: PathBuf,
    pub block_size: u32,
    pub added_unix_ms: u64,
    /// Set on a replica: `mirror of NODE`. Its snapshots arrive from that upstream; it has
    /// no image of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Where the data comes from when it is not `image`: an NBD export or a QEMU image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::volume::SourceSpec>,
    /// The dirty bitmap that records what changed since a snapshot (QEMU images only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// The named parts of the volume a downstream may mirror alone (a local volume only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<crate::region::Region>,
    /// Set on a replica of one region of its upstream's volume: that region's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<crate::id::RegionName>,
}

/// A changed-block tracking checkpoint: the dirty bitmap `bitmap` was started before
/// `snapshot` read the volume, so it marks every block written since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Checkpoint {
    pub bitmap: String,
    pub snapshot: SnapshotId,
    /// When the chain last read the whole source (its first snapshot, or a later full read).
    #[serde(default)]
    pub full_read_unix_ms: u64,
}

impl VolumeRecord {
    /// A replica's record: its snapshots arrive from `marker` (`mirror of NODE`, or `seeded
    /// from target NAME`); it has no source of its own.
    pub fn replica(name: VolumeName, block_size: u32, marker: String) -> VolumeRecord {
        VolumeRecord {
            name,
            image: Default::default(),
            block_size,
            added_unix_ms: crate::now_unix_ms(),
            upstream: Some(marker),
            source: None,
            checkpoint: None,
            regions: vec![],
            region: None,
        }
    }

    /// A volume read from an image file or block device.
    pub fn image(name: VolumeName, image: std::path::PathBuf, block_size: u32) -> VolumeRecord {
        VolumeRecord {
            name,
            image,
            block_size,
            added_unix_ms: crate::now_unix_ms(),
            upstream: None,
            source: None,
            checkpoint: None,
            regions: vec![],
            region: None,
        }
    }

    /// Where the data comes from, for listings and messages.
    pub fn source_label(&self) -> String {
        match &self.source {
            None => self.image.display().to_string(),
            Some(crate::volume::SourceSpec::Nbd { uri }) => uri.clone(),
            Some(crate::volume::SourceSpec::Qcow2 { path }) => {
                format!("{} (qcow2)", path.display())
            }
            Some(crate::volume::SourceSpec::Qmp { monitor, node, .. }) => {
                format!("{node} of QEMU {}", monitor.display())
            }
        }
    }
}

/// What taking a snapshot cost, recorded with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotStats {
    pub blocks: u64,
    pub zero_blocks: u64,
    /// Chunks this snapshot added to the repository.
    pub new_chunks: u64,
    /// Plain bytes of those chunks.
    pub new_bytes: u64,
    /// Stored (compressed) bytes of those chunks.
    pub new_stored_bytes: u64,
}

/// A committed snapshot's header (its blocks are in the manifest in the repository).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub volume: VolumeName,
    pub name: SnapshotName,
    pub created_unix_ms: u64,
    pub size: u64,
    pub block_size: u32,
    /// (Bounded while a peer's listing is parsed: [`crate::id::with_label_budget`].)
    #[serde(default, deserialize_with = "crate::id::deserialize_labels")]
    pub labels: BTreeMap<String, String>,
    pub parent: Option<SnapshotId>,
    #[serde(default)]
    pub stats: SnapshotStats,
    /// Where each region of the volume lay in this snapshot. (Bounded like the labels.)
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "crate::id::deserialize_regions"
    )]
    pub regions: crate::region::RegionMap,
}

impl SnapshotRecord {
    /// `volume@name`, for messages.
    pub fn display_ref(&self) -> String {
        format!("{}@{}", self.volume, self.name)
    }
}

/// The gc state as stored; an unreadable one starts again from zero (with a warning), so
/// that it never stops a deletion, a gc, `status` or the metrics.
fn read_gc_state(bytes: Option<&[u8]>) -> GcState {
    match bytes.map(|b| decode::<GcState>(b, "gc state")) {
        None => GcState::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            tracing::warn!("{e}; counting what deletions leave for gc from zero");
            GcState::default()
        }
    }
}

fn snap_key(volume: &VolumeName, id: &SnapshotId) -> String {
    format!("{volume}/{id}")
}

/// The range of keys of one volume's snapshots ('0' is the byte after '/').
fn volume_range(volume: &VolumeName) -> (String, String) {
    (format!("{volume}/"), format!("{volume}0"))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(format!("catalog entry {what} is unreadable: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::internal(e.to_string()))
}

/// The catalog database.
#[derive(Debug)]
pub struct Catalog {
    db: redb::Database,
}

impl Catalog {
    /// Opens (or creates) the catalog in `file`, which the caller opened through cap-std.
    pub fn open_file(file: std::fs::File) -> Result<Self> {
        let backend = redb::backends::FileBackend::new(file)?;
        let db = redb::Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
            .create_with_backend(backend)?;
        let catalog = Catalog { db };
        catalog.ensure_tables()?;
        Ok(catalog)
    }

    /// Creates missing tables (on a new catalog, or one from an older holdfast), so read
    /// transactions never meet a missing table. Read-only commands write nothing.
    fn ensure_tables(&self) -> Result<()> {
        {
            let tx = self.db.begin_read()?;
            let present = |r: std::result::Result<_, redb::TableError>| match r {
                Ok(_) => Ok(true),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
                Err(e) => Err(Error::from(e)),
            };
            if present(tx.open_table(VOLUMES).map(drop))?
                && present(tx.open_table(SNAPSHOTS).map(drop))?
                && present(tx.open_table(GC).map(drop))?
                && present(tx.open_table(PRUNED).map(drop))?
            {
                return Ok(());
            }
        }
        let tx = self.db.begin_write()?;
        tx.open_table(VOLUMES)?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(GC)?;
        tx.open_table(PRUNED)?;
        tx.commit()?;
        Ok(())
    }

    pub fn db(&self) -> &redb::Database {
        &self.db
    }

    pub fn volume(&self, name: &VolumeName) -> Result<VolumeRecord> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VOLUMES)?;
        match t.get(name.as_str())? {
            Some(v) => decode(v.value(), name.as_str()),
            None => Err(Error::not_found(format!(
                "no volume named {name:?} on this node; `holdfast volume list` shows the \
                 registered volumes"
            ))),
        }
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(VOLUMES)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push(decode(v.value(), k.value())?);
        }
        Ok(out)
    }

    pub fn add_volume(&self, rec: &VolumeRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(VOLUMES)?;
            if t.get(rec.name.as_str())?.is_some() {
                return Err(Error::conflict(format!(
                    "a volume named {:?} is already registered; choose another name or \
                     `holdfast volume remove` it first",
                    rec.name.as_str()
                )));
            }
            t.insert(rec.name.as_str(), encode(rec)?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Changes a volume's record in one transaction (so a concurrent change of another field,
    /// a snapshot's checkpoint say, is not lost): `change` sees the record as it is now.
    pub fn modify_volume<T>(
        &self,
        name: &VolumeName,
        change: impl FnOnce(&mut VolumeRecord) -> Result<T>,
    ) -> Result<T> {
        let tx = self.db.begin_write()?;
        let out = {
            let mut t = tx.open_table(VOLUMES)?;
            let mut rec: VolumeRecord = match t.get(name.as_str())? {
                Some(v) => decode(v.value(), name.as_str())?,
                None => {
                    return Err(Error::not_found(format!(
                        "no volume named {name:?} on this node"
                    )));
                }
            };
            let out = change(&mut rec)?;
            t.insert(name.as_str(), encode(&rec)?.as_slice())?;
            out
        };
        tx.commit()?;
        Ok(out)
    }

    /// Rewrites a volume's record (its name must exist).
    pub fn update_volume(&self, rec: &VolumeRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(VOLUMES)?;
            if t.get(rec.name.as_str())?.is_none() {
                return Err(Error::not_found(format!(
                    "no volume named {:?}",
                    rec.name.as_str()
                )));
            }
            t.insert(rec.name.as_str(), encode(rec)?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn remove_volume(&self, name: &VolumeName) -> Result<VolumeRecord> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut vols = tx.open_table(VOLUMES)?;
            let snaps = tx.open_table(SNAPSHOTS)?;
            let (lo, hi) = volume_range(name);
            let n = snaps.range(lo.as_str()..hi.as_str())?.count();
            if n > 0 {
                return Err(Error::conflict(format!(
                    "volume {name:?} still has {n} snapshot(s); delete them first \
                     (`holdfast snapshot list {name}`)"
                )));
            }
            let Some(v) = vols.remove(name.as_str())? else {
                return Err(Error::not_found(format!(
                    "no volume named {name:?} on this node"
                )));
            };
            let rec = decode::<VolumeRecord>(v.value(), name.as_str())?;
            // A volume added again under this name starts with no deletions of its own.
            let mut pruned = tx.open_table(PRUNED)?;
            let keys: Vec<String> = pruned
                .range(lo.as_str()..hi.as_str())?
                .map(|e| e.map(|(k, _)| k.value().to_string()))
                .collect::<std::result::Result<_, _>>()?;
            for k in &keys {
                pruned.remove(k.as_str())?;
            }
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// The volume's snapshots, oldest first.
    pub fn snapshots(&self, volume: &VolumeName) -> Result<Vec<SnapshotRecord>> {
        self.of_volume(SNAPSHOTS, volume)
    }

    /// A table's entries of one volume (keys `volume/...`), in key order.
    fn of_volume<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        volume: &VolumeName,
    ) -> Result<Vec<T>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(table)?;
        let (lo, hi) = volume_range(volume);
        let mut out = Vec::new();
        for entry in t.range(lo.as_str()..hi.as_str())? {
            let (k, v) = entry?;
            out.push(decode(v.value(), k.value())?);
        }
        Ok(out)
    }

    /// Every snapshot on the node, by volume then age.
    pub fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push(decode(v.value(), k.value())?);
        }
        Ok(out)
    }

    /// Finds `VOLUME@SNAPSHOT`: by exact name, then exact id, then unique id prefix.
    pub fn resolve(&self, r: &SnapshotRef) -> Result<SnapshotRecord> {
        self.volume(&r.volume)?;
        let snaps = self.snapshots(&r.volume)?;
        resolve_in(&snaps, r)
    }

    /// Makes a snapshot visible. The volume must exist and the name must be free.
    pub fn commit_snapshot(&self, rec: &SnapshotRecord) -> Result<()> {
        self.commit_snapshots(std::slice::from_ref(rec))
    }

    /// Makes many snapshots visible in one transaction (a mirror committing a batch, an
    /// import). Each must satisfy what [`Catalog::commit_snapshot`] checks.
    pub fn commit_snapshots(&self, recs: &[SnapshotRecord]) -> Result<()> {
        self.commit(recs, false, None)
    }

    /// Commits a snapshot received into a replica. A replica follows its upstream, where
    /// identity is the id and a name may be reused (`daily-mon` rotates): a snapshot here that
    /// holds the name under another id (one the upstream deleted, kept here by a lock, say)
    /// moves aside to `NAME.ID` in the same transaction. Its locks, which name its id, hold on.
    pub fn commit_replica_snapshot(&self, rec: &SnapshotRecord) -> Result<()> {
        self.commit(std::slice::from_ref(rec), true, None)
    }

    /// Commits the first snapshot a mirror received into a replica together with the
    /// replica's record, in one transaction: a mirror creates nothing before everything the
    /// upstream sent has been checked, so a refused update leaves no empty replica whose
    /// block size or region a hostile first listing chose. The record is written when no
    /// volume of its name exists, or replaces a replica of the same upstream that holds no
    /// snapshot yet (one an older release made before a refusal); any other volume of the
    /// name is a conflict, and a replica that holds snapshots by now is kept as it is.
    pub fn commit_first_replica_snapshot(
        &self,
        volume: &VolumeRecord,
        rec: &SnapshotRecord,
    ) -> Result<()> {
        debug_assert_eq!(volume.name, rec.volume);
        self.commit(std::slice::from_ref(rec), true, Some(volume))
    }

    fn commit(
        &self,
        recs: &[SnapshotRecord],
        move_aside: bool,
        make: Option<&VolumeRecord>,
    ) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut vols = tx.open_table(VOLUMES)?;
            let mut t = tx.open_table(SNAPSHOTS)?;
            if let Some(make) = make {
                let (lo, hi) = volume_range(&make.name);
                let empty = t.range(lo.as_str()..hi.as_str())?.next().is_none();
                let now: Option<VolumeRecord> = match vols.get(make.name.as_str())? {
                    Some(v) => Some(decode(v.value(), make.name.as_str())?),
                    None => None,
                };
                let write = match now {
                    None => true,
                    // Holding snapshots, it was made by an earlier commit: it stays.
                    Some(v) if v.upstream.is_some() && v.upstream == make.upstream => empty,
                    Some(v) => {
                        return Err(Error::conflict(format!(
                            "volume {} appeared on this node while it was being mirrored ({}); \
                             a mirror writes only into its own replica, nothing was committed",
                            v.name,
                            v.upstream.clone().unwrap_or_else(|| format!(
                                "a local volume of {}",
                                v.source_label()
                            ))
                        )));
                    }
                };
                if write {
                    vols.insert(make.name.as_str(), encode(make)?.as_slice())?;
                }
            }
            let mut names: std::collections::HashSet<(String, String)> = Default::default();
            let mut loaded: std::collections::HashSet<&VolumeName> = Default::default();
            for rec in recs {
                if vols.get(rec.volume.as_str())?.is_none() {
                    return Err(Error::not_found(format!(
                        "volume {:?} does not exist (was it removed while the snapshot was \
                         being taken?)",
                        rec.volume.as_str()
                    )));
                }
                // The names already taken in this volume, read once per volume.
                if loaded.insert(&rec.volume) {
                    let (lo, hi) = volume_range(&rec.volume);
                    for entry in t.range(lo.as_str()..hi.as_str())? {
                        let (k, v) = entry?;
                        let other: SnapshotRecord = decode(v.value(), k.value())?;
                        names.insert((other.volume.to_string(), other.name.to_string()));
                    }
                }
                if move_aside && names.contains(&(rec.volume.to_string(), rec.name.to_string())) {
                    move_name_aside(&mut t, rec, &mut names)?;
                }
                if !names.insert((rec.volume.to_string(), rec.name.to_string())) {
                    return Err(Error::conflict(format!(
                        "volume {} already has a snapshot named {:?}; choose another --name",
                        rec.volume,
                        rec.name.as_str()
                    )));
                }
                t.insert(
                    snap_key(&rec.volume, &rec.id).as_str(),
                    encode(rec)?.as_slice(),
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Changes a snapshot's labels (metadata for applications and policies, e.g. an
    /// application marking a snapshot as copied). The snapshot's data and its manifest, which
    /// keeps the labels it was taken with, never change.
    pub fn set_labels(
        &self,
        volume: &VolumeName,
        id: &SnapshotId,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<SnapshotRecord> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            let key = snap_key(volume, id);
            let mut rec: SnapshotRecord = match t.get(key.as_str())? {
                Some(v) => decode(v.value(), &key)?,
                None => {
                    return Err(Error::not_found(format!(
                        "snapshot {volume}@{id} does not exist"
                    )));
                }
            };
            for k in remove {
                rec.labels.remove(k);
            }
            for (k, v) in set {
                rec.labels.insert(k.clone(), v.clone());
            }
            t.insert(key.as_str(), encode(&rec)?.as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Removes a snapshot from the catalog (the caller then deletes its manifest).
    /// `check` runs inside the write transaction, so a refusal (a soft lock) and the removal
    /// see the same state.
    pub fn remove_snapshot(
        &self,
        volume: &VolumeName,
        id: &SnapshotId,
        check: impl FnOnce(&redb::WriteTransaction, &SnapshotRecord) -> Result<()>,
    ) -> Result<SnapshotRecord> {
        let tx = self.db.begin_write()?;
        let rec = {
            let key = snap_key(volume, id);
            let rec: SnapshotRecord = {
                let t = tx.open_table(SNAPSHOTS)?;
                let Some(v) = t.get(key.as_str())? else {
                    return Err(Error::not_found(format!(
                        "snapshot {volume}@{id} does not exist (already deleted?)"
                    )));
                };
                decode(v.value(), &key)?
            };
            check(&tx, &rec)?;
            tx.open_table(SNAPSHOTS)?.remove(key.as_str())?;
            // What it leaves for gc, counted with the deletion itself.
            let mut gc = tx.open_table(GC)?;
            let mut state = read_gc_state(gc.get(GC_KEY)?.as_ref().map(|v| v.value()));
            state.deleted_snapshots += 1;
            state.dead_bytes_estimate += rec.stats.new_stored_bytes;
            state.since_unix_ms.get_or_insert_with(crate::now_unix_ms);
            gc.insert(GC_KEY, encode(&state)?.as_slice())?;
            log_pruned(&tx, &rec)?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// The volume's remembered deletions, oldest first (the last [`PRUNED_KEPT`]).
    pub fn pruned(&self, volume: &VolumeName) -> Result<Vec<Pruned>> {
        self.of_volume(PRUNED, volume)
    }

    /// What deletions have left for gc, and the last gc.
    pub fn gc_state(&self) -> Result<GcState> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(GC)?;
        Ok(read_gc_state(t.get(GC_KEY)?.as_ref().map(|v| v.value())))
    }

    /// Records the daemon's gc of a target.
    pub fn target_gc_done(&self, target: &str, done: TargetGcDone) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(GC)?;
            let mut state = read_gc_state(t.get(GC_KEY)?.as_ref().map(|v| v.value()));
            state.targets.insert(target.to_string(), done);
            t.insert(GC_KEY, encode(&state)?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a finished gc that started when the state was `counted`: what was counted
    /// then is done; deletions since stay for the next gc.
    pub fn gc_done(&self, counted: &GcState, last: LastGc) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(GC)?;
            let mut state = read_gc_state(t.get(GC_KEY)?.as_ref().map(|v| v.value()));
            state.deleted_snapshots = state
                .deleted_snapshots
                .saturating_sub(counted.deleted_snapshots);
            state.dead_bytes_estimate = state
                .dead_bytes_estimate
                .saturating_sub(counted.dead_bytes_estimate);
            if state.deleted_snapshots == 0 {
                state.dead_bytes_estimate = 0;
                state.since_unix_ms = None;
            } else if counted.deleted_snapshots > 0 {
                // Those left were deleted after the gc started.
                state.since_unix_ms = Some(last.finished_unix_ms.saturating_sub(last.millis));
            }
            state.last = Some(last);
            t.insert(GC_KEY, encode(&state)?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Renames the snapshot of `rec`'s volume that holds `rec`'s name under another id to
/// `NAME.ID` (the id's first 12 digits; the name cut to fit 255 bytes).
fn move_name_aside(
    t: &mut redb::Table<&str, &[u8]>,
    rec: &SnapshotRecord,
    names: &mut std::collections::HashSet<(String, String)>,
) -> Result<()> {
    let (lo, hi) = volume_range(&rec.volume);
    let mut holder: Option<SnapshotRecord> = None;
    for entry in t.range(lo.as_str()..hi.as_str())? {
        let (k, v) = entry?;
        let other: SnapshotRecord = decode(v.value(), k.value())?;
        if other.name == rec.name && other.id != rec.id {
            holder = Some(other);
            break;
        }
    }
    let Some(mut old) = holder else {
        return Ok(());
    };
    let suffix = format!(".{}", &old.id.to_string()[..12]);
    let mut base = old.name.as_str().to_string();
    while base.len() + suffix.len() > 255 {
        base.pop();
    }
    let new_name: SnapshotName = format!("{base}{suffix}").parse()?;
    tracing::info!(
        "{}@{} moves aside to {} ({}): the upstream reuses its name for snapshot {}",
        old.volume,
        old.name,
        new_name,
        old.id,
        rec.id
    );
    names.remove(&(old.volume.to_string(), old.name.to_string()));
    names.insert((old.volume.to_string(), new_name.to_string()));
    old.name = new_name;
    t.insert(
        snap_key(&old.volume, &old.id).as_str(),
        encode(&old)?.as_slice(),
    )?;
    Ok(())
}

/// Whether the snapshot is catalogued (inside a write transaction).
pub(crate) fn snapshot_exists(
    tx: &redb::WriteTransaction,
    volume: &VolumeName,
    id: &SnapshotId,
) -> Result<bool> {
    let t = tx.open_table(SNAPSHOTS)?;
    Ok(t.get(snap_key(volume, id).as_str())?.is_some())
}

/// Remembers a deletion in the deletion log, forgetting the volume's oldest beyond
/// [`PRUNED_KEPT`] (in the deletion's own transaction). Keyed by when it happened, never
/// before the newest entry: a clock that stepped back must not file it among the oldest.
fn log_pruned(tx: &redb::WriteTransaction, rec: &SnapshotRecord) -> Result<()> {
    let mut t = tx.open_table(PRUNED)?;
    let (lo, hi) = volume_range(&rec.volume);
    let newest = match t.range(lo.as_str()..hi.as_str())?.next_back() {
        Some(e) => decode::<Pruned>(e?.1.value(), "the deletion log")?.deleted_unix_ms,
        None => 0,
    };
    let at = crate::now_unix_ms().max(newest);
    let entry = Pruned {
        id: rec.id,
        name: rec.name.clone(),
        created_unix_ms: rec.created_unix_ms,
        deleted_unix_ms: at,
    };
    let key = format!("{}/{at:020}/{}", rec.volume, rec.id);
    t.insert(key.as_str(), encode(&entry)?.as_slice())?;
    let keys: Vec<String> = t
        .range(lo.as_str()..hi.as_str())?
        .map(|e| e.map(|(k, _)| k.value().to_string()))
        .collect::<std::result::Result<_, _>>()?;
    for old in keys.iter().take(keys.len().saturating_sub(PRUNED_KEPT)) {
        t.remove(old.as_str())?;
    }
    Ok(())
}

/// Resolution of a reference within one volume's snapshots (oldest first).
pub fn resolve_in(snaps: &[SnapshotRecord], r: &SnapshotRef) -> Result<SnapshotRecord> {
    let want = r.snapshot.as_str();
    if let Some(s) = snaps.iter().find(|s| s.name.as_str() == want) {
        return Ok(s.clone());
    }
    if let Some(s) = snaps.iter().find(|s| s.id.to_string() == want) {
        return Ok(s.clone());
    }
    if want.len() >= 4 && want.bytes().all(|b| b.is_ascii_hexdigit()) {
        let matches: Vec<_> = snaps
            .iter()
            .filter(|s| s.id.to_string().starts_with(want))
            .collect();
        match matches.len() {
            1 => return Ok(matches[0].clone()),
            n if n > 1 => {
                return Err(Error::invalid(format!(
                    "{}@{want} is ambiguous: {n} snapshot ids start with it; give more digits",
                    r.volume
                )));
            }
            _ => {}
        }
    }
    Err(Error::not_found(format!(
        "volume {} has no snapshot named or with id {:?}; `holdfast snapshot list {}` shows them",
        r.volume,
        shorten(want),
        r.volume
    )))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A catalog in `dir` (for the tests of the modules that live in its database too).
    pub(crate) fn catalog(dir: &tempfile::TempDir) -> Catalog {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("catalog.redb"))
            .unwrap();
        Catalog::open_file(f).unwrap()
    }

    fn snap(volume: &str, i: u64, block_size: u32) -> SnapshotRecord {
        SnapshotRecord {
            id: SnapshotId::generate(1_000 + i),
            volume: volume.parse().unwrap(),
            name: format!("s{i}").parse().unwrap(),
            created_unix_ms: 1_000 + i,
            size: 1 << 20,
            block_size,
            labels: Default::default(),
            parent: None,
            stats: Default::default(),
            regions: Default::default(),
        }
    }

    #[test]
    fn deletions_are_remembered_per_volume_the_newest_few_and_go_with_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(&dir);
        for v in ["vm", "other"] {
            c.add_volume(&VolumeRecord::image(v.parse().unwrap(), "/x".into(), 4096))
                .unwrap();
        }
        let vm: VolumeName = "vm".parse().unwrap();
        let n = PRUNED_KEPT as u64 + 3;
        let snaps: Vec<SnapshotRecord> = (0..n).map(|i| snap("vm", i, 4096)).collect();
        c.commit_snapshots(&snaps).unwrap();
        c.commit_snapshot(&snap("other", 0, 4096)).unwrap();
        for r in &snaps {
            c.remove_snapshot(&vm, &r.id, |_, _| Ok(())).unwrap();
        }
        let pruned = c.pruned(&vm).unwrap();
        assert_eq!(pruned.len(), PRUNED_KEPT, "the log is bounded");
        // The oldest deletions went; the newest stay, in order.
        assert_eq!(pruned[0].id, snaps[3].id);
        assert_eq!(pruned.last().unwrap().id, snaps.last().unwrap().id);
        assert_eq!(pruned[0].name, snaps[3].name);
        assert_eq!(pruned[0].created_unix_ms, snaps[3].created_unix_ms);
        assert!(c.pruned(&"other".parse().unwrap()).unwrap().is_empty());
        // A volume removed and added again starts with no deletions of its own.
        c.remove_volume(&vm).unwrap();
        assert!(c.pruned(&vm).unwrap().is_empty());
    }

    #[test]
    fn a_replica_is_made_with_its_first_snapshot_and_an_empty_one_is_made_again() {
        // An empty replica an older release left behind (4 KiB, region r1) is made again as
        // the first snapshot's record says; later commits keep the replica as it is.
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(&dir);
        let v: VolumeName = "vm1".parse().unwrap();
        let mut old = VolumeRecord::replica(v.clone(), 4096, "mirror of a".into());
        old.region = Some("r1".parse().unwrap());
        c.add_volume(&old).unwrap();
        let made = VolumeRecord::replica(v.clone(), 65536, "mirror of a".into());
        c.commit_first_replica_snapshot(&made, &snap("vm1", 1, 65536))
            .unwrap();
        let now = c.volume(&v).unwrap();
        assert_eq!((now.block_size, now.region), (65536, None));
        let other = VolumeRecord::replica(v.clone(), 4096, "mirror of a".into());
        c.commit_first_replica_snapshot(&other, &snap("vm1", 2, 65536))
            .unwrap();
        assert_eq!(c.volume(&v).unwrap().block_size, 65536);
        assert_eq!(c.snapshots(&v).unwrap().len(), 2);
    }

    #[test]
    fn a_first_replica_snapshot_never_lands_in_another_volume() {
        // A local volume (or another upstream's replica) of the name, even without snapshots,
        // is a conflict: nothing is committed and its record stays.
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(&dir);
        let v: VolumeName = "vm1".parse().unwrap();
        c.add_volume(&VolumeRecord::image(v.clone(), "/x.img".into(), 4096))
            .unwrap();
        let made = VolumeRecord::replica(v.clone(), 65536, "mirror of a".into());
        let e = c
            .commit_first_replica_snapshot(&made, &snap("vm1", 1, 65536))
            .unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
        assert!(c.snapshots(&v).unwrap().is_empty());
        assert_eq!(c.volume(&v).unwrap().upstream, None);
        let w: VolumeName = "vm2".parse().unwrap();
        c.add_volume(&VolumeRecord::replica(
            w.clone(),
            4096,
            "mirror of b".into(),
        ))
        .unwrap();
        let made = VolumeRecord::replica(w.clone(), 65536, "mirror of a".into());
        assert!(
            c.commit_first_replica_snapshot(&made, &snap("vm2", 1, 65536))
                .is_err()
        );
        assert_eq!(c.volume(&w).unwrap().block_size, 4096);
    }
}
