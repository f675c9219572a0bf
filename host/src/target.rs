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
use crate::repo::sealed::Cipher;
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
pub mod keys;
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
    /// Present for an encrypted target: where this node finds its secret (a key file, a
    /// passphrase file, or else `HOLDFAST_PASSPHRASE` or a prompt). Never the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<keys::KeySource>,
    /// An encrypted target's repository id when it was added: another repository at its URL
    /// (one encrypted with the same secret, copied there by someone) is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_id: Option<String>,
}

/// Opens a target's repository: reads its config and, for an encrypted target, opens its key
/// with this node's secret (once per process).
pub async fn open(rec: &TargetRecord) -> Result<Repository> {
    let (repo, unlocked) = open_unlocking(rec).await?;
    unlocked.await?;
    Ok(repo)
}

/// The opening of an encrypted target's key: it fails as [`open`] would have.
pub type Unlocking = futures::future::BoxFuture<'static, Result<()>>;

/// [`open`], returning before an encrypted target's key is open: requests that need no key go
/// out while Argon2id runs. Await the [`Unlocking`] (joined with the requests) for its error.
pub async fn open_unlocking(rec: &TargetRecord) -> Result<(Repository, Unlocking)> {
    let plain = open_plain(rec)?;
    let config = plain.check().await.map_err(|e| match e {
        Error::NotFound(m) => Error::NotFound(format!("target {}: {m}", rec.name)),
        other => other,
    })?;
    start_unlock(plain, rec, &config, false)
}

/// Encrypted targets' object keys opened so far in this process, by URL and repository id.
static UNLOCKED: std::sync::Mutex<Vec<(String, String, crate::repo::sealed::ObjectKey)>> =
    std::sync::Mutex::new(Vec::new());

/// The repository as this node must use it: sealed with the target's key if its config says it
/// is encrypted. Refused: a target registered as encrypted whose config says otherwise, or
/// whose repository is another than the one registered (its config, or all of it, was
/// replaced: trusting it would trust whoever did that); an encrypted target registered as
/// plain, unless it is being added (`adding`).
async fn unlock(
    plain: Repository,
    rec: &TargetRecord,
    config: &crate::repo::RepoConfig,
    adding: bool,
) -> Result<Repository> {
    let (repo, unlocked) = start_unlock(plain, rec, config, adding)?;
    unlocked.await?;
    Ok(repo)
}

/// [`unlock`], the key opened by a task of its own: the repository at once, and the opening.
fn start_unlock(
    plain: Repository,
    rec: &TargetRecord,
    config: &crate::repo::RepoConfig,
    adding: bool,
) -> Result<(Repository, Unlocking)> {
    let done: Unlocking = Box::pin(async { Ok(()) });
    let Some(enc) = &config.encryption else {
        if rec.encryption.is_some() {
            return Err(Error::corrupt(format!(
                "target {} ({}) was registered as encrypted, but its config says it is not: \
                 it was replaced by someone; nothing is read from or written to it in the clear",
                rec.name, rec.url
            )));
        }
        return Ok((plain, done));
    };
    if let Some(id) = &rec.repository_id
        && *id != config.id
    {
        return Err(Error::corrupt(format!(
            "target {} ({}) now holds another repository (id {}) than the encrypted one this \
             node registered (id {id}): it was replaced by someone, or the URL now points \
             elsewhere; nothing is read from or written to it",
            rec.name,
            rec.url,
            shorten(&config.id)
        )));
    }
    let source = match (&rec.encryption, adding) {
        (Some(s), _) => s.clone(),
        (None, true) => keys::KeySource::default(),
        (None, false) => {
            return Err(Error::invalid(format!(
                "target {} ({}) is encrypted, but this node registered it unencrypted; remove it \
                 and add it again with --key-file or --passphrase-file",
                rec.name, rec.url
            )));
        }
    };
    let known = UNLOCKED
        .lock()
        .expect("not poisoned")
        .iter()
        .find(|(u, id, _)| *u == rec.url && *id == config.id)
        .map(|(_, _, k)| k.clone());
    if let Some(k) = known {
        return Ok((plain.sealed(k), done));
    }
    let cipher = enc.cipher(&rec.name)?;
    let secret = source.secret(&format!("target {}", rec.name), false)?;
    let (enc, id, name) = (enc.clone(), config.id.clone(), rec.name.clone());
    let (tx, rx) = tokio::sync::watch::channel(None);
    let rec = rec.clone();
    // Argon2id takes a fifth of a second and 64 MiB: not on the runtime's threads, and in a
    // task of its own, so it goes on whoever waits (the store's requests, the caller).
    let task = tokio::spawn(async move {
        let repo_id = id.clone();
        let opened = tokio::task::spawn_blocking(move || keys::unlock(&enc, &id, &secret, &name))
            .await
            .map_err(|e| Error::internal(format!("opening the key failed: {e}")))
            .and_then(|r| r);
        match opened {
            Ok((master, _)) => {
                let k = master.object_key(cipher);
                remember(&rec, &repo_id, k.clone());
                tx.send_replace(Some(Ok(std::sync::Arc::new(k))));
                Ok(())
            }
            Err(e) => {
                tx.send_replace(Some(Err(e.to_string())));
                Err(e)
            }
        }
    });
    let unlocked: Unlocking = Box::pin(async move {
        task.await
            .map_err(|e| Error::internal(format!("opening the key failed: {e}")))?
    });
    Ok((plain.sealed_unlocking(rx), unlocked))
}

fn remember(rec: &TargetRecord, repo_id: &str, key: crate::repo::sealed::ObjectKey) {
    UNLOCKED
        .lock()
        .expect("not poisoned")
        .push((rec.url.clone(), repo_id.to_string(), key));
}

/// Opens a target's store as it is (nothing is read or written yet; an encrypted target's
/// objects are then sealed bytes: see [`open`]).
pub fn open_plain(rec: &TargetRecord) -> Result<Repository> {
    match parse_url(&rec.url)? {
        TargetUrl::File(p) => {
            std::fs::create_dir_all(&p)
                .map_err(|e| Error::io(format!("creating target directory {}", p.display()), e))?;
            Ok(Repository::local(&p)?.with_format_version(TARGET_FORMAT_VERSION))
        }
        TargetUrl::S3 { bucket, prefix } => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
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
                });
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
            // A plain-HTTP endpoint with static credentials makes no TLS connection at all:
            // the system's trust store (hundreds of files) is then not read, which was a
            // tenth of a restore's start. Any other credentials may be fetched over HTTPS.
            let static_keys = [
                AmazonS3ConfigKey::AccessKeyId,
                AmazonS3ConfigKey::SecretAccessKey,
            ]
            .iter()
            .all(|k| b.get_config_value(k).is_some());
            // The endpoint requests go to (an S3-specific one from the environment first).
            let plain_http = b
                .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
                .or_else(|| b.get_config_value(&AmazonS3ConfigKey::Endpoint))
                .and_then(|e| ::url::Url::parse(&e).ok())
                .is_some_and(|u| u.scheme() == "http")
                && b.get_config_value(&AmazonS3ConfigKey::S3Express)
                    .is_none_or(|v| v != "true");
            b = b.with_client_options(
                object_store::ClientOptions::new()
                    .with_connect_timeout(timeout.min(Duration::from_secs(10)))
                    .with_timeout(timeout)
                    .with_allow_http(rec.allow_http)
                    .with_no_system_certificates(plain_http && static_keys),
            );
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
        open(&self.get(name)?).await
    }

    /// Checks the target (reachable, writable, a holdfast repository of this format, or empty
    /// and then initialised) and records it. Nothing is recorded if a check fails.
    /// `encrypt`: an empty target is made encrypted (`--encrypt`), sealed with `cipher` (by
    /// default [`Cipher::preferred`]); then, or with a key source in `rec`, a target found
    /// unencrypted is refused. A `cipher` other than an existing target's is refused.
    pub async fn add(
        &self,
        mut rec: TargetRecord,
        encrypt: bool,
        cipher: Option<Cipher>,
    ) -> Result<CheckReport> {
        if cipher.is_some() && !encrypt {
            return Err(Error::invalid(
                "--cipher chooses how a new encrypted target is sealed; give --encrypt with it",
            ));
        }
        if encrypt {
            rec.encryption.get_or_insert_default();
        }
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
        let report = check_or_init(
            &rec,
            &self.node.info.node_id,
            Checking::Adding { encrypt, cipher },
        )
        .await?;
        if report.encrypted {
            rec.encryption.get_or_insert_default();
            rec.repository_id = Some(report.repository_id.clone());
        }
        self.store(&rec)?;
        Ok(report)
    }

    fn store(&self, rec: &TargetRecord) -> Result<()> {
        let tx = self.node.catalog.db().begin_write()?;
        {
            let mut t = tx.open_table(TARGETS)?;
            let bytes = serde_json::to_vec(rec).map_err(|e| Error::internal(e.to_string()))?;
            t.insert(rec.name.as_str(), bytes.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// An encrypted target's record, its store as it is, its config and its encryption.
    async fn encrypted(
        &self,
        name: &str,
    ) -> Result<(
        TargetRecord,
        Repository,
        crate::repo::RepoConfig,
        keys::Encryption,
    )> {
        let rec = self.get(name)?;
        if rec.encryption.is_none() {
            return Err(Error::invalid(format!(
                "target {name} is not encrypted: it has no key slots"
            )));
        }
        let plain = open_plain(&rec)?;
        let config = plain.check().await?;
        let Some(enc) = config.encryption.clone() else {
            // Refused as `open` refuses it.
            return Err(unlock(plain, &rec, &config, false)
                .await
                .expect_err("a plain config"));
        };
        Ok((rec, plain, config, enc))
    }

    /// The key slots of an encrypted target (read from its config; no secret is needed).
    pub async fn key_slots(&self, name: &str) -> Result<Vec<keys::KeySlot>> {
        Ok(self.encrypted(name).await?.3.slots)
    }

    /// Adds a key slot opened by `new` (this node's own secret opens the master key first).
    /// With `use_it`, this node opens the target with the new secret from now on.
    pub async fn add_key(
        &self,
        name: &str,
        new: keys::KeySource,
        use_it: bool,
    ) -> Result<keys::KeySlot> {
        let (mut rec, plain, config, enc) = self.encrypted(name).await?;
        let source = rec.encryption.clone().unwrap_or_default();
        let secret = source.secret(&format!("target {name}"), false)?;
        let (master, _) = keys::unlock(&enc, &config.id, &secret, name)?;
        let new_secret = new.new_secret(&format!("the new key slot of target {name}"))?;
        let slot = keys::new_slot(&master, &new_secret, &config.id, enc.cipher(name)?)?;
        let added = slot.clone();
        plain
            .replace_config(|c| {
                if c.id != config.id {
                    return Err(Error::conflict(format!(
                        "target {name} was replaced while its key slots were being changed"
                    )));
                }
                let enc = c.encryption.as_mut().ok_or_else(|| {
                    Error::corrupt(format!("target {name} is no longer encrypted"))
                })?;
                if enc.slots.len() >= keys::MAX_SLOTS {
                    return Err(Error::invalid(format!(
                        "target {name} has {} key slots, the most it may have; remove one first",
                        enc.slots.len()
                    )));
                }
                enc.slots.push(slot);
                Ok(())
            })
            .await?;
        if use_it {
            rec.encryption = Some(new);
            self.store(&rec)?;
        }
        Ok(added)
    }

    /// Removes a key slot: never the last one, nor the one this node opens the target with
    /// (that would lock this node out; `add_key` with `use_it` switches first).
    pub async fn remove_key(&self, name: &str, slot_id: &str) -> Result<keys::KeySlot> {
        let (rec, plain, config, enc) = self.encrypted(name).await?;
        let Some(removed) = enc.slots.iter().find(|s| s.id == slot_id).cloned() else {
            return Err(Error::not_found(format!(
                "target {name} has no key slot {:?}; `holdfast target key list {name}` shows them",
                shorten(slot_id)
            )));
        };
        if enc.slots.len() == 1 {
            return Err(Error::invalid(format!(
                "slot {slot_id} is the last key slot of target {name}; without it nothing opens \
                 the target. Add another first (`holdfast target key add {name}`)"
            )));
        }
        let secret = rec
            .encryption
            .clone()
            .unwrap_or_default()
            .secret(&format!("target {name}"), false)?;
        let (_, mine) = keys::unlock(&enc, &config.id, &secret, name)?;
        if mine == slot_id {
            return Err(Error::invalid(format!(
                "this node opens target {name} with slot {slot_id}; add another secret with \
                 `holdfast target key add {name} --use ...` first, then remove this one"
            )));
        }
        plain
            .replace_config(|c| {
                let enc = c.encryption.as_mut().ok_or_else(|| {
                    Error::corrupt(format!("target {name} is no longer encrypted"))
                })?;
                enc.slots.retain(|s| s.id != slot_id);
                if enc.slots.is_empty() || c.id != config.id {
                    return Err(Error::conflict(format!(
                        "target {name} changed while its key slots were being changed"
                    )));
                }
                Ok(())
            })
            .await?;
        Ok(removed)
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
    /// The repository's id (its config's).
    pub repository_id: String,
    pub initialised_now: bool,
    pub writable: bool,
    /// Every object but the config is encrypted (`holdfast target add --encrypt`).
    pub encrypted: bool,
    /// What they are sealed with (`aes-256-gcm`, `chacha20-poly1305`), if encrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
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

/// How [`check_or_init`] is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checking {
    /// `target check` of a registered target.
    Registered,
    /// `target add`: an encrypted target may be found whose record does not say so yet; an
    /// empty one is initialised, encrypted if `encrypt` (`--encrypt`), with `cipher` (by
    /// default [`Cipher::preferred`]).
    Adding {
        encrypt: bool,
        cipher: Option<Cipher>,
    },
}

/// Reads the target's config (initialising an empty target as `how` says), opens its key if it
/// is encrypted, then proves it writable.
pub async fn check_or_init(rec: &TargetRecord, me: &NodeId, how: Checking) -> Result<CheckReport> {
    let adding = matches!(how, Checking::Adding { .. });
    let plain = open_plain(rec)?;
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
    let (config, initialised_now) = match plain.check().await {
        Ok(c) => {
            if adding && c.encryption.is_none() && rec.encryption.is_some() {
                return Err(Error::invalid(format!(
                    "target {} ({}) holds an unencrypted repository; --encrypt makes a new \
                     target only (use an empty bucket, prefix or directory)",
                    rec.name, rec.url
                )));
            }
            (c, false)
        }
        Err(Error::NotFound(_)) => {
            let existing = plain.list_objects("").await.map_err(ctx)?;
            if !existing.is_empty() {
                return Err(Error::invalid(format!(
                    "target {} ({}) holds {} objects but no holdfast repository; use an empty \
                     bucket, prefix or directory",
                    rec.name,
                    rec.url,
                    existing.len()
                )));
            }
            let id = crate::repo::new_repo_id();
            let encryption = match (how, &rec.encryption) {
                (
                    Checking::Adding {
                        encrypt: true,
                        cipher,
                    },
                    Some(source),
                ) => {
                    let cipher = cipher.unwrap_or_else(Cipher::preferred);
                    let secret = source.secret(&format!("new target {}", rec.name), true)?;
                    let (master, encryption) = keys::create(&secret, &id, cipher)?;
                    remember(rec, &id, master.object_key(cipher));
                    Some(encryption)
                }
                (_, None) => None,
                // An encrypted target that is empty now (deleted by someone?) is not made again
                // here, least of all unencrypted; nor is a new one made without --encrypt (a
                // mistyped URL given with --key-file).
                (Checking::Registered, Some(_)) => {
                    return Err(Error::corrupt(format!(
                        "target {} ({}) was registered as encrypted and is empty now: its \
                         repository is gone; nothing was written",
                        rec.name, rec.url
                    )));
                }
                (Checking::Adding { encrypt: false, .. }, Some(_)) => {
                    return Err(Error::not_found(format!(
                        "target {} ({}) is empty; --key-file and --passphrase-file open an \
                         existing encrypted target, add --encrypt to make a new one",
                        rec.name, rec.url
                    )));
                }
            };
            (plain.init_with(id, encryption).await.map_err(ctx)?, true)
        }
        Err(e) => return Err(ctx(e)),
    };
    let encrypted = config.encryption.is_some();
    let cipher = match &config.encryption {
        Some(e) => Some(e.cipher(&rec.name)?),
        None => None,
    };
    if let (
        Checking::Adding {
            cipher: Some(asked),
            ..
        },
        Some(has),
    ) = (&how, cipher)
        && *asked != has
    {
        return Err(Error::invalid(format!(
            "target {} ({}) exists, sealed with {has}; --cipher {asked} chooses the cipher of a \
             new target only (leave it out to use this one)",
            rec.name, rec.url
        )));
    }
    let cipher = cipher.map(|c| c.short_name().to_string());
    let repo = unlock(plain, rec, &config, adding).await?;
    let repo = &repo;
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
        repository_id: config.id.clone(),
        initialised_now,
        writable: true,
        encrypted,
        cipher,
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
