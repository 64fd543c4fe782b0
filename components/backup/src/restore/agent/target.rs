//! A point-in-time target without the store: the coordinator builds it on
//! its own node and offers the file here; the other agents stream it from
//! this node's `FetchTarget` and the local agent copies it. Either way the
//! bytes are hashed on the way in and checked against the source's
//! SHA-256 and size, exactly as a target fetched from the store is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulwark_api::backup::v1 as pb;
use bulwark_api::backup::v1::restore_agent_client::RestoreAgentClient;
use bulwark_common::tls::TlsMaterial;
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::Agent;
use crate::error::{BackupError, Corruption, Result};
use crate::pipeline::hashing::Sha256;
use crate::snapshot::read::DownloadProgress;

/// Size of one `TargetChunk`.
const CHUNK: usize = 1 << 20;

/// Targets this node's coordinator built, by restore id.
#[derive(Debug, Default)]
pub(super) struct Shelf {
    targets: std::sync::Mutex<HashMap<String, PathBuf>>,
}

impl Shelf {
    fn get(&self, restore_id: &str) -> Option<PathBuf> {
        self.targets
            .lock()
            .ok()
            .and_then(|t| t.get(restore_id).cloned())
    }
}

/// The offer of one built target; withdrawn when dropped (the restore's
/// members are done with it, or it failed).
#[derive(Debug)]
pub struct Offer {
    agent: Arc<Agent>,
    restore_id: String,
}

impl Drop for Offer {
    fn drop(&mut self) {
        if let Ok(mut t) = self.agent.shelf.targets.lock() {
            t.remove(&self.restore_id);
        }
    }
}

impl Agent {
    /// Offers the target built for `restore_id` at `path` (its SHA-256
    /// and size) to the agents (`FetchTarget`) until the returned offer is
    /// dropped; the source the coordinator hands them names this node at
    /// `served_by`.
    pub fn offer_target(
        self: &Arc<Self>,
        restore_id: &str,
        path: &Path,
        (sha256, size): (String, u64),
        served_by: String,
    ) -> (Offer, pb::SnapshotSource) {
        if let Ok(mut t) = self.shelf.targets.lock() {
            t.insert(restore_id.to_owned(), path.to_owned());
        }
        let source = pb::SnapshotSource {
            object_key: String::new(),
            sha256,
            size_bytes: size,
            snapshot_id: String::new(),
            raw_size_bytes: size,
            served_by,
        };
        let offer = Offer {
            agent: self.clone(),
            restore_id: restore_id.to_owned(),
        };
        (offer, source)
    }

    /// The address this agent advertises (`restore.agentAddress`, else the
    /// gRPC listen address).
    pub fn address(&self) -> &str {
        &self.agent_address
    }

    /// The client identity this agent calls the coordinator's node with.
    pub fn with_client_tls(mut self, tls: TlsMaterial) -> Self {
        self.client_tls = Some(Arc::new(tls));
        self
    }

    /// FetchTarget: the offered target's bytes in order, read as they are
    /// sent (a slow reader holds one chunk, not the file).
    pub async fn serve_target(
        &self,
        restore_id: &str,
    ) -> Result<impl Stream<Item = Result<Vec<u8>>> + Send + 'static> {
        let path = self
            .shelf
            .get(restore_id)
            .ok_or_else(|| BackupError::NotFound {
                what: format!(
                    "a target built here for restore {restore_id} (the restore is over, or \
                     another node coordinates it)"
                ),
            })?;
        file_chunks(path).await
    }

    /// A target `source.served_by` serves for `restore_id`, into `to`: the
    /// local file when this node built it, else streamed from that node's
    /// agent.
    pub(super) async fn fetch_served(
        &self,
        restore_id: &str,
        source: &pb::SnapshotSource,
        to: &Path,
        progress: DownloadProgress<'_>,
    ) -> Result<()> {
        let described = format!("target of restore {restore_id} from {}", source.served_by);
        if let Some(local) = self.shelf.get(restore_id) {
            let chunks = file_chunks(local).await?.map(|c| c.map(Bytes::from));
            return write_checked(chunks, to, source, &described, progress).await;
        }
        let tls = self.client_tls.as_ref().ok_or_else(|| {
            BackupError::Refused(format!(
                "{described}: this agent has no client identity to call other nodes"
            ))
        })?;
        let channel = bulwark_common::grpc::channel(&source.served_by, tls, None).map_err(|e| {
            BackupError::InvalidArgument(format!("agent address {}: {e}", source.served_by))
        })?;
        let stream = RestoreAgentClient::new(channel)
            .fetch_target(pb::FetchTargetRequest {
                restore_id: restore_id.to_owned(),
            })
            .await
            .map_err(|s| status_error(&described, &s))?
            .into_inner();
        let what = described.clone();
        let chunks = stream.map(move |c| {
            c.map(|c| Bytes::from(c.data))
                .map_err(|s| status_error(&what, &s))
        });
        write_checked(chunks, to, source, &described, progress).await
    }
}

/// The file at `path` in `CHUNK`-sized pieces, read as they are taken.
async fn file_chunks(
    path: PathBuf,
) -> Result<impl Stream<Item = Result<Vec<u8>>> + Send + 'static> {
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| BackupError::local(format!("opening {}", path.display()), e))?;
    Ok(futures::stream::try_unfold(
        (file, path),
        |(mut file, path)| async move {
            let mut buf = vec![0u8; CHUNK];
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| BackupError::local(format!("reading {}", path.display()), e))?;
            if n == 0 {
                return Ok(None);
            }
            buf.truncate(n);
            Ok(Some((buf, (file, path))))
        },
    ))
}

/// A failed FetchTarget call as the step's error.
fn status_error(what: &str, s: &tonic::Status) -> BackupError {
    BackupError::local(what, format!("{:?}: {}", s.code(), s.message()))
}

/// Writes `chunks` to `to`, synced, hashing them on the way; fails unless
/// the SHA-256 and size are the source's.
pub(super) async fn write_checked(
    chunks: impl Stream<Item = Result<Bytes>>,
    to: &Path,
    source: &pb::SnapshotSource,
    described: &str,
    progress: DownloadProgress<'_>,
) -> Result<()> {
    let since = std::time::Instant::now();
    let mut last_report = since;
    let mut file = tokio::fs::File::create(to)
        .await
        .map_err(|e| BackupError::local(format!("creating {}", to.display()), e))?;
    let mut h = Sha256::new();
    let mut chunks = std::pin::pin!(chunks);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        h.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| BackupError::local(format!("writing {}", to.display()), e))?;
        if last_report.elapsed() >= std::time::Duration::from_secs(1) {
            last_report = std::time::Instant::now();
            progress(h.len(), source.size_bytes, since.elapsed());
        }
    }
    file.sync_all()
        .await
        .map_err(|e| BackupError::local(format!("writing {}", to.display()), e))?;
    let (sha, size) = h.finish_hex();
    if sha != source.sha256 || size != source.size_bytes {
        return Err(BackupError::Corrupt {
            kind: Corruption::StoredHash,
            what: described.to_owned(),
            detail: format!(
                "expected {} bytes with SHA-256 {}, fetched {size} bytes with {sha}",
                source.size_bytes, source.sha256
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(data: &[u8]) -> pb::SnapshotSource {
        let mut h = Sha256::new();
        h.update(data);
        let (sha256, size) = h.finish_hex();
        pb::SnapshotSource {
            sha256,
            size_bytes: size,
            raw_size_bytes: size,
            served_by: "node-0:7443".into(),
            ..Default::default()
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes>> + use<> {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn a_served_target_is_written_whole_and_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let to = dir.path().join("staged.db");
        let want = source(b"bbolt pages");
        write_checked(
            chunks(&[b"bbolt ", b"pages"]),
            &to,
            &want,
            "t",
            &|_, _, _| {},
        )
        .await
        .expect("the right bytes pass");
        assert_eq!(std::fs::read(&to).expect("staged"), b"bbolt pages");
    }

    #[tokio::test]
    async fn a_flipped_or_short_target_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let to = dir.path().join("staged.db");
        let want = source(b"bbolt pages");
        for (parts, what) in [
            (&[b"bbolt ".as_slice(), b"pageS"][..], "a flipped byte"),
            (&[b"bbolt ".as_slice(), b"page"][..], "a short stream"),
        ] {
            let parts: Vec<&'static [u8]> = parts.to_vec();
            let e = write_checked(chunks(&parts), &to, &want, "target of r1", &|_, _, _| {})
                .await
                .expect_err(what);
            assert!(
                matches!(
                    e,
                    BackupError::Corrupt {
                        kind: Corruption::StoredHash,
                        ..
                    }
                ),
                "{what}: {e}"
            );
            assert!(e.to_string().contains("target of r1"), "{what}: {e}");
        }
    }

    #[tokio::test]
    async fn a_broken_stream_fails_with_its_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let to = dir.path().join("staged.db");
        let broken = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"bbolt ")),
            Err(BackupError::local(
                "FetchTarget from node-0",
                "Unavailable: gone",
            )),
        ]);
        let e = write_checked(broken, &to, &source(b"bbolt pages"), "t", &|_, _, _| {})
            .await
            .expect_err("a broken stream");
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
