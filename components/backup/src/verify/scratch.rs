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
use crate::pipeline::hashing::{Sha256, TrailerVerifier};

/// The running throwaway etcd.
#[derive(Debug)]
pub struct ScratchEtcd {
    child: tokio::process::Child,
    endpoint: String,
    log_path: PathBuf,
}

/// Two free loopback ports. The race with other processes taking them
/// before etcd binds is handled by retrying the start.
fn free_ports() -> std::io::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// The last lines of a process's output, for error details.
pub(crate) fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// One throwaway single-member etcd's names and loopback URLs, shared by
/// the scratch etcd and the drill (which differ in how they report).
pub(crate) struct Member {
    /// The member's (and the cluster token's) name.
    name: &'static str,
    /// Where it is restored.
    pub(crate) data_dir: PathBuf,
    /// Its peer URL.
    peer: String,
    /// Its client URL.
    pub(crate) client: String,
}

/// Why `etcdutl snapshot restore` did not restore.
pub(crate) enum ToolFailure {
    /// It could not be run.
    Spawn(std::io::Error),
    /// It ran and failed: its status and the tail of its stderr.
    Exit(std::process::ExitStatus, String),
}

/// Why etcd did not start.
pub(crate) enum StartFailure {
    /// Its log file (what was being done, the error).
    Log(String, std::io::Error),
    /// The process.
    Spawn(std::io::Error),
}

impl Member {
    /// A member `name` restored into `<dir>/<name>-<attempt>` on two free
    /// loopback ports.
    pub(crate) fn new(dir: &Path, name: &'static str, attempt: usize) -> std::io::Result<Self> {
        let (client_port, peer_port) = free_ports()?;
        Ok(Self {
            name,
            data_dir: dir.join(format!("{name}-{attempt}")),
            peer: format!("http://127.0.0.1:{peer_port}"),
            client: format!("http://127.0.0.1:{client_port}"),
        })
    }

    fn cluster(&self) -> String {
        format!("{}={}", self.name, self.peer)
    }

    fn token(&self) -> String {
        format!("bulwark-{}", self.name)
    }

    /// `etcdutl snapshot restore` of `db` into the member's data dir.
    pub(crate) async fn restore(
        &self,
        tools: &DrillSettings,
        db: &Path,
    ) -> std::result::Result<(), ToolFailure> {
        let mut cmd = tokio::process::Command::new(&tools.etcdutl);
        cmd.arg("snapshot")
            .arg("restore")
            .arg(db)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--name", self.name, "--initial-cluster", &self.cluster()])
            .args(["--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster-token", &self.token()])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // Tied to this process: a killed bulwark-backup leaves no etcdutl
        // writing behind it.
        let out = bulwark_common::child::output(cmd)
            .await
            .map_err(ToolFailure::Spawn)?;
        if !out.status.success() {
            return Err(ToolFailure::Exit(
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr)),
            ));
        }
        Ok(())
    }

    /// Starts etcd on the restored data dir, its output in `log_path`,
    /// with `extra` flags; killed when the child is dropped, or when this
    /// process dies (a SIGKILLed bulwark-backup leaves no scratch etcd on
    /// its ports and work dir).
    pub(crate) async fn start(
        &self,
        tools: &DrillSettings,
        log_path: &Path,
        extra: &[&str],
    ) -> std::result::Result<tokio::process::Child, StartFailure> {
        let log = std::fs::File::create(log_path)
            .map_err(|e| StartFailure::Log(format!("creating {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| StartFailure::Log(format!("opening {}", log_path.display()), e))?;
        let mut cmd = tokio::process::Command::new(&tools.etcd);
        cmd.args(["--name", self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.client])
            .args(["--advertise-client-urls", &self.client])
            .args(["--listen-peer-urls", &self.peer])
            .args(["--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster", &self.cluster()])
            .args(["--initial-cluster-token", &self.token()])
            .args(extra)
            // A throwaway: durability does not matter, start-up time does.
            .arg("--unsafe-no-fsync")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        bulwark_common::child::spawn(cmd)
            .await
            .map_err(StartFailure::Spawn)
    }
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
            let member = Member::new(dir, "scratch", attempt)
                .map_err(|e| BackupError::local("finding free ports", e))?;
            member.restore(tools, db).await.map_err(|e| match e {
                ToolFailure::Spawn(e) => {
                    BackupError::local(format!("running {}", tools.etcdutl.display()), e)
                }
                ToolFailure::Exit(status, tail) => {
                    BackupError::local("etcdutl snapshot restore", format!("{status}: {tail}"))
                }
            })?;
            let log_path = dir.join(format!("scratch-{attempt}.log"));
            // Large requests: one replayed revision is one transaction.
            let child = member
                .start(
                    tools,
                    &log_path,
                    &["--max-request-bytes", "33554432", "--max-txn-ops", "100000"],
                )
                .await
                .map_err(|e| match e {
                    StartFailure::Log(what, e) => BackupError::local(what, e),
                    StartFailure::Spawn(e) => {
                        BackupError::local(format!("starting {}", tools.etcd.display()), e)
                    }
                })?;
            let mut scratch = Self {
                child,
                endpoint: member.client,
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
