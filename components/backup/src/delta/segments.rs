//! Segment storage: a segment's data object and its JSON commit record,
//! written through the same byte chain as snapshots, listed, read back and
//! deleted with their base snapshot.
//!
//! ```text
//! <root>/delta/<base snapshot id>/<first rev:020>-<last rev:020>.seg.zst[.age]
//! <root>/delta/<base snapshot id>/<first rev:020>-<last rev:020>.json   (commit point)
//! ```

use std::io::Write as _;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::delta::format::{DeltaEvent, decode_events, encode_events};
use crate::engine::Engine;
use crate::error::{BackupError, Corruption, Result};
use crate::pipeline::codec::{ChannelReader, Decoder, Encoder, Item, Layer};
use crate::pipeline::hashing::Sha256;
use crate::snapshot::manifest::{Compression, Encryption};

/// Format version of segment records.
pub const SEGMENT_FORMAT_VERSION: u32 = 1;

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
    /// Parses a stored segment record, refusing a newer format (read as
    /// this one, its events could be replayed wrongly).
    pub fn from_json(what: &str, bytes: &[u8]) -> Result<Self> {
        crate::snapshot::manifest::parse_versioned(what, bytes, SEGMENT_FORMAT_VERSION)
    }

    /// The API form.
    pub fn to_proto(&self) -> bulwark_api::backup::v1::DeltaSegment {
        use bulwark_api::backup::v1 as pb;
        pb::DeltaSegment {
            id: self.id.clone(),
            object_key: self.object_key.clone(),
            first_revision: self.first_revision,
            last_revision: self.last_revision,
            first_event_at: Some(crate::snapshot::manifest::timestamp(self.first_event_at)),
            last_event_at: Some(crate::snapshot::manifest::timestamp(self.last_event_at)),
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
        let metas = self.store.list_all(&dir).await?;
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
            out.push(SegmentMeta::from_json(&described, &bytes)?);
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
        let path = crate::store::layout::object_path(self.store.prefix(), &meta.object_key);
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
            decode_whole(stored, compression, &encryption, identity.as_ref())
        })
        .await
        .map_err(|e| BackupError::local("delta decoder task", e))?;
        let raw = decoded.map_err(|e: crate::pipeline::codec::DecodeError| {
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
        check_events(meta, &events).map_err(|e| corrupt(Corruption::DeltaContent, e))?;
        Ok(events)
    }

    /// Deletes every segment of base snapshot `base` (records first, so
    /// none is listed half-deleted). Returns segments and bytes removed.
    pub async fn delete_segments(&self, base: &str) -> Result<(u32, u64)> {
        let dir = self.delta_base_dir(base);
        let mut metas = self.store.list_all(&dir).await?;
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

/// A whole stored segment through age and zstd (blocking).
fn decode_whole(
    stored: bytes::Bytes,
    compression: Compression,
    encryption: &Encryption,
    identity: Option<&age::x25519::Identity>,
) -> std::result::Result<Vec<u8>, crate::pipeline::codec::DecodeError> {
    let (tx, rx) = mpsc::channel(2);
    let _ = tx.try_send(Item::Data(stored));
    let _ = tx.try_send(Item::End);
    let mut d = Decoder::new(ChannelReader::new(rx), compression, encryption, identity)?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = d.read(&mut buf)?;
        if n == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// A segment's events lie in its recorded revision range, in order, as
/// many as the record says.
fn check_events(meta: &SegmentMeta, events: &[DeltaEvent]) -> std::result::Result<(), String> {
    let mut prev = meta.first_revision;
    for e in events {
        if e.revision < prev || e.revision > meta.last_revision {
            return Err(format!(
                "event at revision {} is out of order or outside {}..={}",
                e.revision, meta.first_revision, meta.last_revision
            ));
        }
        prev = e.revision;
    }
    if events.len() as u64 != meta.event_count {
        return Err(format!(
            "{} events, the record says {}",
            events.len(),
            meta.event_count
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A segment of revisions `first..=last` with placeholder fields.
    pub(crate) fn seg(first: i64, last: i64) -> SegmentMeta {
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
    fn a_newer_segment_record_is_refused_not_misread() {
        let mut json = serde_json::to_value(seg(11, 20)).unwrap();
        let same = serde_json::to_vec(&json).unwrap();
        assert_eq!(SegmentMeta::from_json("r", &same).unwrap(), seg_like(&json));
        json["formatVersion"] = (SEGMENT_FORMAT_VERSION + 1).into();
        json["events"] = "a shape this build does not know".into();
        json.as_object_mut().unwrap().remove("rawSha256");
        let e = SegmentMeta::from_json("r", &serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(
            e.to_string().contains("is newer than this bulwark-backup"),
            "{e}"
        );
    }

    fn seg_like(json: &serde_json::Value) -> SegmentMeta {
        serde_json::from_value(json.clone()).unwrap()
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
