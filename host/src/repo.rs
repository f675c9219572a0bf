//! The repository: chunks in packs, pack indexes and snapshot manifests, in one format over
//! `object_store`. The only module that builds object stores.
//!
//! # Layout of keys
//! ```text
//! config                       RepoConfig (JSON): format name and version, repository id
//! packs/<2 hex>/<pack id>      pack objects (see repo/pack.rs)
//! index/<pack id>              the index of that pack (zstd JSON), written after the pack
//! manifests/<volume>/<id>      one snapshot's manifest (snapshot/manifest.rs), written after
//!                              its packs
//! ```
//!
//! # Invariants
//! - Every object is written once (`PutMode::Create`) and never modified; objects are released
//!   by deleting them. Nothing depends on read-modify-write of a shared object. The exceptions:
//!   `config`, rewritten once from version 1 to 2 by the first writer of this release
//!   (conditionally where the store can), and a target's lock records (`target.rs`).
//! - On local disk every write is fsynced (file and directory) before it returns, so a pack is
//!   durable before the index naming it, and both before a manifest that references them.
//! - Writing the same pack twice is harmless: a pack is named by the hash of its entry list.

mod direct;
pub mod index_cache;
mod nofollow;
pub mod pack;
pub mod retry;
pub mod sealed;

use std::collections::HashMap;
use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::chunk::Encoding;
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId, SnapshotId, VolumeName};
use pack::{FinishedPack, PackIndex};

/// Name written into every repository's config.
pub const FORMAT_NAME: &str = "holdfast-repository";
/// The repository format this build writes into a node's own repository. Version 2 holds
/// format-2 manifests (`snapshot/manifest.rs`), which older releases cannot read; a version-1
/// repository is marked version 2 before this build writes into it
/// ([`Repository::check_for_writing`]); its objects stay as they are.
pub const FORMAT_VERSION: u32 = 2;
/// The format this build writes into mirror targets: version 3 adds salted pack names, push
/// intents (`pending/`) and gc records (`gc/`), whose protocol older releases do not follow
/// (`host/TARGETS.md`), so they must refuse to write into such a target.
pub const TARGET_FORMAT_VERSION: u32 = 3;
/// The newest repository format this build reads.
const NEWEST_FORMAT_VERSION: u32 = TARGET_FORMAT_VERSION;
/// The oldest repository format this build reads (and upgrades).
const OLDEST_FORMAT_VERSION: u32 = 1;

/// Packs bigger than this go to object stores as multipart uploads. Above a sealed pack's
/// size (16 MiB plus at most one chunk) by default: one PUT of 16 MiB is one request where
/// multipart costs three more, and it halved the time of a baseline push to a local S3
/// server (`host/TARGETS.md`). Smaller with `HOLDFAST_TARGET_MULTIPART_THRESHOLD`.
pub const MULTIPART_THRESHOLD: usize = 32 << 20;
/// Ranges of a pack in an object store closer than this are read with one request.
const COALESCE_GAP: u64 = 1 << 20;
/// Ranges of a pack on local disk closer than this are read with one read (what the kernel's
/// readahead, which these reads go without, would have read past each of them).
const LOCAL_COALESCE_GAP: u64 = 64 << 10;
/// Part size of those uploads (S3's minimum is 5 MiB).
const MULTIPART_PART: usize = 8 << 20;

/// The repository's `config` object.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub created_unix_ms: u64,
    pub chunk_hash: String,
    pub compression: String,
    /// An encrypted target's cipher and wrapped keys (`target/keys.rs`); every other object
    /// of such a repository is sealed (`repo/sealed.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::target::keys::Encryption>,
}

/// A new repository's id: 32 random hex digits.
pub fn new_repo_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A listed object's size and the store's own modification time (the server's clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub modified_unix_ms: u64,
}

/// Where one chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    pub pack: PackId,
    pub offset: u64,
    pub length: u32,
    pub raw_length: u32,
    pub encoding: Encoding,
}

/// Chunks of the repository by id, as loaded from the index objects: every chunk, except in
/// a mirror update, which looks up only the chunks it needs ([`crate::state::Node::find_chunks`]).
#[derive(Clone, Debug, Default)]
pub struct ChunkIndex {
    /// Hashed with foldhash, seeded at random: ids are hashes already. Loading the index of
    /// 88,000 chunks (an 8 GiB volume's) took 21-25 ms with SipHash and 18-20 ms with this.
    pub chunks: HashMap<ChunkId, ChunkLocation, foldhash::fast::RandomState>,
    pub packs: HashMap<PackId, PackIndex>,
}

impl ChunkIndex {
    pub fn insert(&mut self, index: PackIndex) {
        for e in &index.entries {
            self.chunks.entry(e.id).or_insert(ChunkLocation {
                pack: index.pack,
                offset: e.offset,
                length: e.length,
                raw_length: e.raw_length,
                encoding: e.encoding,
            });
        }
        self.packs.insert(index.pack, index);
    }

    /// Brings the index up to the repository's listing: reads the index objects of packs
    /// that are new since, which costs the listing and the change, not a rebuild. If packs
    /// are gone (a gc), it is rebuilt (a chunk stored twice may live on in another pack).
    /// Returns the problems with index objects, as [`Repository::load_index`] does.
    pub async fn refresh(&mut self, repo: &Repository) -> Result<Vec<String>> {
        let listed: std::collections::HashSet<PackId> =
            repo.list_indexes().await?.into_iter().collect();
        if self.packs.keys().any(|p| !listed.contains(p)) {
            // Built aside and swapped in only when complete: an error, or a request dropped
            // half-way, leaves the index as it was.
            let (fresh, problems, _) = repo.load_index_known(self.packs.clone()).await?;
            *self = fresh;
            return Ok(problems);
        }
        let new: Vec<PackId> = listed
            .into_iter()
            .filter(|p| !self.packs.contains_key(p))
            .collect();
        let (fresh, problems) = repo.read_indexes(new).await?;
        for pi in fresh {
            self.insert(pi);
        }
        Ok(problems)
    }

    /// Keeps only the packs for which `keep` holds; a chunk stored in a removed pack and in a
    /// kept one is then found in the kept one. Returns how many packs were removed.
    pub fn retain_packs(&mut self, mut keep: impl FnMut(&PackId) -> bool) -> usize {
        let before = self.packs.len();
        self.packs.retain(|id, _| keep(id));
        let removed = before - self.packs.len();
        if removed > 0 {
            let packs = std::mem::take(&mut self.packs);
            self.chunks.clear();
            for pi in packs.into_values() {
                self.insert(pi);
            }
        }
        removed
    }

    /// Adds what `other` knows and this does not.
    pub fn merge(&mut self, other: ChunkIndex) {
        for (id, loc) in other.chunks {
            self.chunks.entry(id).or_insert(loc);
        }
        for (id, pi) in other.packs {
            self.packs.entry(id).or_insert(pi);
        }
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.chunks.contains_key(id)
    }

    pub fn get(&self, id: &ChunkId) -> Option<&ChunkLocation> {
        self.chunks.get(id)
    }
}

/// A repository over any [`ObjectStore`].
#[derive(Clone, Debug)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    /// Where it is, for messages (a path or URL).
    location: String,
    /// The root directory of a local repository, for writing packs with direct I/O.
    local: Option<Arc<cap_std::fs::Dir>>,
    /// Packs bigger than this are multipart uploads (object stores only).
    multipart_threshold: usize,
    /// The format version this repository is created with and upgraded to before writing.
    format_version: u32,
    /// Every object but `config` is sealed (an encrypted target).
    sealed: bool,
}

impl Repository {
    /// A repository in a local directory, which must exist. Writes are fsynced.
    pub fn local(dir: &FsPath) -> Result<Self> {
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| {
                Error::io(
                    format!("opening repository directory {}", dir.display()),
                    std::io::Error::other(e.to_string()),
                )
            })?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        let root = Arc::new(
            cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority()).map_err(|e| {
                Error::io(format!("opening repository directory {}", dir.display()), e)
            })?,
        );
        let store = nofollow::NoFollowStore::new(store, root.clone(), dir.display().to_string());
        Ok(Repository {
            store: Arc::new(store),
            location: dir.display().to_string(),
            local: Some(root),
            multipart_threshold: MULTIPART_THRESHOLD,
            format_version: FORMAT_VERSION,
            sealed: false,
        })
    }

    /// A repository over an existing store (tests use `InMemory`).
    pub fn from_store(store: Arc<dyn ObjectStore>, location: impl Into<String>) -> Self {
        Repository {
            store,
            location: location.into(),
            local: None,
            multipart_threshold: MULTIPART_THRESHOLD,
            format_version: FORMAT_VERSION,
            sealed: false,
        }
    }

    /// Writes format `version` (a mirror target: [`TARGET_FORMAT_VERSION`]).
    pub fn with_format_version(mut self, version: u32) -> Self {
        self.format_version = version;
        self
    }

    /// The same repository, encrypted: every object but `config` is sealed with `key`
    /// ([`sealed`]). Packs then go through the store like every other object (no direct I/O).
    pub fn sealed(self, key: sealed::ObjectKey) -> Self {
        self.sealed_unlocking(tokio::sync::watch::channel(Some(Ok(Arc::new(key)))).1)
    }

    /// [`Repository::sealed`] with a key still being opened (see
    /// [`sealed::SealedStore::unlocking`]).
    pub fn sealed_unlocking(mut self, key: tokio::sync::watch::Receiver<sealed::KeyState>) -> Self {
        self.store = Arc::new(sealed::SealedStore::unlocking(self.store, key));
        self.local = None;
        self.sealed = true;
        self
    }

    /// Whether objects are sealed (an encrypted target).
    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// Packs bigger than `bytes` go up as multipart uploads.
    pub fn with_multipart_threshold(mut self, bytes: usize) -> Self {
        self.multipart_threshold = bytes.max(MULTIPART_PART);
        self
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// Writes a new repository's config; refuses if one exists.
    pub async fn init(&self) -> Result<RepoConfig> {
        self.init_with(new_repo_id(), None).await
    }

    /// Like [`Repository::init`], with the id chosen (an encrypted target's key slots are
    /// bound to it) and the encryption, if any.
    pub async fn init_with(
        &self,
        id: String,
        encryption: Option<crate::target::keys::Encryption>,
    ) -> Result<RepoConfig> {
        let config = RepoConfig {
            format: FORMAT_NAME.into(),
            version: self.format_version,
            id,
            created_unix_ms: crate::now_unix_ms(),
            chunk_hash: "blake3".into(),
            compression: "zstd".into(),
            encryption,
        };
        let body =
            serde_json::to_vec_pretty(&config).map_err(|e| Error::internal(e.to_string()))?;
        match self.put_create(&Path::from("config"), body.into()).await {
            Err(Error::Conflict(_)) => Err(Error::conflict(format!(
                "a repository already exists at {}; use it as it is, or choose another location",
                self.location
            ))),
            other => other.map(|_| config),
        }
    }

    /// Reads the config and checks that this build understands the format.
    pub async fn check(&self) -> Result<RepoConfig> {
        let bytes = match self.store.get(&Path::from("config")).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::not_found(format!(
                    "no holdfast repository at {} (its `config` object is missing); \
                     run `holdfast init` first",
                    self.location
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let config: RepoConfig = serde_json::from_slice(&bytes).map_err(|e| {
            Error::corrupt(format!(
                "the repository config at {} is not readable: {e}",
                self.location
            ))
        })?;
        if config.format != FORMAT_NAME {
            return Err(Error::invalid(format!(
                "{} holds a {:?}, not a holdfast repository",
                self.location, config.format
            )));
        }
        if !(OLDEST_FORMAT_VERSION..=NEWEST_FORMAT_VERSION).contains(&config.version) {
            return Err(Error::invalid(format!(
                "the repository at {} has format version {}; this holdfast reads versions \
                 {OLDEST_FORMAT_VERSION} to {NEWEST_FORMAT_VERSION}; use a holdfast release \
                 that matches it",
                self.location, config.version
            )));
        }
        Ok(config)
    }

    /// Reads the config as [`Repository::check`] does and, for a repository of an older
    /// version than the one this repository writes (2 for a node's own, 3 for a target),
    /// marks it that version before anything of it is written (format-2 manifests; a target's
    /// salted packs, intents and gc records), so that an older holdfast refuses it by its
    /// version instead of misreading it or ignoring the target's gc protocol. Called by writers only (a node opening its own repository, a
    /// push into a target): reading a bucket never changes it. The config is the only object
    /// rewritten, once, and on stores that support it only if it is still the one read (a
    /// conditional PUT); if the upgrade cannot be written, the writer stops.
    pub async fn check_for_writing(&self) -> Result<RepoConfig> {
        let config = self.check().await?;
        if config.version >= self.format_version {
            return Ok(config);
        }
        let target_version = self.format_version;
        let (meta, read) = self.config_as_stored().await?;
        let mut upgraded = config.clone();
        upgraded.version = target_version;
        let written = self.rewrite_config(meta, read, &upgraded).await;
        match written {
            Ok(_) => {
                tracing::info!(
                    "upgraded the repository at {} from format version {} to \
                     {target_version}: releases before it cannot read it any more",
                    self.location,
                    config.version
                );
                Ok(upgraded)
            }
            Err(object_store::Error::Precondition { .. }) => Err(Error::conflict(format!(
                "the config of the repository at {} changed while it was being upgraded to \
                 format version {target_version}; run the command again",
                self.location
            ))),
            Err(e) => Err(Error::Unavailable {
                message: format!(
                    "the repository at {} has format version {} and must be marked version \
                     {target_version} before this holdfast writes into it, but its config \
                     could not be rewritten ({e}); allow writing `config`, or use the release \
                     that wrote it",
                    self.location, config.version
                ),
                source: None,
            }),
        }
    }

    /// Rewrites the config with `change` applied, only if it is still the one read (see
    /// [`Repository::rewrite_config`]). Used for an encrypted target's key slots.
    pub async fn replace_config(
        &self,
        change: impl FnOnce(&mut RepoConfig) -> Result<()>,
    ) -> Result<RepoConfig> {
        let (meta, read) = self.config_as_stored().await?;
        let mut config = self.check().await?;
        change(&mut config)?;
        match self.rewrite_config(meta, read, &config).await {
            Ok(()) => Ok(config),
            Err(object_store::Error::Precondition { .. }) => Err(Error::conflict(format!(
                "the config of the repository at {} changed while it was being rewritten; run \
                 the command again",
                self.location
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The config object's version (for a conditional PUT) and its bytes, read before the
    /// config is parsed: what [`Repository::rewrite_config`] compares with.
    async fn config_as_stored(&self) -> Result<(object_store::ObjectMeta, Bytes)> {
        let path = Path::from("config");
        let meta = self.store.head(&path).await?;
        let read = self.store.get(&path).await?.bytes().await?;
        Ok((meta, read))
    }

    /// Writes `config` over the one read (`meta`, `read`) only if it is still that one: a
    /// conditional PUT (If-Match) where the store can; a local directory cannot compare, so it
    /// is read again just before the PUT, which leaves a window of one write. A config that
    /// changed is `Precondition`.
    async fn rewrite_config(
        &self,
        meta: object_store::ObjectMeta,
        read: Bytes,
        config: &RepoConfig,
    ) -> object_store::Result<()> {
        let path = Path::from("config");
        let body = serde_json::to_vec_pretty(config).map_err(|e| object_store::Error::Generic {
            store: "config",
            source: Box::new(e),
        })?;
        let conditional = PutOptions {
            mode: PutMode::Update(object_store::UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            }),
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(body.clone()), conditional)
            .await
        {
            Err(object_store::Error::NotImplemented { .. }) => {
                if self.store.get(&path).await?.bytes().await? != read {
                    return Err(object_store::Error::Precondition {
                        path: path.to_string(),
                        source: "the config changed".into(),
                    });
                }
                self.store
                    .put(&path, PutPayload::from(body))
                    .await
                    .map(|_| ())
            }
            other => other.map(|_| ()),
        }
    }

    async fn put_create(&self, path: &Path, body: Bytes) -> Result<()> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.store
            .put_opts(path, PutPayload::from(body), opts)
            .await?;
        Ok(())
    }

    /// Like `put_create`, but an existing object with this (content-derived) name is fine.
    async fn put_idempotent(&self, path: &Path, body: Bytes) -> Result<()> {
        match self.put_create(path, body).await {
            Err(Error::Conflict(_)) => Ok(()),
            other => other,
        }
    }

    fn pack_path(id: &PackId) -> Path {
        let hex = id.to_hex();
        Path::from(format!("packs/{}/{}", &hex[..2], hex))
    }

    fn index_path(id: &PackId) -> Path {
        Path::from(format!("index/{id}"))
    }

    fn manifest_path(volume: &VolumeName, id: &SnapshotId) -> Path {
        Path::from(format!("manifests/{volume}/{id}"))
    }

    /// Stores a pack, then its index; both durable when this returns.
    pub async fn put_pack(&self, pack: &FinishedPack) -> Result<()> {
        let id = &pack.index.pack;
        let path = Self::pack_path(id);
        match &self.local {
            Some(root) => {
                let (root, bytes) = (root.clone(), pack.bytes.clone());
                let key = path.to_string();
                tokio::task::spawn_blocking(move || direct::write_durable(&root, &key, &bytes))
                    .await
                    .map_err(|e| Error::internal(format!("pack writer failed: {e}")))?
                    .map_err(|e| {
                        Error::io(
                            format!("writing pack {} to {}", id.short(), self.location),
                            e,
                        )
                    })?;
            }
            None if pack.bytes.len() > self.multipart_threshold => {
                // A pack is named by its content, so an overwrite by another writer is the
                // same bytes: no condition is needed, and a failed upload is aborted.
                let upload = self.store.put_multipart(&path).await?;
                let mut w =
                    object_store::WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART);
                w.put(pack.bytes.clone());
                w.finish().await?;
            }
            None => self.put_idempotent(&path, pack.bytes.clone()).await?,
        }
        self.put_idempotent(&Self::index_path(id), pack.index.encode()?.into())
            .await
    }

    /// Writes a pack's index (again), for example rebuilt from the pack's trailer.
    pub async fn put_index(&self, index: &PackIndex) -> Result<()> {
        self.put_idempotent(&Self::index_path(&index.pack), index.encode()?.into())
            .await
    }

    /// Loads every pack index. An index that cannot be read is reported, not fatal: its
    /// chunks count as absent (they will be stored again) and `gc` rebuilds or removes it.
    ///
    /// Only packs that exist count: an index object can outlive its pack (in a target, a push
    /// that wrote its index after a gc deleted its pack), and a chunk it names must then be
    /// found in another pack or not at all.
    pub async fn load_index(&self) -> Result<(ChunkIndex, Vec<String>)> {
        // Packs are listed after the indexes: a pack is stored before its index, so every
        // index listed has its pack listed (gc aside), even while a push is under way. The
        // listing goes out while the indexes are read (and, in an encrypted target, while
        // its key is still being opened).
        let ids = self.list_indexes().await?;
        let (read, packs) = futures::join!(
            self.index_of_listed(ids, HashMap::new()),
            self.pack_listing()
        );
        let (mut index, problems, _) = read?;
        let packs = packs?;
        index.retain_packs(|p| packs.contains_key(p));
        Ok((index, problems))
    }

    /// Like [`Repository::load_index`], given pack indexes read before: an index object is
    /// never modified and is named by its pack, so a known one is still true while it is
    /// listed. Lists `index/` and reads only the others (returned third, to remember them).
    pub async fn load_index_known(
        &self,
        known: HashMap<PackId, PackIndex>,
    ) -> Result<(ChunkIndex, Vec<String>, Vec<PackIndex>)> {
        let ids = self.list_indexes().await?;
        self.index_of_listed(ids, known).await
    }

    /// The index of the packs whose indexes are listed as `ids`: those in `known` as they
    /// are, the others read.
    async fn index_of_listed(
        &self,
        ids: Vec<PackId>,
        mut known: HashMap<PackId, PackIndex>,
    ) -> Result<(ChunkIndex, Vec<String>, Vec<PackIndex>)> {
        let listed: std::collections::HashSet<PackId> = ids.iter().copied().collect();
        known.retain(|id, _| listed.contains(id));
        let missing: Vec<PackId> = ids
            .into_iter()
            .filter(|id| !known.contains_key(id))
            .collect();
        let (fresh, problems) = self.read_indexes(missing).await?;
        let mut index = ChunkIndex::default();
        let entries = fresh.iter().chain(known.values()).map(|p| p.entries.len());
        index.chunks.reserve(entries.sum());
        for pi in fresh.iter().cloned().chain(known.into_values()) {
            index.insert(pi);
        }
        Ok((index, problems, fresh))
    }

    /// Reads the index objects of `ids`, several at once; a damaged one is a problem (its
    /// pack's chunks count as absent), not an error.
    pub async fn read_indexes(&self, ids: Vec<PackId>) -> Result<(Vec<PackIndex>, Vec<String>)> {
        let results: Vec<(PackId, Result<PackIndex>)> = futures::stream::iter(ids)
            .map(|id| async move { (id, self.read_index(&id).await) })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut problems = Vec::new();
        let mut fresh = Vec::new();
        for (id, r) in results {
            match r {
                Ok(pi) => fresh.push(pi),
                Err(e @ Error::Corrupt(_)) => problems.push(format!("index of pack {id}: {e}")),
                Err(e) => return Err(e),
            }
        }
        Ok((fresh, problems))
    }

    pub async fn read_index(&self, id: &PackId) -> Result<PackIndex> {
        let bytes = self.store.get(&Self::index_path(id)).await?.bytes().await?;
        let mut pi = PackIndex::decode(&bytes, &format!("index of pack {}", id.short()))?;
        // The pack's name is the hash of its entries: an index object listing other entries
        // (written by someone else, or damaged) is not this pack's.
        if pi.pack != *id || PackIndex::id_of(&pi.entries, pi.salt.as_deref())? != *id {
            return Err(Error::corrupt(format!(
                "index object {id} names pack {} or lists entries that are not its own",
                pi.pack
            )));
        }
        pi.pack = *id;
        Ok(pi)
    }

    /// Ids of all packs with an index object.
    pub async fn list_indexes(&self) -> Result<Vec<PackId>> {
        let metas: Vec<_> = self
            .store
            .list(Some(&Path::from("index")))
            .try_collect()
            .await?;
        Ok(metas
            .iter()
            .filter_map(|m| crate::id::canonical(m.location.filename()?))
            .collect())
    }

    /// Ids and sizes of all pack objects.
    pub async fn list_packs(&self) -> Result<Vec<(PackId, u64)>> {
        let metas: Vec<_> = self
            .store
            .list(Some(&Path::from("packs")))
            .try_collect()
            .await?;
        Ok(metas
            .iter()
            .filter_map(|m| Some((crate::id::canonical(m.location.filename()?)?, m.size)))
            .collect())
    }

    /// Every pack object with its size and the store's modification time.
    pub async fn pack_listing(&self) -> Result<HashMap<PackId, ObjectInfo>> {
        self.listing("packs").await
    }

    /// Every index object with its size and the store's modification time.
    pub async fn index_listing(&self) -> Result<HashMap<PackId, ObjectInfo>> {
        self.listing("index").await
    }

    async fn listing(&self, prefix: &str) -> Result<HashMap<PackId, ObjectInfo>> {
        let metas: Vec<_> = self
            .store
            .list(Some(&Path::from(prefix)))
            .try_collect()
            .await?;
        Ok(metas
            .iter()
            .filter_map(|m| {
                let id = crate::id::canonical(m.location.filename()?)?;
                Some((
                    id,
                    ObjectInfo {
                        size: m.size,
                        modified_unix_ms: m.last_modified.timestamp_millis().max(0) as u64,
                    },
                ))
            })
            .collect())
    }

    /// Reads a pack's index from its trailer (two ranged reads), for a pack whose index
    /// object is missing or damaged; checked against the pack's name.
    pub async fn read_pack_trailer(&self, id: &PackId, pack_len: u64) -> Result<PackIndex> {
        let path = Self::pack_path(id);
        if pack_len < 20 {
            return Err(Error::corrupt(format!(
                "pack {} is not a holdfast pack ({pack_len} bytes)",
                id.short()
            )));
        }
        let last = self.store.get_range(&path, pack_len - 12..pack_len).await?;
        let tlen = pack::trailer_len(id, pack_len, &last)?;
        let trailer = self
            .store
            .get_range(&path, pack_len - 12 - tlen..pack_len - 12)
            .await?;
        pack::parse_trailer(id, pack_len, &trailer)
    }

    /// Reads byte ranges of a pack, in any order, overlapping or not (nearby ranges are read
    /// with one request or one read).
    ///
    /// Every range must come back whole: a pack that is shorter than its index says (a
    /// truncated object) is damage, reported as such, never a panic or short data. What is
    /// returned holds at most about twice the bytes asked for, however the ranges are spread
    /// (a peer choosing which chunks it asks for cannot make it hold more).
    pub async fn read_pack_ranges(
        &self,
        id: &PackId,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<Bytes>> {
        let path = Self::pack_path(id);
        let short = |r: &std::ops::Range<u64>, got: usize| {
            Error::corrupt(format!(
                "pack {} in {} is damaged: bytes {}..{} were asked for and {got} came back (a \
                 truncated object?)",
                id.short(),
                self.location,
                r.start,
                r.end
            ))
        };
        // Nearby ranges are read as one (a request to an object store; a read without
        // readahead on local disk), and what each read returned is checked before it is cut
        // up (object_store's own coalescing would panic on a short answer).
        if let Some(r) = ranges.iter().find(|r| r.start > r.end) {
            return Err(Error::internal(format!(
                "pack {}: the inverted range {r:?} was asked for",
                id.short()
            )));
        }
        let gap = if self.local.is_some() {
            LOCAL_COALESCE_GAP
        } else {
            COALESCE_GAP
        };
        let mut order: Vec<usize> = (0..ranges.len()).collect();
        order.sort_by_key(|&i| ranges[i].start);
        let mut groups: Vec<(std::ops::Range<u64>, &[usize])> = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let start = ranges[order[i]].start;
            let mut end = ranges[order[i]].end;
            let mut j = i + 1;
            while j < order.len() && ranges[order[j]].start <= end + gap {
                end = end.max(ranges[order[j]].end);
                j += 1;
            }
            groups.push((start..end, &order[i..j]));
            i = j;
        }
        let fetched = if self.local.is_some() {
            // The local store reads every range in one pass over one open file, and returns
            // what a truncated pack still holds of each.
            let fetches: Vec<_> = groups.iter().map(|(f, _)| f.clone()).collect();
            self.store.get_ranges(&path, &fetches).await?
        } else {
            let mut got = Vec::with_capacity(groups.len());
            for (fetch, _) in &groups {
                got.push(self.store.get_range(&path, fetch.clone()).await?);
            }
            got
        };
        let mut out: Vec<Bytes> = vec![Bytes::new(); ranges.len()];
        for ((fetch, members), bytes) in groups.iter().zip(fetched) {
            if bytes.len() as u64 != fetch.end - fetch.start {
                return Err(short(fetch, bytes.len()));
            }
            // A slice keeps the whole read alive: where the read is mostly gaps, the ranges
            // are copied out and it goes now.
            let wanted: u64 = members
                .iter()
                .map(|&k| ranges[k].end - ranges[k].start)
                .sum();
            let copy = bytes.len() as u64 > 2 * wanted;
            for &k in members.iter() {
                let r = &ranges[k];
                let part =
                    bytes.slice((r.start - fetch.start) as usize..(r.end - fetch.start) as usize);
                out[k] = if copy {
                    Bytes::copy_from_slice(&part)
                } else {
                    part
                };
            }
        }
        Ok(out)
    }

    pub async fn read_pack(&self, id: &PackId) -> Result<Bytes> {
        Ok(self.store.get(&Self::pack_path(id)).await?.bytes().await?)
    }

    /// Deletes a pack's index first, then the pack, so no index ever names a missing pack.
    pub async fn delete_pack(&self, id: &PackId) -> Result<()> {
        ignore_missing(self.store.delete(&Self::index_path(id)).await)?;
        ignore_missing(self.store.delete(&Self::pack_path(id)).await)
    }

    /// Deletes an index whose pack is gone.
    pub async fn delete_index(&self, id: &PackId) -> Result<()> {
        ignore_missing(self.store.delete(&Self::index_path(id)).await)
    }

    /// Commits a manifest: one create-only, atomic, durable write.
    pub async fn put_manifest(
        &self,
        volume: &VolumeName,
        id: &SnapshotId,
        body: Vec<u8>,
    ) -> Result<()> {
        self.put_create(&Self::manifest_path(volume, id), body.into())
            .await
    }

    pub async fn read_manifest(&self, volume: &VolumeName, id: &SnapshotId) -> Result<Bytes> {
        self.read_manifest_if_present(volume, id)
            .await?
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "the manifest of snapshot {volume}@{id} is missing from the repository at {}",
                    self.location
                ))
            })
    }

    /// A manifest, or `None` if it is not (or no longer) there: in a target that several nodes
    /// prune, one listed a moment ago may have been pruned since.
    pub async fn read_manifest_if_present(
        &self,
        volume: &VolumeName,
        id: &SnapshotId,
    ) -> Result<Option<Bytes>> {
        match self.store.get(&Self::manifest_path(volume, id)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_manifest(&self, volume: &VolumeName, id: &SnapshotId) -> Result<()> {
        ignore_missing(self.store.delete(&Self::manifest_path(volume, id)).await)
    }

    /// Every manifest in the repository, as (volume, snapshot id).
    pub async fn list_manifests(&self) -> Result<Vec<(VolumeName, SnapshotId)>> {
        Ok(self
            .list_manifest_objects()
            .await?
            .into_iter()
            .map(|(v, id, _)| (v, id))
            .collect())
    }

    /// Every object under `manifests/` named like a manifest, as (volume, snapshot id, size).
    /// (In a mirror target an empty one is a fence, not a manifest: `target/pending.rs`.)
    pub async fn list_manifest_objects(&self) -> Result<Vec<(VolumeName, SnapshotId, u64)>> {
        let metas: Vec<_> = self
            .store
            .list(Some(&Path::from("manifests")))
            .try_collect()
            .await?;
        let mut out = Vec::new();
        for m in metas {
            let parts: Vec<_> = m.location.parts().collect();
            if parts.len() != 3 {
                continue;
            }
            let (v, id) = (parts[1].as_ref(), parts[2].as_ref());
            if let (Some(v), Some(id)) = (crate::id::canonical(v), crate::id::canonical(id)) {
                out.push((v, id, m.size));
            }
        }
        Ok(out)
    }

    /// The key of a manifest, for the objects a mirror target keeps beside the format proper.
    pub fn manifest_key(volume: &VolumeName, id: &SnapshotId) -> String {
        Self::manifest_path(volume, id).to_string()
    }
}

/// Objects outside the repository format proper (lock records and leases of a mirror target):
/// keys are built by the caller from validated names only.
impl Repository {
    /// Writes `key` only if it does not exist yet (`Ok(false)` if it does).
    pub async fn put_object_if_absent(&self, key: &str, body: Vec<u8>) -> Result<bool> {
        match self.put_create(&Path::from(key), body.into()).await {
            Ok(()) => Ok(true),
            Err(Error::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The size the store gives for `key` (a HEAD request), `None` if it does not exist.
    pub async fn object_size(&self, key: &str) -> Result<Option<u64>> {
        match self.store.head(&Path::from(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes (or overwrites) `key`.
    pub async fn put_object(&self, key: &str, body: Vec<u8>) -> Result<()> {
        self.store
            .put(&Path::from(key), PutPayload::from(body))
            .await?;
        Ok(())
    }

    /// Reads `key`, `None` if it does not exist.
    pub async fn get_object(&self, key: &str) -> Result<Option<Bytes>> {
        match self.store.get(&Path::from(key)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Keys under `prefix`, each with its size and the store's own modification time (unix
    /// ms: lease expiry is judged by the server's clock, not by the nodes' clocks).
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<(String, u64, u64)>> {
        let metas: Vec<_> = self
            .store
            .list(Some(&Path::from(prefix)))
            .try_collect()
            .await?;
        Ok(metas
            .into_iter()
            .map(|m| {
                let modified = m.last_modified.timestamp_millis().max(0) as u64;
                (m.location.to_string(), m.size, modified)
            })
            .collect())
    }

    pub async fn delete_object(&self, key: &str) -> Result<()> {
        ignore_missing(self.store.delete(&Path::from(key)).await)
    }

    /// The stored bytes of `ids` (in that order), read pack by pack.
    pub async fn read_chunks(
        &self,
        index: &ChunkIndex,
        ids: &[ChunkId],
    ) -> Result<Vec<(ChunkLocation, Bytes)>> {
        let locs: Vec<ChunkLocation> = ids
            .iter()
            .map(|id| {
                index.get(id).copied().ok_or_else(|| {
                    Error::corrupt(format!(
                        "chunk {id} is referenced but missing from the repository at {}; run \
                         `holdfast verify`",
                        self.location
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let mut by_pack: std::collections::BTreeMap<PackId, Vec<usize>> = Default::default();
        for (i, l) in locs.iter().enumerate() {
            by_pack.entry(l.pack).or_default().push(i);
        }
        let mut out: Vec<Option<Bytes>> = vec![None; locs.len()];
        for (pack, idx) in by_pack {
            let ranges: Vec<_> = idx
                .iter()
                .map(|&i| locs[i].offset..locs[i].offset + locs[i].length as u64)
                .collect();
            let data = self.read_pack_ranges(&pack, &ranges).await?;
            for (&i, d) in idx.iter().zip(data) {
                out[i] = Some(d);
            }
        }
        Ok(locs
            .into_iter()
            .zip(out)
            .map(|(l, d)| (l, d.expect("every range read")))
            .collect())
    }
}

fn ignore_missing(r: object_store::Result<()>) -> Result<()> {
    match r {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk;
    use object_store::memory::InMemory;
    use pack::PackBuilder;

    fn mem() -> Repository {
        Repository::from_store(Arc::new(InMemory::new()), "memory")
    }

    async fn conformance(repo: Repository) {
        // The same sequence against every store: init once, packs round-trip through the
        // index, manifests are create-only, deletes are idempotent.
        repo.init().await.unwrap();
        assert!(matches!(repo.init().await, Err(Error::Conflict(_))));
        repo.check().await.unwrap();

        let mut b = PackBuilder::new();
        let data = b"block".repeat(1000);
        let (enc, stored) = chunk::encode(&data).unwrap();
        b.add(chunk::hash(&data), enc, &stored, data.len());
        let p = b.finish().unwrap();
        repo.put_pack(&p).await.unwrap();
        repo.put_pack(&p).await.unwrap();
        let (idx, problems) = repo.load_index().await.unwrap();
        assert!(problems.is_empty());
        let loc = idx.get(&chunk::hash(&data)).unwrap();
        let range = loc.offset..loc.offset + loc.length as u64;
        let got = repo
            .read_pack_ranges(&loc.pack, std::slice::from_ref(&range))
            .await
            .unwrap();
        assert_eq!(
            chunk::decode(&chunk::hash(&data), loc.encoding, &got[0], data.len()).unwrap(),
            data
        );

        let vol: VolumeName = "v".parse().unwrap();
        let sid = SnapshotId::generate(1);
        repo.put_manifest(&vol, &sid, b"m".to_vec()).await.unwrap();
        assert!(matches!(
            repo.put_manifest(&vol, &sid, b"other".to_vec()).await,
            Err(Error::Conflict(_))
        ));
        assert_eq!(
            repo.list_manifests().await.unwrap(),
            vec![(vol.clone(), sid)]
        );
        repo.delete_manifest(&vol, &sid).await.unwrap();
        repo.delete_manifest(&vol, &sid).await.unwrap();
        repo.delete_pack(&p.index.pack).await.unwrap();
        assert!(repo.list_packs().await.unwrap().is_empty());
        assert!(repo.list_indexes().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn conformance_in_memory() {
        conformance(mem()).await;
    }

    #[tokio::test]
    async fn conformance_local_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        conformance(Repository::local(dir.path()).unwrap()).await;
    }

    /// Ranges of a pack come back as asked, in any order, overlapping, repeated or empty, near
    /// each other or far apart; a pack cut short is damage, never short data.
    /// (`named`: the store answers a range past the end with what it has, so the damage is
    /// named as such; `InMemory` refuses the range instead.)
    async fn pack_ranges<F: std::future::Future<Output = ()>>(
        repo: Repository,
        truncate: impl FnOnce(Path, u64) -> F,
        named: bool,
    ) {
        repo.init().await.unwrap();
        let mut b = PackBuilder::new();
        for i in 0..64u32 {
            // Each chunk different, and incompressible, so the pack is ~4 MiB.
            let mut data = vec![0; 65536];
            blake3::Hasher::new()
                .update(&i.to_le_bytes())
                .finalize_xof()
                .fill(&mut data);
            let (enc, stored) = chunk::encode(&data).unwrap();
            b.add(chunk::hash(&data), enc, &stored, data.len());
        }
        let p = b.finish().unwrap();
        repo.put_pack(&p).await.unwrap();
        let whole = repo.read_pack(&p.index.pack).await.unwrap();
        let len = whole.len() as u64;
        let ranges = vec![
            3_000_000..3_000_100,
            10..20,
            10..20,
            15..70_000,
            0..0,
            len - 5..len,
            len..len,
            200_000..200_000,
            1_000_000..1_400_000,
            900_000..1_100_000,
        ];
        let got = repo.read_pack_ranges(&p.index.pack, &ranges).await.unwrap();
        for (r, g) in ranges.iter().zip(&got) {
            assert_eq!(&g[..], &whole[r.start as usize..r.end as usize], "{r:?}");
        }
        #[allow(clippy::reversed_empty_ranges, clippy::single_range_in_vec_init)]
        let inverted = [5..4];
        let err = repo
            .read_pack_ranges(&p.index.pack, &inverted)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("inverted"), "{err}");
        truncate(Repository::pack_path(&p.index.pack), len - 100).await;
        let err = repo
            .read_pack_ranges(&p.index.pack, &ranges)
            .await
            .unwrap_err();
        if named {
            assert!(matches!(err, Error::Corrupt(_)), "{err}");
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }

    #[tokio::test]
    async fn pack_ranges_in_memory() {
        let store = Arc::new(InMemory::new());
        let repo = Repository::from_store(store.clone(), "memory");
        pack_ranges(
            repo,
            |path, len| async move {
                let b = store.get(&path).await.unwrap().bytes().await.unwrap();
                store
                    .put(&path, b.slice(..len as usize).into())
                    .await
                    .unwrap();
            },
            false,
        )
        .await;
    }

    #[tokio::test]
    async fn pack_ranges_on_local_disk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        pack_ranges(
            Repository::local(dir.path()).unwrap(),
            |path, len| async move {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(root.join(path.as_ref()))
                    .unwrap()
                    .set_len(len)
                    .unwrap();
            },
            true,
        )
        .await;
    }

    /// A new repository whose config then claims format `version`.
    async fn with_config_version(repo: &Repository, version: u32) -> RepoConfig {
        let mut cfg = repo.init().await.unwrap();
        cfg.version = version;
        repo.store
            .put(
                &Path::from("config"),
                serde_json::to_vec(&cfg).unwrap().into(),
            )
            .await
            .unwrap();
        cfg
    }

    #[tokio::test]
    async fn a_version_1_repository_is_upgraded_by_its_first_writer() {
        let repo = mem();
        let cfg = with_config_version(&repo, 1).await;
        // Reading does not change it; the first writer marks it.
        assert_eq!(repo.check().await.unwrap().version, 1);
        assert_eq!(
            repo.check_for_writing().await.unwrap().version,
            FORMAT_VERSION
        );
        let stored: RepoConfig = serde_json::from_slice(
            &repo
                .store
                .get(&Path::from("config"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!((stored.version, stored.id), (FORMAT_VERSION, cfg.id));
    }

    #[tokio::test]
    async fn a_repository_of_another_version_is_refused() {
        // A config with a different format version is a clear error, not a misread.
        let repo = mem();
        with_config_version(&repo, 99).await;
        let err = repo.check().await.unwrap_err().to_string();
        assert!(err.contains("format version 99"), "{err}");
    }
}
