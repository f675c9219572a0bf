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
    history_per_holder_of(std::env::var("HOLDFAST_HISTORY_PER_HOLDER").ok().as_deref())
}

/// `HOLDFAST_HISTORY_PER_HOLDER`'s value: a positive number, or the default.
fn history_per_holder_of(setting: Option<&str>) -> u64 {
    setting
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

/// What every lock set must be before the registry takes it, from whoever it comes: a bounded
/// number of bounded, printable values, each through a path shorter than any cascade.
pub fn check_update(update: &LockSetUpdate) -> Result<()> {
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
    Ok(())
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
        check_update(&update)?;
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

/// The registry against a real catalog: what each operation stores, refuses and records.
#[cfg(test)]
mod registry_tests {
    use super::*;
    use crate::catalog::{Catalog, VolumeRecord};

    struct Fx {
        _dir: tempfile::TempDir,
        c: Catalog,
        vm1: VolumeName,
        vm10: VolumeName,
        /// Snapshots of vm1, then one of vm10 (last).
        s: Vec<SnapshotId>,
    }

    impl Fx {
        fn reg(&self) -> LockRegistry<'_> {
            self.c.locks()
        }
        fn t0(&self) -> SnapshotId {
            *self.s.last().unwrap()
        }
    }

    /// vm1 with four snapshots, vm10 (whose keys share vm1's prefix) with one.
    fn fixture() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let c = crate::catalog::tests::catalog(&dir);
        ensure_tables_in(c.db()).unwrap();
        let mut s = Vec::new();
        for (vol, n) in [("vm1", 4u64), ("vm10", 1)] {
            let v: VolumeName = vol.parse().unwrap();
            c.add_volume(&VolumeRecord::image(v.clone(), "/x.img".into(), 65536))
                .unwrap();
            for i in 0..n {
                let rec = SnapshotRecord {
                    id: SnapshotId::generate(1_000 + s.len() as u64),
                    volume: v.clone(),
                    name: format!("s{i}").parse().unwrap(),
                    created_unix_ms: 1_000 + s.len() as u64,
                    size: 1 << 20,
                    block_size: 65536,
                    labels: Default::default(),
                    parent: None,
                    stats: Default::default(),
                    regions: Default::default(),
                };
                c.commit_snapshot(&rec).unwrap();
                s.push(rec.id);
            }
        }
        Fx {
            _dir: dir,
            c,
            vm1: "vm1".parse().unwrap(),
            vm10: "vm10".parse().unwrap(),
            s,
        }
    }

    fn app(name: &str) -> HolderId {
        HolderId::application(name).unwrap()
    }

    fn lock(snapshot: SnapshotId, value: &str) -> NewLock {
        NewLock {
            snapshot,
            lock_type: LockType::Application,
            value: value.into(),
            lease_ms: None,
            path: vec![],
        }
    }

    fn set(
        volume: &VolumeName,
        holder: &HolderId,
        generation: u64,
        locks: Vec<NewLock>,
    ) -> LockSetUpdate {
        LockSetUpdate {
            volume: volume.clone(),
            holder: holder.clone(),
            generation,
            locks,
        }
    }

    /// Snapshot → its holders, sorted, as `locked_snapshots` says.
    fn locked(fx: &Fx, volume: &VolumeName) -> BTreeMap<SnapshotId, Vec<String>> {
        fx.reg()
            .locked_snapshots(volume)
            .unwrap()
            .into_iter()
            .map(|(s, mut h)| {
                h.sort();
                (s, h.iter().map(|h| h.to_string()).collect())
            })
            .collect()
    }

    fn the_set(fx: &Fx, volume: &VolumeName, holder: &HolderId) -> Option<LockSet> {
        fx.reg()
            .sets(Some(volume))
            .unwrap()
            .into_iter()
            .find(|s| s.holder == *holder)
    }

    /// Deletes a snapshot through the catalog with the registry's guard, as every deletion
    /// path does; the locks broken, or the refusal.
    fn delete(fx: &Fx, volume: &VolumeName, id: SnapshotId, brk: bool) -> Result<Vec<SoftLock>> {
        let mut broken = Vec::new();
        let brk = brk.then(|| BreakLocks {
            reason: "operator said so".into(),
        });
        fx.c.remove_snapshot(volume, &id, |tx, rec| {
            broken = guard_delete(tx, rec, brk.as_ref(), crate::now_unix_ms())?;
            Ok(())
        })?;
        Ok(broken)
    }

    fn pause() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    #[test]
    fn a_newer_set_replaces_an_older_one_is_ignored_and_the_same_generation_only_refreshes() {
        let fx = fixture();
        let (vm1, s) = (&fx.vm1, &fx.s);
        let a = app("backup");
        // A duplicate in the set counts once.
        let out = fx
            .reg()
            .replace_set(set(
                vm1,
                &a,
                5,
                vec![lock(s[0], "x"), lock(s[1], "y"), lock(s[0], "x")],
            ))
            .unwrap();
        assert_eq!(
            out,
            ReplaceOutcome::Replaced {
                generation: 5,
                locks: 2,
                released: 0
            }
        );
        let first = the_set(&fx, vm1, &a).unwrap();
        assert_eq!((first.generation, first.locks.len()), (5, 2));
        let set_at = first.locks[0].set_unix_ms;

        // Older: nothing changes.
        let out = fx.reg().replace_set(set(vm1, &a, 4, vec![])).unwrap();
        assert_eq!(
            out,
            ReplaceOutcome::IgnoredStale {
                generation: 4,
                stored: 5
            }
        );
        assert_eq!(the_set(&fx, vm1, &a).unwrap(), first);

        // The same generation again refreshes the stored locks; its content is not read.
        pause();
        let out = fx.reg().replace_set(set(vm1, &a, 5, vec![])).unwrap();
        assert_eq!(out, ReplaceOutcome::Refreshed { generation: 5 });
        let refreshed = the_set(&fx, vm1, &a).unwrap();
        assert_eq!(refreshed.locks.len(), 2);
        assert!(refreshed.refreshed_unix_ms > first.refreshed_unix_ms);
        for (l, old) in refreshed.locks.iter().zip(&first.locks) {
            assert!(l.refreshed_unix_ms > old.refreshed_unix_ms);
            assert_eq!(l.set_unix_ms, old.set_unix_ms);
        }

        // Newer: s1 is released (and recorded), s0 keeps the time it was first set, s2 is new.
        pause();
        let out = fx
            .reg()
            .replace_set(set(vm1, &a, 6, vec![lock(s[0], "x"), lock(s[2], "z")]))
            .unwrap();
        assert_eq!(
            out,
            ReplaceOutcome::Replaced {
                generation: 6,
                locks: 2,
                released: 1
            }
        );
        let third = the_set(&fx, vm1, &a).unwrap();
        let on = |id: SnapshotId| third.locks.iter().find(|l| l.snapshot == id).unwrap();
        assert_eq!(on(s[0]).set_unix_ms, set_at);
        assert!(on(s[2]).set_unix_ms > set_at);
        let h = fx.reg().history().unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(
            (h[0].event.as_str(), h[0].snapshot, h[0].value.as_str()),
            ("release", s[1], "y")
        );
        assert!(h[0].detail.contains("generation 6"), "{}", h[0].detail);
        let want: BTreeMap<_, _> = [
            (s[0], vec!["app:backup".to_string()]),
            (s[2], vec!["app:backup".to_string()]),
        ]
        .into();
        assert_eq!(locked(&fx, vm1), want);

        // An empty set releases everything and leaves no set behind.
        let out = fx.reg().replace_set(set(vm1, &a, 7, vec![])).unwrap();
        assert_eq!(
            out,
            ReplaceOutcome::Replaced {
                generation: 7,
                locks: 0,
                released: 2
            }
        );
        assert!(fx.reg().sets(None).unwrap().is_empty());
        assert!(locked(&fx, vm1).is_empty());
        assert_eq!(fx.reg().history().unwrap().len(), 3);

        // replace_own_set goes one generation above whatever is stored.
        fx.reg()
            .replace_set(set(vm1, &a, 9, vec![lock(s[3], "w")]))
            .unwrap();
        let out = fx
            .reg()
            .replace_own_set(vm1, a.clone(), vec![lock(s[0], "x")])
            .unwrap();
        assert_eq!(
            out,
            ReplaceOutcome::Replaced {
                generation: 10,
                locks: 1,
                released: 1
            }
        );
        let out = fx
            .reg()
            .replace_own_set(vm1, app("fresh"), vec![lock(s[0], "x")])
            .unwrap();
        assert_eq!(
            out,
            ReplaceOutcome::Replaced {
                generation: 1,
                locks: 1,
                released: 0
            }
        );
    }

    #[test]
    fn a_set_is_checked_whole_and_a_refused_one_changes_nothing() {
        let fx = fixture();
        let (vm1, s) = (&fx.vm1, &fx.s);
        let a = app("backup");
        fx.reg()
            .replace_set(set(vm1, &a, 1, vec![lock(s[0], "x")]))
            .unwrap();
        let before = fx.reg().sets(None).unwrap();
        let refused = |update: LockSetUpdate, says: &str| {
            let e = fx.reg().replace_set(update).unwrap_err();
            assert!(e.to_string().contains(says), "{says}: {e}");
            assert_eq!(fx.reg().sets(None).unwrap(), before);
        };
        // One lock on a snapshot the volume does not have (vm10's) spoils the set.
        refused(
            set(vm1, &a, 2, vec![lock(s[1], "x"), lock(fx.t0(), "x")]),
            "no snapshot with id",
        );
        refused(
            set(
                vm1,
                &a,
                2,
                vec![lock(
                    s[1],
                    &"v".repeat(crate::softlock::MAX_VALUE_BYTES + 1),
                )],
            ),
            "lock value",
        );
        // A path as deep as a cascade may be passes; one node more is refused.
        let path = |n: usize| {
            (0..n)
                .map(|i| format!("n{i}").parse().unwrap())
                .collect::<Vec<NodeId>>()
        };
        let mut deep = lock(s[1], "x");
        deep.path = path(crate::softlock::MAX_LOCK_PATH + 1);
        refused(set(vm1, &a, 2, vec![deep.clone()]), "a cascade is at most");
        deep.path = path(crate::softlock::MAX_LOCK_PATH);
        fx.reg().replace_set(set(vm1, &a, 2, vec![deep])).unwrap();
        let before = fx.reg().sets(None).unwrap();
        let refused = |update: LockSetUpdate, says: &str| {
            let e = fx.reg().replace_set(update).unwrap_err();
            assert!(e.to_string().contains(says), "{says}: {e}");
            assert_eq!(fx.reg().sets(None).unwrap(), before);
        };
        // The most locks a set may hold pass; one more is refused.
        let many = |n: usize| {
            (0..n)
                .map(|i| lock(s[2], &i.to_string()))
                .collect::<Vec<_>>()
        };
        refused(set(vm1, &a, 3, many(MAX_LOCKS_PER_SET + 1)), "at most");
        let out = fx
            .reg()
            .replace_set(set(vm1, &a, 3, many(MAX_LOCKS_PER_SET)))
            .unwrap();
        assert!(
            matches!(
                out,
                ReplaceOutcome::Replaced {
                    locks: MAX_LOCKS_PER_SET,
                    ..
                }
            ),
            "{out:?}"
        );
        // And `add` then refuses a new dependency, but still refreshes one it has.
        let e = fx.reg().add(vm1, &a, lock(s[3], "new")).unwrap_err();
        assert!(e.to_string().contains("already has"), "{e}");
        fx.reg().add(vm1, &a, lock(s[2], "7")).unwrap();
    }

    #[test]
    fn add_refreshes_the_same_dependency_and_keeps_the_holders_generation() {
        let fx = fixture();
        let (vm1, s) = (&fx.vm1, &fx.s);
        let a = app("backup");
        let first = fx.reg().add(vm1, &a, lock(s[0], "x")).unwrap();
        pause();
        let mut again = lock(s[0], "x");
        again.lease_ms = Some(60_000);
        let second = fx.reg().add(vm1, &a, again).unwrap();
        assert_eq!(second.set_unix_ms, first.set_unix_ms);
        assert!(second.refreshed_unix_ms > first.refreshed_unix_ms);
        assert_eq!(second.lease_ms, Some(60_000));
        fx.reg().add(vm1, &a, lock(s[0], "other")).unwrap();
        let stored = the_set(&fx, vm1, &a).unwrap();
        assert_eq!((stored.generation, stored.locks.len()), (0, 2));
        assert_eq!(stored.locks[0], second);
        // A holder's own set keeps its generation through local additions.
        fx.reg()
            .replace_set(set(vm1, &a, 4, vec![lock(s[1], "y")]))
            .unwrap();
        fx.reg().add(vm1, &a, lock(s[2], "z")).unwrap();
        assert_eq!(the_set(&fx, vm1, &a).unwrap().generation, 4);
        // Only snapshots the volume has.
        let e = fx.reg().add(vm1, &a, lock(fx.t0(), "x")).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        assert_eq!(the_set(&fx, vm1, &a).unwrap().locks.len(), 2);
    }

    #[test]
    fn a_deletion_is_refused_naming_every_holder_and_a_break_is_recorded() {
        let fx = fixture();
        let (vm1, s) = (&fx.vm1, &fx.s);
        let (a, b) = (app("a"), app("b"));
        let down = HolderId::mirror(&"c".parse().unwrap(), vm1);
        fx.reg()
            .replace_set(set(vm1, &a, 3, vec![lock(s[0], "x"), lock(s[2], "x")]))
            .unwrap();
        fx.reg()
            .replace_set(set(vm1, &down, 8, vec![lock(s[0], "c/vm1")]))
            .unwrap();
        fx.reg().add(vm1, &b, lock(s[1], "y")).unwrap();
        // The same holder on vm10: not a lock on vm1's snapshots.
        fx.reg().add(&fx.vm10, &a, lock(fx.t0(), "x")).unwrap();

        let e = delete(&fx, vm1, s[0], false).unwrap_err();
        assert!(matches!(e, Error::Locked(_)), "{e}");
        let msg = e.to_string();
        for says in [
            "2 soft lock(s)",
            "app:a holds it",
            "c/vm1 holds it",
            "--break-locks",
        ] {
            assert!(msg.contains(says), "{says}: {msg}");
        }
        assert!(!msg.contains("app:b"), "{msg}");
        assert_eq!(fx.c.snapshots(vm1).unwrap().len(), 4);
        let e = delete(&fx, vm1, s[1], false).unwrap_err();
        assert!(e.to_string().contains("app:b holds it"), "{e}");

        // Broken: both locks go, in the same transaction, and the history says who and why.
        let broken = delete(&fx, vm1, s[0], true).unwrap();
        let mut holders: Vec<String> = broken.iter().map(|l| l.holder.to_string()).collect();
        holders.sort();
        assert_eq!(holders, ["app:a", "c/vm1"]);
        assert_eq!(fx.c.snapshots(vm1).unwrap().len(), 3);
        let h = fx.reg().history().unwrap();
        assert_eq!(h.len(), 2);
        for e in &h {
            assert_eq!((e.event.as_str(), e.snapshot), ("break", s[0]));
            assert!(
                e.detail.contains("operator said so") && e.detail.contains("vm1@s0"),
                "{}",
                e.detail
            );
        }
        assert!(fx.reg().locks_on(vm1, &s[0]).unwrap().is_empty());
        let want: BTreeMap<_, _> = [
            (s[1], vec!["app:b".to_string()]),
            (s[2], vec!["app:a".to_string()]),
        ]
        .into();
        assert_eq!(locked(&fx, vm1), want);
        // The holders' generations are theirs: a break does not move them; an emptied set goes.
        assert_eq!(the_set(&fx, vm1, &a).unwrap().generation, 3);
        assert!(the_set(&fx, vm1, &down).is_none());
        assert_eq!(fx.reg().locks_on(&fx.vm10, &fx.t0()).unwrap().len(), 1);

        // An unlocked snapshot is deleted without a word.
        assert!(delete(&fx, vm1, s[3], false).unwrap().is_empty());
        assert_eq!(fx.reg().history().unwrap().len(), 2);
    }

    #[test]
    fn release_takes_one_snapshot_one_volume_or_everything_of_one_holder() {
        let fx = fixture();
        let (vm1, s) = (&fx.vm1, &fx.s);
        let (a, b) = (app("a"), app("b"));
        fx.reg()
            .replace_set(set(vm1, &a, 3, vec![lock(s[0], "x"), lock(s[1], "x")]))
            .unwrap();
        fx.reg().add(&fx.vm10, &a, lock(fx.t0(), "x")).unwrap();
        fx.reg().add(vm1, &b, lock(s[0], "y")).unwrap();
        let before = the_set(&fx, vm1, &a).unwrap();
        pause();
        let gone = fx
            .reg()
            .release(&a, Some(vm1), Some(&s[0]), "done with it")
            .unwrap();
        assert_eq!(gone.iter().map(|l| l.snapshot).collect::<Vec<_>>(), [s[0]]);
        let after = the_set(&fx, vm1, &a).unwrap();
        assert_eq!(after.generation, 3);
        assert!(after.refreshed_unix_ms > before.refreshed_unix_ms);
        assert_eq!(fx.reg().locks_on(vm1, &s[0]).unwrap()[0].holder, b);
        let h = fx.reg().history().unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(
            (
                h[0].event.as_str(),
                h[0].detail.as_str(),
                h[0].holder.clone()
            ),
            ("release", "done with it", a.clone())
        );

        let gone = fx.reg().release(&a, Some(vm1), None, "").unwrap();
        assert_eq!(gone.iter().map(|l| l.snapshot).collect::<Vec<_>>(), [s[1]]);
        assert_eq!(fx.reg().locks_on(&fx.vm10, &fx.t0()).unwrap().len(), 1);
        let gone = fx.reg().release(&a, None, None, "").unwrap();
        assert_eq!(
            gone.iter().map(|l| l.snapshot).collect::<Vec<_>>(),
            [fx.t0()]
        );
        assert!(fx.reg().release(&a, None, None, "").unwrap().is_empty());
        assert_eq!(fx.reg().history().unwrap().len(), 3);
        let sets = fx.reg().sets(None).unwrap();
        assert_eq!(
            sets.iter().map(|s| s.holder.clone()).collect::<Vec<_>>(),
            [b]
        );
    }

    #[test]
    fn stale_locks_go_only_for_holders_that_asked_and_only_where_asked() {
        let fx = fixture();
        let (vm1, s) = (&fx.vm1, &fx.s);
        let (auto, manual) = (app("auto"), app("manual"));
        let leased = |id: SnapshotId| NewLock {
            lease_ms: Some(1),
            ..lock(id, "x")
        };
        fx.reg().add(vm1, &auto, leased(s[0])).unwrap();
        fx.reg().add(vm1, &auto, lock(s[1], "x")).unwrap();
        fx.reg().add(&fx.vm10, &auto, leased(fx.t0())).unwrap();
        fx.reg().add(vm1, &manual, leased(s[0])).unwrap();
        pause();
        // Nobody opted in: nothing goes, stale or not.
        assert!(fx.reg().expire_stale().unwrap().is_empty());
        assert_eq!(fx.reg().locks_on(vm1, &s[0]).unwrap().len(), 2);

        let on = HolderSettings {
            auto_release_stale: true,
        };
        fx.reg().set_settings(&auto, &on).unwrap();
        fx.reg()
            .set_settings(&manual, &HolderSettings::default())
            .unwrap();
        let all = fx.reg().all_settings().unwrap();
        assert_eq!(
            (all[&auto].clone(), all[&manual].clone()),
            (on, HolderSettings::default())
        );

        // A deletion in vm1 expires vm1's stale locks first (and only vm1's).
        delete(&fx, vm1, s[3], false).unwrap();
        let on_s0 = fx.reg().locks_on(vm1, &s[0]).unwrap();
        assert_eq!(
            on_s0.iter().map(|l| l.holder.as_str()).collect::<Vec<_>>(),
            ["app:manual"]
        );
        assert_eq!(fx.reg().locks_on(vm1, &s[1]).unwrap().len(), 1);
        assert_eq!(fx.reg().locks_on(&fx.vm10, &fx.t0()).unwrap().len(), 1);
        let h = fx.reg().history().unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!((h[0].event.as_str(), h[0].snapshot), ("expire", s[0]));
        assert!(h[0].detail.contains("auto-release"), "{}", h[0].detail);

        let gone = fx.reg().expire_stale().unwrap();
        assert_eq!(
            gone.iter().map(|l| l.snapshot).collect::<Vec<_>>(),
            [fx.t0()]
        );
        assert!(fx.reg().expire_stale().unwrap().is_empty());
        assert_eq!(fx.reg().history().unwrap().len(), 2);
        let want: BTreeMap<_, _> = [
            (s[0], vec!["app:manual".to_string()]),
            (s[1], vec!["app:auto".to_string()]),
        ]
        .into();
        assert_eq!(locked(&fx, vm1), want);
    }

    #[test]
    fn the_tables_are_made_once_and_an_older_history_is_indexed_by_holder() {
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        assert!(!tables_present(&db.begin_read().unwrap()).unwrap());
        // A history written by a release before the per-holder index.
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(HISTORY).unwrap();
            for (seq, holder) in [(1u64, "app:old"), (2, "app:old"), (3, "app:other")] {
                let e = LockEvent {
                    seq,
                    unix_ms: 100 * seq,
                    event: "release".into(),
                    holder: holder.parse().unwrap(),
                    volume: "v".parse().unwrap(),
                    snapshot: SnapshotId::generate(seq),
                    lock_type: LockType::Application,
                    value: "x".into(),
                    detail: String::new(),
                };
                t.insert(seq, encode(&e).unwrap().as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
        assert!(!tables_present(&db.begin_read().unwrap()).unwrap());
        ensure_tables_in(&db).unwrap();
        assert!(tables_present(&db.begin_read().unwrap()).unwrap());
        // Trimming uses the index: app:old's events fold into its summary, app:other's stay.
        let tx = db.begin_write().unwrap();
        trim_history(&tx, "app:old", 0).unwrap();
        tx.commit().unwrap();
        let reg = LockRegistry::new(&db);
        let h = reg.history().unwrap();
        assert_eq!(h.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        let sums = reg.history_summaries().unwrap();
        assert_eq!(sums.len(), 1);
        assert_eq!(
            (
                sums[0].events["release"],
                sums[0].first_unix_ms,
                sums[0].last_unix_ms
            ),
            (2, 100, 200)
        );
        // Made once: a second call writes nothing (and keeps what is there).
        ensure_tables_in(&db).unwrap();
        assert_eq!(reg.history().unwrap().len(), 1);
    }

    #[test]
    fn a_summary_spans_the_trimmed_events_even_when_the_clock_stepped_back() {
        // Events are trimmed in the order they were recorded; their times need not be (a
        // clock set back): the summary still spans the earliest to the latest.
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        ensure_tables_in(&db).unwrap();
        let tx = db.begin_write().unwrap();
        for (t, event) in [
            (50u64, "release"),
            (30, "expire"),
            (70, "release"),
            (40, "break"),
        ] {
            let l = SoftLock {
                volume: "v".parse().unwrap(),
                snapshot: SnapshotId::generate(t),
                lock_type: LockType::Application,
                value: "x".into(),
                holder: "app:a".parse().unwrap(),
                set_unix_ms: t,
                refreshed_unix_ms: t,
                lease_ms: None,
                path: vec![],
            };
            record_all(&tx, t, event, [&l], "").unwrap();
        }
        trim_history(&tx, "app:a", 1).unwrap();
        tx.commit().unwrap();
        let sums = LockRegistry::new(&db).history_summaries().unwrap();
        assert_eq!((sums[0].first_unix_ms, sums[0].last_unix_ms), (30, 70));
        let counts: Vec<(&str, u64)> = sums[0]
            .events
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(counts, [("expire", 1), ("release", 2)]);
        let kept = LockRegistry::new(&db).history().unwrap();
        assert_eq!(
            (kept.len(), kept[0].unix_ms, kept[0].event.as_str()),
            (1, 40, "break")
        );
    }

    #[test]
    fn the_history_kept_per_holder_is_a_positive_number_or_the_default() {
        assert_eq!(history_per_holder_of(None), DEFAULT_HISTORY_PER_HOLDER);
        assert_eq!(history_per_holder_of(Some("25")), 25);
        assert_eq!(history_per_holder_of(Some("0")), DEFAULT_HISTORY_PER_HOLDER);
        assert_eq!(
            history_per_holder_of(Some("many")),
            DEFAULT_HISTORY_PER_HOLDER
        );
        assert_eq!(history_per_holder_of(Some("1")), 1);
    }
}
