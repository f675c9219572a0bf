//! The downstream's side of the peer protocol.

use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

use super::{ChunkRequest, MANIFEST_KIND_HEADER, PEER_HEADER, SnapshotList, WireError};
use crate::config::{NodeConfig, Upstream};
use crate::error::{Error, Result};
use crate::id::{ChunkId, NodeId, RegionName, SnapshotId, VolumeName};
use crate::softlock::{LockSetUpdate, ReplaceOutcome};

/// A manifest as an upstream sent it.
#[derive(Debug)]
pub enum ManifestAnswer {
    /// The stored manifest.
    Full(Bytes),
    /// A [`crate::snapshot::ManifestDelta`] against the base asked for.
    Delta(Bytes),
}

/// How requests reach upstreams when not over HTTP: a simulated network
/// (`tests/sim`), which hands each request to the upstream's router in the same process,
/// or loses, delays or repeats it. `Err` is a message the request never got an answer for.
pub trait Transport: Send + Sync {
    fn send(
        &self,
        from: &NodeId,
        to: &NodeId,
        request: http::Request<Bytes>,
    ) -> futures::future::BoxFuture<'static, std::result::Result<http::Response<Bytes>, String>>;

    /// Whether `node` dies at `point` (see [`crash_point`]).
    fn crash_at(&self, node: &NodeId, point: &str) -> bool {
        let _ = (node, point);
        false
    }
}

/// A step of a protocol where a simulation may kill `node`: if its [`Transport`] says so, the
/// task stops here for good (it never returns, as a killed process never goes on), and the
/// simulation drops it and restarts the node from its disk. Nothing outside a simulation.
pub async fn crash_point(node: &NodeId, point: &str) {
    if let Some(t) = transport()
        && t.crash_at(node, point)
    {
        futures::future::pending::<()>().await;
    }
}

static TRANSPORT: std::sync::RwLock<Option<std::sync::Arc<dyn Transport>>> =
    std::sync::RwLock::new(None);

/// Makes every [`PeerClient`] of this process send through `t` instead of HTTP (`None`: HTTP
/// again). Only a simulation sets one; nothing in a configuration can.
pub fn set_transport(t: Option<std::sync::Arc<dyn Transport>>) {
    crate::set_simulating(t.is_some());
    *TRANSPORT.write().expect("not poisoned") = t;
}

fn transport() -> Option<std::sync::Arc<dyn Transport>> {
    TRANSPORT.read().expect("not poisoned").clone()
}

/// A connection to one upstream (HTTP/2, pooled; cheap to clone).
#[derive(Clone, Debug)]
pub struct PeerClient {
    pub upstream: NodeId,
    base: reqwest::Url,
    http: reqwest::Client,
    token: String,
    me: NodeId,
}

/// Most bytes of an error answer read (its message is cut to a line anyway).
const ERROR_BODY_LIMIT: usize = 64 << 10;
/// Most bytes of a snapshot listing: far above 100,000 snapshots of a volume.
pub const LISTING_LIMIT: usize = 64 << 20;
/// Most bytes of a lock-set reply or a status answer.
const SMALL_ANSWER_LIMIT: usize = 16 << 20;
/// Room for a manifest's header (name, labels) besides its block list.
const MANIFEST_HEADER_ROOM: usize = 1 << 20;

/// Most bytes a manifest (whole, or a delta) of a snapshot of `size` bytes in blocks of
/// `block_size` may take on the wire: its header, a presence bit and 32-byte id per block, or
/// per changed block an index, a tag and an id (a delta, zstd-compressed, may grow by a little
/// over that). A whole manifest is held to the exact length its own bitmap gives.
pub fn manifest_limit(size: u64, block_size: u32) -> usize {
    let blocks = crate::snapshot::block_count(size, block_size.max(1)) as usize;
    let raw = MANIFEST_HEADER_ROOM
        .saturating_add(blocks.saturating_mul(8 + 1 + 32))
        .saturating_add(blocks / 8 + 128);
    raw.saturating_add(raw / 128)
}

fn client_builder() -> reqwest::ClientBuilder {
    super::tls::ensure_provider();
    reqwest::Client::builder()
        // A redirect could lead the token elsewhere, or to plain HTTP: peers never redirect.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(300))
        .pool_idle_timeout(Duration::from_secs(60))
        .http2_initial_stream_window_size(super::H2_WINDOW)
        .http2_initial_connection_window_size(2 * super::H2_WINDOW)
        .http2_max_frame_size(1 << 20)
}

impl PeerClient {
    /// A client for `upstream` as configured on node `me`.
    pub fn new(cfg: &NodeConfig, me: &NodeId, upstream: &Upstream) -> Result<Self> {
        let base = reqwest::Url::parse(&upstream.url)
            .map_err(|e| Error::invalid(format!("upstream {} url: {e}", upstream.name)))?;
        let mut b = client_builder();
        if base.scheme() == "http" {
            // Checked at load: only loopback. The upstream speaks HTTP/2 without TLS.
            b = b.http2_prior_knowledge();
        }
        // Only the configured certificate is trusted (no built-in roots).
        let roots = match &upstream.ca {
            Some(ca) => super::tls::load_roots(&cfg.resolve(ca))?,
            None => vec![],
        };
        b = b.tls_certs_only(roots);
        let http = b
            .build()
            .map_err(|e| Error::internal(format!("building the HTTP client: {e}")))?;
        Ok(PeerClient {
            upstream: upstream.name.clone(),
            base,
            http,
            token: cfg.upstream_token(upstream)?,
            me: me.clone(),
        })
    }

    /// A client for a local daemon's admin routes (`status`).
    pub fn admin(
        url: &str,
        token: &str,
        ca: Option<&std::path::Path>,
        me: &NodeId,
    ) -> Result<Self> {
        let base = reqwest::Url::parse(url)
            .map_err(|e| Error::invalid(format!("daemon url {url:?}: {e}")))?;
        let mut b = client_builder().timeout(Duration::from_secs(30));
        if base.scheme() == "http" {
            b = b.http2_prior_knowledge();
        }
        let roots = match ca {
            Some(ca) => super::tls::load_roots(ca)?,
            None => vec![],
        };
        b = b.tls_certs_only(roots);
        let http = b
            .build()
            .map_err(|e| Error::internal(format!("building the HTTP client: {e}")))?;
        Ok(PeerClient {
            upstream: me.clone(),
            base,
            http,
            token: token.to_string(),
            me: me.clone(),
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = self.base.join(path).expect("relative route");
        self.http
            .request(method, url)
            .bearer_auth(&self.token)
            .header(PEER_HEADER, self.me.as_str())
    }

    fn who(&self) -> String {
        format!("upstream {} ({})", self.upstream, self.base)
    }

    async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = match transport() {
            Some(t) => self.send_through(&*t, req).await?,
            None => self.send_http(req).await?,
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = self
            .body(resp, ERROR_BODY_LIMIT, "error answer")
            .await
            .unwrap_or_default();
        Err(match serde_json::from_slice::<WireError>(&body) {
            Ok(w) => w.into_error(&self.who()),
            Err(_) => Error::Unavailable {
                message: format!(
                    "{} answered {status}: {}",
                    self.who(),
                    super::peer_text(&crate::id::shorten(&String::from_utf8_lossy(&body)))
                ),
                source: None,
            },
        })
    }

    /// A request through the process's [`Transport`] (a simulated network) instead of HTTP.
    async fn send_through(&self, t: &dyn Transport, req: RequestBuilder) -> Result<Response> {
        let req = req
            .build()
            .map_err(|e| Error::internal(format!("building a request: {e}")))?;
        let mut out = http::Request::builder()
            .method(req.method().clone())
            .uri(req.url().as_str());
        if let Some(h) = out.headers_mut() {
            *h = req.headers().clone();
        }
        let body = Bytes::copy_from_slice(req.body().and_then(|b| b.as_bytes()).unwrap_or(&[]));
        let out = out
            .body(body)
            .map_err(|e| Error::internal(format!("building a request: {e}")))?;
        let answer =
            t.send(&self.me, &self.upstream, out)
                .await
                .map_err(|why| Error::Unavailable {
                    message: format!("cannot reach {}: {why}", self.who()),
                    source: None,
                })?;
        Ok(Response::from(answer))
    }

    async fn send_http(&self, req: RequestBuilder) -> Result<Response> {
        req.send().await.map_err(|e| {
            let mut msg = format!("cannot reach {}: {e}", self.who());
            let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            Error::Unavailable {
                message: msg,
                source: None,
            }
        })
    }

    /// An answer in JSON, at most `limit` bytes, parsed with the labels of the snapshot
    /// records in it bounded ([`crate::id::with_label_budget`]).
    async fn json<T: DeserializeOwned>(
        &self,
        req: RequestBuilder,
        limit: usize,
        what: &str,
    ) -> Result<T> {
        let body = self.bytes(req, limit, what).await?;
        // serde's message may quote what the peer sent (an unknown variant, say).
        crate::id::with_label_budget(|| serde_json::from_slice(&body)).map_err(|e| {
            Error::denied(format!(
                "{} sent a malformed {what}: {}; nothing was changed",
                self.who(),
                super::peer_text(&e.to_string())
            ))
        })
    }

    async fn bytes(&self, req: RequestBuilder, limit: usize, what: &str) -> Result<Bytes> {
        let resp = self.send(req).await?;
        self.body(resp, limit, what).await
    }

    /// Reads an answer's body, refusing it as soon as it grows past `limit` bytes (checked
    /// while it streams in, so a hostile upstream cannot make this node buffer more).
    async fn body(&self, resp: Response, limit: usize, what: &str) -> Result<Bytes> {
        self.body_sized(resp, limit, what, |_| Ok(None)).await
    }

    /// [`PeerClient::body`], where `exact` tells from the first bytes how long the whole body
    /// must be (`None`: not yet known): the body is then refused as soon as its first bytes
    /// are wrong or it runs past that length, and its buffer is sized once.
    async fn body_sized(
        &self,
        mut resp: Response,
        limit: usize,
        what: &str,
        mut exact: impl FnMut(&[u8]) -> Result<Option<usize>>,
    ) -> Result<Bytes> {
        let refused = |e: Error| {
            Error::denied(format!(
                "{} sent a {what} this node refuses: {e}; nothing was changed",
                self.who()
            ))
        };
        let too_big = |n: u64| {
            Error::denied(format!(
                "{} sent a {what} of {n} bytes or more; at most {limit} bytes are accepted, \
                 nothing was changed",
                self.who()
            ))
        };
        if let Some(n) = resp.content_length().filter(|n| *n > limit as u64) {
            return Err(too_big(n));
        }
        let mut out = bytes::BytesMut::with_capacity(
            resp.content_length().map_or(0, |n| n as usize).min(limit),
        );
        let mut length: Option<usize> = None;
        loop {
            let next = resp.chunk().await.map_err(|e| Error::Unavailable {
                message: format!("reading the {what} of {}: {e}", self.who()),
                source: None,
            })?;
            let Some(chunk) = next else { break };
            let limit = length.unwrap_or(limit);
            if out.len() + chunk.len() > limit {
                return Err(match length {
                    Some(n) => refused(Error::corrupt(format!(
                        "it runs past the {n} bytes its first bytes say it has"
                    ))),
                    None => too_big((out.len() + chunk.len()) as u64),
                });
            }
            out.extend_from_slice(&chunk);
            if length.is_none()
                && let Some(n) = exact(&out).map_err(refused)?
            {
                if n > limit {
                    return Err(too_big(n as u64));
                }
                // Sized once (growing by doubling would take up to twice the length).
                if out.capacity() < n {
                    let mut exact = bytes::BytesMut::with_capacity(n);
                    exact.extend_from_slice(&out);
                    out = exact;
                }
                length = Some(n);
                if out.len() > n {
                    return Err(refused(Error::corrupt(format!(
                        "it runs past the {n} bytes its first bytes say it has"
                    ))));
                }
            }
        }
        if let Some(n) = length.filter(|n| out.len() != *n) {
            return Err(refused(Error::corrupt(format!(
                "it ends after {} of the {n} bytes its first bytes say it has",
                out.len()
            ))));
        }
        Ok(out.freeze())
    }

    pub async fn snapshots(&self, volume: &VolumeName) -> Result<SnapshotList> {
        let list: SnapshotList = self
            .json(
                self.request(Method::GET, &format!("v1/volumes/{volume}/snapshots")),
                LISTING_LIMIT,
                "snapshot listing",
            )
            .await?;
        if &list.volume != volume {
            return Err(Error::corrupt(format!(
                "{} answered with the snapshots of {} when asked for {volume}",
                self.who(),
                list.volume
            )));
        }
        Ok(list)
    }

    /// The manifest of snapshot `id`, listed as `geometry` (its size and block size); with
    /// `base`, preferably as a delta against that snapshot's manifest (an upstream without
    /// `base` sends the whole manifest). At most [`manifest_limit`] of the listed snapshot is
    /// accepted, and a whole manifest must be in format 2 of exactly the length its header and
    /// presence bitmap give (checked as soon as they arrive).
    pub async fn manifest(
        &self,
        volume: &VolumeName,
        id: &SnapshotId,
        base: Option<SnapshotId>,
        geometry: (u64, u32),
        region: Option<&RegionName>,
    ) -> Result<ManifestAnswer> {
        let limit = manifest_limit(geometry.0, geometry.1);
        let mut path = format!(
            "v1/volumes/{volume}/snapshots/{id}/manifest?format={}",
            crate::snapshot::MANIFEST_FORMAT
        );
        if let Some(b) = base {
            path.push_str(&format!("&base={b}"));
        }
        let mut req = self.request(Method::GET, &path);
        if let Some(r) = region {
            req = req.query(&[("region", r.as_str())]);
        }
        let resp = self.send(req).await?;
        let delta = resp
            .headers()
            .get(MANIFEST_KIND_HEADER)
            .is_some_and(|v| v.as_bytes() == b"delta");
        if delta && base.is_none() {
            // Refused before a byte of its body is read.
            return Err(Error::denied(format!(
                "{} sent a manifest delta for {volume}@{id} though no base was asked for; \
                 nothing was changed",
                self.who()
            )));
        }
        Ok(if delta {
            ManifestAnswer::Delta(self.body(resp, limit, "manifest delta").await?)
        } else {
            let what = format!("manifest of {volume}@{id}");
            ManifestAnswer::Full(
                self.body_sized(resp, limit, "manifest", {
                    let mut length = crate::snapshot::manifest::Format2Length::default();
                    move |prefix| length.feed(prefix, geometry, &what)
                })
                .await?,
            )
        })
    }

    /// The frames of `chunks` (referenced by snapshot `id`, in blocks of `block_size`): at most
    /// the frames of that many chunks of that size, each as zstd may store it, are accepted.
    pub async fn chunks(
        &self,
        volume: &VolumeName,
        id: &SnapshotId,
        chunks: Vec<ChunkId>,
        block_size: u32,
        region: Option<&RegionName>,
    ) -> Result<Bytes> {
        let stored_max = block_size as usize + block_size as usize / 64 + 1024;
        let limit = chunks.len() * (super::FRAME_HEADER + stored_max);
        let mut req = self
            .request(
                Method::POST,
                &format!("v1/volumes/{volume}/snapshots/{id}/chunks"),
            )
            .json(&ChunkRequest { chunks });
        if let Some(r) = region {
            req = req.query(&[("region", r.as_str())]);
        }
        self.bytes(req, limit, "chunk answer").await
    }

    /// Sends a lock set. An upstream that asks to slow down (its per-peer rate of lock sets,
    /// which a burst of forwarded sets can exceed) is asked again after a pause, for a few
    /// seconds: a legitimate update must not fail for it.
    pub async fn put_lock_set(&self, update: &LockSetUpdate) -> Result<ReplaceOutcome> {
        let mut pause = Duration::from_millis(250);
        for attempt in 0.. {
            let req = self
                .request(Method::PUT, &format!("v1/volumes/{}/locks", update.volume))
                .json(update);
            match self.bytes(req, SMALL_ANSWER_LIMIT, "lock-set reply").await {
                Err(Error::Unavailable { message, .. })
                    if message.contains("slow down") && attempt < 6 =>
                {
                    tracing::debug!("upstream asked to slow down; lock set again in {pause:?}");
                    crate::back_off(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                // A reply that cannot be read says nothing about whether the set was taken:
                // it is not a refusal (a refusal makes this node send its own locks without
                // its downstreams', which would release theirs upstream). The update stops;
                // the next one sends the whole set again.
                Ok(body) => {
                    return serde_json::from_slice(&body).map_err(|e| Error::Unavailable {
                        message: format!(
                            "{} sent a lock-set reply that cannot be read ({}); whether it \
                             took the set is unknown, so nothing more was sent",
                            self.who(),
                            super::peer_text(&e.to_string())
                        ),
                        source: None,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    /// The upstream's view of the cascade above it (`/v1/cascade`), for the web page's map:
    /// `path` is the nodes the question came through, this one last. Bounded in size and
    /// time; the caller checks what it says.
    pub async fn cascade(&self, path: &[NodeId]) -> Result<crate::ui::cascade::CascadeView> {
        let path: Vec<&str> = path.iter().map(|n| n.as_str()).collect();
        self.json(
            self.request(Method::GET, "v1/cascade")
                .header(super::PATH_HEADER, path.join(","))
                .timeout(Duration::from_secs(10)),
            crate::ui::cascade::VIEW_LIMIT,
            "cascade view",
        )
        .await
    }

    pub async fn status(&self) -> Result<serde_json::Value> {
        self.json(
            self.request(Method::GET, "v1/status"),
            SMALL_ANSWER_LIMIT,
            "status",
        )
        .await
    }
}
