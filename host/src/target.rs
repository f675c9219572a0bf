//! Mirror targets: a directory on another disk (`file:///PATH`) or an S3-compatible bucket
//! (`s3://BUCKET/PREFIX`), holding the same repository format as a node (through the same
//! [`Repository`] code over `object_store`). A target runs no holdfast code, so:
//!
//! - the node that pushes keeps the dependency: a `destination-path` lock (value: the target's
//!   URL) on the target's base in its own registry, which its retention and, through its
//!   lock sets, its upstreams honour; and a lock record inside the target;
//! - lock records live under `locks/VOLUME/HOLDER.json` (HOLDER hex-encoded), one object per
//!   holder and volume, rewritten only by that holder; every prune of the target honours them;
//! - concurrent writers need no lock between them (`host/TARGETS.md`): every object is
//!   written create-only (`If-None-Match: *`) under a name never used before; a pushed
//!   snapshot is visible once its manifest exists and its push's intent is gone
//!   (`pending.rs`); gc condemns unreferenced packs first and deletes them a grace period
//!   later, and no push relies on a condemned pack (`gc.rs`).
//!
//! Files: `url.rs` and `credentials.rs` (reaching a target), `index.rs` (its pack indexes, with
//! the node's cache), `sink.rs` (verified chunks into packs), `locks.rs` (lock records),
//! `push.rs` and `pending.rs` (pushing and committing), `pull.rs`, `gc.rs` (space) and
//! `maintenance.rs` (prune, verify).

use std::path::{Component, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::catalog::{SnapshotRecord, SnapshotStats};
use crate::error::{Error, Result};
use crate::id::{NodeId, SnapshotId, VolumeName, shorten, validate_name};
use crate::repo::{Repository, TARGET_FORMAT_VERSION};
use crate::snapshot::Manifest;
use crate::state::Node;
use credentials::profile_keys;

const TARGETS: TableDefinition<&str, &[u8]> = TableDefinition::new("targets");
/// (target name, pack id) → that pack's index as stored in the target (see [`load_index`]).
const TARGET_INDEX: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("target-index");
/// Chunks read and written per batch.
const BATCH: usize = 256;

mod credentials;
pub(crate) mod gc;
mod index;
pub(crate) mod locks;
mod maintenance;
pub(crate) mod pending;
mod pull;
mod push;
mod sink;
mod url;

pub use gc::{TargetGcReport, gc, grace, server_now};
pub use index::load_index;
pub use locks::{LockRecord, TargetLock, lock_records, locked, write_lock_record};
pub use maintenance::{TargetPruneReport, prune, verify};
pub use pending::{ClearedPush, Finished, PendingPush, PushView, clear_pending};
pub use pull::pull;
pub use push::{TransferReport, local_holder, push};
pub use sink::PackSink;
pub use url::{TargetUrl, parse_url};

/// A configured target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetRecord {
    pub name: String,
    pub url: String,
    /// An S3-compatible endpoint (`https://s3.example:9000`); AWS when absent.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Allow a plain-HTTP endpoint (never implied).
    #[serde(default)]
    pub allow_http: bool,
    /// A profile of an AWS shared credentials file (`--profile`); its keys are read when the
    /// target is opened, never stored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// That file (`--credentials-file`); else `AWS_SHARED_CREDENTIALS_FILE` or
    /// `~/.aws/credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    pub added_unix_ms: u64,
}

/// Opens a target's repository (nothing is read or written yet).
pub fn open(rec: &TargetRecord) -> Result<Repository> {
    match parse_url(&rec.url)? {
        TargetUrl::File(p) => {
            std::fs::create_dir_all(&p)
                .map_err(|e| Error::io(format!("creating target directory {}", p.display()), e))?;
            Ok(Repository::local(&p)?.with_format_version(TARGET_FORMAT_VERSION))
        }
        TargetUrl::S3 { bucket, prefix } => {
            use object_store::aws::AmazonS3Builder;
            crate::peer::tls::ensure_provider();
            // One request's timeout; retries (with back-off) stop after twice that.
            let timeout = match std::env::var("HOLDFAST_TARGET_TIMEOUT") {
                Ok(t) => crate::config::parse_duration("HOLDFAST_TARGET_TIMEOUT", &t)?,
                Err(_) => Duration::from_secs(120),
            };
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(&bucket)
                .with_allow_http(rec.allow_http)
                .with_retry(object_store::RetryConfig {
                    backoff: Default::default(),
                    max_retries: 5,
                    retry_timeout: timeout * 2,
                })
                .with_client_options(
                    object_store::ClientOptions::new()
                        .with_connect_timeout(timeout.min(Duration::from_secs(10)))
                        .with_timeout(timeout)
                        .with_allow_http(rec.allow_http),
                );
            if let Some(r) = &rec.region {
                b = b.with_region(r);
            } else if std::env::var_os("AWS_REGION").is_none()
                && std::env::var_os("AWS_DEFAULT_REGION").is_none()
            {
                b = b.with_region("us-east-1");
            }
            if let Some(e) = &rec.endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(k) = profile_keys(rec)? {
                b = b
                    .with_access_key_id(k.access_key_id)
                    .with_secret_access_key(k.secret_access_key);
                if let Some(t) = k.session_token {
                    b = b.with_token(t);
                }
            }
            let s3 = b.build().map_err(|e| {
                Error::invalid(format!(
                    "target {}: {e} (credentials come from --profile / --credentials-file, \
                     AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or \
                     AWS_PROFILE in ~/.aws/credentials)",
                    rec.name
                ))
            })?;
            let store: Arc<dyn object_store::ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix.as_str()))
            };
            // What the client does not retry (a body cut half-way, a reset while sending) is
            // retried around it, for as long as it may retry itself.
            let store: Arc<dyn object_store::ObjectStore> =
                Arc::new(crate::repo::retry::RetryStore::new(store, timeout * 2));
            let mut repo = Repository::from_store(store, rec.url.clone())
                .with_format_version(TARGET_FORMAT_VERSION);
            if let Ok(t) = std::env::var("HOLDFAST_TARGET_MULTIPART_THRESHOLD") {
                let bytes: bytesize::ByteSize = t.parse().map_err(|e| {
                    Error::invalid(format!(
                        "HOLDFAST_TARGET_MULTIPART_THRESHOLD={t:?}: {e} (say 8MiB)"
                    ))
                })?;
                repo = repo.with_multipart_threshold(bytes.as_u64() as usize);
            }
            Ok(repo)
        }
    }
}

/// The node's registered targets (a table in its catalog).
pub struct Targets<'n> {
    node: &'n Node,
}

impl<'n> Targets<'n> {
    pub fn new(node: &'n Node) -> Self {
        Targets { node }
    }

    pub fn list(&self) -> Result<Vec<TargetRecord>> {
        let tx = self.node.catalog.db().begin_read()?;
        let t = match tx.open_table(TARGETS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| {
                Error::corrupt(format!(
                    "catalog entry for target {} is unreadable: {e}",
                    k.value()
                ))
            })?);
        }
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<TargetRecord> {
        self.list()?.into_iter().find(|t| t.name == name).ok_or_else(|| {
            Error::not_found(format!(
                "no target named {:?}; `holdfast target list` shows them, `holdfast target add` \
                 adds one",
                shorten(name)
            ))
        })
    }

    /// Opens a registered target and checks that it holds a repository this holdfast reads.
    pub async fn open(&self, name: &str) -> Result<Repository> {
        let repo = open(&self.get(name)?)?;
        repo.check().await?;
        Ok(repo)
    }

    /// Checks the target (reachable, writable, a holdfast repository of this format, or empty
    /// and then initialised) and records it. Nothing is recorded if a check fails.
    pub async fn add(&self, rec: TargetRecord) -> Result<CheckReport> {
        validate_name("target name", &rec.name)?;
        parse_url(&rec.url)?;
        if let Some(e) = &rec.endpoint {
            let u = ::url::Url::parse(e)
                .map_err(|err| Error::invalid(format!("endpoint {:?}: {err}", shorten(e))))?;
            if u.scheme() == "http" && !rec.allow_http {
                return Err(Error::invalid(format!(
                    "endpoint {e} is plain HTTP; pass --allow-http to use it anyway (only for a \
                     test server or a trusted network)"
                )));
            }
        }
        if let Some(p) = &rec.profile {
            validate_name("credentials profile", p)?;
        }
        if matches!(parse_url(&rec.url)?, TargetUrl::File(_))
            && (rec.profile.is_some() || rec.credentials_file.is_some() || rec.endpoint.is_some())
        {
            return Err(Error::invalid(format!(
                "target {}: --endpoint, --profile and --credentials-file are for s3:// targets",
                rec.name
            )));
        }
        if self.list()?.iter().any(|t| t.name == rec.name) {
            return Err(Error::conflict(format!(
                "a target named {} exists; remove it first or choose another name",
                rec.name
            )));
        }
        let repo = open(&rec)?;
        let report = check_or_init(&repo, &rec, &self.node.info.node_id).await?;
        let tx = self.node.catalog.db().begin_write()?;
        {
            let mut t = tx.open_table(TARGETS)?;
            let bytes = serde_json::to_vec(&rec).map_err(|e| Error::internal(e.to_string()))?;
            t.insert(rec.name.as_str(), bytes.as_slice())?;
        }
        tx.commit()?;
        Ok(report)
    }

    /// Forgets a target (its objects are not touched).
    pub fn remove(&self, name: &str) -> Result<TargetRecord> {
        let rec = self.get(name)?;
        let tx = self.node.catalog.db().begin_write()?;
        {
            let mut t = tx.open_table(TARGETS)?;
            t.remove(name)?;
            let mut cache = tx.open_table(TARGET_INDEX)?;
            cache.retain(|(target, _), _| target != name)?;
        }
        tx.commit()?;
        Ok(rec)
    }
}

/// What `target check` found.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub target: String,
    pub url: String,
    pub format_version: u32,
    pub initialised_now: bool,
    pub writable: bool,
    pub snapshots: usize,
    pub packs: usize,
    /// Pushes that wrote an intent and have not finished: their snapshots stay hidden until
    /// the node that pushed finishes them (its next push of the volume), or the operator
    /// clears them (`holdfast target clear-pending`) for a node that is gone.
    pub pending_pushes: Vec<PendingPush>,
    /// Records of packs a gc condemned (deleted by a gc a grace period later).
    pub gc_records: usize,
    pub seconds: f64,
}

/// Reads the target's config (initialising an empty target), then proves it writable.
pub async fn check_or_init(
    repo: &Repository,
    rec: &TargetRecord,
    me: &NodeId,
) -> Result<CheckReport> {
    let t0 = Instant::now();
    let ctx = |e: Error| match e {
        Error::NotFound(_) => e,
        Error::InvalidInput(m) => Error::InvalidInput(format!("target {}: {m}", rec.name)),
        Error::Corrupt(m) => Error::Corrupt(format!("target {}: {m}", rec.name)),
        Error::Denied(m) => Error::Denied(format!("target {} ({}): {m}", rec.name, rec.url)),
        other => Error::Unavailable {
            message: format!("target {} ({}) is not usable: {other}", rec.name, rec.url),
            source: None,
        },
    };
    let (config, initialised_now) = match repo.check().await {
        Ok(c) => (c, false),
        Err(Error::NotFound(_)) => {
            let existing = repo.list_objects("").await.map_err(ctx)?;
            if !existing.is_empty() {
                return Err(Error::invalid(format!(
                    "target {} ({}) holds {} objects but no holdfast repository; use an empty \
                     bucket, prefix or directory",
                    rec.name,
                    rec.url,
                    existing.len()
                )));
            }
            (repo.init().await.map_err(ctx)?, true)
        }
        Err(e) => return Err(ctx(e)),
    };
    let probe = format!("probe/{me}-{:016x}", rand::random::<u64>());
    repo.put_object(&probe, b"holdfast write check".to_vec())
        .await
        .map_err(ctx)?;
    // The probe's time is the store's clock, by which pending pushes are aged (never by this
    // node's clock: it may be hours off).
    let now = gc::listed_time(repo, "probe", &probe).await;
    repo.delete_object(&probe).await.map_err(ctx)?;
    let now = now.map_err(ctx)?;
    let snapshots = pending::listed_manifests(repo).await.map_err(ctx)?.len();
    let packs = repo.list_packs().await.map_err(ctx)?.len();
    let pending_pushes = pending::pending_pushes(repo, now).await.map_err(ctx)?;
    let gc_records = repo.list_objects(gc::CONDEMNED).await.map_err(ctx)?.len();
    Ok(CheckReport {
        target: rec.name.clone(),
        url: rec.url.clone(),
        format_version: config.version,
        initialised_now,
        writable: true,
        snapshots,
        packs,
        pending_pushes,
        gc_records,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A target's committed snapshots of `volume`, oldest first, read from their manifests (a
/// snapshot whose push has not finished is not one: see `pending.rs`).
pub async fn snapshots(
    repo: &Repository,
    volume: &VolumeName,
) -> Result<Vec<(SnapshotRecord, bytes::Bytes)>> {
    let mut ids: Vec<SnapshotId> = pending::committed_ids(repo, volume)
        .await?
        .into_iter()
        .collect();
    ids.sort();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        // Pruned since it was listed (by another node, say): it is simply not there.
        let Some(raw) = pending::manifest_if_present(repo, volume, &id).await? else {
            continue;
        };
        let m = Manifest::decode(&raw, &format!("{volume}@{id} in {}", repo.location()))?;
        if m.id != id || &m.volume != volume {
            return Err(Error::corrupt(format!(
                "the manifest stored as {volume}@{id} in {} describes {}@{}",
                repo.location(),
                m.volume,
                m.id
            )));
        }
        out.push((m.record(SnapshotStats::default()), raw));
    }
    Ok(out)
}

/// Finds `r` (by name or id) among the target's snapshots.
pub async fn resolve(repo: &Repository, r: &crate::id::SnapshotRef) -> Result<SnapshotRecord> {
    let snaps: Vec<SnapshotRecord> = snapshots(repo, &r.volume)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    crate::catalog::resolve_in(&snaps, r)
}
