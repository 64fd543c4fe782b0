//! The errors of bulwark-backup's library, by what a caller can do about
//! them: retry later (`Unavailable`), fix credentials or configuration
//! (`EtcdAuth`, `Key`, `InvalidArgument`), look elsewhere (`NotFound`), or
//! treat the data as bad (`Corrupt`). Each maps to one gRPC code and one
//! `reason` label of `bulwark_backup_failures_total`.

use std::fmt;

/// Which integrity check failed. The names match the `Mismatch` kinds of the
/// API so operators see the same words in logs, metrics and `bulwarkctl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// etcd's trailing SHA-256 did not match the bytes before it, or the
    /// stream was too short to carry one.
    EtcdHash,
    /// The SHA-256 of the stored object differs from the manifest.
    StoredHash,
    /// The stored object's size differs from the manifest.
    StoredSize,
    /// Authenticated decryption failed: tampered or truncated ciphertext.
    Decrypt,
    /// The zstd frame is malformed or truncated.
    Decompress,
    /// A manifest or record is not valid JSON of our format.
    Manifest,
    /// Delta segments do not cover a revision range without a hole.
    DeltaGap,
    /// A delta segment decoded, but its content is not what its record says.
    DeltaContent,
}

impl Corruption {
    /// Stable short name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Corruption::EtcdHash => "etcd_hash_mismatch",
            Corruption::StoredHash => "stored_hash_mismatch",
            Corruption::StoredSize => "stored_size_mismatch",
            Corruption::Decrypt => "decrypt_failed",
            Corruption::Decompress => "decompress_failed",
            Corruption::Manifest => "bad_manifest",
            Corruption::DeltaGap => "delta_gap",
            Corruption::DeltaContent => "delta_content_mismatch",
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Corruption::EtcdHash => "etcd's trailing SHA-256 does not match the snapshot data",
            Corruption::StoredHash => "SHA-256 of the stored object does not match the manifest",
            Corruption::StoredSize => "size of the stored object does not match the manifest",
            Corruption::Decrypt => "decryption failed (tampered or truncated ciphertext)",
            Corruption::Decompress => "zstd decompression failed (malformed or truncated frame)",
            Corruption::Manifest => "manifest is not valid",
            Corruption::DeltaGap => "delta segments leave a gap in the revision history",
            Corruption::DeltaContent => "delta segment content does not match its record",
        })
    }
}

/// Everything that can go wrong taking, reading or checking a backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// No etcd endpoint answered.
    #[error("etcd unreachable at {endpoints}: {detail}")]
    EtcdUnavailable {
        /// The endpoints tried.
        endpoints: String,
        /// What the client saw.
        detail: String,
    },
    /// etcd refused our TLS client certificate or our credentials.
    #[error("etcd rejected our credentials at {endpoints}: {detail}")]
    EtcdAuth {
        /// The endpoints tried.
        endpoints: String,
        /// What etcd answered.
        detail: String,
    },
    /// etcd answered with an error other than unavailability or auth.
    #[error("etcd {operation} failed: {detail}")]
    Etcd {
        /// What we asked etcd to do.
        operation: &'static str,
        /// What etcd answered.
        detail: String,
    },
    /// The object store (or a bucket in it) could not be reached or refused.
    #[error("object store {location}: {detail}")]
    StoreUnavailable {
        /// The store URL (without credentials) and object involved.
        location: String,
        /// What the store answered.
        detail: String,
    },
    /// A snapshot, object or bucket does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// Stored data failed an integrity check.
    #[error("{what}: {kind}{}", detail_suffix(.detail))]
    Corrupt {
        /// Which check failed.
        kind: Corruption,
        /// What was being checked (snapshot id, object key).
        what: String,
        /// Expected and found values, or the underlying error.
        detail: String,
    },
    /// An encryption key is missing, unreadable or not the one needed.
    #[error("encryption key: {0}")]
    Key(String),
    /// The request or configuration cannot be acted on as given.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request conflicts with the current state (e.g. deleting the
    /// newest snapshot without force).
    #[error("{0}")]
    Refused(String),
    /// Another snapshot is being taken by this instance.
    #[error("a snapshot is already being taken by this instance ({0})")]
    Busy(String),
    /// Shutdown or leadership loss stopped the work; nothing was committed.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A local file or process needed by a drill failed.
    #[error("{what}: {detail}")]
    Local {
        /// What we were doing.
        what: String,
        /// The underlying error.
        detail: String,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

impl BackupError {
    /// The `reason` label of `bulwark_backup_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            BackupError::EtcdUnavailable { .. } => "etcd_unavailable",
            BackupError::EtcdAuth { .. } => "etcd_auth",
            BackupError::Etcd { .. } => "etcd_error",
            BackupError::StoreUnavailable { .. } => "store_unavailable",
            BackupError::NotFound { .. } => "not_found",
            BackupError::Corrupt { kind, .. } => kind.as_str(),
            BackupError::Key(_) => "encryption_key",
            BackupError::InvalidArgument(_) => "invalid_argument",
            BackupError::Refused(_) => "refused",
            BackupError::Busy(_) => "busy",
            BackupError::Cancelled(_) => "cancelled",
            BackupError::Local { .. } => "local_error",
        }
    }

    /// A local I/O failure while doing `what`.
    pub fn local(what: impl Into<String>, err: impl fmt::Display) -> Self {
        BackupError::Local {
            what: what.into(),
            detail: err.to_string(),
        }
    }

    /// Maps an object store error on `location` to the variant a caller acts on.
    pub fn store(location: impl Into<String>, err: object_store::Error) -> Self {
        let location = location.into();
        match err {
            object_store::Error::NotFound { .. } => BackupError::NotFound {
                what: format!("object {location}"),
            },
            other => BackupError::StoreUnavailable {
                location,
                detail: store_detail(&other),
            },
        }
    }
}

/// Appends each cause in the chain from `source` to `text`, but those
/// `text` already says.
pub(crate) fn append_causes(
    text: &mut String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) {
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
}

/// The object store's error with its causes, and a hint for the two
/// mistakes operators make most: a bucket that does not exist and
/// credentials the store refuses.
fn store_detail(err: &object_store::Error) -> String {
    let mut text = err.to_string();
    append_causes(&mut text, std::error::Error::source(err));
    if text.contains("NoSuchBucket") || text.contains("bucket does not exist") {
        text.push_str(" (the bucket does not exist: create it or fix store.url)");
    } else if text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("AccessDenied")
        || text.contains("403")
    {
        text.push_str(
            " (the store refused our credentials: check store.options and the environment)",
        );
    }
    text
}

impl From<BackupError> for tonic::Status {
    fn from(e: BackupError) -> Self {
        let msg = e.to_string();
        match e {
            BackupError::EtcdUnavailable { .. } | BackupError::StoreUnavailable { .. } => {
                tonic::Status::unavailable(msg)
            }
            BackupError::EtcdAuth { .. } => tonic::Status::failed_precondition(msg),
            BackupError::Etcd { .. } | BackupError::Local { .. } => tonic::Status::internal(msg),
            BackupError::NotFound { .. } => tonic::Status::not_found(msg),
            BackupError::Corrupt { .. } => tonic::Status::data_loss(msg),
            BackupError::Key(_) => tonic::Status::failed_precondition(msg),
            BackupError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            BackupError::Refused(_) => tonic::Status::failed_precondition(msg),
            BackupError::Busy(_) => tonic::Status::aborted(msg),
            BackupError::Cancelled(_) => tonic::Status::cancelled(msg),
        }
    }
}

/// Result with [`BackupError`].
pub type Result<T, E = BackupError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruption_names_the_check() {
        let e = BackupError::Corrupt {
            kind: Corruption::StoredHash,
            what: "snapshot 20250101T000000Z-r5-0a0b".into(),
            detail: "expected ab…, found cd…".into(),
        };
        let s = e.to_string();
        assert!(s.contains("SHA-256 of the stored object"), "{s}");
        assert!(s.contains("expected ab…"), "{s}");
        assert_eq!(e.reason(), "stored_hash_mismatch");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::DataLoss);
    }

    #[test]
    fn missing_object_is_not_found() {
        let e = BackupError::store(
            "file:///b/x",
            object_store::Error::NotFound {
                path: "x".into(),
                source: "gone".into(),
            },
        );
        assert!(matches!(e, BackupError::NotFound { .. }), "{e}");
    }
}
