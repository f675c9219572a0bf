//! The cascade at scale, in simulation: a tree of a hundred nodes (depth 6, fan-out up to 4)
//! mirroring many volumes. How many rounds a leaf's new lock takes to reach the root, the
//! messages a round costs, the root's lock registry and what `lock explain` costs there.

use std::time::Instant;

use holdfast::softlock::{HolderId, LockType, NewLock};
use holdfast::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Edge, Options, Rates, World};

const DEPTH: usize = 6;
const FAN_OUT: usize = 4;

/// What the scale run measured.
#[derive(Clone, Debug)]
pub struct ScaleReport {
    pub nodes: usize,
    pub volumes: usize,
    pub depth: usize,
    /// The first round, which brings every volume to every node (root first).
    pub first_round_messages: u64,
    pub first_round_seconds: f64,
    /// Rounds run root-first (the order slowest for locks) until the leaf's lock was at the
    /// root, and the messages of each.
    pub rounds_root_first: usize,
    pub messages_per_round: Vec<u64>,
    /// Of those, answers asking to slow down (the per-peer rate of lock sets), per round.
    pub slowed_per_round: Vec<u64>,
    /// The same with rounds run deepest-first.
    pub rounds_deepest_first: usize,
    pub root_lock_sets: usize,
    pub root_locks: usize,
    pub explain_ms: f64,
}

impl std::fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} nodes (depth {}, fan-out up to {FAN_OUT}), {} volumes",
            self.nodes, self.depth, self.volumes
        )?;
        writeln!(
            f,
            "first round (every volume to every node): {} messages, {:.1} s",
            self.first_round_messages, self.first_round_seconds
        )?;
        writeln!(
            f,
            "a leaf's new lock at the root after {} round(s) run root-first ({} hops; messages \
             per round {:?}, of which answers asking to slow down {:?}), {} round(s) run \
             deepest-first",
            self.rounds_root_first,
            self.depth,
            self.messages_per_round,
            self.slowed_per_round,
            self.rounds_deepest_first
        )?;
        write!(
            f,
            "root's lock registry: {} sets, {} locks; lock explain of the locked snapshot: \
             {:.2} ms (median of 5)",
            self.root_lock_sets, self.root_locks, self.explain_ms
        )
    }
}

/// A tree of `n` nodes: a chain of DEPTH hops first (so the depth is reached), then each
/// further node under a random node above the last level with room for a child.
pub fn tree(seed: u64, n: usize) -> Vec<Option<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut parents: Vec<Option<usize>> = vec![None];
    let mut depth = vec![0usize];
    let mut children = vec![0usize];
    for i in 1..n {
        let p = if i <= DEPTH {
            i - 1
        } else {
            let room: Vec<usize> = (0..i)
                .filter(|&p| depth[p] < DEPTH && children[p] < FAN_OUT)
                .collect();
            room[rng.random_range(0..room.len())]
        };
        parents.push(Some(p));
        depth.push(depth[p] + 1);
        children.push(0);
        children[p] += 1;
    }
    parents
}

/// Whether the root holds the lock application `app` took on node `from`.
fn root_holds(w: &World, from: usize, app: &str) -> Result<bool> {
    let root = w.node(0)?;
    let id = &w.nodes[from].id;
    let value = format!("{app}-backup");
    Ok(root
        .catalog
        .locks()
        .sets(None)?
        .iter()
        .flat_map(|s| s.locks.iter())
        .any(|l| l.path.first() == Some(id) && l.value == value))
}

/// A lock by an application on node `i` on the newest snapshot of the first volume.
fn lock_on(w: &World, i: usize, app: &str) -> Result<()> {
    let node = w.node(i)?;
    let v = &w.volumes[0];
    let s = node
        .catalog
        .snapshots(v)?
        .pop()
        .ok_or_else(|| Error::Internal(format!("{} has no snapshot of {v}", w.nodes[i].id)))?;
    node.catalog.locks().add(
        v,
        &HolderId::application(app)?,
        NewLock {
            snapshot: s.id,
            lock_type: LockType::Application,
            value: format!("{app}-backup"),
            lease_ms: None,
            path: vec![],
        },
    )?;
    Ok(())
}

async fn scale(seed: u64, nodes: usize, volumes: usize, trace: bool) -> Result<ScaleReport> {
    let parents = tree(seed, nodes.max(DEPTH + 1));
    let mut opts = Options::new(seed);
    opts.rates = Rates::NONE;
    opts.trace = trace;
    let rng = StdRng::seed_from_u64(seed);
    let mut w = World::of_shape(opts, rng, &parents, volumes).await?;
    w.net.state().rates = None;
    for i in 0..w.nodes.len() {
        w.nodes[i].edge = Edge {
            max_locks: 1000,
            max_snapshots: 100,
            lease_ms: None,
            release_stale: false,
        };
    }
    for i in 0..w.nodes.len() {
        w.restart(i).await?;
    }
    for vi in 0..volumes {
        w.snapshot(vi).await?;
    }
    let messages = |w: &World| w.net.state().messages;

    let (m0, t) = (messages(&w), Instant::now());
    w.round_in(false).await?;
    let first_round_messages = messages(&w) - m0;
    let first_round_seconds = t.elapsed().as_secs_f64();

    let deepest = (0..w.nodes.len())
        .max_by_key(|&i| w.nodes[i].depth)
        .expect("nodes");
    let depth = w.nodes[deepest].depth;
    lock_on(&w, deepest, "scale-a")?;
    let mut per_round = Vec::new();
    let mut slowed_per_round = Vec::new();
    let mut rounds_root_first = 0;
    while !root_holds(&w, deepest, "scale-a")? {
        if rounds_root_first > depth {
            return Err(Error::Internal(format!(
                "the lock of {} is not at the root after {rounds_root_first} rounds ({depth} hops)",
                w.nodes[deepest].id
            )));
        }
        let (m, slowed) = (messages(&w), w.net.state().slowed);
        w.round_in(false).await?;
        per_round.push(messages(&w) - m);
        slowed_per_round.push(w.net.state().slowed - slowed);
        rounds_root_first += 1;
    }
    // Another leaf of the same depth (or the same one, with another application): deepest first.
    let other = (0..w.nodes.len())
        .filter(|&i| w.nodes[i].depth == depth && w.nodes[i].children.is_empty())
        .find(|&i| i != deepest)
        .unwrap_or(deepest);
    lock_on(&w, other, "scale-b")?;
    let mut rounds_deepest_first = 0;
    while !root_holds(&w, other, "scale-b")? {
        if rounds_deepest_first > depth {
            return Err(Error::Internal(format!(
                "the lock of {} is not at the root after {rounds_deepest_first} rounds run \
                 deepest first",
                w.nodes[other].id
            )));
        }
        w.round_in(true).await?;
        rounds_deepest_first += 1;
    }
    let root = w.node(0)?;
    let sets = root.catalog.locks().sets(None)?;
    let v = w.volumes[0].clone();
    let snaps = root.catalog.snapshots(&v)?;
    let last = snaps.len() - 1;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        // What `holdfast lock explain` reads: the locks, and what deleting would free.
        let locks = root.catalog.locks().locks_on(&v, &snaps[last].id)?;
        let size = holdfast::snapshot::exclusive_size(&root.repo, &snaps, last).await?;
        std::hint::black_box((locks, size));
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(ScaleReport {
        nodes: w.nodes.len(),
        volumes,
        depth,
        first_round_messages,
        first_round_seconds,
        rounds_root_first,
        messages_per_round: per_round,
        slowed_per_round,
        rounds_deepest_first,
        root_lock_sets: sets.len(),
        root_locks: sets.iter().map(|s| s.locks.len()).sum(),
        explain_ms: times[times.len() / 2],
    })
}

/// Runs the scale scenario on a fresh single-threaded runtime.
pub fn run(seed: u64, nodes: usize, volumes: usize, trace: bool) -> Result<ScaleReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("a runtime", e))?;
    let r = rt.block_on(scale(seed, nodes, volumes, trace));
    World::done();
    r
}
