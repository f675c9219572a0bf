//! keep-base as it was built against holdfast:policy@0.1.0, kept for the host's tests and
//! benchmark: a 0.1 component must still register and decide exactly as the 0.2 keep-base
//! does, and the benchmark shows what copying the whole 0.1 view costs.
//!
//! Config: `n` (default 1): how many common snapshots to keep per downstream.

wit_bindgen::generate!({ world: "policy", path: "../../../wit/since_v0.1.0" });

use holdfast::policy::config;
use holdfast::policy::log::{Level, log};
use holdfast::policy::types::{LockType, Phase};

struct KeepBase;

impl Guest for KeepBase {
    fn describe() -> Description {
        Description {
            name: "keep-base".into(),
            version: "0.1.0".into(),
            phases: vec![
                Phase::SnapshotCreated,
                Phase::BeforeMirror,
                Phase::AfterMirror,
                Phase::Scheduled,
            ],
        }
    }

    fn decide_locks(view: NodeView) -> Result<Vec<LockRequest>, String> {
        let n: usize = match config::get("n") {
            None => 1,
            Some(v) => v
                .parse()
                .map_err(|_| format!("config n={v:?} is not a number"))?,
        };
        let local: std::collections::HashSet<&str> =
            view.local_snapshots.iter().map(|s| s.id.as_str()).collect();
        let mut out = Vec::new();
        for d in &view.downstreams {
            // Ids sort by creation time: the newest common ones are at the end.
            let mut common: Vec<&String> = d
                .common_snapshot_ids
                .iter()
                .filter(|id| local.contains(id.as_str()))
                .collect();
            common.sort();
            for id in common.iter().rev().take(n) {
                out.push(LockRequest {
                    snapshot_id: (*id).clone(),
                    lock_type: LockType::DestinationPath,
                    value: d.holder.clone(),
                });
            }
        }
        log(
            Level::Debug,
            &format!(
                "keeping {} base(s) for {} downstream(s)",
                out.len(),
                view.downstreams.len()
            ),
        );
        Ok(out)
    }

    fn plan_retention(_view: NodeView) -> Result<Vec<PruneProposal>, String> {
        // Not a retention policy (its phases do not include retention): no opinion.
        Ok(Vec::new())
    }
}

export!(KeepBase);
