//! Taking a snapshot: etcd's stream to a committed object, in one pass,
//! with bounded memory and no temporary file.
//!
//! ```text
//!  etcd Maintenance.Snapshot ──▶ reader task ──▶ compressor thread ──▶ uploader ──▶ object store
//!   (gRPC, ~32 KiB chunks)       trailing SHA-256   zstd ▸ age          SHA-256 of     multipart parts
//!                                check, batching    (blocking pool)     stored bytes
//!                 bounded channel ─┘     bounded channel ─┘    ≤ concurrency parts in flight ─┘
//! ```
//!
//! Each stage talks to the next through a bounded channel, so a slow store
//! slows the etcd stream down instead of buffering it: memory is about
//! `RAW_CHANNEL × RAW_BATCH + STORED_CHANNEL × STORED_CHUNK + partSize ×
//! (concurrency + 1)` plus zstd's window, whatever the database size.
//!
//! Nothing is committed until everything checked out: etcd's trailer
//! matched, the upload completed, the object has the size we wrote, and
//! (for scheduled snapshots) this instance still leads. Only then is the
//! manifest written; any failure before that aborts the multipart upload or
//! deletes the object, and no manifest exists.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use etcd_client::SnapshotStreaming;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::Engine;
use crate::error::{BackupError, Corruption, Result};
use crate::etcd::{EtcdConnector, MemberStatus, classify};
use crate::pipeline::codec::{BufferPool, ChunkSink, Encoder};
use crate::pipeline::hashing::{Sha256, TrailerVerifier};
use crate::pipeline::upload::PartUploader;
use crate::snapshot::manifest::{
    Compression, Encryption, EtcdSource, FORMAT_VERSION, Manifest, Trigger,
};
use crate::store::layout;

/// Raw bytes are batched to this size before crossing to the compressor.
const RAW_BATCH: usize = 256 * 1024;
/// Batches queued for the compressor.
const RAW_CHANNEL: usize = 8;
/// Compressed bytes are handed to the uploader in chunks of this size.
const STORED_CHUNK: usize = 1024 * 1024;
/// Chunks queued for the uploader.
const STORED_CHANNEL: usize = 4;
/// Idle buffers each pool keeps: enough for everything the stages can
/// hold at once, so the steady state allocates nothing.
const POOL_KEEP: usize = 64;

/// What to snapshot and why.
#[derive(Clone, Debug)]
pub struct SnapshotOptions {
    /// Why.
    pub trigger: Trigger,
    /// The schedule tick, for scheduled snapshots.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// Free text for the manifest.
    pub note: String,
    /// A member by name instead of the configured choice.
    pub member_name: Option<String>,
}

impl SnapshotOptions {
    /// An on-demand snapshot.
    pub fn manual(note: impl Into<String>) -> Self {
        Self {
            trigger: Trigger::Manual,
            scheduled_for: None,
            note: note.into(),
            member_name: None,
        }
    }
}

/// Progress of a snapshot, for the API's stream and logs.
#[derive(Clone, Debug)]
pub enum SnapshotEvent {
    /// The id is chosen and etcd is about to stream.
    Connecting {
        /// Snapshot id.
        id: String,
        /// Endpoint used.
        endpoint: String,
        /// Member name.
        member_name: String,
        /// Revision before the snapshot.
        revision: i64,
    },
    /// About once a second while streaming.
    Streaming {
        /// Bytes received from etcd.
        raw_bytes: u64,
        /// Bytes handed to the store.
        stored_bytes: u64,
        /// etcd's database size, an estimate of the total.
        raw_expected: u64,
        /// Time since streaming began.
        elapsed: Duration,
    },
    /// Everything checked out; the manifest is being written.
    Committing {
        /// Manifest key.
        manifest_key: String,
    },
}

/// Something the pipeline reports to; `()` ignores progress.
pub trait Progress: Send + Sync {
    /// One event.
    fn event(&self, event: SnapshotEvent);
}

impl Progress for () {
    fn event(&self, _: SnapshotEvent) {}
}

impl<F: Fn(SnapshotEvent) + Send + Sync> Progress for F {
    fn event(&self, event: SnapshotEvent) {
        self(event)
    }
}

enum Chunk {
    /// A batch from the raw pool; the compressor gives it back.
    Data(Vec<u8>),
    End,
}

/// Why a stage stopped: its own failure, or a later stage going away.
enum StageError {
    Failed(BackupError),
    DownstreamGone,
}

/// One snapshot being taken: what its steps share.
struct Taking<'a> {
    options: &'a SnapshotOptions,
    member: &'a MemberStatus,
    /// A client with the request timeout, for the short calls.
    short: etcd_client::Client,
    /// The revision when the snapshot began.
    revision: i64,
    started_at: DateTime<Utc>,
    id: &'a str,
    progress: &'a dyn Progress,
    cancel: &'a CancellationToken,
    may_commit: &'a (dyn Fn() -> Result<()> + Send + Sync),
}

/// The uploaded object: its hash and size, and the key it is sealed to.
struct Stored {
    sha256: String,
    size: u64,
    key_id: Option<crate::pipeline::encryption::KeyId>,
}

/// What the reader learnt.
struct ReadOutcome {
    etcd_sha256: String,
    raw_size: u64,
    revision_max: i64,
}

impl Engine {
    /// Takes one snapshot and commits it. `may_commit` is asked right before
    /// the manifest is written (scheduled snapshots check they still lead);
    /// an `Err` from it aborts the snapshot.
    pub async fn take_snapshot(
        &self,
        options: SnapshotOptions,
        progress: &dyn Progress,
        cancel: &CancellationToken,
        may_commit: &(dyn Fn() -> Result<()> + Send + Sync),
    ) -> Result<Manifest> {
        let member = self
            .etcd
            .choose_member(self.pipeline.member_choice, options.member_name.as_deref())
            .await?;
        let eps = [member.endpoint.clone()];
        let mut short = self.etcd.client_for(&eps, true).await?;
        let revision = EtcdConnector::revision(&mut short, &member.endpoint).await?;
        let started_at = Utc::now();
        let id = layout::new_snapshot_id(started_at, revision);
        progress.event(SnapshotEvent::Connecting {
            id: id.clone(),
            endpoint: member.endpoint.clone(),
            member_name: member.member_name.clone(),
            revision,
        });
        let span = tracing::info_span!("snapshot", snapshot_id = %id, member = %member.member_name);
        async {
            tracing::info!(endpoint = %member.endpoint, revision, "taking snapshot");
            let result = self
                .stream_and_commit(Taking {
                    options: &options,
                    member: &member,
                    short,
                    revision,
                    started_at,
                    id: &id,
                    progress,
                    cancel,
                    may_commit,
                })
                .await;
            match &result {
                Ok(m) => {
                    tracing::info!(
                        raw = m.raw_size_bytes,
                        stored = m.stored_size_bytes,
                        revision = m.revision,
                        "snapshot committed"
                    );
                    // The snapshot stands either way; the next commit
                    // writes a record this one could not.
                    if let Err(e) = self.note_cluster(m).await {
                        tracing::warn!(error = %e, "could not record the snapshot's etcd cluster; the next snapshot will");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "snapshot failed; nothing committed"),
            }
            result
        }
        .instrument(span)
        .await
    }

    /// Streams etcd's snapshot through the stages into the store, then
    /// commits it; the object is removed again if the commit fails.
    async fn stream_and_commit(&self, t: Taking<'_>) -> Result<Manifest> {
        let (member, id, cancel) = (t.member, t.id, t.cancel);
        let eps = [member.endpoint.clone()];
        let recipient = self.keys.recipient().map(|(k, r)| (k.clone(), r.clone()));
        let data_path = self.layout.data(id, true, recipient.is_some());
        let described = self.store.describe(&data_path);

        let mut stream_client = self.etcd.client_for(&eps, false).await?;
        let stream = stream_client
            .snapshot()
            .await
            .map_err(|e| classify(&eps, "snapshot", &e))?;
        let mut uploader = self.open_upload(&data_path, &described).await?;

        let (raw_tx, raw_rx) = mpsc::channel::<Chunk>(RAW_CHANNEL);
        let (stored_tx, stored_rx) = mpsc::channel::<Bytes>(STORED_CHANNEL);
        let raw_counter = Arc::new(AtomicU64::new(0));
        let stage_cancel = cancel.child_token();

        let raw_pool = BufferPool::new(RAW_BATCH, POOL_KEEP);
        let compressor = self.spawn_compressor(
            raw_rx,
            raw_pool.clone(),
            stored_tx,
            recipient.as_ref().map(|(_, r)| r.clone()),
        );
        let reader = tokio::spawn(
            read_etcd(
                stream,
                raw_tx,
                raw_pool,
                self.pipeline.stall_timeout,
                stage_cancel.clone(),
                raw_counter.clone(),
                t.short.clone(),
                member.endpoint.clone(),
            )
            .in_current_span(),
        );

        // Upload on this task: hash what is stored, hand parts to the store.
        let (stored_hash, upload_error) = upload_stored(
            stored_rx,
            &mut uploader,
            &stage_cancel,
            &described,
            &|stored_bytes, elapsed| {
                t.progress.event(SnapshotEvent::Streaming {
                    raw_bytes: raw_counter.load(Ordering::Relaxed),
                    stored_bytes,
                    raw_expected: member.db_size,
                    elapsed,
                })
            },
        )
        .await;
        // Stop the other stages if the upload failed; they see closed
        // channels and a cancelled token.
        if upload_error.is_some() {
            stage_cancel.cancel();
        }
        let read = joined(reader.await, "snapshot reader task");
        let compressed = joined(compressor.await, "compressor task");
        let read = match root_cause(read, upload_error, compressed) {
            Ok(o) => o,
            Err(e) => {
                uploader.abort().await;
                return Err(if cancel.is_cancelled() {
                    BackupError::Cancelled(format!("snapshot {id} stopped: {e}"))
                } else {
                    e
                });
            }
        };
        uploader
            .finish()
            .await
            .map_err(|e| BackupError::store(described.clone(), e))?;
        let (sha256, size) = stored_hash.finish_hex();
        let stored = Stored {
            sha256,
            size,
            key_id: recipient.map(|(k, _)| k),
        };

        // From here on the object exists: remove it on any failure.
        let committed = self.commit(t, read, stored, &data_path).await;
        if committed.is_err()
            && let Err(e) = self.store.inner().delete(&data_path).await
        {
            tracing::warn!(error = %e, "removing the uncommitted snapshot object failed; garbage collection will");
        }
        committed
    }

    /// Starts the compressor (zstd, then age to `sealing_to`) on a blocking
    /// thread, between the reader's raw batches and the uploader.
    fn spawn_compressor(
        &self,
        raw_rx: mpsc::Receiver<Chunk>,
        raw_pool: BufferPool,
        stored_tx: mpsc::Sender<Bytes>,
        sealing_to: Option<age::x25519::Recipient>,
    ) -> tokio::task::JoinHandle<Result<(), StageError>> {
        let level = self.pipeline.level;
        let workers = self.pipeline.workers;
        tokio::task::spawn_blocking(move || {
            compress(
                raw_rx,
                &raw_pool,
                stored_tx,
                level,
                workers,
                sealing_to.as_ref(),
            )
        })
    }

    /// Starts the multipart upload of the snapshot object; a missing bucket
    /// is the store being unavailable, not a missing snapshot.
    async fn open_upload(&self, data_path: &Path, described: &str) -> Result<PartUploader> {
        let upload = self
            .store
            .inner()
            .put_multipart(data_path)
            .await
            .map_err(|e| BackupError::store(described, e))
            .map_err(|e| match e {
                BackupError::NotFound { .. } => BackupError::StoreUnavailable {
                    location: described.to_owned(),
                    detail: "the bucket or container does not exist".into(),
                },
                other => other,
            })?;
        Ok(PartUploader::new(
            upload,
            self.pipeline.part_size,
            self.pipeline.upload_concurrency,
        ))
    }

    /// The commit: the object's size checked, the key count read, the
    /// caller asked (`may_commit`), then the manifest written.
    async fn commit(
        &self,
        t: Taking<'_>,
        read: ReadOutcome,
        stored: Stored,
        data_path: &Path,
    ) -> Result<Manifest> {
        let Taking {
            options,
            member,
            mut short,
            revision,
            started_at,
            id,
            progress,
            cancel,
            may_commit,
        } = t;
        let Stored {
            sha256: stored_sha256,
            size: stored_size,
            key_id,
        } = stored;
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled(format!(
                "snapshot {id} stopped before commit"
            )));
        }
        let meta = self
            .store
            .inner()
            .head(data_path)
            .await
            .map_err(|e| BackupError::store(self.store.describe(data_path), e))?;
        if meta.size != stored_size {
            return Err(BackupError::Corrupt {
                kind: Corruption::StoredSize,
                what: self.store.describe(data_path),
                detail: format!("wrote {stored_size} bytes, the store holds {}", meta.size),
            });
        }
        // The key count is exact only when no write raced the snapshot.
        let key_count = if read.revision_max == revision {
            match EtcdConnector::key_count(&mut short, &member.endpoint, revision).await {
                Ok((n, _)) => Some(n),
                Err(e) => {
                    tracing::debug!(error = %e, "counting keys failed; the manifest will not have a key count");
                    None
                }
            }
        } else {
            None
        };
        may_commit()?;
        let manifest_path = self.layout.manifest(id);
        progress.event(SnapshotEvent::Committing {
            manifest_key: self.layout.relative(self.store.prefix(), &manifest_path),
        });
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            id: id.to_owned(),
            trigger: options.trigger,
            scheduled_for: options.scheduled_for,
            cluster_name: self.cluster_name.clone(),
            etcd: EtcdSource {
                cluster_id: format!("{:016x}", member.cluster_id),
                member_id: format!("{:016x}", member.member_id),
                member_name: member.member_name.clone(),
                endpoint: member.endpoint.clone(),
                etcd_version: member.version.clone(),
            },
            revision,
            revision_max: read.revision_max.max(revision),
            key_count,
            raw_size_bytes: read.raw_size,
            stored_size_bytes: stored_size,
            etcd_sha256: read.etcd_sha256,
            stored_sha256,
            compression: Compression::Zstd {
                level: self.pipeline.level,
            },
            encryption: match key_id {
                Some(k) => Encryption::AgeX25519 {
                    key_id: k.as_str().to_owned(),
                },
                None => Encryption::None,
            },
            object_key: self.layout.relative(self.store.prefix(), data_path),
            started_at,
            finished_at: Utc::now(),
            taken_by: self.node_name.clone(),
            note: options.note.clone(),
        };
        self.store
            .inner()
            .put(&manifest_path, PutPayload::from(manifest.to_json()))
            .await
            .map_err(|e| BackupError::store(self.store.describe(&manifest_path), e))?;
        Ok(manifest)
    }
}

/// The reader stage: etcd's stream, trailer check, batches to the compressor.
/// Hands the stored chunks to the uploader, hashing them, until the
/// compressor is done or the upload fails; reports the stored bytes about
/// once a second. Returns the stored bytes' hash and the upload's error.
async fn upload_stored(
    mut stored_rx: mpsc::Receiver<Bytes>,
    uploader: &mut PartUploader,
    stage_cancel: &CancellationToken,
    described: &str,
    report: &(dyn Fn(u64, Duration) + Send + Sync),
) -> (Sha256, Option<BackupError>) {
    let streaming_since = Instant::now();
    let mut last_report = Instant::now();
    let mut stored_hash = Sha256::new();
    while let Some(bytes) = stored_rx.recv().await {
        stored_hash.update(&bytes);
        uploader.put(bytes);
        let waited = tokio::select! {
            r = uploader.wait_for_capacity() => r,
            _ = stage_cancel.cancelled() => Ok(()),
        };
        if let Err(e) = waited {
            return (stored_hash, Some(BackupError::store(described, e)));
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            report(stored_hash.len(), streaming_since.elapsed());
        }
    }
    (stored_hash, None)
}

/// A stage task's outcome; a panicked task is a failure of its own.
fn joined<T>(
    r: std::result::Result<Result<T, StageError>, tokio::task::JoinError>,
    what: &str,
) -> Result<T, StageError> {
    r.unwrap_or_else(|e| Err(StageError::Failed(BackupError::local(what, e))))
}

/// The stages' outcomes as one. The root cause wins: a reader failure of
/// its own (etcd, trailer) over the upload's, the upload's over the
/// compressor's, and the reader's "stopped because of cancellation" only
/// when nothing else explains it.
fn root_cause(
    read: Result<ReadOutcome, StageError>,
    upload_error: Option<BackupError>,
    compressed: Result<(), StageError>,
) -> Result<ReadOutcome> {
    let reader_cancelled = matches!(&read, Err(StageError::Failed(BackupError::Cancelled(_))));
    match (read, upload_error, compressed) {
        (Err(StageError::Failed(e)), _, _) if !reader_cancelled => Err(e),
        (_, Some(e), _) => Err(e),
        (_, None, Err(StageError::Failed(e))) => Err(e),
        (Err(StageError::Failed(e)), None, _) => Err(e),
        (Err(StageError::DownstreamGone), None, _) | (_, None, Err(StageError::DownstreamGone)) => {
            Err(BackupError::local(
                "snapshot pipeline",
                "a stage stopped without an error",
            ))
        }
        (Ok(o), None, Ok(())) => Ok(o),
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_etcd(
    mut stream: SnapshotStreaming,
    tx: mpsc::Sender<Chunk>,
    pool: BufferPool,
    stall: Duration,
    cancel: CancellationToken,
    raw_counter: Arc<AtomicU64>,
    short: etcd_client::Client,
    endpoint: String,
) -> Result<ReadOutcome, StageError> {
    let eps = [endpoint.clone()];
    let mut verifier = TrailerVerifier::new();
    let mut batch = pool.take();
    let mut revision_probe: Option<oneshot::Receiver<Result<i64>>> = None;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => {
                return Err(StageError::Failed(BackupError::Cancelled("snapshot stream stopped".into())));
            }
            r = tokio::time::timeout(stall, stream.message()) => r,
        };
        let message = match next {
            Err(_) => {
                return Err(StageError::Failed(BackupError::EtcdUnavailable {
                    endpoints: endpoint,
                    detail: format!(
                        "the snapshot stream stalled: no data for {}",
                        humantime::format_duration(stall)
                    ),
                }));
            }
            Ok(Err(e)) => return Err(StageError::Failed(classify(&eps, "snapshot stream", &e))),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(m))) => m,
        };
        if revision_probe.is_none() {
            // etcd has taken its backend snapshot before sending the first
            // chunk: the revision now is an upper bound of the snapshot's.
            let (tx, rx) = oneshot::channel();
            let mut c = short.clone();
            let ep = endpoint.clone();
            tokio::spawn(async move {
                let _ = tx.send(EtcdConnector::revision(&mut c, &ep).await);
            });
            revision_probe = Some(rx);
        }
        let blob = message.blob();
        verifier.update(blob);
        raw_counter.fetch_add(blob.len() as u64, Ordering::Relaxed);
        // Fill batches to their size exactly: a batch that grew would be a
        // fresh allocation.
        let mut blob = blob;
        while !blob.is_empty() {
            let n = (RAW_BATCH - batch.len()).min(blob.len());
            batch.extend_from_slice(&blob[..n]);
            blob = &blob[n..];
            if batch.len() == RAW_BATCH {
                let full = std::mem::replace(&mut batch, pool.take());
                if tx.send(Chunk::Data(full)).await.is_err() {
                    return Err(StageError::DownstreamGone);
                }
            }
        }
    }
    if !batch.is_empty() && tx.send(Chunk::Data(batch)).await.is_err() {
        return Err(StageError::DownstreamGone);
    }
    let (etcd_sha256, raw_size) = verifier.finish().map_err(|e| {
        StageError::Failed(BackupError::Corrupt {
            kind: Corruption::EtcdHash,
            what: format!("snapshot stream from {endpoint}"),
            detail: e.to_string(),
        })
    })?;
    let revision_max = match revision_probe {
        Some(rx) => match rx.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(StageError::Failed(e)),
            Err(_) => 0,
        },
        None => 0,
    };
    if tx.send(Chunk::End).await.is_err() {
        return Err(StageError::DownstreamGone);
    }
    Ok(ReadOutcome {
        etcd_sha256,
        raw_size,
        revision_max,
    })
}

/// The compressor stage (blocking thread): zstd, then age, in chunks to
/// the uploader.
fn compress(
    mut rx: mpsc::Receiver<Chunk>,
    raw_pool: &BufferPool,
    tx: mpsc::Sender<Bytes>,
    level: i32,
    workers: u32,
    recipient: Option<&age::x25519::Recipient>,
) -> Result<(), StageError> {
    use std::io::Write;
    let failed = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            StageError::DownstreamGone
        } else {
            StageError::Failed(BackupError::local("compressing and encrypting", e))
        }
    };
    let sink = ChunkSink::new(tx, BufferPool::new(STORED_CHUNK, POOL_KEEP));
    let mut encoder = Encoder::new(sink, level, workers, recipient).map_err(failed)?;
    loop {
        match rx.blocking_recv() {
            Some(Chunk::Data(b)) => {
                encoder.write_all(&b).map_err(failed)?;
                raw_pool.give(b);
            }
            Some(Chunk::End) => {
                return encoder.finish().and_then(ChunkSink::finish).map_err(failed);
            }
            // The reader stopped without End: it failed and says why.
            None => return Err(StageError::DownstreamGone),
        }
    }
}
