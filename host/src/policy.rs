//! Policies: sandboxed WebAssembly components (the WIT world `holdfast:policy/policy`, version
//! 0.2.0 or 0.1.0) that decide which soft locks a node holds and which snapshots retention may
//! prune. The only module that names wasmtime.
//!
//! - Both versions of the world are linked side by side (`bindings::since_v0_1`,
//!   `bindings::since_v0_2`, as Zed's extension host does). A component's version is detected
//!   from the holdfast interfaces it imports, else from the exports it fits; a loaded policy
//!   dispatches each call to its version's bindings ([`WorldVersion`]).
//! - 0.1 copies the whole view into every call, converted once per decision and only when a
//!   0.1 policy is asked. 0.2 lends the policy a `node-view` resource ([`view`]) that answers
//!   only what the policy asks for.
//! - One shared [`PolicyEngine`] (epoch interruption, a ticker thread) and one linker with a
//!   deny-all WASI: no preopens, no environment, no network, stdout discarded, stderr captured
//!   into the log under the policy's name, and clocks that read the time the host passes in.
//! - A component is checked (a component, not a core module; it fits the world) and compiled
//!   once at registration; the precompiled artifact is cached under the state directory, keyed
//!   by the component's hash and the engine's compatibility hash, so loading takes a
//!   millisecond.
//! - Every call gets a fresh `Store` with a memory cap and a deadline. A trap, a timeout, an
//!   exhausted memory or a malformed answer is an [`Error::Policy`] naming the policy and the
//!   call; the host lives on and the caller falls back to the safe default (keep everything;
//!   keep the previous locks).
//!
//! # Invariants
//! - Answers are validated ([`convert`]), by the same checks for either version: every
//!   snapshot named exists, values are bounded, at most a lock set's worth of locks.
//! - Nothing a policy answers can delete a locked snapshot: prunes go through the same guard
//!   as every deletion (`softlock::guard_delete`).

pub mod bindings;
mod convert;
#[doc(hidden)]
pub mod fuzz;
pub mod registry;
pub mod simulate;
mod view;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::catalog::SnapshotRecord;
use crate::error::{Error, Result};
use crate::id::{NodeId, SnapshotId, VolumeName};
use crate::softlock::{HolderId, LockType, SoftLock};
use bindings::{since_v0_1, since_v0_2};
use view::{ViewHandle, ViewIndex};

/// A version of the WIT package `holdfast:policy` that this host implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorldVersion {
    /// `wit/since_v0.1.0`: the view is a record copied whole into every call.
    V0_1,
    /// `wit/since_v0.2.0`: the view is a resource the policy queries.
    V0_2,
}

impl WorldVersion {
    /// Newest first: the order in which a component's exports are tried.
    pub const ALL: [WorldVersion; 2] = [WorldVersion::V0_2, WorldVersion::V0_1];

    /// `0.1.0`, `0.2.0`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorldVersion::V0_1 => "0.1.0",
            WorldVersion::V0_2 => "0.2.0",
        }
    }

    /// `holdfast:policy@0.2.0`.
    pub fn world(self) -> String {
        format!("holdfast:policy@{}", self.as_str())
    }
}

impl fmt::Display for WorldVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
/// Default deadline of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// Default memory cap of one call.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;
/// Epoch tick: deadlines are whole ticks.
const TICK: Duration = Duration::from_millis(2);
/// Captured stderr per call.
const STDERR_BYTES: usize = 64 << 10;

/// Why the host is asking a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    SnapshotCreated,
    BeforeMirror,
    AfterMirror,
    Scheduled,
    Retention,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::SnapshotCreated,
        Phase::BeforeMirror,
        Phase::AfterMirror,
        Phase::Scheduled,
        Phase::Retention,
    ];
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::SnapshotCreated => "snapshot-created",
            Phase::BeforeMirror => "before-mirror",
            Phase::AfterMirror => "after-mirror",
            Phase::Scheduled => "scheduled",
            Phase::Retention => "retention",
        })
    }
}

impl FromStr for Phase {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Phase::ALL
            .into_iter()
            .find(|p| p.to_string() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown phase {:?}; use one of snapshot-created, before-mirror, \
                     after-mirror, scheduled, retention",
                    crate::id::shorten(s)
                ))
            })
    }
}

impl Serialize for Phase {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a policy says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Description {
    pub name: String,
    pub version: String,
    pub phases: Vec<Phase>,
}

/// A snapshot a policy would prune.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PruneProposal {
    pub snapshot: SnapshotId,
    pub reason: String,
}

/// Everything a policy sees for one decision.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub node_id: NodeId,
    pub volume: VolumeName,
    pub phase: Phase,
    pub now_unix_ms: u64,
    pub local_snapshots: Vec<SnapshotRecord>,
    pub upstream_snapshots: Option<Vec<SnapshotRecord>>,
    pub locks_held_here: Vec<SoftLock>,
    pub locks_from_downstream: Vec<SoftLock>,
    pub downstreams: Vec<(HolderId, Vec<SnapshotId>)>,
}

/// A view prepared once per decision, to hand to several policies: indexed by snapshot id
/// (for 0.2's queries and for validating every answer), and converted into 0.1's record the
/// first time a 0.1 policy is asked (that conversion allocates a string per id, name and
/// label: worth doing once per decision, not per policy, and not at all without 0.1 policies).
pub struct PreparedView {
    index: Arc<ViewIndex>,
    v01: OnceLock<since_v0_1::holdfast::policy::types::NodeView>,
}

impl fmt::Debug for PreparedView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PreparedView({}, {})",
            self.view().volume,
            self.view().phase
        )
    }
}

impl PreparedView {
    pub fn view(&self) -> &NodeView {
        &self.index.view
    }

    fn v01(&self) -> &since_v0_1::holdfast::policy::types::NodeView {
        self.v01
            .get_or_init(|| convert::since_v0_1::view_to_wit(self.view()))
    }
}

impl NodeView {
    pub fn prepare(self) -> PreparedView {
        PreparedView {
            index: Arc::new(ViewIndex::new(self)),
            v01: OnceLock::new(),
        }
    }
}

/// Per-call limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Limits {
    pub timeout_ms: u64,
    pub memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64,
            memory_bytes: DEFAULT_MEMORY_BYTES,
        }
    }
}

/// The state of one call's store.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    policy: String,
    config: BTreeMap<String, String>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    fn log(&self, level: tracing::Level, message: &str) {
        let message = crate::id::shorten_to(message, 4096);
        let policy = &self.policy;
        match level {
            tracing::Level::TRACE => tracing::trace!(policy, "{message}"),
            tracing::Level::DEBUG => tracing::debug!(policy, "{message}"),
            tracing::Level::INFO => tracing::info!(policy, "{message}"),
            tracing::Level::WARN => tracing::warn!(policy, "{message}"),
            tracing::Level::ERROR => tracing::error!(policy, "{message}"),
        }
    }

    fn config_pairs(&self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl since_v0_1::holdfast::policy::types::Host for HostState {}

impl since_v0_1::holdfast::policy::log::Host for HostState {
    fn log(&mut self, level: since_v0_1::holdfast::policy::log::Level, message: String) {
        use since_v0_1::holdfast::policy::log::Level as L;
        let level = match level {
            L::Trace => tracing::Level::TRACE,
            L::Debug => tracing::Level::DEBUG,
            L::Info => tracing::Level::INFO,
            L::Warn => tracing::Level::WARN,
            L::Error => tracing::Level::ERROR,
        };
        HostState::log(self, level, &message);
    }
}

impl since_v0_1::holdfast::policy::config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn all(&mut self) -> Vec<(String, String)> {
        self.config_pairs()
    }
}

impl since_v0_2::holdfast::policy::log::Host for HostState {
    fn log(
        &mut self,
        level: since_v0_2::holdfast::policy::log::Level,
        message: String,
    ) -> wasmtime::Result<()> {
        use since_v0_2::holdfast::policy::log::Level as L;
        let level = match level {
            L::Trace => tracing::Level::TRACE,
            L::Debug => tracing::Level::DEBUG,
            L::Info => tracing::Level::INFO,
            L::Warn => tracing::Level::WARN,
            L::Error => tracing::Level::ERROR,
        };
        HostState::log(self, level, &message);
        Ok(())
    }
}

impl since_v0_2::holdfast::policy::config::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.config.get(&key).cloned())
    }

    fn all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.config_pairs())
    }
}

/// A wall clock and a monotonic clock frozen at the time the host passes in: a policy has no
/// ambient time of its own.
struct FixedClock(Duration);

impl wasmtime_wasi::HostWallClock for FixedClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        self.0
    }
}

impl wasmtime_wasi::HostMonotonicClock for FixedClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }
    fn now(&self) -> u64 {
        self.0.as_nanos() as u64
    }
}

/// A policy's randomness (`wasi:random`, secure and insecure alike): a BLAKE3 stream seeded
/// from the call, so that the same call over the same view gives the same answer, wherever
/// and however often it is asked (`policy test`, a dry run and the real prune agree; a
/// simulation replays). A policy has no use for secrets, so nothing is lost by it.
struct SeededRandom(blake3::OutputReader);

impl SeededRandom {
    fn new(seed: &[u8; 32], stream: &str) -> Self {
        let mut h = blake3::Hasher::new_keyed(seed);
        h.update(stream.as_bytes());
        SeededRandom(h.finalize_xof())
    }

    /// The seed of one call: the policy (its name and configuration: two policies asked in
    /// the same decision draw differently), what is asked (`describe`, `decide-locks
    /// (scheduled)`, ...) and, for a decision, everything the policy can see of the view.
    fn seed(
        policy: &str,
        config: &BTreeMap<String, String>,
        what: &str,
        view: Option<&PreparedView>,
    ) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("holdfast policy call v1");
        // Length-prefixed (postcard), so no two different calls hash alike.
        postcard::to_io(&(policy, config, what), &mut h).expect("hashing a call");
        if let Some(v) = view {
            h.update(&v.index.digest());
        }
        *h.finalize().as_bytes()
    }
}

impl rand_core::TryRng for SeededRandom {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> std::result::Result<u32, Self::Error> {
        let mut b = [0; 4];
        self.0.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> std::result::Result<u64, Self::Error> {
        let mut b = [0; 8];
        self.0.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> std::result::Result<(), Self::Error> {
        self.0.fill(dst);
        Ok(())
    }
}

/// The shared engine and linker.
pub struct PolicyEngine {
    engine: Engine,
    linker: Linker<HostState>,
}

impl fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PolicyEngine")
    }
}

fn wasm_error(context: impl fmt::Display, e: wasmtime::Error) -> Error {
    Error::Policy(format!("{context}: {e:#}"))
}

impl PolicyEngine {
    pub fn new() -> Result<Self> {
        let mut cfg = Config::new();
        cfg.epoch_interruption(true);
        // A fresh store per call: the pooling allocator reuses instance and memory slots
        // instead of mapping (and faulting in) new ones every time. Slots are sized for the
        // largest memory a policy may be given (4 GiB, see registry::add).
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        // At most 32 calls at once per process; each slot reserves (not commits) address
        // space for a 4 GiB memory plus guard pages.
        pool.total_component_instances(32)
            .total_core_instances(256)
            .total_memories(32)
            .total_tables(256)
            .max_memory_size(4 << 30)
            // Reset the first MiBs of a reused memory by zeroing rather than unmapping, so
            // the next call does not fault its pages in again.
            .linear_memory_keep_resident(8 << 20)
            .table_keep_resident(1 << 20);
        cfg.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg).map_err(|e| wasm_error("starting the policy engine", e))?;
        // The ticker stops when the engine is dropped (it only holds a weak reference).
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                while let Some(e) = weak.upgrade() {
                    e.increment_epoch();
                    drop(e);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| Error::io("starting the policy deadline thread", e))?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| wasm_error("linking WASI", e))?;
        // Both versions side by side: their interfaces have distinct versioned names.
        since_v0_1::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| wasm_error("linking the holdfast:policy@0.1.0 world", e))?;
        since_v0_2::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| wasm_error("linking the holdfast:policy@0.2.0 world", e))?;
        Ok(PolicyEngine { engine, linker })
    }

    /// Identifies the engine build and settings, for keying precompiled artifacts.
    pub fn engine_key(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// Checks untrusted bytes: a component (not a core module, not truncated) that fits a
    /// `holdfast:policy` world this host implements. Returns the precompiled artifact.
    pub fn compile(&self, what: &str, bytes: &[u8]) -> Result<Vec<u8>> {
        const COMPONENT: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
        const CORE: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
        if bytes.starts_with(&CORE) {
            return Err(Error::invalid(format!(
                "{what} is a core WebAssembly module, not a component; build the policy with \
                 `cargo build --target wasm32-wasip2` (wit-bindgen), which produces a component"
            )));
        }
        if !bytes.starts_with(&COMPONENT) {
            return Err(Error::invalid(format!(
                "{what} is not a WebAssembly component (wrong header)"
            )));
        }
        let artifact = self
            .engine
            .precompile_component(bytes)
            .map_err(|e| Error::invalid(format!("{what} is not a valid component: {e:#}")))?;
        let component = self.deserialize(&artifact)?;
        self.pre(what, &component)?;
        Ok(artifact)
    }

    fn deserialize(&self, artifact: &[u8]) -> Result<Component> {
        // SAFETY: artifacts come only from `precompile_component` of this engine build, stored
        // under the node's state directory (never from outside); a mismatching one is refused.
        #[allow(unsafe_code)]
        let c = unsafe { Component::deserialize(&self.engine, artifact) };
        c.map_err(|e| wasm_error("loading a precompiled policy", e))
    }

    /// The version a component was built against, from the holdfast interfaces it imports
    /// (`holdfast:policy/log@0.2.0`, ...); none if it imports none of them (a policy that
    /// neither logs nor reads its config may not).
    fn detect(&self, component: &Component) -> Option<WorldVersion> {
        let ty = component.component_type();
        let mut found = None;
        for (name, _) in ty.imports(&self.engine) {
            let version = name
                .strip_prefix("holdfast:policy/")
                .and_then(|rest| rest.split_once('@'))
                .and_then(|(_, v)| WorldVersion::ALL.into_iter().find(|w| w.as_str() == v));
            // A component importing from both versions fits neither world: let the export
            // check of the newest say why.
            match (found, version) {
                (None, v) => found = v,
                (Some(a), Some(b)) if a != b => return Some(WorldVersion::V0_2),
                _ => {}
            }
        }
        found
    }

    fn pre(&self, what: &str, component: &Component) -> Result<PolicyPre> {
        let pre = self.linker.instantiate_pre(component).map_err(|e| {
            Error::invalid(format!(
                "{what} does not fit a holdfast:policy world this host implements (0.2.0, \
                 0.1.0): it imports something the host does not provide: {e:#}"
            ))
        })?;
        let candidates = match self.detect(component) {
            Some(v) => vec![v],
            None => WorldVersion::ALL.to_vec(),
        };
        let mut why = Vec::new();
        for v in &candidates {
            let fits = match v {
                WorldVersion::V0_1 => since_v0_1::PolicyPre::new(pre.clone()).map(PolicyPre::V0_1),
                WorldVersion::V0_2 => since_v0_2::PolicyPre::new(pre.clone()).map(PolicyPre::V0_2),
            };
            match fits {
                Ok(p) => return Ok(p),
                Err(e) => why.push(format!("{}: {e:#}", v.world())),
            }
        }
        Err(Error::invalid(match &candidates[..] {
            [v] => format!(
                "{what} imports holdfast:policy@{v} but does not export its world: {}",
                why.join("; ")
            ),
            _ => format!(
                "{what} does not export a holdfast:policy world this host implements ({})",
                why.join("; ")
            ),
        }))
    }

    /// Loads a precompiled artifact into a callable policy.
    pub fn load(
        &self,
        name: &str,
        artifact: &[u8],
        config: BTreeMap<String, String>,
        limits: Limits,
    ) -> Result<WasmPolicy<'_>> {
        let component = self.deserialize(artifact)?;
        let pre = self.pre(name, &component)?;
        let policy = WasmPolicy {
            engine: self,
            name: name.to_string(),
            pre,
            config,
            limits,
        };
        policy.warm_up();
        Ok(policy)
    }
}

/// A component checked against one version of the world: the dispatch over the versions'
/// bindings (a new version adds a variant; the old ones stay).
#[derive(Clone)]
enum PolicyPre {
    V0_1(since_v0_1::PolicyPre<HostState>),
    V0_2(since_v0_2::PolicyPre<HostState>),
}

/// A loaded policy, ready to call.
pub struct WasmPolicy<'e> {
    engine: &'e PolicyEngine,
    pub name: String,
    pre: PolicyPre,
    config: BTreeMap<String, String>,
    limits: Limits,
}

impl fmt::Debug for WasmPolicy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WasmPolicy({})", self.name)
    }
}

/// Lends a view to one call: the `node-view` resource the policy borrows.
fn lend(
    store: &mut Store<HostState>,
    prepared: &PreparedView,
) -> wasmtime::Result<wasmtime::component::Resource<ViewHandle>> {
    Ok(store
        .data_mut()
        .table
        .push(ViewHandle(Arc::clone(&prepared.index)))?)
}

/// Attempts at preparing a component's memory images when the kernel refuses for a moment.
const WARM_UP_ATTEMPTS: u32 = 6;

impl WasmPolicy<'_> {
    /// Instantiates the component once, so that wasmtime prepares its copy-on-write memory
    /// images (a sealed memfd per module) at load, where a passing refusal can be tried again.
    /// Sealing a new memfd can fail for a moment on a loaded host (the kernel answers EBUSY
    /// while something else still holds a reference to its pages); wasmtime keeps no failure,
    /// so the next instantiation tries again. Any other failure is left for the call itself
    /// to meet and report in its own words.
    fn warm_up(&self) {
        for attempt in 1..=WARM_UP_ATTEMPTS {
            let r = self.call("loading", crate::now_unix_ms(), None, |s| match &self.pre {
                PolicyPre::V0_1(pre) => pre.instantiate(&mut *s).map(drop),
                PolicyPre::V0_2(pre) => pre.instantiate(&mut *s).map(drop),
            });
            match r {
                Err(e) if e.to_string().contains("seals to the memfd") => {
                    tracing::debug!(policy = %self.name, attempt, "preparing its memory: {e}");
                    std::thread::sleep(Duration::from_millis(20 * u64::from(attempt)));
                }
                _ => return,
            }
        }
    }

    /// The version of the world the component implements.
    pub fn world(&self) -> WorldVersion {
        match self.pre {
            PolicyPre::V0_1(_) => WorldVersion::V0_1,
            PolicyPre::V0_2(_) => WorldVersion::V0_2,
        }
    }

    pub fn describe(&self) -> Result<Description> {
        let now = crate::now_unix_ms();
        let d = match &self.pre {
            PolicyPre::V0_1(pre) => {
                let d = self.call("describe", now, None, |s| {
                    pre.instantiate(&mut *s)?.call_describe(s)
                })?;
                convert::since_v0_1::description_from_wit(d)
            }
            PolicyPre::V0_2(pre) => {
                let d = self.call("describe", now, None, |s| {
                    pre.instantiate(&mut *s)?.call_describe(s)
                })?;
                convert::since_v0_2::description_from_wit(d)
            }
        };
        d.map_err(|e| self.malformed("describe", e))
    }

    /// The locks the policy wants, validated.
    pub fn decide_locks(
        &self,
        prepared: &PreparedView,
    ) -> Result<Vec<(SnapshotId, LockType, String)>> {
        let view = prepared.view();
        let what = format!("decide-locks ({})", view.phase);
        let index = &prepared.index;
        let locks = match &self.pre {
            PolicyPre::V0_1(pre) => {
                let wit = prepared.v01();
                let answer = self
                    .call(&what, view.now_unix_ms, Some(prepared), |s| {
                        pre.instantiate(&mut *s)?.call_decide_locks(s, wit)
                    })?
                    .map_err(|msg| self.refused(&what, msg))?;
                convert::since_v0_1::locks_from_wit(index, answer)
            }
            PolicyPre::V0_2(pre) => {
                let answer = self
                    .call(&what, view.now_unix_ms, Some(prepared), |s| {
                        let policy = pre.instantiate(&mut *s)?;
                        let view = lend(s, prepared)?;
                        policy.call_decide_locks(s, view)
                    })?
                    .map_err(|msg| self.refused(&what, msg))?;
                convert::since_v0_2::locks_from_wit(index, answer)
            }
        };
        locks.map_err(|e| self.malformed(&what, e))
    }

    /// The snapshots the policy would prune, validated.
    pub fn plan_retention(&self, prepared: &PreparedView) -> Result<Vec<PruneProposal>> {
        let view = prepared.view();
        let what = format!("plan-retention ({})", view.phase);
        let index = &prepared.index;
        let prunes = match &self.pre {
            PolicyPre::V0_1(pre) => {
                let wit = prepared.v01();
                let answer = self
                    .call(&what, view.now_unix_ms, Some(prepared), |s| {
                        pre.instantiate(&mut *s)?.call_plan_retention(s, wit)
                    })?
                    .map_err(|msg| self.refused(&what, msg))?;
                convert::since_v0_1::prunes_from_wit(index, answer)
            }
            PolicyPre::V0_2(pre) => {
                let answer = self
                    .call(&what, view.now_unix_ms, Some(prepared), |s| {
                        let policy = pre.instantiate(&mut *s)?;
                        let view = lend(s, prepared)?;
                        policy.call_plan_retention(s, view)
                    })?
                    .map_err(|msg| self.refused(&what, msg))?;
                convert::since_v0_2::prunes_from_wit(index, answer)
            }
        };
        prunes.map_err(|e| self.malformed(&what, e))
    }

    fn refused(&self, what: &str, msg: String) -> Error {
        Error::Policy(format!(
            "policy {} answered {what} with an error: {}",
            self.name,
            crate::id::shorten_to(&msg, 1024)
        ))
    }

    fn malformed(&self, what: &str, e: Error) -> Error {
        Error::Policy(format!(
            "policy {} gave a malformed answer to {what}: {e}",
            self.name
        ))
    }

    /// Runs one call in a fresh store with the deadline and memory cap: `f` instantiates the
    /// component in the store and calls it.
    fn call<T>(
        &self,
        what: &str,
        now_unix_ms: u64,
        view: Option<&PreparedView>,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T> {
        // Synchronous WASI drives its I/O (a policy's stderr) with the ambient tokio runtime's
        // `block_on`, which must not run on an async worker thread: step aside first.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.call_here(what, now_unix_ms, view, f))
            }
            _ => self.call_here(what, now_unix_ms, view, f),
        }
    }

    fn call_here<T>(
        &self,
        what: &str,
        now_unix_ms: u64,
        view: Option<&PreparedView>,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T> {
        let stderr = MemoryOutputPipe::new(STDERR_BYTES);
        let clock = Duration::from_millis(now_unix_ms);
        let seed = SeededRandom::seed(&self.name, &self.config, what, view);
        let insecure_seed = {
            let mut b = [0; 16];
            SeededRandom::new(&seed, "insecure-seed").0.fill(&mut b);
            u128::from_le_bytes(b)
        };
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .secure_random(SeededRandom::new(&seed, "random"))
            .insecure_random(SeededRandom::new(&seed, "insecure-random"))
            .insecure_random_seed(insecure_seed)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(FixedClock(clock))
            .monotonic_clock(FixedClock(clock))
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes as usize)
            .instances(64)
            .memories(16)
            .tables(64)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine.engine,
            HostState {
                wasi,
                table: ResourceTable::new(),
                limits,
                policy: self.name.clone(),
                config: self.config.clone(),
            },
        );
        store.limiter(|s| &mut s.limits);
        let ticks = (self.limits.timeout_ms / TICK.as_millis() as u64).max(1);
        store.set_epoch_deadline(ticks);
        let result = f(&mut store);
        let captured = stderr.contents();
        if !captured.is_empty() {
            let text = String::from_utf8_lossy(&captured);
            if let Some(left_out) = crate::first_in_a_while(&self.name, &text) {
                if left_out > 0 {
                    tracing::warn!(policy = %self.name, "the same output as below was left out {left_out} times");
                }
                for line in text.lines().take(50) {
                    tracing::warn!(policy = %self.name, "stderr: {}", crate::id::shorten_to(line, 512));
                }
            }
        }
        result.map_err(|e| self.fault(what, e))
    }

    fn fault(&self, what: &str, e: wasmtime::Error) -> Error {
        let why = match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => format!(
                "ran past its deadline of {} ms and was stopped",
                self.limits.timeout_ms
            ),
            Some(trap) => format!("trapped ({trap})"),
            None if format!("{e:?}").contains("growing memory") => format!(
                "tried to use more than its memory limit of {} MiB and was stopped",
                self.limits.memory_bytes >> 20
            ),
            None => format!("failed: {}", crate::id::shorten_to(&format!("{e:#}"), 1024)),
        };
        Error::Policy(format!("policy {} {why} during {what}", self.name))
    }
}
