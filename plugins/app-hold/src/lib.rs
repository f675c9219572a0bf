//! app-hold: a backup application's policy. Locks every snapshot whose labels or name match
//! the configuration, with type `application` and the application's owner name, so the
//! snapshot stays until the application has copied it and relabels it.
//!
//! Config: `label=KEY:VALUE` (e.g. `backup:pending`) and/or `name-prefix=PREFIX`;
//! `owner=NAME` (default `backup-app`) is the lock's value.
//!
//! Built against holdfast:policy@0.2.0: the host does the matching, so only the matching
//! snapshots' ids cross into the policy.

wit_bindgen::generate!({ world: "policy", path: "../../wit/since_v0.2.0" });

use std::collections::BTreeSet;

use holdfast::policy::config;
use holdfast::policy::types::{LockType, Phase};

struct AppHold;

impl Guest for AppHold {
    fn describe() -> Description {
        Description {
            name: "app-hold".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            phases: vec![
                Phase::SnapshotCreated,
                Phase::BeforeMirror,
                Phase::Scheduled,
            ],
        }
    }

    fn decide_locks(view: &NodeView) -> Result<Vec<LockRequest>, String> {
        let label = match config::get("label") {
            None => None,
            Some(l) => Some(
                l.split_once(':')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| format!("config label={l:?} must be KEY:VALUE"))?,
            ),
        };
        let prefix = config::get("name-prefix");
        if label.is_none() && prefix.is_none() {
            return Err("configure label=KEY:VALUE and/or name-prefix=PREFIX".into());
        }
        let owner = config::get("owner").unwrap_or_else(|| "backup-app".into());
        // A snapshot matching both the label and the prefix is locked once; ids sort oldest
        // first, as the view lists them.
        let mut matched = BTreeSet::new();
        if let Some((key, value)) = &label {
            matched.extend(
                view.snapshots_with_label(key, Some(value))
                    .iter()
                    .map(|s| s.id),
            );
        }
        if let Some(prefix) = &prefix {
            matched.extend(view.snapshots_with_name_prefix(prefix).iter().map(|s| s.id));
        }
        Ok(matched
            .into_iter()
            .map(|id| LockRequest {
                snapshot: id,
                lock_type: LockType::Application,
                value: owner.clone(),
            })
            .collect())
    }

    fn plan_retention(_view: &NodeView) -> Result<Vec<PruneProposal>, String> {
        // It holds, it never prunes; it is not a retention policy (no retention phase in
        // `describe`), so this is never asked. The host refreshes every policy's locks
        // before it prunes anyway.
        Ok(Vec::new())
    }
}

export!(AppHold);
