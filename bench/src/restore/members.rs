//! The restore as the operator waits for it, member by member: real etcd
//! static pods under the kubelet stand-in, each node's restore agent
//! (`bulwark_backup::restore::agent::Agent`, called in-process, as the
//! coordinator calls it over gRPC) doing its three steps on every node at
//! once, exactly as `bulwarkctl restore --snapshot-only` drives them:
//!
//! - prepare: the committed snapshot streamed from the store through the
//!   decoder into the node's staging file, both hashes checked, then
//!   `etcdutl snapshot restore` beside the running member;
//! - restore: the manifest out, etcd stopped, the data dir aside, the
//!   prebuilt member renamed into its place;
//! - start: the manifest back, until the member has a leader.
//!
//! The baseline does what an operator does by hand with a plain snapshot
//! file on local disk: `etcdutl snapshot restore`, then etcd started on the
//! result (a manifest written, the kubelet stand-in starts it) until it has
//! a leader. Not included on bulwark's side: the coordinator's plan and
//! pre-flight calls and the gRPC hops (tens of milliseconds in the
//! integration tests' restore logs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bulwark_api::backup::v1 as pb;
use bulwark_backup::config::RestoreConfig;
use bulwark_backup::engine::Engine;
use bulwark_backup::etcd::EtcdConnector;
use bulwark_backup::restore::agent::Agent;
use bulwark_backup::snapshot::manifest::Manifest;
use bulwark_testkit::kubelet::{EtcdPod, Kubelet};
use bulwark_testkit::{EtcdVersion, ports, tools};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// How long a member may take to get a leader.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(300);

/// One control-plane node: its etcd pod under a kubelet stand-in, and its
/// restore agent.
pub(super) struct Node {
    name: String,
    peer_url: String,
    client_url: String,
    pub(super) agent: Arc<Agent>,
    _kubelet: Kubelet,
}

/// Makes node `i`'s agent from its restore config.
pub(super) type MakeAgent<'a> = &'a dyn Fn(usize, RestoreConfig) -> Agent;

/// The agent the snapshot-only runs use: in-process, no gRPC.
fn plain_agent(engine: &Arc<Engine>) -> impl Fn(usize, RestoreConfig) -> Agent + '_ {
    |_, config| Agent::new(engine.clone(), config, "127.0.0.1:1".into())
}

/// Seconds each part of one restore took (slowest node's, all at once).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(super) struct MemberTimes {
    pub(super) fetch: f64,
    pub(super) restore: f64,
    pub(super) start: f64,
    pub(super) total: f64,
}

/// Seconds of the baseline's two parts.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(super) struct BaselineTimes {
    pub(super) etcdutl: f64,
    pub(super) start: f64,
    pub(super) total: f64,
}

fn pod<'a>(
    etcd: &'a Path,
    name: &'a str,
    data_dir: &'a Path,
    urls: (&'a str, &'a str),
    initial_cluster: &'a str,
    token: &'a str,
) -> EtcdPod<'a> {
    EtcdPod {
        pod_name: name,
        etcd,
        name,
        data_dir,
        client_url: urls.0,
        peer_url: urls.1,
        initial_cluster,
        token,
        heartbeat_ms: 100,
        election_ms: 1000,
    }
}

/// Until the member at `client_url` has a leader.
async fn wait_healthy(client_url: &str) -> anyhow::Result<()> {
    let connector = EtcdConnector::plain(vec![client_url.to_owned()], Duration::from_secs(2));
    let deadline = Instant::now() + HEALTHY_TIMEOUT;
    loop {
        if let Ok(s) = connector.statuses().await
            && s.first().is_some_and(|m| m.leader != 0)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("etcd at {client_url} has no leader after {HEALTHY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` nodes under `root`, their etcd members running as one cluster,
/// each with the agent `agent` makes.
pub(super) async fn start_nodes(
    root: &Path,
    n: usize,
    agent: MakeAgent<'_>,
) -> anyhow::Result<Vec<Node>> {
    let etcd = tools::etcd(EtcdVersion::V3_5)?;
    let ports = ports::free_ports(std::net::Ipv4Addr::LOCALHOST.into(), 2 * n)?;
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let initial_cluster = names
        .iter()
        .enumerate()
        .map(|(i, name)| format!("{name}={}", url(ports[2 * i + 1])))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let dir = root.join(name);
        let manifest = dir.join("manifests/etcd.yaml");
        std::fs::create_dir_all(manifest.parent().context("manifest dir")?)?;
        let (client_url, peer_url) = (url(ports[2 * i]), url(ports[2 * i + 1]));
        let data_dir = dir.join("etcd-data");
        pod(
            &etcd,
            name,
            &data_dir,
            (&client_url, &peer_url),
            &initial_cluster,
            "bench-original",
        )
        .write(&manifest)?;
        let kubelet = Kubelet::start(&manifest, name);
        let agent = Arc::new(agent(
            i,
            RestoreConfig {
                etcd_manifest: manifest,
                state_dir: dir.join("state"),
                health_timeout: HEALTHY_TIMEOUT,
                ..Default::default()
            },
        ));
        clients.push(client_url.clone());
        nodes.push(Node {
            name: name.clone(),
            peer_url,
            client_url,
            agent,
            _kubelet: kubelet,
        });
    }
    for c in &clients {
        wait_healthy(c).await?;
    }
    Ok(nodes)
}

/// The committed snapshot `m` itself as a restore source, which each
/// agent decodes (as the coordinator asks for a snapshot-only restore).
fn stored_source(m: &Manifest) -> pb::SnapshotSource {
    pb::SnapshotSource {
        object_key: m.object_key.clone(),
        sha256: m.stored_sha256.clone(),
        size_bytes: m.stored_size_bytes,
        snapshot_id: m.id.clone(),
        raw_size_bytes: m.raw_size_bytes,
        served_by: String::new(),
    }
}

/// What each node's agent is asked to restore from `source`.
pub(super) fn specs(nodes: &[Node], source: &pb::SnapshotSource) -> Vec<pb::MemberRestoreSpec> {
    let initial_cluster = nodes
        .iter()
        .map(|n| format!("{}={}", n.name, n.peer_url))
        .collect::<Vec<_>>()
        .join(",");
    nodes
        .iter()
        .map(|n| pb::MemberRestoreSpec {
            snapshot: Some(source.clone()),
            member_name: n.name.clone(),
            peer_urls: vec![n.peer_url.clone()],
            initial_cluster: initial_cluster.clone(),
            cluster_token: "bench-restored".into(),
            bump_revision: 0,
            mark_compacted: false,
        })
        .collect()
}

/// A restore of `n` members from snapshot `m`, every node at once; the
/// time of each step across the nodes.
pub(super) async fn restore(
    engine: &Arc<Engine>,
    root: &Path,
    n: usize,
    m: &Manifest,
) -> anyhow::Result<MemberTimes> {
    let nodes = start_nodes(root, n, &plain_agent(engine)).await?;
    let specs = specs(&nodes, &stored_source(m));
    let rid = "bench";
    let started = Instant::now();
    prepare_all(&nodes, &specs, rid).await?;
    let fetched = Instant::now();
    restore_members(&nodes, &specs, rid).await?;
    let restored = Instant::now();
    let cancel = CancellationToken::new();
    let starts = nodes.iter().map(|node| {
        let req = pb::StartMemberRequest {
            restore_id: rid.into(),
            health_timeout: None,
        };
        let cancel = &cancel;
        async move { node.agent.start_member(req, &|_| {}, cancel).await }
    });
    for r in futures::future::join_all(starts).await {
        r.context("start member")?;
    }
    let done = Instant::now();
    Ok(MemberTimes {
        fetch: (fetched - started).as_secs_f64(),
        restore: (restored - fetched).as_secs_f64(),
        start: (done - restored).as_secs_f64(),
        total: (done - started).as_secs_f64(),
    })
}

/// PREPARE on every node at once: each fetches its target into its
/// staging file, hashes checked.
pub(super) async fn prepare_all(
    nodes: &[Node],
    specs: &[pb::MemberRestoreSpec],
    rid: &str,
) -> anyhow::Result<()> {
    let prepares = nodes.iter().zip(specs).map(|(node, spec)| {
        node.agent.prepare(pb::PrepareRestoreRequest {
            restore_id: rid.into(),
            coordinator: "bench".into(),
            spec: Some(spec.clone()),
            lock_ttl: None,
            skip_space_check: false,
        })
    });
    for r in futures::future::join_all(prepares).await {
        r.context("prepare (fetch)")?;
    }
    Ok(())
}

/// The old cluster's leader, by member name.
async fn leader(nodes: &[Node]) -> Option<String> {
    for n in nodes {
        let connector = EtcdConnector::plain(vec![n.client_url.clone()], Duration::from_secs(2));
        let s = connector.statuses().await.ok()?;
        let me = s.first()?;
        if me.leader != 0 && me.leader == me.member_id {
            return Some(n.name.clone());
        }
    }
    None
}

/// RestoreMember on every node at once, the old leader's last (once every
/// other node's etcd is down), as the coordinator does: a leader stopped
/// while its followers stop too waits out etcd's leadership transfer.
async fn restore_members(
    nodes: &[Node],
    specs: &[pb::MemberRestoreSpec],
    rid: &str,
) -> anyhow::Result<()> {
    let leader = leader(nodes).await.filter(|_| nodes.len() > 1);
    let others = nodes.len() - usize::from(leader.is_some());
    let (stopped, wait) = tokio::sync::watch::channel(0usize);
    let restores = nodes.iter().zip(specs).map(|(node, spec)| {
        let is_leader = leader.as_deref() == Some(node.name.as_str());
        let (stopped, mut wait) = (&stopped, wait.clone());
        let req = pb::RestoreMemberRequest {
            restore_id: rid.into(),
            spec: Some(spec.clone()),
            dry_run: false,
        };
        async move {
            if is_leader {
                wait.wait_for(|n| *n >= others).await?;
            }
            let sink = |ev: pb::NodeRestoreProgress| {
                if !is_leader
                    && ev.step == pb::NodeStep::WaitStopped as i32
                    && ev.status == pb::StepStatus::Done as i32
                {
                    stopped.send_modify(|n| *n += 1);
                }
            };
            let restored = node.agent.restore_member(req, &sink).await;
            if restored.is_err() {
                // The bench fails; the leader need not wait any more.
                stopped.send_modify(|n| *n = others);
            }
            restored?;
            anyhow::Ok(())
        }
    });
    for r in futures::future::join_all(restores).await {
        r.context("restore member")?;
    }
    Ok(())
}

/// The baseline on the plain snapshot file `db` for an `n`-member cluster
/// on this one machine: `etcdutl snapshot restore` for every member at once,
/// then every member started on its result until each has a leader. With
/// `n` = 1 it is what an operator does by hand for one member; with `n` = 3
/// it is the same physical work as bulwark's three-member restore on the
/// same shared cores and disk.
pub(super) async fn baseline(db: &Path, root: &Path, n: usize) -> anyhow::Result<BaselineTimes> {
    let etcd = tools::etcd(EtcdVersion::V3_5)?;
    let ports = ports::free_ports(std::net::Ipv4Addr::LOCALHOST.into(), 2 * n)?;
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let urls: Vec<(String, String)> = (0..n)
        .map(|i| (url(ports[2 * i]), url(ports[2 * i + 1])))
        .collect();
    let initial_cluster = names
        .iter()
        .zip(&urls)
        .map(|(name, (_, peer))| format!("{name}={peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let data_dirs: Vec<PathBuf> = names
        .iter()
        .map(|m| root.join(m).join("etcd-data"))
        .collect();
    let started = Instant::now();
    let restores = names
        .iter()
        .zip(&urls)
        .zip(&data_dirs)
        .map(|((name, (_, peer)), data_dir)| {
            Command::new(tools::etcdutl()?)
                .args(["snapshot", "restore"])
                .arg(db)
                .arg("--data-dir")
                .arg(data_dir)
                .args(["--name", name, "--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-token", "bench-baseline"])
                .args(["--initial-advertise-peer-urls", peer])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting etcdutl")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for child in restores {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "etcdutl snapshot restore: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let restored = Instant::now();
    let mut kubelets = Vec::new();
    for ((name, (client, peer)), data_dir) in names.iter().zip(&urls).zip(&data_dirs) {
        let manifest = root.join(name).join("manifests/etcd.yaml");
        std::fs::create_dir_all(manifest.parent().context("manifest dir")?)?;
        pod(
            &etcd,
            name,
            data_dir,
            (client, peer),
            &initial_cluster,
            "bench-baseline",
        )
        .write(&manifest)?;
        kubelets.push(Kubelet::start(&manifest, &format!("baseline-{name}")));
    }
    for (client, _) in &urls {
        wait_healthy(client).await?;
    }
    let done = Instant::now();
    Ok(BaselineTimes {
        etcdutl: (restored - started).as_secs_f64(),
        start: (done - restored).as_secs_f64(),
        total: (done - started).as_secs_f64(),
    })
}
