//! Fault injection: an [`ObjectStore`] wrapper that fails on demand.
//!
//! The idea is neon's `UnreliableWrapper` (remote storage that fails the
//! first attempts of chosen operations); this is our own, shaped by what
//! the snapshot pipeline must survive: parts failing mid-upload, the final
//! complete failing, and the manifest write (the commit point) failing; and
//! what a restore must survive: a download breaking off mid-object.
//! Tests arm a [`Faults`] plan, run a backup through a store wrapped in
//! [`UnreliableStore`], and check that nothing was committed and nothing
//! was left behind. Each fault fires a set number of times, then the store
//! behaves again, so "fails N times, then the retry succeeds" is testable.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

/// What to break, and how often. Shared between a test and the wrapper.
#[derive(Debug, Default)]
pub struct Faults {
    parts_to_skip: AtomicUsize,
    part_failures: AtomicUsize,
    complete_failures: AtomicUsize,
    manifest_failures: AtomicUsize,
    download_failures: AtomicUsize,
    parts_seen: AtomicUsize,
    injected: AtomicUsize,
    part_delay_ms: AtomicU64,
}

impl Faults {
    /// A plan that breaks nothing yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The next `n` part uploads fail, after `skip` more have succeeded
    /// (so the failure lands mid-upload).
    pub fn fail_parts(&self, skip: usize, n: usize) {
        self.parts_to_skip.store(skip, Ordering::SeqCst);
        self.part_failures.store(n, Ordering::SeqCst);
    }

    /// The next `n` multipart completions fail.
    pub fn fail_completes(&self, n: usize) {
        self.complete_failures.store(n, Ordering::SeqCst);
    }

    /// The next `n` writes of a `manifest.json` fail.
    pub fn fail_manifest_puts(&self, n: usize) {
        self.manifest_failures.store(n, Ordering::SeqCst);
    }

    /// The next `n` downloads of an object other than a `.json` file
    /// (manifests, records) break off half-way: the first half of the
    /// object arrives, then the stream fails.
    pub fn fail_downloads(&self, n: usize) {
        self.download_failures.store(n, Ordering::SeqCst);
    }

    /// Every part upload from now on takes `delay` longer: a slow store,
    /// which backpressure must turn into a slow etcd stream.
    pub fn delay_parts(&self, delay: Duration) {
        self.part_delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// Faults injected so far.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::SeqCst)
    }

    /// Part uploads attempted so far.
    pub fn parts_seen(&self) -> usize {
        self.parts_seen.load(Ordering::SeqCst)
    }

    /// Consumes one unit of `counter` if it is non-zero.
    fn take(&self, counter: &AtomicUsize) -> bool {
        let fired = counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fired {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        fired
    }

    fn part_should_fail(&self) -> bool {
        self.parts_seen.fetch_add(1, Ordering::SeqCst);
        if self.part_failures.load(Ordering::SeqCst) == 0 {
            return false;
        }
        if self
            .parts_to_skip
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return false;
        }
        self.take(&self.part_failures)
    }
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "unreliable",
        source: format!("injected failure: {what}").into(),
    }
}

/// A store that fails as its [`Faults`] plan says, and otherwise passes
/// every call through.
#[derive(Debug)]
pub struct UnreliableStore {
    inner: Arc<dyn ObjectStore>,
    faults: Arc<Faults>,
}

impl UnreliableStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Arc<Faults>) -> Self {
        Self { inner, faults }
    }
}

impl fmt::Display for UnreliableStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Unreliable({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for UnreliableStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if location.filename() == Some(bulwark_backup::store::layout::MANIFEST)
            && self.faults.take(&self.faults.manifest_failures)
        {
            return Err(injected("manifest put"));
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(UnreliableUpload {
            inner,
            faults: self.faults.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let result = self.inner.get_opts(location, options).await?;
        if location.extension() == Some("json") || !self.faults.take(&self.faults.download_failures)
        {
            return Ok(result);
        }
        let (meta, range, attributes, extensions) = (
            result.meta.clone(),
            result.range.clone(),
            result.attributes.clone(),
            result.extensions.clone(),
        );
        let half = (range.end - range.start) / 2;
        let mut delivered = 0u64;
        let body = result.into_stream().flat_map(move |chunk| {
            let out = match chunk {
                // Broken off already: nothing more arrives.
                _ if delivered >= half => vec![],
                Ok(c) if delivered + c.len() as u64 >= half => {
                    let keep = c.slice(..usize::try_from(half - delivered).unwrap_or(c.len()));
                    delivered = half;
                    vec![Ok(keep), Err(injected("download"))]
                }
                Ok(c) => {
                    delivered += c.len() as u64;
                    vec![Ok(c)]
                }
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(out)
        });
        Ok(GetResult {
            payload: GetResultPayload::Stream(body.boxed()),
            meta,
            range,
            attributes,
            extensions,
        })
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

/// A multipart upload whose parts and completion fail as planned.
#[derive(Debug)]
struct UnreliableUpload {
    inner: Box<dyn MultipartUpload>,
    faults: Arc<Faults>,
}

#[async_trait]
impl MultipartUpload for UnreliableUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        if self.faults.part_should_fail() {
            return Box::pin(async { Err(injected("part upload")) });
        }
        let part = self.inner.put_part(data);
        match self.faults.part_delay_ms.load(Ordering::SeqCst) {
            0 => part,
            ms => Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                part.await
            }),
        }
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        if self.faults.take(&self.faults.complete_failures) {
            return Err(injected("complete multipart upload"));
        }
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}
