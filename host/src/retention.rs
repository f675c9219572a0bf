//! Built-in retention: keep the newest N snapshots and those younger than a duration; never
//! prune a locked one. Plan first (pure, testable), then execute through the same guarded
//! deletion as `snapshot delete`, so a lock set between planning and deleting still holds.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::catalog::SnapshotRecord;
use crate::error::{Error, Result};
use crate::id::{SnapshotId, VolumeName};
use crate::snapshot;
use crate::softlock::HolderId;
use crate::state::Node;

/// What to keep. At least one rule must be given: pruning everything is never a default.
#[derive(Clone, Debug, Default)]
pub struct KeepRules {
    pub keep_last: Option<usize>,
    pub keep_within: Option<Duration>,
}

/// One snapshot's fate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlanEntry {
    pub snapshot: String,
    pub id: SnapshotId,
    pub created_unix_ms: u64,
    pub prune: bool,
    /// Why it is kept: `keep-last`, `keep-within`, or `locked`.
    pub reasons: Vec<String>,
    /// Holders of locks on it (the reason it is kept when rules alone would prune it).
    pub locked_by: Vec<HolderId>,
}

/// The retention decision for one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PrunePlan {
    pub volume: VolumeName,
    pub entries: Vec<PlanEntry>,
}

impl PrunePlan {
    /// Decides for `snaps` (oldest first). Pure: no I/O.
    pub fn compute(
        volume: &VolumeName,
        snaps: &[SnapshotRecord],
        locked: &HashMap<SnapshotId, Vec<HolderId>>,
        rules: &KeepRules,
        now_ms: u64,
    ) -> Result<PrunePlan> {
        if rules.keep_last.is_none() && rules.keep_within.is_none() {
            return Err(Error::invalid(
                "give --keep-last N and/or --keep-within DURATION; holdfast never prunes \
                 without a rule",
            ));
        }
        let n = snaps.len();
        let entries = snaps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut reasons = Vec::new();
                if rules.keep_last.is_some_and(|k| i + k >= n) {
                    reasons.push("keep-last".to_string());
                }
                if rules.keep_within.is_some_and(|w| {
                    s.created_unix_ms.saturating_add(w.as_millis() as u64) >= now_ms
                }) {
                    reasons.push("keep-within".to_string());
                }
                let locked_by = locked.get(&s.id).cloned().unwrap_or_default();
                if !locked_by.is_empty() {
                    reasons.push("locked".to_string());
                }
                PlanEntry {
                    snapshot: s.display_ref(),
                    id: s.id,
                    created_unix_ms: s.created_unix_ms,
                    prune: reasons.is_empty(),
                    reasons,
                    locked_by,
                }
            })
            .collect();
        Ok(PrunePlan {
            volume: volume.clone(),
            entries,
        })
    }

    pub fn to_prune(&self) -> impl Iterator<Item = &PlanEntry> {
        self.entries.iter().filter(|e| e.prune)
    }

    /// Kept only because of a lock: the rules alone would have pruned it.
    pub fn kept_for_locks(&self) -> impl Iterator<Item = &PlanEntry> {
        self.entries
            .iter()
            .filter(|e| e.reasons.len() == 1 && e.reasons[0] == "locked")
    }
}

/// What a prune did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PruneReport {
    pub dry_run: bool,
    pub plan: PrunePlan,
    pub pruned: Vec<String>,
    /// Planned for pruning but locked by the time it was deleted.
    pub locked_meanwhile: Vec<String>,
}

/// Plans and (unless `dry_run`) executes retention for a volume.
pub async fn prune(
    node: &Node,
    volume: &VolumeName,
    rules: &KeepRules,
    dry_run: bool,
) -> Result<PruneReport> {
    node.catalog.volume(volume)?;
    if !dry_run {
        node.catalog.locks().expire_stale()?;
    }
    let snaps = node.catalog.snapshots(volume)?;
    let locked = node.catalog.locks().locked_snapshots(volume)?;
    let plan = PrunePlan::compute(volume, &snaps, &locked, rules, crate::now_unix_ms())?;
    let mut report = PruneReport {
        dry_run,
        plan,
        pruned: Vec::new(),
        locked_meanwhile: Vec::new(),
    };
    if dry_run {
        return Ok(report);
    }
    let by_id: HashMap<SnapshotId, &SnapshotRecord> = snaps.iter().map(|s| (s.id, s)).collect();
    for e in report.plan.entries.iter().filter(|e| e.prune) {
        match snapshot::delete(node, by_id[&e.id], None).await {
            Ok(_) => report.pruned.push(e.snapshot.clone()),
            Err(Error::Locked(_)) => report.locked_meanwhile.push(e.snapshot.clone()),
            Err(Error::NotFound(_)) => {} // deleted by someone else meanwhile
            Err(err) => return Err(err),
        }
    }
    Ok(report)
}

/// What a policy-driven prune did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyPruneReport {
    pub dry_run: bool,
    pub volume: VolumeName,
    /// Each retention policy's proposals, and those every one of them agreed on.
    pub decision: crate::policy::registry::RetentionDecision,
    /// Lock decisions refreshed before planning (failures keep the previous locks).
    pub lock_decisions: Vec<crate::policy::registry::LockDecision>,
    pub pruned: Vec<String>,
    /// Agreed by the policies but held by a lock: kept.
    pub kept_locked: Vec<(String, Vec<HolderId>)>,
}

/// The locks that hold the volume's snapshots once the policies' `decisions` are in force: the
/// registry's, where a decision that was not applied (a dry run, `policy test`) replaces its
/// policy's locks as a real run would. The dry run, `policy test` and the real prune all plan
/// against this, so they agree.
pub fn locks_after(
    node: &Node,
    volume: &VolumeName,
    decisions: &[crate::policy::registry::LockDecision],
    applied: bool,
) -> Result<HashMap<SnapshotId, Vec<HolderId>>> {
    let mut locked = node.catalog.locks().locked_snapshots(volume)?;
    if applied {
        return Ok(locked);
    }
    for d in decisions.iter().filter(|d| d.error.is_none()) {
        let holder = crate::policy::registry::policy_holder(&d.policy)?;
        for holders in locked.values_mut() {
            holders.retain(|h| *h != holder);
        }
        for (snapshot, _, _) in &d.locks {
            let holders = locked.entry(*snapshot).or_default();
            if !holders.contains(&holder) {
                holders.push(holder.clone());
            }
        }
    }
    locked.retain(|_, h| !h.is_empty());
    Ok(locked)
}

/// Retention by the volume's policies: refresh every policy's locks, ask every retention
/// policy, prune what all agree on and no lock holds. `Ok(None)` when the volume has no
/// retention policy. Any policy failure prunes nothing (fail closed).
pub async fn prune_by_policies(
    node: &Node,
    engine: &crate::policy::PolicyEngine,
    volume: &VolumeName,
    dry_run: bool,
) -> Result<Option<PolicyPruneReport>> {
    use crate::policy::{Phase, registry};
    node.catalog.volume(volume)?;
    let lock_decisions = registry::decide_locks(
        node,
        engine,
        volume,
        Phase::Retention,
        registry::Asked::Every,
        !dry_run,
    )?;
    let Some(decision) = registry::plan_retention(node, engine, volume, None, !dry_run)? else {
        return Ok(None);
    };
    if !dry_run {
        node.catalog.locks().expire_stale()?;
    }
    let locked = locks_after(node, volume, &lock_decisions, !dry_run)?;
    let snaps = node.catalog.snapshots(volume)?;
    let by_id: HashMap<SnapshotId, &SnapshotRecord> = snaps.iter().map(|s| (s.id, s)).collect();
    let mut report = PolicyPruneReport {
        dry_run,
        volume: volume.clone(),
        decision,
        lock_decisions,
        pruned: Vec::new(),
        kept_locked: Vec::new(),
    };
    for id in report.decision.agreed.clone() {
        let Some(rec) = by_id.get(&id) else { continue };
        if let Some(holders) = locked.get(&id) {
            report
                .kept_locked
                .push((rec.display_ref(), holders.clone()));
            continue;
        }
        if dry_run {
            report.pruned.push(rec.display_ref());
            continue;
        }
        match snapshot::delete(node, rec, None).await {
            Ok(_) => report.pruned.push(rec.display_ref()),
            Err(Error::Locked(_)) => report.kept_locked.push((rec.display_ref(), vec![])),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps(n: usize) -> Vec<SnapshotRecord> {
        (0..n)
            .map(|i| SnapshotRecord {
                id: SnapshotId::generate(1_000 + i as u64),
                volume: "v".parse().unwrap(),
                name: format!("s{i}").parse().unwrap(),
                created_unix_ms: 1_000 + i as u64 * 1_000,
                size: 0,
                block_size: 4096,
                labels: Default::default(),
                parent: None,
                stats: Default::default(),
                regions: Default::default(),
            })
            .collect()
    }

    #[test]
    fn keep_last_keeps_the_newest_and_locks_keep_the_rest() {
        // Five snapshots, keep the last two, s1 is locked: s0, s2 pruned; s1 kept for its lock.
        let s = snaps(5);
        let mut locked = HashMap::new();
        locked.insert(s[1].id, vec!["app:x".parse().unwrap()]);
        let rules = KeepRules {
            keep_last: Some(2),
            keep_within: None,
        };
        let p = PrunePlan::compute(&"v".parse().unwrap(), &s, &locked, &rules, 10_000).unwrap();
        let pruned: Vec<_> = p.to_prune().map(|e| e.snapshot.as_str()).collect();
        assert_eq!(pruned, ["v@s0", "v@s2"]);
        let for_locks: Vec<_> = p.kept_for_locks().map(|e| e.snapshot.as_str()).collect();
        assert_eq!(for_locks, ["v@s1"]);
    }

    #[test]
    fn keep_within_keeps_recent_ones_and_no_rule_is_an_error() {
        // Snapshots younger than the window are kept; a plan without rules is refused.
        let s = snaps(5); // created at 1s..5s
        let rules = KeepRules {
            keep_last: None,
            keep_within: Some(Duration::from_millis(2_500)),
        };
        let p =
            PrunePlan::compute(&"v".parse().unwrap(), &s, &HashMap::new(), &rules, 5_000).unwrap();
        assert_eq!(p.to_prune().count(), 2);
        assert!(
            PrunePlan::compute(
                &"v".parse().unwrap(),
                &s,
                &HashMap::new(),
                &KeepRules::default(),
                0
            )
            .is_err()
        );
    }

    #[test]
    fn a_locked_snapshot_is_never_planned_for_pruning() {
        // Whatever the rules, every locked snapshot is kept (invariant 2).
        let s = snaps(20);
        let locked: HashMap<_, _> = s
            .iter()
            .step_by(3)
            .map(|x| (x.id, vec!["n/v".parse().unwrap()]))
            .collect();
        let rules = KeepRules {
            keep_last: Some(0),
            keep_within: None,
        };
        let p = PrunePlan::compute(&"v".parse().unwrap(), &s, &locked, &rules, 0).unwrap();
        for e in p.to_prune() {
            assert!(!locked.contains_key(&e.id));
        }
        assert_eq!(p.to_prune().count(), 20 - locked.len());
    }
}
