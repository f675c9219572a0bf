//! A node's own repository on local disk, read without following symbolic links: a link placed
//! inside `repo/` (a manifest replaced by a link to `/etc/passwd`, say) is refused, never
//! restored or served to a peer. Reads go through the repository's directory handle (cap-std,
//! so nothing outside it is reached), and a file is read only if the name is a regular file
//! and the file opened is that same file (a link swapped in between is caught). Writes, lists
//! and deletes are `LocalFileSystem`'s.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cap_std::fs::{Dir, MetadataExt};
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

const STORE: &str = "LocalFileSystem";

/// `LocalFileSystem`, but reads refuse symbolic links.
#[derive(Debug)]
pub struct NoFollowStore {
    inner: LocalFileSystem,
    root: Arc<Dir>,
    location: String,
}

impl NoFollowStore {
    pub fn new(inner: LocalFileSystem, root: Arc<Dir>, location: String) -> Self {
        NoFollowStore {
            inner,
            root,
            location,
        }
    }

    /// Opens `key` for reading if it is a regular file reached without a final link.
    fn open(root: &Dir, key: &str) -> object_store::Result<(std::fs::File, ObjectMeta)> {
        let fail = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::NotFound {
                object_store::Error::NotFound {
                    path: key.to_string(),
                    source: Box::new(source),
                }
            } else {
                object_store::Error::Generic {
                    store: STORE,
                    source: Box::new(std::io::Error::new(
                        source.kind(),
                        format!("reading {key}: {source}"),
                    )),
                }
            }
        };
        let refuse = |why: &str| object_store::Error::Generic {
            store: STORE,
            source: format!("{key} in the repository is {why}; refusing to read it").into(),
        };
        let named = root.symlink_metadata(key).map_err(fail)?;
        if named.file_type().is_symlink() {
            return Err(refuse("a symbolic link"));
        }
        if !named.is_file() {
            return Err(refuse("not a regular file"));
        }
        let file = root.open(key).map_err(fail)?;
        let opened = file.metadata().map_err(fail)?;
        if (opened.dev(), opened.ino()) != (named.dev(), named.ino()) {
            return Err(refuse("replaced while it was opened"));
        }
        let modified = opened
            .modified()
            .map(|t| t.into_std())
            .unwrap_or(std::time::UNIX_EPOCH);
        let meta = ObjectMeta {
            location: Path::from(key),
            last_modified: chrono::DateTime::<chrono::Utc>::from(modified),
            size: opened.len(),
            e_tag: None,
            version: None,
        };
        Ok((file.into_std(), meta))
    }
}

impl fmt::Display for NoFollowStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NoFollowStore({})", self.location)
    }
}

#[async_trait]
impl ObjectStore for NoFollowStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let (root, key) = (self.root.clone(), location.to_string());
        let (file, meta) = tokio::task::spawn_blocking(move || Self::open(&root, &key))
            .await
            .map_err(|e| object_store::Error::Generic {
                store: STORE,
                source: Box::new(e),
            })??;
        options.check_preconditions(&meta)?;
        let range = match &options.range {
            Some(r) => r
                .as_range(meta.size)
                .map_err(|e| object_store::Error::Generic {
                    store: STORE,
                    source: Box::new(e),
                })?,
            None => 0..meta.size,
        };
        let path = std::path::PathBuf::from(location.to_string());
        Ok(GetResult {
            payload: GetResultPayload::File(file, path),
            meta,
            range,
            attributes: Default::default(),
            extensions: Default::default(),
        })
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let (root, key, ranges) = (self.root.clone(), location.to_string(), ranges.to_vec());
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let (file, meta) = Self::open(&root, &key)?;
            // Ranged reads are pack reads (`Repository::read_pack_ranges`: a restore, a
            // verify, a peer or a target being sent packs): rare, and larger than the page
            // cache can keep. They read what was asked without readahead (which would still be
            // filling pages past it when the reader is done) and drop what they read from the
            // page cache, as packs bypass it when they are written.
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Random);
            let out = ranges
                .iter()
                .map(|r| {
                    if r.start > r.end {
                        return Err(object_store::Error::Generic {
                            store: STORE,
                            source: format!("range {r:?} of {key} is inverted").into(),
                        });
                    }
                    // A file shorter than the range (a truncated pack) gives what it holds:
                    // the caller reports the damage.
                    let want = r.end.min(meta.size).saturating_sub(r.start) as usize;
                    let mut buf = vec![0; want];
                    let mut got = 0;
                    while got < want {
                        match file.read_at(&mut buf[got..], r.start + got as u64) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                return Err(object_store::Error::Generic {
                                    store: STORE,
                                    source: Box::new(e),
                                });
                            }
                        }
                    }
                    buf.truncate(got);
                    Ok(Bytes::from(buf))
                })
                .collect();
            // Whole pages: the kernel keeps a page only partly inside the range given.
            let page = rustix::param::page_size() as u64;
            for r in &ranges {
                let start = r.start / page * page;
                let end = r.end.div_ceil(page) * page;
                if let Some(len) = std::num::NonZeroU64::new(end.saturating_sub(start)) {
                    let _ =
                        rustix::fs::fadvise(&file, start, Some(len), rustix::fs::Advice::DontNeed);
                }
            }
            out
        })
        .await
        .map_err(|e| object_store::Error::Generic {
            store: STORE,
            source: Box::new(e),
        })?
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use object_store::ObjectStoreExt;

    use super::*;

    #[tokio::test]
    async fn links_in_the_repository_are_never_read() {
        // A regular file reads; a link to a file outside, and a link to a file inside, are
        // refused by get and get_ranges alike, and the error names the key.
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"secret").unwrap();
        std::fs::create_dir(dir.path().join("manifests")).unwrap();
        std::fs::write(dir.path().join("manifests/real"), b"manifest").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("manifests/out")).unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("manifests/in")).unwrap();
        let repo = crate::repo::Repository::local(dir.path()).unwrap();
        let store = &repo.store;
        let real = store.get(&Path::from("manifests/real")).await.unwrap();
        assert_eq!(real.bytes().await.unwrap(), &b"manifest"[..]);
        let ranges = store
            .get_ranges(&Path::from("manifests/real"), &[1..3, 4..8])
            .await
            .unwrap();
        assert_eq!(ranges, vec![Bytes::from("an"), Bytes::from("fest")]);
        for key in ["manifests/out", "manifests/in"] {
            let err = store.get(&Path::from(key)).await.unwrap_err().to_string();
            assert!(err.contains("symbolic link") && err.contains(key), "{err}");
            assert!(
                store
                    .get_ranges(&Path::from(key), &[0..2, 2..3])
                    .await
                    .is_err()
            );
        }
        assert!(matches!(
            store.get(&Path::from("manifests/none")).await,
            Err(object_store::Error::NotFound { .. })
        ));
        // Past the end, what the file holds (the caller names the damage).
        let short = store
            .get_ranges(&Path::from("manifests/real"), &[0..1, 4..9, 20..30])
            .await
            .unwrap();
        assert_eq!(
            short,
            vec![Bytes::from("m"), Bytes::from("fest"), Bytes::new()]
        );
    }
}
