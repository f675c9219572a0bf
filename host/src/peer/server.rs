//! The upstream's side of the peer protocol, plus the daemon's `status` and `/metrics`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use std::net::IpAddr;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::{
    ChunkRequest, MANIFEST_KIND_HEADER, MAX_CHUNKS_PER_REQUEST, PEER_HEADER, SnapshotList,
    WireError, write_frame,
};
use crate::catalog::SnapshotRecord;
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::id::{ChunkId, NodeId, RegionName, SnapshotId, VolumeName, shorten};
use crate::repo::ChunkIndex;
use crate::snapshot::Manifest;
use crate::softlock::registry::HolderSettings;
use crate::softlock::{HolderId, LockSetUpdate};
use crate::state::Node;

/// What the daemon reports through the listener.
pub trait Reporter: Send + Sync {
    fn status(&self) -> Result<serde_json::Value>;
    fn metrics(&self) -> String;
}

/// Requests of one peer served at once; more wait for a slot.
const PEER_CONCURRENCY: usize = 16;
/// Requests of one peer per second, on average, and in a burst.
const PEER_RATE: f64 = 200.0;
const PEER_BURST: f64 = 400.0;
/// Bodies a route accepts: a chunk request lists at most 1,024 ids; a lock set is bounded by
/// `max_locks` and the path of each lock; the other routes take none.
const CHUNK_REQUEST_LIMIT: usize = 256 << 10;
const LOCK_SET_LIMIT: usize = 4 << 20;
const OTHER_BODY_LIMIT: usize = 16 << 10;
/// Connections served at once, in all and from one address; more are closed at once.
const MAX_CONNECTIONS: usize = 512;
const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// Of [`MAX_CONNECTIONS`], the last this many are kept for addresses a peer authenticated
/// from lately ([`KNOWN_FOR`]): eight addresses of strangers can fill the rest, not these.
const RESERVED_FOR_KNOWN: usize = 64;
/// How long an address a peer authenticated from counts as known.
const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);
/// Most known addresses remembered (the oldest are forgotten first).
const KNOWN_ADDRESSES: usize = 4096;
/// A TLS handshake, and the first request of a connection, must come within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request for this long is closed (a peer reconnects when it needs to).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A request whose answer has not been taken in this long (a peer that opens no flow-control
/// window, say) closes its connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Most bytes of one chunk answer: a request for more is refused (ask for fewer chunks).
const MAX_ANSWER_BYTES: u64 = 64 << 20;
/// Bytes of chunk answers being read and sent at once, for all peers together (KiB units).
const SEND_BUDGET_KIB: u32 = 512 << 10;
/// Manifest work (decoding, deltas, old formats, chunk sets, regions) done at once, for all
/// peers; one peer holds at most one of these permits, so no peer can take them all.
const HEAVY_WORK: usize = 2;
/// Lock sets one peer may send a second, on average, and in a burst: this burst, plus two
/// sets for each volume it is granted (an update sends one before its transfer and one after,
/// and a node may mirror all its volumes in the same minute; the simulation of nodes of 100
/// volumes found a third of their messages refused by a burst of 20).
const LOCK_SET_RATE: f64 = 5.0;
const LOCK_SET_BURST: f64 = 20.0;

/// A downstream as this node knows it.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) name: NodeId,
    token: String,
    volumes: HashSet<VolumeName>,
    /// Volumes of which it may read only some regions (`regions = ["VOLUME/REGION"]`).
    regions: HashMap<VolumeName, HashSet<RegionName>>,
    max_locks: usize,
    max_snapshots: usize,
    lease_ms: Option<u64>,
    /// Its requests in progress (at most [`PEER_CONCURRENCY`]).
    slots: Arc<tokio::sync::Semaphore>,
    /// Its manifest work: one piece at a time, so that it holds at most one of the
    /// [`HEAVY_WORK`] permits all peers share.
    heavy: Arc<tokio::sync::Semaphore>,
    /// Its request rate.
    rate: Mutex<TokenBucket>,
    /// Its rate of lock sets (each may rewrite up to `max_locks` locks and their history).
    lock_sets: Mutex<TokenBucket>,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    /// When it was last looked at ([`crate::monotonic_ms`], which a simulation steps).
    at_ms: u64,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            tokens: burst,
            at_ms: crate::monotonic_ms(),
            rate,
            burst,
        }
    }

    fn take(&mut self) -> bool {
        let now = crate::monotonic_ms();
        let elapsed = now.saturating_sub(self.at_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at_ms = self.at_ms.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Logs a kind of event at most once a second, saying how many were left out since: a flood
/// of refusals must not become a flood of log lines.
#[derive(Debug)]
pub struct LogLimiter {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    pub const fn new() -> Self {
        LogLimiter {
            state: Mutex::new((None, 0)),
        }
    }

    pub fn warn(&self, msg: impl FnOnce() -> String) {
        let mut st = self.state.lock().expect("not poisoned");
        if st.0.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            st.1 += 1;
            return;
        }
        let left_out = std::mem::take(&mut st.1);
        st.0 = Some(Instant::now());
        drop(st);
        if left_out > 0 {
            tracing::warn!("{} ({left_out} more like it left out of the log)", msg());
        } else {
            tracing::warn!("{}", msg());
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters the server keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct ServedCounters {
    pub chunk_bytes: Mutex<BTreeMap<String, u64>>,
    pub lock_sets: Mutex<BTreeMap<String, u64>>,
    pub denied: AtomicU64,
}

/// A snapshot served lately: its manifest, and which chunks a peer may read from it.
struct Served {
    volume: VolumeName,
    manifest: Arc<Manifest>,
    /// Chunks known to be in it: those of the deltas sent for it. Enough to allow the requests
    /// of a peer that received a delta, without hashing every block.
    known: HashSet<ChunkId>,
    /// All its chunks, made when a request asks for one outside `known`.
    all: Option<Arc<HashSet<ChunkId>>>,
    /// Its manifest in format 1, once a peer of an older release asked for it.
    format1: Option<Bytes>,
    /// Deltas sent lately, by base: every peer at the same base gets the same bytes.
    deltas: VecDeque<(SnapshotId, Bytes)>,
    /// Its regions asked for lately.
    regions: Vec<Arc<RegionView>>,
    /// Region manifests sent lately, by region and base (none: whole): every peer asking the
    /// same gets the same bytes, made once.
    region_answers: VecDeque<RegionAnswer>,
}

/// A region's manifest as sent: (region, base, the bytes, whether they are a delta).
type RegionAnswer = (RegionName, Option<SnapshotId>, Bytes, bool);

/// One region of a served snapshot, as a downstream that mirrors the region receives it.
struct RegionView {
    name: RegionName,
    manifest: Arc<Manifest>,
    /// The region's last block when the region ends inside it.
    tail: Option<crate::region::CutTail>,
    /// Every chunk of the region: all a peer may read through it.
    all: HashSet<ChunkId>,
}

impl RegionView {
    /// The cut last block's own chunk, which no pack holds: made from the whole block.
    fn cut_chunk(&self) -> Option<(ChunkId, ChunkId, usize)> {
        self.tail.and_then(|t| t.id.map(|id| (id, t.full, t.keep)))
    }
}

/// Deltas kept per served snapshot.
const DELTAS_KEPT: usize = 4;

/// Snapshots whose manifests are kept decoded (the newest is the next update's base).
const SERVED_CACHE: usize = 8;

/// The server's shared state.
pub struct ServerState {
    node: Arc<Node>,
    /// The downstreams, replaced whole when the configuration is reloaded.
    peers: RwLock<Arc<PeerTable>>,
    admin_token: String,
    /// What `/metrics` requires, if anything.
    metrics_token: RwLock<Option<String>>,
    index: tokio::sync::Mutex<Arc<ChunkIndex>>,
    served: Mutex<VecDeque<Served>>,
    reporter: Arc<dyn Reporter>,
    pub counters: Arc<ServedCounters>,
    /// Told the volume whenever a downstream's lock set for it changed.
    lock_changes: Option<tokio::sync::mpsc::UnboundedSender<VolumeName>>,
    /// Refusals, logged at most once a second.
    refusals: LogLimiter,
    /// Bytes of chunk answers in memory (read, not yet sent), in KiB.
    send_budget: Arc<tokio::sync::Semaphore>,
    /// Manifest work under way (see [`HEAVY_WORK`]).
    heavy: Arc<tokio::sync::Semaphore>,
    /// The last `/metrics` text and when it was made: a scraper (or a flood) costs one
    /// catalog read a second at most.
    metrics_cache: Mutex<Option<(Instant, String)>>,
    /// The web page's sessions and caches.
    pub(crate) ui: crate::ui::UiState,
    /// Clients for this node's upstreams (or why one could not be made), for the cascade map.
    upstreams: RwLock<Arc<UpstreamClients>>,
    /// Whether the listener speaks TLS (the session cookie is then `Secure`).
    tls: bool,
}

/// Each upstream of the configuration, with a client for it or why there is none.
pub(crate) type UpstreamClients = Vec<(
    NodeId,
    std::result::Result<super::client::PeerClient, String>,
)>;

/// How long a `/metrics` text is served again before it is made anew.
const METRICS_CACHE: Duration = Duration::from_secs(1);

/// The address a request came from (set by [`serve`] on every request).
#[derive(Clone, Copy, Debug)]
pub struct Remote(pub std::net::SocketAddr);

/// The downstreams by name.
type PeerTable = HashMap<NodeId, Arc<Peer>>;

/// The peer's own permit (`own`), then one of the `shared` ones.
async fn heavy_permit(
    own: &Arc<tokio::sync::Semaphore>,
    shared: &Arc<tokio::sync::Semaphore>,
) -> Result<HeavyPermit> {
    let closed = |_| Error::internal("the work permits closed");
    let own = own.clone().acquire_owned().await.map_err(closed)?;
    let shared = shared.clone().acquire_owned().await.map_err(closed)?;
    Ok((own, shared))
}

/// A peer's manifest-work permit and a shared one (see [`ServerState::heavy_work`]).
type HeavyPermit = (
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
);

impl ServerState {
    pub fn new(
        node: Arc<Node>,
        cfg: &NodeConfig,
        admin_token: String,
        reporter: Arc<dyn Reporter>,
        counters: Arc<ServedCounters>,
        lock_changes: Option<tokio::sync::mpsc::UnboundedSender<VolumeName>>,
    ) -> Result<Self> {
        let (peers, settings) = Self::peers_of(cfg, &HashMap::new())?;
        Self::write_settings(&node, &settings)?;
        let upstreams = Self::upstream_clients_of(cfg, &node.info.node_id);
        Ok(ServerState {
            ui: crate::ui::UiState::default(),
            upstreams: RwLock::new(Arc::new(upstreams)),
            tls: cfg
                .listen
                .as_ref()
                .is_some_and(|l| !l.plaintext && l.tls_cert.is_some()),
            node,
            peers: RwLock::new(Arc::new(peers)),
            admin_token,
            metrics_token: RwLock::new(cfg.metrics_token()?),
            index: tokio::sync::Mutex::new(Arc::new(ChunkIndex::default())),
            served: Mutex::new(VecDeque::new()),
            reporter,
            counters,
            lock_changes,
            refusals: LogLimiter::new(),
            send_budget: Arc::new(tokio::sync::Semaphore::new(SEND_BUDGET_KIB as usize)),
            heavy: Arc::new(tokio::sync::Semaphore::new(HEAVY_WORK)),
            metrics_cache: Mutex::new(None),
        })
    }

    /// The downstreams of `cfg`, each keeping the request slots it had in `old` (requests in
    /// progress go on counting against it), and the settings of their holders (so `prune`
    /// honours release_stale), to be written with [`ServerState::write_settings`].
    fn peers_of(
        cfg: &NodeConfig,
        old: &PeerTable,
    ) -> Result<(PeerTable, Vec<(HolderId, HolderSettings)>)> {
        let mut peers = HashMap::new();
        let mut settings = Vec::new();
        for d in &cfg.downstream {
            let lease_ms = match &d.lease {
                Some(l) => Some(crate::config::parse_duration("lease", l)?.as_millis() as u64),
                None => None,
            };
            let granted: HashSet<&VolumeName> = d.volumes.iter().collect();
            let regions = d.region_grants()?;
            let granted = granted.union(&regions.keys().collect()).count() as f64;
            for v in d.volumes.iter().chain(d.region_grants()?.keys()) {
                settings.push((
                    HolderId::mirror(&d.name, v),
                    HolderSettings {
                        auto_release_stale: d.release_stale,
                    },
                ));
            }
            let slots = old.get(&d.name).map_or_else(
                || Arc::new(tokio::sync::Semaphore::new(PEER_CONCURRENCY)),
                |p| p.slots.clone(),
            );
            let heavy = old.get(&d.name).map_or_else(
                || Arc::new(tokio::sync::Semaphore::new(1)),
                |p| p.heavy.clone(),
            );
            peers.insert(
                d.name.clone(),
                Arc::new(Peer {
                    name: d.name.clone(),
                    token: cfg.downstream_token(d)?,
                    volumes: d.volumes.iter().cloned().collect(),
                    regions,
                    max_locks: d.max_locks,
                    max_snapshots: d.max_snapshots,
                    lease_ms,
                    slots,
                    heavy,
                    rate: Mutex::new(TokenBucket::new(PEER_RATE, PEER_BURST)),
                    lock_sets: Mutex::new(TokenBucket::new(
                        LOCK_SET_RATE,
                        LOCK_SET_BURST + 2.0 * granted,
                    )),
                }),
            );
        }
        Ok((peers, settings))
    }

    fn upstream_clients_of(cfg: &NodeConfig, me: &NodeId) -> UpstreamClients {
        cfg.upstream
            .iter()
            .map(|u| {
                let c = super::client::PeerClient::new(cfg, me, u).map_err(|e| e.to_string());
                (u.name.clone(), c)
            })
            .collect()
    }

    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    pub(crate) fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub(crate) fn reporter(&self) -> &dyn Reporter {
        self.reporter.as_ref()
    }

    pub(crate) fn tls(&self) -> bool {
        self.tls
    }

    pub(crate) fn upstream_clients(&self) -> Arc<UpstreamClients> {
        self.upstreams.read().expect("not poisoned").clone()
    }

    /// Whether `peer` may learn of `volume` (it is granted the volume or a region of it).
    pub(crate) fn peer_may_see(&self, peer: &Peer, volume: &VolumeName) -> bool {
        peer.volumes.contains(volume) || peer.regions.contains_key(volume)
    }

    fn write_settings(node: &Node, settings: &[(HolderId, HolderSettings)]) -> Result<()> {
        for (holder, s) in settings {
            node.catalog.locks().set_settings(holder, s)?;
        }
        Ok(())
    }

    /// Takes a reloaded configuration's downstreams (who may connect, with which token, to
    /// what) and metrics token; requests in progress finish under the old ones. Everything is
    /// checked before anything changes.
    pub fn reconfigure(&self, cfg: &NodeConfig) -> Result<()> {
        let old = self.peers.read().expect("not poisoned").clone();
        let (peers, settings) = Self::peers_of(cfg, &old)?;
        let metrics_token = cfg.metrics_token()?;
        Self::write_settings(&self.node, &settings)?;
        *self.peers.write().expect("not poisoned") = Arc::new(peers);
        *self.metrics_token.write().expect("not poisoned") = metrics_token;
        *self.upstreams.write().expect("not poisoned") =
            Arc::new(Self::upstream_clients_of(cfg, &self.node.info.node_id));
        Ok(())
    }

    pub(crate) fn bearer(headers: &HeaderMap) -> &str {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
    }

    /// The authenticated peer, or why not. An unknown peer and a wrong token get the same
    /// answer, so that names cannot be tried out; the log says which it was.
    fn peer(&self, headers: &HeaderMap) -> Result<Arc<Peer>> {
        let r = (|| {
            let name = headers
                .get(PEER_HEADER)
                .ok_or_else(|| format!("no {PEER_HEADER} header"))?;
            let name = name
                .to_str()
                .map_err(|_| format!("{PEER_HEADER} is not text"))?;
            let id: NodeId = name.parse().map_err(|e: Error| e.to_string())?;
            let peer = self
                .peers
                .read()
                .expect("not poisoned")
                .get(&id)
                .cloned()
                .ok_or_else(|| format!("unknown peer {id}: no [[downstream]] is named so"))?;
            if !super::same_secret(Self::bearer(headers), &peer.token) {
                return Err(format!("wrong token for peer {id}"));
            }
            Ok(peer)
        })();
        r.map_err(|why| {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            self.refusals
                .warn(|| format!("refused a peer request: {why}"));
            Error::denied(format!(
                "unknown peer or wrong token: name this node in {PEER_HEADER} and send the \
                 token the upstream's [[downstream]] entry has for it"
            ))
        })
    }

    /// Authenticates a peer request that holds none of the peer's request slots (the
    /// cascade view, which waits on other nodes), taking from its request rate like any.
    pub(crate) fn peer_light(&self, headers: &HeaderMap) -> Result<Arc<Peer>> {
        let peer = self.peer(headers)?;
        if !peer.rate.lock().expect("not poisoned").take() {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Unavailable {
                message: format!("too many requests from {}; slow down", peer.name),
                source: None,
            });
        }
        Ok(peer)
    }

    /// The peer a request was authenticated as.
    fn authed(&self, who: &Authed) -> Result<Arc<Peer>> {
        self.peers
            .read()
            .expect("not poisoned")
            .get(&who.0)
            .cloned()
            .ok_or_else(|| {
                Error::denied(format!(
                    "peer {} is no longer a [[downstream]] of this node (its configuration \
                     was reloaded)",
                    who.0
                ))
            })
    }

    /// The volume, if the peer may list it and pin its snapshots (it is granted the volume or
    /// some of its regions).
    fn granted(&self, peer: &Peer, volume: &str) -> Result<VolumeName> {
        let volume: VolumeName = volume.parse()?;
        if !peer.volumes.contains(&volume) && !peer.regions.contains_key(&volume) {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            // A peer asking again and again must not fill the log.
            self.refusals.warn(|| {
                format!(
                    "refused a peer request: peer {} is not granted volume {volume}",
                    peer.name
                )
            });
            return Err(Error::denied(format!(
                "peer {} is not granted volume {volume}",
                peer.name
            )));
        }
        Ok(volume)
    }

    /// The volume, if the peer may read its data: all of it, or `region` of it.
    fn granted_data(
        &self,
        peer: &Peer,
        volume: &str,
        region: Option<&RegionName>,
    ) -> Result<VolumeName> {
        let volume = self.granted(peer, volume)?;
        if peer.volumes.contains(&volume) {
            return Ok(volume);
        }
        let allowed = peer.regions.get(&volume);
        match region {
            Some(r) if allowed.is_some_and(|a| a.contains(r)) => Ok(volume),
            _ => {
                self.counters.denied.fetch_add(1, Ordering::Relaxed);
                self.refusals.warn(|| {
                    format!(
                        "refused a peer request: peer {} is not granted region {} of volume \
                         {volume}",
                        peer.name,
                        region.map_or("(none named)", |r| r.as_str())
                    )
                });
                let mut names: Vec<&str> =
                    allowed.into_iter().flatten().map(|r| r.as_str()).collect();
                names.sort();
                Err(Error::denied(format!(
                    "peer {} is granted only region(s) {} of volume {volume}{}",
                    peer.name,
                    names.join(", "),
                    region.map_or_else(String::new, |r| format!(", not {r}"))
                )))
            }
        }
    }

    /// Region `region` of a served snapshot (kept with the snapshot for the next requests).
    async fn region_of(
        &self,
        peer: &Peer,
        rec: &SnapshotRecord,
        region: &RegionName,
    ) -> Result<Arc<RegionView>> {
        let find = |e: &mut Served| e.regions.iter().find(|r| &r.name == region).cloned();
        if let Some(Some(v)) = self.with_served(&rec.volume, rec.id, find) {
            return Ok(v);
        }
        // (Not `extent_of`, whose message names every region: a peer learns only of its own.)
        let extent = rec.regions.get(region).copied().ok_or_else(|| {
            Error::not_found(format!("snapshot {} has no region {region}", rec.id))
        })?;
        let m = self.manifest_of(peer, rec).await?;
        if extent.end() > m.size {
            return Err(Error::corrupt(format!(
                "region {region} of {} lies past the snapshot's end",
                rec.display_ref()
            )));
        }
        let tail = {
            let _lock = self.node.lock_repo_shared().await?;
            crate::region::cut_tail_of(&self.node, &m, extent).await?
        };
        let heavy = self.heavy_work(peer).await?;
        let name = region.clone();
        let view = tokio::task::spawn_blocking(move || {
            let _heavy = heavy;
            let v = crate::region::slice(&m, extent, tail.map(|t| t.id));
            let all = v.blocks.ids().iter().copied().collect();
            Arc::new(RegionView {
                name,
                manifest: Arc::new(v),
                tail,
                all,
            })
        })
        .await
        .map_err(|e| Error::internal(format!("region worker failed: {e}")))?;
        self.with_served(&rec.volume, rec.id, |e| {
            if !e.regions.iter().any(|r| &r.name == region) {
                e.regions.push(view.clone());
            }
        });
        Ok(view)
    }

    fn record(&self, volume: &VolumeName, id: &str) -> Result<SnapshotRecord> {
        let id: SnapshotId = id.parse()?;
        self.node
            .catalog
            .snapshots(volume)?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| {
                Error::not_found(format!("volume {volume} has no snapshot {id} on this node"))
            })
    }

    /// The decoded manifest of a snapshot (kept for the last few served).
    async fn manifest_of(&self, peer: &Peer, rec: &SnapshotRecord) -> Result<Arc<Manifest>> {
        if let Some(m) = self.with_served(&rec.volume, rec.id, |e| e.manifest.clone()) {
            return Ok(m);
        }
        let _heavy = self.heavy_work(peer).await?;
        // Another request may have loaded it while this one waited.
        if let Some(m) = self.with_served(&rec.volume, rec.id, |e| e.manifest.clone()) {
            return Ok(m);
        }
        let m = Arc::new(crate::snapshot::load_manifest(&self.node.repo, rec).await?);
        let mut cache = self.served.lock().expect("not poisoned");
        if !cache
            .iter()
            .any(|e| e.volume == rec.volume && e.manifest.id == rec.id)
        {
            cache.push_back(Served {
                volume: rec.volume.clone(),
                manifest: m.clone(),
                known: HashSet::new(),
                all: None,
                format1: None,
                deltas: VecDeque::new(),
                regions: Vec::new(),
                region_answers: VecDeque::new(),
            });
            while cache.len() > SERVED_CACHE {
                cache.pop_front();
            }
        }
        Ok(m)
    }

    fn with_served<T>(
        &self,
        volume: &VolumeName,
        id: SnapshotId,
        f: impl FnOnce(&mut Served) -> T,
    ) -> Option<T> {
        let mut cache = self.served.lock().expect("not poisoned");
        cache
            .iter_mut()
            .find(|e| e.volume == *volume && e.manifest.id == id)
            .map(f)
    }

    /// The first of `chunks` that snapshot `rec` does not reference (a peer may read only
    /// those), if any.
    async fn not_in_snapshot(
        &self,
        peer: &Peer,
        rec: &SnapshotRecord,
        chunks: &[ChunkId],
    ) -> Result<Option<ChunkId>> {
        let quick = self.with_served(&rec.volume, rec.id, |e| {
            if chunks.iter().all(|c| e.known.contains(c)) {
                return Some(None);
            }
            e.all
                .as_ref()
                .map(|all| chunks.iter().find(|c| !all.contains(c)).copied())
        });
        if let Some(Some(answer)) = quick {
            return Ok(answer);
        }
        let m = self.manifest_of(peer, rec).await?;
        let heavy = self.heavy_work(peer).await?;
        if let Some(Some(all)) = self.with_served(&rec.volume, rec.id, |e| e.all.clone()) {
            return Ok(chunks.iter().find(|c| !all.contains(c)).copied());
        }
        // The permit goes into the worker: a cancelled request does not free it early.
        let all: Arc<HashSet<ChunkId>> = tokio::task::spawn_blocking(move || {
            let _heavy = heavy;
            Arc::new(m.blocks.ids().iter().copied().collect())
        })
        .await
        .map_err(|e| Error::internal(format!("chunk set worker failed: {e}")))?;
        self.with_served(&rec.volume, rec.id, |e| e.all = Some(all.clone()));
        Ok(chunks.iter().find(|c| !all.contains(c)).copied())
    }

    /// A permit for manifest work for `peer`: its own (one at a time), then one of the
    /// [`HEAVY_WORK`] all peers share. No caller holds one while it waits for another, so a
    /// peer's requests queue behind each other and never behind themselves.
    async fn heavy_work(&self, peer: &Peer) -> Result<HeavyPermit> {
        heavy_permit(&peer.heavy, &self.heavy).await
    }

    /// Brings the chunk index up to the repository (packs gone since are dropped, new ones
    /// read).
    async fn reload_index(&self) -> Result<Arc<ChunkIndex>> {
        let mut index = self.index.lock().await;
        let problems = Arc::make_mut(&mut index).refresh(&self.node.repo).await?;
        for p in problems {
            tracing::warn!("{p}");
        }
        Ok(index.clone())
    }

    /// The chunk index, brought up to date when it lacks one of `ids` (new packs since).
    async fn index_for(&self, ids: &[ChunkId]) -> Result<Arc<ChunkIndex>> {
        let mut index = self.index.lock().await;
        if ids.iter().any(|id| !index.contains(id)) {
            // Index objects never change: read only those of packs that are new since (on
            // the first request, those the node's index cache lacks).
            let problems = if index.packs.is_empty() {
                let (fresh, problems) = self.node.load_index().await?;
                *index = Arc::new(fresh);
                problems
            } else {
                Arc::make_mut(&mut index).refresh(&self.node.repo).await?
            };
            for p in problems {
                tracing::warn!("{p}");
            }
        }
        Ok(index.clone())
    }
}

/// The peer a request was authenticated as (put there by [`authenticate`]), and its request
/// slot, which the request's work and answer hold until they are done.
#[derive(Clone, Debug)]
struct Authed(NodeId, Arc<tokio::sync::OwnedSemaphorePermit>);

/// Authenticates a peer request from its headers alone, before any of its body is read (an
/// unauthenticated body is never buffered), then holds one of the peer's request slots while
/// the request runs and enforces the peer's request rate.
async fn authenticate(State(s): Shared, mut req: Request, next: Next) -> Response {
    let peer = match s.peer(req.headers()) {
        Ok(p) => p,
        Err(e) => return ApiError(e).into_response(),
    };
    if !peer.rate.lock().expect("not poisoned").take() {
        s.counters.denied.fetch_add(1, Ordering::Relaxed);
        let name = peer.name.clone();
        s.refusals
            .warn(|| format!("peer {name} is over its request rate ({PEER_RATE}/s)"));
        let (_, body) = WireError::from_error(&Error::Unavailable {
            message: format!("too many requests from {name}; slow down"),
            source: None,
        });
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            Json(body),
        )
            .into_response();
    }
    let Ok(slot) = peer.slots.clone().acquire_owned().await else {
        return ApiError(Error::internal("peer slots closed")).into_response();
    };
    req.extensions_mut()
        .insert(Authed(peer.name.clone(), Arc::new(slot)));
    next.run(req).await
}

/// An error as an HTTP response.
pub(crate) struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = WireError::from_error(&self.0);
        (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(body),
        )
            .into_response()
    }
}

pub(crate) type Api<T> = std::result::Result<T, ApiError>;
type Shared = State<Arc<ServerState>>;

async fn list_snapshots(
    State(s): Shared,
    Extension(who): Extension<Authed>,
    Path(volume): Path<String>,
) -> Api<Json<SnapshotList>> {
    let peer = s.authed(&who)?;
    let volume = s.granted(&peer, &volume)?;
    let mut snapshots = match s.node.catalog.snapshots(&volume) {
        Ok(v) => v,
        Err(Error::NotFound(_)) => vec![],
        Err(e) => return Err(e.into()),
    };
    // A peer granted only some regions learns of no others, nor of what the whole volume
    // holds: it sees the snapshots that have its regions, sized to the end of the last one.
    if !peer.volumes.contains(&volume)
        && let Some(allowed) = peer.regions.get(&volume)
    {
        snapshots.retain_mut(|snap| {
            snap.regions.retain(|r, _| allowed.contains(r));
            snap.size = snap.regions.values().map(|e| e.end()).max().unwrap_or(0);
            snap.stats = Default::default();
            !snap.regions.is_empty()
        });
    }
    let region = match s.node.catalog.volume(&volume) {
        Ok(v) => v.region,
        Err(Error::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(Json(SnapshotList {
        node: s.node.info.node_id.clone(),
        volume,
        snapshots,
        region,
    }))
}

/// `?format=2&base=ID`: the manifest formats the peer reads, and the snapshot it already has,
/// to send the manifest as a delta against. Unknown parameters are ignored, so that a later
/// release may add some.
#[derive(Debug, serde::Deserialize)]
struct ManifestQuery {
    /// Absent from releases before format 2: they get format 1 (zstd JSON).
    format: Option<u32>,
    base: Option<String>,
    /// The region of the snapshot to send (format 2 only): its blocks alone.
    region: Option<String>,
}

/// `?region=NAME` of a chunk request: chunks read through a region of the snapshot.
#[derive(Debug, serde::Deserialize)]
struct ChunksQuery {
    region: Option<String>,
}

/// A region named in a query, checked.
fn region_param(q: Option<&str>) -> Result<Option<RegionName>> {
    q.map(str::parse).transpose()
}

async fn manifest(
    State(s): Shared,
    Extension(who): Extension<Authed>,
    Path((volume, id)): Path<(String, String)>,
    Query(q): Query<ManifestQuery>,
) -> Api<Response> {
    let peer = s.authed(&who)?;
    let region = region_param(q.region.as_deref())?;
    let volume = s.granted_data(&peer, &volume, region.as_ref())?;
    let rec = s.record(&volume, &id)?;
    if let Some(region) = region {
        return region_manifest(&s, &peer, &rec, q, &region).await;
    }
    // A base this node no longer has (pruned since the peer listed it) means the whole
    // manifest, as for a baseline.
    let base = match q.base.as_deref().map(|b| s.record(&volume, b)) {
        Some(Ok(b)) if b.block_size == rec.block_size => Some(b),
        Some(Err(Error::NotFound(_))) | Some(Ok(_)) | None => None,
        Some(Err(e)) => return Err(e.into()),
    };
    match q.format {
        None | Some(1) | Some(crate::snapshot::MANIFEST_FORMAT) => {}
        Some(f) => {
            return Err(Error::invalid(format!(
                "manifest format {f} is unknown here; this node sends formats 1 and {}",
                crate::snapshot::MANIFEST_FORMAT
            ))
            .into());
        }
    }
    if q.format.unwrap_or(1) == 1 {
        // A downstream from before format 2: the manifest as it reads them, encoded once.
        if let Some(Some(json)) = s.with_served(&volume, rec.id, |e| e.format1.clone()) {
            return Ok(([(MANIFEST_KIND_HEADER, "full")], json).into_response());
        }
        let m = s.manifest_of(&peer, &rec).await?;
        let heavy = s.heavy_work(&peer).await?;
        if let Some(Some(json)) = s.with_served(&volume, rec.id, |e| e.format1.clone()) {
            return Ok(([(MANIFEST_KIND_HEADER, "full")], json).into_response());
        }
        let slot = who.1.clone();
        let json: Bytes = tokio::task::spawn_blocking(move || {
            let _held = (heavy, slot);
            m.encode_format_1()
        })
        .await
        .map_err(|e| Error::internal(format!("manifest encoder failed: {e}")))??
        .into();
        s.with_served(&volume, rec.id, |e| e.format1 = Some(json.clone()));
        return Ok(([(MANIFEST_KIND_HEADER, "full")], json).into_response());
    }
    let Some(base) = base else {
        let raw = s.node.repo.read_manifest(&volume, &rec.id).await?;
        return Ok(([(MANIFEST_KIND_HEADER, "full")], raw).into_response());
    };
    // Every peer at the same base gets the same delta: made once.
    let cached = s.with_served(&volume, rec.id, |e| {
        e.deltas
            .iter()
            .find(|(b, _)| *b == base.id)
            .map(|(_, d)| d.clone())
    });
    if let Some(Some(d)) = cached {
        return Ok(([(MANIFEST_KIND_HEADER, "delta")], d).into_response());
    }
    let (m, b) = tokio::try_join!(s.manifest_of(&peer, &rec), s.manifest_of(&peer, &base))?;
    let heavy = s.heavy_work(&peer).await?;
    let cached = s.with_served(&volume, rec.id, |e| {
        e.deltas
            .iter()
            .find(|(b, _)| *b == base.id)
            .map(|(_, d)| d.clone())
    });
    if let Some(Some(d)) = cached {
        return Ok(([(MANIFEST_KIND_HEADER, "delta")], d).into_response());
    }
    let slot = who.1.clone();
    let delta = tokio::task::spawn_blocking(move || {
        let _held = (heavy, slot);
        m.delta_from(&b)
    })
    .await
    .map_err(|e| Error::internal(format!("manifest delta worker failed: {e}")))?;
    let encoded: Bytes = delta.encode()?.into();
    // The peer asks for chunks of the changed blocks next: allow those without hashing every
    // block of the snapshot.
    s.with_served(&volume, rec.id, |e| {
        e.known.extend(delta.changes.iter().filter_map(|(_, c)| *c));
        e.deltas.push_back((base.id, encoded.clone()));
        while e.deltas.len() > DELTAS_KEPT {
            e.deltas.pop_front();
        }
    });
    Ok(([(MANIFEST_KIND_HEADER, "delta")], encoded).into_response())
}

/// The manifest of one region of a snapshot, whole or as a delta against the same region of
/// the base (when the base has it), made once for every peer that asks the same.
async fn region_manifest(
    s: &ServerState,
    peer: &Peer,
    rec: &SnapshotRecord,
    q: ManifestQuery,
    region: &RegionName,
) -> Api<Response> {
    if q.format != Some(crate::snapshot::MANIFEST_FORMAT) {
        return Err(Error::invalid(format!(
            "a region's manifest is sent in format {} only",
            crate::snapshot::MANIFEST_FORMAT
        ))
        .into());
    }
    let view = s.region_of(peer, rec, region).await?;
    let base = match q.base.as_deref().map(|b| s.record(&rec.volume, b)) {
        Some(Ok(b)) if b.block_size == rec.block_size && b.regions.contains_key(region) => {
            Some((b.id, s.region_of(peer, &b, region).await?))
        }
        Some(Err(Error::NotFound(_))) | Some(Ok(_)) | None => None,
        Some(Err(e)) => return Err(e.into()),
    };
    let base_id = base.as_ref().map(|(id, _)| *id);
    let answer = |bytes: Bytes, delta: bool| {
        let kind = if delta { "delta" } else { "full" };
        ([(MANIFEST_KIND_HEADER, kind)], bytes).into_response()
    };
    let cached = || {
        s.with_served(&rec.volume, rec.id, |e| {
            e.region_answers
                .iter()
                .find(|(r, b, _, _)| r == region && *b == base_id)
                .map(|(_, _, bytes, delta)| (bytes.clone(), *delta))
        })
        .flatten()
    };
    if let Some((bytes, delta)) = cached() {
        return Ok(answer(bytes, delta));
    }
    let heavy = s.heavy_work(peer).await?;
    // Another request may have made it while this one waited.
    if let Some((bytes, delta)) = cached() {
        return Ok(answer(bytes, delta));
    }
    let (encoded, delta) = tokio::task::spawn_blocking(move || {
        let _heavy = heavy;
        match base {
            Some((_, b)) => view
                .manifest
                .delta_from(&b.manifest)
                .encode()
                .map(|d| (d, true)),
            None => view.manifest.encode().map(|m| (m, false)),
        }
    })
    .await
    .map_err(|e| Error::internal(format!("manifest worker failed: {e}")))??;
    let encoded = Bytes::from(encoded);
    s.with_served(&rec.volume, rec.id, |e| {
        e.region_answers
            .push_back((region.clone(), base_id, encoded.clone(), delta));
        while e.region_answers.len() > DELTAS_KEPT {
            e.region_answers.pop_front();
        }
    });
    Ok(answer(encoded, delta))
}

/// A chunk request's body: at most [`MAX_CHUNKS_PER_REQUEST`] chunks, none twice.
pub fn parse_chunk_request(body: &[u8]) -> Result<ChunkRequest> {
    let req: ChunkRequest = serde_json::from_slice(body).map_err(|e| {
        Error::invalid(format!(
            "malformed chunk request: {}",
            shorten(&e.to_string())
        ))
    })?;
    if req.chunks.len() > MAX_CHUNKS_PER_REQUEST {
        return Err(Error::invalid(format!(
            "at most {MAX_CHUNKS_PER_REQUEST} chunks per request, not {}",
            req.chunks.len()
        )));
    }
    if req.chunks.iter().collect::<HashSet<_>>().len() != req.chunks.len() {
        return Err(Error::invalid("a chunk request names a chunk twice"));
    }
    Ok(req)
}

/// A lock set's body from a downstream, as JSON. The handler then checks who may send it and
/// what the peer may hold; the registry checks the set itself
/// ([`crate::softlock::registry::check_update`]).
pub fn lock_set_body(body: &[u8]) -> Result<LockSetUpdate> {
    serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("malformed lock set: {}", shorten(&e.to_string()))))
}

/// The query string of a manifest or a chunk request, parsed as the routes parse it, with the
/// names in it checked (for the fuzzers).
pub fn parse_queries(query: &str) -> Result<()> {
    let uri: axum::http::Uri = format!("/v1/x?{query}")
        .parse()
        .map_err(|_| Error::invalid("not a query string"))?;
    if let Ok(Query(q)) = Query::<ManifestQuery>::try_from_uri(&uri) {
        region_param(q.region.as_deref())?;
        if let Some(b) = q.base {
            b.parse::<SnapshotId>()?;
        }
    }
    if let Ok(Query(q)) = Query::<ChunksQuery>::try_from_uri(&uri) {
        region_param(q.region.as_deref())?;
    }
    Ok(())
}

async fn chunks(
    State(s): Shared,
    Extension(who): Extension<Authed>,
    Path((volume, id)): Path<(String, String)>,
    Query(q): Query<ChunksQuery>,
    body: Bytes,
) -> Api<Response> {
    let started = std::time::Instant::now();
    let peer = s.authed(&who)?;
    let region = region_param(q.region.as_deref())?;
    let volume = s.granted_data(&peer, &volume, region.as_ref())?;
    let rec = s.record(&volume, &id)?;
    let id = rec.id;
    let req = parse_chunk_request(&body)?;
    // Through a region, only its chunks; the cut last block's chunk is made here.
    let mut cut = None;
    if let Some(region) = &region {
        let view = s.region_of(&peer, &rec, region).await?;
        if let Some(bad) = req.chunks.iter().find(|c| !view.all.contains(c)) {
            return Err(Error::denied(format!(
                "chunk {bad} is not part of region {region} of snapshot {volume}@{id}"
            ))
            .into());
        }
        cut = view.cut_chunk().filter(|(c, _, _)| req.chunks.contains(c));
    } else if let Some(bad) = s.not_in_snapshot(&peer, &rec, &req.chunks).await? {
        return Err(
            Error::denied(format!("chunk {bad} is not part of snapshot {volume}@{id}")).into(),
        );
    }
    let cut_frame = match cut {
        Some((cut_id, full, keep)) => {
            let plain = {
                let _lock = s.node.lock_repo_shared().await?;
                crate::region::read_plain(&s.node, full).await?
            };
            let plain_len = plain.len();
            let (encoding, stored) = tokio::task::spawn_blocking(move || {
                crate::chunk::encode(&plain[..keep.min(plain.len())])
            })
            .await
            .map_err(|e| Error::internal(format!("chunk encoder failed: {e}")))??;
            Some((cut_id, encoding, stored, keep.min(plain_len)))
        }
        None => None,
    };
    // The others are read from packs (the cut chunk may be in one too, by its content).
    let mut req = req;
    if let Some((cut_id, ..)) = &cut_frame {
        req.chunks.retain(|c| c != cut_id);
    }
    // gc must not remove a pack while it is read.
    let _lock = s.node.lock_repo_shared().await?;
    let index = s.index_for(&req.chunks).await?;
    // What the answer will weigh, from the index: bounded per answer, and all answers being
    // read or sent share one budget, so no number of peers and requests can exhaust memory.
    let weight: u64 = req
        .chunks
        .iter()
        .map(|c| index.get(c).map_or(0, |l| l.length as u64) + super::FRAME_HEADER as u64)
        .sum();
    if weight > MAX_ANSWER_BYTES {
        return Err(Error::invalid(format!(
            "these {} chunks are {weight} bytes; ask for at most {MAX_ANSWER_BYTES} bytes at once",
            req.chunks.len()
        ))
        .into());
    }
    let budget = s
        .send_budget
        .clone()
        .acquire_many_owned(weight.div_ceil(1024).max(1) as u32)
        .await
        .map_err(|_| Error::internal("the send budget closed"))?;
    let indexed = started.elapsed();
    let chunks = match s.node.repo.read_chunks(&index, &req.chunks).await {
        // A gc here repacked or removed a pack since the index was loaded: reload, retry once.
        Err(Error::NotFound(_)) => {
            let index = s.reload_index().await?;
            s.node.repo.read_chunks(&index, &req.chunks).await?
        }
        other => other?,
    };
    tracing::debug!(
        chunks = req.chunks.len(),
        checked_and_indexed_ms = indexed.as_millis(),
        read_ms = started.elapsed().as_millis(),
        "serving chunks"
    );
    let total: usize = chunks
        .iter()
        .map(|(_, b)| b.len() + super::FRAME_HEADER)
        .sum();
    let mut out = Vec::with_capacity(total);
    for (id, (loc, data)) in req.chunks.iter().zip(&chunks) {
        write_frame(&mut out, id, loc.encoding, loc.raw_length, data);
    }
    if let Some((cut_id, encoding, stored, keep)) = &cut_frame {
        write_frame(&mut out, cut_id, *encoding, *keep as u32, stored);
    }
    *s.counters
        .chunk_bytes
        .lock()
        .expect("not poisoned")
        .entry(peer.name.to_string())
        .or_default() += out.len() as u64;
    // The answer goes out in pieces; the peer's slot and the budget are held until the last
    // piece is taken, not just until this function returns.
    let out = Bytes::from(out);
    let held = (who.1.clone(), budget);
    let pieces = (0..out.len().max(1)).step_by(1 << 20).map(move |at| {
        Ok::<_, std::convert::Infallible>(out.slice(at..(at + (1 << 20)).min(out.len())))
    });
    let body = axum::body::Body::from_stream(futures::StreamExt::map(
        futures::stream::iter(pieces),
        move |p| {
            let _ = &held;
            p
        },
    ));
    Ok(Response::new(body))
}

async fn put_locks(
    State(s): Shared,
    Extension(who): Extension<Authed>,
    Path(volume): Path<String>,
    body: Bytes,
) -> Api<Response> {
    let peer = s.authed(&who)?;
    let volume = s.granted(&peer, &volume)?;
    if !peer.lock_sets.lock().expect("not poisoned").take() {
        s.counters.denied.fetch_add(1, Ordering::Relaxed);
        return Err(Error::Unavailable {
            message: format!(
                "peer {} sends lock sets faster than {LOCK_SET_RATE} a second; slow down",
                peer.name
            ),
            source: None,
        }
        .into());
    }
    let mut update = lock_set_body(&body)?;
    let own = HolderId::mirror(&peer.name, &volume);
    if update.volume != volume || update.holder != own {
        s.counters.denied.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %peer.name, holder = %update.holder, "refused a lock set in another holder's name");
        return Err(Error::denied(format!(
            "peer {} may send only its own lock set ({own}), not {} for {}",
            peer.name, update.holder, update.volume
        ))
        .into());
    }
    // A peer granted only regions of the volume pins only snapshots that have one of them.
    if !peer.volumes.contains(&volume)
        && let Some(allowed) = peer.regions.get(&volume)
    {
        // (A snapshot that is gone is the registry's to answer: not found.)
        let without: HashSet<SnapshotId> = s
            .node
            .catalog
            .snapshots(&volume)?
            .into_iter()
            .filter(|r| !r.regions.keys().any(|k| allowed.contains(k)))
            .map(|r| r.id)
            .collect();
        if let Some(l) = update.locks.iter().find(|l| without.contains(&l.snapshot)) {
            s.counters.denied.fetch_add(1, Ordering::Relaxed);
            return Err(Error::denied(format!(
                "peer {} is granted only regions of {volume}, and snapshot {} has none of them",
                peer.name, l.snapshot
            ))
            .into());
        }
    }
    // A lock's path names the nodes it came through, the sender last (a path left empty is
    // the sender's own lock); it must leave room for this node to pass it on (a path at the
    // limit here would be refused one hop up).
    for l in &mut update.locks {
        if l.path.is_empty() {
            l.path.push(peer.name.clone());
        }
    }
    if let Some(l) = update.locks.iter().find(|l| {
        l.path.len() >= crate::softlock::MAX_LOCK_PATH || l.path.last() != Some(&peer.name)
    }) {
        s.counters.denied.fetch_add(1, Ordering::Relaxed);
        return Err(Error::denied(format!(
            "peer {} sent a lock whose path {:?} does not end with the sender or is {} nodes \
             deep; a cascade is less than {} deep",
            peer.name,
            l.path.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
            l.path.len(),
            crate::softlock::MAX_LOCK_PATH
        ))
        .into());
    }
    let pinned: HashSet<SnapshotId> = update.locks.iter().map(|l| l.snapshot).collect();
    if update.locks.len() > peer.max_locks || pinned.len() > peer.max_snapshots {
        s.counters.denied.fetch_add(1, Ordering::Relaxed);
        return Err(Error::denied(format!(
            "peer {} may hold at most {} locks on at most {} snapshots of {volume}; its lock set \
             has {} locks on {} snapshots (raise max_locks / max_snapshots in this node's \
             [[downstream]] if that is intended)",
            peer.name,
            peer.max_locks,
            peer.max_snapshots,
            update.locks.len(),
            pinned.len()
        ))
        .into());
    }
    for l in &mut update.locks {
        l.lease_ms = peer.lease_ms;
    }
    let generation = update.generation;
    let n = update.locks.len();
    let outcome = s.node.catalog.locks().replace_set(update)?;
    tracing::info!(holder = %own, generation, locks = n, ?outcome, "lock set received");
    if let (crate::softlock::ReplaceOutcome::Replaced { .. }, Some(tx)) =
        (&outcome, &s.lock_changes)
    {
        let _ = tx.send(volume.clone());
    }
    *s.counters
        .lock_sets
        .lock()
        .expect("not poisoned")
        .entry(peer.name.to_string())
        .or_default() += 1;
    Ok(Json(outcome).into_response())
}

async fn status(State(s): Shared, headers: HeaderMap) -> Api<Json<serde_json::Value>> {
    if !super::same_secret(ServerState::bearer(&headers), &s.admin_token) {
        s.counters.denied.fetch_add(1, Ordering::Relaxed);
        return Err(Error::denied(
            "status needs the daemon's admin token (in its state directory)",
        )
        .into());
    }
    Ok(Json(s.reporter.status()?))
}

/// `/metrics`: with a metrics token, to whoever presents it; without one, only to this host
/// (a loopback address), since the series name the node's volumes, peers and upstreams, which
/// strangers must not learn. The text is made at most once a second.
async fn metrics(
    State(s): Shared,
    remote: Option<Extension<Remote>>,
    headers: HeaderMap,
) -> Response {
    let token = s.metrics_token.read().expect("not poisoned").clone();
    let refuse = |why: &'static str| {
        s.counters.denied.fetch_add(1, Ordering::Relaxed);
        ApiError(Error::denied(why)).into_response()
    };
    match &token {
        Some(t) if !super::same_secret(ServerState::bearer(&headers), t) => {
            return refuse(
                "/metrics needs the token set in this node's [listen] metrics_token(_file)",
            );
        }
        None if !remote.is_some_and(|Extension(Remote(a))| a.ip().to_canonical().is_loopback()) => {
            return refuse(
                "/metrics is served only to this host unless [listen] metrics_token(_file) is \
                 set (then to whoever presents that token)",
            );
        }
        _ => {}
    }
    let text = {
        let mut cache = s.metrics_cache.lock().expect("not poisoned");
        match &*cache {
            Some((at, text)) if at.elapsed() < METRICS_CACHE => text.clone(),
            _ => {
                let text = s.reporter.metrics();
                *cache = Some((Instant::now(), text.clone()));
                text
            }
        }
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The routes. Peer routes authenticate from the headers before a body is read, and each
/// route takes a body of the size its requests need, no more.
pub fn router(state: Arc<ServerState>) -> Router {
    let peer_routes = Router::new()
        .route("/v1/volumes/{volume}/snapshots", get(list_snapshots))
        .route(
            "/v1/volumes/{volume}/snapshots/{id}/manifest",
            get(manifest),
        )
        .route(
            "/v1/volumes/{volume}/snapshots/{id}/chunks",
            post(chunks).layer(DefaultBodyLimit::max(CHUNK_REQUEST_LIMIT)),
        )
        .route(
            "/v1/volumes/{volume}/locks",
            put(put_locks).layer(DefaultBodyLimit::max(LOCK_SET_LIMIT)),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ));
    Router::new()
        .merge(peer_routes)
        .route("/v1/status", get(status))
        .route("/v1/cascade", get(crate::ui::api::cascade_for_peer))
        .route("/metrics", get(metrics))
        .merge(crate::ui::router(state.clone()))
        .layer(DefaultBodyLimit::max(OTHER_BODY_LIMIT))
        .with_state(state)
}

/// Connections being served, in all and per address.
#[derive(Debug, Default)]
struct Connections {
    per_address: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicU64,
    /// Addresses a peer authenticated from, and when last.
    known: Mutex<HashMap<IpAddr, Instant>>,
}

/// A connection's place in [`Connections`], given back when dropped.
struct ConnectionSlot {
    all: Arc<Connections>,
    ip: IpAddr,
}

impl Connections {
    /// Remembers that a peer authenticated from `ip` (as [`ConnectionSlot`] names it).
    fn remember(&self, ip: IpAddr) {
        let mut known = self.known.lock().expect("not poisoned");
        if known.len() >= KNOWN_ADDRESSES && !known.contains_key(&ip) {
            known.retain(|_, at| at.elapsed() < KNOWN_FOR);
            if known.len() >= KNOWN_ADDRESSES
                && let Some(oldest) = known.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k)
            {
                known.remove(&oldest);
            }
        }
        known.insert(ip, Instant::now());
    }

    fn is_known(&self, ip: &IpAddr) -> bool {
        let known = self.known.lock().expect("not poisoned");
        known.get(ip).is_some_and(|at| at.elapsed() < KNOWN_FOR)
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> std::result::Result<ConnectionSlot, String> {
        // An IPv6 host usually holds a whole /64: count it as one address.
        let ip = match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(std::net::Ipv6Addr::from(seg))
            }
            IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().expect("mapped")),
            v4 => v4,
        };
        let mut per = self.per_address.lock().expect("not poisoned");
        let here = per.get(&ip).copied().unwrap_or(0);
        let total = self.total.load(Ordering::Relaxed) as usize;
        if total >= MAX_CONNECTIONS {
            return Err(format!("{MAX_CONNECTIONS} connections are open"));
        }
        if total >= MAX_CONNECTIONS - RESERVED_FOR_KNOWN && !self.is_known(&ip) {
            return Err(format!(
                "{total} connections are open, and the last {RESERVED_FOR_KNOWN} are kept for \
                 addresses peers authenticated from"
            ));
        }
        if here >= MAX_CONNECTIONS_PER_ADDRESS {
            return Err(format!(
                "{ip} has {MAX_CONNECTIONS_PER_ADDRESS} connections open"
            ));
        }
        per.insert(ip, here + 1);
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionSlot {
            all: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per = self.all.per_address.lock().expect("not poisoned");
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
        self.all.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections until the task is dropped: TLS when configured, else HTTP/2 (or 1.1)
/// in plaintext (allowed only on loopback, checked when the config was loaded).
///
/// Every connection is bounded: at most [`MAX_CONNECTIONS`] at once and
/// [`MAX_CONNECTIONS_PER_ADDRESS`] from one address (more are closed at once), a TLS handshake
/// and a first request within [`HANDSHAKE_TIMEOUT`], request headers within that too, and no
/// more than [`IDLE_TIMEOUT`] without a request. Refusals and failed accepts (a full file
/// table) are logged at most once a second.
pub async fn serve(listener: TcpListener, tls: Option<rustls::ServerConfig>, app: Router) {
    let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    let connections = Arc::new(Connections::default());
    static ACCEPT_FAILURES: LogLimiter = LogLimiter::new();
    static REFUSED: LogLimiter = LogLimiter::new();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                ACCEPT_FAILURES.warn(|| format!("accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match connections.admit(remote.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                REFUSED.warn(|| format!("closed a connection from {remote} at once: {why}"));
                continue; // dropping the stream closes it
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match acceptor {
                Some(a) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(tls, app, remote, &_slot).await,
                    Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                },
                None => serve_connection(stream, app, remote, &_slot).await,
            }
        });
    }
}

/// What a connection is doing: requests in progress (until their answers are taken), when the
/// last answered request ended, and whether any request was answered with success (a stranger
/// whose requests are all refused does not keep a connection).
#[derive(Debug)]
struct Activity {
    in_flight: Mutex<HashMap<u64, Instant>>,
    next: AtomicU64,
    last: Mutex<Instant>,
    trusted: std::sync::atomic::AtomicBool,
}

/// One request in progress on a connection: counted until its answer's body is taken or
/// dropped, even if cancelled.
struct InFlight(Arc<Activity>, u64);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .lock()
            .expect("not poisoned")
            .remove(&self.1);
    }
}

async fn serve_connection<I>(
    io: I,
    app: Router,
    remote: std::net::SocketAddr,
    slot: &ConnectionSlot,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use futures::StreamExt;
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;
    let started = Instant::now();
    let activity = Arc::new(Activity {
        in_flight: Mutex::new(HashMap::new()),
        next: AtomicU64::new(0),
        last: Mutex::new(started),
        trusted: std::sync::atomic::AtomicBool::new(false),
    });
    let act = activity.clone();
    let (slot_all, slot_ip) = (slot.all.clone(), slot.ip);
    let svc = tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(Remote(remote));
        // A scrape is answered but earns no trust: a peer keeps a connection by its own
        // requests, a scraper reconnects (a stranger could scrape from this host).
        let earns_trust = req.uri().path() != "/metrics";
        let n = act.next.fetch_add(1, Ordering::Relaxed);
        act.in_flight
            .lock()
            .expect("not poisoned")
            .insert(n, Instant::now());
        let guard = InFlight(act.clone(), n);
        let (app, act) = (app.clone(), act.clone());
        let (conns, ip) = (slot_all.clone(), slot_ip);
        async move {
            let resp = app.oneshot(req.map(axum::body::Body::new)).await?;
            // Only an answered request keeps the connection alive; a refusal does not.
            if resp.status().is_success() && earns_trust {
                // Only a request that authenticated is answered with success here (a peer's,
                // or `status` with the admin token): its address is known from now on.
                if !act.trusted.swap(true, Ordering::Relaxed) {
                    conns.remember(ip);
                }
                *act.last.lock().expect("not poisoned") = Instant::now();
            }
            Ok::<_, std::convert::Infallible>(resp.map(|body| {
                axum::body::Body::from_stream(body.into_data_stream().map(move |piece| {
                    let _ = &guard;
                    piece
                }))
            }))
        }
    });
    let builder = connection_builder();
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%remote, "connection ended: {e}");
                }
                return;
            }
            _ = tick.tick() => {
                if let Some(t) = closing {
                    if t.elapsed() > HANDSHAKE_TIMEOUT {
                        tracing::debug!(%remote, "connection closed: it did not wind down");
                        return;
                    }
                    continue;
                }
                let (busy, oldest) = {
                    let f = activity.in_flight.lock().expect("not poisoned");
                    (!f.is_empty(), f.values().min().map(Instant::elapsed))
                };
                if oldest.is_some_and(|age| age > REQUEST_TIMEOUT) {
                    tracing::debug!(%remote, "connection closed: an answer was not taken in time");
                    return;
                }
                let quiet = activity.last.lock().expect("not poisoned").elapsed();
                let trusted = activity.trusted.load(Ordering::Relaxed);
                let stale = if trusted { quiet > IDLE_TIMEOUT } else { started.elapsed() > HANDSHAKE_TIMEOUT };
                if stale && (!busy || !trusted) {
                    tracing::debug!(%remote, trusted, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
            }
        }
    }
}

/// HTTP/2 settings for peers: chunk answers are megabytes, so let a stream buffer a whole
/// answer instead of trickling it out in 400 KiB steps. Requests are small, so the windows
/// for what a peer sends stay small: no connection can make this node buffer much.
fn connection_builder() -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_send_buf_size(super::H2_WINDOW as usize)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_concurrent_streams(64)
        .max_header_list_size(64 << 10)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_peer_cannot_hold_every_manifest_work_permit() {
        // Peer a cycling manifest requests holds one shared permit at most: its second
        // request waits for its first, and peer b still gets the other shared permit.
        let shared = Arc::new(tokio::sync::Semaphore::new(HEAVY_WORK));
        let (a, b) = (
            Arc::new(tokio::sync::Semaphore::new(1)),
            Arc::new(tokio::sync::Semaphore::new(1)),
        );
        let first = heavy_permit(&a, &shared).await.unwrap();
        let second = tokio::time::timeout(Duration::from_millis(50), heavy_permit(&a, &shared));
        assert!(second.await.is_err(), "a peer took a second permit");
        let other = tokio::time::timeout(Duration::from_millis(50), heavy_permit(&b, &shared));
        assert!(other.await.is_ok(), "another peer found no permit");
        drop(first);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), heavy_permit(&a, &shared))
                .await
                .is_ok()
        );
    }
}
