//! The read path: a stored snapshot back through the chain in one
//! streaming pass. The SHA-256 and size of the stored bytes against the
//! manifest, then age (authenticated, so tampering shows up as a
//! decryption failure), zstd, and etcd's own trailing SHA-256 and size.
//! Every check that fails is reported by name; a corrupted object
//! typically fails several at once (the stored hash first, then the layer
//! that tripped over it), and the download always runs to the end so the
//! stored hash is known. Used by verification and drills
//! ([`crate::verify`]) and by the restore's target build
//! ([`crate::restore::pitr`]), and by every restore agent that decodes
//! the stored snapshot straight into its staging file
//! (`restore::agent`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::error::{BackupError, Corruption, Result};
use crate::pipeline::codec::{ChannelReader, DecodeError, Decoder, Item, Layer};
use crate::pipeline::hashing::{Sha256, TrailerError, TrailerVerifier};
use crate::snapshot::catalog::SnapshotEntry;
use crate::snapshot::manifest::{Manifest, Mismatch, MismatchKind};

/// Queue of downloaded chunks towards the decoder.
const DOWNLOAD_CHANNEL: usize = 8;
/// Decoded bytes are read in pieces of this size.
const READ_BUF: usize = 256 * 1024;

/// Progress of a download: stored bytes read, stored bytes in total, and
/// the time since it began (about once a second).
pub type DownloadProgress<'a> = &'a (dyn Fn(u64, u64, Duration) + Send + Sync);

impl Engine {
    /// The streaming pass over snapshot `entry`: every failed check as a
    /// mismatch. Writes the decoded snapshot to `decoded` when given.
    pub(crate) async fn stream_check(
        &self,
        entry: &SnapshotEntry,
        decoded: Option<PathBuf>,
        progress: DownloadProgress<'_>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Mismatch>> {
        let m = &entry.manifest;
        let mut mismatches = Vec::new();
        let identity = self.identity_for(m, &mut mismatches);
        let path = crate::store::layout::object_path(self.store.prefix(), &m.object_key);
        let described = self.store.describe(&path);
        let get = match self.store.inner().get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                mismatches.push(Mismatch::new(
                    MismatchKind::ObjectMissing,
                    format!("{described} does not exist"),
                ));
                return Ok(mismatches);
            }
            Err(e) => return Err(BackupError::store(described, e)),
        };

        let (tx, rx) = mpsc::channel::<Item>(DOWNLOAD_CHANNEL);
        let can_decode = m.encryption.key_id().is_none() || identity.is_some();
        let decoder = if can_decode {
            let compression = m.compression;
            let encryption = m.encryption.clone();
            Some(tokio::task::spawn_blocking(move || {
                decode(
                    rx,
                    compression,
                    &encryption,
                    identity.as_ref(),
                    decoded.as_deref(),
                )
            }))
        } else {
            drop(rx);
            None
        };
        let (stored, download_error) =
            download(get, m, tx, can_decode, &described, progress, cancel).await?;
        let decoded = match decoder {
            Some(handle) => Some(
                handle
                    .await
                    .map_err(|e| BackupError::local("decoder task", e))?,
            ),
            None => None,
        };
        if let Some(e) = download_error {
            return Err(e);
        }
        compare_stored(m, stored, &mut mismatches);
        match decoded {
            None => {}
            Some(decoded) => compare_decoded(m, decoded?, &mut mismatches),
        }
        Ok(mismatches)
    }

    /// The identity that decrypts `m`, if it is encrypted; a missing one is
    /// a mismatch (the download still runs, for the stored hash).
    fn identity_for(
        &self,
        m: &Manifest,
        mismatches: &mut Vec<Mismatch>,
    ) -> Option<age::x25519::Identity> {
        let key_id = m.encryption.key_id()?;
        match self.keys.identity(key_id) {
            Ok(id) => Some(id.clone()),
            Err(e) => {
                mismatches.push(Mismatch::values(
                    MismatchKind::KeyUnavailable,
                    key_id,
                    self.keys
                        .identity_ids()
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    e.to_string(),
                ));
                None
            }
        }
    }
}

/// Downloads on this task, to the end even when the decoder gave up, so
/// the stored hash and size are always known; feeds the decoder while it
/// lives. Returns the stored bytes' hash and the download's error, if it
/// broke off.
async fn download(
    get: object_store::GetResult,
    m: &Manifest,
    tx: mpsc::Sender<Item>,
    mut decoder_alive: bool,
    described: &str,
    progress: DownloadProgress<'_>,
    cancel: &CancellationToken,
) -> Result<(Sha256, Option<BackupError>)> {
    let total = m.stored_size_bytes;
    let since = Instant::now();
    let mut last_report = Instant::now();
    let mut stored = Sha256::new();
    let mut stream = get.into_stream();
    let mut download_error = None;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => {
                return Err(BackupError::Cancelled(format!("verification of {} stopped", m.id)));
            }
            n = stream.next() => n,
        };
        match next {
            None => break,
            Some(Ok(bytes)) => {
                stored.update(&bytes);
                if decoder_alive && tx.send(Item::Data(bytes)).await.is_err() {
                    decoder_alive = false;
                }
            }
            Some(Err(e)) => {
                let _ = tx.send(Item::Error(e.to_string())).await;
                download_error = Some(BackupError::store(described.to_owned(), e));
                break;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress(stored.len(), total, since.elapsed());
        }
    }
    if decoder_alive {
        let _ = tx.send(Item::End).await;
    }
    Ok((stored, download_error))
}

/// The error a restore fails with when the stored snapshot `what` did not
/// pass every check: the first mismatch's kind, every mismatch named in
/// the detail; `None` when it passed.
pub(crate) fn mismatch_error(what: String, mismatches: &[Mismatch]) -> Option<BackupError> {
    let first = mismatches.first()?;
    Some(BackupError::Corrupt {
        kind: match first.kind {
            MismatchKind::Decrypt => Corruption::Decrypt,
            MismatchKind::Decompress => Corruption::Decompress,
            MismatchKind::StoredSize => Corruption::StoredSize,
            MismatchKind::EtcdHash => Corruption::EtcdHash,
            _ => Corruption::StoredHash,
        },
        what,
        detail: mismatches
            .iter()
            .map(|m| format!("{}: {}", m.kind.as_str(), m.detail))
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// The stored object's size and SHA-256 against the manifest.
fn compare_stored(m: &Manifest, stored: Sha256, mismatches: &mut Vec<Mismatch>) {
    let (stored_sha, stored_len) = stored.finish_hex();
    mismatches.extend(Mismatch::unless_equal(
        MismatchKind::StoredSize,
        m.stored_size_bytes,
        stored_len,
        "the stored object's size differs from the manifest (truncated or replaced)",
    ));
    mismatches.extend(Mismatch::unless_equal(
        MismatchKind::StoredHash,
        m.stored_sha256.as_str(),
        &stored_sha,
        "SHA-256 of the stored object differs from the manifest",
    ));
}

/// What the decoder saw against the manifest: etcd's size and trailing
/// hash, or the layer that failed.
fn compare_decoded(m: &Manifest, decoded: Decoded, mismatches: &mut Vec<Mismatch>) {
    match decoded {
        Decoded::Whole {
            etcd_sha256,
            raw_size,
        } => {
            mismatches.extend(Mismatch::unless_equal(
                MismatchKind::EtcdHash,
                m.raw_size_bytes,
                raw_size,
                "decoded size differs from what etcd sent",
            ));
            mismatches.extend(Mismatch::unless_equal(
                MismatchKind::EtcdHash,
                m.etcd_sha256.as_str(),
                &etcd_sha256,
                "etcd's trailing SHA-256 differs from the one recorded at backup time",
            ));
        }
        Decoded::Trailer(e) => {
            let (expected, actual) = match &e {
                TrailerError::Mismatch { expected, actual } => (expected.clone(), actual.clone()),
                TrailerError::Short(_) => (m.etcd_sha256.clone(), String::new()),
            };
            mismatches.push(Mismatch::values(
                MismatchKind::EtcdHash,
                expected,
                actual,
                e.to_string(),
            ));
        }
        Decoded::Layer(e) => mismatches.push(match e.layer {
            Layer::Decrypt => Mismatch::new(
                MismatchKind::Decrypt,
                format!(
                    "age: {} (wrong key, tampered or truncated ciphertext)",
                    e.error
                ),
            ),
            Layer::Decompress | Layer::Source => {
                Mismatch::new(MismatchKind::Decompress, format!("zstd: {}", e.error))
            }
        }),
    }
}

/// What the decoder saw.
enum Decoded {
    /// Everything decoded and etcd's trailer matched its data.
    Whole { etcd_sha256: String, raw_size: u64 },
    /// Decoded to the end but etcd's trailer does not match.
    Trailer(TrailerError),
    /// A layer failed.
    Layer(DecodeError),
}

/// The decoding pass (blocking thread).
fn decode(
    rx: mpsc::Receiver<Item>,
    compression: crate::snapshot::manifest::Compression,
    encryption: &crate::snapshot::manifest::Encryption,
    identity: Option<&age::x25519::Identity>,
    out: Option<&Path>,
) -> Result<Decoded> {
    let mut decoder = match Decoder::new(ChannelReader::new(rx), compression, encryption, identity)
    {
        Ok(d) => d,
        Err(e) => return Ok(Decoded::Layer(e)),
    };
    let mut file = match out {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p).map_err(
            |e| BackupError::local(format!("creating {}", p.display()), e),
        )?)),
        None => None,
    };
    let mut verifier = TrailerVerifier::new();
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Ok(Decoded::Layer(e)),
        };
        verifier.update(&buf[..n]);
        if let Some(f) = file.as_mut() {
            f.write_all(&buf[..n])
                .map_err(|e| BackupError::local("writing the decoded snapshot file", e))?;
        }
    }
    if let Some(mut f) = file {
        // On disk before it counts as written: a restore agent journals
        // its staged file as whole right after this, and a power cut must
        // not leave a short file behind that journal. It also keeps the
        // write-back of a 1 GB file out of the next step (etcdutl's own
        // writes and fsyncs on the same disk).
        f.flush()
            .and_then(|()| f.get_ref().sync_all())
            .map_err(|e| BackupError::local("writing the decoded snapshot file", e))?;
    }
    Ok(match verifier.finish() {
        Ok((etcd_sha256, raw_size)) => Decoded::Whole {
            etcd_sha256,
            raw_size,
        },
        Err(e) => Decoded::Trailer(e),
    })
}
