//! holdfast:policy@0.1.0: the whole view as one record, ids as text.

use super::super::bindings::since_v0_1::holdfast::policy::types as wit;
use super::super::view::ViewIndex;
use super::super::{Description, NodeView, Phase, PruneProposal};
use crate::catalog::SnapshotRecord;
use crate::error::Result;
use crate::id::SnapshotId;
use crate::softlock::{LockType, SoftLock};

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

fn lock_to_wit(l: &SoftLock) -> wit::SoftLock {
    wit::SoftLock {
        snapshot_id: l.snapshot.to_string(),
        lock_type: lock_type_to_wit(&l.lock_type),
        value: l.value.clone(),
        holder: l.holder.to_string(),
    }
}

fn snapshot_to_wit(s: &SnapshotRecord) -> wit::Snapshot {
    wit::Snapshot {
        id: s.id.to_string(),
        volume: s.volume.to_string(),
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

pub fn view_to_wit(v: &NodeView) -> wit::NodeView {
    wit::NodeView {
        node_id: v.node_id.to_string(),
        volume: v.volume.to_string(),
        phase: phase_to_wit(v.phase),
        now_unix_ms: v.now_unix_ms,
        local_snapshots: v.local_snapshots.iter().map(snapshot_to_wit).collect(),
        upstream_snapshots: v
            .upstream_snapshots
            .as_ref()
            .map(|u| u.iter().map(snapshot_to_wit).collect()),
        locks_held_here: v.locks_held_here.iter().map(lock_to_wit).collect(),
        locks_from_downstream: v.locks_from_downstream.iter().map(lock_to_wit).collect(),
        downstreams: v
            .downstreams
            .iter()
            .map(|(holder, ids)| wit::Downstream {
                holder: holder.to_string(),
                common_snapshot_ids: ids.iter().map(|i| i.to_string()).collect(),
            })
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

/// The snapshot a 0.1 answer names: its id exactly as the view wrote it (20 lowercase hex
/// digits), else none.
fn named(id: &str) -> Option<SnapshotId> {
    if id.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    id.parse().ok()
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
                named(&r.snapshot_id),
                &r.snapshot_id,
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
            .map(|p| (named(&p.snapshot_id), p.snapshot_id, p.reason)),
    )
}
