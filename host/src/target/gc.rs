//! Space reclamation inside a target, in two phases and without any lock between nodes.
//!
//! A gc **condemns** the packs that no manifest references and that are older than the grace
//! period (one create-only record under `gc/condemned/` listing them), and **deletes** the
//! packs that a record at least the grace period old condemned and that are still
//! unreferenced. A condemned pack is condemned for good: no push relies on it from the moment
//! it can see the record (it stores those chunks again in new packs), and every push checks
//! that, after writing its manifest, before it reports success (`pending.rs`). Pack names are
//! never written twice (salted), so a deletion decided long ago cannot hit a newer object.
//! Why this is safe whatever runs slowly, pauses or crashes is argued in `host/TARGETS.md`.
//!
//! Keys: `gc/condemned/NODE-RANDOM` (JSON [`CondemnedRecord`]), `gc/cleared/NODE-RANDOM` (the
//! record's packs are all gone; the record is removed a grace period later), and
//! `gc/clock/NODE-RANDOM` (a probe written and deleted to read the store's clock).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{ChunkId, NodeId, PackId};
use crate::repo::Repository;
use crate::repo::pack::PackIndex;
use crate::snapshot::Manifest;

use super::pending::{self, PendingPush};

/// Records of condemned packs.
pub const CONDEMNED: &str = "gc/condemned";
/// Markers: every pack of the record of the same name is gone.
pub const CLEARED: &str = "gc/cleared";
/// Probes written to read the store's clock.
const CLOCK: &str = "gc/clock";
/// Leases written by releases before target format 3 (`leases/push-…`, `leases/gc-…`).
const LEGACY_LEASES: &str = "leases";
/// How long such a lease lasted.
const LEGACY_LEASE_MS: u64 = 3_600_000;
/// The default grace period.
const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// How long a condemned pack waits before a gc may delete it, and how old an unreferenced pack
/// must be before a gc condemns it: `HOLDFAST_TARGET_GRACE` (a duration, `1h` by default).
/// It must exceed how late the store's listings may show a write or a delete; pushes and gcs
/// may take any time whatever it is. Tests set it to seconds.
pub fn grace() -> Result<Duration> {
    grace_of(std::env::var("HOLDFAST_TARGET_GRACE").ok().as_deref())
}

/// The grace period `HOLDFAST_TARGET_GRACE` sets when it is `setting`.
fn grace_of(setting: Option<&str>) -> Result<Duration> {
    match setting {
        Some(v) => crate::config::parse_duration("HOLDFAST_TARGET_GRACE", v),
        None => Ok(DEFAULT_GRACE),
    }
}

/// The store's clock, now, in unix ms: the modification time of a probe object written for
/// the purpose (then deleted). Ages of objects are judged by this clock only, never by the
/// node's: a node whose clock is hours off still judges them right.
pub async fn server_now(repo: &Repository, me: &NodeId) -> Result<u64> {
    let key = format!("{CLOCK}/{me}-{:016x}", rand::random::<u64>());
    repo.put_object(&key, Vec::new()).await?;
    let t = listed_time(repo, CLOCK, &key).await;
    repo.delete_object(&key).await?;
    t
}

/// The store's modification time of `key`, just written under the folder `dir`, from a
/// listing: an error (never the node's clock) if the listing does not show it.
pub async fn listed_time(repo: &Repository, dir: &str, key: &str) -> Result<u64> {
    // (A listing's prefix is a folder: list the probes' folder and find ours.)
    repo.list_objects(dir)
        .await?
        .into_iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, _, t)| t)
        .ok_or_else(|| Error::Unavailable {
            message: format!(
                "{} does not list an object just written ({key}); its listings lag its writes, \
                 which holdfast cannot work with (gc, and the ages `target check` reports, go \
                 by the store's clock)",
                repo.location()
            ),
            source: None,
        })
}

/// A gc's record of the packs it condemned (`gc/condemned/NODE-RANDOM`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CondemnedRecord {
    pub written_by: NodeId,
    pub packs: Vec<PackId>,
}

/// One record as listed: its key, its name under `gc/condemned/`, the store's time of it.
#[derive(Clone, Debug)]
struct Listed {
    key: String,
    name: String,
    modified_unix_ms: u64,
    packs: Vec<PackId>,
}

/// Largest record read: far above a record of a million packs (about 70 MB of JSON would be
/// a gc of 16 TiB at once), and a bound on what a bogus object can make every push read.
const MAX_RECORD_BYTES: u64 = 128 << 20;

async fn read_record(repo: &Repository, key: &str, size: u64) -> Result<Option<Vec<PackId>>> {
    if size > MAX_RECORD_BYTES {
        return Err(Error::corrupt(format!(
            "gc record {key} in {} is {size} bytes, more than any gc writes; if no holdfast \
             wrote it, delete it",
            repo.location()
        )));
    }
    let Some(raw) = repo.get_object(key).await? else {
        return Ok(None); // removed since it was listed: its packs are gone
    };
    parse_condemned(&raw, &format!("{key} in {}", repo.location())).map(Some)
}

/// A gc record's bytes: the packs it condemned (`what` names where they were read).
pub fn parse_condemned(raw: &[u8], what: &str) -> Result<Vec<PackId>> {
    let rec: CondemnedRecord = serde_json::from_slice(raw).map_err(|e| {
        Error::corrupt(format!(
            "gc record {what} is unreadable ({e}): no push or gc can tell which packs it \
             condemned; if no holdfast wrote it, delete it"
        ))
    })?;
    Ok(rec.packs)
}

/// The condemned packs as a push sees them, read again as records appear. Records never
/// change, so each is read once; one that is no longer listed was removed after all its
/// packs were gone.
#[derive(Debug, Default)]
pub struct Condemned {
    records: HashMap<String, Vec<PackId>>,
    packs: HashSet<PackId>,
}

impl Condemned {
    /// Lists the records and reads the new ones.
    pub async fn refresh(&mut self, repo: &Repository) -> Result<()> {
        let listed = repo.list_objects(CONDEMNED).await?;
        let keys: HashSet<&str> = listed.iter().map(|(k, _, _)| k.as_str()).collect();
        let before = self.records.len();
        self.records.retain(|k, _| keys.contains(k.as_str()));
        let mut changed = before != self.records.len();
        for (key, size, _) in &listed {
            if self.records.contains_key(key) {
                continue;
            }
            if let Some(packs) = read_record(repo, key, *size).await? {
                self.records.insert(key.clone(), packs);
                changed = true;
            }
        }
        if changed {
            self.packs = self.records.values().flatten().copied().collect();
        }
        Ok(())
    }

    pub fn contains(&self, pack: &PackId) -> bool {
        self.packs.contains(pack)
    }
}

/// What a gc of a target did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetGcReport {
    pub dry_run: bool,
    /// The grace period (`HOLDFAST_TARGET_GRACE`).
    pub grace_seconds: u64,
    /// Manifests read (committed and pending snapshots).
    pub snapshots: usize,
    pub live_chunks: usize,
    /// Packs this run condemned (deleted by a gc at least the grace period later).
    pub packs_condemned: usize,
    pub bytes_condemned: u64,
    /// Packs deleted: condemned at least the grace period ago and still unreferenced.
    pub packs_deleted: usize,
    pub bytes_freed: u64,
    /// Condemned packs not yet the grace period old, this run's included.
    pub packs_waiting: usize,
    pub bytes_waiting: u64,
    /// When (by the store's clock, unix ms) the waiting packs may be deleted by a gc.
    pub next_deletion_unix_ms: Option<u64>,
    /// Condemned packs that a snapshot still references (one committed meanwhile, or one a
    /// listing missed): kept, and never used again by pushes.
    pub packs_condemned_but_live: usize,
    /// Packs with live and dead chunks (gc never rewrites data in a target).
    pub packs_kept_partly_live: usize,
    /// Unreferenced packs younger than the grace period (condemned by a later gc).
    pub packs_too_young: usize,
    /// Packs whose index and trailer are both unreadable: what they hold cannot be told, so
    /// they are neither condemned nor deleted (a store that damages what it returns must not
    /// make gc delete a live pack).
    pub packs_unreadable: usize,
    /// Records whose packs are all gone, removed.
    pub records_removed: usize,
    /// Pushes that wrote an intent and have not finished (see `target check`).
    pub pending_pushes: Vec<PendingPush>,
}

/// Reclaims space in a target: removes finished records, deletes what was condemned at least
/// the grace period ago and is still unreferenced, and condemns what is unreferenced now.
/// Takes no lease and waits for nothing: pushes and other gcs may run at the same time.
pub async fn gc(repo: &Repository, me: &NodeId, dry_run: bool) -> Result<TargetGcReport> {
    gc_with_grace(repo, me, dry_run, grace()?).await
}

/// [`gc`] with a given grace period.
pub async fn gc_with_grace(
    repo: &Repository,
    me: &NodeId,
    dry_run: bool,
    grace: Duration,
) -> Result<TargetGcReport> {
    if dry_run {
        repo.check().await?;
    } else {
        repo.check_for_writing().await?;
    }
    // A dry run writes nothing, not even the clock probe: it judges ages by this node's clock.
    let now = if dry_run {
        crate::now_unix_ms()
    } else {
        server_now(repo, me).await?
    };
    refuse_legacy_leases(repo, now).await?;
    let mut plan = GcPlan::compute(repo, me, now, grace).await?;
    if dry_run {
        plan.report.dry_run = true;
        return Ok(plan.report);
    }
    crate::pause_point("target-gc-decided");
    plan.execute(repo).await
}

/// What one gc run decided, from what it read at the store's time `now`; [`GcPlan::execute`]
/// does it. Between the two, any time may pass (a paused process): the decisions stay safe,
/// because what they delete was condemned a grace period before the manifests were read, and
/// nothing relies on a condemned pack (`host/TARGETS.md`).
#[derive(Debug)]
pub struct GcPlan {
    pub report: TargetGcReport,
    me: NodeId,
    /// Finished records to remove: (record key, marker key).
    remove: Vec<(String, String)>,
    /// Markers whose record is gone (a removal stopped between its two deletes).
    stray_markers: Vec<String>,
    /// Condemned a grace period ago and still unreferenced.
    delete: Vec<PackId>,
    /// Markers to write: every pack of these records is gone once `delete` is done.
    clear: Vec<String>,
    /// Unreferenced, older than the grace period, in no record yet.
    condemn: Vec<PackId>,
    /// Index objects whose pack is gone, older than the grace period: nothing can read
    /// through them (readers and pushes use only listed packs).
    dangling: Vec<PackId>,
    /// Clock and write probes left by runs that stopped, older than the grace period.
    stale_probes: Vec<String>,
}

impl GcPlan {
    /// Reads the records, every manifest, the indexes and the packs, and decides.
    pub async fn compute(
        repo: &Repository,
        me: &NodeId,
        now: u64,
        grace: Duration,
    ) -> Result<GcPlan> {
        let grace_ms = grace.as_millis() as u64;
        let mut plan = GcPlan {
            report: TargetGcReport {
                grace_seconds: grace.as_secs(),
                ..Default::default()
            },
            me: me.clone(),
            remove: vec![],
            stray_markers: vec![],
            delete: vec![],
            clear: vec![],
            condemn: vec![],
            dangling: vec![],
            stale_probes: vec![],
        };
        let report = &mut plan.report;
        let records = records(repo).await?;
        let cleared: HashMap<String, u64> = repo
            .list_objects(CLEARED)
            .await?
            .into_iter()
            .filter_map(|(k, _, t)| Some((k.strip_prefix(&format!("{CLEARED}/"))?.to_string(), t)))
            .collect();

        // 1. Records whose packs were all gone at least a grace period ago: no push can still
        //    list one of their packs, so the record has done its work.
        let names: HashSet<String> = records.iter().map(|r| r.name.clone()).collect();
        let mut open_records = Vec::new();
        for r in records {
            match cleared.get(&r.name) {
                Some(&t) if t + grace_ms <= now => {
                    plan.remove
                        .push((r.key.clone(), format!("{CLEARED}/{}", r.name)));
                    report.records_removed += 1;
                }
                Some(_) => {} // cleared recently: wait
                None => open_records.push(r),
            }
        }
        plan.stray_markers = cleared
            .keys()
            .filter(|n| !names.contains(*n))
            .map(|n| format!("{CLEARED}/{n}"))
            .collect();

        // 2. What is live: every manifest, committed or pending. Listed after `now`, so after
        //    every record that is a grace period old was visible.
        let mut live: HashSet<ChunkId> = HashSet::new();
        let manifests = pending::listed_manifests(repo).await?;
        for (v, id) in &manifests {
            let Some(raw) = pending::manifest_if_present(repo, v, id).await? else {
                continue; // pruned since the listing
            };
            // A manifest that cannot be read could reference anything: stop before deleting.
            let m = Manifest::decode(&raw, &format!("{v}@{id} in {}", repo.location()))?;
            live.extend(m.blocks.ids().iter().copied());
        }
        report.snapshots = manifests.len();
        report.live_chunks = live.len();
        let indexes = repo.index_listing().await?;
        let packs = repo.pack_listing().await?;
        let mut entries = Entries::default();
        let size = |p: &PackId| packs.get(p).map_or(0, |i| i.size);

        // 3. Delete what was condemned at least a grace period ago and is still unreferenced.
        let condemned: HashSet<PackId> =
            open_records.iter().flat_map(|r| r.packs.clone()).collect();
        let mut waiting = BTreeMap::new();
        let mut deleting = HashSet::new();
        let mut unreadable = HashSet::new();
        for r in &open_records {
            if r.modified_unix_ms + grace_ms > now {
                for p in &r.packs {
                    if packs.contains_key(p) || indexes.contains_key(p) {
                        waiting.insert(*p, size(p));
                    }
                }
                let at = r.modified_unix_ms + grace_ms;
                report.next_deletion_unix_ms =
                    Some(report.next_deletion_unix_ms.map_or(at, |t| t.min(at)));
                continue;
            }
            let mut all_gone = true;
            for p in &r.packs {
                if !packs.contains_key(p) && !indexes.contains_key(p) {
                    continue;
                }
                let is_live = entries
                    .of(repo, p, &indexes, &packs)
                    .await?
                    .map(|c| c.iter().any(|e| live.contains(&e.id)));
                if is_live.is_none() && !entries.found_missing.contains(p) {
                    // What it holds cannot be told: kept (it may be live), for an operator.
                    all_gone = false;
                    unreadable.insert(*p);
                    continue;
                }
                if is_live == Some(true) {
                    all_gone = false;
                    report.packs_condemned_but_live += 1;
                    continue;
                }
                if deleting.insert(*p) {
                    plan.delete.push(*p);
                    report.packs_deleted += 1;
                    report.bytes_freed += size(p);
                }
            }
            if all_gone {
                plan.clear.push(format!("{CLEARED}/{}", r.name));
            }
        }

        // 4. Condemn what is unreferenced now and older than the grace period. (Condemning is
        //    safe even when a listing missed a manifest: a condemned pack that turns out to be
        //    referenced is kept, and pushes only stop relying on it.)
        let mut candidates: Vec<PackId> = packs.keys().chain(indexes.keys()).copied().collect();
        candidates.sort();
        candidates.dedup();
        for p in candidates {
            if condemned.contains(&p) {
                continue;
            }
            if let (None, Some(index)) = (packs.get(&p), indexes.get(&p)) {
                // An index whose pack is gone (a push wrote it after a gc deleted the pack):
                // whatever it names, no chunk can be read through it.
                if index.modified_unix_ms + grace_ms <= now {
                    plan.dangling.push(p);
                }
                continue;
            }
            let Some(chunks) = entries.of(repo, &p, &indexes, &packs).await? else {
                // Unreadable, or gone since the listing (another gc deleted it).
                if !entries.found_missing.contains(&p) {
                    unreadable.insert(p);
                }
                continue;
            };
            let live_chunks = chunks.iter().filter(|e| live.contains(&e.id)).count();
            if live_chunks > 0 {
                if live_chunks < chunks.len() {
                    report.packs_kept_partly_live += 1;
                }
                continue;
            }
            // The youngest of the pack and its index: a push writes the index after the pack.
            let written = [packs.get(&p), indexes.get(&p)]
                .into_iter()
                .flatten()
                .map(|i| i.modified_unix_ms)
                .max()
                .unwrap_or(0);
            if written + grace_ms > now {
                report.packs_too_young += 1;
                continue;
            }
            plan.condemn.push(p);
            waiting.insert(p, size(&p));
        }
        if !plan.condemn.is_empty() {
            report.packs_condemned = plan.condemn.len();
            report.bytes_condemned = plan.condemn.iter().map(&size).sum();
            let at = now + grace_ms;
            report.next_deletion_unix_ms =
                Some(report.next_deletion_unix_ms.map_or(at, |t| t.min(at)));
        }
        report.packs_unreadable = unreadable.len();
        if report.packs_unreadable > 0 {
            tracing::warn!(
                target_url = repo.location(),
                packs = report.packs_unreadable,
                "packs whose index and trailer are both unreadable are kept: what they hold \
                 cannot be told; `holdfast verify --target` names the snapshots they damage"
            );
        }
        report.packs_waiting = waiting.len();
        report.bytes_waiting = waiting.values().sum();
        report.pending_pushes = pending::pending_pushes(repo, now).await?;
        for prefix in [CLOCK, "probe"] {
            for (key, _, t) in repo.list_objects(prefix).await? {
                if t + grace_ms <= now {
                    plan.stale_probes.push(key);
                }
            }
        }
        Ok(plan)
    }

    /// Does what was decided: removes finished records (record, then marker), deletes the
    /// packs (each index, then its pack), marks cleared records, and writes the new record.
    pub async fn execute(self, repo: &Repository) -> Result<TargetGcReport> {
        for (record, marker) in &self.remove {
            repo.delete_object(record).await?;
            repo.delete_object(marker).await?;
        }
        for marker in &self.stray_markers {
            repo.delete_object(marker).await?;
        }
        for p in &self.delete {
            repo.delete_pack(p).await?;
        }
        for p in &self.dangling {
            repo.delete_index(p).await?;
        }
        for key in &self.stale_probes {
            repo.delete_object(key).await?;
        }
        for marker in &self.clear {
            repo.put_object_if_absent(marker, Vec::new()).await?;
        }
        if !self.condemn.is_empty() {
            let rec = CondemnedRecord {
                written_by: self.me.clone(),
                packs: self.condemn,
            };
            let key = format!("{CONDEMNED}/{}-{:016x}", self.me, rand::random::<u64>());
            let body = serde_json::to_vec(&rec).map_err(|e| Error::internal(e.to_string()))?;
            repo.put_object_if_absent(&key, body).await?;
        }
        let r = self.report;
        tracing::info!(
            target_url = repo.location(),
            condemned = r.packs_condemned,
            deleted = r.packs_deleted,
            bytes_freed = r.bytes_freed,
            waiting = r.packs_waiting,
            "target gc"
        );
        Ok(r)
    }
}

/// Every record under `gc/condemned/`, oldest first.
async fn records(repo: &Repository) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    for (key, size, t) in repo.list_objects(CONDEMNED).await? {
        let Some(name) = key
            .strip_prefix(&format!("{CONDEMNED}/"))
            .map(str::to_string)
        else {
            continue;
        };
        if let Some(packs) = read_record(repo, &key, size).await? {
            out.push(Listed {
                key,
                name,
                modified_unix_ms: t,
                packs,
            });
        }
    }
    out.sort_by_key(|r| r.modified_unix_ms);
    Ok(out)
}

/// A gc of this release must not run beside a push of a release before target format 3,
/// which relies on leases. (Such a release refuses a format-3 target, so only one that
/// started before the first push or gc of this release can be running.)
async fn refuse_legacy_leases(repo: &Repository, now: u64) -> Result<()> {
    for (key, _, t) in repo.list_objects(LEGACY_LEASES).await? {
        if t + LEGACY_LEASE_MS > now {
            return Err(Error::Unavailable {
                message: format!(
                    "{key} in {} was written by an older holdfast {} min ago: a push or gc of \
                     that release may still be running. Upgrade every node that uses this \
                     target; gc proceeds once the lease is an hour old (or deleted by the \
                     operator who knows that node is stopped)",
                    repo.location(),
                    now.saturating_sub(t) / 60_000
                ),
                source: None,
            });
        }
    }
    Ok(())
}

/// The chunks of packs, read once each: from the index object, else (a pack whose index is
/// missing or unreadable: a gc or push stopped between the two) from the pack's trailer.
/// `None` when neither can be read: gc keeps such a pack, since it cannot tell what it holds.
#[derive(Default)]
struct Entries {
    known: HashMap<PackId, Option<Vec<crate::repo::pack::PackEntry>>>,
    /// Packs that were gone when read (another gc deleted them since the listing).
    found_missing: HashSet<PackId>,
}

impl Entries {
    async fn of(
        &mut self,
        repo: &Repository,
        p: &PackId,
        indexes: &HashMap<PackId, crate::repo::ObjectInfo>,
        packs: &HashMap<PackId, crate::repo::ObjectInfo>,
    ) -> Result<Option<&[crate::repo::pack::PackEntry]>> {
        if !self.known.contains_key(p) {
            let mut found: Option<PackIndex> = None;
            if indexes.contains_key(p) {
                match repo.read_index(p).await {
                    Ok(pi) => found = Some(pi),
                    Err(Error::Corrupt(m)) => tracing::warn!("{m}; reading its pack's trailer"),
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            if found.is_none() && !packs.contains_key(p) {
                self.found_missing.insert(*p);
            }
            if found.is_none()
                && let Some(info) = packs.get(p)
            {
                match repo.read_pack_trailer(p, info.size).await {
                    Ok(pi) => found = Some(pi),
                    Err(Error::Corrupt(m)) => tracing::warn!("{m}"),
                    Err(Error::NotFound(_)) => {
                        self.found_missing.insert(*p);
                    }
                    Err(e) => return Err(e),
                }
            }
            self.known.insert(*p, found.map(|pi| pi.entries));
        }
        Ok(self.known[p].as_deref())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use indicatif::ProgressBar;
    use object_store::memory::InMemory;

    use super::*;
    use crate::chunk;
    use crate::id::SnapshotId;
    use crate::repo::pack::PackBuilder;
    use crate::repo::{ChunkIndex, TARGET_FORMAT_VERSION};
    use crate::target::pending::{Confirmed, PushView, confirm};

    const BS: usize = 4096;

    async fn repo(version: u32) -> Repository {
        let r = Repository::from_store(Arc::new(InMemory::new()), "mem://t")
            .with_format_version(version);
        r.init().await.unwrap();
        r
    }

    fn block(seed: u8) -> Vec<u8> {
        (0..BS)
            .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
            .collect()
    }

    /// Stores `seeds`' blocks as one pack (salted, as in a target); returns the pack and ids.
    async fn store(repo: &Repository, seeds: &[u8], salted: bool) -> (PackId, Vec<ChunkId>) {
        let mut b = if salted {
            PackBuilder::salted()
        } else {
            PackBuilder::new()
        };
        let mut ids = Vec::new();
        for &s in seeds {
            let data = block(s);
            let (enc, stored) = chunk::encode(&data).unwrap();
            let id = chunk::hash(&data);
            b.add(id, enc, &stored, data.len());
            ids.push(id);
        }
        let p = b.finish().unwrap();
        repo.put_pack(&p).await.unwrap();
        (p.index.pack, ids)
    }

    fn manifest(ids: &[ChunkId]) -> Manifest {
        Manifest {
            format: 2,
            id: SnapshotId::generate(crate::now_unix_ms()),
            volume: "v".parse().unwrap(),
            name: "s".parse().unwrap(),
            created_unix_ms: 1,
            size: (ids.len() * BS) as u64,
            block_size: BS as u32,
            labels: Default::default(),
            parent: None,
            blocks: ids.iter().copied().map(Some).collect(),
        }
    }

    async fn commit(repo: &Repository, m: &Manifest) {
        repo.put_manifest(&m.volume, &m.id, m.encode().unwrap())
            .await
            .unwrap();
    }

    /// Every chunk of `ids` reads back from `repo` and matches its id.
    async fn readable(repo: &Repository, ids: &[ChunkId]) -> bool {
        let (index, _) = repo.load_index().await.unwrap();
        if !ids.iter().all(|id| index.contains(id)) {
            return false;
        }
        match repo.read_chunks(&index, ids).await {
            Ok(read) => ids.iter().zip(read).all(|(id, (loc, data))| {
                chunk::decode(id, loc.encoding, &data, loc.raw_length as usize).is_ok()
            }),
            Err(_) => false,
        }
    }

    fn me() -> NodeId {
        "n1".parse().unwrap()
    }

    fn gone() -> NodeId {
        "gone".parse().unwrap()
    }

    async fn run(repo: &Repository, grace: Duration) -> TargetGcReport {
        gc_with_grace(repo, &me(), false, grace).await.unwrap()
    }

    #[test]
    fn the_grace_period_is_an_hour_unless_set() {
        assert_eq!(grace_of(None).unwrap(), Duration::from_secs(3600));
        assert_eq!(grace_of(Some("5s")).unwrap(), Duration::from_secs(5));
        let e = grace_of(Some("soon")).unwrap_err().to_string();
        assert!(e.contains("HOLDFAST_TARGET_GRACE"), "{e}");
    }

    #[tokio::test]
    async fn unreferenced_packs_are_condemned_then_deleted_by_a_later_gc() {
        // One gc condemns an unreferenced pack, the next (once the record is a grace period
        // old) deletes it and marks the record cleared, a third removes the record; a
        // referenced pack is never touched; a young pack is left for later.
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (_, live) = store(&t, &[1, 2], true).await;
        commit(&t, &manifest(&live)).await;
        let (dead, _) = store(&t, &[3], true).await;
        let r = run(&t, Duration::from_secs(3600)).await;
        assert_eq!((r.packs_condemned, r.packs_too_young), (0, 1), "{r:?}");
        let r = run(&t, Duration::ZERO).await;
        assert_eq!((r.packs_condemned, r.packs_deleted), (1, 0), "{r:?}");
        assert!(t.pack_listing().await.unwrap().contains_key(&dead));
        let size = t.pack_listing().await.unwrap()[&dead].size;
        // Condemned a moment ago: a gc with an hour's grace waits, and says until when.
        let r = run(&t, Duration::from_secs(3600)).await;
        assert_eq!((r.packs_deleted, r.packs_waiting), (0, 1), "{r:?}");
        let at = r.next_deletion_unix_ms.expect("when the pack may go");
        let now = crate::now_unix_ms();
        assert!(at > now + 3_500_000 && at <= now + 3_600_000, "{r:?}");
        // Its grace over (5 ms here, by the store's clock), it goes.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = run(&t, Duration::from_millis(5)).await;
        assert_eq!(
            (r.packs_condemned, r.packs_deleted, r.bytes_freed),
            (0, 1, size),
            "{r:?}"
        );
        assert!(!t.pack_listing().await.unwrap().contains_key(&dead));
        assert!(!t.index_listing().await.unwrap().contains_key(&dead));
        // The record stays a grace period after its packs went (a push may still list one),
        // and so does the marker that says they went.
        let r = run(&t, Duration::from_secs(3600)).await;
        assert_eq!((r.records_removed, r.grace_seconds), (0, 3600), "{r:?}");
        assert_eq!(t.list_objects(CLEARED).await.unwrap().len(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = run(&t, Duration::from_millis(5)).await;
        assert_eq!(r.records_removed, 1, "{r:?}");
        assert!(t.list_objects("gc").await.unwrap().is_empty());
        assert!(readable(&t, &live).await);
    }

    #[tokio::test]
    async fn a_record_is_read_within_its_bound_and_forgotten_once_removed() {
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (dead, _) = store(&t, &[3], true).await;
        let r = run(&t, Duration::ZERO).await;
        assert_eq!(r.packs_condemned, 1, "{r:?}");
        let listed = t.list_objects(CONDEMNED).await.unwrap();
        assert_eq!(listed.len(), 1);
        let key = &listed[0].0;
        // The size a listing gives is checked before anything is read.
        let packs = read_record(&t, key, MAX_RECORD_BYTES).await.unwrap();
        assert_eq!(packs, Some(vec![dead]));
        match read_record(&t, key, MAX_RECORD_BYTES + 1).await {
            Err(Error::Corrupt(m)) => assert!(m.contains("more than any gc writes"), "{m}"),
            other => panic!("a record past the bound was read: {other:?}"),
        }
        let mut condemned = Condemned::default();
        condemned.refresh(&t).await.unwrap();
        assert!(condemned.contains(&dead));
        // A record removed (its packs all gone) no longer condemns anything.
        t.delete_object(key).await.unwrap();
        condemned.refresh(&t).await.unwrap();
        assert!(!condemned.contains(&dead));
    }

    #[tokio::test]
    async fn a_condemned_pack_that_is_referenced_again_is_kept() {
        // A manifest that names a condemned pack's chunks (one a listing missed, say) keeps
        // the pack: the deleting gc reads every manifest first.
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (p, ids) = store(&t, &[1], true).await;
        assert_eq!(run(&t, Duration::ZERO).await.packs_condemned, 1);
        commit(&t, &manifest(&ids)).await;
        let r = run(&t, Duration::ZERO).await;
        assert_eq!(
            (r.packs_deleted, r.packs_condemned_but_live),
            (0, 1),
            "{r:?}"
        );
        assert!(t.pack_listing().await.unwrap().contains_key(&p));
        assert!(readable(&t, &ids).await);
    }

    #[tokio::test]
    async fn a_push_that_relied_on_a_condemned_pack_stores_its_chunks_again() {
        // Sequence B of the data-loss issue, step by step: a push loads its view and relies
        // on an unreferenced pack; gcs condemn it and (a grace period later) delete it before
        // the push's manifest exists; the push writes its manifest and confirms it: the
        // confirmation finds the pack condemned and stores those chunks again.
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (p, ids) = store(&t, &[1, 2, 3], true).await;
        let node = repo(2).await;
        store(&node, &[1, 2, 3], false).await;
        let (node_index, _) = node.load_index().await.unwrap();
        let (index, _) = t.load_index().await.unwrap();
        let mut view = PushView::over(&t, index).await.unwrap();
        assert!(ids.iter().all(|id| view.index.contains(id)));
        assert_eq!(run(&t, Duration::ZERO).await.packs_condemned, 1);
        assert_eq!(run(&t, Duration::ZERO).await.packs_deleted, 1);
        let m = manifest(&ids);
        commit(&t, &m).await;
        assert!(
            !readable(&t, &ids).await,
            "the pack was deleted under the push"
        );
        let got = confirm(
            &mut view,
            &t,
            Some((&node, &node_index)),
            m.blocks.ids(),
            &ProgressBar::hidden(),
        )
        .await
        .unwrap();
        assert_eq!(got, Confirmed::Whole { restored: 3 });
        assert!(!view.index.packs.contains_key(&p));
        assert!(readable(&t, &ids).await);
        for _ in 0..3 {
            run(&t, Duration::ZERO).await;
        }
        assert!(readable(&t, &ids).await);
    }

    #[tokio::test]
    async fn a_paused_gc_deletes_nothing_a_confirmed_snapshot_needs() {
        // Sequence A of the data-loss issue: a gc decides to delete a condemned pack and
        // pauses; a push with the same chunks (a snapshot of pruned data) runs to the end;
        // the gc resumes and deletes. The push never relied on the condemned pack, so its
        // snapshot stays whole.
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (p, ids) = store(&t, &[1, 2], true).await;
        assert_eq!(run(&t, Duration::ZERO).await.packs_condemned, 1);
        let now = server_now(&t, &me()).await.unwrap();
        let paused = GcPlan::compute(&t, &me(), now, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(paused.delete, vec![p]);
        // The push: its view leaves the condemned pack out, so it stores the chunks anew.
        let node = repo(2).await;
        store(&node, &[1, 2], false).await;
        let (node_index, _) = node.load_index().await.unwrap();
        let (index, _) = t.load_index().await.unwrap();
        let mut view = PushView::over(&t, index).await.unwrap();
        assert!(!ids.iter().any(|id| view.index.contains(id)));
        let mut sink = crate::target::PackSink::into_target(&t, &mut view.index);
        crate::target::sink::copy_chunks(
            &node,
            &node_index,
            &ids,
            &mut sink,
            &ProgressBar::hidden(),
        )
        .await
        .unwrap();
        drop(sink);
        let m = manifest(&ids);
        commit(&t, &m).await;
        let got = confirm(&mut view, &t, None, m.blocks.ids(), &ProgressBar::hidden()).await;
        assert_eq!(got.unwrap(), Confirmed::Whole { restored: 0 });
        // The gc wakes up and does what it decided.
        paused.execute(&t).await.unwrap();
        assert!(!t.pack_listing().await.unwrap().contains_key(&p));
        assert!(readable(&t, &ids).await);
    }

    #[tokio::test]
    async fn a_pack_without_its_index_is_reclaimed_from_its_trailer() {
        // A gc (or push) stopped between a pack's index and the pack leaves a pack without
        // index: gc reads its trailer, condemns it and deletes it like any other.
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (p, _) = store(&t, &[1], true).await;
        t.delete_index(&p).await.unwrap();
        assert_eq!(run(&t, Duration::ZERO).await.packs_condemned, 1);
        assert_eq!(run(&t, Duration::ZERO).await.packs_deleted, 1);
        assert!(t.pack_listing().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_pack_without_index_whose_chunks_are_live_is_kept() {
        // The trailer says what such a pack holds: a live chunk keeps it.
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (p, ids) = store(&t, &[1], true).await;
        commit(&t, &manifest(&ids)).await;
        t.delete_index(&p).await.unwrap();
        for _ in 0..2 {
            let r = run(&t, Duration::ZERO).await;
            assert_eq!((r.packs_condemned, r.packs_deleted), (0, 0), "{r:?}");
        }
        assert!(t.pack_listing().await.unwrap().contains_key(&p));
    }

    #[tokio::test]
    async fn a_recent_lease_of_an_older_release_stops_gc() {
        // A push of a release before format 3 may still run: gc refuses, names the lease,
        // and changes nothing.
        let t = repo(2).await;
        t.put_object("leases/push-old-0000000000000001", b"{}".to_vec())
            .await
            .unwrap();
        let t = t.with_format_version(TARGET_FORMAT_VERSION);
        let err = gc_with_grace(&t, &me(), false, Duration::ZERO)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("leases/push-old"), "{err}");
        assert!(t.list_objects("gc/condemned").await.unwrap().is_empty());
        // Such a lease lasts an hour by the store's clock, to the millisecond.
        let (_, _, written) = t.list_objects(LEGACY_LEASES).await.unwrap()[0].clone();
        let over = written + LEGACY_LEASE_MS;
        assert!(refuse_legacy_leases(&t, over - 1).await.is_err());
        refuse_legacy_leases(&t, over).await.unwrap();
        refuse_legacy_leases(&t, over + 1).await.unwrap();
    }

    #[tokio::test]
    async fn an_unreadable_record_stops_gc_and_pushes() {
        // A record that cannot be read could condemn anything: gc and a push's view refuse.
        let t = repo(TARGET_FORMAT_VERSION).await;
        t.put_object("gc/condemned/x-0000000000000001", b"not json".to_vec())
            .await
            .unwrap();
        let err = gc_with_grace(&t, &me(), false, Duration::ZERO).await;
        assert!(matches!(err, Err(Error::Corrupt(_))), "{err:?}");
        let view = PushView::over(&t, ChunkIndex::default()).await;
        assert!(matches!(view, Err(Error::Corrupt(_))));
    }

    #[tokio::test]
    async fn a_pack_deleted_and_forgotten_while_a_push_slept_is_stored_again() {
        // A push sleeps (a suspended machine) while gcs condemn its pack, delete it, and
        // remove the record; its confirmation lists the packs again, finds the pack gone and
        // stores the chunks again, whatever the time its own clock says has passed.
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (_, ids) = store(&t, &[1, 2], true).await;
        let node = repo(2).await;
        store(&node, &[1, 2], false).await;
        let (node_index, _) = node.load_index().await.unwrap();
        let (index, _) = t.load_index().await.unwrap();
        let mut view = PushView::over(&t, index).await.unwrap();
        for _ in 0..4 {
            run(&t, Duration::ZERO).await;
        }
        assert!(
            t.list_objects("gc").await.unwrap().is_empty(),
            "record not removed"
        );
        let m = manifest(&ids);
        commit(&t, &m).await;
        let src = Some((&node, &node_index));
        let got = confirm(&mut view, &t, src, m.blocks.ids(), &ProgressBar::hidden()).await;
        assert_eq!(got.unwrap(), Confirmed::Whole { restored: 2 });
        assert!(readable(&t, &ids).await);
    }

    #[tokio::test]
    async fn an_index_whose_pack_is_gone_misleads_no_reader_and_is_removed() {
        // An index that outlived its pack names a chunk stored elsewhere too: readers find the
        // chunk in the pack that exists, and a gc removes the stray index a grace period on.
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (gone, ids) = store(&t, &[1], true).await;
        let (_, again) = store(&t, &[1], true).await;
        assert_eq!(ids, again);
        commit(&t, &manifest(&ids)).await;
        let pack_key = format!("packs/{}/{}", &gone.to_hex()[..2], gone.to_hex());
        t.delete_object(&pack_key).await.unwrap();
        for _ in 0..10 {
            assert!(readable(&t, &ids).await);
        }
        // Young, it stays a grace period (its pack may be on its way); then it goes.
        let r = run(&t, Duration::from_secs(3600)).await;
        assert_eq!(r.packs_condemned, 0, "{r:?}");
        assert!(t.index_listing().await.unwrap().contains_key(&gone));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = run(&t, Duration::from_millis(5)).await;
        assert_eq!(r.packs_condemned, 0, "{r:?}");
        assert!(!t.index_listing().await.unwrap().contains_key(&gone));
        assert!(readable(&t, &ids).await);
    }

    #[tokio::test]
    async fn a_pack_is_condemned_a_grace_period_after_it_was_written() {
        // Three packs: two all live, one half live (kept, and counted), one dead.
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (_, a) = store(&t, &[1, 2], true).await;
        let (_, b) = store(&t, &[3], true).await;
        let (_, c) = store(&t, &[4, 5], true).await;
        commit(&t, &manifest(&[a.clone(), b, c[..1].to_vec()].concat())).await;
        let (dead, _) = store(&t, &[6], true).await;
        // A leftover probe of a writer that died before removing it.
        t.put_object("probe/left", vec![]).await.unwrap();
        let r = run(&t, Duration::from_secs(3600)).await;
        assert_eq!(
            (
                r.packs_kept_partly_live,
                r.packs_too_young,
                r.packs_condemned
            ),
            (1, 1, 0),
            "{r:?}"
        );
        assert_eq!(r.next_deletion_unix_ms, None, "{r:?}");
        assert_eq!(t.list_objects("probe").await.unwrap().len(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = crate::now_unix_ms();
        let r = run(&t, Duration::from_millis(5)).await;
        let after = crate::now_unix_ms();
        assert_eq!((r.packs_condemned, r.packs_waiting), (1, 1), "{r:?}");
        let size = t.pack_listing().await.unwrap()[&dead].size;
        assert_eq!(r.bytes_condemned, size);
        let at = r.next_deletion_unix_ms.expect("when the pack may go");
        assert!(
            at >= before + 5 && at <= after + 5,
            "{at} not 5 ms after the gc"
        );
        assert!(t.list_objects("probe").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_condemned_pack_another_gc_deleted_is_not_counted_again() {
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (dead, _) = store(&t, &[3], true).await;
        assert_eq!(run(&t, Duration::ZERO).await.packs_condemned, 1);
        t.delete_pack(&dead).await.unwrap();
        let r = run(&t, Duration::ZERO).await;
        assert_eq!((r.packs_deleted, r.bytes_freed), (0, 0), "{r:?}");
        // All its packs are gone: the record is marked cleared.
        assert_eq!(t.list_objects(CLEARED).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_incomplete_unfinished_push_is_kept_unless_dropped_and_never_if_locked() {
        // Finishing an intent whose manifest cannot be made whole keeps it hidden; dropping it
        // is the operator's choice, and a lock record on the snapshot refuses even that.
        use crate::target::pending::{Finished, finish, intents, write_intent};
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (p, ids) = store(&t, &[1, 2], true).await;
        let m = manifest(&ids);
        let key = write_intent(&t, &m.volume, &m.id, &"gone".parse().unwrap())
            .await
            .unwrap();
        commit(&t, &m).await;
        let (index, _) = t.load_index().await.unwrap();
        let mut view = PushView::over(&t, index).await.unwrap();
        t.delete_pack(&p).await.unwrap();
        let intent = intents(&t, Some(&m.volume)).await.unwrap().remove(0);
        assert_eq!(intent.key, key);
        let hidden = ProgressBar::hidden();
        let got = finish(&mut view, &t, None, &intent, None, None, &hidden).await;
        assert_eq!(got.unwrap(), Finished::Incomplete { missing: 2 });
        assert!(
            t.read_manifest_if_present(&m.volume, &m.id)
                .await
                .unwrap()
                .is_some()
        );
        crate::target::write_lock_record(
            &t,
            &m.volume,
            &"app:restore".parse().unwrap(),
            vec![crate::target::TargetLock {
                snapshot: m.id,
                lock_type: crate::softlock::LockType::Application,
                value: "a restore".into(),
            }],
        )
        .await
        .unwrap();
        let got = finish(&mut view, &t, None, &intent, None, Some(&[gone()]), &hidden).await;
        assert_eq!(got.unwrap(), Finished::Incomplete { missing: 2 });
        assert!(
            t.read_manifest_if_present(&m.volume, &m.id)
                .await
                .unwrap()
                .is_some()
        );
        crate::target::write_lock_record(&t, &m.volume, &"app:restore".parse().unwrap(), vec![])
            .await
            .unwrap();
        let got = finish(&mut view, &t, None, &intent, None, Some(&[gone()]), &hidden).await;
        assert_eq!(got.unwrap(), Finished::Dropped);
        assert!(
            crate::target::pending::manifest_if_present(&t, &m.volume, &m.id)
                .await
                .unwrap()
                .is_none()
        );
        assert!(intents(&t, None).await.unwrap().is_empty());
        // The dropped manifest's key is fenced: a copy of its write still on the way (a
        // retried request) cannot bring the unconfirmed snapshot back.
        let late = t.put_manifest(&m.volume, &m.id, m.encode().unwrap()).await;
        assert!(matches!(late, Err(Error::Conflict(_))), "{late:?}");
        assert!(
            crate::target::snapshots(&t, &m.volume)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn finishing_a_push_without_its_manifest_fences_the_late_write() {
        // A push wrote its intent and sent its manifest write, and its process ended; its
        // node's next push finishes the intent and finds no manifest. The write may still land
        // (a proxy held it): finishing fences the key first, so the late write fails and no
        // snapshot appears that nobody confirmed; a gc in between deletes the packs the late
        // manifest would have named. Without the fence, the snapshot was listed and damaged.
        use crate::target::pending::{Finished, finish, intents, write_intent};
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (_, ids) = store(&t, &[1, 2], true).await;
        let m = manifest(&ids);
        write_intent(&t, &m.volume, &m.id, &me()).await.unwrap();
        let (index, _) = t.load_index().await.unwrap();
        let mut view = PushView::over(&t, index).await.unwrap();
        let intent = intents(&t, Some(&m.volume)).await.unwrap().remove(0);
        let hidden = ProgressBar::hidden();
        let got = finish(&mut view, &t, None, &intent, None, None, &hidden).await;
        assert_eq!(got.unwrap(), Finished::NoManifest);
        assert!(intents(&t, None).await.unwrap().is_empty());
        for _ in 0..2 {
            run(&t, Duration::ZERO).await;
        }
        assert!(t.pack_listing().await.unwrap().is_empty(), "not collected");
        // The held write lands now: create-only, it meets the fence.
        let late = t.put_manifest(&m.volume, &m.id, m.encode().unwrap()).await;
        assert!(matches!(late, Err(Error::Conflict(_))), "{late:?}");
        assert!(
            crate::target::snapshots(&t, &m.volume)
                .await
                .unwrap()
                .is_empty()
        );
        let r = run(&t, Duration::ZERO).await;
        assert_eq!(r.snapshots, 0, "a fence is not a manifest: {r:?}");
        // Finishing again (a crash before the intent went) finds the fence and is done.
        write_intent(&t, &m.volume, &m.id, &me()).await.unwrap();
        let intent = intents(&t, Some(&m.volume)).await.unwrap().remove(0);
        let got = finish(&mut view, &t, None, &intent, None, None, &hidden).await;
        assert_eq!(got.unwrap(), Finished::NoManifest);
    }

    #[tokio::test]
    async fn a_manifest_that_lands_while_its_push_is_finished_is_confirmed() {
        // The fence is create-only too: if the late write wins, finishing finds the manifest
        // and confirms it like any other.
        use crate::target::pending::{Finished, finish, intents, write_intent};
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (_, ids) = store(&t, &[1, 2], true).await;
        let m = manifest(&ids);
        write_intent(&t, &m.volume, &m.id, &me()).await.unwrap();
        commit(&t, &m).await;
        let (index, _) = t.load_index().await.unwrap();
        let mut view = PushView::over(&t, index).await.unwrap();
        let intent = intents(&t, Some(&m.volume)).await.unwrap().remove(0);
        let got = finish(
            &mut view,
            &t,
            None,
            &intent,
            None,
            None,
            &ProgressBar::hidden(),
        )
        .await;
        assert_eq!(got.unwrap(), Finished::Committed);
        assert_eq!(
            crate::target::snapshots(&t, &m.volume).await.unwrap().len(),
            1
        );
    }

    #[tokio::test]
    async fn finishing_its_own_push_with_the_snapshot_at_hand_completes_it() {
        // The node still has the snapshot: finishing writes the manifest (create-only) and
        // confirms it instead of fencing; a late copy of the old write then finds it there.
        use crate::target::pending::{Finished, finish, intents, write_intent};
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (_, ids) = store(&t, &[1, 2], true).await;
        let m = manifest(&ids);
        let raw = m.encode().unwrap();
        write_intent(&t, &m.volume, &m.id, &me()).await.unwrap();
        let (index, _) = t.load_index().await.unwrap();
        let mut view = PushView::over(&t, index).await.unwrap();
        let intent = intents(&t, Some(&m.volume)).await.unwrap().remove(0);
        let hidden = ProgressBar::hidden();
        let got = finish(&mut view, &t, None, &intent, Some(&raw), None, &hidden).await;
        assert_eq!(got.unwrap(), Finished::Committed);
        assert_eq!(
            crate::target::snapshots(&t, &m.volume).await.unwrap().len(),
            1
        );
        let late = t.put_manifest(&m.volume, &m.id, raw.to_vec()).await;
        assert!(matches!(late, Err(Error::Conflict(_))), "{late:?}");
        // An object of other blocks at the key is not taken for it: kept hidden, not
        // overwritten.
        let other = manifest(&ids[..1]);
        let other = Manifest { id: m.id, ..other };
        let t2 = repo(TARGET_FORMAT_VERSION).await;
        store(&t2, &[1], true).await;
        t2.put_manifest(&m.volume, &m.id, other.encode().unwrap())
            .await
            .unwrap();
        write_intent(&t2, &m.volume, &m.id, &me()).await.unwrap();
        let (index, _) = t2.load_index().await.unwrap();
        let mut view = PushView::over(&t2, index).await.unwrap();
        let intent = intents(&t2, Some(&m.volume)).await.unwrap().remove(0);
        let got = finish(&mut view, &t2, None, &intent, Some(&raw), None, &hidden).await;
        assert_eq!(got.unwrap(), Finished::Damaged);
        assert!(
            crate::target::snapshots(&t2, &m.volume)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn an_incomplete_snapshot_two_gone_nodes_pushed_is_dropped_only_with_both() {
        // Two nodes pushed the same snapshot and are gone; its chunks are gone too. Dropping
        // it for one of them would pull it from under the other's push, so it is refused;
        // clearing both at once drops it, and the other intent then finds the fence.
        use crate::target::pending::{Finished, finish, intents, write_intent};
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (p, ids) = store(&t, &[1, 2], true).await;
        let m = manifest(&ids);
        let (g1, g2): (NodeId, NodeId) = ("gone-1".parse().unwrap(), "gone-2".parse().unwrap());
        write_intent(&t, &m.volume, &m.id, &g1).await.unwrap();
        write_intent(&t, &m.volume, &m.id, &g2).await.unwrap();
        commit(&t, &m).await;
        t.delete_pack(&p).await.unwrap();
        let (index, _) = t.load_index().await.unwrap();
        let mut view = PushView::over(&t, index).await.unwrap();
        let all = intents(&t, Some(&m.volume)).await.unwrap();
        let of = |n: &NodeId| all.iter().find(|i| &i.node == n).unwrap().clone();
        let hidden = ProgressBar::hidden();
        let alone = std::slice::from_ref(&g1);
        let got = finish(&mut view, &t, None, &of(&g1), None, Some(alone), &hidden).await;
        assert_eq!(got.unwrap(), Finished::Incomplete { missing: 2 });
        let both = [g1.clone(), g2.clone()];
        let got = finish(&mut view, &t, None, &of(&g1), None, Some(&both), &hidden).await;
        assert_eq!(got.unwrap(), Finished::Dropped);
        let got = finish(&mut view, &t, None, &of(&g2), None, Some(&both), &hidden).await;
        assert_eq!(got.unwrap(), Finished::NoManifest);
        assert!(intents(&t, None).await.unwrap().is_empty());
        assert!(
            crate::target::snapshots(&t, &m.volume)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// Overwrites pack `p`'s index and the pack itself with bytes that decode as neither.
    async fn damage_index_and_trailer(t: &Repository, p: &PackId) {
        let hex = p.to_hex();
        t.put_object(&format!("index/{p}"), b"not an index".to_vec())
            .await
            .unwrap();
        t.put_object(&format!("packs/{}/{hex}", &hex[..2]), vec![7; 300])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_pack_whose_index_and_trailer_cannot_be_read_is_never_deleted() {
        // What such a pack holds cannot be told (a store or middlebox that damages what it
        // returns): it may hold live chunks, so gc neither condemns nor deletes it, whether
        // it became unreadable before it was condemned or after, and says so in its report.
        let t = repo(TARGET_FORMAT_VERSION).await;
        let (live_pack, ids) = store(&t, &[1, 2], true).await;
        commit(&t, &manifest(&ids)).await;
        damage_index_and_trailer(&t, &live_pack).await;
        let (condemned, _) = store(&t, &[3], true).await;
        assert_eq!(run(&t, Duration::ZERO).await.packs_condemned, 1);
        damage_index_and_trailer(&t, &condemned).await;
        for _ in 0..3 {
            let r = run(&t, Duration::ZERO).await;
            assert_eq!((r.packs_deleted, r.packs_unreadable), (0, 2), "{r:?}");
            assert_eq!(r.packs_condemned, 0, "{r:?}");
        }
        let packs = t.pack_listing().await.unwrap();
        assert!(packs.contains_key(&live_pack) && packs.contains_key(&condemned));
    }
}
