//! The upstream's side of the peer protocol, plus the daemon's `status` and `/metrics`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tokio::net::TcpListener;

use super::{
    ChunkRequest, MANIFEST_KIND_HEADER, MAX_CHUNKS_PER_REQUEST, PEER_HEADER, SnapshotList,
    WireError, write_frame,
};
use crate::catalog::SnapshotRecord;
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::id::{ChunkId, NodeId, SnapshotId, VolumeName, shorten};
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

/// A downstream as this node knows it.
#[derive(Debug)]
struct Peer {
    name: NodeId,
    token: String,
    volumes: HashSet<VolumeName>,
    max_locks: usize,
    max_snapshots: usize,
    lease_ms: Option<u64>,
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
}

/// Snapshots whose manifests are kept decoded (the newest is the next update's base).
const SERVED_CACHE: usize = 8;

/// The server's shared state.
pub struct ServerState {
    node: Arc<Node>,
    peers: HashMap<NodeId, Peer>,
    admin_token: String,
    /// What `/metrics` requires, if anything.
    metrics_token: Option<String>,
    index: tokio::sync::Mutex<Arc<ChunkIndex>>,
    served: Mutex<VecDeque<Served>>,
    reporter: Arc<dyn Reporter>,
    pub counters: Arc<ServedCounters>,
    /// Told the volume whenever a downstream's lock set for it changed.
    lock_changes: Option<tokio::sync::mpsc::UnboundedSender<VolumeName>>,
}

impl ServerState {
    pub fn new(
        node: Arc<Node>,
        cfg: &NodeConfig,
        admin_token: String,
        reporter: Arc<dyn Reporter>,
        counters: Arc<ServedCounters>,
        lock_changes: Option<tokio::sync::mpsc::UnboundedSender<VolumeName>>,
    ) -> Result<Self> {
        let mut peers = HashMap::new();
        for d in &cfg.downstream {
            let lease_ms = match &d.lease {
                Some(l) => Some(crate::config::parse_duration("lease", l)?.as_millis() as u64),
                None => None,
            };
            // Settings for this downstream's holders, so `prune` honours release_stale.
            for v in &d.volumes {
                node.catalog.locks().set_settings(
                    &HolderId::mirror(&d.name, v),
                    &HolderSettings {
                        auto_release_stale: d.release_stale,
                    },
                )?;
            }
            peers.insert(
                d.name.clone(),
                Peer {
                    name: d.name.clone(),
                    token: cfg.downstream_token(d)?,
                    volumes: d.volumes.iter().cloned().collect(),
                    max_locks: d.max_locks,
                    max_snapshots: d.max_snapshots,
                    lease_ms,
                },
            );
        }
        Ok(ServerState {
            node,
            peers,
            admin_token,
            metrics_token: cfg.metrics_token()?,
            index: tokio::sync::Mutex::new(Arc::new(ChunkIndex::default())),
            served: Mutex::new(VecDeque::new()),
            reporter,
            counters,
            lock_changes,
        })
    }

    fn bearer(headers: &HeaderMap) -> &str {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
    }

    /// The authenticated peer, or why not.
    fn peer(&self, headers: &HeaderMap) -> Result<&Peer> {
        let r = (|| {
            let name = headers
                .get(PEER_HEADER)
                .ok_or_else(|| Error::denied(format!("no {PEER_HEADER} header: name this node")))?;
            let name = name
                .to_str()
                .map_err(|_| Error::denied(format!("{PEER_HEADER} is not text")))?;
            let id: NodeId = name
                .parse()
                .map_err(|e: Error| Error::denied(e.to_string()))?;
            let peer = self.peers.get(&id).ok_or_else(|| {
                Error::denied(format!(
                    "unknown peer {id}: this node has no [[downstream]] named so"
                ))
            })?;
            if !super::same_secret(Self::bearer(headers), &peer.token) {
                return Err(Error::denied(format!("wrong token for peer {id}")));
            }
            Ok(peer)
        })();
        if let Err(e) = &r {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("refused a peer request: {e}");
        }
        r
    }

    fn granted(&self, peer: &Peer, volume: &str) -> Result<VolumeName> {
        let volume: VolumeName = volume.parse()?;
        if !peer.volumes.contains(&volume) {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %peer.name, %volume, "refused: volume not granted");
            return Err(Error::denied(format!(
                "peer {} is not granted volume {volume}",
                peer.name
            )));
        }
        Ok(volume)
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
    async fn manifest_of(&self, rec: &SnapshotRecord) -> Result<Arc<Manifest>> {
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
        let m = self.manifest_of(rec).await?;
        let all: Arc<HashSet<ChunkId>> = tokio::task::spawn_blocking(move || {
            Arc::new(m.blocks.iter().flatten().copied().collect())
        })
        .await
        .map_err(|e| Error::internal(format!("chunk set worker failed: {e}")))?;
        self.with_served(&rec.volume, rec.id, |e| e.all = Some(all.clone()));
        Ok(chunks.iter().find(|c| !all.contains(c)).copied())
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

/// An error as an HTTP response.
struct ApiError(Error);

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

type Api<T> = std::result::Result<T, ApiError>;
type Shared = State<Arc<ServerState>>;

async fn list_snapshots(
    State(s): Shared,
    headers: HeaderMap,
    Path(volume): Path<String>,
) -> Api<Json<SnapshotList>> {
    let peer = s.peer(&headers)?;
    let volume = s.granted(peer, &volume)?;
    let snapshots = match s.node.catalog.snapshots(&volume) {
        Ok(v) => v,
        Err(Error::NotFound(_)) => vec![],
        Err(e) => return Err(e.into()),
    };
    Ok(Json(SnapshotList {
        node: s.node.info.node_id.clone(),
        volume,
        snapshots,
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
}

async fn manifest(
    State(s): Shared,
    headers: HeaderMap,
    Path((volume, id)): Path<(String, String)>,
    Query(q): Query<ManifestQuery>,
) -> Api<Response> {
    let peer = s.peer(&headers)?;
    let volume = s.granted(peer, &volume)?;
    let rec = s.record(&volume, &id)?;
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
        // A downstream from before format 2: the manifest as it reads them.
        let m = s.manifest_of(&rec).await?;
        let json = tokio::task::spawn_blocking(move || m.encode_format_1())
            .await
            .map_err(|e| Error::internal(format!("manifest encoder failed: {e}")))??;
        return Ok(([(MANIFEST_KIND_HEADER, "full")], json).into_response());
    }
    let Some(base) = base else {
        let raw = s.node.repo.read_manifest(&volume, &rec.id).await?;
        return Ok(([(MANIFEST_KIND_HEADER, "full")], raw).into_response());
    };
    let (m, b) = tokio::try_join!(s.manifest_of(&rec), s.manifest_of(&base))?;
    let delta = tokio::task::spawn_blocking(move || m.delta_from(&b))
        .await
        .map_err(|e| Error::internal(format!("manifest delta worker failed: {e}")))?;
    // The peer asks for chunks of the changed blocks next: allow those without hashing every
    // block of the snapshot.
    s.with_served(&volume, rec.id, |e| {
        e.known.extend(delta.changes.iter().filter_map(|(_, c)| *c))
    });
    Ok(([(MANIFEST_KIND_HEADER, "delta")], delta.encode()?).into_response())
}

async fn chunks(
    State(s): Shared,
    headers: HeaderMap,
    Path((volume, id)): Path<(String, String)>,
    body: Bytes,
) -> Api<Vec<u8>> {
    let started = std::time::Instant::now();
    let peer = s.peer(&headers)?;
    let volume = s.granted(peer, &volume)?;
    let rec = s.record(&volume, &id)?;
    let id = rec.id;
    let req: ChunkRequest = serde_json::from_slice(&body).map_err(|e| {
        Error::invalid(format!(
            "malformed chunk request: {}",
            shorten(&e.to_string())
        ))
    })?;
    if req.chunks.len() > MAX_CHUNKS_PER_REQUEST {
        return Err(Error::invalid(format!(
            "at most {MAX_CHUNKS_PER_REQUEST} chunks per request, not {}",
            req.chunks.len()
        ))
        .into());
    }
    if let Some(bad) = s.not_in_snapshot(&rec, &req.chunks).await? {
        return Err(
            Error::denied(format!("chunk {bad} is not part of snapshot {volume}@{id}")).into(),
        );
    }
    // gc must not remove a pack while it is read.
    let _lock = s.node.lock_repo_shared().await?;
    let index = s.index_for(&req.chunks).await?;
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
    *s.counters
        .chunk_bytes
        .lock()
        .expect("not poisoned")
        .entry(peer.name.to_string())
        .or_default() += out.len() as u64;
    Ok(out)
}

async fn put_locks(
    State(s): Shared,
    headers: HeaderMap,
    Path(volume): Path<String>,
    body: Bytes,
) -> Api<Response> {
    let peer = s.peer(&headers)?;
    let volume = s.granted(peer, &volume)?;
    let mut update: LockSetUpdate = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("malformed lock set: {}", shorten(&e.to_string()))))?;
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

async fn metrics(State(s): Shared, headers: HeaderMap) -> Response {
    if let Some(t) = &s.metrics_token
        && !super::same_secret(ServerState::bearer(&headers), t)
    {
        s.counters.denied.fetch_add(1, Ordering::Relaxed);
        return ApiError(Error::denied(
            "/metrics needs the token set in this node's [listen] metrics_token(_file)",
        ))
        .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.reporter.metrics(),
    )
        .into_response()
}

/// The routes.
pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/v1/volumes/{volume}/snapshots", get(list_snapshots))
        .route(
            "/v1/volumes/{volume}/snapshots/{id}/manifest",
            get(manifest),
        )
        .route("/v1/volumes/{volume}/snapshots/{id}/chunks", post(chunks))
        .route("/v1/volumes/{volume}/locks", put(put_locks))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

/// Accepts connections until the task is dropped: TLS when configured, else HTTP/2 (or 1.1)
/// in plaintext (allowed only on loopback, checked when the config was loaded).
pub async fn serve(listener: TcpListener, tls: Option<rustls::ServerConfig>, app: Router) {
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let svc = TowerToHyperService::new(app);
            let result = match acceptor {
                Some(a) => match a.accept(stream).await {
                    Ok(tls) => {
                        connection_builder()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(%remote, "TLS handshake failed: {e}");
                        return;
                    }
                },
                None => {
                    connection_builder()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%remote, "connection ended: {e}");
            }
        });
    }
}

/// HTTP/2 settings for peers: chunk answers are megabytes, so let a stream buffer a whole
/// answer instead of trickling it out in 400 KiB steps.
fn connection_builder() -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.http2()
        .max_send_buf_size(super::H2_WINDOW as usize)
        .initial_stream_window_size(super::H2_WINDOW)
        .initial_connection_window_size(2 * super::H2_WINDOW);
    b
}
