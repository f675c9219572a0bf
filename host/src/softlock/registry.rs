//! The lock registry: lock sets, the index of locked snapshots, holder settings and the
//! history of releases, breaks and expiries, stored in the catalog's database.
//!
//! Tables (redb, same file as the catalog so a deletion and its lock check share one
//! transaction):
//! ```text
//! lock_sets        "volume/holder"             -> LockSet (JSON): generation + locks
//! locked           "volume/snapshot/holder"    -> number of that holder's locks on it
//! lock_settings    "holder"                    -> HolderSettings (JSON)
//! lock_history     sequence number             -> LockEvent (JSON)
//! ```
//!
//! # Invariants
//! - `locked` is exactly the index of `lock_sets`: both change in the same transaction.
//! - A set is replaced whole; an older generation changes nothing; a crash leaves the old
//!   set or the new one (one redb transaction).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{HolderId, LockType, MAX_LOCKS_PER_SET, SoftLock, validate_value};
use crate::catalog::{self, SnapshotRecord};
use crate::error::{Error, Result};
use crate::id::{NodeId, SnapshotId, VolumeName};

const LOCK_SETS: TableDefinition<&str, &[u8]> = TableDefinition::new("lock_sets");
const LOCKED: TableDefinition<&str, u64> = TableDefinition::new("locked");
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("lock_settings");
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("lock_history");
/// (holder, seq) of every event in [`HISTORY`]: a holder's events in order, to trim them.
const HISTORY_BY_HOLDER: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("lock_history_by_holder");
/// Holder → [`HistorySummary`] of its events trimmed from the history.
const HISTORY_SUMMARIES: TableDefinition<&str, &[u8]> =
    TableDefinition::new("lock_history_summaries");

/// Events kept per holder by default (`HOLDFAST_HISTORY_PER_HOLDER`); older ones are
/// summarised. A year of hourly mirrors releases one base an hour: some 9,000 events; the
/// last thousand say what happened lately, the summary the rest.
const DEFAULT_HISTORY_PER_HOLDER: u64 = 1000;

fn history_per_holder() -> u64 {
    std::env::var("HOLDFAST_HISTORY_PER_HOLDER")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_HISTORY_PER_HOLDER)
}

/// What was trimmed of one holder's history: how many events of each kind, and when.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HistorySummary {
    pub holder: String,
    pub events: BTreeMap<String, u64>,
    pub first_unix_ms: u64,
    pub last_unix_ms: u64,
}

/// Everything one holder asks of this node for one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LockSet {
    pub volume: VolumeName,
    pub holder: HolderId,
    pub generation: u64,
    pub refreshed_unix_ms: u64,
    pub locks: Vec<SoftLock>,
}

/// A lock as a holder asks for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NewLock {
    pub snapshot: SnapshotId,
    #[serde(rename = "type")]
    pub lock_type: LockType,
    pub value: String,
    #[serde(default)]
    pub lease_ms: Option<u64>,
    #[serde(default)]
    pub path: Vec<NodeId>,
}

/// A whole lock set sent by a holder (`holdfast lock replace-set`, or a downstream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LockSetUpdate {
    pub volume: VolumeName,
    pub holder: HolderId,
    pub generation: u64,
    pub locks: Vec<NewLock>,
}

/// What a replace did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum ReplaceOutcome {
    /// The set replaced the stored one (or was the first).
    Replaced {
        generation: u64,
        locks: usize,
        released: usize,
    },
    /// The same generation again: locks refreshed, content unchanged.
    Refreshed { generation: u64 },
    /// Older than the stored generation: ignored.
    IgnoredStale { generation: u64, stored: u64 },
}

/// A holder's settings on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HolderSettings {
    /// Release this holder's locks automatically once their lease runs out.
    pub auto_release_stale: bool,
}

/// What happened to a lock, for `holdfast lock history`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LockEvent {
    pub seq: u64,
    pub unix_ms: u64,
    /// `release`, `break`, `expire` or `replace`.
    pub event: String,
    pub holder: HolderId,
    pub volume: VolumeName,
    pub snapshot: SnapshotId,
    #[serde(rename = "type")]
    pub lock_type: LockType,
    pub value: String,
    pub detail: String,
}

/// An operator's explicit override of locks on a deletion.
#[derive(Clone, Debug)]
pub struct BreakLocks {
    /// Who or what asked (for the history).
    pub reason: String,
}

fn set_key(volume: &VolumeName, holder: &HolderId) -> String {
    format!("{volume}/{holder}")
}

fn locked_key(volume: &VolumeName, snapshot: &SnapshotId, holder: &HolderId) -> String {
    format!("{volume}/{snapshot}/{holder}")
}

fn prefix_range(prefix: &str) -> (String, String) {
    // Every key with this prefix sorts before prefix + U+10FFFF.
    (prefix.to_string(), format!("{prefix}\u{10FFFF}"))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(format!("lock registry entry {what} is unreadable: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::internal(e.to_string()))
}

/// The stored form of a lock set: compact binary (postcard), with the volume and holder once
/// per set rather than once per lock. A node with 100,000 locks decodes them all in a few
/// milliseconds, where JSON took most of a `lock list`'s time.
#[derive(Serialize, Deserialize)]
struct StoredSet {
    volume: String,
    holder: String,
    generation: u64,
    refreshed: u64,
    locks: Vec<StoredLock>,
}

#[derive(Serialize, Deserialize)]
struct StoredLock {
    snapshot: u128,
    lock_type: String,
    value: String,
    set: u64,
    refreshed: u64,
    lease: Option<u64>,
    path: Vec<String>,
}

fn encode_set(s: &LockSet) -> Result<Vec<u8>> {
    let stored = StoredSet {
        volume: s.volume.to_string(),
        holder: s.holder.to_string(),
        generation: s.generation,
        refreshed: s.refreshed_unix_ms,
        locks: s
            .locks
            .iter()
            .map(|l| StoredLock {
                snapshot: l.snapshot.as_u128(),
                lock_type: l.lock_type.to_string(),
                value: l.value.clone(),
                set: l.set_unix_ms,
                refreshed: l.refreshed_unix_ms,
                lease: l.lease_ms,
                path: l.path.iter().map(|n| n.to_string()).collect(),
            })
            .collect(),
    };
    postcard::to_stdvec(&stored).map_err(|e| Error::internal(e.to_string()))
}

fn decode_set(bytes: &[u8], what: &str) -> Result<LockSet> {
    let s: StoredSet = postcard::from_bytes(bytes)
        .map_err(|e| Error::corrupt(format!("lock set {what} is unreadable: {e}")))?;
    let volume = VolumeName::from_trusted(&s.volume);
    let holder = HolderId::from_trusted(&s.holder);
    let mut types: HashMap<String, LockType> = HashMap::new();
    let mut locks = Vec::with_capacity(s.locks.len());
    for l in s.locks {
        let lock_type = match types.get(&l.lock_type) {
            Some(t) => t.clone(),
            None => {
                let t: LockType = l.lock_type.parse()?;
                types.insert(l.lock_type, t.clone());
                t
            }
        };
        locks.push(SoftLock {
            volume: volume.clone(),
            snapshot: SnapshotId::from_u128(l.snapshot),
            lock_type,
            value: l.value,
            holder: holder.clone(),
            set_unix_ms: l.set,
            refreshed_unix_ms: l.refreshed,
            lease_ms: l.lease,
            path: l.path.iter().map(|n| NodeId::from_trusted(n)).collect(),
        });
    }
    Ok(LockSet {
        volume,
        holder,
        generation: s.generation,
        refreshed_unix_ms: s.refreshed,
        locks,
    })
}

fn read_set(
    tx: &WriteTransaction,
    volume: &VolumeName,
    holder: &HolderId,
) -> Result<Option<LockSet>> {
    let t = tx.open_table(LOCK_SETS)?;
    let key = set_key(volume, holder);
    let v = t.get(key.as_str())?;
    v.map(|v| decode_set(v.value(), &key)).transpose()
}

/// The lock sets (inside a write transaction) that `keep` selects.
fn sets_where(tx: &WriteTransaction, keep: impl Fn(&LockSet) -> bool) -> Result<Vec<LockSet>> {
    let t = tx.open_table(LOCK_SETS)?;
    let mut out = Vec::new();
    for e in t.iter()? {
        let (k, v) = e?;
        let s = decode_set(v.value(), k.value())?;
        if keep(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Stores `new` in place of `old` (either may be absent) and keeps the index in step.
fn write_set(tx: &WriteTransaction, old: Option<&LockSet>, new: &LockSet) -> Result<()> {
    let mut locked = tx.open_table(LOCKED)?;
    let count = |s: &LockSet| {
        let mut m: BTreeMap<SnapshotId, u64> = BTreeMap::new();
        for l in &s.locks {
            *m.entry(l.snapshot).or_default() += 1;
        }
        m
    };
    let before = old.map(count).unwrap_or_default();
    let after = count(new);
    for snap in before.keys() {
        if !after.contains_key(snap) {
            locked.remove(locked_key(&new.volume, snap, &new.holder).as_str())?;
        }
    }
    for (snap, n) in &after {
        if before.get(snap) != Some(n) {
            locked.insert(locked_key(&new.volume, snap, &new.holder).as_str(), *n)?;
        }
    }
    let mut sets = tx.open_table(LOCK_SETS)?;
    let key = set_key(&new.volume, &new.holder);
    if new.locks.is_empty() {
        sets.remove(key.as_str())?;
    } else {
        sets.insert(key.as_str(), encode_set(new)?.as_slice())?;
    }
    Ok(())
}

/// Appends one history event per lock (one table open, however many locks).
fn record_all<'l>(
    tx: &WriteTransaction,
    now: u64,
    event: &str,
    locks: impl IntoIterator<Item = &'l SoftLock>,
    detail: &str,
) -> Result<()> {
    let mut t = tx.open_table(HISTORY)?;
    let mut by_holder = tx.open_table(HISTORY_BY_HOLDER)?;
    let first = t.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
    let mut holders = std::collections::BTreeSet::new();
    for (seq, lock) in (first..).zip(locks) {
        by_holder.insert((lock.holder.as_str(), seq), ())?;
        holders.insert(lock.holder.to_string());
        let e = LockEvent {
            seq,
            unix_ms: now,
            event: event.to_string(),
            holder: lock.holder.clone(),
            volume: lock.volume.clone(),
            snapshot: lock.snapshot,
            lock_type: lock.lock_type.clone(),
            value: lock.value.clone(),
            detail: detail.to_string(),
        };
        t.insert(seq, encode(&e)?.as_slice())?;
    }
    drop((t, by_holder));
    for h in holders {
        trim_history(tx, &h, history_per_holder())?;
    }
    Ok(())
}

/// Keeps the newest `keep` events of `holder`, folding the older ones into its summary.
fn trim_history(tx: &WriteTransaction, holder: &str, keep: u64) -> Result<()> {
    let mut by_holder = tx.open_table(HISTORY_BY_HOLDER)?;
    let seqs: Vec<u64> = by_holder
        .range((holder, 0)..=(holder, u64::MAX))?
        .map(|r| r.map(|(k, _)| k.value().1))
        .collect::<std::result::Result<_, _>>()?;
    if seqs.len() as u64 <= keep {
        return Ok(());
    }
    let drop_n = seqs.len() - keep as usize;
    let mut t = tx.open_table(HISTORY)?;
    let mut summaries = tx.open_table(HISTORY_SUMMARIES)?;
    let mut sum: HistorySummary = match summaries.get(holder)? {
        Some(v) => decode(v.value(), holder)?,
        None => HistorySummary {
            holder: holder.to_string(),
            ..Default::default()
        },
    };
    for seq in &seqs[..drop_n] {
        if let Some(v) = t.remove(*seq)? {
            let e: LockEvent = decode(v.value(), &seq.to_string())?;
            *sum.events.entry(e.event).or_default() += 1;
            if sum.first_unix_ms == 0 || e.unix_ms < sum.first_unix_ms {
                sum.first_unix_ms = e.unix_ms;
            }
            sum.last_unix_ms = sum.last_unix_ms.max(e.unix_ms);
        }
        by_holder.remove((holder, *seq))?;
    }
    summaries.insert(holder, encode(&sum)?.as_slice())?;
    Ok(())
}

/// Releases stale locks of holders whose auto-release is on (in `volume`, or everywhere).
fn expire(tx: &WriteTransaction, now: u64, volume: Option<&VolumeName>) -> Result<Vec<SoftLock>> {
    // Only holders that opted in can lose locks here; most nodes have none.
    let auto: Vec<HolderId> = {
        let t = tx.open_table(SETTINGS)?;
        let mut v = Vec::new();
        for e in t.iter()? {
            let (k, val) = e?;
            let s: HolderSettings = decode(val.value(), k.value())?;
            if s.auto_release_stale {
                v.push(k.value().parse()?);
            }
        }
        v
    };
    if auto.is_empty() {
        return Ok(Vec::new());
    }
    let sets = sets_where(tx, |s| {
        auto.contains(&s.holder) && volume.is_none_or(|vol| *vol == s.volume)
    })?;
    let mut released = Vec::new();
    for old in sets {
        if !old.locks.iter().any(|l| l.is_stale(now)) {
            continue;
        }
        let mut new = old.clone();
        let (stale, keep): (Vec<_>, Vec<_>) =
            old.locks.iter().cloned().partition(|l| l.is_stale(now));
        new.locks = keep;
        write_set(tx, Some(&old), &new)?;
        let why = "lease ran out; the holder is set to auto-release stale locks";
        record_all(tx, now, "expire", &stale, why)?;
        released.extend(stale);
    }
    Ok(released)
}

/// Refuses (or, with `brk`, breaks and records) the deletion of a locked snapshot. Called
/// inside the catalog transaction that removes the snapshot, so the check and the removal
/// see the same state. Every path that deletes snapshots goes through here.
pub fn guard_delete(
    tx: &WriteTransaction,
    rec: &SnapshotRecord,
    brk: Option<&BreakLocks>,
    now: u64,
) -> Result<Vec<SoftLock>> {
    expire(tx, now, Some(&rec.volume))?;
    let locks = locks_on_tx(tx, &rec.volume, &rec.id)?;
    if locks.is_empty() {
        return Ok(Vec::new());
    }
    let Some(brk) = brk else {
        let mut msg = format!(
            "snapshot {} ({}) is held by {} soft lock(s) and was not deleted:",
            rec.display_ref(),
            rec.id,
            locks.len()
        );
        for l in &locks {
            msg.push_str(&format!("\n  - {}", l.describe(now)));
        }
        msg.push_str(&format!(
            "\nrelease them (`holdfast lock release {} --holder HOLDER`), or override with \
             --break-locks (recorded in `holdfast lock history`)",
            rec.display_ref()
        ));
        return Err(Error::Locked(msg));
    };
    let mut by_holder: BTreeMap<HolderId, ()> = BTreeMap::new();
    for l in &locks {
        by_holder.insert(l.holder.clone(), ());
    }
    for holder in by_holder.keys() {
        if let Some(old) = read_set(tx, &rec.volume, holder)? {
            let mut new = old.clone();
            new.locks.retain(|l| l.snapshot != rec.id);
            write_set(tx, Some(&old), &new)?;
        }
    }
    let why = format!(
        "deleted {} with --break-locks: {}",
        rec.display_ref(),
        brk.reason
    );
    record_all(tx, now, "break", &locks, &why)?;
    for l in &locks {
        tracing::warn!(
            snapshot = %rec.display_ref(),
            holder = %l.holder,
            lock_type = %l.lock_type,
            value = %l.value,
            "soft lock broken by the operator"
        );
    }
    Ok(locks)
}

fn locks_on_tx(
    tx: &WriteTransaction,
    volume: &VolumeName,
    snapshot: &SnapshotId,
) -> Result<Vec<SoftLock>> {
    let holders: Vec<HolderId> = {
        let t = tx.open_table(LOCKED)?;
        let (lo, hi) = prefix_range(&format!("{volume}/{snapshot}/"));
        let mut v = Vec::new();
        for e in t.range(lo.as_str()..hi.as_str())? {
            let (k, _) = e?;
            let key = k.value();
            v.push(key[volume.as_str().len() + 1 + 20 + 1..].parse()?);
        }
        v
    };
    let mut out = Vec::new();
    for h in holders {
        if let Some(s) = read_set(tx, volume, &h)? {
            out.extend(s.locks.into_iter().filter(|l| l.snapshot == *snapshot));
        }
    }
    Ok(out)
}

/// Which snapshots of a catalogued volume exist, for validating new locks.
fn check_snapshot_exists(
    tx: &WriteTransaction,
    volume: &VolumeName,
    snapshot: &SnapshotId,
) -> Result<()> {
    if catalog::snapshot_exists(tx, volume, snapshot)? {
        Ok(())
    } else {
        Err(Error::not_found(format!(
            "volume {volume} has no snapshot with id {snapshot} on this node; a lock can only \
             protect a snapshot that exists"
        )))
    }
}

impl crate::catalog::Catalog {
    /// The soft-lock registry, which lives in the catalog's database. (Defined here, so that
    /// the catalog knows nothing of locks: locks depend on the catalog, not the other way.)
    pub fn locks(&self) -> LockRegistry<'_> {
        LockRegistry::new(self.db())
    }
}

/// Creates the registry's tables in the catalog's database if they are missing (a new
/// catalog, or one from an older holdfast); writes nothing when they are all there.
pub fn ensure_tables_in(db: &redb::Database) -> Result<()> {
    if tables_present(&db.begin_read()?)? {
        return Ok(());
    }
    let tx = db.begin_write()?;
    LockRegistry::ensure_tables(&tx)?;
    tx.commit()?;
    Ok(())
}

/// Whether the registry's tables exist (a read-only check for opening the catalog).
pub fn tables_present(tx: &redb::ReadTransaction) -> Result<bool> {
    for name in ["lock_sets", "lock_settings", "lock_history"] {
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new(name);
        match tx.open_table(def) {
            Ok(_) => {}
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            // lock_history has u64 keys: a type mismatch still proves it exists.
            Err(redb::TableError::TableTypeMismatch { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for present in [
        tx.open_table(LOCKED).map(drop),
        tx.open_table(HISTORY_SUMMARIES).map(drop),
        tx.open_table(HISTORY_BY_HOLDER).map(drop),
    ] {
        match present {
            Ok(()) => {}
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// The registry over the catalog's database.
#[derive(Debug, Clone, Copy)]
pub struct LockRegistry<'a> {
    db: &'a redb::Database,
}

impl<'a> LockRegistry<'a> {
    pub fn new(db: &'a redb::Database) -> Self {
        LockRegistry { db }
    }

    /// Creates the tables if missing.
    pub fn ensure_tables(tx: &WriteTransaction) -> Result<()> {
        tx.open_table(LOCK_SETS)?;
        tx.open_table(LOCKED)?;
        tx.open_table(SETTINGS)?;
        tx.open_table(HISTORY)?;
        tx.open_table(HISTORY_SUMMARIES)?;
        // The per-holder index of a history from a release before it: built once.
        let mut by_holder = tx.open_table(HISTORY_BY_HOLDER)?;
        if redb::ReadableTableMetadata::is_empty(&by_holder)? {
            let t = tx.open_table(HISTORY)?;
            for row in t.iter()? {
                let (k, v) = row?;
                let e: LockEvent = decode(v.value(), &k.value().to_string())?;
                by_holder.insert((e.holder.as_str(), k.value()), ())?;
            }
        }
        Ok(())
    }

    /// Adds one lock to the holder's set (or refreshes the same one).
    pub fn add(&self, volume: &VolumeName, holder: &HolderId, lock: NewLock) -> Result<SoftLock> {
        validate_value(&lock.value)?;
        let now = crate::now_unix_ms();
        let tx = self.db.begin_write()?;
        check_snapshot_exists(&tx, volume, &lock.snapshot)?;
        let old = read_set(&tx, volume, holder)?;
        let mut new = old.clone().unwrap_or(LockSet {
            volume: volume.clone(),
            holder: holder.clone(),
            generation: 0,
            refreshed_unix_ms: now,
            locks: Vec::new(),
        });
        let added = SoftLock {
            volume: volume.clone(),
            snapshot: lock.snapshot,
            lock_type: lock.lock_type,
            value: lock.value,
            holder: holder.clone(),
            set_unix_ms: now,
            refreshed_unix_ms: now,
            lease_ms: lock.lease_ms,
            path: lock.path,
        };
        let stored = match new.locks.iter_mut().find(|l| l.same_dependency(&added)) {
            Some(existing) => {
                existing.refreshed_unix_ms = now;
                existing.lease_ms = added.lease_ms;
                existing.clone()
            }
            None => {
                if new.locks.len() >= MAX_LOCKS_PER_SET {
                    return Err(Error::invalid(format!(
                        "holder {holder} already has {MAX_LOCKS_PER_SET} locks on volume {volume}"
                    )));
                }
                new.locks.push(added.clone());
                added
            }
        };
        // The generation is the holder's to advance (its next whole set must replace
        // this one), so a local addition leaves it as it is.
        new.refreshed_unix_ms = now;
        write_set(&tx, old.as_ref(), &new)?;
        tx.commit()?;
        Ok(stored)
    }

    /// Replaces a set this node keeps for itself (a policy's, a target's) with `locks`, one
    /// generation above the stored one.
    pub fn replace_own_set(
        &self,
        volume: &VolumeName,
        holder: HolderId,
        locks: Vec<NewLock>,
    ) -> Result<ReplaceOutcome> {
        let generation = self
            .sets(Some(volume))?
            .iter()
            .find(|s| s.holder == holder)
            .map_or(0, |s| s.generation);
        self.replace_set(LockSetUpdate {
            volume: volume.clone(),
            holder,
            generation: generation + 1,
            locks,
        })
    }

    /// Replaces the holder's whole set for the volume, unless `update` is older.
    pub fn replace_set(&self, update: LockSetUpdate) -> Result<ReplaceOutcome> {
        if update.locks.len() > MAX_LOCKS_PER_SET {
            return Err(Error::invalid(format!(
                "a lock set may hold at most {MAX_LOCKS_PER_SET} locks; this one has {}",
                update.locks.len()
            )));
        }
        for l in &update.locks {
            validate_value(&l.value)?;
            if l.path.len() > super::MAX_LOCK_PATH {
                return Err(Error::invalid(format!(
                    "a lock came through {} nodes; a cascade is at most {} deep",
                    l.path.len(),
                    super::MAX_LOCK_PATH
                )));
            }
        }
        let now = crate::now_unix_ms();
        let tx = self.db.begin_write()?;
        let old = read_set(&tx, &update.volume, &update.holder)?;
        if let Some(old) = &old {
            if update.generation < old.generation {
                return Ok(ReplaceOutcome::IgnoredStale {
                    generation: update.generation,
                    stored: old.generation,
                });
            }
            if update.generation == old.generation {
                let mut new = old.clone();
                new.refreshed_unix_ms = now;
                for l in &mut new.locks {
                    l.refreshed_unix_ms = now;
                }
                write_set(&tx, Some(old), &new)?;
                tx.commit()?;
                return Ok(ReplaceOutcome::Refreshed {
                    generation: old.generation,
                });
            }
        }
        let snapshots: BTreeSet<SnapshotId> = update.locks.iter().map(|l| l.snapshot).collect();
        for snap in &snapshots {
            check_snapshot_exists(&tx, &update.volume, snap)?;
        }
        // Keyed by dependency (what, on which snapshot, for which node: two region replicas
        // of the same region in a cascade depend on the same snapshot with the same value),
        // so a set of any size is merged in linear time.
        let previous: HashMap<DependencyKey, &SoftLock> = old
            .iter()
            .flat_map(|o| o.locks.iter())
            .map(|l| (dependency(l.snapshot, &l.lock_type, &l.value, &l.path), l))
            .collect();
        let mut seen = HashSet::with_capacity(update.locks.len());
        let mut locks: Vec<SoftLock> = Vec::with_capacity(update.locks.len());
        for l in update.locks {
            let owned = (
                l.snapshot,
                l.lock_type.clone(),
                l.value.clone(),
                l.path.first().cloned(),
            );
            if !seen.insert(owned) {
                continue;
            }
            // A dependency the holder already had keeps its original set time.
            let set_unix_ms = previous
                .get(&dependency(l.snapshot, &l.lock_type, &l.value, &l.path))
                .map_or(now, |p| p.set_unix_ms);
            locks.push(SoftLock {
                volume: update.volume.clone(),
                snapshot: l.snapshot,
                lock_type: l.lock_type,
                value: l.value,
                holder: update.holder.clone(),
                set_unix_ms,
                refreshed_unix_ms: now,
                lease_ms: l.lease_ms,
                path: l.path,
            });
        }
        let new = LockSet {
            volume: update.volume.clone(),
            holder: update.holder.clone(),
            generation: update.generation,
            refreshed_unix_ms: now,
            locks,
        };
        let mut released = 0;
        if let Some(old) = &old {
            let kept: HashSet<DependencyKey> = new
                .locks
                .iter()
                .map(|l| dependency(l.snapshot, &l.lock_type, &l.value, &l.path))
                .collect();
            let gone: Vec<&SoftLock> = old
                .locks
                .iter()
                .filter(|l| {
                    !kept.contains(&dependency(l.snapshot, &l.lock_type, &l.value, &l.path))
                })
                .collect();
            released = gone.len();
            let detail = format!("not in the holder's lock set generation {}", new.generation);
            record_all(&tx, now, "release", gone, &detail)?;
        }
        write_set(&tx, old.as_ref(), &new)?;
        tx.commit()?;
        Ok(ReplaceOutcome::Replaced {
            generation: new.generation,
            locks: new.locks.len(),
            released,
        })
    }

    /// Releases the holder's locks: on one snapshot, on one volume, or everywhere.
    pub fn release(
        &self,
        holder: &HolderId,
        volume: Option<&VolumeName>,
        snapshot: Option<&SnapshotId>,
        detail: &str,
    ) -> Result<Vec<SoftLock>> {
        let now = crate::now_unix_ms();
        let tx = self.db.begin_write()?;
        let sets = sets_where(&tx, |s| {
            s.holder == *holder && volume.is_none_or(|vol| *vol == s.volume)
        })?;
        let mut released = Vec::new();
        for old in sets {
            let mut new = old.clone();
            let (gone, keep): (Vec<_>, Vec<_>) = old
                .locks
                .iter()
                .cloned()
                .partition(|l| snapshot.is_none_or(|s| *s == l.snapshot));
            if gone.is_empty() {
                continue;
            }
            new.locks = keep;
            // Not the generation: that is the holder's (see `add`).
            new.refreshed_unix_ms = now;
            write_set(&tx, Some(&old), &new)?;
            record_all(&tx, now, "release", &gone, detail)?;
            released.extend(gone);
        }
        tx.commit()?;
        Ok(released)
    }

    /// Applies auto-release to stale locks now (holders that opted in only).
    pub fn expire_stale(&self) -> Result<Vec<SoftLock>> {
        // Most nodes have no holder with auto-release: then this is a read, not a commit.
        if !self.all_settings()?.values().any(|s| s.auto_release_stale) {
            return Ok(Vec::new());
        }
        let tx = self.db.begin_write()?;
        let r = expire(&tx, crate::now_unix_ms(), None)?;
        tx.commit()?;
        Ok(r)
    }

    pub fn set_settings(&self, holder: &HolderId, s: &HolderSettings) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(SETTINGS)?
            .insert(holder.as_str(), encode(s)?.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn all_settings(&self) -> Result<BTreeMap<HolderId, HolderSettings>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SETTINGS)?;
        let mut out = BTreeMap::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.insert(k.value().parse()?, decode(v.value(), k.value())?);
        }
        Ok(out)
    }

    /// Every lock set (of one volume, if given).
    pub fn sets(&self, volume: Option<&VolumeName>) -> Result<Vec<LockSet>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(LOCK_SETS)?;
        let mut out = Vec::new();
        let mut push = |k: &str, v: &[u8]| -> Result<()> {
            out.push(decode_set(v, k)?);
            Ok(())
        };
        match volume {
            Some(vol) => {
                let (lo, hi) = prefix_range(&format!("{vol}/"));
                for e in t.range(lo.as_str()..hi.as_str())? {
                    let (k, v) = e?;
                    push(k.value(), v.value())?;
                }
            }
            None => {
                for e in t.iter()? {
                    let (k, v) = e?;
                    push(k.value(), v.value())?;
                }
            }
        }
        Ok(out)
    }

    /// The locks on one snapshot.
    pub fn locks_on(&self, volume: &VolumeName, snapshot: &SnapshotId) -> Result<Vec<SoftLock>> {
        let tx = self.db.begin_read()?;
        let locked = tx.open_table(LOCKED)?;
        let sets = tx.open_table(LOCK_SETS)?;
        let (lo, hi) = prefix_range(&format!("{volume}/{snapshot}/"));
        let mut out = Vec::new();
        for e in locked.range(lo.as_str()..hi.as_str())? {
            let (k, _) = e?;
            let holder = &k.value()[volume.as_str().len() + 1 + 20 + 1..];
            let key = format!("{volume}/{holder}");
            if let Some(v) = sets.get(key.as_str())? {
                let s: LockSet = decode_set(v.value(), &key)?;
                out.extend(s.locks.into_iter().filter(|l| l.snapshot == *snapshot));
            }
        }
        Ok(out)
    }

    /// For each locked snapshot of the volume, its holders.
    pub fn locked_snapshots(
        &self,
        volume: &VolumeName,
    ) -> Result<HashMap<SnapshotId, Vec<HolderId>>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(LOCKED)?;
        let (lo, hi) = prefix_range(&format!("{volume}/"));
        let mut out: HashMap<SnapshotId, Vec<HolderId>> = HashMap::new();
        let skip = volume.as_str().len() + 1;
        for e in t.range(lo.as_str()..hi.as_str())? {
            let (k, _) = e?;
            let key = k.value();
            let snap: SnapshotId = key[skip..skip + 20].parse()?;
            out.entry(snap)
                .or_default()
                .push(HolderId::from_trusted(&key[skip + 21..]));
        }
        Ok(out)
    }

    /// The history, oldest first.
    /// What was trimmed of each holder's history (see [`HistorySummary`]).
    pub fn history_summaries(&self) -> Result<Vec<HistorySummary>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HISTORY_SUMMARIES)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push(decode(v.value(), k.value())?);
        }
        Ok(out)
    }

    pub fn history(&self) -> Result<Vec<LockEvent>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HISTORY)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push(decode(v.value(), &k.value().to_string())?);
        }
        Ok(out)
    }
}

/// What makes two locks of one holder the same dependency: the snapshot, the type, the value,
/// and the node it started from (the first of its path).
type DependencyKey<'a> = (SnapshotId, &'a LockType, &'a str, Option<&'a NodeId>);

fn dependency<'a>(
    snapshot: SnapshotId,
    lock_type: &'a LockType,
    value: &'a str,
    path: &'a [NodeId],
) -> DependencyKey<'a> {
    (snapshot, lock_type, value, path.first())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_newest_events_per_holder_and_summarises_the_rest() {
        // Each holder keeps its newest events; the older ones fold into its summary, and
        // another holder's events are not touched.
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        let tx = db.begin_write().unwrap();
        LockRegistry::ensure_tables(&tx).unwrap();
        let lock = |holder: &str, t: u64| SoftLock {
            volume: "v".parse().unwrap(),
            snapshot: SnapshotId::generate(t),
            lock_type: LockType::Application,
            value: "x".into(),
            holder: holder.parse().unwrap(),
            set_unix_ms: t,
            refreshed_unix_ms: t,
            lease_ms: None,
            path: vec![],
        };
        for t in 1..=10u64 {
            record_all(&tx, t, "release", &[lock("app:noisy", t)], "").unwrap();
            trim_history(&tx, "app:noisy", 3).unwrap();
        }
        record_all(&tx, 11, "break", &[lock("app:quiet", 11)], "").unwrap();
        trim_history(&tx, "app:quiet", 3).unwrap();
        tx.commit().unwrap();
        let reg = LockRegistry::new(&db);
        let h = reg.history().unwrap();
        let noisy: Vec<u64> = h
            .iter()
            .filter(|e| e.holder.as_str() == "app:noisy")
            .map(|e| e.unix_ms)
            .collect();
        assert_eq!(noisy, [8, 9, 10]);
        assert_eq!(
            h.iter()
                .filter(|e| e.holder.as_str() == "app:quiet")
                .count(),
            1
        );
        let sums = reg.history_summaries().unwrap();
        assert_eq!(sums.len(), 1);
        assert_eq!(sums[0].holder, "app:noisy");
        assert_eq!(sums[0].events["release"], 7);
        assert_eq!((sums[0].first_unix_ms, sums[0].last_unix_ms), (1, 7));
    }
}
