//! A kubelet stand-in for static pods: watches one manifest file and runs
//! the process its container command describes, so restore code that stops
//! and starts etcd by moving its manifest runs the same path as on a real
//! node. Test double, not a kubelet: it reads only `spec.containers[0]`'s
//! `command` (and `args`), polls every 100 ms, stops the process (SIGTERM)
//! when the file goes away, restarts it when the file changes, and
//! restarts it after it exits, like `restartPolicy: Always`.
//! [`Kubelet::pause`] makes it ignore the manifest (a stuck kubelet), for
//! testing what a restore does when etcd does not stop; [`Kubelet::freeze`]
//! stops the running process with SIGSTOP (up, but answering nothing) until
//! it is thawed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::process::{Process, ProcessBuilder};

/// The running simulator; stops its process when dropped.
#[derive(Debug)]
pub struct Kubelet {
    cancel: CancellationToken,
    starts: Arc<AtomicU32>,
    running: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    holding: Arc<AtomicBool>,
    signals: mpsc::Sender<SignalRequest>,
    manifest: PathBuf,
}

/// A signal for the running process, and where to say how sending it went.
type SignalRequest = (i32, oneshot::Sender<anyhow::Result<()>>);

/// Sends `signal` to the process `current` runs, if any. The process is the
/// watcher's unreaped child, so its pid cannot have been recycled.
fn send_signal(current: &Option<(String, Process)>, signal: i32) -> anyhow::Result<()> {
    match current {
        Some((_, p)) => p.signal(signal),
        None => anyhow::bail!("no process runs from the manifest"),
    }
}

/// The command line of the first container of a static pod manifest.
pub fn pod_command(text: &str) -> anyhow::Result<Vec<String>> {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)?;
    let c = doc
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(|c| c.as_sequence())
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow::anyhow!("no spec.containers[0]"))?;
    let args: Vec<String> = ["command", "args"]
        .iter()
        .filter_map(|k| c.get(*k).and_then(|v| v.as_sequence()))
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    anyhow::ensure!(!args.is_empty(), "spec.containers[0] has no command");
    Ok(args)
}

/// An etcd member as a kubeadm node runs it: a static pod whose one
/// container's command line is etcd's (the part a [`Kubelet`] runs and a
/// restore reads and rewrites).
#[derive(Clone, Debug)]
pub struct EtcdPod<'a> {
    /// `metadata.name` (kubeadm: `etcd-<node>`).
    pub pod_name: &'a str,
    /// The etcd binary.
    pub etcd: &'a Path,
    /// `--name`.
    pub name: &'a str,
    /// `--data-dir`.
    pub data_dir: &'a Path,
    /// `--listen-client-urls` and `--advertise-client-urls`.
    pub client_url: &'a str,
    /// `--listen-peer-urls` and `--initial-advertise-peer-urls`.
    pub peer_url: &'a str,
    /// `--initial-cluster` (`name=peer-url,…`).
    pub initial_cluster: &'a str,
    /// `--initial-cluster-token`.
    pub token: &'a str,
    /// `--heartbeat-interval` and `--election-timeout`, in milliseconds.
    pub heartbeat_ms: u32,
    /// See `heartbeat_ms`.
    pub election_ms: u32,
}

impl EtcdPod<'_> {
    /// The manifest (YAML) for `manifests/etcd.yaml`.
    pub fn manifest(&self) -> anyhow::Result<String> {
        self.manifest_as("new")
    }

    /// The manifest of a member joining a running cluster (added first
    /// with `etcdctl member add`): `--initial-cluster-state=existing`.
    pub fn joining_manifest(&self) -> anyhow::Result<String> {
        self.manifest_as("existing")
    }

    fn manifest_as(&self, state: &str) -> anyhow::Result<String> {
        let command = vec![
            self.etcd.display().to_string(),
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--listen-client-urls={}", self.client_url),
            format!("--advertise-client-urls={}", self.client_url),
            format!("--listen-peer-urls={}", self.peer_url),
            format!("--initial-advertise-peer-urls={}", self.peer_url),
            format!("--initial-cluster={}", self.initial_cluster),
            format!("--initial-cluster-token={}", self.token),
            format!("--initial-cluster-state={state}"),
            format!("--heartbeat-interval={}", self.heartbeat_ms),
            format!("--election-timeout={}", self.election_ms),
        ];
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.pod_name, "namespace": "kube-system"},
            "spec": {"containers": [{"name": "etcd", "command": command}]},
        });
        Ok(serde_yaml_ng::to_string(&pod)?)
    }

    /// Writes the manifest to `path`.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.manifest()?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }

    /// Writes the [joining manifest](Self::joining_manifest) to `path`.
    pub fn write_joining(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.joining_manifest()?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }
}

impl Kubelet {
    /// Starts watching `manifest`; the process is called `name` in logs.
    pub fn start(manifest: &Path, name: &str) -> Self {
        let cancel = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        let running = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let holding = Arc::new(AtomicBool::new(false));
        let (signals, mut requests) = mpsc::channel::<SignalRequest>(1);
        let (c, s, r, z, hold, path, name) = (
            cancel.clone(),
            starts.clone(),
            running.clone(),
            paused.clone(),
            holding.clone(),
            manifest.to_owned(),
            name.to_owned(),
        );
        tokio::spawn(async move {
            let mut current: Option<(String, Process)> = None;
            loop {
                if z.load(Ordering::SeqCst) {
                    tokio::select! {
                        _ = c.cancelled() => break,
                        Some((signal, reply)) = requests.recv() => {
                            let _ = reply.send(send_signal(&current, signal));
                            continue;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
                let text = std::fs::read_to_string(&path).ok();
                let changed = match (&current, &text) {
                    (Some((old, _)), Some(new)) => old != new,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if changed && let Some((_, mut p)) = current.take() {
                    let _ = p.stop().await;
                    r.store(false, Ordering::SeqCst);
                }
                if let Some((_, p)) = &mut current
                    && !p.is_running()
                    && !hold.load(Ordering::SeqCst)
                {
                    // restartPolicy: Always, with a short back-off.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if p.start().is_ok() {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                }
                if current.is_none()
                    && !hold.load(Ordering::SeqCst)
                    && let Some(t) = text
                {
                    match pod_command(&t) {
                        Ok(cmd) => {
                            match ProcessBuilder::new(&name, &cmd[0]).args(&cmd[1..]).spawn() {
                                Ok(p) => {
                                    s.fetch_add(1, Ordering::SeqCst);
                                    r.store(true, Ordering::SeqCst);
                                    current = Some((t, p));
                                }
                                Err(e) => eprintln!("kubelet {name}: cannot start: {e:#}"),
                            }
                        }
                        Err(e) => eprintln!("kubelet {name}: bad manifest: {e:#}"),
                    }
                }
                tokio::select! {
                    _ = c.cancelled() => break,
                    Some((signal, reply)) = requests.recv() => {
                        let _ = reply.send(send_signal(&current, signal));
                    }
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            if let Some((_, mut p)) = current {
                let _ = p.stop().await;
            }
            r.store(false, Ordering::SeqCst);
        });
        Self {
            cancel,
            starts,
            running,
            paused,
            holding,
            signals,
            manifest: manifest.to_owned(),
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the running process: a member
    /// whose process is up and whose port accepts connections, but which
    /// answers nothing (a frozen VM, a stalled disk), for as long as a test
    /// needs. Fails when no process runs.
    pub async fn freeze(&self, frozen: bool) -> anyhow::Result<()> {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        let (reply, answer) = oneshot::channel();
        self.signals
            .send((signal, reply))
            .await
            .map_err(|_| anyhow::anyhow!("the kubelet stand-in has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the kubelet stand-in has stopped"))?
    }

    /// Stops or resumes reacting to the manifest (the process keeps
    /// running as it is while paused).
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Holds or releases new starts: while held, a removed or changed
    /// manifest still stops the process, but nothing is started from the
    /// manifest (a node whose restarted member never comes up).
    pub fn hold_starts(&self, hold: bool) {
        self.holding.store(hold, Ordering::SeqCst);
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        self.starts.load(Ordering::SeqCst)
    }

    /// Whether a process for the manifest runs now.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// The watched manifest.
    pub fn manifest(&self) -> &Path {
        &self.manifest
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_etcd_pod_manifest_runs_the_command_it_was_given() {
        let pod = EtcdPod {
            pod_name: "etcd-m0",
            etcd: Path::new("/opt/etcd"),
            name: "m0",
            data_dir: Path::new("/var/lib/etcd"),
            client_url: "http://127.0.0.1:2379",
            peer_url: "http://127.0.0.1:2380",
            initial_cluster: "m0=http://127.0.0.1:2380",
            token: "original",
            heartbeat_ms: 50,
            election_ms: 500,
        };
        let text = pod.manifest().expect("manifest");
        let args = pod_command(&text).expect("a command");
        assert_eq!(args[0], "/opt/etcd");
        assert!(
            args.contains(&"--data-dir=/var/lib/etcd".to_owned()),
            "{args:?}"
        );
        assert!(
            args.contains(&"--election-timeout=500".to_owned()),
            "{args:?}"
        );
        assert_eq!(args.len(), 12);
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
        assert_eq!(doc["metadata"]["name"].as_str(), Some("etcd-m0"));
        assert!(args.contains(&"--initial-cluster-state=new".to_owned()));
        let joining = pod_command(&pod.joining_manifest().expect("manifest")).expect("a command");
        assert!(
            joining.contains(&"--initial-cluster-state=existing".to_owned()),
            "{joining:?}"
        );
    }
}
