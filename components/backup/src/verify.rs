//! Verification and restore drills.
//!
//! A verification reads a stored snapshot back in one streaming pass: the
//! SHA-256 and size of the stored bytes against the manifest, then age
//! (authenticated, so tampering shows up as a decryption failure), zstd,
//! and etcd's own trailing SHA-256 and size. Every check that fails is
//! reported by name; a corrupted object typically fails several at once
//! (the stored hash first, then the layer that tripped over it), and the
//! download always runs to the end so the stored hash is known.
//!
//! A drill also writes the decoded snapshot to a throwaway directory,
//! restores it with `etcdutl snapshot restore`, starts an etcd on loopback
//! ports and compares its revision and key count with the manifest. The
//! directory and the process are removed whatever happens (the process is
//! killed on drop, the directory is a `TempDir`).
//!
//! The outcome is stored as `verify/<time>.json` next to the manifest,
//! never in it, and returned.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::SnapshotEntry;
use crate::codec::{ChannelReader, DecodeError, Decoder, Item, Layer};
use crate::engine::{DrillSettings, Engine};
use crate::error::{BackupError, Result};
use crate::etcd::EtcdConnector;
use crate::hashing::{Sha256, TrailerError, TrailerVerifier};
use crate::manifest::{FORMAT_VERSION, Manifest, Mismatch, MismatchKind, VerificationRecord};

/// Stages, as in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Download, hashes, decryption, decompression.
    StreamCheck,
    /// `etcdutl snapshot restore`.
    DrillRestore,
    /// Starting the throwaway etcd.
    DrillStart,
    /// Reading and comparing revision and key count.
    DrillCompare,
}

/// Progress of a verification.
#[derive(Clone, Debug)]
pub struct VerifyEvent {
    /// The stage.
    pub stage: Stage,
    /// Stored bytes read so far (stream check).
    pub bytes_done: u64,
    /// Stored bytes in total (stream check).
    pub bytes_total: u64,
    /// Time since the stage began.
    pub elapsed: Duration,
    /// Free text, e.g. the throwaway etcd's endpoint.
    pub detail: String,
}

/// Progress sink for verifications.
pub trait VerifyProgress: Send + Sync {
    /// One event.
    fn event(&self, event: VerifyEvent);
}

impl VerifyProgress for () {
    fn event(&self, _: VerifyEvent) {}
}

impl<F: Fn(VerifyEvent) + Send + Sync> VerifyProgress for F {
    fn event(&self, event: VerifyEvent) {
        self(event)
    }
}

/// Queue of downloaded chunks towards the decoder.
const DOWNLOAD_CHANNEL: usize = 8;
/// Decoded bytes are read in pieces of this size.
const READ_BUF: usize = 256 * 1024;

impl Engine {
    /// Verifies snapshot `id` (with a drill when asked), stores the record
    /// and returns it. A failed check is a record with `passed = false`;
    /// `Err` means the check could not run (no such snapshot, store down).
    pub async fn verify_snapshot(
        &self,
        id: &str,
        drill: bool,
        progress: &dyn VerifyProgress,
        cancel: &CancellationToken,
    ) -> Result<VerificationRecord> {
        let entry = self.get_snapshot(id).await?;
        let started = Instant::now();
        let workdir = if drill {
            let parent = self
                .drill
                .work_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir);
            Some(
                tempfile::Builder::new()
                    .prefix("bulwark-drill-")
                    .tempdir_in(&parent)
                    .map_err(|e| {
                        BackupError::local(
                            format!("creating a drill directory in {}", parent.display()),
                            e,
                        )
                    })?,
            )
        } else {
            None
        };
        let decoded_path = workdir.as_ref().map(|d| d.path().join("snapshot.db"));
        let mut mismatches = self
            .stream_check(&entry, decoded_path.clone(), progress, cancel)
            .await?;
        let mut restored_revision = None;
        let mut restored_key_count = None;
        if let (Some(dir), Some(db), true) = (&workdir, &decoded_path, mismatches.is_empty()) {
            match run_drill(
                &self.drill,
                dir.path(),
                db,
                &entry.manifest,
                progress,
                cancel,
            )
            .await
            {
                Ok(found) => {
                    restored_revision = Some(found.revision);
                    restored_key_count = Some(found.key_count);
                    mismatches.extend(found.mismatches);
                }
                Err(m) => mismatches.push(m),
            }
        }
        drop(workdir);
        let record = VerificationRecord {
            format_version: FORMAT_VERSION,
            snapshot_id: id.to_owned(),
            verified_at: Utc::now(),
            passed: mismatches.is_empty(),
            drill,
            mismatches,
            restored_revision,
            restored_key_count,
            took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            verified_by: self.node_name.clone(),
        };
        if record.passed {
            tracing::info!(snapshot_id = %id, drill, "verification passed");
        } else {
            tracing::warn!(
                snapshot_id = %id,
                drill,
                mismatches = ?record.mismatches.iter().map(|m| m.kind.as_str()).collect::<Vec<_>>(),
                "verification failed"
            );
        }
        if let Err(e) = self.record_verification(&record).await {
            tracing::warn!(error = %e, "storing the verification record failed");
        }
        Ok(record)
    }

    /// The streaming pass. Writes the decoded snapshot to `decoded` when given.
    pub(crate) async fn stream_check(
        &self,
        entry: &SnapshotEntry,
        decoded: Option<PathBuf>,
        progress: &dyn VerifyProgress,
        cancel: &CancellationToken,
    ) -> Result<Vec<Mismatch>> {
        let m = &entry.manifest;
        let mut mismatches = Vec::new();
        let identity = match m.encryption.key_id() {
            None => None,
            Some(key_id) => match self.keys.identity(key_id) {
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
            },
        };
        let path = object_path(self.store.prefix(), &m.object_key);
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

        // Download on this task, to the end even when the decoder gave up,
        // so the stored hash and size are always known.
        let total = m.stored_size_bytes;
        let since = Instant::now();
        let mut last_report = Instant::now();
        let mut stored = Sha256::new();
        let mut stream = get.into_stream();
        let mut decoder_alive = can_decode;
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
                    download_error = Some(BackupError::store(described.clone(), e));
                    break;
                }
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                progress.event(VerifyEvent {
                    stage: Stage::StreamCheck,
                    bytes_done: stored.len(),
                    bytes_total: total,
                    elapsed: since.elapsed(),
                    detail: String::new(),
                });
            }
        }
        if decoder_alive {
            let _ = tx.send(Item::End).await;
        }
        drop(tx);
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
        let (stored_sha, stored_len) = stored.finish_hex();
        if stored_len != m.stored_size_bytes {
            mismatches.push(Mismatch::values(
                MismatchKind::StoredSize,
                m.stored_size_bytes,
                stored_len,
                "the stored object's size differs from the manifest (truncated or replaced)",
            ));
        }
        if stored_sha != m.stored_sha256 {
            mismatches.push(Mismatch::values(
                MismatchKind::StoredHash,
                &m.stored_sha256,
                stored_sha,
                "SHA-256 of the stored object differs from the manifest",
            ));
        }
        match decoded {
            None => {}
            Some(Ok(Decoded::Whole {
                etcd_sha256,
                raw_size,
            })) => {
                if raw_size != m.raw_size_bytes {
                    mismatches.push(Mismatch::values(
                        MismatchKind::EtcdHash,
                        m.raw_size_bytes,
                        raw_size,
                        "decoded size differs from what etcd sent",
                    ));
                }
                if etcd_sha256 != m.etcd_sha256 {
                    mismatches.push(Mismatch::values(
                        MismatchKind::EtcdHash,
                        &m.etcd_sha256,
                        etcd_sha256,
                        "etcd's trailing SHA-256 differs from the one recorded at backup time",
                    ));
                }
            }
            Some(Ok(Decoded::Trailer(e))) => {
                let (expected, actual) = match &e {
                    TrailerError::Mismatch { expected, actual } => {
                        (expected.clone(), actual.clone())
                    }
                    TrailerError::Short(_) => (m.etcd_sha256.clone(), String::new()),
                };
                mismatches.push(Mismatch::values(
                    MismatchKind::EtcdHash,
                    expected,
                    actual,
                    e.to_string(),
                ));
            }
            Some(Ok(Decoded::Layer(e))) => mismatches.push(match e.layer {
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
            Some(Err(e)) => return Err(e),
        }
        Ok(mismatches)
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
    compression: crate::manifest::Compression,
    encryption: &crate::manifest::Encryption,
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
                .map_err(|e| BackupError::local("writing the drill's snapshot file", e))?;
        }
    }
    if let Some(mut f) = file {
        f.flush()
            .map_err(|e| BackupError::local("writing the drill's snapshot file", e))?;
    }
    Ok(match verifier.finish() {
        Ok((etcd_sha256, raw_size)) => Decoded::Whole {
            etcd_sha256,
            raw_size,
        },
        Err(e) => Decoded::Trailer(e),
    })
}

/// What the throwaway etcd showed.
struct DrillFindings {
    revision: i64,
    key_count: u64,
    mismatches: Vec<Mismatch>,
}

/// Two free loopback ports. The race with other processes taking them
/// before etcd binds is handled by retrying the start.
fn free_ports() -> std::io::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

async fn run_drill(
    tools: &DrillSettings,
    dir: &Path,
    db: &Path,
    manifest: &Manifest,
    progress: &dyn VerifyProgress,
    cancel: &CancellationToken,
) -> std::result::Result<DrillFindings, Mismatch> {
    let stage = |stage, detail: String, since: Instant| {
        progress.event(VerifyEvent {
            stage,
            bytes_done: 0,
            bytes_total: 0,
            elapsed: since.elapsed(),
            detail,
        })
    };
    const ATTEMPTS: usize = 3;
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        let since = Instant::now();
        let (client_port, peer_port) = free_ports().map_err(|e| {
            Mismatch::new(MismatchKind::EtcdUnhealthy, format!("no free port: {e}"))
        })?;
        let data_dir = dir.join(format!("data-{attempt}"));
        let peer = format!("http://127.0.0.1:{peer_port}");
        let client = format!("http://127.0.0.1:{client_port}");
        let cluster = format!("drill={peer}");
        stage(
            Stage::DrillRestore,
            format!("etcdutl snapshot restore into {}", data_dir.display()),
            since,
        );
        let out = tokio::process::Command::new(&tools.etcdutl)
            .arg("snapshot")
            .arg("restore")
            .arg(db)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--name", "drill", "--initial-cluster", &cluster])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster-token", "bulwark-drill"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                Mismatch::new(
                    MismatchKind::RestoreFailed,
                    format!("cannot run {}: {e}", tools.etcdutl.display()),
                )
            })?;
        if !out.status.success() {
            return Err(Mismatch::new(
                MismatchKind::RestoreFailed,
                format!(
                    "etcdutl snapshot restore failed ({}): {}",
                    out.status,
                    tail(&String::from_utf8_lossy(&out.stderr))
                ),
            ));
        }

        let since = Instant::now();
        stage(
            Stage::DrillStart,
            format!("throwaway etcd on {client}"),
            since,
        );
        let log_path = dir.join(format!("etcd-{attempt}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| {
            Mismatch::new(
                MismatchKind::EtcdUnhealthy,
                format!("creating {}: {e}", log_path.display()),
            )
        })?;
        let log_err = log.try_clone().map_err(|e| {
            Mismatch::new(
                MismatchKind::EtcdUnhealthy,
                format!("opening {}: {e}", log_path.display()),
            )
        })?;
        let mut child = tokio::process::Command::new(&tools.etcd)
            .args(["--name", "drill"])
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &cluster,
                "--initial-cluster-token",
                "bulwark-drill",
            ])
            // A throwaway: durability does not matter, start-up time does.
            .arg("--unsafe-no-fsync")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                Mismatch::new(
                    MismatchKind::EtcdUnhealthy,
                    format!("cannot start {}: {e}", tools.etcd.display()),
                )
            })?;
        let deadline = Instant::now() + tools.start_timeout;
        let connector = EtcdConnector::plain(vec![client.clone()], Duration::from_secs(2));
        let outcome = loop {
            if cancel.is_cancelled() {
                break Err(Mismatch::new(
                    MismatchKind::EtcdUnhealthy,
                    "drill cancelled",
                ));
            }
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                let in_use = text.contains("address already in use");
                break Err(Mismatch::new(
                    MismatchKind::EtcdUnhealthy,
                    format!(
                        "{}throwaway etcd exited ({status}): {}",
                        if in_use { "port taken; " } else { "" },
                        tail(&text)
                    ),
                ));
            }
            if Instant::now() > deadline {
                break Err(Mismatch::new(
                    MismatchKind::EtcdUnhealthy,
                    format!(
                        "throwaway etcd not healthy after {}",
                        humantime::format_duration(tools.start_timeout)
                    ),
                ));
            }
            if let Ok(mut c) = connector.client().await
                && let Ok((count, revision)) = EtcdConnector::key_count(&mut c, &client, 0).await
            {
                break Ok((revision, count));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = child.kill().await;
        match outcome {
            Ok((revision, key_count)) => {
                stage(
                    Stage::DrillCompare,
                    format!("revision {revision}, {key_count} keys"),
                    since,
                );
                let mut mismatches = Vec::new();
                if revision < manifest.revision || revision > manifest.revision_max {
                    mismatches.push(Mismatch::values(
                        MismatchKind::Revision,
                        if manifest.revision == manifest.revision_max {
                            manifest.revision.to_string()
                        } else {
                            format!("{}..={}", manifest.revision, manifest.revision_max)
                        },
                        revision,
                        "the restored etcd's revision is not the snapshot's",
                    ));
                }
                if let Some(expected) = manifest.key_count
                    && expected != key_count
                {
                    mismatches.push(Mismatch::values(
                        MismatchKind::KeyCount,
                        expected,
                        key_count,
                        "the restored etcd has a different number of keys",
                    ));
                }
                return Ok(DrillFindings {
                    revision,
                    key_count,
                    mismatches,
                });
            }
            Err(m) if m.detail.starts_with("port taken") && attempt < ATTEMPTS => {
                tracing::debug!(attempt, "drill port was taken; retrying");
                last = Some(m);
            }
            Err(m) => return Err(m),
        }
    }
    Err(last.unwrap_or_else(|| Mismatch::new(MismatchKind::EtcdUnhealthy, "no attempt ran")))
}

/// The last lines of a process's output, for error details.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// Object path of a manifest's snapshot object (as the catalog stores it).
pub fn object_path(prefix: &ObjectPath, object_key: &str) -> ObjectPath {
    object_key
        .split('/')
        .fold(prefix.clone(), |p, part| p.join(part))
}
