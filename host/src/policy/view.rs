//! The node's view as holdfast:policy@0.2.0 hands it out: a [`ViewIndex`] built once per
//! decision and shared by every policy asked, and the `node-view` resource methods a policy
//! calls on it, each answering only what was asked.
//!
//! Why a resource: every string and list that crosses into a component is allocated inside
//! it, one `realloc` call at a time. Copying a whole view (0.1) costs about 11,000 of them
//! with 1,000 snapshots and 1,000 locks, milliseconds per call; a 0.2 policy asks for a few
//! fixed-size records instead.
//!
//! # Invariants
//! - A view never changes during a call: every method answers from the same `NodeView`.
//! - Every method costs time and memory in proportion to its answer, and the answer is
//!   copied into the policy's memory (under its cap); a policy that asks in a loop runs into
//!   its deadline like any other loop.

use std::sync::{Arc, OnceLock};

use wasmtime::component::Resource;

use super::bindings::since_v0_2::holdfast::policy::types as wit;
use super::convert::since_v0_2::{
    id_from_wit, id_to_wit, lock_to_wit, lock_type_matches, phase_to_wit, snapshot_to_wit,
};
use super::{HostState, NodeView};
use crate::catalog::SnapshotRecord;
use crate::id::SnapshotId;

/// A view prepared for every policy of one decision: the domain view plus what the 0.2
/// methods answer most (the fixed-size snapshot list, the downstreams) and an index of the
/// local snapshots by id, which also validates every answer's snapshot ids (both versions).
#[derive(Debug)]
pub struct ViewIndex {
    pub view: NodeView,
    /// Each local snapshot's id and position in `view.local_snapshots`, sorted by id. The
    /// catalog lists snapshots by id already, so sorting costs one pass; a binary search is
    /// cheaper to build than a hash map and as quick to ask for a thousand ids.
    by_id: Vec<(SnapshotId, usize)>,
    local: Vec<wit::SnapshotInfo>,
    downstreams: Vec<wit::Downstream>,
    /// A hash of everything a policy can see, computed the first time a call needs it.
    digest: OnceLock<[u8; 32]>,
}

impl ViewIndex {
    pub fn new(view: NodeView) -> Self {
        let mut by_id: Vec<(SnapshotId, usize)> = view
            .local_snapshots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, i))
            .collect();
        by_id.sort_unstable();
        let has = |id: &SnapshotId| by_id.binary_search_by_key(id, |(s, _)| *s).is_ok();
        let local = view.local_snapshots.iter().map(info).collect();
        // Only ids this node has: a downstream's lock on a snapshot pruned here (with
        // --break-locks) is no base for its next transfer.
        let downstreams = view
            .downstreams
            .iter()
            .map(|(holder, ids)| wit::Downstream {
                holder: holder.to_string(),
                common: ids
                    .iter()
                    .filter(|id| has(id))
                    .map(|id| id_to_wit(*id))
                    .collect(),
            })
            .collect();
        ViewIndex {
            view,
            by_id,
            local,
            downstreams,
            digest: OnceLock::new(),
        }
    }

    /// A hash of everything a policy can learn from the view (the node, volume, phase, time,
    /// the snapshots' ids, names, times, sizes and labels, the upstream's snapshots, every
    /// lock's snapshot, type, value and holder, the downstreams): the seed of a call's
    /// randomness, so that the same view gives the same answer. What a policy cannot see
    /// (a lock's lease, a snapshot's transfer statistics) is left out, so it changes nothing.
    pub fn digest(&self) -> [u8; 32] {
        *self.digest.get_or_init(|| {
            let v = &self.view;
            let snapshot = |s: &SnapshotRecord| {
                (
                    s.id,
                    s.name.as_str().to_string(),
                    s.created_unix_ms,
                    s.size,
                    s.labels.clone(),
                )
            };
            let lock = |l: &crate::softlock::SoftLock| {
                (
                    l.snapshot,
                    l.lock_type.clone(),
                    l.value.clone(),
                    l.holder.to_string(),
                )
            };
            let visible = (
                v.node_id.to_string(),
                v.volume.to_string(),
                v.phase.to_string(),
                v.now_unix_ms,
                v.local_snapshots.iter().map(snapshot).collect::<Vec<_>>(),
                v.upstream_snapshots
                    .as_ref()
                    .map(|u| u.iter().map(snapshot).collect::<Vec<_>>()),
                v.locks_held_here.iter().map(lock).collect::<Vec<_>>(),
                v.locks_from_downstream.iter().map(lock).collect::<Vec<_>>(),
                v.downstreams
                    .iter()
                    .map(|(h, ids)| (h.to_string(), ids.clone()))
                    .collect::<Vec<_>>(),
            );
            let mut hasher = blake3::Hasher::new_derive_key("holdfast policy view v1");
            // Writing into a hasher cannot fail.
            postcard::to_io(&visible, &mut hasher).expect("hashing a view");
            *hasher.finalize().as_bytes()
        })
    }

    /// The local snapshot with this id, if the volume has it on this node.
    pub fn local(&self, id: SnapshotId) -> Option<&SnapshotRecord> {
        let i = self.by_id.binary_search_by_key(&id, |(s, _)| *s).ok()?;
        Some(&self.view.local_snapshots[self.by_id[i].1])
    }

    pub fn has(&self, id: SnapshotId) -> bool {
        self.local(id).is_some()
    }

    fn matching(&self, keep: impl Fn(&SnapshotRecord) -> bool) -> Vec<wit::SnapshotInfo> {
        self.view
            .local_snapshots
            .iter()
            .zip(&self.local)
            .filter(|(s, _)| keep(s))
            .map(|(_, i)| *i)
            .collect()
    }

    fn with_label(&self, key: &str, value: Option<&str>) -> Vec<wit::SnapshotInfo> {
        self.matching(|s| {
            s.labels
                .get(key)
                .is_some_and(|v| value.is_none_or(|want| v == want))
        })
    }

    fn with_name_prefix(&self, prefix: &str) -> Vec<wit::SnapshotInfo> {
        self.matching(|s| s.name.as_str().starts_with(prefix))
    }

    fn locks(&self, filter: &wit::LockFilter) -> Vec<wit::SoftLock> {
        let snapshot = filter.snapshot.map(id_from_wit);
        let mut out = Vec::new();
        for (origin, locks) in [
            (wit::LockOrigin::Here, &self.view.locks_held_here),
            (
                wit::LockOrigin::Downstream,
                &self.view.locks_from_downstream,
            ),
        ] {
            if filter.origin.is_some_and(|o| o != origin) {
                continue;
            }
            out.extend(
                locks
                    .iter()
                    .filter(|l| {
                        filter
                            .holder
                            .as_deref()
                            .is_none_or(|h| l.holder.as_str() == h)
                            && snapshot.is_none_or(|s| l.snapshot == s)
                            && filter
                                .lock_type
                                .as_ref()
                                .is_none_or(|t| lock_type_matches(t, &l.lock_type))
                    })
                    .map(|l| lock_to_wit(l, origin)),
            );
        }
        out
    }
}

fn info(s: &SnapshotRecord) -> wit::SnapshotInfo {
    wit::SnapshotInfo {
        id: id_to_wit(s.id),
        created_unix_ms: s.created_unix_ms,
        size: s.size,
    }
}

/// What the `node-view` resource of one call refers to, in the store's resource table.
#[derive(Debug)]
pub struct ViewHandle(pub Arc<ViewIndex>);

impl HostState {
    fn index(&self, r: &Resource<ViewHandle>) -> wasmtime::Result<&ViewIndex> {
        Ok(&self.table.get(r)?.0)
    }
}

impl wit::Host for HostState {}

impl wit::HostNodeView for HostState {
    fn node_id(&mut self, r: Resource<ViewHandle>) -> wasmtime::Result<String> {
        Ok(self.index(&r)?.view.node_id.to_string())
    }

    fn volume(&mut self, r: Resource<ViewHandle>) -> wasmtime::Result<String> {
        Ok(self.index(&r)?.view.volume.to_string())
    }

    fn phase(&mut self, r: Resource<ViewHandle>) -> wasmtime::Result<wit::Phase> {
        Ok(phase_to_wit(self.index(&r)?.view.phase))
    }

    fn now_unix_ms(&mut self, r: Resource<ViewHandle>) -> wasmtime::Result<u64> {
        Ok(self.index(&r)?.view.now_unix_ms)
    }

    fn local_snapshots(
        &mut self,
        r: Resource<ViewHandle>,
    ) -> wasmtime::Result<Vec<wit::SnapshotInfo>> {
        Ok(self.index(&r)?.local.clone())
    }

    fn snapshot(
        &mut self,
        r: Resource<ViewHandle>,
        id: wit::SnapshotId,
    ) -> wasmtime::Result<Option<wit::Snapshot>> {
        Ok(self.index(&r)?.local(id_from_wit(id)).map(snapshot_to_wit))
    }

    fn snapshots_with_label(
        &mut self,
        r: Resource<ViewHandle>,
        key: String,
        value: Option<String>,
    ) -> wasmtime::Result<Vec<wit::SnapshotInfo>> {
        Ok(self.index(&r)?.with_label(&key, value.as_deref()))
    }

    fn snapshots_with_name_prefix(
        &mut self,
        r: Resource<ViewHandle>,
        prefix: String,
    ) -> wasmtime::Result<Vec<wit::SnapshotInfo>> {
        Ok(self.index(&r)?.with_name_prefix(&prefix))
    }

    fn upstream_snapshots(
        &mut self,
        r: Resource<ViewHandle>,
    ) -> wasmtime::Result<Option<Vec<wit::SnapshotInfo>>> {
        Ok(self
            .index(&r)?
            .view
            .upstream_snapshots
            .as_ref()
            .map(|u| u.iter().map(info).collect()))
    }

    fn locks(
        &mut self,
        r: Resource<ViewHandle>,
        filter: wit::LockFilter,
    ) -> wasmtime::Result<Vec<wit::SoftLock>> {
        Ok(self.index(&r)?.locks(&filter))
    }

    fn downstreams(&mut self, r: Resource<ViewHandle>) -> wasmtime::Result<Vec<wit::Downstream>> {
        Ok(self.index(&r)?.downstreams.clone())
    }

    fn drop(&mut self, r: Resource<ViewHandle>) -> wasmtime::Result<()> {
        // Only the host creates views and the policy only borrows them, so this runs when
        // the host itself releases the handle after the call.
        self.table.delete(r)?;
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::policy::Phase;
    use crate::softlock::{LockType, SoftLock};

    /// A view of volume `v` with snapshots s0..s{n-1} (s{i} labelled `backup=done` when i is
    /// even, `backup=pending` when odd), a lock set here by `app:x` on s0 and locks from
    /// `nodeB/v` on s1 and s2 and on one snapshot this node does not have.
    pub fn view(n: usize) -> NodeView {
        let snaps: Vec<SnapshotRecord> = (0..n)
            .map(|i| SnapshotRecord {
                id: SnapshotId::from_u128(((1_000 + i as u128) << 32) | 7),
                volume: "v".parse().unwrap(),
                name: format!("{}{i}", if i < 2 { "hourly-" } else { "s" })
                    .parse()
                    .unwrap(),
                created_unix_ms: 1_000 + i as u64,
                size: 4096,
                block_size: 4096,
                labels: [(
                    "backup".to_string(),
                    if i % 2 == 0 { "done" } else { "pending" }.to_string(),
                )]
                .into(),
                parent: None,
                stats: Default::default(),
                regions: Default::default(),
            })
            .collect();
        let lock = |id: SnapshotId, t: LockType, holder: &str| SoftLock {
            volume: "v".parse().unwrap(),
            snapshot: id,
            lock_type: t,
            value: format!("by {holder}"),
            holder: holder.parse().unwrap(),
            set_unix_ms: 0,
            refreshed_unix_ms: 0,
            lease_ms: None,
            path: vec![],
        };
        let gone = SnapshotId::from_u128(999 << 32);
        let b = |id| lock(id, LockType::DestinationPath, "nodeB/v");
        NodeView {
            node_id: "a".parse().unwrap(),
            volume: "v".parse().unwrap(),
            phase: Phase::BeforeMirror,
            now_unix_ms: 5_000,
            locks_held_here: vec![lock(snaps[0].id, LockType::Custom("tape".into()), "app:x")],
            locks_from_downstream: vec![b(gone), b(snaps[1].id), b(snaps[2].id)],
            downstreams: vec![(
                "nodeB/v".parse().unwrap(),
                vec![gone, snaps[1].id, snaps[2].id],
            )],
            local_snapshots: snaps,
            upstream_snapshots: None,
        }
    }

    fn filter() -> wit::LockFilter {
        wit::LockFilter {
            origin: None,
            holder: None,
            lock_type: None,
            snapshot: None,
        }
    }

    #[test]
    fn downstreams_share_only_snapshots_this_node_has() {
        // nodeB locks three snapshots, one of them not here: its common list has two, oldest
        // first, as numeric ids.
        let v = view(4);
        let want = vec![
            id_to_wit(v.local_snapshots[1].id),
            id_to_wit(v.local_snapshots[2].id),
        ];
        let index = ViewIndex::new(v);
        assert_eq!(index.downstreams.len(), 1);
        assert_eq!(index.downstreams[0].holder, "nodeB/v");
        assert_eq!(index.downstreams[0].common, want);
        assert_eq!(index.local.len(), 4);
        assert_eq!(index.local[3].created_unix_ms, 1_003);
    }

    #[test]
    fn lock_filters_match_every_field_that_is_set() {
        // The empty filter lists all four locks, here first; each field narrows.
        let index = ViewIndex::new(view(4));
        let s1 = id_to_wit(index.view.local_snapshots[1].id);
        let all = index.locks(&filter());
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].holder, "app:x");
        assert_eq!(all[0].origin, wit::LockOrigin::Here);
        let count = |f: wit::LockFilter| index.locks(&f).len();
        let downstream = wit::LockFilter {
            origin: Some(wit::LockOrigin::Downstream),
            ..filter()
        };
        assert_eq!(count(downstream), 3);
        let by_holder = wit::LockFilter {
            holder: Some("app:x".into()),
            ..filter()
        };
        assert_eq!(count(by_holder), 1);
        let custom = |tag: &str| wit::LockFilter {
            lock_type: Some(wit::LockType::Custom(tag.into())),
            ..filter()
        };
        assert_eq!(count(custom("tape")), 1);
        assert_eq!(count(custom("disk")), 0);
        let dest = wit::LockFilter {
            lock_type: Some(wit::LockType::DestinationPath),
            snapshot: Some(s1),
            ..filter()
        };
        let found = index.locks(&dest);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].snapshot, s1);
        assert_eq!(found[0].value, "by nodeB/v");
        let nothing = wit::LockFilter {
            origin: Some(wit::LockOrigin::Here),
            holder: Some("nodeB/v".into()),
            ..filter()
        };
        assert_eq!(count(nothing), 0);
    }

    #[test]
    fn snapshots_are_found_by_label_and_name_prefix_oldest_first() {
        // Odd snapshots are pending; s0 and s1 are named hourly-*.
        let index = ViewIndex::new(view(5));
        let ids = |found: Vec<wit::SnapshotInfo>| {
            found.iter().map(|s| id_from_wit(s.id)).collect::<Vec<_>>()
        };
        let local = &index.view.local_snapshots;
        assert_eq!(
            ids(index.with_label("backup", Some("pending"))),
            [local[1].id, local[3].id]
        );
        assert_eq!(index.with_label("backup", None).len(), 5);
        assert!(index.with_label("other", None).is_empty());
        assert!(index.with_label("backup", Some("pend")).is_empty());
        assert_eq!(
            ids(index.with_name_prefix("hourly-")),
            [local[0].id, local[1].id]
        );
        assert_eq!(index.with_name_prefix("").len(), 5);
        let full = snapshot_to_wit(index.local(local[3].id).unwrap());
        assert_eq!(full.name, "s3");
        assert_eq!(full.labels, [("backup".into(), "pending".into())]);
        assert!(index.local(SnapshotId::from_u128(1)).is_none());
    }
}
