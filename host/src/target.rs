//! Mirror targets: a directory on another disk (`file:///PATH`) or an S3-compatible bucket
//! (`s3://BUCKET/PREFIX`), holding the same repository format as a node (through the same
//! [`Repository`] code over `object_store`). A target runs no holdfast code, so:
//!
//! - the node that pushes keeps the dependency: a `destination-path` lock (value: the target's
//!   URL) on the target's base in its own registry, which its retention and, through its
//!   lock sets, its upstreams honour; and a lock record inside the target;
//! - lock records live under `locks/VOLUME/HOLDER.json` (HOLDER hex-encoded), one object per
//!   holder and volume, rewritten only by that holder; every prune of the target honours them;
//! - concurrent writers coordinate with create-only writes (`If-None-Match: *`) and leases
//!   (see `host/TARGETS.md`): a snapshot is visible once its manifest exists, packs and
//!   manifests are never overwritten with different bytes, and `gc` runs only while no push
//!   holds a lease.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::catalog::{SnapshotRecord, SnapshotStats, VolumeRecord};
use crate::error::{Error, Result};
use crate::id::{ChunkId, NodeId, SnapshotId, VolumeName, shorten, validate_name};
use crate::repo::{ChunkIndex, Repository};
use crate::snapshot::Manifest;
use crate::softlock::{HolderId, LockType, NewLock};
use crate::state::Node;

const TARGETS: TableDefinition<&str, &[u8]> = TableDefinition::new("targets");
/// (target name, pack id) → that pack's index as stored in the target (see [`load_index`]).
const TARGET_INDEX: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("target-index");
/// Chunks read and written per batch.
const BATCH: usize = 256;
/// How long a push or gc lease lasts without being released.
const LEASE_MS: u64 = 3_600_000;

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

/// Keys read from an AWS shared credentials file.
struct ProfileKeys {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// Where a target's keys come from, in order: the target's own `--profile` /
/// `--credentials-file`; else `AWS_ACCESS_KEY_ID` and friends (left to `object_store`); else
/// the profile `AWS_PROFILE` (or `default`) of the shared credentials file, if that file
/// exists; else instance credentials (`object_store` again).
fn profile_keys(rec: &TargetRecord) -> Result<Option<ProfileKeys>> {
    let explicit = rec.profile.is_some() || rec.credentials_file.is_some();
    if !explicit && std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        return Ok(None);
    }
    let file = match (
        &rec.credentials_file,
        std::env::var_os("AWS_SHARED_CREDENTIALS_FILE"),
    ) {
        (Some(f), _) => f.clone(),
        (None, Some(f)) => PathBuf::from(f),
        (None, None) => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let profile = rec
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok())
        .unwrap_or_else(|| "default".into());
    let asked = explicit || std::env::var_os("AWS_PROFILE").is_some();
    let ini = match ini::Ini::load_from_file(&file) {
        Ok(i) => i,
        Err(ini::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound && !asked => {
            return Ok(None);
        }
        Err(e) => {
            return Err(Error::invalid(format!(
                "target {}: cannot read the credentials file {}: {e}",
                rec.name,
                file.display()
            )));
        }
    };
    let Some(sec) = ini.section(Some(profile.as_str())) else {
        if asked {
            return Err(Error::invalid(format!(
                "target {}: no profile [{profile}] in {}",
                rec.name,
                file.display()
            )));
        }
        return Ok(None);
    };
    let get = |k: &str| {
        sec.get(k)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Some(ProfileKeys {
            access_key_id,
            secret_access_key,
            session_token: get("aws_session_token"),
        })),
        _ => Err(Error::invalid(format!(
            "target {}: profile [{profile}] in {} lacks aws_access_key_id or aws_secret_access_key",
            rec.name,
            file.display()
        ))),
    }
}

/// Where a target's objects live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetUrl {
    File(PathBuf),
    S3 { bucket: String, prefix: String },
}

/// Parses and checks a target URL.
pub fn parse_url(url: &str) -> Result<TargetUrl> {
    let bad = |why: &str| Error::invalid(format!("target url {:?}: {why}", shorten(url)));
    if let Some(path) = url.strip_prefix("file://") {
        let p = PathBuf::from(path);
        if !p.is_absolute() {
            return Err(bad(
                "a file:// url needs an absolute path (file:///srv/backup)",
            ));
        }
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(bad("the path must not contain `..`"));
        }
        crate::id::validate_text("target path", path, 4096)?;
        return Ok(TargetUrl::File(p));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.contains("..");
        if !ok_bucket {
            return Err(bad(
                "the bucket name must be 3-63 characters of a-z, 0-9, `-` and `.`",
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        for part in prefix.split('/').filter(|p| !p.is_empty()) {
            validate_name("target prefix segment", part)?;
        }
        if prefix.split('/').any(str::is_empty) && !prefix.is_empty() {
            return Err(bad("the prefix has an empty segment (`//`)"));
        }
        return Ok(TargetUrl::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        });
    }
    Err(bad("use file:///PATH or s3://BUCKET/PREFIX"))
}

/// Opens a target's repository (nothing is read or written yet).
pub fn open(rec: &TargetRecord) -> Result<Repository> {
    match parse_url(&rec.url)? {
        TargetUrl::File(p) => {
            std::fs::create_dir_all(&p)
                .map_err(|e| Error::io(format!("creating target directory {}", p.display()), e))?;
            Repository::local(&p)
        }
        TargetUrl::S3 { bucket, prefix } => {
            use object_store::aws::AmazonS3Builder;
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
            let mut repo = Repository::from_store(store, rec.url.clone());
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
            let u = url::Url::parse(e)
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
    repo.delete_object(&probe).await.map_err(ctx)?;
    let snapshots = repo.list_manifests().await.map_err(ctx)?.len();
    let packs = repo.list_packs().await.map_err(ctx)?.len();
    Ok(CheckReport {
        target: rec.name.clone(),
        url: rec.url.clone(),
        format_version: config.version,
        initialised_now,
        writable: true,
        snapshots,
        packs,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A target's snapshots of `volume`, oldest first, read from their manifests.
pub async fn snapshots(
    repo: &Repository,
    volume: &VolumeName,
) -> Result<Vec<(SnapshotRecord, bytes::Bytes)>> {
    let mut ids: Vec<SnapshotId> = repo
        .list_manifests()
        .await?
        .into_iter()
        .filter(|(v, _)| v == volume)
        .map(|(_, id)| id)
        .collect();
    ids.sort();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        // Pruned since it was listed (by another node, say): it is simply not there.
        let Some(raw) = repo.read_manifest_if_present(volume, &id).await? else {
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

/// Remembers the indexes of packs this node stored in the target, so that its next push does
/// not read them back.
fn remember_indexes(
    node: &Node,
    rec: &TargetRecord,
    packs: &[crate::repo::pack::PackIndex],
) -> Result<()> {
    if packs.is_empty() {
        return Ok(());
    }
    let tx = node.catalog.db().begin_write()?;
    {
        let mut t = tx.open_table(TARGET_INDEX)?;
        for pi in packs {
            t.insert(
                (rec.name.as_str(), pi.pack.to_string().as_str()),
                pi.encode()?.as_slice(),
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The target's chunk index, reading only the pack indexes this node has not read before:
/// one LIST per 1,000 packs, then one GET per pack new since the last push or pull, so an
/// incremental push costs requests in proportion to the change, not to the target's size.
/// The cache lives in the node's catalog; what is no longer listed is dropped from it.
pub async fn load_index(
    node: &Node,
    rec: &TargetRecord,
    repo: &Repository,
) -> Result<(ChunkIndex, Vec<String>)> {
    let mut known = HashMap::new();
    {
        let tx = node.catalog.db().begin_read()?;
        match tx.open_table(TARGET_INDEX) {
            Ok(t) => {
                for row in t.range((rec.name.as_str(), "")..)? {
                    let (k, v) = row?;
                    let (target, pack) = k.value();
                    if target != rec.name {
                        break;
                    }
                    // A cache entry that does not decode is only read again from the target.
                    if let (Ok(id), Ok(pi)) = (
                        pack.parse(),
                        crate::repo::pack::PackIndex::decode(v.value(), "cached index"),
                    ) {
                        known.insert(id, pi);
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let before: HashSet<crate::id::PackId> = known.keys().copied().collect();
    let (index, problems, fresh) = repo.load_index_known(known).await?;
    let gone: Vec<String> = before
        .iter()
        .filter(|id| !index.packs.contains_key(id))
        .map(|id| id.to_string())
        .collect();
    if !fresh.is_empty() || !gone.is_empty() {
        let tx = node.catalog.db().begin_write()?;
        {
            let mut t = tx.open_table(TARGET_INDEX)?;
            for pi in &fresh {
                t.insert(
                    (rec.name.as_str(), pi.pack.to_string().as_str()),
                    pi.encode()?.as_slice(),
                )?;
            }
            for id in &gone {
                t.remove((rec.name.as_str(), id.as_str()))?;
            }
        }
        tx.commit()?;
    }
    Ok((index, problems))
}

// ---------------------------------------------------------------------------------------
// Lock records inside a target.

/// One holder's locks on one volume of a target (`locks/VOLUME/HOLDER.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LockRecord {
    pub holder: HolderId,
    pub volume: VolumeName,
    pub written_unix_ms: u64,
    pub locks: Vec<TargetLock>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetLock {
    pub snapshot: SnapshotId,
    #[serde(rename = "type")]
    pub lock_type: LockType,
    pub value: String,
}

fn lock_key(volume: &VolumeName, holder: &HolderId) -> String {
    let hex: String = holder
        .as_str()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("locks/{volume}/{hex}.json")
}

/// Every lock record of `volume` in the target.
pub async fn lock_records(repo: &Repository, volume: &VolumeName) -> Result<Vec<LockRecord>> {
    let mut out = Vec::new();
    for (key, _, _) in repo.list_objects(&format!("locks/{volume}")).await? {
        let Some(raw) = repo.get_object(&key).await? else {
            continue;
        };
        let rec: LockRecord = serde_json::from_slice(&raw).map_err(|e| {
            Error::corrupt(format!(
                "lock record {key} in {} is unreadable ({e}); prune refuses to guess, fix or \
                 remove it",
                repo.location()
            ))
        })?;
        out.push(rec);
    }
    Ok(out)
}

/// Replaces `holder`'s lock record for `volume` (an empty set removes it).
pub async fn write_lock_record(
    repo: &Repository,
    volume: &VolumeName,
    holder: &HolderId,
    locks: Vec<TargetLock>,
) -> Result<()> {
    let key = lock_key(volume, holder);
    if locks.is_empty() {
        return repo.delete_object(&key).await;
    }
    for l in &locks {
        crate::softlock::validate_value(&l.value)?;
    }
    let rec = LockRecord {
        holder: holder.clone(),
        volume: volume.clone(),
        written_unix_ms: crate::now_unix_ms(),
        locks,
    };
    repo.put_object(
        &key,
        serde_json::to_vec_pretty(&rec).map_err(|e| Error::internal(e.to_string()))?,
    )
    .await
}

/// Snapshot id → holders, from the target's lock records.
pub async fn locked(
    repo: &Repository,
    volume: &VolumeName,
) -> Result<HashMap<SnapshotId, Vec<HolderId>>> {
    let mut out: HashMap<SnapshotId, Vec<HolderId>> = HashMap::new();
    for r in lock_records(repo, volume).await? {
        for l in r.locks {
            out.entry(l.snapshot).or_default().push(r.holder.clone());
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Leases: pushes and gc exclude each other.

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Lease {
    owner: String,
    kind: String,
    expires_unix_ms: u64,
}

/// A held lease; release it with [`LeaseGuard::release`].
#[derive(Debug)]
pub struct LeaseGuard {
    key: String,
}

impl LeaseGuard {
    pub async fn release(self, repo: &Repository) -> Result<()> {
        repo.delete_object(&self.key).await
    }
}

/// The leases that are live, judged by the server's clock: `now` is the modification time of
/// our own lease (`own`, just written), a lease is live for [`LEASE_MS`] after its own.
/// An expired lease is deleted (a lease key is never written twice, so it cannot come back).
/// A lease that cannot be read counts as live and blocking (kind "unknown"): fail closed.
async fn live_leases(repo: &Repository, own: &str) -> Result<Vec<(String, Lease)>> {
    let listed = repo.list_objects("leases").await?;
    let now = listed
        .iter()
        .find(|(k, _, _)| k == own)
        .map_or_else(crate::now_unix_ms, |(_, _, t)| *t);
    let mut out = Vec::new();
    for (key, _, modified) in listed {
        if key == own {
            continue;
        }
        if modified + LEASE_MS < now {
            tracing::info!("removing expired lease {key}");
            repo.delete_object(&key).await?;
            continue;
        }
        let Some(raw) = repo.get_object(&key).await? else {
            continue;
        };
        match serde_json::from_slice::<Lease>(&raw) {
            Ok(l) => out.push((key, l)),
            Err(e) => {
                tracing::warn!("unreadable lease {key} ({e}): treated as held");
                out.push((
                    key.clone(),
                    Lease {
                        owner: format!(
                            "unknown (unreadable lease object {key}; delete it if no holdfast \
                             uses the target)"
                        ),
                        kind: "unknown".into(),
                        expires_unix_ms: modified + LEASE_MS,
                    },
                ));
            }
        }
    }
    Ok(out)
}

/// Fails unless our lease is still there (another node may have removed it as expired).
async fn still_leased(repo: &Repository, lease: &LeaseGuard) -> Result<()> {
    if repo.get_object(&lease.key).await?.is_some() {
        return Ok(());
    }
    Err(Error::Unavailable {
        message: format!(
            "our lease {} on {} is gone (it ran past {} minutes, or another node removed it); \
             stopped before committing anything more: run it again",
            lease.key,
            repo.location(),
            LEASE_MS / 60_000
        ),
        source: None,
    })
}

/// Writes a new lease of `kind` under its own key and returns the key.
async fn put_lease(repo: &Repository, me: &NodeId, kind: &str) -> Result<String> {
    let key = format!("leases/{kind}-{me}-{:016x}", rand::random::<u64>());
    let lease = Lease {
        owner: me.to_string(),
        kind: kind.into(),
        expires_unix_ms: crate::now_unix_ms() + LEASE_MS,
    };
    let body = serde_json::to_vec(&lease).map_err(|e| Error::internal(e.to_string()))?;
    repo.put_object(&key, body).await?;
    Ok(key)
}

/// Takes a push lease, waiting (up to `wait`) while a gc holds the target.
pub async fn lease_push(repo: &Repository, me: &NodeId, wait: Duration) -> Result<LeaseGuard> {
    let t0 = Instant::now();
    loop {
        let key = put_lease(repo, me, "push").await?;
        // Created first, then looked: a gc that looks after us sees our lease.
        let gc = live_leases(repo, &key)
            .await?
            .into_iter()
            .find(|(_, l)| l.kind != "push");
        let Some((_, gc)) = gc else {
            return Ok(LeaseGuard { key });
        };
        repo.delete_object(&key).await?;
        if t0.elapsed() >= wait {
            return Err(Error::Unavailable {
                message: format!(
                    "a gc by {} holds the target {}; push again when it is done",
                    gc.owner,
                    repo.location()
                ),
                source: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes a gc lease: refused while another gc or any push holds a lease. Like a push lease it
/// has a key of its own, created first and then looked around: of two gcs (or a gc and a push)
/// starting at once, at least one sees the other. Nothing is ever taken over, so a lease is
/// only ever deleted by its owner, or by anyone once it has expired (it cannot come back).
pub async fn lease_gc(repo: &Repository, me: &NodeId) -> Result<LeaseGuard> {
    let guard = LeaseGuard {
        key: put_lease(repo, me, "gc").await?,
    };
    let others = live_leases(repo, &guard.key).await?;
    if let Some((_, other)) = others.iter().find(|(_, l)| l.kind != "push") {
        let owner = other.owner.clone();
        guard.release(repo).await?;
        return Err(Error::conflict(format!(
            "a gc by {owner} is running on {}; wait for it",
            repo.location()
        )));
    }
    let pushes: Vec<String> = others
        .into_iter()
        .filter(|(_, l)| l.kind == "push")
        .map(|(_, l)| l.owner)
        .collect();
    if !pushes.is_empty() {
        guard.release(repo).await?;
        return Err(Error::Unavailable {
            message: format!(
                "pushes by {} are running on {}; gc again when they are done",
                pushes.join(", "),
                repo.location()
            ),
            source: None,
        });
    }
    Ok(guard)
}

// ---------------------------------------------------------------------------------------
// Moving chunks.

/// How many sealed packs upload at once while the next one fills.
/// (`HOLDFAST_TARGET_UPLOADS` sets it, 1 to 64.)
const UPLOADS_IN_FLIGHT: usize = 4;

fn uploads_in_flight() -> usize {
    std::env::var("HOLDFAST_TARGET_UPLOADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(UPLOADS_IN_FLIGHT, |n| n.clamp(1, 64))
}

/// Verified chunks go into packs of `repo`; each pack is durable before it is indexed.
/// Sealed packs upload in the background (up to [`UPLOADS_IN_FLIGHT`]) while the next one
/// fills; [`PackSink::seal`] returns only when every pack so far is durable, so a manifest
/// written after it never names a chunk that is not stored.
pub struct PackSink<'a> {
    repo: &'a Repository,
    index: &'a mut ChunkIndex,
    builder: crate::repo::pack::PackBuilder,
    /// Chunks in packs that are uploading (not yet in `index`).
    pending: HashSet<ChunkId>,
    uploads: tokio::task::JoinSet<Result<crate::repo::pack::PackIndex>>,
    /// The indexes of the packs this sink stored.
    pub stored: Vec<crate::repo::pack::PackIndex>,
    max_uploads: usize,
    pub stats: SnapshotStats,
}

impl<'a> PackSink<'a> {
    pub fn new(repo: &'a Repository, index: &'a mut ChunkIndex) -> Self {
        PackSink {
            repo,
            index,
            builder: Default::default(),
            pending: HashSet::new(),
            uploads: tokio::task::JoinSet::new(),
            stored: Vec::new(),
            max_uploads: uploads_in_flight(),
            stats: Default::default(),
        }
    }

    pub fn has(&self, id: &ChunkId) -> bool {
        self.index.contains(id) || self.pending.contains(id)
    }

    /// Adds a chunk that was verified against its id.
    pub async fn add(
        &mut self,
        id: ChunkId,
        encoding: crate::chunk::Encoding,
        stored: &[u8],
        raw_len: usize,
    ) -> Result<()> {
        self.stats.new_chunks += 1;
        self.stats.new_bytes += raw_len as u64;
        self.stats.new_stored_bytes += stored.len() as u64;
        self.builder.add(id, encoding, stored, raw_len);
        self.pending.insert(id);
        if self.builder.is_full() {
            self.start_upload().await?;
        }
        Ok(())
    }

    /// Seals the pack being filled and starts its upload, first waiting for a slot.
    async fn start_upload(&mut self) -> Result<()> {
        if self.builder.is_empty() {
            return Ok(());
        }
        while self.uploads.len() >= self.max_uploads {
            self.finish_one().await?;
        }
        let b = std::mem::take(&mut self.builder);
        let repo = self.repo.clone();
        self.uploads.spawn(async move {
            let pack = tokio::task::spawn_blocking(move || b.finish())
                .await
                .map_err(|e| Error::internal(format!("pack sealer failed: {e}")))??;
            repo.put_pack(&pack).await?;
            Ok(pack.index)
        });
        Ok(())
    }

    /// Waits for one upload; its chunks become indexed.
    async fn finish_one(&mut self) -> Result<()> {
        let Some(done) = self.uploads.join_next().await else {
            return Ok(());
        };
        let pi = done.map_err(|e| Error::internal(format!("pack upload failed: {e}")))??;
        for e in &pi.entries {
            self.pending.remove(&e.id);
        }
        self.stored.push(pi.clone());
        self.index.insert(pi);
        Ok(())
    }

    /// Makes everything added so far durable and indexed. On an error the other uploads
    /// are stopped (dropping the set aborts them; a multipart upload left behind is
    /// invisible and named by its content).
    pub async fn seal(&mut self) -> Result<()> {
        self.start_upload().await?;
        while !self.uploads.is_empty() {
            self.finish_one().await?;
        }
        Ok(())
    }
}

/// Copies the chunks of manifest `m` that `sink` lacks from `src`, verifying each.
async fn copy_chunks(
    src: &Repository,
    src_index: &ChunkIndex,
    m: &Manifest,
    sink: &mut PackSink<'_>,
    progress: &ProgressBar,
) -> Result<()> {
    let mut seen = HashSet::new();
    let needed: Vec<ChunkId> = m
        .blocks
        .iter()
        .flatten()
        .filter(|id| !sink.has(id) && seen.insert(**id))
        .copied()
        .collect();
    progress.inc_length(needed.len() as u64);
    for batch in needed.chunks(BATCH) {
        let read = src.read_chunks(src_index, batch).await?;
        let ids = batch.to_vec();
        // Every chunk is verified against its id before it is written anywhere.
        let verified = tokio::task::spawn_blocking(move || -> Result<_> {
            use rayon::prelude::*;
            ids.par_iter()
                .zip(read.par_iter())
                .try_for_each(|(id, (loc, data))| {
                    crate::chunk::decode(id, loc.encoding, data, loc.raw_length as usize)
                        .map(|_| ())
                })?;
            Ok((ids, read))
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
        for (id, (loc, data)) in verified.0.iter().zip(&verified.1) {
            sink.add(*id, loc.encoding, data, loc.raw_length as usize)
                .await?;
            progress.inc(1);
        }
    }
    sink.seal().await
}

/// What a push or a pull did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TransferReport {
    pub volume: VolumeName,
    pub target: String,
    pub kind: crate::mirror::TransferKind,
    pub base: Option<String>,
    pub transferred: Vec<String>,
    pub chunks: u64,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    pub seconds: f64,
}

/// The holder of a node's target locks in its own registry: `app:target.NAME`.
pub fn local_holder(target: &str) -> Result<HolderId> {
    HolderId::application(&format!("target.{target}"))
}

/// Sets the node's own lock for the target's base (replacing the previous one).
fn lock_base_locally(
    node: &Node,
    rec: &TargetRecord,
    volume: &VolumeName,
    base: Option<SnapshotId>,
) -> Result<()> {
    let holder = local_holder(&rec.name)?;
    node.catalog.locks().replace_own_set(
        volume,
        holder,
        base.into_iter()
            .map(|snapshot| NewLock {
                snapshot,
                lock_type: LockType::DestinationPath,
                value: rec.url.clone(),
                lease_ms: None,
                path: vec![node.info.node_id.clone()],
            })
            .collect(),
    )?;
    Ok(())
}

/// Pushes the node's snapshots of `volume` that are newer than the target's newest.
pub async fn push(
    node: &Node,
    rec: &TargetRecord,
    volume: &VolumeName,
    progress: &ProgressBar,
) -> Result<TransferReport> {
    let t0 = Instant::now();
    let repo = open(rec)?;
    // A push writes format-2 manifests: a version-1 target is marked version 2 first.
    repo.check_for_writing().await?;
    let ours = node.catalog.snapshots(volume)?;
    node.catalog.volume(volume)?;
    // One push of a volume at a time from this node (the daemon's [[push]] and a CLI run).
    let _volume_lock = crate::mirror::lock_volume(node, volume).await?;
    let lease = lease_push(&repo, &node.info.node_id, Duration::from_secs(60)).await?;
    let result = push_leased(node, rec, &repo, &lease, volume, &ours, progress).await;
    let released = lease.release(&repo).await;
    let mut report = result?;
    released?;
    report.seconds = t0.elapsed().as_secs_f64();
    tracing::info!(volume = %volume, target = %rec.name, kind = %report.kind, snapshots = report.transferred.len(), stored_bytes = report.stored_bytes, seconds = report.seconds, outcome = "ok", "push");
    Ok(report)
}

async fn push_leased(
    node: &Node,
    rec: &TargetRecord,
    repo: &Repository,
    lease: &LeaseGuard,
    volume: &VolumeName,
    ours: &[SnapshotRecord],
    progress: &ProgressBar,
) -> Result<TransferReport> {
    let theirs: HashSet<SnapshotId> = repo
        .list_manifests()
        .await?
        .into_iter()
        .filter(|(v, _)| v == volume)
        .map(|(_, id)| id)
        .collect();
    let base = ours.iter().rev().find(|s| theirs.contains(&s.id));
    let holder = HolderId::mirror(&node.info.node_id, volume);
    let record_of = |id: SnapshotId| {
        vec![TargetLock {
            snapshot: id,
            lock_type: LockType::DestinationPath,
            value: rec.url.clone(),
        }]
    };
    // Before: the base stays, here and in the target.
    lock_base_locally(node, rec, volume, base.map(|b| b.id))?;
    if let Some(b) = base {
        write_lock_record(repo, volume, &holder, record_of(b.id)).await?;
    }
    let newest_theirs = theirs.iter().max().copied();
    let wanted: Vec<&SnapshotRecord> = ours
        .iter()
        .filter(|s| newest_theirs.is_none_or(|n| s.id > n))
        .collect();
    let kind = match (wanted.is_empty(), base.is_some() || !theirs.is_empty()) {
        (true, _) => crate::mirror::TransferKind::UpToDate,
        (false, false) => crate::mirror::TransferKind::Baseline,
        (false, true) => crate::mirror::TransferKind::Incremental,
    };
    let mut report = TransferReport {
        volume: volume.clone(),
        target: rec.name.clone(),
        kind,
        base: base.map(|b| b.display_ref()),
        transferred: vec![],
        chunks: 0,
        plain_bytes: 0,
        stored_bytes: 0,
        seconds: 0.0,
    };
    if !wanted.is_empty() {
        let _repo_lock = node.lock_repo_shared().await?;
        let (local_index, _) = node.load_index().await?;
        let (mut target_index, problems) = load_index(node, rec, repo).await?;
        for p in problems {
            tracing::warn!("{p}; its chunks will be pushed again");
        }
        let mut sink = PackSink::new(repo, &mut target_index);
        for s in &wanted {
            let raw = node.repo.read_manifest(volume, &s.id).await?;
            let m = Manifest::decode(&raw, &s.display_ref())?;
            copy_chunks(&node.repo, &local_index, &m, &mut sink, progress).await?;
            // Without our lease a gc may have run: the chunks could be gone. Commit nothing.
            still_leased(repo, lease).await?;
            match repo.put_manifest(volume, &s.id, raw.to_vec()).await {
                Ok(()) | Err(Error::Conflict(_)) => {} // another pusher of the same snapshot
                Err(e) => return Err(e),
            }
            report.transferred.push(s.display_ref());
        }
        remember_indexes(node, rec, &sink.stored)?;
        report.chunks = sink.stats.new_chunks;
        report.plain_bytes = sink.stats.new_bytes;
        report.stored_bytes = sink.stats.new_stored_bytes;
    }
    // After: the new base replaces the old one.
    if let Some(newest) = ours.last().filter(|_| !wanted.is_empty()).or(base) {
        write_lock_record(repo, volume, &holder, record_of(newest.id)).await?;
        lock_base_locally(node, rec, volume, Some(newest.id))?;
    }
    Ok(report)
}

/// Copies the target's snapshots of `volume` newer than the node's newest into the node,
/// seeding a replica (on a new node, say, before normal mirroring continues).
pub async fn pull(
    node: &Node,
    rec: &TargetRecord,
    volume: &VolumeName,
    progress: &ProgressBar,
) -> Result<TransferReport> {
    let t0 = Instant::now();
    let repo = open(rec)?;
    repo.check().await?;
    let theirs = snapshots(&repo, volume).await?;
    let marker = format!("seeded from target {}", rec.name);
    match node.catalog.volume(volume) {
        Ok(v) if v.upstream.is_some() => {}
        Ok(_) => {
            return Err(Error::conflict(format!(
                "volume {volume} is a local volume on this node; pull into another name"
            )));
        }
        Err(Error::NotFound(_)) => {
            let Some((first, _)) = theirs.first() else {
                return Err(Error::not_found(format!(
                    "target {} has no snapshot of {volume}",
                    rec.name
                )));
            };
            node.catalog.add_volume(&VolumeRecord {
                name: volume.clone(),
                image: Default::default(),
                block_size: first.block_size,
                added_unix_ms: crate::now_unix_ms(),
                upstream: Some(marker),
            })?;
        }
        Err(e) => return Err(e),
    }
    let ours = node.catalog.snapshots(volume)?;
    let newest = ours.last().map(|s| s.id);
    let wanted: Vec<&(SnapshotRecord, bytes::Bytes)> = theirs
        .iter()
        .filter(|(s, _)| newest.is_none_or(|n| s.id > n))
        .collect();
    let mut report = TransferReport {
        volume: volume.clone(),
        target: rec.name.clone(),
        kind: if wanted.is_empty() {
            crate::mirror::TransferKind::UpToDate
        } else if ours.is_empty() {
            crate::mirror::TransferKind::Baseline
        } else {
            crate::mirror::TransferKind::Incremental
        },
        base: ours.last().map(|s| s.display_ref()),
        transferred: vec![],
        chunks: 0,
        plain_bytes: 0,
        stored_bytes: 0,
        seconds: 0.0,
    };
    if !wanted.is_empty() {
        let _repo_lock = node.lock_repo_shared().await?;
        let (target_index, _) = load_index(node, rec, &repo).await?;
        let (mut local_index, _) = node.load_index().await?;
        for (s, raw) in wanted {
            let m = Manifest::decode(raw, &s.display_ref())?;
            let mut sink = PackSink::new(&node.repo, &mut local_index);
            copy_chunks(&repo, &target_index, &m, &mut sink, progress).await?;
            let stats = SnapshotStats {
                blocks: m.blocks.len() as u64,
                zero_blocks: m.blocks.iter().filter(|b| b.is_none()).count() as u64,
                ..sink.stats.clone()
            };
            report.chunks += stats.new_chunks;
            report.plain_bytes += stats.new_bytes;
            report.stored_bytes += stats.new_stored_bytes;
            node.repo.put_manifest(volume, &s.id, raw.to_vec()).await?;
            if let Err(e) = node.catalog.commit_snapshot(&m.record(stats)) {
                let _ = node.repo.delete_manifest(volume, &s.id).await;
                return Err(e);
            }
            report.transferred.push(s.display_ref());
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// Retention and space reclamation inside a target.

/// What a prune of a target did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetPruneReport {
    pub dry_run: bool,
    pub plan: crate::retention::PrunePlan,
    pub pruned: Vec<String>,
    pub locked_meanwhile: Vec<String>,
}

/// Retention inside a target, honouring its lock records (re-read before each deletion).
pub async fn prune(
    repo: &Repository,
    volume: &VolumeName,
    rules: &crate::retention::KeepRules,
    dry_run: bool,
) -> Result<TargetPruneReport> {
    repo.check().await?;
    let snaps: Vec<SnapshotRecord> = snapshots(repo, volume)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let locks = locked(repo, volume).await?;
    let plan =
        crate::retention::PrunePlan::compute(volume, &snaps, &locks, rules, crate::now_unix_ms())?;
    let mut report = TargetPruneReport {
        dry_run,
        plan,
        pruned: vec![],
        locked_meanwhile: vec![],
    };
    if dry_run {
        return Ok(report);
    }
    for e in report.plan.entries.iter().filter(|e| e.prune) {
        if locked(repo, volume).await?.contains_key(&e.id) {
            report.locked_meanwhile.push(e.snapshot.clone());
            continue;
        }
        repo.delete_manifest(volume, &e.id).await?;
        report.pruned.push(e.snapshot.clone());
    }
    Ok(report)
}

/// What a gc of a target did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetGcReport {
    pub dry_run: bool,
    pub snapshots: usize,
    pub live_chunks: usize,
    pub packs_deleted: usize,
    pub bytes_freed: u64,
    pub packs_kept_partly_live: usize,
}

/// Deletes the target's packs that no manifest references (whole packs; a partly live pack
/// stays). Runs under the gc lease, so no push is between writing packs and their manifest.
pub async fn gc(repo: &Repository, me: &NodeId, dry_run: bool) -> Result<TargetGcReport> {
    repo.check().await?;
    let lease = lease_gc(repo, me).await?;
    let r = gc_leased(repo, &lease, dry_run).await;
    let released = lease.release(repo).await;
    let r = r?;
    released?;
    Ok(r)
}

async fn gc_leased(repo: &Repository, lease: &LeaseGuard, dry_run: bool) -> Result<TargetGcReport> {
    let mut live: HashSet<ChunkId> = HashSet::new();
    let manifests = repo.list_manifests().await?;
    for (v, id) in &manifests {
        // Pruned since the listing: its chunks are no longer referenced by it.
        let Some(raw) = repo.read_manifest_if_present(v, id).await? else {
            continue;
        };
        // A manifest that cannot be read could reference anything: stop before deleting.
        let m = Manifest::decode(&raw, &format!("{v}@{id} in {}", repo.location()))?;
        live.extend(m.blocks.iter().flatten().copied());
    }
    let (index, problems) = repo.load_index().await?;
    if !problems.is_empty() {
        return Err(Error::corrupt(format!(
            "gc stopped before deleting anything: {}",
            problems.join("; ")
        )));
    }
    let mut report = TargetGcReport {
        dry_run,
        snapshots: manifests.len(),
        live_chunks: live.len(),
        ..Default::default()
    };
    // Before deleting: still ours, and no push slipped in (it would have seen our lease).
    still_leased(repo, lease).await?;
    if let Some((_, l)) = live_leases(repo, &lease.key).await?.first() {
        return Err(Error::Unavailable {
            message: format!(
                "a {} by {} is running on {} since gc started; nothing was deleted, gc again \
                 later",
                l.kind,
                l.owner,
                repo.location()
            ),
            source: None,
        });
    }
    let sizes: BTreeMap<crate::id::PackId, u64> = repo.list_packs().await?.into_iter().collect();
    for (pack, pi) in &index.packs {
        if pi.entries.iter().any(|e| live.contains(&e.id)) {
            report.packs_kept_partly_live +=
                usize::from(pi.entries.iter().any(|e| !live.contains(&e.id)));
            continue;
        }
        report.packs_deleted += 1;
        report.bytes_freed += sizes.get(pack).copied().unwrap_or(0);
        if !dry_run {
            repo.delete_pack(pack).await?;
        }
    }
    Ok(report)
}

/// Verifies every snapshot in the target (every chunk re-read and re-hashed).
pub async fn verify(
    repo: &Repository,
    progress: &ProgressBar,
) -> Result<crate::snapshot::VerifyReport> {
    repo.check().await?;
    let mut snaps = Vec::new();
    let mut volumes: Vec<VolumeName> = repo
        .list_manifests()
        .await?
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    volumes.sort();
    volumes.dedup();
    for v in volumes {
        snaps.extend(snapshots(repo, &v).await?.into_iter().map(|(s, _)| s));
    }
    crate::snapshot::verify::verify_snapshots(repo, &snaps, progress).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_url("s3://my-bucket/a/b").unwrap(),
            TargetUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            parse_url("file:///srv/x").unwrap(),
            TargetUrl::File("/srv/x".into())
        );
        for bad in [
            "s3://A/x",
            "s3://ab",
            "s3://bucket/../x",
            "s3://bucket/a//b",
            "file://relative/x",
            "file:///srv/../etc",
            "http://bucket",
            "s3://bucket/a\0b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lock_keys_are_plain() {
        let k = lock_key(&"v".parse().unwrap(), &"app:x".parse().unwrap());
        assert_eq!(k, "locks/v/6170703a78.json");
        let k = lock_key(&"v".parse().unwrap(), &"b/v".parse().unwrap());
        assert!(k.starts_with("locks/v/") && !k["locks/v/".len()..].contains('/'));
    }
}
