//! A deliberately misbehaving policy for the host's tests (holdfast:policy@0.2.0; its 0.1 twin
//! is `testing/hostile-v01`). `mode` (config) picks the fault: loop (never returns), alloc
//! (asks for 1 GiB), trap (panics), ghost (locks a snapshot that does not exist), prune-all
//! (proposes every snapshot, locked or not), refuse (answers with an error), huge-value (a
//! 10 MB lock value), flood (asks for more locks than a set may hold), greedy (asks the view
//! for its snapshots again and again, never answering), random (locks the first snapshot with
//! a value drawn from `wasi:random`), ok (behaves). Without a mode it
//! answers nothing and asks the view nothing: the benchmark uses it to measure a bare call.

wit_bindgen::generate!({ world: "policy", path: "../../../wit/since_v0.2.0" });

use holdfast::policy::config;
use holdfast::policy::types::{LockFilter, LockType, Phase, SnapshotId};

struct Hostile;

/// No snapshot has this id: its creation time is past the year 10,000.
const GHOST: SnapshotId = (0xffff, u64::MAX);

/// One more than a lock set may hold (holdfast's MAX_LOCKS_PER_SET).
const TOO_MANY_LOCKS: usize = 100_001;

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
        Some("greedy") => loop {
            // The time goes into host calls and copies: the deadline must still hold.
            std::hint::black_box(view.local_snapshots());
            std::hint::black_box(view.locks(&LockFilter {
                origin: None,
                holder: None,
                lock_type: None,
                snapshot: None,
            }));
        },
        Some("trap") => panic!("hostile policy panics on purpose"),
        Some("refuse") => Err("hostile policy refuses on purpose".into()),
        _ => Ok(()),
    }
}

fn first_snapshot(view: &NodeView) -> SnapshotId {
    view.local_snapshots().first().map_or(GHOST, |s| s.id)
}

impl Guest for Hostile {
    fn describe() -> Description {
        Description {
            name: "hostile".into(),
            version: "0.0.1".into(),
            phases: vec![Phase::SnapshotCreated, Phase::Retention],
        }
    }

    fn decide_locks(view: &NodeView) -> Result<Vec<LockRequest>, String> {
        misbehave(view)?;
        match config::get("mode").as_deref() {
            Some("ghost") => Ok(vec![LockRequest {
                snapshot: GHOST,
                lock_type: LockType::Application,
                value: "ghost".into(),
            }]),
            Some("huge-value") => Ok(vec![LockRequest {
                snapshot: first_snapshot(view),
                lock_type: LockType::Application,
                value: "x".repeat(10 << 20),
            }]),
            Some("flood") => {
                let id = first_snapshot(view);
                Ok((0..TOO_MANY_LOCKS)
                    .map(|_| LockRequest {
                        snapshot: id,
                        lock_type: LockType::Application,
                        // Empty, so the flood is cheap to build: the count alone is refused.
                        value: String::new(),
                    })
                    .collect())
            }
            Some("random") => {
                // std seeds a hash map's keys from wasi:random.
                use std::hash::BuildHasher;
                let drawn = std::collections::hash_map::RandomState::new().hash_one(0u8);
                Ok(vec![LockRequest {
                    snapshot: first_snapshot(view),
                    lock_type: LockType::Application,
                    value: format!("drawn {drawn:016x}"),
                }])
            }
            _ => Ok(Vec::new()),
        }
    }

    fn plan_retention(view: &NodeView) -> Result<Vec<PruneProposal>, String> {
        misbehave(view)?;
        match config::get("mode").as_deref() {
            Some("prune-all") | Some("ok") => Ok(view
                .local_snapshots()
                .iter()
                .map(|s| PruneProposal {
                    snapshot: s.id,
                    reason: "hostile: prune everything".into(),
                })
                .collect()),
            Some("ghost") => Ok(vec![PruneProposal {
                snapshot: GHOST,
                reason: "ghost".into(),
            }]),
            _ => Ok(Vec::new()),
        }
    }
}

export!(Hostile);
