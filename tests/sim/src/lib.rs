//! A deterministic simulation of a holdfast cascade.
//!
//! Many nodes live in one process, each a real state directory opened by the real [`Node`]
//! code, each serving its downstreams through the real peer router, and each mirroring from its
//! upstream through the real [`holdfast::mirror::run`]. What is simulated is only what the
//! real code reads from outside: the clock ([`holdfast::set_fake_now`]) and the network
//! ([`net::Net`], the process's [`holdfast::peer::client::Transport`]). A seed decides a whole
//! history: the topology, the limits and leases of each relation, and every step (snapshots,
//! mirror updates, prunes, application locks, crashes, outages, nodes that go away for hours,
//! names reused, locks broken by hand), and the fate of every message. After every step the
//! invariants of the lock protocol are checked; a failure names the seed and the step, and
//! `holdfast-sim --seed S --trace` replays that history line by line.

pub mod net;
pub mod scale;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use holdfast::catalog::{SnapshotRecord, VolumeRecord};
use holdfast::config::NodeConfig;
use holdfast::id::{NodeId, SnapshotId, VolumeName};
use holdfast::mirror::TransferKind;
use holdfast::softlock::registry::HolderSettings;
use holdfast::softlock::{BreakLocks, HolderId, LockType, NewLock, SoftLock};
use holdfast::state::Node;
use holdfast::{Error, Result};
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use net::{Net, Rates};

/// Where simulated time starts (2027-01-15).
pub const START_MS: u64 = 1_800_000_000_000;
const BLOCK: usize = 4096;
const BLOCKS: usize = 16;
const MINUTE: u64 = 60_000;
const HOUR: u64 = 60 * MINUTE;
/// Real time a history may take before it counts as stuck.
const HISTORY_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);
/// Simulated time one update takes in a round.
const UPDATE_MS: u64 = 50;

/// What one history is made of.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub steps: usize,
    /// Print each step as it happens.
    pub trace: bool,
    /// At most this many nodes (the topology is drawn up to it).
    pub max_nodes: usize,
    pub rates: Rates,
}

impl Options {
    pub fn new(seed: u64) -> Options {
        Options {
            seed,
            steps: 60,
            trace: false,
            max_nodes: 9,
            rates: Rates::DEFAULT,
        }
    }
}

/// What a history covered.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub nodes: usize,
    pub steps: usize,
    pub simulated_ms: u64,
    pub messages: u64,
    pub faults: u64,
    pub mirror_updates: u64,
    pub crashes: u64,
    pub snapshots_checked: u64,
    /// A digest of the trace: the same seed gives the same digest.
    pub digest: String,
}

/// The limits and lease of one relation (set on the upstream, for this downstream).
#[derive(Clone, Debug)]
pub(crate) struct Edge {
    max_locks: usize,
    max_snapshots: usize,
    lease_ms: Option<u64>,
    release_stale: bool,
}

pub(crate) struct SimNode {
    id: NodeId,
    dir: PathBuf,
    parent: Option<usize>,
    children: Vec<usize>,
    depth: usize,
    token: String,
    edge: Edge,
    cfg: Option<NodeConfig>,
    node: Option<Arc<Node>>,
    changes: Option<tokio::sync::mpsc::UnboundedReceiver<VolumeName>>,
    /// Volumes whose downstream lock sets changed since this node last forwarded.
    to_forward: BTreeSet<VolumeName>,
    /// Until which step the node is away (down, answering nothing, doing nothing).
    away_until: u64,
    /// When its lock set for each volume last reached its upstream (simulated ms).
    last_sent: HashMap<VolumeName, u64>,
}

struct NoReport;

impl holdfast::peer::server::Reporter for NoReport {
    fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }
    fn metrics(&self) -> String {
        String::new()
    }
}

/// A node's view for the invariants: per volume, its snapshots and the locks on each.
type View = BTreeMap<VolumeName, (Vec<SnapshotRecord>, BTreeMap<SnapshotId, Vec<SoftLock>>)>;

/// One history.
pub struct World {
    opts: Options,
    rng: StdRng,
    _dir: tempfile::TempDir,
    root_dir: PathBuf,
    pub(crate) nodes: Vec<SimNode>,
    pub(crate) volumes: Vec<VolumeName>,
    images: Vec<Vec<u8>>,
    /// The content each snapshot must restore to.
    expected: HashMap<SnapshotId, blake3::Hash>,
    pub net: Net,
    now_ms: u64,
    step: u64,
    trace: Vec<String>,
    outcome: Outcome,
    /// (node, snapshot) deleted on purpose (a lock broken by hand, a node wiped).
    allowed_gone: HashSet<(usize, SnapshotId)>,
    /// (downstream, volume) whose base upstream may be gone for a reason the protocol allows
    /// (a lock broken by hand, a lease that ran out with release on).
    base_may_go: HashSet<(usize, VolumeName)>,
}

fn vname(i: usize) -> VolumeName {
    format!("v{i}").parse().expect("valid")
}

fn fail<T>(what: impl Into<String>) -> Result<T> {
    Err(Error::Internal(what.into()))
}

impl World {
    /// Draws the topology and starts every node.
    pub async fn new(opts: Options) -> Result<World> {
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let max = opts.max_nodes.max(2);
        // Chains up to 8 hops, fan-outs, and trees.
        let parents: Vec<Option<usize>> = match rng.random_range(0..3) {
            0 => {
                let n = rng.random_range(2..=max.min(9));
                (0..n).map(|i| i.checked_sub(1)).collect()
            }
            1 => {
                let n = rng.random_range(2..=max);
                (0..n).map(|i| (i > 0).then_some(0)).collect()
            }
            _ => {
                let n = rng.random_range(3..=max.max(3));
                (0..n)
                    .map(|i| (i > 0).then(|| rng.random_range(0..i)))
                    .collect()
            }
        };
        let volumes = rng.random_range(1..=2);
        World::of_shape(opts, rng, &parents, volumes).await
    }

    /// A world of a given shape: `parents[i]` is node i's upstream (node 0 is the root, which
    /// holds the volumes).
    pub async fn of_shape(
        opts: Options,
        rng: StdRng,
        parents: &[Option<usize>],
        volumes: usize,
    ) -> Result<World> {
        holdfast::set_fake_now(START_MS);
        SnapshotId::seed_random_part(Some(opts.seed));
        // In memory where the machine has it: a history writes thousands of small files and
        // commits, and nothing here needs them on a disk.
        let shm = std::path::Path::new("/dev/shm");
        let dir = match shm.is_dir() {
            true => tempfile::Builder::new()
                .prefix("holdfast-sim")
                .tempdir_in(shm)
                .or_else(|_| tempfile::tempdir()),
            false => tempfile::tempdir(),
        }
        .map_err(|e| Error::io("a temporary directory", e))?;
        let root_dir = dir.path().to_path_buf();
        let net = Net::default();
        {
            let mut s = net.state();
            s.seed = opts.seed;
            s.rates = Some(opts.rates);
        }
        holdfast::peer::client::set_transport(Some(Arc::new(net.clone())));
        let mut w = World {
            rng,
            _dir: dir,
            root_dir,
            nodes: Vec::new(),
            volumes: (0..volumes).map(vname).collect(),
            images: Vec::new(),
            expected: HashMap::new(),
            net,
            now_ms: START_MS,
            step: 0,
            trace: Vec::new(),
            outcome: Outcome::default(),
            allowed_gone: HashSet::new(),
            base_may_go: HashSet::new(),
            opts,
        };
        w.build(parents).await?;
        Ok(w)
    }

    async fn build(&mut self, parents: &[Option<usize>]) -> Result<()> {
        for (i, p) in parents.iter().enumerate() {
            let depth = p.map_or(0, |p| self.nodes[p].depth + 1);
            let edge = Edge {
                max_locks: if self.rng.random_bool(0.2) { 6 } else { 1000 },
                max_snapshots: if self.rng.random_bool(0.2) { 3 } else { 100 },
                lease_ms: self
                    .rng
                    .random_bool(0.4)
                    .then(|| self.rng.random_range(1..6) * HOUR),
                release_stale: self.rng.random_bool(0.5),
            };
            self.nodes.push(SimNode {
                id: format!("n{i}").parse().expect("valid"),
                dir: self.root_dir.join(format!("n{i}")),
                parent: *p,
                children: Vec::new(),
                depth,
                token: holdfast::peer::new_token(),
                edge,
                cfg: None,
                node: None,
                changes: None,
                to_forward: BTreeSet::new(),
                away_until: 0,
                last_sent: HashMap::new(),
            });
            if let Some(p) = p {
                self.nodes[*p].children.push(i);
            }
        }
        self.outcome.nodes = self.nodes.len();
        std::fs::create_dir_all(&self.root_dir).map_err(|e| Error::io("the world", e))?;
        for i in 0..self.nodes.len() {
            Node::init(&self.nodes[i].dir, Some(self.nodes[i].id.clone())).await?;
            self.start(i).await?;
        }
        // The root's volumes: small images of mixed blocks.
        self.images.clear();
        for v in self.volumes.clone() {
            let mut img = vec![0u8; BLOCK * BLOCKS];
            for b in 0..BLOCKS {
                if self.rng.random_bool(0.7) {
                    self.rng.fill(&mut img[b * BLOCK..(b + 1) * BLOCK]);
                }
            }
            let path = self.root_dir.join(format!("{v}.img"));
            std::fs::write(&path, &img).map_err(|e| Error::io("an image", e))?;
            self.images.push(img);
            self.node(0)?.catalog.add_volume(&VolumeRecord::image(
                v.clone(),
                path,
                BLOCK as u32,
            ))?;
        }
        Ok(())
    }

    fn config_text(&self, i: usize) -> String {
        let n = &self.nodes[i];
        let mut t = format!("state = {:?}\n", n.dir);
        if let Some(p) = n.parent {
            t += &format!(
                "[[upstream]]\nname = \"{}\"\nurl = \"http://127.0.0.1:9\"\ntoken = \"{}\"\n",
                self.nodes[p].id, n.token
            );
            for v in &self.volumes {
                t += &format!(
                    "[[mirror]]\nvolume = \"{v}\"\nupstream = \"{}\"\nevery = \"1h\"\n",
                    self.nodes[p].id
                );
            }
        }
        for &c in &n.children {
            let d = &self.nodes[c];
            let vols: Vec<String> = self.volumes.iter().map(|v| format!("\"{v}\"")).collect();
            t += &format!(
                "[[downstream]]\nname = \"{}\"\ntoken = \"{}\"\nvolumes = [{}]\nmax_locks = {}\n\
                 max_snapshots = {}\nrelease_stale = {}\n",
                d.id,
                d.token,
                vols.join(", "),
                d.edge.max_locks,
                d.edge.max_snapshots,
                d.edge.release_stale && d.edge.lease_ms.is_some(),
            );
            if let Some(l) = d.edge.lease_ms {
                t += &format!("lease = \"{}m\"\n", l / MINUTE);
            }
        }
        t
    }

    /// Opens node `i` from its state directory and serves it.
    async fn start(&mut self, i: usize) -> Result<()> {
        let text = self.config_text(i);
        let path = self.nodes[i].dir.join("node.toml");
        let cfg = NodeConfig::parse(&text, &path)?;
        let mut node = None;
        for _ in 0..200 {
            match Node::open(&self.nodes[i].dir).await {
                Ok(n) => {
                    node = Some(n);
                    break;
                }
                // What the crashed process was doing in a blocking thread may still hold the
                // catalog for a moment.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
        let node = match node {
            Some(n) => Arc::new(n),
            None => Arc::new(Node::open(&self.nodes[i].dir).await?),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let state = holdfast::peer::server::ServerState::new(
            node.clone(),
            &cfg,
            holdfast::peer::new_token(),
            Arc::new(NoReport),
            Arc::default(),
            Some(tx),
        )?;
        let router = holdfast::peer::server::router(Arc::new(state));
        self.net.state().set_router(&self.nodes[i].id, Some(router));
        let n = &mut self.nodes[i];
        n.cfg = Some(cfg);
        n.node = Some(node);
        n.changes = Some(rx);
        Ok(())
    }

    fn stop(&mut self, i: usize) {
        self.net.state().set_router(&self.nodes[i].id, None);
        let n = &mut self.nodes[i];
        n.node = None;
        n.changes = None;
        n.to_forward.clear();
    }

    /// A crash and a restart from what is on disk.
    pub(crate) async fn restart(&mut self, i: usize) -> Result<()> {
        self.stop(i);
        tokio::task::yield_now().await;
        self.start(i).await
    }

    pub(crate) fn node(&self, i: usize) -> Result<Arc<Node>> {
        match &self.nodes[i].node {
            Some(n) => Ok(n.clone()),
            None => fail(format!("{} is not running", self.nodes[i].id)),
        }
    }

    fn say(&mut self, line: String) {
        let events = std::mem::take(&mut self.net.state().events);
        for e in events {
            let e = format!("step {}:   {e}", self.step);
            if self.opts.trace {
                eprintln!("{e}");
            }
            self.trace.push(e);
        }
        let line = format!("step {}: {line}", self.step);
        if self.opts.trace {
            eprintln!("{line}");
        }
        self.trace.push(line);
    }

    fn violation(&self, what: String) -> Error {
        Error::Internal(format!(
            "invariant broken (seed {}, step {}): {what}\nreplay: holdfast-sim --seed {} \
             --steps {} --max-nodes {} --trace",
            self.opts.seed, self.step, self.opts.seed, self.opts.steps, self.opts.max_nodes
        ))
    }

    fn view(&self, i: usize) -> Result<View> {
        let node = self.node(i)?;
        let mut out = View::new();
        for v in &self.volumes {
            let snaps = match node.catalog.snapshots(v) {
                Ok(s) => s,
                Err(Error::NotFound(_)) => vec![],
                Err(e) => return Err(e),
            };
            let mut locks: BTreeMap<SnapshotId, Vec<SoftLock>> = BTreeMap::new();
            for set in node.catalog.locks().sets(Some(v))? {
                for l in set.locks {
                    locks.entry(l.snapshot).or_default().push(l);
                }
            }
            out.insert(v.clone(), (snaps, locks));
        }
        Ok(out)
    }

    fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        // A back-off may have moved the clock on meanwhile.
        self.now_ms = self.now_ms.max(holdfast::now_unix_ms());
        holdfast::set_fake_now(self.now_ms);
    }

    /// Runs the whole history, then heals the network, lets the cascade settle, and checks
    /// the settled state.
    pub async fn run(mut self) -> Result<Outcome> {
        for _ in 0..self.opts.steps {
            self.step += 1;
            self.net.state().next_step(self.step);
            let dt = self.rng.random_range(10_000..10 * MINUTE);
            self.advance(dt);
            self.net.deliver_late().await;
            // What a step deletes on purpose is allowed in that step only.
            self.allowed_gone.clear();
            let before: Vec<Option<View>> =
                (0..self.nodes.len()).map(|i| self.view(i).ok()).collect();
            let touched = self.one_step().await?;
            self.check_step(&before, &touched).await?;
        }
        self.settle().await?;
        let mut h = blake3::Hasher::new();
        for l in &self.trace {
            h.update(l.as_bytes());
            h.update(b"\n");
        }
        self.outcome.digest = h.finalize().to_hex()[..16].to_string();
        self.outcome.steps = self.step as usize;
        self.outcome.simulated_ms = self.now_ms - START_MS;
        let s = self.net.state();
        self.outcome.messages = s.messages;
        self.outcome.faults = s.faults;
        drop(s);
        Ok(self.outcome.clone())
    }

    fn replicas(&self) -> Vec<usize> {
        (1..self.nodes.len())
            .filter(|&i| self.nodes[i].away_until < self.step)
            .collect()
    }

    fn pick<T: Clone>(&mut self, xs: &[T]) -> Option<T> {
        (!xs.is_empty()).then(|| xs[self.rng.random_range(0..xs.len())].clone())
    }

    /// One random step; returns the nodes whose stored data it may have changed.
    async fn one_step(&mut self) -> Result<Vec<usize>> {
        // Nodes back from a long absence.
        for i in 0..self.nodes.len() {
            if self.nodes[i].away_until == self.step {
                let id = self.nodes[i].id.clone();
                self.net.state().down.remove(&id);
                self.say(format!("{id} is back"));
            }
        }
        let weights: [(u32, u32); 13] = [
            (0, 5),  // snapshot at the root
            (1, 10), // mirror update
            (2, 3),  // prune
            (3, 3),  // application lock
            (4, 2),  // release an application lock
            (5, 1),  // crash and restart
            (6, 2),  // cut or heal a relation
            (7, 1),  // away for a long stretch
            (8, 3),  // forward lock changes (the daemon's reaction)
            (9, 1),  // a leaf wiped and made again under the same name
            (10, 1), // a lock broken by hand
            (11, 1), // hours pass
            (12, 1), // gc reclaims what deletions left
        ];
        let total: u32 = weights.iter().map(|w| w.1).sum();
        let mut roll = self.rng.random_range(0..total);
        let mut action = 0;
        for (a, w) in weights {
            if roll < w {
                action = a;
                break;
            }
            roll -= w;
        }
        let vi = self.rng.random_range(0..self.volumes.len());
        let v = self.volumes[vi].clone();
        match action {
            0 => self.snapshot(vi).await,
            1 => match self.pick(&self.replicas()) {
                Some(i) => self.mirror(i, &v).await,
                None => Ok(vec![]),
            },
            2 => {
                let i = self.rng.random_range(0..self.nodes.len());
                let keep = self.rng.random_range(1..=4);
                self.prune(i, &v, keep).await
            }
            3 => self.app_lock(&v).await,
            4 => self.app_release(&v).await,
            5 => {
                let i = self.rng.random_range(0..self.nodes.len());
                self.outcome.crashes += 1;
                self.restart(i).await?;
                self.say(format!("{} crashed and restarted", self.nodes[i].id));
                Ok(vec![i])
            }
            6 => {
                let Some(i) = self.pick(&(1..self.nodes.len()).collect::<Vec<_>>()) else {
                    return Ok(vec![]);
                };
                let p = self.nodes[i].parent.expect("a replica");
                let (a, b) = (self.nodes[i].id.clone(), self.nodes[p].id.clone());
                let cut = !self.net.state().is_cut(&a, &b);
                self.net.state().cut(&a, &b, cut);
                self.say(format!(
                    "{} {a} and {b}",
                    if cut { "cut apart" } else { "healed" }
                ));
                Ok(vec![])
            }
            7 => {
                let Some(i) = self.pick(&self.replicas()) else {
                    return Ok(vec![]);
                };
                let steps = self.rng.random_range(5..30);
                self.nodes[i].away_until = self.step + steps;
                let id = self.nodes[i].id.clone();
                self.net.state().down.insert(id.clone());
                self.say(format!("{id} goes away for {steps} steps"));
                Ok(vec![])
            }
            8 => {
                let ready: Vec<usize> = (1..self.nodes.len())
                    .filter(|&i| self.nodes[i].away_until < self.step)
                    .collect();
                match self.pick(&ready) {
                    Some(i) => self.forward(i).await,
                    None => Ok(vec![]),
                }
            }
            9 => {
                let leaves: Vec<usize> = (1..self.nodes.len())
                    .filter(|&i| self.nodes[i].children.is_empty())
                    .collect();
                match self.pick(&leaves) {
                    Some(i) => self.wipe(i).await,
                    None => Ok(vec![]),
                }
            }
            10 => self.break_lock(&v).await,
            12 => {
                let i = self.rng.random_range(0..self.nodes.len());
                let node = self.node(i)?;
                let r = holdfast::snapshot::gc::gc(&node, false, &ProgressBar::hidden()).await?;
                self.say(format!(
                    "{} gc: {} pack(s) removed",
                    self.nodes[i].id, r.packs_deleted
                ));
                Ok(vec![i])
            }
            _ => {
                let hours = self.rng.random_range(1..8);
                self.advance(hours * HOUR);
                self.say(format!("{hours} hours pass"));
                Ok(vec![])
            }
        }
    }

    pub(crate) async fn snapshot(&mut self, vi: usize) -> Result<Vec<usize>> {
        let v = self.volumes[vi].clone();
        let changed = self.rng.random_range(1..=4);
        for _ in 0..changed {
            let b = self.rng.random_range(0..BLOCKS);
            let img = &mut self.images[vi];
            if self.rng.random_bool(0.2) {
                img[b * BLOCK..(b + 1) * BLOCK].fill(0);
            } else {
                self.rng.fill(&mut img[b * BLOCK..(b + 1) * BLOCK]);
            }
        }
        let path = self.root_dir.join(format!("{v}.img"));
        std::fs::write(&path, &self.images[vi]).map_err(|e| Error::io("an image", e))?;
        let node = self.node(0)?;
        let r = holdfast::snapshot::create::create(
            &node,
            &v,
            Default::default(),
            &ProgressBar::hidden(),
        )
        .await?;
        self.expected
            .insert(r.record.id, blake3::hash(&self.images[vi]));
        self.say(format!("n0 snapshot {v}@{}", r.record.name));
        Ok(vec![0])
    }

    /// One mirror update of `v` on node `i`, as `holdfast mirror run` or the daemon runs it,
    /// stopped dead if the network says the node crashed meanwhile.
    async fn mirror(&mut self, i: usize, v: &VolumeName) -> Result<Vec<usize>> {
        let node = self.node(i)?;
        let cfg = self.nodes[i].cfg.clone().expect("running");
        let p = self.nodes[i].parent.expect("a replica");
        let had = node
            .catalog
            .snapshots(v)
            .map(|s| !s.is_empty())
            .unwrap_or(false);
        self.outcome.mirror_updates += 1;
        let id = self.nodes[i].id.clone();
        let crashed = self
            .net
            .unless_crashed(
                &id,
                holdfast::mirror::run(&node, &cfg, v, None, &ProgressBar::hidden()),
            )
            .await;
        drop(node);
        match crashed {
            None => {
                self.crashed(i, &format!("during its update of {v}"))
                    .await?
            }
            Some(Ok(report)) => {
                self.nodes[i].last_sent.insert(v.clone(), self.now_ms);
                self.say(format!(
                    "{id} mirror {v}: {} (base {}) from {}: received {:?}, {} chunks, deleted \
                     {:?}, kept for locks {:?}, locks sent {}/{}",
                    report.kind,
                    report.base.as_deref().unwrap_or("none"),
                    report.upstream,
                    report.received,
                    report.chunks_fetched,
                    report.deleted,
                    report.kept_locked,
                    report.locks_sent_before,
                    report.locks_sent_after
                ));
                if had
                    && report.kind == TransferKind::Resync
                    && !self.base_may_go.contains(&(i, v.clone()))
                {
                    return Err(self.violation(format!(
                        "{id} had snapshots of {v} and its base lock on {} was never released, \
                         yet the update was a full resync: {}",
                        self.nodes[p].id,
                        report.summary()
                    )));
                }
                // With a base in common again, it is pinned from here on.
                if report.base.is_some()
                    || matches!(report.kind, TransferKind::Resync | TransferKind::Baseline)
                {
                    self.base_may_go.remove(&(i, v.clone()));
                }
                self.check_pair(i, v, &format!("right after {id}'s update"), false)?;
            }
            Some(Err(e)) => {
                self.say(format!("{id} mirror {v} failed: {e}"));
                if matches!(e, Error::Internal(_) | Error::Corrupt(_)) {
                    return Err(self.violation(format!("{id}'s update of {v} failed: {e}")));
                }
            }
        }
        self.collect_changes();
        Ok(vec![i, p])
    }

    /// Node `i` died in the middle of something (`what`): it restarts from its disk.
    async fn crashed(&mut self, i: usize, what: &str) -> Result<()> {
        self.net.state().crashed.remove(&self.nodes[i].id);
        self.outcome.crashes += 1;
        self.say(format!("{} crashed {what}", self.nodes[i].id));
        self.restart(i).await
    }

    /// Notes which nodes were told that a downstream's lock set changed.
    fn collect_changes(&mut self) {
        for n in &mut self.nodes {
            if let Some(rx) = &mut n.changes {
                while let Ok(v) = rx.try_recv() {
                    n.to_forward.insert(v);
                }
            }
        }
    }

    /// What the daemon does when a downstream's lock set changed: forward the node's own set.
    async fn forward(&mut self, i: usize) -> Result<Vec<usize>> {
        self.collect_changes();
        let Some(v) = self.nodes[i].to_forward.pop_first() else {
            return Ok(vec![]);
        };
        let node = self.node(i)?;
        let cfg = self.nodes[i].cfg.clone().expect("running");
        let id = self.nodes[i].id.clone();
        let r = self
            .net
            .unless_crashed(&id, holdfast::mirror::forward_locks(&node, &cfg, &v))
            .await;
        drop(node);
        match r {
            None => {
                self.crashed(i, &format!("while forwarding locks of {v}"))
                    .await?
            }
            Some(Ok(n)) => {
                self.nodes[i].last_sent.insert(v.clone(), self.now_ms);
                self.say(format!("{id} forwarded {n} locks of {v}"));
                self.check_pair(i, &v, &format!("right after {id} forwarded"), false)?;
            }
            Some(Err(e)) => {
                // Not forwarded: the daemon tries again at the next change or update.
                self.nodes[i].to_forward.insert(v.clone());
                self.say(format!("{id} forwarding {v} failed: {e}"));
            }
        }
        self.collect_changes();
        Ok(vec![self.nodes[i].parent.expect("a replica")])
    }

    async fn prune(&mut self, i: usize, v: &VolumeName, keep: usize) -> Result<Vec<usize>> {
        let node = self.node(i)?;
        let rules = holdfast::retention::KeepRules {
            keep_last: Some(keep),
            keep_within: None,
        };
        let id = self.nodes[i].id.clone();
        let r = self
            .net
            .unless_crashed(&id, holdfast::retention::prune(&node, v, &rules, false))
            .await;
        drop(node);
        let Some(r) = r else {
            self.crashed(i, &format!("while pruning {v}")).await?;
            return Ok(vec![i]);
        };
        match r {
            Ok(r) => {
                let kept = r.plan.kept_for_locks().count();
                self.say(format!(
                    "{} prune {v} keep-last {keep}: pruned {:?}, {kept} kept for locks",
                    self.nodes[i].id, r.pruned
                ));
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(vec![i])
    }

    async fn app_lock(&mut self, v: &VolumeName) -> Result<Vec<usize>> {
        let i = self.rng.random_range(0..self.nodes.len());
        let node = self.node(i)?;
        let snaps = node.catalog.snapshots(v).unwrap_or_default();
        let Some(s) = self.pick(&snaps) else {
            return Ok(vec![]);
        };
        let app = format!("app{}", self.rng.random_range(0..3));
        let holder = HolderId::application(&app)?;
        let lease_ms = self
            .rng
            .random_bool(0.4)
            .then(|| self.rng.random_range(1..4) * HOUR);
        if lease_ms.is_some() && self.rng.random_bool(0.5) {
            node.catalog.locks().set_settings(
                &holder,
                &HolderSettings {
                    auto_release_stale: true,
                },
            )?;
        }
        node.catalog.locks().add(
            v,
            &holder,
            NewLock {
                snapshot: s.id,
                lock_type: LockType::Application,
                value: format!("{app}-backup"),
                lease_ms,
                path: vec![],
            },
        )?;
        self.say(format!(
            "{} {app} locks {v}@{} (lease {lease_ms:?})",
            self.nodes[i].id, s.name
        ));
        Ok(vec![i])
    }

    async fn app_release(&mut self, v: &VolumeName) -> Result<Vec<usize>> {
        let i = self.rng.random_range(0..self.nodes.len());
        let node = self.node(i)?;
        let mut apps = Vec::new();
        for set in node.catalog.locks().sets(Some(v))? {
            if set.holder.application_name().is_some() && !set.locks.is_empty() {
                apps.push(set);
            }
        }
        let Some(set) = self.pick(&apps) else {
            return Ok(vec![]);
        };
        let l = set.locks[self.rng.random_range(0..set.locks.len())].clone();
        node.catalog
            .locks()
            .release(&set.holder, Some(v), Some(&l.snapshot), "simulation")?;
        self.say(format!(
            "{} {} releases its lock on {v}@{}",
            self.nodes[i].id, set.holder, l.snapshot
        ));
        Ok(vec![i])
    }

    /// Deletes a locked snapshot, breaking its locks on purpose (`snapshot delete --break-locks`).
    async fn break_lock(&mut self, v: &VolumeName) -> Result<Vec<usize>> {
        let i = self.rng.random_range(0..self.nodes.len());
        let node = self.node(i)?;
        let view = self.view(i)?;
        let (snaps, locks) = &view[v];
        let locked: Vec<&SnapshotRecord> =
            snaps.iter().filter(|s| locks.contains_key(&s.id)).collect();
        let Some(rec) = self.pick(&locked).cloned() else {
            return Ok(vec![]);
        };
        let brk = BreakLocks {
            reason: "simulation".into(),
        };
        // The nodes whose dependency this breaks (a lock's holder, and the nodes it came
        // through), and this node itself (the snapshot may have been its base): each may find
        // its base gone, and need a resync.
        let mut affected = vec![i];
        for l in locks.get(&rec.id).into_iter().flatten() {
            for d in 0..self.nodes.len() {
                let id = &self.nodes[d].id;
                if l.path.contains(id) || l.holder.as_str().starts_with(&format!("{id}/")) {
                    affected.push(d);
                }
            }
        }
        let id = self.nodes[i].id.clone();
        let r = self
            .net
            .unless_crashed(&id, holdfast::snapshot::delete(&node, &rec, Some(&brk)))
            .await;
        drop(node);
        // Gone from the catalog first: whether or not the node dies before the manifest goes.
        self.allowed_gone.insert((i, rec.id));
        for d in affected {
            self.mark_subtree_base(d, v);
        }
        let broken = match r {
            Some(r) => r?.1.len(),
            None => {
                self.crashed(i, &format!("while deleting {v}@{}", rec.name))
                    .await?;
                return Ok(vec![i]);
            }
        };
        self.say(format!(
            "{id} deletes {v}@{} breaking {broken} lock(s)",
            rec.name
        ));
        Ok(vec![i])
    }

    /// Node `d` and everything below it may lose the base of `v` for a reason the protocol
    /// allows.
    fn mark_subtree_base(&mut self, d: usize, v: &VolumeName) {
        let mut stack = vec![d];
        while let Some(n) = stack.pop() {
            self.base_may_go.insert((n, v.clone()));
            stack.extend(self.nodes[n].children.iter().copied());
        }
    }

    /// A leaf loses its state and is made again under the same name (a disk replaced).
    async fn wipe(&mut self, i: usize) -> Result<Vec<usize>> {
        for s in self.view(i)?.values().flat_map(|(s, _)| s.iter()) {
            self.allowed_gone.insert((i, s.id));
        }
        self.stop(i);
        let dir = self.nodes[i].dir.clone();
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io("wiping a node", e))?;
        Node::init(&dir, Some(self.nodes[i].id.clone())).await?;
        self.nodes[i].last_sent.clear();
        self.start(i).await?;
        self.say(format!("{} wiped and made again", self.nodes[i].id));
        Ok(vec![i])
    }

    /// The invariants after a step.
    async fn check_step(&mut self, before: &[Option<View>], touched: &[usize]) -> Result<()> {
        // Leases that ran out with release on: the base they held may go.
        for d in 1..self.nodes.len() {
            let e = &self.nodes[d].edge;
            if let (Some(lease), true) = (e.lease_ms, e.release_stale) {
                for v in self.volumes.clone() {
                    let last = self.nodes[d].last_sent.get(&v).copied().unwrap_or(0);
                    if self.now_ms.saturating_sub(last) >= lease {
                        self.mark_subtree_base(d, &v);
                    }
                }
            }
        }
        for (i, pre) in before.iter().enumerate() {
            let Some(pre) = pre else { continue };
            let Ok(now) = self.view(i) else { continue };
            let node = self.node(i)?;
            let settings = node.catalog.locks().all_settings()?;
            for (v, (snaps, locks)) in pre {
                let still: HashSet<SnapshotId> = now[v].0.iter().map(|s| s.id).collect();
                for s in snaps {
                    if still.contains(&s.id) || self.allowed_gone.contains(&(i, s.id)) {
                        continue;
                    }
                    let Some(ls) = locks.get(&s.id) else { continue };
                    let holding: Vec<&SoftLock> = ls
                        .iter()
                        .filter(|l| {
                            let auto = settings
                                .get(&l.holder)
                                .is_some_and(|s| s.auto_release_stale);
                            !(auto && l.is_stale(self.now_ms))
                        })
                        .collect();
                    if !holding.is_empty() {
                        let who: Vec<String> = holding
                            .iter()
                            .map(|l| format!("{} via {:?}", l.holder, l.path))
                            .collect();
                        return Err(self.violation(format!(
                            "{} deleted {v}@{} while it was locked by {}",
                            self.nodes[i].id,
                            s.name,
                            who.join(", ")
                        )));
                    }
                }
            }
        }
        let mut seen = BTreeSet::new();
        for &i in touched {
            if !seen.insert(i) || self.nodes[i].node.is_none() {
                continue;
            }
            self.check_complete(i).await?;
            self.check_limits(i)?;
        }
        Ok(())
    }

    /// No half-committed snapshot is visible: every snapshot listed has its manifest and every
    /// chunk it names, intact.
    async fn check_complete(&mut self, i: usize) -> Result<()> {
        let node = self.node(i)?;
        let r = holdfast::snapshot::verify::verify(&node, None, &ProgressBar::hidden()).await?;
        self.outcome.snapshots_checked += r.snapshots;
        if !r.is_clean() {
            return Err(self.violation(format!(
                "{} lists a snapshot that is not whole: {:?}",
                self.nodes[i].id, r.damage
            )));
        }
        Ok(())
    }

    /// Each downstream's lock sets here stay within the limits this node set for it.
    fn check_limits(&self, i: usize) -> Result<()> {
        let node = self.node(i)?;
        for set in node.catalog.locks().sets(None)? {
            for &c in &self.nodes[i].children {
                let d = &self.nodes[c];
                if !set.holder.as_str().starts_with(&format!("{}/", d.id)) {
                    continue;
                }
                let snaps: HashSet<SnapshotId> = set.locks.iter().map(|l| l.snapshot).collect();
                if set.locks.len() > d.edge.max_locks || snaps.len() > d.edge.max_snapshots {
                    return Err(self.violation(format!(
                        "{} holds {} locks on {} snapshots for {}, over its limits ({} locks, {} \
                         snapshots)",
                        self.nodes[i].id,
                        set.locks.len(),
                        snaps.len(),
                        set.holder,
                        d.edge.max_locks,
                        d.edge.max_snapshots
                    )));
                }
            }
        }
        Ok(())
    }

    /// One round: every replica updates every volume, deepest first (so a lock crosses every
    /// hop in one round). Returns whether anything changed.
    pub async fn round(&mut self) -> Result<bool> {
        let before = self.fingerprint()?;
        self.round_in(true).await?;
        Ok(self.fingerprint()? != before)
    }

    /// One round, deepest nodes first or (`deepest_first` false) the root's children first.
    pub async fn round_in(&mut self, deepest_first: bool) -> Result<()> {
        let mut order: Vec<usize> = (1..self.nodes.len()).collect();
        if deepest_first {
            order.sort_by_key(|&i| std::cmp::Reverse(self.nodes[i].depth));
        } else {
            order.sort_by_key(|&i| self.nodes[i].depth);
        }
        for i in order {
            for v in self.volumes.clone() {
                // An update that finds nothing new takes about this long: a round of many
                // updates is not one instant for the peers' rate limits either.
                self.advance(UPDATE_MS);
                self.mirror(i, &v).await?;
                self.check_limits(self.nodes[i].parent.expect("a replica"))?;
            }
        }
        Ok(())
    }

    fn fingerprint(&self) -> Result<blake3::Hash> {
        let mut h = blake3::Hasher::new();
        for i in 0..self.nodes.len() {
            let node = self.node(i)?;
            for v in &self.volumes {
                for s in node.catalog.snapshots(v).unwrap_or_default() {
                    h.update(&s.id.as_u128().to_le_bytes());
                }
            }
            for set in node.catalog.locks().sets(None)? {
                h.update(set.holder.as_str().as_bytes());
                for l in set.locks {
                    h.update(&l.snapshot.as_u128().to_le_bytes());
                    h.update(l.value.as_bytes());
                }
            }
        }
        Ok(h.finalize())
    }

    /// The network heals and the nodes come back; the cascade settles; then every node's
    /// lock sets must be what its downstreams depend on now, and every snapshot anywhere must
    /// restore to what it was taken of.
    async fn settle(&mut self) -> Result<()> {
        self.step += 1;
        self.net.state().next_step(self.step);
        self.net.state().heal();
        for n in &mut self.nodes {
            n.away_until = 0;
        }
        self.say("the network heals; rounds until nothing changes".into());
        let depth = self.nodes.iter().map(|n| n.depth).max().unwrap_or(0);
        let mut settled = false;
        for _ in 0..depth * 2 + 4 {
            self.advance(MINUTE);
            // Anything still in flight arrives.
            self.net.next_step_all().await;
            if !self.round().await? {
                settled = true;
                break;
            }
        }
        if !settled {
            return Err(self.violation(format!(
                "the cascade did not settle in {} rounds after the network healed",
                depth * 2 + 4
            )));
        }
        self.check_lock_sets()?;
        self.check_restores().await
    }

    /// After settling: each upstream holds, for each downstream and volume, exactly the lock
    /// set the downstream would send now (or its own locks alone when the whole set is over
    /// the upstream's limits for it).
    pub fn check_lock_sets(&self) -> Result<()> {
        for d in 1..self.nodes.len() {
            for v in &self.volumes {
                self.check_pair(d, v, "after settling", true)?;
            }
        }
        Ok(())
    }

    /// Node `d`'s upstream holds, for `d` and `v`, exactly what `d` depends on (or `d`'s own
    /// locks alone when the whole set is over the upstream's limits for it). `settled`: also,
    /// `d` holds the upstream's newest snapshot.
    fn check_pair(&self, d: usize, v: &VolumeName, when: &str, settled: bool) -> Result<()> {
        let p = self.nodes[d].parent.expect("a replica");
        let (down, up) = (self.node(d)?, self.node(p)?);
        let upstream = up.catalog.snapshots(v).unwrap_or_default();
        let theirs: HashSet<SnapshotId> = upstream.iter().map(|s| s.id).collect();
        let ours = down.catalog.snapshots(v).unwrap_or_default();
        let base = ours
            .iter()
            .rev()
            .find(|s| theirs.contains(&s.id))
            .map(|s| s.id);
        let full = depends_on(&down, &self.nodes[d].id, v, &theirs, base)?;
        let e = &self.nodes[d].edge;
        let over = |set: &[NewLock]| {
            let snaps: HashSet<SnapshotId> = set.iter().map(|l| l.snapshot).collect();
            set.len() > e.max_locks || snaps.len() > e.max_snapshots
        };
        let expected: Vec<NewLock> = if over(&full) {
            full.into_iter().filter(|l| l.path.len() <= 1).collect()
        } else {
            full
        };
        if over(&expected) {
            // The applications here lock more than the upstream lets this node pin: its
            // updates are refused, saying so, until someone raises the limit or releases
            // locks; the upstream keeps the set it took last.
            return Ok(());
        }
        let names = |snaps: &[SnapshotRecord]| -> Vec<String> {
            snaps
                .iter()
                .map(|s| format!("{} {}", s.name, s.id))
                .collect()
        };
        // Caught up: nothing upstream is newer than the newest here (which may be newer than
        // anything upstream, when the upstream deleted it by breaking its locks).
        if settled
            && let Some(newest) = upstream.last()
            && ours.last().is_none_or(|o| o.id < newest.id)
        {
            return Err(self.violation(format!(
                "{when}, {} has not caught up with {} on {v}\n  {} has {:?}\n  {} has {:?}",
                self.nodes[d].id,
                self.nodes[p].id,
                self.nodes[p].id,
                names(&upstream),
                self.nodes[d].id,
                names(&ours)
            )));
        }
        let key = |snapshot: SnapshotId, t: &LockType, value: &str, path: &[NodeId]| {
            (snapshot, t.to_string(), value.to_string(), path.to_vec())
        };
        let want: BTreeSet<_> = expected
            .iter()
            .map(|l| key(l.snapshot, &l.lock_type, &l.value, &l.path))
            .collect();
        let holder = HolderId::mirror(&self.nodes[d].id, v);
        let got: BTreeSet<_> = up
            .catalog
            .locks()
            .sets(Some(v))?
            .into_iter()
            .filter(|s| s.holder == holder)
            .flat_map(|s| s.locks)
            .map(|l| key(l.snapshot, &l.lock_type, &l.value, &l.path))
            .collect();
        if want != got {
            return Err(self.violation(format!(
                "{when}, {} holds for {} on {v}: {got:?}; it depends on: {want:?}\n  {} has \
                 {:?}\n  {} has {:?}",
                self.nodes[p].id,
                self.nodes[d].id,
                self.nodes[p].id,
                names(&upstream),
                self.nodes[d].id,
                names(&ours)
            )));
        }
        Ok(())
    }

    /// Every snapshot on every node restores to the image it was taken of.
    async fn check_restores(&mut self) -> Result<()> {
        let out = self.root_dir.join("restored.img");
        for i in 0..self.nodes.len() {
            let node = self.node(i)?;
            for v in self.volumes.clone() {
                for s in node.catalog.snapshots(&v).unwrap_or_default() {
                    let m = holdfast::snapshot::load_manifest(&node.repo, &s).await?;
                    holdfast::snapshot::restore::restore(
                        &node.repo,
                        &m,
                        &out,
                        true,
                        &ProgressBar::hidden(),
                    )
                    .await?;
                    let got = blake3::hash(
                        &std::fs::read(&out).map_err(|e| Error::io("a restored image", e))?,
                    );
                    self.outcome.snapshots_checked += 1;
                    if self.expected.get(&s.id) != Some(&got) {
                        return Err(self.violation(format!(
                            "{}'s {v}@{} does not restore to what it was taken of",
                            self.nodes[i].id, s.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Net {
    /// Runs `fut` (a node's work) to its end, or until the network says its node crashed in
    /// the middle of a request (that request never answers): then `fut` is dropped where it
    /// stands, as a killed process stops, and the answer is `None`.
    pub async fn unless_crashed<T>(
        &self,
        node: &NodeId,
        fut: impl Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                _ = tokio::time::sleep(std::time::Duration::from_millis(1)) => {
                    if self.state().crashed.contains(node) {
                        return None;
                    }
                }
            }
        }
    }

    /// Delivers every request still on its way.
    pub async fn next_step_all(&self) {
        {
            let mut s = self.state();
            let step = s.step + 100;
            s.next_step(step);
        }
        self.deliver_late().await;
    }
}

/// What node `me` depends on upstream for `v`, worked out here rather than by the code under
/// test: its base (its newest snapshot the upstream has), and every lock held on it (its
/// applications', and its downstreams' with the path they came by) on a snapshot the upstream
/// has, each with `me` added to its path, except those whose path is already as long as
/// locks may travel.
fn depends_on(
    node: &Node,
    me: &NodeId,
    v: &VolumeName,
    theirs: &HashSet<SnapshotId>,
    base: Option<SnapshotId>,
) -> Result<Vec<NewLock>> {
    let mut out: Vec<NewLock> = base
        .into_iter()
        .map(|b| NewLock {
            snapshot: b,
            lock_type: LockType::DestinationPath,
            value: format!("holdfast://{me}/{v}"),
            lease_ms: None,
            path: vec![me.clone()],
        })
        .collect();
    for set in node.catalog.locks().sets(Some(v))? {
        for l in set
            .locks
            .into_iter()
            .filter(|l| theirs.contains(&l.snapshot))
        {
            let mut path = l.path;
            if path.last() != Some(me) {
                path.push(me.clone());
            }
            if path.len() < holdfast::softlock::MAX_LOCK_PATH {
                out.push(NewLock {
                    snapshot: l.snapshot,
                    lock_type: l.lock_type,
                    value: l.value,
                    lease_ms: None,
                    path,
                });
            }
        }
    }
    Ok(out)
}

/// Directed scenarios: worlds of a given shape, driven step by step.
impl World {
    /// A chain of `nodes` nodes with `volumes` volumes at its root, no faults, generous limits.
    pub async fn chain(nodes: usize, volumes: usize) -> Result<World> {
        let parents: Vec<Option<usize>> = (0..nodes).map(|i| i.checked_sub(1)).collect();
        let mut opts = Options::new(0);
        opts.rates = Rates::NONE;
        let rng = StdRng::seed_from_u64(0);
        let mut w = World::of_shape(opts, rng, &parents, volumes).await?;
        w.net.state().rates = None;
        for i in 1..nodes {
            w.limit(i, 1000, 100).await?;
        }
        Ok(w)
    }

    /// Sets what node `i`'s upstream lets it pin, with no lease.
    pub async fn limit(&mut self, i: usize, max_locks: usize, max_snapshots: usize) -> Result<()> {
        self.nodes[i].edge = Edge {
            max_locks,
            max_snapshots,
            lease_ms: None,
            release_stale: false,
        };
        let p = self.nodes[i].parent.expect("a replica");
        self.restart(p).await
    }

    /// A change to the root's volume `vi` and a snapshot of it, a minute later.
    pub async fn snapshot_root(&mut self, vi: usize) -> Result<()> {
        self.advance(MINUTE);
        self.snapshot(vi).await.map(drop)
    }

    /// One update of volume `vi` on node `i`; an update that fails is an error here.
    pub async fn mirror_once(&mut self, i: usize, vi: usize) -> Result<()> {
        self.advance(MINUTE);
        let v = self.volumes[vi].clone();
        self.mirror(i, &v).await?;
        match self.trace.last() {
            Some(l) if l.contains(" failed: ") => fail(l.clone()),
            _ => Ok(()),
        }
    }

    /// Deletes the newest snapshot of volume `vi` on node `i`, breaking its locks
    /// (`snapshot delete --break-locks`).
    pub async fn delete_newest_breaking(&mut self, i: usize, vi: usize) -> Result<()> {
        let node = self.node(i)?;
        let rec = node
            .catalog
            .snapshots(&self.volumes[vi])?
            .pop()
            .ok_or_else(|| Error::Internal("no snapshot to delete".into()))?;
        let brk = BreakLocks {
            reason: "test".into(),
        };
        holdfast::snapshot::delete(&node, &rec, Some(&brk)).await?;
        Ok(())
    }

    /// The snapshots of volume `vi` that node `i`'s upstream holds locks on for it.
    pub fn pinned_for(&self, i: usize, vi: usize) -> Result<Vec<SnapshotId>> {
        let v = &self.volumes[vi];
        let up = self.node(self.nodes[i].parent.expect("a replica"))?;
        let holder = HolderId::mirror(&self.nodes[i].id, v);
        let mut out: Vec<SnapshotId> = up
            .catalog
            .locks()
            .sets(Some(v))?
            .into_iter()
            .filter(|s| s.holder == holder)
            .flat_map(|s| s.locks.into_iter().map(|l| l.snapshot))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    pub fn snapshot_ids(&self, i: usize, vi: usize) -> Result<Vec<SnapshotId>> {
        Ok(self
            .node(i)?
            .catalog
            .snapshots(&self.volumes[vi])?
            .iter()
            .map(|s| s.id)
            .collect())
    }

    pub fn snapshot_count(&self, i: usize, vi: usize) -> Result<usize> {
        Ok(self.node(i)?.catalog.snapshots(&self.volumes[vi])?.len())
    }

    /// Gives the process back its real clock, network and ids.
    pub fn done() {
        holdfast::peer::client::set_transport(None);
        holdfast::set_fake_now(0);
        SnapshotId::seed_random_part(None);
    }
}

/// Runs one seed's history on a fresh single-threaded runtime.
pub fn run_seed(opts: Options) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("a runtime", e))?;
    let seed = opts.seed;
    let r = rt.block_on(async move {
        // A history takes about a second: one that runs for minutes is stuck (a task waiting
        // for something that never comes), which is a failure to report, not to wait out.
        match tokio::time::timeout(HISTORY_LIMIT, async { World::new(opts).await?.run().await })
            .await
        {
            Ok(r) => r,
            Err(_) => fail(format!(
                "seed {seed}: the history did not end within {HISTORY_LIMIT:?} (a hang); \
                 replay it with --trace to see the last step"
            )),
        }
    });
    World::done();
    r
}
