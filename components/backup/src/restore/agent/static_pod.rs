//! etcd as a kubelet static pod: the member's name, URLs and data dir
//! read from the config or the manifest's command line, the restore tool
//! (`etcdutl`, or etcd 3.4's `etcdctl`), and waiting for etcd's ports to
//! close once the manifest is out.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;

use super::Agent;
use crate::error::{BackupError, Result};

/// `etcdutl`, or etcd 3.4's `etcdctl`, which restores snapshots the same way.
pub(super) struct RestoreTool<'a> {
    /// "etcdutl" or "etcdctl", as its `version` output names it.
    pub(super) name: &'static str,
    pub(super) path: &'a Path,
}

impl RestoreTool<'_> {
    /// The tool with no stdin; etcdctl with the v3 API pinned (3.4's
    /// default, but an inherited `ETCDCTL_API=2` has no `snapshot`).
    pub(super) fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.path);
        if self.name == "etcdctl" {
            cmd.env("ETCDCTL_API", "3");
        }
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// etcd's command line as the static pod manifest gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdCommand {
    /// The command and its arguments.
    pub args: Vec<String>,
}

impl EtcdCommand {
    /// Finds the etcd container's command in a static pod manifest.
    pub fn from_manifest(text: &str) -> std::result::Result<Self, String> {
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
        let containers = doc
            .get("spec")
            .and_then(|s| s.get("containers"))
            .and_then(|c| c.as_sequence())
            .ok_or("no spec.containers")?;
        for c in containers {
            let Some(cmd) = c.get("command").and_then(|c| c.as_sequence()) else {
                continue;
            };
            let args: Vec<String> = cmd
                .iter()
                .chain(
                    c.get("args")
                        .and_then(|a| a.as_sequence())
                        .into_iter()
                        .flatten(),
                )
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            if args
                .first()
                .is_some_and(|a| a.rsplit('/').next() == Some("etcd"))
            {
                return Ok(Self { args });
            }
        }
        Err("no container whose command is etcd".into())
    }

    /// The value of `--flag=value` or `--flag value`.
    pub fn flag(&self, name: &str) -> Option<String> {
        let eq = format!("--{name}=");
        let bare = format!("--{name}");
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if let Some(v) = a.strip_prefix(&eq) {
                return Some(v.to_owned());
            }
            if *a == bare {
                return it.next().cloned();
            }
        }
        None
    }
}

/// This node's etcd member, resolved from the config and the manifest.
#[derive(Clone, Debug)]
pub struct Member {
    /// `--name`.
    pub name: String,
    /// `--initial-advertise-peer-urls`.
    pub peer_urls: Vec<String>,
    /// `--advertise-client-urls`.
    pub client_urls: Vec<String>,
    /// `--data-dir`.
    pub data_dir: PathBuf,
}

fn split_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// host:port of a URL.
fn url_addr(u: &str) -> Option<String> {
    let parsed = url::Url::parse(u).ok()?;
    Some(format!(
        "{}:{}",
        parsed.host_str()?,
        parsed.port_or_known_default()?
    ))
}

impl Agent {
    /// Resolves the member from the config, filling gaps from the manifest
    /// (in place, or moved aside by a restore).
    pub(super) async fn member(&self, aside: Option<&Path>) -> Result<Member> {
        let path = match aside {
            Some(p) if p.exists() => p.to_owned(),
            _ => self.config.etcd_manifest.clone(),
        };
        let cmd = match tokio::fs::read_to_string(&path).await {
            Ok(text) => EtcdCommand::from_manifest(&text).map_err(|e| {
                BackupError::InvalidArgument(format!("etcd manifest {}: {e}", path.display()))
            })?,
            Err(e) => {
                let c = &self.config;
                if c.member_name.is_none() || c.data_dir.is_none() || c.peer_urls.is_empty() {
                    return Err(BackupError::local(
                        format!(
                            "reading the etcd manifest {} (restore.memberName, dataDir and \
                             peerUrls are not all configured)",
                            path.display()
                        ),
                        e,
                    ));
                }
                EtcdCommand::default()
            }
        };
        let need = |what: &str, v: Option<String>| {
            v.ok_or_else(|| {
                BackupError::InvalidArgument(format!(
                    "etcd's {what} is neither in restore: nor on etcd's command line in {}",
                    path.display()
                ))
            })
        };
        let name = need(
            "--name",
            self.config.member_name.clone().or_else(|| cmd.flag("name")),
        )?;
        let data_dir = need(
            "--data-dir",
            self.config
                .data_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .or_else(|| cmd.flag("data-dir")),
        )?;
        let peer_urls = if self.config.peer_urls.is_empty() {
            split_urls(&need(
                "--initial-advertise-peer-urls",
                cmd.flag("initial-advertise-peer-urls"),
            )?)
        } else {
            self.config.peer_urls.clone()
        };
        let client_urls = if self.config.client_urls.is_empty() {
            split_urls(&need(
                "--advertise-client-urls",
                cmd.flag("advertise-client-urls"),
            )?)
        } else {
            self.config.client_urls.clone()
        };
        Ok(Member {
            name,
            peer_urls,
            client_urls,
            data_dir: PathBuf::from(data_dir),
        })
    }

    /// The tool that restores this member: `restore.etcdctl` (etcd 3.4,
    /// run with `ETCDCTL_API=3`) when set, else `drill.etcdutl`.
    pub(super) fn restore_tool(&self) -> RestoreTool<'_> {
        match &self.config.etcdctl {
            Some(path) => RestoreTool {
                name: "etcdctl",
                path,
            },
            None => RestoreTool {
                name: "etcdutl",
                path: &self.engine.drill.etcdutl,
            },
        }
    }

    /// What the restore tool's `snapshot restore` here supports.
    pub(super) async fn etcdutl_capabilities(&self) -> pb::EtcdutlCapabilities {
        let tool = self.restore_tool();
        let prefix = format!("{} version:", tool.name);
        let version = tool
            .command()
            .arg("version")
            .output()
            .await
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
            })
            .unwrap_or_default();
        let help = tool
            .command()
            .args(["snapshot", "restore", "--help"])
            .output()
            .await
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default();
        pb::EtcdutlCapabilities {
            version,
            bump_revision: help.contains("--bump-revision"),
            mark_compacted: help.contains("--mark-compacted"),
        }
    }
}

/// Waits until nothing listens on the member's client and peer ports.
pub(super) async fn wait_ports_closed(member: &Member, timeout: Duration) -> Result<()> {
    let addrs: Vec<String> = member
        .client_urls
        .iter()
        .chain(&member.peer_urls)
        .filter_map(|u| url_addr(u))
        .collect();
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut open = None;
        let mut dialled = false;
        for a in &addrs {
            let probe = listening(a).await;
            dialled |= probe.dialled;
            if probe.open {
                open = Some(a.clone());
                break;
            }
        }
        let Some(open) = open else { return Ok(()) };
        if Instant::now() > deadline {
            return Err(BackupError::local(
                "waiting for etcd to stop",
                format!(
                    "{open} still answers after {} (is the kubelet running and watching the manifest dir?)",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        // A bind probe is silent and cheap: poll often, so the restore
        // goes on within moments of etcd stopping (the old leader's node
        // waits for the others' stops). Backing off bounds the dialled
        // probes of addresses this host cannot bind (below), which etcd
        // logs, to about one a second.
        if dialled {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        } else {
            tokio::time::sleep(BIND_PROBE_EVERY).await;
        }
    }
}

/// How often a member's ports are probed while every probe is a bind.
const BIND_PROBE_EVERY: Duration = Duration::from_millis(25);

/// What a probe of one address found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Probe {
    /// Something listens there.
    pub(super) open: bool,
    /// The address was dialled (etcd sees, and logs, that connect).
    pub(super) dialled: bool,
}

/// Whether something listens on `addr` (host:port). An address of this
/// host is checked by binding it (with SO_REUSEADDR, so connections
/// lingering in TIME_WAIT do not count; Linux still refuses while a socket
/// listens there): etcd sees nothing, where a bare TCP connect on its TLS
/// ports made it log a `rejected connection` warning on every probe. An
/// address this host cannot bind (another host's) is dialled.
pub(super) async fn listening(addr: &str) -> Probe {
    let mut probe = Probe {
        open: false,
        dialled: false,
    };
    let resolved: Vec<std::net::SocketAddr> = match tokio::net::lookup_host(addr).await {
        Ok(a) => a.collect(),
        Err(_) => return probe,
    };
    for sa in resolved {
        let bound = (|| {
            let socket = if sa.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(sa)
        })();
        match bound {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                probe.open = true;
                return probe;
            }
            Err(_) => {
                probe.dialled = true;
                let dialled = tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(sa),
                )
                .await;
                if matches!(dialled, Ok(Ok(_))) {
                    probe.open = true;
                    return probe;
                }
            }
        }
    }
    probe
}

#[cfg(test)]
mod tests {
    use super::super::disk::aside_path;
    use super::*;

    /// The probe sees a listener without connecting to it (etcd logged
    /// every connect as a rejected connection), and sees it gone.
    #[tokio::test]
    async fn the_port_probe_does_not_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        assert_eq!(
            listening(&addr).await,
            Probe {
                open: true,
                dialled: false
            }
        );
        let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(accepted.is_err(), "the probe connected: {accepted:?}");
        drop(listener);
        assert_eq!(
            listening(&addr).await,
            Probe {
                open: false,
                dialled: false
            }
        );
    }

    #[test]
    fn flags_come_from_the_static_pod_command() {
        let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: etcd, namespace: kube-system}
spec:
  containers:
  - name: etcd
    image: registry.k8s.io/etcd:3.5.15-0
    command:
    - etcd
    - --name=cp-1
    - --data-dir=/var/lib/etcd
    - --initial-advertise-peer-urls=https://10.0.0.1:2380
    - --advertise-client-urls
    - https://10.0.0.1:2379,https://127.0.0.1:2379
"#;
        let c = EtcdCommand::from_manifest(manifest).unwrap();
        assert_eq!(c.flag("name").as_deref(), Some("cp-1"));
        assert_eq!(c.flag("data-dir").as_deref(), Some("/var/lib/etcd"));
        assert_eq!(
            split_urls(&c.flag("advertise-client-urls").unwrap()),
            vec!["https://10.0.0.1:2379", "https://127.0.0.1:2379"]
        );
        assert_eq!(c.flag("missing"), None);
        assert!(
            EtcdCommand::from_manifest("spec: {containers: [{command: [kube-apiserver]}]}")
                .is_err()
        );
        assert_eq!(
            aside_path(Path::new("/var/lib/etcd"), "r1", ""),
            PathBuf::from("/var/lib/etcd.bulwark-r1")
        );
        assert_eq!(
            url_addr("https://10.0.0.1:2380").as_deref(),
            Some("10.0.0.1:2380")
        );
    }
}
