//! keep-base: keep the newest N snapshots this node shares with each downstream as bases,
//! so every downstream's next transfer stays incremental.
//!
//! Config: `n` (default 1): how many common snapshots to keep per downstream.
//!
//! Built against holdfast:policy@0.2.0 (through the holdfast-policy crate): it asks the view only for the downstreams and what
//! they share with this node (a few numbers per downstream), and for each downstream's
//! qtree-name locks (a downstream that mirrors one region of the volume holds its base as one,
//! valued `VOLUME/REGION`), never for the whole snapshot list.

use holdfast_policy::{
    Description, LockFilter, LockRequest, LockType, NodeView, Phase, Policy, config, log,
};

struct KeepBase;

impl Policy for KeepBase {
    fn describe() -> Description {
        holdfast_policy::description!(&[
            Phase::SnapshotCreated,
            Phase::BeforeMirror,
            Phase::AfterMirror,
            Phase::Scheduled,
        ])
    }

    fn decide_locks(view: &NodeView) -> Result<Vec<LockRequest>, String> {
        let n = config::count("n", 1)?;
        let downstreams = view.downstreams();
        let mut out = Vec::new();
        for d in &downstreams {
            // A downstream that mirrors one region of the volume says which with its base
            // lock: type qtree-name, value VOLUME/REGION. Its bases are kept as that qtree's.
            // (A whole-volume replica holds its base as destination-path; a qtree-name lock
            // in its set then comes from a region mirror further down.)
            let of_type = |t: LockType| {
                view.locks(&LockFilter {
                    origin: None,
                    holder: Some(d.holder.clone()),
                    lock_type: Some(t),
                    snapshot: None,
                })
            };
            let region = if of_type(LockType::DestinationPath).is_empty() {
                of_type(LockType::QtreeName)
                    .into_iter()
                    .next()
                    .map(|l| l.value)
            } else {
                None
            };
            let (lock_type, value) = match region {
                Some(r) => (LockType::QtreeName, r),
                None => (LockType::DestinationPath, d.holder.clone()),
            };
            // The host lists only snapshots this node has, oldest first: the newest common
            // ones are at the end.
            for id in d.common.iter().rev().take(n) {
                out.push(LockRequest::new(*id, lock_type.clone(), value.clone()));
            }
        }
        log::debug(&format!(
            "keeping {} base(s) for {} downstream(s)",
            out.len(),
            downstreams.len()
        ));
        Ok(out)
    }

    // Not a retention policy (its phases do not include retention): `plan_retention` keeps
    // the default, no opinion.
}

holdfast_policy::export!(KeepBase);
