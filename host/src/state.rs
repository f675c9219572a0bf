//! A node's state directory: its identity, catalog and local repository, opened through
//! cap-std so no name from outside can reach a path outside it.
//!
//! ```text
//! STATE/
//!   node.json      NodeInfo: node id, creation time, state format
//!   catalog.redb   the catalog (volumes, snapshots)
//!   repo.lock      advisory lock: shared while writing snapshots, exclusive for gc
//!   repo/          the node's repository (see repo.rs)
//! ```

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions};
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::id::NodeId;
use crate::repo::Repository;

/// The state format this build writes.
pub const STATE_FORMAT: u32 = 1;
/// The default state directory, relative to the working directory.
pub const DEFAULT_STATE_DIR: &str = "holdfast-state";

/// `node.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NodeInfo {
    pub node_id: NodeId,
    pub created_unix_ms: u64,
    pub state_format: u32,
}

/// An opened node: its state directory, catalog and repository.
#[derive(Debug)]
pub struct Node {
    pub path: PathBuf,
    pub dir: Dir,
    pub info: NodeInfo,
    pub catalog: Catalog,
    pub repo: Repository,
}

/// Held while the repository is being written (shared) or collected (exclusive).
#[derive(Debug)]
pub struct RepoLock {
    _file: std::fs::File,
}

impl Node {
    /// Creates a new state directory (empty or absent) with a fresh repository.
    pub async fn init(path: &Path, node_id: Option<NodeId>) -> Result<Node> {
        match std::fs::read_dir(path) {
            Ok(mut entries) => {
                if path.join("node.json").exists() {
                    return Err(Error::conflict(format!(
                        "{} is already a holdfast state directory; use it as it is, or \
                         choose another --state",
                        path.display()
                    )));
                }
                if entries.next().is_some() {
                    return Err(Error::conflict(format!(
                        "{} exists and is not empty; holdfast only initialises an empty or new \
                         directory (if an earlier `init` was interrupted, remove it and rerun)",
                        path.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path)
                    .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                return Err(Error::invalid(format!(
                    "{} is a file, not a directory",
                    path.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        }
        make_private(path)?;
        let dir = open_dir(path)?;
        dir.create_dir("repo")
            .map_err(|e| Error::io(format!("creating {}/repo", path.display()), e))?;
        let repo = Repository::local(&path.join("repo"))?;
        repo.init().await?;
        let catalog = open_catalog(&dir, path)?;
        let info = NodeInfo {
            node_id: node_id.unwrap_or_else(|| {
                format!("node-{:08x}", rand::random::<u32>())
                    .parse()
                    .expect("valid node id")
            }),
            created_unix_ms: crate::now_unix_ms(),
            state_format: STATE_FORMAT,
        };
        // node.json last: its presence means the state directory is complete.
        write_atomic(
            &dir,
            "node.json",
            &serde_json::to_vec_pretty(&info).map_err(|e| Error::internal(e.to_string()))?,
        )
        .map_err(|e| Error::io(format!("writing {}/node.json", path.display()), e))?;
        Ok(Node {
            path: path.to_path_buf(),
            dir,
            info,
            catalog,
            repo,
        })
    }

    /// Opens an existing state directory (made private first if it is not: 0700).
    pub async fn open(path: &Path) -> Result<Node> {
        make_private(path)?;
        let dir = Dir::open_ambient_dir(path, ambient_authority()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::not_found(format!(
                    "no holdfast state at {}; run `holdfast init` (with the same --state) first",
                    path.display()
                ))
            } else {
                Error::io(format!("opening state directory {}", path.display()), e)
            }
        })?;
        let mut raw = Vec::new();
        match dir.open("node.json") {
            Ok(mut f) => f
                .read_to_end(&mut raw)
                .map_err(|e| Error::io(format!("reading {}/node.json", path.display()), e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::not_found(format!(
                    "{} is not a holdfast state directory (no node.json); run `holdfast init` \
                     first",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(Error::io(
                    format!("opening {}/node.json", path.display()),
                    e,
                ));
            }
        };
        let info: NodeInfo = serde_json::from_slice(&raw).map_err(|e| {
            Error::corrupt(format!("{}/node.json is unreadable: {e}", path.display()))
        })?;
        if info.state_format != STATE_FORMAT {
            return Err(Error::invalid(format!(
                "{} has state format {}; this holdfast reads format {STATE_FORMAT}",
                path.display(),
                info.state_format
            )));
        }
        let catalog = open_catalog(&dir, path)?;
        let repo = Repository::local(&path.join("repo"))?;
        // The node's own repository: this release writes into it.
        repo.check_for_writing().await?;
        Ok(Node {
            path: path.to_path_buf(),
            dir,
            info,
            catalog,
            repo,
        })
    }

    /// The repository's chunk index, decoding only the pack indexes this node has not cached
    /// (`repo::index_cache`): what snapshot creation and mirror updates use, so that their cost
    /// follows the change rather than the repository's size. `gc` and `verify` read every
    /// index object instead.
    pub async fn load_index(&self) -> Result<(crate::repo::ChunkIndex, Vec<String>)> {
        use crate::repo::index_cache;
        let (known, torn) = index_cache::load(&self.dir);
        let cached = known.len();
        let (index, problems, fresh) = self.repo.load_index_known(known).await?;
        let kept = index.packs.len() - fresh.len();
        let written = if kept < cached || torn {
            index_cache::rewrite(&self.dir, index.packs.values())
        } else if !fresh.is_empty() {
            index_cache::append(&self.dir, &fresh)
        } else {
            Ok(())
        };
        if let Err(e) = written {
            tracing::warn!("could not update the index cache: {e}");
        }
        Ok((index, problems))
    }

    /// Where the `wanted` chunks are, among those this node's repository holds: an index of
    /// just those (plus every chunk of packs new to the index cache), and the problems
    /// [`Node::load_index`] would report. A mirror update asks this for the chunks of the
    /// blocks that changed, so it never builds a map of the whole repository.
    pub async fn find_chunks(
        &self,
        wanted: &std::collections::HashSet<crate::id::ChunkId>,
    ) -> Result<(crate::repo::ChunkIndex, Vec<String>)> {
        use crate::repo::index_cache;
        // Scan the cache while the repository lists its indexes.
        let dir = self
            .dir
            .try_clone()
            .map_err(|e| Error::io(format!("opening {}", self.path.display()), e))?;
        let w = wanted.clone();
        let (m, listed) = tokio::join!(
            tokio::task::spawn_blocking(move || index_cache::load_matching(&dir, &w)),
            self.repo.list_indexes()
        );
        let m = m.map_err(|e| Error::internal(format!("index cache reader failed: {e}")))?;
        if m.torn {
            // The full load rewrites a torn cache.
            return self.load_index().await;
        }
        let listed: std::collections::HashSet<_> = listed?.into_iter().collect();
        let missing: Vec<_> = listed
            .iter()
            .filter(|p| !m.packs.contains(p))
            .copied()
            .collect();
        let (fresh, problems) = self.repo.read_indexes(missing).await?;
        self.remember_packs(&fresh);
        let mut index = crate::repo::ChunkIndex::default();
        // A cached pack that is no longer listed is gone (gc): its chunks are not here.
        for pi in m.found.into_iter().filter(|pi| listed.contains(&pi.pack)) {
            index.insert(pi);
        }
        for pi in fresh {
            index.insert(pi);
        }
        Ok((index, problems))
    }

    /// Adds indexes of packs this process stored to the index cache (best effort: a pack
    /// missing from the cache is only read from the repository next time).
    pub fn remember_packs(&self, packs: &[crate::repo::pack::PackIndex]) {
        if packs.is_empty() {
            return;
        }
        if let Err(e) = crate::repo::index_cache::append(&self.dir, packs) {
            tracing::warn!("could not update the index cache: {e}");
        }
    }

    /// The folder for what lives only while a command runs: sockets of NBD servers started
    /// for a snapshot, the fleece overlay of a running QEMU's disk. Made if missing.
    pub fn run_dir(&self) -> Result<PathBuf> {
        self.dir
            .create_dir_all("run")
            .map_err(|e| Error::io(format!("making {}/run", self.path.display()), e))?;
        Ok(self.path.join("run"))
    }

    /// Shared lock: snapshot writers (many at once) exclude gc, not each other.
    ///
    /// Waits without holding a thread: the daemon runs gc in-process, and blocking workers on
    /// it would leave gc itself no thread to finish on.
    pub async fn lock_repo_shared(&self) -> Result<RepoLock> {
        let f = self.lock_file()?;
        match f.try_lock_shared() {
            Ok(()) => return Ok(RepoLock { _file: f }),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io("locking the repository", e));
            }
        }
        tracing::info!("waiting for gc on this node to finish");
        wait_for_lock(&f, true, "the repository lock").await?;
        Ok(RepoLock { _file: f })
    }

    /// The exclusive lock if no one holds the repository now, else `None`.
    pub fn try_lock_repo_exclusive(&self) -> Result<Option<RepoLock>> {
        let f = self.lock_file()?;
        match f.try_lock() {
            Ok(()) => Ok(Some(RepoLock { _file: f })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io("locking the repository", e)),
        }
    }

    /// Exclusive lock: gc runs alone.
    pub fn lock_repo_exclusive(&self) -> Result<RepoLock> {
        let f = self.lock_file()?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // Snapshots being written, restored or streamed hold it shared; say why we wait.
                tracing::warn!(
                    "waiting for snapshot writers and readers on this node to finish \
                     (snapshot create/restore/read/verify)"
                );
                f.lock()
                    .map_err(|e| Error::io("locking the repository", e))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io("locking the repository", e));
            }
        }
        Ok(RepoLock { _file: f })
    }

    /// Removes the temporary files of writes that a crash interrupted (`name#digits`, the
    /// local store's staging names). Only call with the exclusive repository lock held.
    pub fn clean_staging_files(&self) {
        fn walk(dir: &Dir, removed: &mut u64) {
            let Ok(entries) = dir.entries() else { return };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                match entry.file_type() {
                    Ok(t) if t.is_dir() => {
                        if let Ok(sub) = dir.open_dir(&name) {
                            walk(&sub, removed);
                        }
                    }
                    Ok(_) => {
                        let staging = name.split_once('#').is_some_and(|(_, n)| {
                            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                        });
                        if staging && dir.remove_file(&name).is_ok() {
                            *removed += 1;
                        }
                    }
                    Err(_) => {}
                }
            }
        }
        let mut removed = 0;
        if let Ok(repo) = self.dir.open_dir("repo") {
            walk(&repo, &mut removed);
        }
        if removed > 0 {
            tracing::info!(removed, "removed staging files of interrupted writes");
        }
    }

    fn lock_file(&self) -> Result<std::fs::File> {
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(true);
        self.dir
            .open_with("repo.lock", &o)
            .map(|f| f.into_std())
            .map_err(|e| Error::io(format!("opening {}/repo.lock", self.path.display()), e))
    }
}

/// Makes the state directory 0700 if others could enter it (a release before this one left it
/// 0755): the repository and catalog inside are then out of other users' reach, whatever the
/// modes of the files.
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("making {} private (chmod 700)", path.display()), e))?;
        tracing::warn!(
            "{} was mode {mode:o}, open to other users; made it 0700",
            path.display()
        );
    }
    Ok(())
}

/// Refuses a secret (a token or key file) that users other than its owner can read or write,
/// or that another user owns (who could change it, or its mode, at will), as ssh refuses such
/// a private key. Root may own it too (a key an administrator installed for a service user).
pub fn check_private(path: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(Error::invalid(format!(
            "{what} {} is owned by user {}, not by this process's user ({me}) or root: its \
             owner can change it. Run `chown {me} {}` (or give it to root); holdfast uses no \
             secret another user controls",
            path.display(),
            meta.uid(),
            path.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::invalid(format!(
            "{what} {} is mode {mode:o}: other users can read or change it. Run `chmod 600 \
             {}`; holdfast uses no secret others can reach",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

fn open_dir(path: &Path) -> Result<Dir> {
    Dir::open_ambient_dir(path, ambient_authority())
        .map_err(|e| Error::io(format!("opening state directory {}", path.display()), e))
}

fn open_catalog(dir: &Dir, path: &Path) -> Result<Catalog> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true);
    let f = dir
        .open_with("catalog.redb", &o)
        .map_err(|e| Error::io(format!("opening {}/catalog.redb", path.display()), e))?;
    let catalog = Catalog::open_file(f.into_std())?;
    crate::softlock::registry::ensure_tables_in(catalog.db())?;
    Ok(catalog)
}

/// Writes `name` in `dir` atomically and durably: temp file, fsync, rename, fsync directory.
pub fn write_atomic(dir: &Dir, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = format!(".{name}.tmp");
    {
        let mut o = OpenOptions::new();
        o.write(true).create(true).truncate(true);
        let mut f = dir.open_with(&tmp, &o)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    dir.rename(&tmp, dir, name)?;
    dir.open(".")?.sync_all()
}

/// Waits for an advisory lock on `f` (shared or exclusive) without holding a thread, looking
/// every 50 ms; gives up when the process is asked to stop (a stopping daemon must not wait
/// for another command's lock).
pub(crate) async fn wait_for_lock(f: &std::fs::File, shared: bool, what: &str) -> Result<()> {
    loop {
        let r = if shared {
            f.try_lock_shared()
        } else {
            f.try_lock()
        };
        match r {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("locking {what}"), e));
            }
        }
        crate::shutdown::check(&format!("waiting for {what}"))?;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
