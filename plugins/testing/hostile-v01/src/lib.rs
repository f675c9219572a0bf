//! The misbehaving policy of `testing/hostile`, built against holdfast:policy@0.1.0: the host
//! must contain a 0.1 component's faults as it contains a 0.2 one's. `mode` (config) picks the
//! fault: loop (never returns), alloc (asks for 1 GiB), trap (panics), ghost (locks a snapshot
//! that does not exist), prune-all (proposes every snapshot, locked or not), refuse (answers
//! with an error), huge-value (a 10 MB lock value), ok (behaves).

wit_bindgen::generate!({ world: "policy", path: "../../../wit/since_v0.1.0" });

use holdfast::policy::config;
use holdfast::policy::types::{LockType, Phase};

struct Hostile;

fn misbehave(view: &NodeView) -> Result<(), String> {
    match config::get("mode").as_deref() {
        Some("loop") => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        Some("alloc") => {
            let v = vec![1u8; 1 << 30];
            std::hint::black_box(&v);
            Ok(())
        }
        Some("trap") => panic!("hostile policy panics on purpose"),
        Some("refuse") => Err("hostile policy refuses on purpose".into()),
        _ => {
            let _ = view;
            Ok(())
        }
    }
}

impl Guest for Hostile {
    fn describe() -> Description {
        Description {
            name: "hostile-v01".into(),
            version: "0.0.1".into(),
            phases: vec![Phase::SnapshotCreated, Phase::Retention],
        }
    }

    fn decide_locks(view: NodeView) -> Result<Vec<LockRequest>, String> {
        misbehave(&view)?;
        match config::get("mode").as_deref() {
            Some("ghost") => Ok(vec![LockRequest {
                snapshot_id: "ffffffffffffffffffff".into(),
                lock_type: LockType::Application,
                value: "ghost".into(),
            }]),
            Some("huge-value") => Ok(vec![LockRequest {
                snapshot_id: view
                    .local_snapshots
                    .first()
                    .map(|s| s.id.clone())
                    .unwrap_or_default(),
                lock_type: LockType::Application,
                value: "x".repeat(10 << 20),
            }]),
            _ => Ok(Vec::new()),
        }
    }

    fn plan_retention(view: NodeView) -> Result<Vec<PruneProposal>, String> {
        misbehave(&view)?;
        match config::get("mode").as_deref() {
            Some("prune-all") | Some("ok") => Ok(view
                .local_snapshots
                .iter()
                .map(|s| PruneProposal {
                    snapshot_id: s.id.clone(),
                    reason: "hostile: prune everything".into(),
                })
                .collect()),
            Some("ghost") => Ok(vec![PruneProposal {
                snapshot_id: "ffffffffffffffffffff".into(),
                reason: "ghost".into(),
            }]),
            _ => Ok(Vec::new()),
        }
    }
}

export!(Hostile);
