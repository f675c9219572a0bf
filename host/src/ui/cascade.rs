//! The cascade around a node, as the web page's map draws it: every mirror relation (an edge
//! from an upstream to a downstream for one volume) this node can learn of, with how far
//! behind the downstream is and how its transfers go.
//!
//! Three sources, each trusted only for what it can know:
//! - this node's own mirror jobs: the edges into this node, with their job's state;
//! - the lock sets its downstreams sent: every lock names the nodes it came through
//!   (`C -> B`), so each path is a chain of edges below this node, and the newest snapshot a
//!   downstream locks tells how far behind it is;
//! - its upstreams' views (`/v1/cascade`, asked with the tokens this node already has for
//!   them): the edges above it, as each upstream sees them, recursively up to
//!   [`MAX_LOCK_PATH`] nodes. An upstream answers only for the volumes it serves the asker.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{NodeId, VolumeName};
use crate::softlock::MAX_LOCK_PATH;

/// Most bytes of an upstream's cascade view.
pub const VIEW_LIMIT: usize = 4 << 20;
/// Most edges a view may hold, and a map may draw (a cascade of a hundred nodes with a hundred
/// volumes is far below); a node sends at most this many and keeps at most this many.
pub const MAX_EDGES: usize = 10_000;
/// Longest error message kept from a job or a peer.
const MAX_MESSAGE: usize = 512;

/// How an edge's transfers go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeState {
    /// The last transfer succeeded (or, seen through locks, the downstream's locks are fresh).
    Ok,
    /// A transfer is running now.
    Running,
    /// The last transfer failed.
    Failing,
    /// The downstream's locks outlived their lease: it has not been heard of for too long.
    Stale,
    /// No transfer has run yet.
    Unknown,
}

/// One mirror relation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Edge {
    pub volume: VolumeName,
    pub upstream: NodeId,
    pub downstream: NodeId,
    /// How old the newest snapshot the downstream has is (the age of its copy).
    pub lag_ms: Option<u64>,
    /// When the downstream's newest snapshot was taken on the volume's origin.
    pub newest_unix_ms: Option<u64>,
    /// When the last transfer ended (known to the downstream only).
    #[serde(default)]
    pub last_transfer_unix_ms: Option<u64>,
    pub state: EdgeState,
    #[serde(default)]
    pub error: Option<String>,
    /// The node that told: the downstream itself (its job) or a node above it (its locks).
    pub reported_by: NodeId,
}

/// What `/v1/cascade` answers: the edges above the answering node. Fields a newer node adds
/// are ignored (the view is only shown, and nodes of different versions share a cascade).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CascadeView {
    pub node: Option<NodeId>,
    pub edges: Vec<Edge>,
    /// Upstreams that could not be asked, and why.
    #[serde(default)]
    pub unreachable: Vec<Unreachable>,
}

/// An upstream that did not answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Unreachable {
    pub node: NodeId,
    pub asked_by: NodeId,
    pub error: String,
}

/// Cuts a message to [`MAX_MESSAGE`] bytes (at a character boundary).
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_MESSAGE {
        return s.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl CascadeView {
    /// Checks a view upstream `from` sent and keeps what it can know of: the relations of the
    /// volumes this node (`me`) mirrors from it (`mirrored`), none of them into or out of this
    /// node (this node knows those better), at most [`MAX_EDGES`] of them.
    pub fn checked(
        mut self,
        from: &NodeId,
        me: &NodeId,
        mirrored: &BTreeSet<VolumeName>,
    ) -> Result<Self> {
        if self.node.as_ref() != Some(from) {
            return Err(Error::denied(format!(
                "upstream {from} sent the cascade view of {:?}",
                self.node.as_ref().map(|n| n.as_str())
            )));
        }
        self.edges
            .retain(|e| mirrored.contains(&e.volume) && &e.upstream != me && &e.downstream != me);
        self.edges.truncate(MAX_EDGES);
        // Only upstreams of the relations kept, as asked by a node other than this one.
        let above: BTreeSet<&NodeId> = self.edges.iter().map(|e| &e.upstream).collect();
        self.unreachable
            .retain(|u| above.contains(&u.node) && &u.node != me && &u.asked_by != me);
        self.unreachable.truncate(MAX_EDGES);
        for e in &mut self.edges {
            e.error = e.error.as_deref().map(bounded);
        }
        for u in &mut self.unreachable {
            u.error = bounded(&u.error);
        }
        Ok(self)
    }
}

/// A relation of this node's own (it is the downstream), from its mirror job's status.
pub struct OwnRelation {
    pub volume: VolumeName,
    pub upstream: NodeId,
    pub newest_unix_ms: Option<u64>,
    pub running: bool,
    pub last_ok: Option<bool>,
    pub last_error: Option<String>,
    pub last_finished_unix_ms: Option<u64>,
}

impl OwnRelation {
    pub fn edge(&self, me: &NodeId, now: u64) -> Edge {
        let state = match (self.running, self.last_ok) {
            (true, _) => EdgeState::Running,
            (false, Some(true)) => EdgeState::Ok,
            (false, Some(false)) => EdgeState::Failing,
            (false, None) => EdgeState::Unknown,
        };
        Edge {
            volume: self.volume.clone(),
            upstream: self.upstream.clone(),
            downstream: me.clone(),
            lag_ms: self.newest_unix_ms.map(|c| now.saturating_sub(c)),
            newest_unix_ms: self.newest_unix_ms,
            last_transfer_unix_ms: self.last_finished_unix_ms,
            state,
            error: if self.last_ok == Some(false) {
                self.last_error.as_deref().map(bounded)
            } else {
                None
            },
            reported_by: me.clone(),
        }
    }
}

/// The edges below this node that its downstreams' locks reveal. `locks`: each lock's path
/// (the node it started on first, the downstream it came from last), the creation time of the
/// snapshot it pins, and whether its lease ran out.
pub fn edges_below<'a>(
    me: &NodeId,
    volume: &VolumeName,
    locks: impl IntoIterator<Item = (&'a [NodeId], Option<u64>, bool)>,
    now: u64,
) -> Vec<Edge> {
    // (upstream, downstream) -> (newest pinned snapshot, any stale lock)
    let mut seen: BTreeMap<(NodeId, NodeId), (Option<u64>, bool)> = BTreeMap::new();
    for (path, created, stale) in locks {
        // A path through this node, or through one node twice, is no route a lock takes:
        // it draws nothing (a downstream cannot make up relations of this node's own).
        let distinct: BTreeSet<&NodeId> = path.iter().collect();
        if path.is_empty()
            || path.len() > MAX_LOCK_PATH
            || distinct.len() != path.len()
            || distinct.contains(me)
        {
            continue;
        }
        // path[i]'s upstream is path[i + 1], and the last one's is this node.
        for (i, down) in path.iter().enumerate() {
            let up = path.get(i + 1).unwrap_or(me);
            if up == down {
                continue;
            }
            let e = seen.entry((up.clone(), down.clone())).or_default();
            // The locks that started on `down` or below it say what it holds; a stale lock
            // says that the node it started on has not renewed it.
            e.0 = e.0.max(created);
            e.1 |= stale && i == 0;
        }
    }
    seen.into_iter()
        .map(|((up, down), (newest, stale))| Edge {
            volume: volume.clone(),
            upstream: up,
            downstream: down,
            lag_ms: newest.map(|c| now.saturating_sub(c)),
            newest_unix_ms: newest,
            last_transfer_unix_ms: None,
            state: if stale {
                EdgeState::Stale
            } else {
                EdgeState::Ok
            },
            error: stale.then(|| {
                "its locks here outlived their lease: not heard of since (offline, or cut off)"
                    .to_string()
            }),
            reported_by: me.clone(),
        })
        .collect()
}

/// The map: every node and edge known, each edge once. What this node knows itself wins:
/// its own jobs, then its downstreams' locks, then its upstreams' views (where, of two reports
/// of one edge, the downstream's own wins). Edges from above that touch this node or a node
/// below it are left out: an upstream cannot know them better.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CascadeMap {
    pub node: Option<NodeId>,
    pub nodes: Vec<MapNode>,
    pub edges: Vec<Edge>,
    pub unreachable: Vec<Unreachable>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MapNode {
    pub name: NodeId,
    /// Hops from the roots (nodes no edge leads into): the map's column.
    pub depth: usize,
    pub this: bool,
}

pub fn map(
    me: &NodeId,
    own: Vec<Edge>,
    below: Vec<Edge>,
    mut above: Vec<Edge>,
    unreachable: Vec<Unreachable>,
) -> CascadeMap {
    // (volume, node) below this node: an upstream knows nothing of them this node does not.
    let below_nodes: BTreeSet<(VolumeName, NodeId)> = below
        .iter()
        .map(|e| (e.volume.clone(), e.downstream.clone()))
        .collect();
    above.retain(|e| {
        &e.upstream != me
            && &e.downstream != me
            && !below_nodes.contains(&(e.volume.clone(), e.downstream.clone()))
            && !below_nodes.contains(&(e.volume.clone(), e.upstream.clone()))
    });
    // Stable: of two reports from above, the downstream's own first.
    above.sort_by_key(|e| e.reported_by != e.downstream);
    let mut best: HashMap<(VolumeName, NodeId, NodeId), Edge> = HashMap::new();
    for e in own.into_iter().chain(below).chain(above).take(MAX_EDGES) {
        let key = (e.volume.clone(), e.upstream.clone(), e.downstream.clone());
        best.entry(key).or_insert(e);
    }
    let mut edges: Vec<Edge> = best.into_values().collect();
    edges.sort_by(|a, b| {
        (&a.volume, &a.upstream, &a.downstream).cmp(&(&b.volume, &b.upstream, &b.downstream))
    });
    let mut names: BTreeSet<NodeId> = edges
        .iter()
        .flat_map(|e| [e.upstream.clone(), e.downstream.clone()])
        .collect();
    names.insert(me.clone());
    // Depth: the longest chain of edges above a node (bounded, so a cycle cannot loop).
    let mut depth: BTreeMap<&NodeId, usize> = names.iter().map(|n| (n, 0)).collect();
    for _ in 0..names.len().min(MAX_LOCK_PATH * 4) {
        let mut changed = false;
        for e in &edges {
            let d = depth[&e.upstream] + 1;
            if d > depth[&e.downstream] && d <= MAX_LOCK_PATH * 4 {
                depth.insert(&e.downstream, d);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let nodes = names
        .iter()
        .map(|n| MapNode {
            name: n.clone(),
            depth: depth[n],
            this: n == me,
        })
        .collect();
    CascadeMap {
        node: Some(me.clone()),
        nodes,
        edges,
        unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    #[test]
    fn lock_paths_become_the_chain_of_edges_below() {
        let (a, b, c) = (n("a"), n("b"), n("c"));
        let vol: VolumeName = "vm".parse().unwrap();
        let own = [b.clone()];
        let through = [c.clone(), b.clone()];
        let edges = edges_below(
            &a,
            &vol,
            [
                (&own[..], Some(900), false),
                (&through[..], Some(500), false),
                (&through[..], Some(400), true),
            ],
            1000,
        );
        let got: Vec<(&str, &str, Option<u64>, EdgeState)> = edges
            .iter()
            .map(|e| {
                (
                    e.upstream.as_str(),
                    e.downstream.as_str(),
                    e.lag_ms,
                    e.state,
                )
            })
            .collect();
        // b's own lock and c's (through b) both say what b holds; only c's say what c holds,
        // and c's stale lock says c is not heard of, not b.
        assert_eq!(
            got,
            vec![
                ("a", "b", Some(100), EdgeState::Ok),
                ("b", "c", Some(500), EdgeState::Stale),
            ]
        );
        let fresh = edges_below(&a, &vol, [(&through[..], Some(500), false)], 1000);
        assert!(fresh.iter().all(|e| e.state == EdgeState::Ok));
        // Paths through this node, or through a node twice, draw nothing.
        let back = [c.clone(), a.clone(), b.clone()];
        let twice = [c.clone(), b.clone(), c.clone(), b.clone()];
        assert!(edges_below(&a, &vol, [(&back[..], Some(1), false)], 1000).is_empty());
        assert!(edges_below(&a, &vol, [(&twice[..], Some(1), false)], 1000).is_empty());
    }

    #[test]
    fn the_downstreams_own_report_wins_and_depths_follow_the_edges() {
        let (a, b, c) = (n("a"), n("b"), n("c"));
        let vol: VolumeName = "vm".parse().unwrap();
        let edge = |up: &NodeId, down: &NodeId, by: &NodeId, lag| Edge {
            volume: vol.clone(),
            upstream: up.clone(),
            downstream: down.clone(),
            lag_ms: Some(lag),
            newest_unix_ms: None,
            last_transfer_unix_ms: None,
            state: EdgeState::Ok,
            error: None,
            reported_by: by.clone(),
        };
        // On c: its own relation b -> c, and three reports of a -> b from above.
        let m = map(
            &c,
            vec![edge(&b, &c, &c, 4)],
            vec![],
            vec![
                edge(&a, &b, &a, 1),
                edge(&a, &b, &b, 2),
                edge(&a, &b, &c, 3),
                // From above, a forged report of c's own relation, and of one below c.
                edge(&b, &c, &c, 99),
                edge(&c, &n("d"), &n("d"), 99),
            ],
            vec![],
        );
        let lags: Vec<u64> = m.edges.iter().map(|e| e.lag_ms.unwrap()).collect();
        assert_eq!(lags, vec![2, 4]);
        let depths: Vec<(&str, usize, bool)> = m
            .nodes
            .iter()
            .map(|x| (x.name.as_str(), x.depth, x.this))
            .collect();
        assert_eq!(
            depths,
            vec![("a", 0, false), ("b", 1, false), ("c", 2, true)]
        );
        // A cycle (a misconfiguration) ends.
        let m = map(
            &a,
            vec![edge(&b, &a, &a, 1)],
            vec![edge(&a, &b, &a, 1)],
            vec![],
            vec![],
        );
        assert_eq!(m.nodes.len(), 2);
        // What this node's downstreams' locks say of a node below it beats what an upstream
        // says of it.
        let m = map(
            &a,
            vec![],
            vec![edge(&a, &b, &a, 1)],
            vec![edge(&n("x"), &b, &b, 7), edge(&b, &n("y"), &n("y"), 7)],
            vec![],
        );
        assert_eq!(m.edges.len(), 1, "{:?}", m.edges);
        // ...of that volume: b, below a for vm, may well be above a for another volume.
        let mut other = edge(&n("x"), &b, &b, 7);
        other.volume = "v2".parse().unwrap();
        let m = map(&a, vec![], vec![edge(&a, &b, &a, 1)], vec![other], vec![]);
        assert_eq!(m.edges.len(), 2, "{:?}", m.edges);
    }

    #[test]
    fn a_view_from_an_upstream_is_bounded_and_about_that_upstream() {
        let vm: VolumeName = "vm".parse().unwrap();
        let edge = |vol: &str, up: &str, down: &str| Edge {
            volume: vol.parse().unwrap(),
            upstream: n(up),
            downstream: n(down),
            lag_ms: None,
            newest_unix_ms: None,
            last_transfer_unix_ms: None,
            state: EdgeState::Ok,
            error: Some("x".repeat(2000)),
            reported_by: n(down),
        };
        let v = CascadeView {
            node: Some(n("b")),
            edges: vec![
                edge("vm", "a", "b"),
                edge("secret", "a", "b"),
                edge("vm", "b", "c"),
                edge("vm", "c", "d"),
            ],
            unreachable: vec![],
        };
        let mirrored: BTreeSet<VolumeName> = [vm].into();
        let kept = v.clone().checked(&n("b"), &n("c"), &mirrored).unwrap();
        let kept: Vec<(&str, &str, &str)> = kept
            .edges
            .iter()
            .map(|e| {
                (
                    e.volume.as_str(),
                    e.upstream.as_str(),
                    e.downstream.as_str(),
                )
            })
            .collect();
        assert_eq!(kept, vec![("vm", "a", "b")]);
        assert!(v.clone().checked(&n("x"), &n("c"), &mirrored).is_err());
        // Unreachable upstreams: only those of relations kept, never this node.
        let u = |node: &str, by: &str| Unreachable {
            node: n(node),
            asked_by: n(by),
            error: "e".into(),
        };
        let mut w = v.clone();
        w.unreachable = vec![u("a", "b"), u("c", "b"), u("a", "c"), u("ghost", "b")];
        let kept = w.checked(&n("b"), &n("c"), &mirrored).unwrap();
        assert_eq!(kept.unreachable, vec![u("a", "b")]);
        let many = CascadeView {
            node: Some(n("b")),
            edges: (0..MAX_EDGES + 10).map(|_| edge("vm", "a", "b")).collect(),
            unreachable: vec![],
        };
        let kept = many.checked(&n("b"), &n("c"), &mirrored).unwrap();
        assert_eq!(kept.edges.len(), MAX_EDGES);
        assert!(kept.edges[0].error.as_ref().unwrap().len() <= MAX_MESSAGE + 3);
        let long = "é".repeat(1000);
        assert!(bounded(&long).len() <= MAX_MESSAGE + "…".len());
    }
}
