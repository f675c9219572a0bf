//! `/api/v1/`: the JSON the web page is drawn from, for scripts too. Read-only; lists are
//! paginated (`offset`, `limit`: at most [`MAX_LIMIT`] items a page, [`DEFAULT_LIMIT`] unless
//! asked) and answer `{"total", "offset", "limit", "items"}`. Field names are kebab-case, times
//! are Unix milliseconds (`-unix-ms`), durations milliseconds (`-ms`). A field may be added
//! within v1; none is removed or changes meaning.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::cascade::{self, CascadeView, Edge, OwnRelation, Unreachable};
use crate::catalog::SnapshotRecord;
use crate::error::{Error, Result};
use crate::id::{NodeId, SnapshotId, VolumeName};
use crate::peer::server::{Api, ServerState};
use crate::softlock::SoftLock;
use crate::softlock::registry::LockSet;

type Shared = State<Arc<ServerState>>;

pub const DEFAULT_LIMIT: usize = 100;
/// Locks listed with each snapshot of a page (all of them are in `/api/v1/locks`).
pub const LOCKS_PER_SNAPSHOT: usize = 20;
pub const MAX_LIMIT: usize = 1000;
/// How long the upstreams' cascade views are reused before they are asked again.
const VIEWS_FRESH_FOR: Duration = Duration::from_secs(5);
/// Views kept (one per path a question came by).
const VIEWS_CACHED: usize = 64;
/// How long this node's own relations are reused.
const OWN_EDGES_FRESH_FOR: Duration = Duration::from_secs(1);
/// Downstreams' cascade questions that ask upstream at once, for all of them.
pub const PEER_VIEWS_AT_ONCE: usize = 4;
/// Longest path a cascade question may carry.
const MAX_VIEW_PATH: usize = 64;
/// Snapshots whose exclusive size one `holders` answer may work out anew (each reads three
/// manifests); the rest are counted by later answers, which find these in the cache.
const EXCLUSIVE_WORK: usize = 64;

/// (previous, snapshot, next): what a snapshot's exclusive size depends on.
pub type Neighbours = (Option<SnapshotId>, SnapshotId, Option<SnapshotId>);
/// The upstreams' edges, and the upstreams that did not answer.
pub type UpstreamViews = (Vec<Edge>, Vec<Unreachable>);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    offset: Option<usize>,
    limit: Option<usize>,
    /// `snapshots`: `newest` (the default) or `oldest` first.
    order: Option<String>,
    /// `locks`: only this volume's, or this holder's.
    volume: Option<String>,
    holder: Option<String>,
}

/// The query of a route that takes none: any parameter is refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

type NoQuery = std::result::Result<Query<NoParams>, axum::extract::rejection::QueryRejection>;

fn no_params(q: NoQuery) -> Result<()> {
    q.map(drop)
        .map_err(|e| Error::invalid(format!("{}; this route takes no parameters", e.body_text())))
}

/// A page's query, or a clear error (in the API's JSON, like every other).
type Paging = std::result::Result<Query<Page>, axum::extract::rejection::QueryRejection>;

fn paging(q: Paging) -> Result<Page> {
    q.map(|Query(p)| p).map_err(|e| {
        Error::invalid(format!(
            "{}; a list takes offset, limit (1 to {MAX_LIMIT}), and per list order, volume, holder",
            e.body_text()
        ))
    })
}

impl Page {
    /// Refuses the parameters route `route` does not take (`order` for snapshots only,
    /// `volume` and `holder` for locks only), rather than ignoring them.
    fn only(self, route: &str, order: bool, narrow: bool) -> Result<Self> {
        let stray = [
            ("order", self.order.is_some() && !order),
            ("volume", self.volume.is_some() && !narrow),
            ("holder", self.holder.is_some() && !narrow),
        ];
        if let Some((name, _)) = stray.iter().find(|(_, s)| *s) {
            return Err(Error::invalid(format!("{route} takes no {name}")));
        }
        Ok(self)
    }

    fn window(&self) -> Result<(usize, usize)> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(Error::invalid(format!(
                "limit {limit} is out of range: ask for 1 to {MAX_LIMIT} items a page"
            )));
        }
        Ok((self.offset.unwrap_or(0), limit))
    }
}

/// One page of a list: `{"total", "offset", "limit", "items"}`.
fn page_of<T: Serialize>(total: usize, offset: usize, limit: usize, items: &[T]) -> Value {
    json!({ "total": total, "offset": offset, "limit": limit, "items": items })
}

fn volume_of(s: &ServerState, name: &str) -> Result<VolumeName> {
    let v: VolumeName = name.parse()?;
    s.node().catalog.volume(&v)?;
    Ok(v)
}

/// `/api/v1/node`: who answers.
pub(crate) async fn node(State(s): Shared, q: NoQuery) -> Api<Json<Value>> {
    no_params(q)?;
    let status = s.reporter().status()?;
    Ok(Json(json!({
        "api": "v1",
        "node": s.node().info.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "now-unix-ms": crate::now_unix_ms(),
        "started-unix-ms": status["started-unix-ms"],
        "listen": status["listen"],
    })))
}

/// A volume in a listing.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct VolumeSummary {
    name: VolumeName,
    /// `local` (snapshots are taken here) or `replica` (they arrive from `origin`).
    kind: &'static str,
    origin: Option<String>,
    source: Option<String>,
    region: Option<String>,
    block_size: u32,
    snapshots: usize,
    newest_unix_ms: Option<u64>,
    newest_age_ms: Option<u64>,
    size: Option<u64>,
    locks: usize,
    holders: usize,
    stale_holders: usize,
}

fn summary(s: &ServerState, v: &crate::catalog::VolumeRecord, now: u64) -> Result<VolumeSummary> {
    let snaps = s.node().catalog.snapshots(&v.name)?;
    let sets = s.node().catalog.locks().sets(Some(&v.name))?;
    let newest = snaps.last();
    Ok(VolumeSummary {
        name: v.name.clone(),
        kind: if v.upstream.is_some() {
            "replica"
        } else {
            "local"
        },
        origin: v.upstream.clone(),
        source: v.upstream.is_none().then(|| v.source_label()),
        region: v.region.as_ref().map(|r| r.to_string()),
        block_size: v.block_size,
        snapshots: snaps.len(),
        newest_unix_ms: newest.map(|n| n.created_unix_ms),
        newest_age_ms: newest.map(|n| now.saturating_sub(n.created_unix_ms)),
        size: newest.map(|n| n.size),
        locks: sets.iter().map(|s| s.locks.len()).sum(),
        holders: sets.len(),
        stale_holders: sets
            .iter()
            .filter(|s| s.locks.iter().any(|l| l.is_stale(now)))
            .count(),
    })
}

/// `/api/v1/volumes`: every volume, by name.
pub(crate) async fn volumes(State(s): Shared, page: Paging) -> Api<Json<Value>> {
    let page = paging(page)?.only("volumes", false, false)?;
    let now = crate::now_unix_ms();
    let (offset, limit) = page.window()?;
    let vols = s.node().catalog.volumes()?;
    // Only the page's volumes are summarised (each reads its snapshots and locks).
    let mut items = Vec::new();
    for v in vols.iter().skip(offset).take(limit) {
        items.push(summary(&s, v, now)?);
    }
    Ok(Json(page_of(vols.len(), offset, limit, &items)))
}

/// `/api/v1/volumes/{volume}`: one volume's summary.
pub(crate) async fn volume(
    State(s): Shared,
    Path(name): Path<String>,
    q: NoQuery,
) -> Api<Json<Value>> {
    no_params(q)?;
    let v = volume_of(&s, &name)?;
    let rec = s.node().catalog.volume(&v)?;
    let now = crate::now_unix_ms();
    let mut out = serde_json::to_value(summary(&s, &rec, now)?).map_err(internal)?;
    out["pruned"] = json!(s.node().catalog.pruned(&v)?.len());
    out["now-unix-ms"] = json!(now);
    Ok(Json(out))
}

fn internal(e: serde_json::Error) -> Error {
    Error::internal(e.to_string())
}

/// A lock as the page shows it.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct LockView<'a> {
    #[serde(flatten)]
    lock: &'a SoftLock,
    snapshot_name: Option<&'a str>,
    /// The holder's lease ran out: a `prune` with release_stale would let it go.
    stale: bool,
    expires_unix_ms: Option<u64>,
    /// The nodes it came through, from where it was set to the node that sent it here.
    path_text: Option<String>,
}

fn path_text(l: &SoftLock) -> Option<String> {
    (!l.path.is_empty()).then(|| {
        l.path
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(" → ")
    })
}

fn lock_view<'a>(
    l: &'a SoftLock,
    names: &'a HashMap<SnapshotId, &'a str>,
    now: u64,
) -> LockView<'a> {
    LockView {
        lock: l,
        snapshot_name: names.get(&l.snapshot).copied(),
        stale: l.is_stale(now),
        expires_unix_ms: l.expires_unix_ms(),
        path_text: path_text(l),
    }
}

fn names_of(snaps: &[SnapshotRecord]) -> HashMap<SnapshotId, &str> {
    snaps.iter().map(|r| (r.id, r.name.as_str())).collect()
}

/// `/api/v1/volumes/{volume}/snapshots`: newest first (`order=oldest` for the other way),
/// each with the locks on it.
pub(crate) async fn snapshots(
    State(s): Shared,
    Path(name): Path<String>,
    page: Paging,
) -> Api<Json<Value>> {
    let page = paging(page)?.only("snapshots", true, false)?;
    let v = volume_of(&s, &name)?;
    let now = crate::now_unix_ms();
    let mut snaps = s.node().catalog.snapshots(&v)?;
    match page.order.as_deref() {
        None | Some("newest") => snaps.reverse(),
        Some("oldest") => {}
        Some(other) => {
            return Err(Error::invalid(format!("order {other:?}: say newest or oldest")).into());
        }
    }
    let sets = s.node().catalog.locks().sets(Some(&v))?;
    let mut on: HashMap<SnapshotId, Vec<&SoftLock>> = HashMap::new();
    for l in sets.iter().flat_map(|s| &s.locks) {
        on.entry(l.snapshot).or_default().push(l);
    }
    let (offset, limit) = page.window()?;
    let names = names_of(&snaps);
    let items: Vec<Value> = snaps
        .iter()
        .skip(offset)
        .take(limit)
        .map(|r| {
            let all = on.get(&r.id).map_or(&[][..], |ls| ls.as_slice());
            let locks: Vec<LockView> = all
                .iter()
                .take(LOCKS_PER_SNAPSHOT)
                .map(|l| lock_view(l, &names, now))
                .collect();
            json!({
                "id": r.id,
                "name": r.name,
                "created-unix-ms": r.created_unix_ms,
                "size": r.size,
                "labels": r.labels,
                "new-stored-bytes": r.stats.new_stored_bytes,
                "state": if locks.is_empty() { "kept" } else { "locked" },
                "locks": locks,
                "locks-total": all.len(),
            })
        })
        .collect();
    Ok(Json(page_of(snaps.len(), offset, limit, &items)))
}

/// `/api/v1/volumes/{volume}/timeline`: every snapshot, compact (`[created-unix-ms, locked
/// (0 or 1), name]`, oldest first), and the remembered deletions (`[created-unix-ms,
/// deleted-unix-ms, name]`), for the page's timeline. Not paginated: a few dozen bytes a
/// snapshot.
pub(crate) async fn timeline(
    State(s): Shared,
    Path(name): Path<String>,
    q: NoQuery,
) -> Api<Json<Value>> {
    no_params(q)?;
    let v = volume_of(&s, &name)?;
    let snaps = s.node().catalog.snapshots(&v)?;
    let locked = s.node().catalog.locks().locked_snapshots(&v)?;
    let items: Vec<Value> = snaps
        .iter()
        .map(|r| {
            json!([
                r.created_unix_ms,
                u8::from(locked.contains_key(&r.id)),
                r.name
            ])
        })
        .collect();
    let pruned: Vec<Value> = s
        .node()
        .catalog
        .pruned(&v)?
        .iter()
        .map(|p| json!([p.created_unix_ms, p.deleted_unix_ms, p.name]))
        .collect();
    Ok(Json(json!({
        "volume": v,
        "now-unix-ms": crate::now_unix_ms(),
        "snapshots": items,
        "pruned": pruned,
    })))
}

/// One holder of locks on a volume, and what it pins.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct HolderView {
    holder: String,
    /// `application` (set on this node, or forwarded with a path) or `mirror`.
    kind: &'static str,
    generation: u64,
    locks: usize,
    snapshots: usize,
    refreshed_unix_ms: u64,
    stale: bool,
    lease_ms: Option<u64>,
    /// The routes its locks came by (`C → B`), empty for locks set here.
    paths: Vec<String>,
    /// Snapshots only this holder locks: what letting go would allow to be deleted.
    pinned_snapshots: usize,
    /// What deleting those would free at most (`lock explain`'s bytes, summed).
    pinned_bytes: u64,
    /// Of `pinned-snapshots`, how many `pinned-bytes` counts so far (the rest are worked out
    /// by the next answers).
    pinned_counted: usize,
}

/// `/api/v1/volumes/{volume}/holders`: who holds locks on the volume, with what they pin.
pub(crate) async fn holders(
    State(s): Shared,
    Path(name): Path<String>,
    q: NoQuery,
) -> Api<Json<Value>> {
    no_params(q)?;
    let v = volume_of(&s, &name)?;
    let now = crate::now_unix_ms();
    let snaps = s.node().catalog.snapshots(&v)?;
    let sets = s.node().catalog.locks().sets(Some(&v))?;
    let mut lockers: HashMap<SnapshotId, BTreeSet<&str>> = HashMap::new();
    for set in &sets {
        for l in &set.locks {
            lockers
                .entry(l.snapshot)
                .or_default()
                .insert(set.holder.as_str());
        }
    }
    let pos: HashMap<SnapshotId, usize> =
        snaps.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
    let mut work = EXCLUSIVE_WORK;
    let mut out = Vec::new();
    for set in &sets {
        let mine: BTreeSet<SnapshotId> = set.locks.iter().map(|l| l.snapshot).collect();
        let only: Vec<usize> = mine
            .iter()
            .filter(|id| lockers.get(id).is_some_and(|h| h.len() == 1))
            .filter_map(|id| pos.get(id).copied())
            .collect();
        let (mut bytes, mut counted) = (0u64, 0usize);
        for &i in &only {
            let key: Neighbours = (
                i.checked_sub(1).map(|p| snaps[p].id),
                snaps[i].id,
                snaps.get(i + 1).map(|n| n.id),
            );
            let cached =
                s.ui.exclusive
                    .lock()
                    .expect("not poisoned")
                    .get(&key)
                    .copied();
            let size = match cached {
                Some(b) => Some(b),
                None if work > 0 => {
                    work -= 1;
                    match crate::snapshot::exclusive_size(&s.node().repo, &snaps, i).await {
                        Ok(x) => {
                            let mut c = s.ui.exclusive.lock().expect("not poisoned");
                            // Bounded: forgotten whole when it grows past what a node holds.
                            if c.len() > 200_000 {
                                c.clear();
                            }
                            c.insert(key, x.bytes);
                            Some(x.bytes)
                        }
                        // Deleted meanwhile, say: counted by a later answer, or never.
                        Err(_) => None,
                    }
                }
                None => None,
            };
            if let Some(b) = size {
                bytes += b;
                counted += 1;
            }
        }
        let paths: BTreeSet<String> = set.locks.iter().filter_map(path_text).collect();
        out.push(HolderView {
            holder: set.holder.to_string(),
            kind: if set.holder.application_name().is_some() {
                "application"
            } else {
                "mirror"
            },
            generation: set.generation,
            locks: set.locks.len(),
            snapshots: mine.len(),
            refreshed_unix_ms: set.refreshed_unix_ms,
            stale: set.locks.iter().any(|l| l.is_stale(now)),
            lease_ms: set.locks.iter().filter_map(|l| l.lease_ms).max(),
            paths: paths.into_iter().collect(),
            pinned_snapshots: only.len(),
            pinned_bytes: bytes,
            pinned_counted: counted,
        });
    }
    Ok(Json(
        json!({ "volume": v, "now-unix-ms": now, "holders": out }),
    ))
}

/// `/api/v1/locks`: every lock on the node (`volume=`, `holder=` to narrow), by volume, then
/// snapshot (oldest first), then holder.
pub(crate) async fn locks(State(s): Shared, page: Paging) -> Api<Json<Value>> {
    let page = paging(page)?.only("locks", false, true)?;
    let now = crate::now_unix_ms();
    let volume = match &page.volume {
        Some(v) => Some(volume_of(&s, v)?),
        None => None,
    };
    let holder: Option<crate::softlock::HolderId> = match &page.holder {
        Some(h) => Some(h.parse()?),
        None => None,
    };
    let sets: Vec<LockSet> = s.node().catalog.locks().sets(volume.as_ref())?;
    let mut all: Vec<&SoftLock> = sets
        .iter()
        .filter(|set| holder.as_ref().is_none_or(|h| &set.holder == h))
        .flat_map(|set| &set.locks)
        .collect();
    all.sort_by(|a, b| (&a.volume, a.snapshot, &a.holder).cmp(&(&b.volume, b.snapshot, &b.holder)));
    let snaps = match &volume {
        Some(v) => s.node().catalog.snapshots(v)?,
        None => vec![],
    };
    let names = names_of(&snaps);
    let (offset, limit) = page.window()?;
    let items: Vec<LockView> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|l| lock_view(l, &names, now))
        .collect();
    Ok(Json(page_of(all.len(), offset, limit, &items)))
}

/// `/api/v1/jobs`: the scheduled jobs (snapshots, mirrors, pushes, retention) with their last
/// and next runs and failures, the policies' failure counts, and gc.
pub(crate) async fn jobs(State(s): Shared, q: NoQuery) -> Api<Json<Value>> {
    no_params(q)?;
    let st = s.reporter().status()?;
    Ok(Json(json!({
        "now-unix-ms": st["now-unix-ms"],
        "jobs": st["jobs"],
        "policy-failures": st["policy-failures"],
        "gc": st["gc"],
        "config": st["config"],
    })))
}

/// This node's own relations (it is their downstream), from its mirror jobs; made at most
/// once a second (a downstream's `/v1/cascade` asks for them too), like `/metrics`.
fn own_edges(s: &ServerState, now: u64) -> Result<Vec<Edge>> {
    if let Some((at, edges)) = &*s.ui.own_edges.lock().expect("not poisoned")
        && at.elapsed() < OWN_EDGES_FRESH_FOR
    {
        return Ok(edges.clone());
    }
    let st = s.reporter().status()?;
    let me = &s.node().info.node_id;
    let mut out = Vec::new();
    for r in st["relations"].as_array().into_iter().flatten() {
        let (Some(volume), Some(upstream)) = (
            r["volume"].as_str().and_then(|v| v.parse().ok()),
            r["upstream"].as_str().and_then(|u| u.parse().ok()),
        ) else {
            continue;
        };
        let job = &r["job"];
        let own = OwnRelation {
            volume,
            upstream,
            newest_unix_ms: r["newest-unix-ms"].as_u64(),
            running: job["running"].as_bool().unwrap_or(false),
            last_ok: job["last-ok"].as_bool(),
            last_error: job["last-error"].as_str().map(str::to_string),
            last_finished_unix_ms: job["last-finished-unix-ms"].as_u64(),
        };
        out.push(own.edge(me, now));
    }
    *s.ui.own_edges.lock().expect("not poisoned") = Some((Instant::now(), out.clone()));
    Ok(out)
}

/// The edges below this node, from its downstreams' locks. Each downstream's lock set draws
/// at most its share of half the map, so one downstream cannot crowd out the others or what
/// lies above.
fn edges_below(s: &ServerState, now: u64) -> Result<Vec<Edge>> {
    let me = &s.node().info.node_id;
    let mut per_volume = Vec::new();
    for v in s.node().catalog.volumes()? {
        let sets = s.node().catalog.locks().sets(Some(&v.name))?;
        let sets: Vec<LockSet> = sets
            .into_iter()
            .filter(|s| s.locks.iter().any(|l| !l.path.is_empty()))
            .collect();
        if !sets.is_empty() {
            per_volume.push((v.name, sets));
        }
    }
    let holders: usize = per_volume.iter().map(|(_, sets)| sets.len()).sum();
    let share = ((cascade::MAX_EDGES / 2) / holders.max(1)).max(1);
    let mut out = Vec::new();
    for (volume, sets) in per_volume {
        let created: HashMap<SnapshotId, u64> = s
            .node()
            .catalog
            .snapshots(&volume)?
            .iter()
            .map(|r| (r.id, r.created_unix_ms))
            .collect();
        for set in &sets {
            let locks = set.locks.iter().map(|l| {
                (
                    l.path.as_slice(),
                    created.get(&l.snapshot).copied(),
                    l.is_stale(now),
                )
            });
            let mut edges = cascade::edges_below(me, &volume, locks, now);
            edges.truncate(share);
            out.extend(edges);
        }
    }
    Ok(out)
}

/// The upstreams' views of the cascade above them, for a question that came through `path`
/// (empty: this node's own page). Upstreams already on the path are not asked again, so two
/// nodes that mirror from each other end there. Views are reused for [`VIEWS_FRESH_FOR`],
/// keyed by which of this node's upstreams the path names (what decides whom it asks), and
/// the same question asked at once is asked upstream once. A question from a downstream
/// (`peer`) that must ask upstream takes one of [`PEER_VIEWS_AT_ONCE`] permits.
async fn upstream_views(
    s: &ServerState,
    path: &[NodeId],
    own: &[Edge],
    peer: bool,
) -> Result<UpstreamViews> {
    let me = s.node().info.node_id.clone();
    let clients = s.upstream_clients();
    let on_path: Vec<&str> = clients
        .iter()
        .map(|(n, _)| n)
        .filter(|n| path.contains(n))
        .map(|n| n.as_str())
        .collect();
    let key = on_path.join(",");
    let cached = || {
        s.ui.upstream_views
            .lock()
            .expect("not poisoned")
            .get(&key)
            .filter(|(at, _)| at.elapsed() < VIEWS_FRESH_FOR)
            .map(|(_, v)| v.clone())
    };
    if let Some(v) = cached() {
        return Ok(v);
    }
    let flight =
        s.ui.in_flight
            .lock()
            .expect("not poisoned")
            .entry(key.clone())
            .or_default()
            .clone();
    let _flight = flight.lock().await;
    if let Some(v) = cached() {
        return Ok(v);
    }
    let _permit = if peer {
        match s.ui.peer_views.try_acquire() {
            Ok(p) => Some(p),
            Err(_) => {
                return Err(Error::Unavailable {
                    message: "busy asking upstreams for other cascade views; ask again in a \
                              few seconds"
                        .into(),
                    source: None,
                });
            }
        }
    } else {
        None
    };
    let mut asked_path = path.to_vec();
    asked_path.push(me.clone());
    let asks = clients
        .iter()
        .filter(|(name, _)| !asked_path.contains(name))
        .map(|(name, client)| {
            let me = me.clone();
            let asked_path = &asked_path;
            // What this node mirrors from that upstream: all of its view it may show.
            let mirrored: BTreeSet<VolumeName> = own
                .iter()
                .filter(|e| &e.upstream == name)
                .map(|e| e.volume.clone())
                .collect();
            async move {
                let r = match client {
                    Ok(c) => c
                        .cascade(asked_path)
                        .await
                        .and_then(|v| v.checked(name, &me, &mirrored))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.clone()),
                };
                r.map_err(|error| Unreachable {
                    node: name.clone(),
                    asked_by: me,
                    error: cascade::bounded(&error),
                })
            }
        });
    let mut views: UpstreamViews = (vec![], vec![]);
    for r in futures::future::join_all(asks).await {
        match r {
            Ok(v) => {
                views.0.extend(v.edges);
                views.1.extend(v.unreachable);
            }
            Err(u) => views.1.push(u),
        }
    }
    views.0.truncate(cascade::MAX_EDGES);
    views.1.truncate(cascade::MAX_EDGES);
    let mut cache = s.ui.upstream_views.lock().expect("not poisoned");
    if cache.len() >= VIEWS_CACHED {
        cache.retain(|_, (at, _)| at.elapsed() < VIEWS_FRESH_FOR);
        if cache.len() >= VIEWS_CACHED {
            cache.clear();
        }
    }
    cache.insert(key, (Instant::now(), views.clone()));
    Ok(views)
}

/// `/api/v1/cascade`: the map (nodes with their depth, edges with lag and state, upstreams
/// that did not answer).
pub(crate) async fn cascade(State(s): Shared, q: NoQuery) -> Api<Json<cascade::CascadeMap>> {
    no_params(q)?;
    let now = crate::now_unix_ms();
    let own = own_edges(&s, now)?;
    let below = edges_below(&s, now)?;
    let (above, unreachable) = upstream_views(&s, &[], &own, false).await?;
    Ok(Json(cascade::map(
        &s.node().info.node_id,
        own,
        below,
        above,
        unreachable,
    )))
}

/// The nodes a `/v1/cascade` question came through ([`crate::peer::PATH_HEADER`]).
fn asked_path(headers: &HeaderMap) -> Result<Vec<NodeId>> {
    let Some(v) = headers.get(crate::peer::PATH_HEADER) else {
        return Ok(vec![]);
    };
    let v = v
        .to_str()
        .map_err(|_| Error::invalid("the cascade path is not text"))?;
    let path = v
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::parse)
        .collect::<Result<Vec<NodeId>>>()?;
    if path.len() > MAX_VIEW_PATH {
        return Err(Error::invalid(format!(
            "a cascade path of {} nodes; at most {MAX_VIEW_PATH} are read",
            path.len()
        )));
    }
    Ok(path)
}

/// `/v1/cascade`, for a downstream: the edges above this node, of the volumes that downstream
/// is granted (its own relation to this node it knows itself). Authenticated like every peer
/// request, but outside the peer's request slots (it waits on other nodes, and must never hold
/// up transfers). The path must end with the asking downstream; a node already on it, or a
/// path as long as a cascade can be deep, is answered without asking further up.
pub(crate) async fn cascade_for_peer(
    State(s): Shared,
    headers: HeaderMap,
) -> Api<Json<CascadeView>> {
    let peer = s.peer_light(&headers)?;
    let path = asked_path(&headers)?;
    if path.last() != Some(&peer.name) {
        return Err(Error::invalid(format!(
            "a cascade question from {} must name it last in its path",
            peer.name
        ))
        .into());
    }
    let me: NodeId = s.node().info.node_id.clone();
    let now = crate::now_unix_ms();
    let mut edges = own_edges(&s, now)?;
    let mut unreachable = vec![];
    if !path.contains(&me) && path.len() < crate::softlock::MAX_LOCK_PATH {
        let (above, u) = upstream_views(&s, &path, &edges, true).await?;
        edges.extend(above);
        unreachable = u;
    }
    edges.retain(|e| s.peer_may_see(&peer, &e.volume));
    edges.truncate(cascade::MAX_EDGES);
    // Only the upstreams of relations the downstream may see are named.
    let shown: BTreeSet<&NodeId> = edges.iter().map(|e| &e.upstream).collect();
    unreachable.retain(|u| shown.contains(&u.node));
    // A failure's message names addresses and paths of this node's own configuration: a
    // downstream learns that an edge fails, and where to look, not the details.
    for e in &mut edges {
        if e.error.is_some() {
            e.error = Some(format!("{} has the details", e.reported_by));
        }
    }
    for u in &mut unreachable {
        u.error = format!(
            "{} could not ask it; {} has the details",
            u.asked_by, u.asked_by
        );
    }
    Ok(Json(CascadeView {
        node: Some(me),
        edges,
        unreachable,
    }))
}
