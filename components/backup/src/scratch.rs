//! A throwaway single-member etcd on loopback, restored from a snapshot
//! file: where point-in-time restores replay deltas before the result is
//! snapshotted again. Ephemeral ports (retried when another process takes
//! them first), `--unsafe-no-fsync` (it is thrown away), killed on drop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use crate::engine::DrillSettings;
use crate::error::{BackupError, Corruption, Result};
use crate::etcd::{EtcdConnector, classify};
use crate::hashing::{Sha256, TrailerVerifier};

/// The running throwaway etcd.
#[derive(Debug)]
pub struct ScratchEtcd {
    child: tokio::process::Child,
    endpoint: String,
    log_path: PathBuf,
}

/// Two free loopback ports. The race with other processes taking them
/// before etcd binds is handled by retrying the start.
pub(crate) fn free_ports() -> std::io::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// The last lines of a process's output, for error details.
pub(crate) fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

impl ScratchEtcd {
    /// Restores `db` with etcdutl into `dir` and starts etcd on it; returns
    /// once it answers.
    pub async fn from_snapshot(
        tools: &DrillSettings,
        dir: &Path,
        db: &Path,
        cancel: &CancellationToken,
    ) -> Result<Self> {
        const ATTEMPTS: usize = 3;
        let mut last = None;
        for attempt in 1..=ATTEMPTS {
            let (client_port, peer_port) =
                free_ports().map_err(|e| BackupError::local("finding free ports", e))?;
            let data_dir = dir.join(format!("scratch-{attempt}"));
            let peer = format!("http://127.0.0.1:{peer_port}");
            let endpoint = format!("http://127.0.0.1:{client_port}");
            let cluster = format!("scratch={peer}");
            let out = tokio::process::Command::new(&tools.etcdutl)
                .arg("snapshot")
                .arg("restore")
                .arg(db)
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--name", "scratch", "--initial-cluster", &cluster])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster-token", "bulwark-scratch"])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| {
                    BackupError::local(format!("running {}", tools.etcdutl.display()), e)
                })?;
            if !out.status.success() {
                return Err(BackupError::local(
                    "etcdutl snapshot restore",
                    format!(
                        "{}: {}",
                        out.status,
                        tail(&String::from_utf8_lossy(&out.stderr))
                    ),
                ));
            }
            let log_path = dir.join(format!("scratch-{attempt}.log"));
            let log = std::fs::File::create(&log_path)
                .map_err(|e| BackupError::local(format!("creating {}", log_path.display()), e))?;
            let log_err = log
                .try_clone()
                .map_err(|e| BackupError::local(format!("opening {}", log_path.display()), e))?;
            let child = tokio::process::Command::new(&tools.etcd)
                .args(["--name", "scratch"])
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--listen-client-urls", &endpoint])
                .args(["--advertise-client-urls", &endpoint])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &cluster])
                .args(["--initial-cluster-token", "bulwark-scratch"])
                // Large requests: one replayed revision is one transaction.
                .args(["--max-request-bytes", "33554432"])
                .args(["--max-txn-ops", "100000"])
                .arg("--unsafe-no-fsync")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| BackupError::local(format!("starting {}", tools.etcd.display()), e))?;
            let mut scratch = Self {
                child,
                endpoint,
                log_path,
            };
            match scratch.wait_ready(tools.start_timeout, cancel).await {
                Ok(()) => return Ok(scratch),
                Err(e)
                    if e.to_string().contains("address already in use") && attempt < ATTEMPTS =>
                {
                    tracing::debug!(attempt, "scratch etcd port was taken; retrying");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| BackupError::local("scratch etcd", "no attempt ran")))
    }

    async fn wait_ready(&mut self, timeout: Duration, cancel: &CancellationToken) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let connector = EtcdConnector::plain(vec![self.endpoint.clone()], Duration::from_secs(2));
        loop {
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled("scratch etcd start".into()));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                return Err(BackupError::local(
                    "scratch etcd",
                    format!("exited ({status}): {}", tail(&text)),
                ));
            }
            if Instant::now() > deadline {
                return Err(BackupError::local(
                    "scratch etcd",
                    format!("not ready after {}", humantime::format_duration(timeout)),
                ));
            }
            if let Ok(mut c) = connector.client().await
                && EtcdConnector::revision(&mut c, &self.endpoint)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its client URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A client.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        EtcdConnector::plain(vec![self.endpoint.clone()], Duration::from_secs(30))
            .client()
            .await
    }

    /// Streams a snapshot of it into `out`, checking etcd's trailing hash.
    /// Returns the SHA-256 and size of the whole file.
    pub async fn save_snapshot(&self, out: &Path) -> Result<(String, u64)> {
        let eps = [self.endpoint.clone()];
        let mut client = self.client().await?;
        let mut stream = client
            .snapshot()
            .await
            .map_err(|e| classify(&eps, "snapshot", &e))?;
        let mut file = tokio::fs::File::create(out)
            .await
            .map_err(|e| BackupError::local(format!("creating {}", out.display()), e))?;
        let mut trailer = TrailerVerifier::new();
        let mut whole = Sha256::new();
        while let Some(m) = stream
            .message()
            .await
            .map_err(|e| classify(&eps, "snapshot stream", &e))?
        {
            let blob = m.blob();
            trailer.update(blob);
            whole.update(blob);
            file.write_all(blob)
                .await
                .map_err(|e| BackupError::local(format!("writing {}", out.display()), e))?;
        }
        file.sync_all()
            .await
            .map_err(|e| BackupError::local(format!("writing {}", out.display()), e))?;
        trailer.finish().map_err(|e| BackupError::Corrupt {
            kind: Corruption::EtcdHash,
            what: "snapshot of the scratch etcd".into(),
            detail: e.to_string(),
        })?;
        Ok(whole.finish_hex())
    }

    /// Stops it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
