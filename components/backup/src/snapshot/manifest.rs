//! The manifest (the commit point of a snapshot) and verification records,
//! as stored JSON, and their API forms.
//!
//! A snapshot exists when its `manifest.json` exists: it is written once,
//! after the snapshot object is complete and every hash checked, and never
//! rewritten. What is learnt later (verifications, drills) goes into
//! separate `verify/<time>.json` records, so a failed write of a record can
//! never damage a manifest. The JSON is camelCase with a `formatVersion`;
//! readers accept unknown fields (newer writers may add some) but refuse a
//! newer format version.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use bulwark_api::backup::v1 as pb;

use crate::error::{BackupError, Corruption, Result};

/// The manifest format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Why a snapshot was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Trigger {
    /// By the schedule.
    Scheduled,
    /// By an operator (CreateSnapshot).
    Manual,
    /// Right before a restore replaced the cluster's data.
    PreRestore,
}

impl Trigger {
    fn to_proto(self) -> pb::SnapshotTrigger {
        match self {
            Trigger::Scheduled => pb::SnapshotTrigger::Scheduled,
            Trigger::Manual => pb::SnapshotTrigger::Manual,
            Trigger::PreRestore => pb::SnapshotTrigger::PreRestore,
        }
    }
}

pub use crate::pipeline::codec::{Compression, Encryption};

/// Which etcd member served a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EtcdSource {
    /// etcd cluster id, 16 hex digits as etcdctl prints it.
    pub cluster_id: String,
    /// Member id, 16 hex digits.
    pub member_id: String,
    /// Member name (`--name`).
    pub member_name: String,
    /// Client endpoint used.
    pub endpoint: String,
    /// etcd server version, e.g. `3.5.1`.
    pub etcd_version: String,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Snapshot id (also its directory name).
    pub id: String,
    /// Why it was taken.
    pub trigger: Trigger,
    /// The schedule tick it was taken for (scheduled snapshots only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<DateTime<Utc>>,
    /// Configured cluster name (directory in the store).
    pub cluster_name: String,
    /// The etcd member it came from.
    pub etcd: EtcdSource,
    /// Lower bound of the snapshot's revision (see the API's comment).
    pub revision: i64,
    /// Upper bound of the snapshot's revision.
    pub revision_max: i64,
    /// Keys at the revision, when the revision is exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_count: Option<u64>,
    /// Bytes etcd sent, trailer included.
    pub raw_size_bytes: u64,
    /// Bytes stored.
    pub stored_size_bytes: u64,
    /// etcd's trailing SHA-256, checked against the data.
    pub etcd_sha256: String,
    /// SHA-256 of the stored object.
    pub stored_sha256: String,
    /// Compression.
    pub compression: Compression,
    /// Encryption.
    pub encryption: Encryption,
    /// Key of the snapshot object relative to the store URL.
    pub object_key: String,
    /// When streaming from etcd started.
    pub started_at: DateTime<Utc>,
    /// When the manifest was written.
    pub finished_at: DateTime<Utc>,
    /// Node name of the bulwark-backup instance that took it.
    pub taken_by: String,
    /// Free text from CreateSnapshot.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Parses a stored JSON record (a manifest, a verification or a segment
/// record) whose `formatVersion` this build must understand: the version is
/// read first, because a newer record may not parse as this one, and read
/// as this one it could be misunderstood.
pub fn parse_versioned<T: serde::de::DeserializeOwned>(
    what: &str,
    bytes: &[u8],
    understood: u32,
) -> Result<T> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Version {
        format_version: u32,
    }
    let corrupt = |detail: String| BackupError::Corrupt {
        kind: Corruption::Manifest,
        what: what.to_owned(),
        detail,
    };
    let v: Version = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if v.format_version > understood {
        return Err(corrupt(format!(
            "format version {} is newer than this bulwark-backup understands ({understood}); upgrade it",
            v.format_version
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))
}

impl Manifest {
    /// Parses a stored manifest, refusing newer formats.
    pub fn from_json(what: &str, bytes: &[u8]) -> Result<Self> {
        parse_versioned(what, bytes, FORMAT_VERSION)
    }

    /// The JSON written to the store.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// The API form; `last_verification` comes from the newest record.
    pub fn to_proto(&self, last_verification: Option<&VerificationRecord>) -> pb::SnapshotManifest {
        let (compression, level) = match self.compression {
            Compression::None => (pb::Compression::None, 0),
            Compression::Zstd { level } => (pb::Compression::Zstd, level),
        };
        let encryption = match self.encryption {
            Encryption::None => pb::Encryption::None,
            Encryption::AgeX25519 { .. } => pb::Encryption::AgeX25519,
        };
        pb::SnapshotManifest {
            // Follows from the restore records, which the API reads
            // (`Timelines::of_manifest`); the manifest alone cannot say.
            timeline: 0,
            id: self.id.clone(),
            format_version: self.format_version,
            kind: pb::SnapshotKind::Full as i32,
            trigger: self.trigger.to_proto() as i32,
            cluster_id: self.cluster_id(),
            member_id: u64::from_str_radix(&self.etcd.member_id, 16).unwrap_or(0),
            member_name: self.etcd.member_name.clone(),
            etcd_version: self.etcd.etcd_version.clone(),
            revision: self.revision,
            key_count: self.key_count,
            raw_size_bytes: self.raw_size_bytes,
            stored_size_bytes: self.stored_size_bytes,
            etcd_sha256: self.etcd_sha256.clone(),
            stored_sha256: self.stored_sha256.clone(),
            compression: compression as i32,
            compression_level: level,
            encryption: encryption as i32,
            key_id: self.encryption.key_id().unwrap_or_default().to_owned(),
            object_key: self.object_key.clone(),
            started_at: Some(timestamp(self.started_at)),
            finished_at: Some(timestamp(self.finished_at)),
            delta_coverage: None,
            last_verification: last_verification.map(VerificationRecord::to_proto),
            note: self.note.clone(),
            revision_max: self.revision_max,
            taken_by: self.taken_by.clone(),
            scheduled_for: self.scheduled_for.map(timestamp),
            cluster_name: self.cluster_name.clone(),
        }
    }

    /// The etcd cluster id it came from (0 if the manifest's hex is bad),
    /// which names its history (`restore::timeline`).
    pub fn cluster_id(&self) -> u64 {
        u64::from_str_radix(&self.etcd.cluster_id, 16).unwrap_or(0)
    }

    /// The one-line API form.
    pub fn to_summary(
        &self,
        last_verification: Option<&VerificationRecord>,
    ) -> pb::SnapshotSummary {
        let full = self.to_proto(last_verification);
        pb::SnapshotSummary {
            timeline: full.timeline,
            id: full.id,
            kind: full.kind,
            trigger: full.trigger,
            created_at: full.finished_at,
            revision: full.revision,
            raw_size_bytes: full.raw_size_bytes,
            stored_size_bytes: full.stored_size_bytes,
            compression: full.compression,
            encrypted: !matches!(self.encryption, Encryption::None),
            key_id: full.key_id,
            last_verification: full.last_verification,
            taken_by: full.taken_by,
        }
    }
}

/// Converts a UTC time to protobuf.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// What did not match, as in the API's `MismatchKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MismatchKind {
    /// The snapshot object is missing.
    ObjectMissing,
    /// Stored size differs from the manifest.
    StoredSize,
    /// Stored SHA-256 differs from the manifest.
    StoredHash,
    /// No configured identity has the manifest's key id.
    KeyUnavailable,
    /// Decryption failed.
    Decrypt,
    /// Decompression failed.
    Decompress,
    /// etcd's trailing hash or the raw size does not match.
    EtcdHash,
    /// etcdutl could not restore the snapshot.
    RestoreFailed,
    /// The throwaway etcd did not become healthy.
    EtcdUnhealthy,
    /// The restored revision is outside the manifest's bounds.
    Revision,
    /// The restored key count differs from the manifest.
    KeyCount,
}

impl MismatchKind {
    fn to_proto(self) -> pb::MismatchKind {
        match self {
            MismatchKind::ObjectMissing => pb::MismatchKind::ObjectMissing,
            MismatchKind::StoredSize => pb::MismatchKind::StoredSize,
            MismatchKind::StoredHash => pb::MismatchKind::StoredHash,
            MismatchKind::KeyUnavailable => pb::MismatchKind::KeyUnavailable,
            MismatchKind::Decrypt => pb::MismatchKind::Decrypt,
            MismatchKind::Decompress => pb::MismatchKind::Decompress,
            MismatchKind::EtcdHash => pb::MismatchKind::EtcdHash,
            MismatchKind::RestoreFailed => pb::MismatchKind::RestoreFailed,
            MismatchKind::EtcdUnhealthy => pb::MismatchKind::EtcdUnhealthy,
            MismatchKind::Revision => pb::MismatchKind::Revision,
            MismatchKind::KeyCount => pb::MismatchKind::KeyCount,
        }
    }

    /// Stable short name (metric label, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            MismatchKind::ObjectMissing => "object_missing",
            MismatchKind::StoredSize => "stored_size",
            MismatchKind::StoredHash => "stored_hash",
            MismatchKind::KeyUnavailable => "key_unavailable",
            MismatchKind::Decrypt => "decrypt",
            MismatchKind::Decompress => "decompress",
            MismatchKind::EtcdHash => "etcd_hash",
            MismatchKind::RestoreFailed => "restore_failed",
            MismatchKind::EtcdUnhealthy => "etcd_unhealthy",
            MismatchKind::Revision => "revision",
            MismatchKind::KeyCount => "key_count",
        }
    }
}

/// One failed check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mismatch {
    /// What did not match.
    pub kind: MismatchKind,
    /// Expected value, when there is one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expected: String,
    /// Found value, when there is one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub actual: String,
    /// Explanation for humans.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Mismatch {
    /// A mismatch with only an explanation.
    pub fn new(kind: MismatchKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            expected: String::new(),
            actual: String::new(),
            detail: detail.into(),
        }
    }

    /// A mismatch of two values.
    pub fn values(
        kind: MismatchKind,
        expected: impl ToString,
        actual: impl ToString,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            expected: expected.to_string(),
            actual: actual.to_string(),
            detail: detail.into(),
        }
    }

    /// A mismatch when `actual` is not `expected`; nothing when they agree.
    pub fn unless_equal<T: PartialEq + ToString>(
        kind: MismatchKind,
        expected: T,
        actual: T,
        detail: &str,
    ) -> Option<Self> {
        (expected != actual).then(|| Self::values(kind, expected, actual, detail))
    }

    fn to_proto(&self) -> pb::Mismatch {
        pb::Mismatch {
            kind: self.kind.to_proto() as i32,
            expected: self.expected.clone(),
            actual: self.actual.clone(),
            detail: self.detail.clone(),
        }
    }
}

/// `verify/<time>.json`: the outcome of one verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationRecord {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The snapshot checked.
    pub snapshot_id: String,
    /// When the check finished.
    pub verified_at: DateTime<Utc>,
    /// Whether everything matched.
    pub passed: bool,
    /// Whether a throwaway etcd was started from it.
    pub drill: bool,
    /// Everything that did not match.
    #[serde(default)]
    pub mismatches: Vec<Mismatch>,
    /// Drill: the restored etcd's revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_revision: Option<i64>,
    /// Drill: the restored etcd's key count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_key_count: Option<u64>,
    /// Milliseconds taken.
    pub took_ms: u64,
    /// Node name of the instance that checked.
    pub verified_by: String,
}

impl VerificationRecord {
    /// Parses a stored record, refusing newer formats.
    pub fn from_json(what: &str, bytes: &[u8]) -> Result<Self> {
        parse_versioned(what, bytes, FORMAT_VERSION)
    }

    /// The JSON written to the store.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// The short API form kept with a snapshot.
    pub fn to_proto(&self) -> pb::VerificationRecord {
        pb::VerificationRecord {
            verified_at: Some(timestamp(self.verified_at)),
            passed: self.passed,
            drill: self.drill,
            mismatches: self.mismatches.iter().map(Mismatch::to_proto).collect(),
        }
    }

    /// The API's final VerifySnapshot message.
    pub fn to_result(&self) -> pb::VerifyResult {
        pb::VerifyResult {
            snapshot_id: self.snapshot_id.clone(),
            passed: self.passed,
            drill: self.drill,
            mismatches: self.mismatches.iter().map(Mismatch::to_proto).collect(),
            restored_revision: self.restored_revision,
            restored_key_count: self.restored_key_count,
            took: Some(prost_types::Duration {
                seconds: i64::try_from(self.took_ms / 1000).unwrap_or(i64::MAX),
                nanos: i32::try_from((self.took_ms % 1000) * 1_000_000).unwrap_or(0),
            }),
            finished_at: Some(timestamp(self.verified_at)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use chrono::TimeZone;

    use super::*;

    pub(crate) fn sample() -> Manifest {
        let t = Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap();
        Manifest {
            format_version: FORMAT_VERSION,
            id: "20250102T030405Z-r42-abcd".into(),
            trigger: Trigger::Scheduled,
            scheduled_for: Some(t),
            cluster_name: "prod".into(),
            etcd: EtcdSource {
                cluster_id: "cdf818194e3a8c32".into(),
                member_id: "8e9e05c52164694d".into(),
                member_name: "m1".into(),
                endpoint: "https://127.0.0.1:2379".into(),
                etcd_version: "3.5.1".into(),
            },
            revision: 42,
            revision_max: 42,
            key_count: Some(7),
            raw_size_bytes: 20512,
            stored_size_bytes: 1234,
            etcd_sha256: "a".repeat(64),
            stored_sha256: "b".repeat(64),
            compression: Compression::Zstd { level: 3 },
            encryption: Encryption::AgeX25519 {
                key_id: "age-x25519:0123456789abcdef".into(),
            },
            object_key: "prod/full/20250102T030405Z-r42-abcd/snapshot.db.zst.age".into(),
            started_at: t,
            finished_at: t + chrono::Duration::seconds(3),
            taken_by: "cp-1".into(),
            note: String::new(),
        }
    }

    #[test]
    fn manifest_round_trips_and_reads_like_documented() {
        let m = sample();
        let json = m.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\"formatVersion\": 1"), "{text}");
        assert!(
            text.contains("\"scheme\": \"age-x25519\"") && text.contains("\"keyId\""),
            "{text}"
        );
        assert!(text.contains("\"algorithm\": \"zstd\""), "{text}");
        assert_eq!(Manifest::from_json("m", &json).unwrap(), m);

        let p = m.to_proto(None);
        assert_eq!(p.cluster_id, 0xcdf818194e3a8c32);
        assert_eq!(p.encryption, pb::Encryption::AgeX25519 as i32);
        assert_eq!(p.compression_level, 3);
        assert_eq!(p.key_id, "age-x25519:0123456789abcdef");
    }

    #[test]
    fn newer_formats_and_garbage_are_refused() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["formatVersion"] = 2.into();
        v["someNewField"] = true.into();
        let err = Manifest::from_json("m", v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("upgrade"), "{err}");
        // Unknown fields alone are fine (a newer writer, same format).
        v["formatVersion"] = 1.into();
        assert!(Manifest::from_json("m", v.to_string().as_bytes()).is_ok());
        let err = Manifest::from_json("m", b"{").unwrap_err();
        assert_eq!(err.reason(), "bad_manifest");
    }
}
