//! app-hold: a backup application's policy. Locks every snapshot whose labels or name match
//! the configuration, with type `application` and the application's owner name, so the
//! snapshot stays until the application has copied it and relabels it.
//!
//! Config: `label=KEY:VALUE` (e.g. `backup:pending`) and/or `name-prefix=PREFIX`;
//! `owner=NAME` (default `backup-app`) is the lock's value.
//!
//! Built against holdfast:policy@0.2.0 (through the holdfast-policy crate): the host does the
//! matching, so only the matching snapshots' ids cross into the policy. Its Python twin is
//! `plugins/app-hold-py`.

use std::collections::BTreeSet;

use holdfast_policy::{Description, LockRequest, NodeView, Phase, Policy, config};

struct AppHold;

impl Policy for AppHold {
    fn describe() -> Description {
        holdfast_policy::description!(&[
            Phase::SnapshotCreated,
            Phase::BeforeMirror,
            Phase::Scheduled,
        ])
    }

    fn decide_locks(view: &NodeView) -> Result<Vec<LockRequest>, String> {
        let label = config::pair("label")?;
        let prefix = config::get("name-prefix");
        if label.is_none() && prefix.is_none() {
            return Err("configure label=KEY:VALUE and/or name-prefix=PREFIX".into());
        }
        let owner = config::string("owner", "backup-app");
        // A snapshot matching both the label and the prefix is locked once; ids sort oldest
        // first, as the view lists them.
        let mut matched = BTreeSet::new();
        if let Some((key, value)) = &label {
            let with_label = view.snapshots_with_label(key, Some(value));
            matched.extend(with_label.iter().map(|s| s.id));
        }
        if let Some(prefix) = &prefix {
            matched.extend(view.snapshots_with_name_prefix(prefix).iter().map(|s| s.id));
        }
        Ok(matched
            .into_iter()
            .map(|id| LockRequest::application(id, owner.clone()))
            .collect())
    }

    // It holds, it never prunes: no retention phase, so `plan_retention` is never asked (the
    // default answers "nothing").
}

holdfast_policy::export!(AppHold);
