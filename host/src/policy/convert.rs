//! Conversions between the domain and the generated WIT types, with the validation of every
//! answer a policy gives (DESIGN.md invariant 6: the host checks, the policy only asks). One
//! submodule per WIT version converts its types; the checks themselves are here, shared, so a
//! 0.1 and a 0.2 policy are held to exactly the same rules.

pub mod since_v0_1;
pub mod since_v0_2;

use std::collections::HashSet;
use std::fmt;

use super::view::ViewIndex;
use super::{Description, Phase, PruneProposal};
use crate::error::{Error, Result};
use crate::id::{SnapshotId, validate_name};
use crate::softlock::{LockType, MAX_LOCKS_PER_SET, validate_value};

/// Longest prune reason kept, in bytes.
const MAX_REASON_BYTES: usize = 1024;

pub fn description(name: String, version: String, phases: Vec<Phase>) -> Result<Description> {
    validate_name("policy name", &name)?;
    crate::id::validate_text("policy version", &version, 64)?;
    Ok(Description {
        name,
        version,
        phases,
    })
}

/// At most a lock set's worth of requests.
pub fn check_lock_count(n: usize) -> Result<()> {
    if n > MAX_LOCKS_PER_SET {
        return Err(Error::invalid(format!(
            "asked for {n} locks; the limit is {MAX_LOCKS_PER_SET}"
        )));
    }
    Ok(())
}

/// One lock request checked against the view: the snapshot exists (`id` is `None` when the
/// policy named it in a form that cannot name one; `shown` is how it named it), the value is
/// bounded, a custom type's tag is a valid name.
pub fn check_lock(
    index: &ViewIndex,
    id: Option<SnapshotId>,
    shown: impl fmt::Display,
    lock_type: impl FnOnce() -> Result<LockType>,
    value: String,
) -> Result<(SnapshotId, LockType, String)> {
    let Some(id) = id.filter(|id| index.has(*id)) else {
        return Err(Error::invalid(format!(
            "asked to lock snapshot {:?}, which does not exist on this node",
            crate::id::shorten(&shown.to_string())
        )));
    };
    validate_value(&value)?;
    Ok((id, lock_type()?, value))
}

/// A custom lock tag from a policy: a valid name.
pub fn custom_lock_type(tag: String) -> Result<LockType> {
    validate_name("custom lock tag", &tag)?;
    Ok(LockType::Custom(tag))
}

/// Prune proposals checked against the view: each names an existing snapshot, once (the first
/// proposal of a snapshot wins); reasons are bounded and printable.
pub fn check_prunes<D: fmt::Display>(
    index: &ViewIndex,
    answer: impl IntoIterator<Item = (Option<SnapshotId>, D, String)>,
) -> Result<Vec<PruneProposal>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (id, shown, mut reason) in answer {
        let Some(id) = id.filter(|id| index.has(*id)) else {
            return Err(Error::invalid(format!(
                "proposed to prune snapshot {:?}, which does not exist on this node",
                crate::id::shorten(&shown.to_string())
            )));
        };
        // Shown to operators: no controls, and no characters that reorder or hide the text
        // around them (as everywhere else a name or value is shown).
        let bad = crate::id::is_hazard;
        if reason.len() > MAX_REASON_BYTES || reason.chars().any(bad) {
            reason = crate::id::shorten(&reason.replace(bad, " "));
        }
        if seen.insert(id) {
            out.push(PruneProposal {
                snapshot: id,
                reason,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::bindings::since_v0_1::holdfast::policy::types as v01;
    use super::super::bindings::since_v0_2::holdfast::policy::types as v02;
    use super::super::view::tests::view;
    use super::*;

    proptest! {
        #[test]
        fn numeric_ids_round_trip_and_sort_as_ids(a in 0u128..1 << 80, b in 0u128..1 << 80) {
            // (high, low) and back is the same id; tuples compare as the ids do; the text
            // form the WIT documents is the id's own.
            let (a, b) = (SnapshotId::from_u128(a), SnapshotId::from_u128(b));
            let (wa, wb) = (since_v0_2::id_to_wit(a), since_v0_2::id_to_wit(b));
            prop_assert_eq!(since_v0_2::id_from_wit(wa), a);
            prop_assert_eq!(wa.cmp(&wb), a.cmp(&b));
            prop_assert_eq!(format!("{:04x}{:016x}", wa.0, wa.1), a.to_string());
        }
    }

    fn index() -> ViewIndex {
        ViewIndex::new(view(3))
    }

    #[test]
    fn lock_requests_are_checked_alike_in_both_versions() {
        // A real snapshot with a good value passes; a ghost, a 0.1 id in capitals, an empty or
        // oversized value and a bad custom tag are refused, whichever version asked.
        let index = index();
        let id = index.view.local_snapshots[1].id;
        let ghost = SnapshotId::from_u128(42);
        let v01 = |id: String, t: v01::LockType, value: &str| {
            since_v0_1::locks_from_wit(
                &index,
                vec![v01::LockRequest {
                    snapshot_id: id,
                    lock_type: t,
                    value: value.into(),
                }],
            )
        };
        let v02 = |id: SnapshotId, t: v02::LockType, value: &str| {
            since_v0_2::locks_from_wit(
                &index,
                vec![v02::LockRequest {
                    snapshot: since_v0_2::id_to_wit(id),
                    lock_type: t,
                    value: value.into(),
                }],
            )
        };
        let want = vec![(id, LockType::Custom("tape".into()), "ok".to_string())];
        let tape01 = || v01::LockType::Custom("tape".into());
        let tape02 = || v02::LockType::Custom("tape".into());
        assert_eq!(v01(id.to_string(), tape01(), "ok").unwrap(), want);
        assert_eq!(v02(id, tape02(), "ok").unwrap(), want);
        let refused = |r: Result<Vec<(SnapshotId, LockType, String)>>, needle: &str| {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        };
        let gone = "does not exist on this node";
        refused(v01(ghost.to_string(), tape01(), "ok"), gone);
        refused(v02(ghost, tape02(), "ok"), gone);
        refused(v01(id.to_string().to_uppercase(), tape01(), "ok"), gone);
        refused(v01("x".into(), tape01(), "ok"), gone);
        refused(v02(SnapshotId::from_u128(u128::MAX), tape02(), "ok"), gone);
        let long = "x".repeat(2000);
        for value in ["", long.as_str()] {
            assert!(v01(id.to_string(), tape01(), value).is_err());
            assert!(v02(id, tape02(), value).is_err());
        }
        assert!(v01(id.to_string(), v01::LockType::Custom("a b".into()), "ok").is_err());
        assert!(v02(id, v02::LockType::Custom("a b".into()), "ok").is_err());
    }

    #[test]
    fn more_locks_than_a_set_holds_are_refused_before_any_is_looked_at() {
        // MAX_LOCKS_PER_SET + 1 requests (all naming a ghost) fail on their number.
        let index = index();
        let many = (0..=MAX_LOCKS_PER_SET)
            .map(|_| v02::LockRequest {
                snapshot: (0, 1),
                lock_type: v02::LockType::Application,
                value: String::new(),
            })
            .collect();
        let e = since_v0_2::locks_from_wit(&index, many)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("the limit is {MAX_LOCKS_PER_SET}")),
            "{e}"
        );
    }

    #[test]
    fn prune_proposals_name_real_snapshots_once_with_printable_reasons() {
        // The first proposal of a snapshot wins; control characters become spaces; a ghost
        // rejects the whole plan.
        let index = index();
        let ids: Vec<SnapshotId> = index.view.local_snapshots.iter().map(|s| s.id).collect();
        let p = |id: SnapshotId, reason: &str| v02::PruneProposal {
            snapshot: since_v0_2::id_to_wit(id),
            reason: reason.into(),
        };
        let plan = since_v0_2::prunes_from_wit(
            &index,
            vec![
                p(ids[0], "old\nline"),
                p(ids[2], "b\u{202e}kcab"),
                p(ids[0], "again"),
            ],
        )
        .unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].snapshot, ids[0]);
        assert_eq!(plan[0].reason, "old line");
        assert_eq!(plan[1].snapshot, ids[2]);
        // Nor a character that makes the rest read backwards (the fuzz review found it).
        assert_eq!(plan[1].reason, "b kcab");
        let e = since_v0_2::prunes_from_wit(
            &index,
            vec![p(ids[0], "a"), p(SnapshotId::from_u128(9), "b")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("does not exist on this node"), "{e}");
        let old = since_v0_1::prunes_from_wit(
            &index,
            vec![v01::PruneProposal {
                snapshot_id: ids[1].to_string(),
                reason: "r".into(),
            }],
        )
        .unwrap();
        assert_eq!(old[0].snapshot, ids[1]);
    }
}
