//! Registered policies: their records in the catalog, their components and precompiled
//! artifacts under the state directory, their failure counts, and the decisions that combine
//! several policies on one volume.
//!
//! ```text
//! STATE/policies/<blake3>.wasm                   the component as registered
//! STATE/policy-cache/<engine key>-<blake3>.cwasm its precompiled artifact (rebuilt if missing)
//! catalog: policies        name -> PolicyRecord
//!          policy_failures name -> FailureCount
//! ```
//!
//! Composition on a volume: the locks are the union of every policy's locks (each policy
//! holds its own lock set, holder `app:policy.NAME`); a snapshot is pruned only if every
//! retention policy proposes it and no lock holds it. Failure behaviour is explicit per hook:
//! a failing lock decision keeps that policy's previous set (fail safe); a failing retention
//! plan prunes nothing (fail closed).

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Description, Limits, NodeView, Phase, PolicyEngine, PruneProposal, WasmPolicy};
use crate::error::{Error, Result};
use crate::id::{SnapshotId, VolumeName, validate_name, validate_text};
use crate::softlock::{HolderId, NewLock};
use crate::state::{Node, write_atomic};

const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
const FAILURES: TableDefinition<&str, &[u8]> = TableDefinition::new("policy_failures");

/// A registered policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyRecord {
    pub name: String,
    /// BLAKE3 of the component's bytes.
    pub component: String,
    pub component_bytes: u64,
    pub world: String,
    pub volumes: Vec<VolumeName>,
    pub config: BTreeMap<String, String>,
    pub limits: Limits,
    pub description: Description,
    pub added_unix_ms: u64,
}

/// The holder of the locks of the policy named `name`: `app:policy.NAME`.
pub fn policy_holder(name: &str) -> Result<HolderId> {
    HolderId::application(&format!("policy.{name}"))
}

impl PolicyRecord {
    /// The holder of this policy's locks.
    pub fn holder(&self) -> HolderId {
        policy_holder(&self.name).expect("validated name")
    }

    pub fn handles(&self, phase: Phase) -> bool {
        self.description.phases.contains(&phase)
    }
}

/// How often a policy failed, and the last failure.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FailureCount {
    pub count: u64,
    pub last_error: String,
    pub last_unix_ms: u64,
}

/// The policies of one node.
#[derive(Debug)]
pub struct Policies<'n> {
    node: &'n Node,
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(format!("policy registry entry {what} is unreadable: {e}")))
}

impl<'n> Policies<'n> {
    pub fn new(node: &'n Node) -> Self {
        Policies { node }
    }

    fn ensure_tables(&self) -> Result<()> {
        let tx = self.node.catalog.db().begin_write()?;
        tx.open_table(POLICIES)?;
        tx.open_table(FAILURES)?;
        tx.commit()?;
        Ok(())
    }

    /// Checks, compiles, stores and registers a component.
    pub fn add(
        &self,
        engine: &PolicyEngine,
        name: &str,
        wasm: &[u8],
        volumes: Vec<VolumeName>,
        config: BTreeMap<String, String>,
        limits: Limits,
    ) -> Result<PolicyRecord> {
        validate_name("policy name", name)?;
        // Its locks are held as app:policy.NAME, which must be a valid holder too.
        HolderId::application(&format!("policy.{name}")).map_err(|_| {
            Error::invalid(format!(
                "policy name {:?} is too long: at most {} bytes",
                crate::id::shorten(name),
                crate::id::MAX_NAME_BYTES - "policy.".len()
            ))
        })?;
        if volumes.is_empty() {
            return Err(Error::invalid("give at least one --volume for the policy"));
        }
        for v in &volumes {
            self.node.catalog.volume(v)?;
        }
        for (k, v) in &config {
            validate_name("config key", k)?;
            validate_text("config value", v, 4096)?;
        }
        if limits.timeout_ms == 0 || limits.timeout_ms > 60_000 {
            return Err(Error::invalid("--timeout must be between 1ms and 60s"));
        }
        if !(1 << 20..=4 << 30).contains(&limits.memory_bytes) {
            return Err(Error::invalid("--memory must be between 1MiB and 4GiB"));
        }
        if self.get(name)?.is_some() {
            return Err(Error::conflict(format!(
                "a policy named {name:?} is registered; remove it first or choose another name"
            )));
        }
        let hash = blake3::hash(wasm).to_hex().to_string();
        let cached = format!("{}-{hash}.cwasm", engine.engine_key());
        // The same component registered again (other volumes, other config) is not compiled
        // twice: its artifact is already in the cache.
        let artifact = match self.read_file("policy-cache", &cached) {
            Ok(a) if engine.load(name, &a, config.clone(), limits).is_ok() => a,
            _ => engine.compile(&format!("component for policy {name:?}"), wasm)?,
        };
        let policy = engine.load(name, &artifact, config.clone(), limits)?;
        let description = policy.describe()?;
        self.store_file("policies", &format!("{hash}.wasm"), wasm)?;
        self.store_file("policy-cache", &cached, &artifact)?;
        let rec = PolicyRecord {
            name: name.to_string(),
            component: hash,
            component_bytes: wasm.len() as u64,
            world: policy.world().world(),
            volumes,
            config,
            limits,
            description,
            added_unix_ms: crate::now_unix_ms(),
        };
        self.ensure_tables()?;
        let tx = self.node.catalog.db().begin_write()?;
        {
            let mut t = tx.open_table(POLICIES)?;
            if t.get(name)?.is_some() {
                return Err(Error::conflict(format!(
                    "a policy named {name:?} is registered"
                )));
            }
            let bytes = serde_json::to_vec(&rec).map_err(|e| Error::internal(e.to_string()))?;
            t.insert(name, bytes.as_slice())?;
        }
        tx.commit()?;
        Ok(rec)
    }

    fn store_file(&self, dir: &str, name: &str, bytes: &[u8]) -> Result<()> {
        let d = &self.node.dir;
        d.create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {dir}/ in the state directory"), e))?;
        let sub = d
            .open_dir(dir)
            .map_err(|e| Error::io(format!("opening {dir}/"), e))?;
        write_atomic(&sub, name, bytes).map_err(|e| Error::io(format!("writing {dir}/{name}"), e))
    }

    fn read_file(&self, dir: &str, name: &str) -> std::io::Result<Vec<u8>> {
        let mut f = self.node.dir.open_dir(dir)?.open(name)?;
        let mut out = Vec::new();
        f.read_to_end(&mut out)?;
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<Option<PolicyRecord>> {
        let tx = self.node.catalog.db().begin_read()?;
        let t = match tx.open_table(POLICIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let v = t.get(name)?;
        v.map(|v| decode(v.value(), name)).transpose()
    }

    pub fn require(&self, name: &str) -> Result<PolicyRecord> {
        self.get(name)?.ok_or_else(|| {
            Error::not_found(format!(
                "no policy named {:?}; `holdfast policy list` shows the registered ones",
                crate::id::shorten(name)
            ))
        })
    }

    pub fn list(&self) -> Result<Vec<PolicyRecord>> {
        let tx = self.node.catalog.db().begin_read()?;
        let t = match tx.open_table(POLICIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push(decode(v.value(), k.value())?);
        }
        Ok(out)
    }

    pub fn failures(&self) -> Result<BTreeMap<String, FailureCount>> {
        let tx = self.node.catalog.db().begin_read()?;
        let t = match tx.open_table(FAILURES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = BTreeMap::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.insert(k.value().to_string(), decode(v.value(), k.value())?);
        }
        Ok(out)
    }

    /// Counts a failure (shown by `policy list` and `policy show`).
    pub fn record_failure(&self, name: &str, err: &Error) -> Result<()> {
        self.ensure_tables()?;
        let tx = self.node.catalog.db().begin_write()?;
        {
            let mut t = tx.open_table(FAILURES)?;
            let mut f: FailureCount = match t.get(name)? {
                Some(v) => decode(v.value(), name)?,
                None => FailureCount::default(),
            };
            f.count += 1;
            f.last_error = crate::id::shorten_to(&err.to_string(), 2048);
            f.last_unix_ms = crate::now_unix_ms();
            let bytes = serde_json::to_vec(&f).map_err(|e| Error::internal(e.to_string()))?;
            t.insert(name, bytes.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Unregisters a policy and releases its locks.
    pub fn remove(&self, name: &str) -> Result<PolicyRecord> {
        let rec = self.require(name)?;
        let tx = self.node.catalog.db().begin_write()?;
        {
            tx.open_table(POLICIES)?.remove(name)?;
            tx.open_table(FAILURES)?.remove(name)?;
        }
        tx.commit()?;
        self.node.catalog.locks().release(
            &rec.holder(),
            None,
            None,
            &format!("policy {name} was removed"),
        )?;
        // The component file stays if another registration uses the same bytes.
        let still_used = self.list()?.iter().any(|p| p.component == rec.component);
        if let (false, Ok(d)) = (still_used, self.node.dir.open_dir("policies")) {
            let _ = d.remove_file(format!("{}.wasm", rec.component));
        }
        Ok(rec)
    }

    /// Loads a registered policy, from its cached artifact when it matches this engine.
    pub fn load<'e>(&self, engine: &'e PolicyEngine, rec: &PolicyRecord) -> Result<WasmPolicy<'e>> {
        let cached = format!("{}-{}.cwasm", engine.engine_key(), rec.component);
        let loaded = self.read_file("policy-cache", &cached).ok().and_then(|a| {
            engine
                .load(&rec.name, &a, rec.config.clone(), rec.limits)
                .ok()
        });
        if let Some(p) = loaded {
            return Ok(p);
        }
        // No artifact for this engine build (an upgrade, a cleaned cache): compile again.
        let wasm = self.component(rec)?;
        let artifact = engine.compile(&rec.name, &wasm)?;
        self.store_file("policy-cache", &cached, &artifact)?;
        engine.load(&rec.name, &artifact, rec.config.clone(), rec.limits)
    }

    /// A registered policy's component, checked against its hash.
    pub fn component(&self, rec: &PolicyRecord) -> Result<Vec<u8>> {
        let wasm = self
            .read_file("policies", &format!("{}.wasm", rec.component))
            .map_err(|e| Error::io(format!("reading the component of policy {}", rec.name), e))?;
        if blake3::hash(&wasm).to_hex().as_str() != rec.component {
            return Err(Error::corrupt(format!(
                "the stored component of policy {} does not match its hash; register it again",
                rec.name
            )));
        }
        Ok(wasm)
    }

    /// A registered policy's compiled artifact for this engine, if the cache has one.
    pub fn cached_artifact(&self, engine: &PolicyEngine, rec: &PolicyRecord) -> Option<Vec<u8>> {
        let cached = format!("{}-{}.cwasm", engine.engine_key(), rec.component);
        self.read_file("policy-cache", &cached).ok()
    }

    /// Registers a component whose compiled artifact is at hand (from another node's cache of
    /// this host, for a simulation): it goes into this node's cache first, so `add` compiles
    /// nothing. An artifact that does not load is only a cache miss: `add` compiles then.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_precompiled(
        &self,
        engine: &PolicyEngine,
        name: &str,
        wasm: &[u8],
        artifact: Option<&[u8]>,
        volumes: Vec<VolumeName>,
        config: BTreeMap<String, String>,
        limits: Limits,
    ) -> Result<PolicyRecord> {
        if let Some(a) = artifact {
            let hash = blake3::hash(wasm).to_hex().to_string();
            self.store_file(
                "policy-cache",
                &format!("{}-{hash}.cwasm", engine.engine_key()),
                a,
            )?;
        }
        self.add(engine, name, wasm, volumes, config, limits)
    }

    /// The policies registered for a volume.
    pub fn for_volume(&self, volume: &VolumeName) -> Result<Vec<PolicyRecord>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|p| p.volumes.contains(volume))
            .collect())
    }
}

/// What this node knows for a decision on `volume`.
pub fn view(node: &Node, volume: &VolumeName, phase: Phase) -> Result<NodeView> {
    let local = node.catalog.snapshots(volume)?;
    let sets = node.catalog.locks().sets(Some(volume))?;
    let mut here = Vec::new();
    let mut downstream = Vec::new();
    let mut downstreams: BTreeMap<HolderId, Vec<SnapshotId>> = BTreeMap::new();
    for s in sets {
        let mirror = s.holder.application_name().is_none();
        for l in s.locks {
            if mirror {
                downstreams
                    .entry(l.holder.clone())
                    .or_default()
                    .push(l.snapshot);
                downstream.push(l);
            } else {
                here.push(l);
            }
        }
    }
    for ids in downstreams.values_mut() {
        ids.sort();
        ids.dedup();
    }
    Ok(NodeView {
        node_id: node.info.node_id.clone(),
        volume: volume.clone(),
        phase,
        now_unix_ms: crate::now_unix_ms(),
        local_snapshots: local,
        upstream_snapshots: None,
        locks_held_here: here,
        locks_from_downstream: downstream,
        downstreams: downstreams.into_iter().collect(),
    })
}

/// What one policy decided about locks.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LockDecision {
    pub policy: String,
    pub locks: Vec<(SnapshotId, crate::softlock::LockType, String)>,
    /// The failure, when the policy failed (its previous locks were kept).
    pub error: Option<String>,
}

/// Which policies of a volume to ask.
#[derive(Clone, Copy, Debug)]
pub enum Asked<'a> {
    /// Those that list the phase in their description.
    HandlingPhase,
    /// All of them (before retention, every policy's locks are brought up to date).
    Every,
    /// Just this one (`policy test`).
    Only(&'a str),
}

/// Asks the volume's policies for their locks; with `apply`, each answer replaces that
/// policy's lock set (a failure keeps the previous set and is counted).
pub fn decide_locks(
    node: &Node,
    engine: &PolicyEngine,
    volume: &VolumeName,
    phase: Phase,
    asked: Asked<'_>,
    apply: bool,
) -> Result<Vec<LockDecision>> {
    let policies = Policies::new(node);
    let prepared = view(node, volume, phase)?.prepare();
    let mut out = Vec::new();
    for rec in policies.for_volume(volume)? {
        let ask = match asked {
            Asked::HandlingPhase => rec.handles(phase),
            Asked::Every => true,
            Asked::Only(name) => name == rec.name,
        };
        if !ask {
            continue;
        }
        let result = policies
            .load(engine, &rec)
            .and_then(|p| p.decide_locks(&prepared));
        match result {
            Ok(locks) => {
                if apply {
                    node.catalog.locks().replace_own_set(
                        volume,
                        rec.holder(),
                        locks
                            .iter()
                            .map(|(snapshot, lock_type, value)| NewLock {
                                snapshot: *snapshot,
                                lock_type: lock_type.clone(),
                                value: value.clone(),
                                lease_ms: None,
                                path: vec![],
                            })
                            .collect(),
                    )?;
                }
                out.push(LockDecision {
                    policy: rec.name.clone(),
                    locks,
                    error: None,
                });
            }
            Err(e @ (Error::Policy(_) | Error::InvalidInput(_))) => {
                let said = format!("lock decision failed; previous locks kept: {e}");
                if let Some(left_out) =
                    crate::first_in_a_while(&format!("{}/decision", rec.name), &said)
                {
                    if left_out > 0 {
                        tracing::warn!(policy = %rec.name, "{said} (and {left_out} times before)");
                    } else {
                        tracing::warn!(policy = %rec.name, "{said}");
                    }
                }
                if apply {
                    policies.record_failure(&rec.name, &e)?;
                }
                out.push(LockDecision {
                    policy: rec.name.clone(),
                    locks: vec![],
                    error: Some(e.to_string()),
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The retention decision of a volume's policies.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RetentionDecision {
    /// Each retention policy's proposals.
    pub proposals: BTreeMap<String, Vec<PruneProposal>>,
    /// Proposed by every retention policy.
    pub agreed: Vec<SnapshotId>,
}

/// Asks every retention policy of the volume (or only `only`). Any failure is an error: the
/// caller then prunes nothing.
pub fn plan_retention(
    node: &Node,
    engine: &PolicyEngine,
    volume: &VolumeName,
    only: Option<&str>,
    record_failures: bool,
) -> Result<Option<RetentionDecision>> {
    let policies = Policies::new(node);
    let recs: Vec<PolicyRecord> = policies
        .for_volume(volume)?
        .into_iter()
        .filter(|r| only.map_or(r.handles(Phase::Retention), |o| o == r.name))
        .collect();
    if recs.is_empty() {
        return Ok(None);
    }
    let prepared = view(node, volume, Phase::Retention)?.prepare();
    let mut proposals = BTreeMap::new();
    for rec in &recs {
        let r = policies
            .load(engine, rec)
            .and_then(|p| p.plan_retention(&prepared));
        match r {
            Ok(p) => {
                proposals.insert(rec.name.clone(), p);
            }
            Err(e) => {
                if record_failures {
                    policies.record_failure(&rec.name, &e)?;
                }
                return Err(Error::Policy(format!("{e}; nothing was pruned")));
            }
        }
    }
    let mut agreed: Option<HashSet<SnapshotId>> = None;
    for p in proposals.values() {
        let ids: HashSet<SnapshotId> = p.iter().map(|x| x.snapshot).collect();
        agreed = Some(match agreed {
            None => ids,
            Some(a) => a.intersection(&ids).copied().collect(),
        });
    }
    let mut agreed: Vec<SnapshotId> = agreed.unwrap_or_default().into_iter().collect();
    agreed.sort();
    Ok(Some(RetentionDecision { proposals, agreed }))
}
