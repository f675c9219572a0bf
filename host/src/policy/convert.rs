//! Conversions between the domain and the generated WIT types, with the validation of every
//! answer a policy gives (DESIGN.md invariant 6: the host checks, the policy only asks).

use std::collections::HashSet;

use super::bindings::holdfast::policy::types as wit;
use super::{Description, NodeView, Phase, PruneProposal};
use crate::error::{Error, Result};
use crate::id::{SnapshotId, validate_name};
use crate::softlock::{LockType, MAX_LOCKS_PER_SET, SoftLock, validate_value};

/// Longest prune reason kept, in bytes.
const MAX_REASON_BYTES: usize = 1024;

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
        wit::LockType::Custom(tag) => {
            validate_name("custom lock tag", &tag)?;
            LockType::Custom(tag)
        }
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

fn snapshot_to_wit(s: &crate::catalog::SnapshotRecord) -> wit::Snapshot {
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
    validate_name("policy name", &d.name)?;
    crate::id::validate_text("policy version", &d.version, 64)?;
    Ok(Description {
        name: d.name,
        version: d.version,
        phases: d.phases.into_iter().map(phase_from_wit).collect(),
    })
}

/// A lock request checked against the view: the snapshot exists, the value is bounded.
pub fn locks_from_wit(
    view: &NodeView,
    answer: Vec<wit::LockRequest>,
) -> Result<Vec<(SnapshotId, LockType, String)>> {
    if answer.len() > MAX_LOCKS_PER_SET {
        return Err(Error::invalid(format!(
            "asked for {} locks; the limit is {MAX_LOCKS_PER_SET}",
            answer.len()
        )));
    }
    let known: HashSet<String> = view
        .local_snapshots
        .iter()
        .map(|s| s.id.to_string())
        .collect();
    answer
        .into_iter()
        .map(|r| {
            if !known.contains(&r.snapshot_id) {
                return Err(Error::invalid(format!(
                    "asked to lock snapshot {:?}, which does not exist on this node",
                    crate::id::shorten(&r.snapshot_id)
                )));
            }
            validate_value(&r.value)?;
            Ok((
                r.snapshot_id.parse()?,
                lock_type_from_wit(r.lock_type)?,
                r.value,
            ))
        })
        .collect()
}

/// Prune proposals checked against the view: each names an existing snapshot once.
pub fn prunes_from_wit(
    view: &NodeView,
    answer: Vec<wit::PruneProposal>,
) -> Result<Vec<PruneProposal>> {
    let known: HashSet<String> = view
        .local_snapshots
        .iter()
        .map(|s| s.id.to_string())
        .collect();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for p in answer {
        if !known.contains(&p.snapshot_id) {
            return Err(Error::invalid(format!(
                "proposed to prune snapshot {:?}, which does not exist on this node",
                crate::id::shorten(&p.snapshot_id)
            )));
        }
        let mut reason = p.reason;
        if reason.len() > MAX_REASON_BYTES || reason.chars().any(char::is_control) {
            reason = crate::id::shorten(&reason.replace(char::is_control, " "));
        }
        if seen.insert(p.snapshot_id.clone()) {
            out.push(PruneProposal {
                snapshot: p.snapshot_id.parse()?,
                reason,
            });
        }
    }
    Ok(out)
}
