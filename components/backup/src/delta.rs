//! Continuous deltas: every etcd event after a full snapshot, in segments,
//! so a restore can roll the snapshot forward to any later revision or time.
//!
//! The backup leader watches the whole keyspace (with previous values) from
//! the base snapshot's revision + 1 and buffers the events. A segment is
//! written when the oldest buffered event is `flushInterval` old or the
//! buffer reaches `maxSegmentBytes`; with the defaults (500 ms, 4 MiB) what
//! etcd acknowledged is in the store within about a second.
//!
//! A segment goes through the same byte chain as snapshots ([`Encoder`]:
//! zstd, then age) and is committed the same way: the data object first,
//! then a small JSON record that is the commit point; listings read only
//! the records, so a half-written segment is never seen.
//!
//! ```text
//! <root>/delta/<base snapshot id>/<first rev:020>-<last rev:020>.seg.zst[.age]
//! <root>/delta/<base snapshot id>/<first rev:020>-<last rev:020>.json   (commit point)
//! ```
//!
//! Revisions are checked as they arrive: etcd gives every revision at least
//! one event, so the revisions the watch delivers must follow each other
//! without a hole. A hole, or the watch being cancelled because its start
//! was compacted, is a gap: the recorder asks for a new full snapshot and
//! starts again from it. Segments live under their base snapshot's id, so
//! retention deletes them with it.
//!
//! The raw segment format (before zstd and age) is `BWDELTA1` followed by
//! one record per event, integers little-endian:
//! `kind u8 (0 put, 1 delete) | revision i64 | create_revision i64 |
//! version i64 | lease i64 | observed_at_ms i64 | key_len u32 | key |
//! value_len u32 | value`. `revision` is the event's mod revision (for a
//! delete, the revision of the deletion); `observed_at_ms` is when the
//! watcher received it, which is what restoring "to a time" compares with.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use etcd_client::{EventType, WatchOptions};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::codec::{ChannelReader, Decoder, Encoder, Item, Layer};
use crate::engine::Engine;
use crate::error::{BackupError, Corruption, Result};
use crate::etcd::classify;
use crate::hashing::Sha256;
use crate::manifest::{Compression, Encryption};

/// Magic at the start of a raw segment.
const MAGIC: &[u8; 8] = b"BWDELTA1";
/// Fixed bytes per event besides key and value.
const EVENT_OVERHEAD: usize = 1 + 8 * 6 + 4 + 4;
/// Format version of segment records.
pub const SEGMENT_FORMAT_VERSION: u32 = 1;

/// Put or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A key was written.
    Put,
    /// A key was deleted.
    Delete,
}

/// One etcd event as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The revision that made it (mod revision; for a delete, the deletion's).
    pub revision: i64,
    /// The key's create revision (0 for a delete).
    pub create_revision: i64,
    /// The key's version after the event (0 for a delete).
    pub version: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
    /// When the watcher received it, in Unix milliseconds.
    pub observed_at_ms: i64,
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for a delete).
    pub value: Vec<u8>,
}

impl DeltaEvent {
    /// When the watcher received it.
    pub fn observed_at(&self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.observed_at_ms)
            .single()
            .unwrap_or_default()
    }

    fn encoded_len(&self) -> usize {
        EVENT_OVERHEAD + self.key.len() + self.value.len()
    }
}

/// The raw bytes of a segment.
pub fn encode_events(events: &[DeltaEvent]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(MAGIC.len() + events.iter().map(|e| e.encoded_len()).sum::<usize>());
    out.extend_from_slice(MAGIC);
    for e in events {
        out.push(match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        for n in [
            e.revision,
            e.create_revision,
            e.version,
            e.lease,
            e.observed_at_ms,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for b in [&e.key, &e.value] {
            // Keys and values are bounded by etcd's request size (1.5 MiB
            // by default, at most 2 GiB by configuration): u32 holds them.
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
    out
}

/// Parses raw segment bytes; the error says where they stop making sense.
pub fn decode_events(raw: &[u8]) -> std::result::Result<Vec<DeltaEvent>, String> {
    let mut rest = raw
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a delta segment (missing BWDELTA1 header)")?;
    let mut events = Vec::new();
    fn take<'a>(
        rest: &mut &'a [u8],
        n: usize,
        what: &str,
    ) -> std::result::Result<&'a [u8], String> {
        if rest.len() < n {
            return Err(format!("truncated in {what}"));
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head)
    }
    fn int(rest: &mut &[u8], what: &str) -> std::result::Result<i64, String> {
        let b = take(rest, 8, what)?;
        Ok(i64::from_le_bytes(b.try_into().map_err(|_| "bad integer")?))
    }
    fn blob(rest: &mut &[u8], what: &str) -> std::result::Result<Vec<u8>, String> {
        let len = take(rest, 4, what)?;
        let len = u32::from_le_bytes(len.try_into().map_err(|_| "bad length")?) as usize;
        Ok(take(rest, len, what)?.to_vec())
    }
    while !rest.is_empty() {
        let at = events.len();
        let kind = match take(&mut rest, 1, "event kind")?[0] {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            k => return Err(format!("event {at}: unknown kind {k}")),
        };
        let ctx = |f: &str| format!("event {at} {f}");
        events.push(DeltaEvent {
            kind,
            revision: int(&mut rest, &ctx("revision"))?,
            create_revision: int(&mut rest, &ctx("create revision"))?,
            version: int(&mut rest, &ctx("version"))?,
            lease: int(&mut rest, &ctx("lease"))?,
            observed_at_ms: int(&mut rest, &ctx("time"))?,
            key: blob(&mut rest, &ctx("key"))?,
            value: blob(&mut rest, &ctx("value"))?,
        });
    }
    Ok(events)
}

/// A committed segment: the JSON record written after its data object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SegmentMeta {
    /// Record format version.
    pub format_version: u32,
    /// Segment id: `<base id>/<first:020>-<last:020>`.
    pub id: String,
    /// The snapshot these events follow.
    pub base_snapshot: String,
    /// First revision in the segment.
    pub first_revision: i64,
    /// Last revision in the segment.
    pub last_revision: i64,
    /// When the first event was received.
    pub first_event_at: DateTime<Utc>,
    /// When the last event was received.
    pub last_event_at: DateTime<Utc>,
    /// Number of events.
    pub event_count: u64,
    /// Size of the raw segment.
    pub raw_size_bytes: u64,
    /// SHA-256 of the raw segment.
    pub raw_sha256: String,
    /// Size of the stored object.
    pub stored_size_bytes: u64,
    /// SHA-256 of the stored object.
    pub stored_sha256: String,
    /// Compression of the stored object.
    pub compression: Compression,
    /// Encryption of the stored object.
    pub encryption: Encryption,
    /// Object key relative to the store location.
    pub object_key: String,
    /// When the record was written.
    pub committed_at: DateTime<Utc>,
}

impl SegmentMeta {
    /// The API form.
    pub fn to_proto(&self) -> bulwark_api::backup::v1::DeltaSegment {
        use bulwark_api::backup::v1 as pb;
        pb::DeltaSegment {
            id: self.id.clone(),
            object_key: self.object_key.clone(),
            first_revision: self.first_revision,
            last_revision: self.last_revision,
            first_event_at: Some(crate::manifest::timestamp(self.first_event_at)),
            last_event_at: Some(crate::manifest::timestamp(self.last_event_at)),
            event_count: self.event_count,
            stored_size_bytes: self.stored_size_bytes,
            stored_sha256: self.stored_sha256.clone(),
            compression: match self.compression {
                Compression::None => pb::Compression::None,
                Compression::Zstd { .. } => pb::Compression::Zstd,
            } as i32,
            encryption: match self.encryption {
                Encryption::None => pb::Encryption::None,
                Encryption::AgeX25519 { .. } => pb::Encryption::AgeX25519,
            } as i32,
            key_id: self.encryption.key_id().unwrap_or_default().to_owned(),
        }
    }
}

/// Checks that `segments` (oldest first) follow each other from `after`
/// without a hole; returns the last revision covered.
pub fn check_continuity(after: i64, segments: &[SegmentMeta]) -> Result<i64> {
    let mut last = after;
    for s in segments {
        if s.first_revision > last + 1 || s.last_revision < s.first_revision {
            return Err(BackupError::Corrupt {
                kind: Corruption::DeltaGap,
                what: format!("delta segment {}", s.id),
                detail: format!(
                    "revisions {}..={} do not follow revision {last}",
                    s.first_revision, s.last_revision
                ),
            });
        }
        last = last.max(s.last_revision);
    }
    Ok(last)
}

fn segment_name(first: i64, last: i64) -> String {
    format!("{first:020}-{last:020}")
}

impl Engine {
    /// `delta/<base>`.
    fn delta_base_dir(&self, base: &str) -> Path {
        self.layout.delta_dir().join(base)
    }

    /// Encodes, uploads and commits one segment of events (oldest first,
    /// not empty) following snapshot `base`.
    pub async fn commit_segment(&self, base: &str, events: Vec<DeltaEvent>) -> Result<SegmentMeta> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Err(BackupError::InvalidArgument(
                "an empty delta segment".into(),
            ));
        };
        let (first_revision, last_revision) = (first.revision, last.revision);
        let (first_at, last_at) = (first.observed_at(), last.observed_at());
        let event_count = events.len() as u64;
        let recipient = self.keys.recipient().map(|(k, r)| (k.clone(), r.clone()));
        let level = self.pipeline.level;
        let sealing_to = recipient.as_ref().map(|(_, r)| r.clone());
        // Compression and encryption are CPU work: off the runtime.
        let (raw_hash, stored) = tokio::task::spawn_blocking(move || {
            let raw = encode_events(&events);
            let mut raw_hash = Sha256::new();
            raw_hash.update(&raw);
            let mut enc = Encoder::new(Vec::new(), level, 0, sealing_to.as_ref())?;
            enc.write_all(&raw)?;
            Ok::<_, std::io::Error>((raw_hash, enc.finish()?))
        })
        .await
        .map_err(|e| BackupError::local("delta encoder task", e))?
        .map_err(|e| BackupError::local("compressing a delta segment", e))?;
        let (raw_sha256, raw_size_bytes) = raw_hash.finish_hex();
        let mut stored_hash = Sha256::new();
        stored_hash.update(&stored);
        let (stored_sha256, stored_size_bytes) = stored_hash.finish_hex();

        let name = segment_name(first_revision, last_revision);
        let mut file = format!("{name}.seg.zst");
        if recipient.is_some() {
            file.push_str(".age");
        }
        let data_path = self.delta_base_dir(base).join(file);
        self.store
            .inner()
            .put(&data_path, PutPayload::from(Bytes::from(stored)))
            .await
            .map_err(|e| BackupError::store(self.store.describe(&data_path), e))?;
        let meta = SegmentMeta {
            format_version: SEGMENT_FORMAT_VERSION,
            id: format!("{base}/{name}"),
            base_snapshot: base.to_owned(),
            first_revision,
            last_revision,
            first_event_at: first_at,
            last_event_at: last_at,
            event_count,
            raw_size_bytes,
            raw_sha256,
            stored_size_bytes,
            stored_sha256,
            compression: Compression::Zstd { level },
            encryption: match recipient {
                Some((k, _)) => Encryption::AgeX25519 {
                    key_id: k.as_str().to_owned(),
                },
                None => Encryption::None,
            },
            object_key: self.layout.relative(self.store.prefix(), &data_path),
            committed_at: Utc::now(),
        };
        let record = self.delta_base_dir(base).join(format!("{name}.json"));
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| BackupError::local("encoding a segment record", e))?;
        self.store
            .inner()
            .put(&record, PutPayload::from(json))
            .await
            .map_err(|e| BackupError::store(self.store.describe(&record), e))?;
        Ok(meta)
    }

    /// Committed segments (those with a record), of one base snapshot or
    /// of all, ordered by base then first revision.
    pub async fn list_segments(&self, base: Option<&str>) -> Result<Vec<SegmentMeta>> {
        let dir = match base {
            Some(b) => self.delta_base_dir(b),
            None => self.layout.delta_dir(),
        };
        let metas: Vec<ObjectMeta> = self
            .store
            .inner()
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| BackupError::store(self.store.describe(&dir), e))?;
        let mut out = Vec::new();
        for m in metas
            .iter()
            .filter(|m| m.location.as_ref().ends_with(".json"))
        {
            let described = self.store.describe(&m.location);
            let bytes = self
                .store
                .inner()
                .get(&m.location)
                .await
                .map_err(|e| BackupError::store(described.clone(), e))?
                .bytes()
                .await
                .map_err(|e| BackupError::store(described.clone(), e))?;
            let meta: SegmentMeta =
                serde_json::from_slice(&bytes).map_err(|e| BackupError::Corrupt {
                    kind: Corruption::Manifest,
                    what: described,
                    detail: e.to_string(),
                })?;
            out.push(meta);
        }
        out.sort_by(|a, b| {
            (a.base_snapshot.as_str(), a.first_revision)
                .cmp(&(b.base_snapshot.as_str(), b.first_revision))
        });
        Ok(out)
    }

    /// Downloads one segment and checks it end to end: stored size and
    /// SHA-256, decryption, decompression, raw SHA-256, parse, and that its
    /// events lie in the recorded revision range in order.
    pub async fn read_segment(&self, meta: &SegmentMeta) -> Result<Vec<DeltaEvent>> {
        let what = format!("delta segment {}", meta.id);
        let path = crate::verify::object_path(self.store.prefix(), &meta.object_key);
        let described = self.store.describe(&path);
        let stored = self
            .store
            .inner()
            .get(&path)
            .await
            .map_err(|e| BackupError::store(described.clone(), e))?
            .bytes()
            .await
            .map_err(|e| BackupError::store(described, e))?;
        let corrupt = |kind, detail: String| BackupError::Corrupt {
            kind,
            what: what.clone(),
            detail,
        };
        if stored.len() as u64 != meta.stored_size_bytes {
            return Err(corrupt(
                Corruption::StoredSize,
                format!(
                    "expected {} bytes, found {}",
                    meta.stored_size_bytes,
                    stored.len()
                ),
            ));
        }
        let mut h = Sha256::new();
        h.update(&stored);
        let (sha, _) = h.finish_hex();
        if sha != meta.stored_sha256 {
            return Err(corrupt(
                Corruption::StoredHash,
                format!("expected {}, found {sha}", meta.stored_sha256),
            ));
        }
        let identity = match meta.encryption.key_id() {
            Some(k) => Some(self.keys.identity(k)?.clone()),
            None => None,
        };
        let compression = meta.compression;
        let encryption = meta.encryption.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            let (tx, rx) = mpsc::channel(2);
            let _ = tx.try_send(Item::Data(stored));
            let _ = tx.try_send(Item::End);
            let mut d = Decoder::new(
                ChannelReader::new(rx),
                compression,
                &encryption,
                identity.as_ref(),
            )?;
            let mut raw = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = d.read(&mut buf)?;
                if n == 0 {
                    return Ok(raw);
                }
                raw.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .map_err(|e| BackupError::local("delta decoder task", e))?;
        let raw = decoded.map_err(|e: crate::codec::DecodeError| {
            let kind = match e.layer {
                Layer::Decrypt => Corruption::Decrypt,
                Layer::Decompress | Layer::Source => Corruption::Decompress,
            };
            corrupt(kind, e.error.to_string())
        })?;
        let mut h = Sha256::new();
        h.update(&raw);
        let (sha, len) = h.finish_hex();
        if sha != meta.raw_sha256 || len != meta.raw_size_bytes {
            return Err(corrupt(
                Corruption::DeltaContent,
                format!(
                    "decoded {len} bytes with SHA-256 {sha}; the record says {} bytes, {}",
                    meta.raw_size_bytes, meta.raw_sha256
                ),
            ));
        }
        let events = decode_events(&raw).map_err(|e| corrupt(Corruption::DeltaContent, e))?;
        let mut prev = meta.first_revision;
        for e in &events {
            if e.revision < prev || e.revision > meta.last_revision {
                return Err(corrupt(
                    Corruption::DeltaContent,
                    format!(
                        "event at revision {} is out of order or outside {}..={}",
                        e.revision, meta.first_revision, meta.last_revision
                    ),
                ));
            }
            prev = e.revision;
        }
        if events.len() as u64 != meta.event_count {
            return Err(corrupt(
                Corruption::DeltaContent,
                format!(
                    "{} events, the record says {}",
                    events.len(),
                    meta.event_count
                ),
            ));
        }
        Ok(events)
    }

    /// Deletes every segment of base snapshot `base` (records first, so
    /// none is listed half-deleted). Returns segments and bytes removed.
    pub async fn delete_segments(&self, base: &str) -> Result<(u32, u64)> {
        let dir = self.delta_base_dir(base);
        let mut metas: Vec<ObjectMeta> = self
            .store
            .inner()
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| BackupError::store(self.store.describe(&dir), e))?;
        metas.sort_by_key(|m| !m.location.as_ref().ends_with(".json"));
        let (mut count, mut freed) = (0, 0);
        for m in metas {
            match self.store.inner().delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                    freed += m.size;
                    if m.location.as_ref().ends_with(".json") {
                        count += 1;
                    }
                }
                Err(e) => return Err(BackupError::store(self.store.describe(&m.location), e)),
            }
        }
        Ok((count, freed))
    }
}

/// Tuning of the delta recorder.
#[derive(Clone, Debug)]
pub struct DeltaSettings {
    /// Longest time an event waits in the buffer before its segment is written.
    pub flush_interval: Duration,
    /// Buffer size that writes a segment at once.
    pub max_segment_bytes: usize,
    /// RPO target: lag above it shows as LAGGING.
    pub rpo_target: Duration,
}

impl Default for DeltaSettings {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(500),
            max_segment_bytes: 4 << 20,
            rpo_target: Duration::from_secs(1),
        }
    }
}

/// What the recorder is doing, for status and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecorderState {
    /// Not running here.
    Stopped,
    /// Following etcd.
    Running,
    /// A gap was found; waiting for a new full snapshot.
    Gap,
}

/// The recorder's shared status.
#[derive(Clone, Debug)]
pub struct DeltaStatus {
    /// State.
    pub state: RecorderState,
    /// Base snapshot being followed.
    pub base_snapshot: Option<String>,
    /// Newest revision in a committed segment.
    pub newest_revision: i64,
    /// When that revision's event was received.
    pub newest_at: Option<DateTime<Utc>>,
    /// Receive time of the oldest event not yet committed.
    pub pending_since: Option<DateTime<Utc>>,
    /// Segments committed by this instance since it started.
    pub committed: u64,
    /// Last error of the recorder.
    pub last_error: Option<String>,
}

impl Default for DeltaStatus {
    fn default() -> Self {
        Self {
            state: RecorderState::Stopped,
            base_snapshot: None,
            newest_revision: 0,
            newest_at: None,
            pending_since: None,
            committed: 0,
            last_error: None,
        }
    }
}

impl DeltaStatus {
    /// RPO lag now: how long the oldest uncommitted event has waited
    /// (zero when everything received is committed).
    pub fn rpo_lag(&self, now: DateTime<Utc>) -> Duration {
        self.pending_since
            .and_then(|t| (now - t).to_std().ok())
            .unwrap_or_default()
    }
}

/// Why following one base snapshot stopped.
#[derive(Debug)]
pub enum FollowEnd {
    /// Shutdown or leadership loss.
    Cancelled,
    /// A newer full snapshot was committed: follow it instead.
    NewBase,
    /// The history has a hole (compaction or a missing revision); a new
    /// full snapshot is needed.
    Gap(String),
}

/// Follows etcd after base snapshots and commits segments.
#[derive(Clone, Debug)]
pub struct Recorder {
    engine: Arc<Engine>,
    settings: DeltaSettings,
    status: Arc<Mutex<DeltaStatus>>,
}

/// Takes a new full snapshot (after a gap).
pub type SnapshotFn<'a> = dyn Fn() -> futures::future::BoxFuture<'a, Result<()>> + Send + Sync + 'a;

/// How often the recorder checks whether a newer full snapshot exists.
const BASE_CHECK: Duration = Duration::from_secs(2);

impl Recorder {
    /// A recorder over `engine`, publishing to `status`.
    pub fn new(
        engine: Arc<Engine>,
        settings: DeltaSettings,
        status: Arc<Mutex<DeltaStatus>>,
    ) -> Self {
        Self {
            engine,
            settings,
            status,
        }
    }

    fn update(&self, f: impl FnOnce(&mut DeltaStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        let lag = s.rpo_lag(Utc::now());
        crate::metrics::delta_status(&s, lag);
    }

    /// Follows the newest snapshot until `cancel`; `take_snapshot` is
    /// called after a gap and must commit a new full snapshot.
    pub async fn run(&self, cancel: &CancellationToken, take_snapshot: &SnapshotFn<'_>) {
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let base = match self.engine.latest_snapshot().await {
                Ok(e) => e.manifest,
                Err(BackupError::NotFound { .. }) => {
                    // Nothing to follow yet: the first snapshot starts it.
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
                Err(e) => {
                    self.failed(&e);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            match self.follow(&base.id, base.revision, cancel).await {
                Ok(FollowEnd::Cancelled) => break,
                Ok(FollowEnd::NewBase) => {}
                Ok(FollowEnd::Gap(why)) => {
                    tracing::warn!(base = %base.id, why = %why, "delta gap: taking a new full snapshot");
                    crate::metrics::delta_gap();
                    self.update(|s| {
                        s.state = RecorderState::Gap;
                        s.last_error = Some(why.clone());
                    });
                    if let Err(e) = take_snapshot().await {
                        self.failed(&e);
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
                Err(e) => {
                    // etcd or the store failed: start again from the last
                    // committed segment (the watch replays the rest).
                    self.failed(&e);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        self.update(|s| {
            s.state = RecorderState::Stopped;
            s.pending_since = None;
        });
    }

    fn failed(&self, e: &BackupError) {
        tracing::warn!(error = %e, "delta recorder");
        self.update(|s| s.last_error = Some(e.to_string()));
    }

    /// Watches from after the last committed segment of `base` (or after
    /// its revision) and commits segments until told to stop.
    pub async fn follow(
        &self,
        base: &str,
        base_revision: i64,
        cancel: &CancellationToken,
    ) -> Result<FollowEnd> {
        let existing = self.engine.list_segments(Some(base)).await?;
        let mut last = match check_continuity(base_revision, &existing) {
            Ok(l) => l,
            Err(e) => return Ok(FollowEnd::Gap(e.to_string())),
        };
        let resumed_from = last;
        let mut client = self.engine.etcd.client().await?;
        let eps = self.engine.etcd.endpoints().to_vec();
        let mut stream = client
            .watch(
                "",
                Some(
                    WatchOptions::new()
                        .with_all_keys()
                        .with_start_revision(last + 1)
                        .with_prev_key(),
                ),
            )
            .await
            .map_err(|e| classify(&eps, "watch", &e))?;
        tracing::info!(base, from = last + 1, "delta recorder following etcd");
        self.update(|s| {
            s.state = RecorderState::Running;
            s.base_snapshot = Some(base.to_owned());
            s.newest_revision = s.newest_revision.max(last);
            s.last_error = None;
        });
        let mut buffer: Vec<DeltaEvent> = Vec::new();
        let mut bytes = 0usize;
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut base_check = tokio::time::interval(BASE_CHECK);
        base_check.tick().await;
        loop {
            let deadline = flush_at;
            tokio::select! {
                _ = cancel.cancelled() => {
                    // Best effort: what is buffered is still in etcd's
                    // history for the next leader otherwise.
                    let _ = self.flush(base, &mut buffer, &mut bytes).await;
                    return Ok(FollowEnd::Cancelled);
                }
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                    self.flush(base, &mut buffer, &mut bytes).await?;
                    flush_at = None;
                }
                _ = base_check.tick() => {
                    if let Ok(latest) = self.engine.latest_snapshot().await
                        && latest.manifest.id != base
                    {
                        self.flush(base, &mut buffer, &mut bytes).await?;
                        return Ok(FollowEnd::NewBase);
                    }
                }
                msg = stream.message() => {
                    let resp = match msg {
                        Err(e) => {
                            self.flush(base, &mut buffer, &mut bytes).await?;
                            return Err(classify(&eps, "watch", &e));
                        }
                        Ok(None) => {
                            self.flush(base, &mut buffer, &mut bytes).await?;
                            return Err(BackupError::EtcdUnavailable {
                                endpoints: eps.join(","),
                                detail: "the watch stream ended".into(),
                            });
                        }
                        Ok(Some(r)) => r,
                    };
                    if resp.compact_revision() > 0 || resp.canceled() {
                        self.flush(base, &mut buffer, &mut bytes).await?;
                        return Ok(FollowEnd::Gap(format!(
                            "the watch from revision {} was cancelled (compacted at {}): {}",
                            last + 1,
                            resp.compact_revision(),
                            resp.cancel_reason()
                        )));
                    }
                    let now = Utc::now().timestamp_millis();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let revision = kv.mod_revision();
                        let same_group = revision == last && last > resumed_from;
                        if revision != last + 1 && !same_group {
                            self.flush(base, &mut buffer, &mut bytes).await?;
                            return Ok(FollowEnd::Gap(format!(
                                "the watch jumped from revision {last} to {revision}"
                            )));
                        }
                        last = revision;
                        let e = match ev.event_type() {
                            EventType::Put => DeltaEvent {
                                kind: EventKind::Put,
                                revision,
                                create_revision: kv.create_revision(),
                                version: kv.version(),
                                lease: kv.lease(),
                                observed_at_ms: now,
                                key: kv.key().to_vec(),
                                value: kv.value().to_vec(),
                            },
                            EventType::Delete => DeltaEvent {
                                kind: EventKind::Delete,
                                revision,
                                create_revision: 0,
                                version: 0,
                                lease: 0,
                                observed_at_ms: now,
                                key: kv.key().to_vec(),
                                value: Vec::new(),
                            },
                        };
                        bytes += e.encoded_len();
                        buffer.push(e);
                    }
                    if !buffer.is_empty() && flush_at.is_none() {
                        flush_at = Some(tokio::time::Instant::now() + self.settings.flush_interval);
                        let since = buffer.first().map(DeltaEvent::observed_at);
                        self.update(|s| s.pending_since = since);
                    }
                    if bytes >= self.settings.max_segment_bytes {
                        self.flush(base, &mut buffer, &mut bytes).await?;
                        flush_at = None;
                    }
                }
            }
        }
    }

    async fn flush(
        &self,
        base: &str,
        buffer: &mut Vec<DeltaEvent>,
        bytes: &mut usize,
    ) -> Result<()> {
        if buffer.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(buffer);
        *bytes = 0;
        let meta = self.engine.commit_segment(base, events).await?;
        tracing::debug!(segment = %meta.id, events = meta.event_count, "delta segment committed");
        crate::metrics::delta_committed(&meta);
        self.update(|s| {
            s.newest_revision = meta.last_revision;
            s.newest_at = Some(meta.last_event_at);
            s.pending_since = None;
            s.committed += 1;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, revision: i64, key: &str, value: &[u8]) -> DeltaEvent {
        DeltaEvent {
            kind,
            revision,
            create_revision: 3,
            version: 2,
            lease: 7,
            observed_at_ms: 1_700_000_000_123,
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn segments_round_trip_and_truncation_is_named() {
        let events = vec![
            ev(EventKind::Put, 5, "a", b"\x00\xffbinary"),
            ev(EventKind::Delete, 6, "b", b""),
        ];
        let raw = encode_events(&events);
        assert_eq!(decode_events(&raw).unwrap(), events);
        let cut = &raw[..raw.len() - 3];
        assert!(decode_events(cut).unwrap_err().contains("event 1"));
        assert!(decode_events(b"garbage!").unwrap_err().contains("BWDELTA1"));
    }

    fn seg(first: i64, last: i64) -> SegmentMeta {
        SegmentMeta {
            format_version: 1,
            id: format!("b/{first}-{last}"),
            base_snapshot: "b".into(),
            first_revision: first,
            last_revision: last,
            first_event_at: Utc::now(),
            last_event_at: Utc::now(),
            event_count: 1,
            raw_size_bytes: 0,
            raw_sha256: String::new(),
            stored_size_bytes: 0,
            stored_sha256: String::new(),
            compression: Compression::None,
            encryption: Encryption::None,
            object_key: String::new(),
            committed_at: Utc::now(),
        }
    }

    #[test]
    fn continuity_finds_holes() {
        assert_eq!(
            check_continuity(10, &[seg(11, 20), seg(21, 25)]).unwrap(),
            25
        );
        // Overlap (a resumed recorder re-recording) is fine.
        assert_eq!(
            check_continuity(10, &[seg(11, 20), seg(15, 30)]).unwrap(),
            30
        );
        let e = check_continuity(10, &[seg(11, 20), seg(22, 25)]).unwrap_err();
        assert!(
            e.to_string().contains("22..=25 do not follow revision 20"),
            "{e}"
        );
        assert!(check_continuity(10, &[]).is_ok());
    }
}
