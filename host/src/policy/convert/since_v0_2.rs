//! holdfast:policy@0.2.0: the view is a resource (see `policy/view.rs`), snapshots are named by
//! numeric ids.

use std::fmt;

use super::super::bindings::since_v0_2::holdfast::policy::types as wit;
use super::super::view::ViewIndex;
use super::super::{Description, Phase, PruneProposal};
use crate::catalog::SnapshotRecord;
use crate::error::Result;
use crate::id::SnapshotId;
use crate::softlock::{LockType, SoftLock};

/// The id as WIT's `tuple<u64, u64>`: its high and low 64 bits.
pub fn id_to_wit(id: SnapshotId) -> wit::SnapshotId {
    let v = id.as_u128();
    ((v >> 64) as u64, v as u64)
}

pub fn id_from_wit((hi, lo): wit::SnapshotId) -> SnapshotId {
    SnapshotId::from_u128((u128::from(hi) << 64) | u128::from(lo))
}

/// A WIT id as users see ids (20 hex digits when it is a real one), for messages.
struct Shown(wit::SnapshotId);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}{:016x}", self.0.0, self.0.1)
    }
}

pub fn phase_to_wit(p: Phase) -> wit::Phase {
    match p {
        Phase::SnapshotCreated => wit::Phase::SnapshotCreated,
        Phase::BeforeMirror => wit::Phase::BeforeMirror,
        Phase::AfterMirror => wit::Phase::AfterMirror,
        Phase::Scheduled => wit::Phase::Scheduled,
        Phase::Retention => wit::Phase::Retention,
    }
}

pub fn phase_from_wit(p: wit::Phase) -> Phase {
    match p {
        wit::Phase::SnapshotCreated => Phase::SnapshotCreated,
        wit::Phase::BeforeMirror => Phase::BeforeMirror,
        wit::Phase::AfterMirror => Phase::AfterMirror,
        wit::Phase::Scheduled => Phase::Scheduled,
        wit::Phase::Retention => Phase::Retention,
    }
}

fn lock_type_to_wit(t: &LockType) -> wit::LockType {
    match t {
        LockType::OwnerName => wit::LockType::OwnerName,
        LockType::DestinationPath => wit::LockType::DestinationPath,
        LockType::QtreeName => wit::LockType::QtreeName,
        LockType::Application => wit::LockType::Application,
        LockType::Custom(tag) => wit::LockType::Custom(tag.clone()),
    }
}

fn lock_type_from_wit(t: wit::LockType) -> Result<LockType> {
    Ok(match t {
        wit::LockType::OwnerName => LockType::OwnerName,
        wit::LockType::DestinationPath => LockType::DestinationPath,
        wit::LockType::QtreeName => LockType::QtreeName,
        wit::LockType::Application => LockType::Application,
        wit::LockType::Custom(tag) => super::custom_lock_type(tag)?,
    })
}

/// Whether a lock's type is the one a filter names (a custom type by its tag).
pub fn lock_type_matches(want: &wit::LockType, have: &LockType) -> bool {
    match (want, have) {
        (wit::LockType::Custom(w), LockType::Custom(h)) => w == h,
        (w, h) => std::mem::discriminant(w) == std::mem::discriminant(&lock_type_to_wit(h)),
    }
}

pub fn lock_to_wit(l: &SoftLock, origin: wit::LockOrigin) -> wit::SoftLock {
    wit::SoftLock {
        snapshot: id_to_wit(l.snapshot),
        lock_type: lock_type_to_wit(&l.lock_type),
        value: l.value.clone(),
        holder: l.holder.to_string(),
        origin,
    }
}

pub fn snapshot_to_wit(s: &SnapshotRecord) -> wit::Snapshot {
    wit::Snapshot {
        id: id_to_wit(s.id),
        name: s.name.to_string(),
        created_unix_ms: s.created_unix_ms,
        size: s.size,
        labels: s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

pub fn description_from_wit(d: wit::Description) -> Result<Description> {
    super::description(
        d.name,
        d.version,
        d.phases.into_iter().map(phase_from_wit).collect(),
    )
}

/// Lock requests checked against the view (see [`super::check_lock`]).
pub fn locks_from_wit(
    index: &ViewIndex,
    answer: Vec<wit::LockRequest>,
) -> Result<Vec<(SnapshotId, LockType, String)>> {
    super::check_lock_count(answer.len())?;
    answer
        .into_iter()
        .map(|r| {
            super::check_lock(
                index,
                Some(id_from_wit(r.snapshot)),
                Shown(r.snapshot),
                || lock_type_from_wit(r.lock_type),
                r.value,
            )
        })
        .collect()
}

/// Prune proposals checked against the view (see [`super::check_prunes`]).
pub fn prunes_from_wit(
    index: &ViewIndex,
    answer: Vec<wit::PruneProposal>,
) -> Result<Vec<PruneProposal>> {
    super::check_prunes(
        index,
        answer
            .into_iter()
            .map(|p| (Some(id_from_wit(p.snapshot)), Shown(p.snapshot), p.reason)),
    )
}
