//! Retries around an object store for what its own client does not retry: a listing or a
//! body cut off half-way (the status was 200, the bytes stopped), a connection reset while a
//! request body was being sent. Every operation holdfast does on a target is safe to repeat:
//! reads and lists are, deletes of a gone object succeed, and writes are create-only under
//! names never used for other bytes (a create that landed before the reset comes back as
//! "exists", which each caller already treats as done). Multipart uploads are left to
//! `object_store`, which retries each part.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// An object store whose operations are retried, with back-off, for up to `budget`.
#[derive(Debug)]
pub struct RetryStore {
    inner: Arc<dyn ObjectStore>,
    budget: Duration,
}

impl RetryStore {
    pub fn new(inner: Arc<dyn ObjectStore>, budget: Duration) -> Self {
        RetryStore { inner, budget }
    }
}

/// Whether an error may go away when the same request is sent again: a failed connection,
/// a cut body, a server error the client gave up on. Answers that are the store's verdict (not
/// found, exists, a failed condition, refused credentials) are final.
fn transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

async fn retry<T, F, Fut>(budget: Duration, what: &str, mut op: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = object_store::Result<T>>,
{
    let t0 = Instant::now();
    let mut delay = Duration::from_millis(200);
    for attempt in 1u32.. {
        match op().await {
            Err(e) if transient(&e) && t0.elapsed() + delay < budget => {
                tracing::warn!(attempt, "{what} failed, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
    unreachable!("the loop returns")
}

impl fmt::Display for RetryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Retrying({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let what = format!("writing {location}");
        retry(self.budget, &what, || {
            self.inner.put_opts(location, payload.clone(), opts.clone())
        })
        .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    /// Reads the whole answer inside the retry, so that a body cut half-way is sent for
    /// again. (Every read holdfast makes of a target takes the whole object or range.)
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let what = format!("reading {location}");
        retry(self.budget, &what, || {
            let options = options.clone();
            async move {
                let r = self.inner.get_opts(location, options).await?;
                let (meta, range, attributes, extensions) = (
                    r.meta.clone(),
                    r.range.clone(),
                    r.attributes.clone(),
                    r.extensions.clone(),
                );
                let body: Bytes = r.bytes().await?;
                Ok(GetResult {
                    payload: GetResultPayload::Stream(
                        futures::stream::once(async move { Ok(body) }).boxed(),
                    ),
                    meta,
                    range,
                    attributes,
                    extensions,
                })
            }
        })
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let (inner, budget) = (self.inner.clone(), self.budget);
        locations
            .and_then(move |p| {
                let inner = inner.clone();
                async move {
                    let what = format!("deleting {p}");
                    retry(budget, &what, || inner.delete(&p)).await?;
                    Ok(p)
                }
            })
            .boxed()
    }

    /// Lists everything inside the retry: a listing cut off half-way is listed again.
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (inner, budget, prefix) = (self.inner.clone(), self.budget, prefix.cloned());
        futures::stream::once(async move {
            let what = format!(
                "listing {}",
                prefix
                    .as_ref()
                    .map_or("the store".into(), |p| p.to_string())
            );
            retry(budget, &what, || {
                inner.list(prefix.as_ref()).try_collect::<Vec<ObjectMeta>>()
            })
            .await
        })
        .map_ok(|all| futures::stream::iter(all.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        retry(self.budget, "listing", || {
            self.inner.list_with_delimiter(prefix)
        })
        .await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let what = format!("copying {from}");
        retry(self.budget, &what, || {
            self.inner.copy_opts(from, to, options.clone())
        })
        .await
    }
}
