//! `bulwarkctl restore` end to end: three etcd members (3.5, or Debian's
//! 3.4 restored through etcdctl) run by the testkit's kubelet stand-in from
//! static pod manifests, three in-process bulwark-backup instances (one
//! records deltas as the elected leader, each serves its node's restore
//! agent), and the real bulwarkctl binary.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_backup::Listeners;
use bulwark_backup::config::BackupConfig;
use bulwark_common::shutdown::Shutdown;
use bulwark_testkit::bulwarkctl::{backup as ctl, text};
use bulwark_testkit::disk::{DiskError, SmallDisk};
use bulwark_testkit::kubelet::{EtcdPod, Kubelet};
use bulwark_testkit::tools::bin_path;
use bulwark_testkit::{EtcdVersion, Pki, config, skip_or_fail, tools};
use etcd_client::GetOptions;
use object_store::{ObjectStoreExt, PutPayload};

struct Node {
    manifest: PathBuf,
    data_dir: PathBuf,
    client_url: String,
}

/// Every key outside bulwark-backup's own election keys (their leases
/// come and go around a restore), with values, at `revision` (0: now).
async fn user_state(c: &mut etcd_client::Client, revision: i64) -> Vec<(String, String)> {
    // A page of at most 3 keys stays under the client's 4 MiB message
    // limit with the kill test's 1 MB values.
    let mut state = Vec::new();
    let mut from = vec![0u8];
    loop {
        let mut opts = GetOptions::new().with_from_key().with_limit(3);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let page = c.get(from.clone(), Some(opts)).await.unwrap();
        for kv in page.kvs() {
            state.push((
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            ));
        }
        match page.kvs().last() {
            Some(last) if page.more() => from = [last.key(), &[0]].concat(),
            _ => break,
        }
    }
    state.retain(|(k, _)| !k.starts_with("bulwark-backup/"));
    state
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn aside_dirs(data_dir: &Path) -> Vec<PathBuf> {
    let name = data_dir.file_name().unwrap().to_string_lossy().into_owned();
    let mut out: Vec<PathBuf> = std::fs::read_dir(data_dir.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}.bulwark-")))
        })
        .collect();
    out.sort();
    out
}

/// Sets node `i`'s own part of its backup config.
type Configure = dyn Fn(usize, &mut BackupConfig);

/// How [`Lab::start`] sets up the three nodes.
struct LabSpec {
    /// The etcd binary the static pod manifests run.
    etcd: PathBuf,
    /// Node `i`'s data dir, given its node directory.
    data_dir: fn(usize, &Path) -> PathBuf,
    /// What node `i`'s config sets beyond the common part (deltas, the
    /// restore section's timeouts and tools).
    configure: Box<Configure>,
}

/// Three etcd members (`m0`..`m2`) run by kubelet stand-ins from static
/// pod manifests under `root/node-<i>/`; after [`Lab::start_backups`], a
/// bulwark-backup instance per node on one `file://` store (one elected
/// leader takes scheduled snapshots, every instance serves its node's
/// restore agent), and an engine on the same store for the test to look at.
struct Lab {
    root: PathBuf,
    spec: LabSpec,
    pki: Pki,
    nodes: Vec<Node>,
    kubelets: Vec<Kubelet>,
    agents: Vec<String>,
    shutdowns: Vec<Shutdown>,
    /// The instances, when they run as processes (to be killed).
    processes: Vec<bulwark_testkit::Process>,
    engine: Option<bulwark_backup::Engine>,
    endpoints: Vec<String>,
}

impl Lab {
    async fn start(root: &Path, spec: LabSpec) -> Lab {
        bulwark_common::tls::install_crypto_provider();
        let pki = Pki::new().unwrap();
        let ports = bulwark_testkit::ports::free_ports(IpAddr::V4(Ipv4Addr::LOCALHOST), 6).unwrap();
        let names = ["m0", "m1", "m2"];
        let cluster = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{n}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        let mut kubelets = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let dir = root.join(format!("node-{i}"));
            std::fs::create_dir_all(dir.join("manifests")).unwrap();
            let data_dir = (spec.data_dir)(i, &dir);
            let client_url = format!("http://127.0.0.1:{}", ports[2 * i]);
            let peer_url = format!("http://127.0.0.1:{}", ports[2 * i + 1]);
            let path = dir.join("manifests/etcd.yaml");
            EtcdPod {
                pod_name: &format!("etcd-{name}"),
                etcd: &spec.etcd,
                name,
                data_dir: &data_dir,
                client_url: &client_url,
                peer_url: &peer_url,
                initial_cluster: &cluster,
                token: "original",
                heartbeat_ms: 50,
                election_ms: 500,
            }
            .write(&path)
            .unwrap();
            kubelets.push(Kubelet::start(&path, &format!("etcd-{name}")));
            nodes.push(Node {
                manifest: path,
                data_dir,
                client_url,
            });
        }
        let endpoints: Vec<String> = nodes.iter().map(|n| n.client_url.clone()).collect();
        wait_for("etcd from the manifests", || {
            let eps = endpoints.clone();
            async move {
                match etcd_client::Client::connect(eps, None).await {
                    Ok(mut c) => c.put("probe", "1", None).await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        let mut c = etcd_client::Client::connect(endpoints.clone(), None)
            .await
            .unwrap();
        c.delete("probe", None).await.unwrap();
        Lab {
            root: root.to_owned(),
            spec,
            pki,
            nodes,
            kubelets,
            agents: Vec::new(),
            shutdowns: Vec::new(),
            processes: Vec::new(),
            engine: None,
            endpoints,
        }
    }

    /// Starts a bulwark-backup instance per node; the elected one takes a
    /// scheduled snapshot right away.
    async fn start_backups(&mut self) {
        self.start_backups_as(false).await;
    }

    /// As [`Lab::start_backups`], each instance a `bulwark-backup` process
    /// of its own (`processes[i]`), which a test can SIGKILL and restart.
    async fn start_backup_processes(&mut self) {
        self.start_backups_as(true).await;
    }

    async fn start_backups_as(&mut self, processes: bool) {
        let (root, spec, pki, nodes, endpoints) = (
            &self.root,
            &self.spec,
            &self.pki,
            &self.nodes,
            &self.endpoints,
        );
        let cert = pki
            .peer("backup", &["bulwark:backup"], &["127.0.0.1", "localhost"])
            .unwrap();
        let store = root.join("store");
        std::fs::create_dir_all(&store).unwrap();
        let mut listeners = Vec::new();
        for i in 0..3 {
            // node-1 listens on every address with no restore.agentAddress,
            // as an operator may set it up: it advertises 0.0.0.0, and the
            // others reach it where restore.peers names it (the built
            // target it serves as a coordinator included).
            let host = if i == 1 { "0.0.0.0:0" } else { "127.0.0.1:0" };
            let grpc = tokio::net::TcpListener::bind(host).await.unwrap();
            let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.push((grpc, admin));
        }
        let agents: Vec<String> = listeners
            .iter()
            .map(|(g, _)| {
                let port = g.local_addr().unwrap().port();
                SocketAddr::from(([127, 0, 0, 1], port)).to_string()
            })
            .collect();
        let mut configs = Vec::new();
        let mut shutdowns = Vec::new();
        for (i, (grpc, admin)) in listeners.into_iter().enumerate() {
            let mut c = config::backup();
            c.node_name = format!("node-{i}");
            c.cluster_name = "lab".into();
            c.admin.address = SocketAddr::from(([127, 0, 0, 1], 0));
            c.grpc.tls = config::tls(&cert);
            c.grpc.access.operators = config::orgs(&["system:masters"]);
            c.grpc.access.peers = Some(config::orgs(&["bulwark:backup"]));
            c.etcd.endpoints.clone_from(endpoints);
            c.etcd.tls = None;
            c.store.url = format!("file://{}", store.display());
            c.schedule.interval = Some(Duration::from_secs(3600));
            // The coordinator builds the target with etcd 3.5's tools
            // (drill section); each node restores with its own tool.
            c.drill.etcdutl = tools::etcdutl().unwrap();
            c.drill.etcd = tools::etcd(EtcdVersion::V3_5).unwrap();
            c.drill.work_dir = Some(root.clone());
            c.restore.etcd_manifest.clone_from(&nodes[i].manifest);
            c.restore.state_dir = root.join(format!("node-{i}/state"));
            c.restore.peers.clone_from(&agents);
            c.restore.health_timeout = Duration::from_secs(90);
            (spec.configure)(i, &mut c);
            let config = config::validated(&c).unwrap();
            if processes {
                let address = grpc.local_addr().unwrap().to_string();
                drop((grpc, admin));
                let file = config::write(root.join(format!("node-{i}/backup.yaml")), &c).unwrap();
                let bin = bin_path("bulwark-backup").unwrap();
                let p = bulwark_testkit::ProcessBuilder::new(format!("backup-{i}"), bin)
                    .arg("--config")
                    .arg(&file)
                    .args(["--grpc-address", &address])
                    .spawn()
                    .unwrap();
                p.wait_for_port(address.parse().unwrap(), Duration::from_secs(30))
                    .await
                    .unwrap();
                self.processes.push(p);
            } else {
                let shutdown = Shutdown::new();
                bulwark_backup::run(config.clone(), Listeners { grpc, admin }, &shutdown)
                    .await
                    .unwrap();
                shutdowns.push(shutdown);
            }
            configs.push(config);
        }
        self.engine = Some(bulwark_backup::Engine::from_config(&configs[0]).unwrap());
        self.agents = agents;
        self.shutdowns = shutdowns;
    }

    /// An engine on the instances' store.
    fn engine(&self) -> &bulwark_backup::Engine {
        self.engine.as_ref().expect("start_backups first")
    }

    /// A client of every member.
    async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect(self.endpoints.clone(), None)
            .await
            .unwrap()
    }

    /// The id of the first snapshot the elected leader takes on schedule.
    async fn scheduled_snapshot(&self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(s) = self.engine().latest_snapshot().await {
                return s.manifest.id;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no scheduled snapshot"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every member answers a linearizable read of its own.
    async fn wait_every_member(&self, what: &str) {
        for n in &self.nodes {
            wait_for(&format!("{what}: {}", n.client_url), || {
                let url = n.client_url.clone();
                async move {
                    match etcd_client::Client::connect([url], None).await {
                        Ok(mut one) => one.get("x", None).await.is_ok(),
                        Err(_) => false,
                    }
                }
            })
            .await;
        }
    }

    fn stop_services(&self) {
        for s in &self.shutdowns {
            s.trigger();
        }
    }
}

#[tokio::test]
async fn heavy_whole_cluster_restore_through_the_kubelet_with_bulwarkctl() {
    let root = tempfile::tempdir().unwrap();
    let mut lab = Lab::start(
        root.path(),
        LabSpec {
            etcd: tools::etcd(EtcdVersion::V3_5).unwrap(),
            data_dir: |_, dir| dir.join("etcd-data"),
            configure: Box::new(|i, c| {
                c.deltas.flush_interval = Duration::from_millis(200);
                // node-2's agent gives up soon on an etcd that does not stop.
                c.restore.stop_timeout = Duration::from_secs(if i == 2 { 3 } else { 60 });
            }),
        },
    )
    .await;
    let mut c = lab.client().await;
    for i in 0..40 {
        c.put(format!("base/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    // The elected leader takes the first scheduled snapshot and then
    // records deltas.
    lab.start_backups().await;
    let base_id = lab.scheduled_snapshot().await;
    let (pki, nodes, kubelets, agents, engine) = (
        &lab.pki,
        &lab.nodes,
        &lab.kubelets,
        &lab.agents,
        lab.engine(),
    );
    let client = || lab.client();
    for i in 0..30 {
        c.put(format!("one/{i:03}"), format!("a{i}"), None)
            .await
            .unwrap();
    }
    c.delete("base/000", None).await.unwrap();
    let r1 = c.get("x", None).await.unwrap().header().unwrap().revision();
    let want = user_state(&mut c, r1).await;
    for i in 0..30 {
        c.put(format!("two/{i:03}"), format!("b{i}"), None)
            .await
            .unwrap();
    }
    let r2 = c.get("x", None).await.unwrap().header().unwrap().revision();
    wait_deltas_cover(engine, &base_id, r2).await;
    let old_cluster = c.status().await.unwrap().header().unwrap().cluster_id();
    let operator = pki.client("alice", &["system:masters"]).unwrap();
    let viewer = pki.client("bob", &[]).unwrap();
    let r1s = r1.to_string();
    let starts = |k: &[Kubelet]| k.iter().map(Kubelet::starts).collect::<Vec<_>>();
    let starts_before = starts(kubelets);

    // A non-operator is refused (exit 4); no confirmation and no terminal
    // is refused (exit 6).
    let out = ctl(
        &["restore", "--to-revision", &r1s, "--yes"],
        &agents[1],
        &viewer,
    )
    .await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let out = ctl(&["restore", "--to-revision", &r1s], &agents[1], &operator).await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));

    // A dry run plans, builds, prepares every node and changes nothing.
    let out = ctl(
        &["restore", "--to-revision", &r1s, "--dry-run"],
        &agents[1],
        &operator,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("dry run"),
        "{}",
        text(&out)
    );
    for n in nodes {
        assert!(n.manifest.exists());
        assert!(
            aside_dirs(&n.data_dir).is_empty(),
            "{:?}",
            aside_dirs(&n.data_dir)
        );
    }
    assert_eq!(
        starts(kubelets),
        starts_before,
        "a dry run must not restart etcd"
    );
    assert_eq!(user_state(&mut c, 0).await.len(), want.len() + 30);

    // A corrupted delta segment is refused before any node is touched (exit 7).
    let segs = engine.list_segments(Some(&base_id)).await.unwrap();
    let victim = segs.first().unwrap().clone();
    let path =
        bulwark_backup::store::layout::object_path(engine.store.prefix(), &victim.object_key);
    let good = engine
        .store
        .inner()
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut bad = good.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    engine
        .store
        .inner()
        .put(&path, PutPayload::from(bad))
        .await
        .unwrap();
    let out = ctl(
        &[
            "restore",
            "--snapshot",
            &base_id,
            "--to-revision",
            &r1s,
            "--yes",
        ],
        &agents[1],
        &operator,
    )
    .await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(
        text(&out).contains(&victim.id) && text(&out).contains("no node was touched"),
        "{}",
        text(&out)
    );
    assert_eq!(starts(kubelets), starts_before);
    engine
        .store
        .inner()
        .put(&path, PutPayload::from(good))
        .await
        .unwrap();

    // A kubelet that does not stop etcd on node-2: the restore fails there
    // after node-0 and node-1 were restored, and every node is rolled back
    // to its original data, manifest and cluster.
    kubelets[2].pause(true);
    let out = ctl(
        &[
            "restore",
            "--snapshot",
            &base_id,
            "--to-revision",
            &r1s,
            "--yes",
        ],
        &agents[0],
        &operator,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("still answers"), "{}", text(&out));
    assert!(text(&out).contains("every node is back"), "{}", text(&out));
    kubelets[2].pause(false);
    for n in nodes {
        assert!(
            n.manifest.exists(),
            "manifest back on {}",
            n.manifest.display()
        );
        let kept = aside_dirs(&n.data_dir);
        assert!(
            kept.iter()
                .all(|k| k.to_string_lossy().ends_with("-restored")),
            "only restored data is kept aside after a rollback: {kept:?}"
        );
    }
    // Every member, not just one: the client below may pick any of them.
    for n in nodes {
        wait_for(
            &format!("the original member {} back", n.client_url),
            || {
                let url = n.client_url.clone();
                async move {
                    match etcd_client::Client::connect([url], None).await {
                        Ok(mut one) => one
                            .get("two/000", None)
                            .await
                            .is_ok_and(|r| r.kvs().len() == 1),
                        Err(_) => false,
                    }
                }
            },
        )
        .await;
    }
    let mut c = client().await;
    assert_eq!(
        c.status().await.unwrap().header().unwrap().cluster_id(),
        old_cluster
    );
    assert_eq!(user_state(&mut c, 0).await.len(), want.len() + 30);

    // A revision nothing covers is a bad argument (exit 2), said once,
    // with nothing touched.
    let uncovered = (r2 + 100_000).to_string();
    let starts_now = starts(kubelets);
    let out = ctl(
        &["restore", "--to-revision", &uncovered, "--yes"],
        &agents[0],
        &operator,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(
        text(&out).matches("is not covered").count(),
        1,
        "{}",
        text(&out)
    );
    assert_eq!(starts(kubelets), starts_now);

    // Delta coverage through the CLI: from the snapshot to the last write.
    let out = ctl(&["backup", "deltas", "-o", "json"], &agents[2], &operator).await;
    assert!(out.status.success(), "{}", text(&out));
    let deltas: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(deltas["base_snapshot"], base_id.as_str(), "{deltas}");
    assert!(deltas["to_revision"].as_i64().unwrap() >= r2, "{deltas}");
    assert!(deltas["segment_count"].as_u64().unwrap() > 0, "{deltas}");

    // The real restore, to the revision between the two batches.
    let out = ctl(
        &[
            "restore",
            "--snapshot",
            &base_id,
            "--to-revision",
            &r1s,
            "--yes",
            "-o",
            "json",
        ],
        &agents[1],
        &operator,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    println!("{}", text(&out));
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("restore_snapshot done") && progress.contains("wait_healthy done"),
        "{progress}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["snapshot_id"], base_id.as_str());
    assert_eq!(summary["nodes"].as_array().unwrap().len(), 3);
    // The first restore that finished starts timeline 2 (the dry run and
    // the failed attempts start none).
    assert_eq!(summary["timeline"], 2, "{summary}");
    assert_eq!(summary["from_timeline"], 1, "{summary}");
    // The revision restored, not the live one after bulwark's own writes.
    assert_eq!(summary["revision"].as_i64(), Some(r1), "{summary}");
    assert!(
        summary["live_revision"].as_i64().unwrap() >= r1,
        "{summary}"
    );
    // Every phase and every node's steps, timed.
    let timed: Vec<(String, String)> = summary["timings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_owned(),
                t["node"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for phase in [
        "plan",
        "download",
        "prepare",
        "restore_members",
        "start_members",
        "check",
    ] {
        assert!(
            timed.iter().any(|(n, node)| n == phase && node.is_empty()),
            "{phase} untimed: {timed:?}"
        );
    }
    // The built target went to the members straight from the coordinator's
    // node (FetchTarget; its own agent copies it), never through the store.
    assert!(
        !timed.iter().any(|(n, _)| n == "upload"),
        "uploaded: {timed:?}"
    );
    assert_eq!(
        progress.matches("the built target from").count(),
        3,
        "every node fetches the served target: {progress}"
    );
    for step in [
        "fetch_snapshot",
        "stop_etcd",
        "move_data_dir_aside",
        "restore_snapshot",
        "start_etcd",
        "wait_healthy",
    ] {
        assert_eq!(
            timed
                .iter()
                .filter(|(n, node)| n == step && !node.is_empty())
                .count(),
            3,
            "{step} on every node: {timed:?}"
        );
    }

    // `restore status`, from another instance and a read-only identity:
    // the record the coordinator kept, with every node's steps timed.
    let rid = summary["restore_id"].as_str().unwrap();
    let out = ctl(
        &["restore", "status", rid, "-o", "json"],
        &agents[2],
        &viewer,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["state"], "done", "{st}");
    assert_eq!(st["phase"], "start_members", "{st}");
    assert_eq!(st["revision"].as_i64(), Some(r1), "{st}");
    assert_eq!(st["coordinator"], "node-1", "{st}");
    let steps = st["timings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == "restore_snapshot")
        .count();
    assert_eq!(steps, 3, "{st}");
    let last: Vec<(&str, &str)> = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["step"].as_str().unwrap(), n["status"].as_str().unwrap()))
        .collect();
    assert_eq!(last, [("wait_healthy", "done"); 3], "{st}");
    let out = ctl(&["restore", "status"], &agents[0], &viewer).await;
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = listed.lines().skip(1).collect();
    assert!(
        rows[0].starts_with(rid) && rows[0].contains(" done "),
        "{listed}"
    );
    // The corrupt segment, the kubelet that did not stop etcd, the
    // uncovered revision: each failed in its own phase.
    for phase in ["download", "restore_members", "plan"] {
        assert!(
            rows.iter()
                .any(|r| r.contains(" failed ") && r.contains(&format!(" {phase} "))),
            "a restore failed in {phase} is listed: {listed}"
        );
    }
    assert!(
        rows.iter().any(|r| r.contains(" dry_run ")),
        "the dry run is listed: {listed}"
    );

    let mut c = client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while c.get("x", None).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restored cluster never answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        user_state(&mut c, 0).await,
        want,
        "the state at revision {r1}"
    );
    let status = c.status().await.unwrap();
    assert_ne!(
        status.header().unwrap().cluster_id(),
        old_cluster,
        "a new cluster id"
    );
    assert!(status.header().unwrap().revision() >= r1);
    assert_eq!(c.member_list().await.unwrap().members().len(), 3);
    // Coverage starts again from the restore point: r1 until a snapshot
    // of the restored cluster (the recorder takes one when it sees the new
    // cluster id; revision-bumped where etcdutl bumps), then from that
    // snapshot; never the abandoned r2.
    let new_cluster = format!("{:016x}", status.header().unwrap().cluster_id());
    // The restored cluster is on record (`clusters/<id>.json`): written by
    // the restore as it finished, or by its first snapshot if that won.
    let records = engine.cluster_records().await.unwrap();
    let made = records
        .iter()
        .find(|r| format!("{:016x}", r.cluster_id) == new_cluster)
        .unwrap_or_else(|| panic!("no record of cluster {new_cluster}: {records:?}"));
    assert!(
        !made.restore_id.is_empty() || !made.first_snapshot_id.is_empty(),
        "{made:?}"
    );
    for agent in agents {
        let out = ctl(&["backup", "status", "-o", "json"], agent, &operator).await;
        assert!(out.status.success(), "{}", text(&out));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let covered = s["covered_to_revision"].as_i64().unwrap();
        let latest = engine.latest_snapshot().await.unwrap().manifest;
        let of_restored = latest.etcd.cluster_id == new_cluster;
        assert!(
            covered == r1
                || covered >= r1 + 1_000_000_000
                || (of_restored && covered >= latest.revision && latest.revision >= r1),
            "covered to {covered} after a restore to {r1} (abandoned timeline reached {r2}; newest snapshot {} at {} of cluster {}): {s}",
            latest.id,
            latest.revision,
            latest.etcd.cluster_id
        );
    }
    check_timelines(agents, &operator, &base_id, r1, r2).await;
    for n in nodes {
        let mut one = etcd_client::Client::connect([n.client_url.clone()], None)
            .await
            .unwrap();
        one.status().await.unwrap();
        assert!(n.manifest.exists());
        // Besides the restored data kept by the rolled-back attempt.
        let kept: Vec<PathBuf> = aside_dirs(&n.data_dir)
            .into_iter()
            .filter(|k| !k.to_string_lossy().ends_with("-restored"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(
            kept[0].join("member").exists(),
            "the old data dir is kept whole"
        );
    }
    lab.stop_services();
}

/// After the restore to `r1` (timeline 2, branched from timeline 1 whose
/// snapshot `base_id` and deltas reach the abandoned `r2`): status and the
/// list name the timelines, a plain target resolves in timeline 2's
/// history (its own, or timeline 1's before the branch), and `--timeline 1`
/// reaches the abandoned stretch.
/// Dry runs only: nothing is changed.
async fn check_timelines(
    agents: &[String],
    operator: &bulwark_testkit::CertFiles,
    base_id: &str,
    r1: i64,
    r2: i64,
) {
    let json = |out: &std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", text(out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for agent in agents {
        let s = json(&ctl(&["backup", "status", "-o", "json"], agent, operator).await);
        assert_eq!(s["timeline"], 2, "{s}");
    }
    let list = json(&ctl(&["backup", "list", "-o", "json"], &agents[0], operator).await);
    let base = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == base_id)
        .unwrap();
    assert_eq!(base["timeline"], 1, "{list}");

    // The default timeline is the current one: its latest state is a
    // snapshot of the restored cluster, or the restore point itself.
    let dry = |args: &'static [&'static str]| async move {
        let mut all = vec!["restore", "--dry-run", "-o", "json"];
        all.extend_from_slice(args);
        json(&ctl(&all, &agents[0], operator).await)
    };
    let plain = dry(&[]).await;
    assert!(
        plain["from_timeline"] == 2 || (plain["from_timeline"] == 1 && plain["revision"] == r1),
        "{plain}"
    );
    assert_eq!(
        plain["timeline"], 0,
        "a dry run starts no timeline: {plain}"
    );
    // Before the branch, timeline 2's history is timeline 1's.
    let before = (r1 - 1).to_string();
    let out = ctl(
        &[
            "restore",
            "--dry-run",
            "-o",
            "json",
            "--to-revision",
            &before,
        ],
        &agents[0],
        operator,
    )
    .await;
    let early = json(&out);
    assert_eq!(early["revision"].as_i64(), Some(r1 - 1), "{early}");
    assert_eq!(early["from_timeline"], 1, "{early}");
    // The abandoned history is one flag away.
    let back = dry(&["--timeline", "1", "--to-latest"]).await;
    assert!(back["revision"].as_i64().unwrap() >= r2, "{back}");
    assert_eq!(back["from_timeline"], 1, "{back}");
    // A timeline that does not exist is a bad argument.
    let out = ctl(
        &["restore", "--timeline", "3", "--dry-run"],
        &agents[0],
        operator,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("timelines 1 to 2"), "{}", text(&out));
}

/// etcd 3.4 has no etcdutl: with `restore.etcdctl` set, every agent
/// restores its member with etcd 3.4's `etcdctl snapshot restore`, and the
/// plan warns that there is no revision bump.
#[tokio::test]
async fn heavy_whole_cluster_restore_on_etcd_3_4_through_etcdctl() {
    let Some((etcd34, etcdctl34)) = tools::etcd_or_skip(EtcdVersion::V3_4).unwrap() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let mut lab = Lab::start(
        root.path(),
        LabSpec {
            etcd: etcd34,
            data_dir: |_, dir| dir.join("etcd-data"),
            configure: Box::new({
                let etcdctl = etcdctl34.clone();
                move |_, c| {
                    c.deltas.enabled = false;
                    c.restore.etcdctl = Some(etcdctl.clone());
                    c.restore.stop_timeout = Duration::from_secs(60);
                }
            }),
        },
    )
    .await;
    let mut c = lab.client().await;
    for i in 0..40 {
        c.put(format!("base/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    c.delete("base/000", None).await.unwrap();
    // No user writes until the snapshot is stored: this is its state.
    let want = user_state(&mut c, 0).await;
    let status = c.status().await.unwrap();
    assert!(status.version().starts_with("3.4."), "{}", status.version());
    let old_cluster = status.header().unwrap().cluster_id();
    lab.start_backups().await;
    let snapshot_id = lab.scheduled_snapshot().await;
    let (pki, nodes, agents) = (&lab.pki, &lab.nodes, &lab.agents);
    let client = || lab.client();
    for i in 0..30 {
        c.put(format!("after/{i:03}"), format!("a{i}"), None)
            .await
            .unwrap();
    }

    let operator = pki.client("alice", &["system:masters"]).unwrap();
    let out = ctl(
        &[
            "restore",
            "--snapshot",
            &snapshot_id,
            "--snapshot-only",
            "--yes",
            "-o",
            "json",
        ],
        &agents[2],
        &operator,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    println!("{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("lacks --bump-revision/--mark-compacted")
            && all.contains("node-0, node-1, node-2"),
        "the plan warns that etcdctl 3.4 cannot bump the revision: {all}"
    );
    assert!(
        all.contains(&etcdctl34.display().to_string()),
        "the members were restored with {}: {all}",
        etcdctl34.display()
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("restore_snapshot done") && progress.contains("wait_healthy done"),
        "{progress}"
    );

    let mut c = client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while c.get("x", None).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restored cluster never answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        user_state(&mut c, 0).await,
        want,
        "the state of snapshot {snapshot_id}"
    );
    assert_ne!(
        c.status().await.unwrap().header().unwrap().cluster_id(),
        old_cluster,
        "a new cluster id"
    );
    assert_eq!(c.member_list().await.unwrap().members().len(), 3);
    for n in nodes {
        let mut one = etcd_client::Client::connect([n.client_url.clone()], None)
            .await
            .unwrap();
        let status = one.status().await.unwrap();
        assert!(status.version().starts_with("3.4."), "{}", status.version());
        assert_ne!(status.leader(), 0, "{} has a leader", n.client_url);
        assert!(n.manifest.exists());
        let kept = aside_dirs(&n.data_dir);
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(
            kept[0].join("member").exists(),
            "the old data dir is kept whole"
        );
    }
    lab.stop_services();
}

/// node-2's data dir is on a disk with a few MiB free. The restore is
/// refused by the pre-flight (exit 6), before anything is fetched, naming the node, the file system, its free
/// bytes and the bytes needed, before any node is touched (every etcd
/// keeps running on its data dir, nothing is moved or staged). Forced
/// with `--skip-space-check`, the disk fills up while node-2's member is
/// restored beside the running one (in PREPARE): the restore fails naming
/// the node and the full disk before any etcd stopped, every node's
/// prebuilt member is removed (nothing half-written is left, no data dir
/// is touched), the old cluster never stops serving, and once the operator
/// frees space the same restore passes the check and succeeds.
#[tokio::test]
async fn heavy_disk_full_during_restore_rolls_back_and_a_rerun_succeeds() {
    let root = tempfile::tempdir().unwrap();
    // Roomy at first; shrunk to its contents right before the restore.
    let roomy = 512 << 20;
    let disk = match SmallDisk::mount(&root.path().join("node-2/disk"), roomy) {
        Ok(d) => d,
        Err(DiskError::Skipped(s)) => return skip_or_fail(&s).unwrap(),
        Err(DiskError::Failed(e)) => panic!("{e:#}"),
    };
    let mut lab = Lab::start(
        root.path(),
        LabSpec {
            etcd: tools::etcd(EtcdVersion::V3_5).unwrap(),
            data_dir: |i, dir| {
                dir.join(if i == 2 {
                    "disk/etcd-data"
                } else {
                    "etcd-data"
                })
            },
            configure: Box::new(|_, c| {
                c.deltas.enabled = false;
                c.restore.stop_timeout = Duration::from_secs(60);
            }),
        },
    )
    .await;
    let mut c = lab.client().await;
    // A 12 MiB database (more than the room left for it below), in
    // history: deleted keys stay in etcd's database until compaction.
    for i in 0..48 {
        let value = format!("{i:03}").repeat((256 << 10) / 3);
        c.put(format!("bulk/{i:03}"), value, None).await.unwrap();
    }
    c.delete(
        "bulk/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .unwrap();
    for i in 0..40 {
        c.put(format!("base/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    // No user writes until the snapshot is stored: this is its state.
    let want = user_state(&mut c, 0).await;
    lab.start_backups().await;
    let snapshot_id = lab.scheduled_snapshot().await;
    for i in 0..30 {
        c.put(format!("after/{i:03}"), format!("a{i}"), None)
            .await
            .unwrap();
    }
    let before = user_state(&mut c, 0).await;
    let old_cluster = c.status().await.unwrap().header().unwrap().cluster_id();
    let operator = lab.pki.client("alice", &["system:masters"]).unwrap();
    let nodes = &lab.nodes;
    let args = [
        "restore",
        "--snapshot",
        &snapshot_id,
        "--snapshot-only",
        "--yes",
    ];
    let restore = || ctl(&args, &lab.agents[0], &operator);
    let forced: Vec<&str> = args.iter().copied().chain(["--skip-space-check"]).collect();

    // Fill node-2's disk up to 4 MiB: the check wants the 12 MiB database,
    // two 64 MiB WAL segments and a 16 MiB margin.
    let used = disk.used().unwrap();
    disk.resize(used + (4 << 20)).unwrap();
    let free = disk.free().unwrap();
    println!("node-2's disk: {used} bytes used, {free} free");
    let out = restore().await;
    println!("{}", text(&out));
    // Refused by the pre-flight, before anything is fetched: exit 6.
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains(
            "failed in phase preflight: pre-flight found 1 problem(s) on 1 node(s) (node-2)"
        ),
        "{all}"
    );
    assert!(
        all.contains("not enough free space on node node-2"),
        "names the node: {all}"
    );
    assert!(
        all.contains(&format!("mounted on {} (", disk.path().display())),
        "names the file system: {all}"
    );
    let said_free: u64 = all
        .split(" bytes free")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no free bytes in {all}"));
    assert!(said_free <= 4 << 20, "{said_free} bytes free: {all}");
    let needed: u64 = all
        .split("the restore needs ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bytes needed in {all}"));
    assert!(needed > (12 << 20) + (128 << 20), "{needed}: {all}");
    assert!(all.contains("nothing was changed on any node"), "{all}");
    for (i, n) in nodes.iter().enumerate() {
        assert!(n.manifest.exists(), "manifest in place on node-{i}");
        assert!(
            aside_dirs(&n.data_dir).is_empty(),
            "nothing moved aside on node-{i}: {:?}",
            aside_dirs(&n.data_dir)
        );
        let staged: Vec<_> = walk(&root.path().join(format!("node-{i}/state")))
            .into_iter()
            .filter(|p| p.ends_with("snapshot.db"))
            .collect();
        assert!(staged.is_empty(), "nothing staged on node-{i}: {staged:?}");
    }
    let mut c = lab.client().await;
    assert_eq!(
        c.status().await.unwrap().header().unwrap().cluster_id(),
        old_cluster,
        "the old cluster never stopped"
    );
    assert_eq!(user_state(&mut c, 0).await, before);

    // Forced past the check. The restore tool runs in PREPARE, beside the
    // running member, and finds about 4 MiB: no room for the 12 MiB
    // database, so node-2's prepare fails before any etcd is stopped.
    let out = ctl(&forced, &lab.agents[0], &operator).await;
    println!("{}", text(&out));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("free-space check is skipped"), "{all}");
    assert!(all.contains("node node-2"), "names the node: {all}");
    assert!(
        all.contains("no space left on device") && all.contains("is full"),
        "names the disk problem: {all}"
    );
    assert!(all.contains("its partial output was removed"), "{all}");
    assert!(all.contains("failed in phase prepare"), "{all}");
    assert!(all.contains("nothing was changed on any node"), "{all}");
    for n in nodes {
        assert!(
            n.manifest.exists(),
            "manifest back on {}",
            n.manifest.display()
        );
        assert!(
            n.data_dir.join("member/wal").is_dir(),
            "a whole data dir at {}",
            n.data_dir.display()
        );
        let kept = aside_dirs(&n.data_dir);
        assert!(
            kept.is_empty(),
            "nothing was moved, and every prebuilt member is gone: {kept:?}"
        );
    }
    // The old cluster, with every write, serves as before.
    lab.wait_every_member("the original member back").await;
    let mut c = lab.client().await;
    assert_eq!(
        c.status().await.unwrap().header().unwrap().cluster_id(),
        old_cluster
    );
    assert_eq!(user_state(&mut c, 0).await, before);

    // The operator frees space; the same restore now succeeds.
    disk.resize(roomy).unwrap();
    let out = restore().await;
    assert!(out.status.success(), "{}", text(&out));
    lab.wait_every_member("the restored member").await;
    let mut c = lab.client().await;
    assert_eq!(user_state(&mut c, 0).await, want);
    assert_ne!(
        c.status().await.unwrap().header().unwrap().cluster_id(),
        old_cluster,
        "a new cluster id"
    );
    for n in nodes {
        let kept: Vec<PathBuf> = aside_dirs(&n.data_dir)
            .into_iter()
            .filter(|k| !k.to_string_lossy().ends_with("-restored"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(
            kept[0].join("member/wal").is_dir(),
            "the old data dir is kept whole"
        );
    }
    lab.stop_services();
}

/// Every file under `dir` (none when it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() { walk(&p) } else { vec![p] }
        })
        .collect()
}

/// The first restore record (newest first) for which `ready` holds.
async fn wait_record(
    engine: &bulwark_backup::Engine,
    what: &str,
    ready: impl Fn(&bulwark_backup::restore::record::RestoreRecord) -> bool,
) -> bulwark_backup::restore::record::RestoreRecord {
    // Under the test's own time limit, so a wait that cannot end says
    // what it waited for.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(records) = engine.restore_records().await
            && let Some(r) = records.into_iter().find(|r| ready(r))
        {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the delta segments after snapshot `base_id` reach
/// `revision`.
async fn wait_deltas_cover(engine: &bulwark_backup::Engine, base_id: &str, revision: i64) {
    wait_for("deltas to cover the writes", || async move {
        engine
            .list_segments(Some(base_id))
            .await
            .map(|s| s.last().is_some_and(|s| s.last_revision >= revision))
            .unwrap_or(false)
    })
    .await;
}

/// Moves etcd's leadership to `nodes[to]` and waits until it holds it.
async fn make_leader(nodes: &[Node], to: usize) {
    let status = |url: String| async move {
        let mut one = etcd_client::Client::connect([url], None).await.ok()?;
        let s = one.status().await.ok()?;
        Some((s.header()?.member_id(), s.leader(), one))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (target, leader, _) = status(nodes[to].client_url.clone()).await.unwrap();
        if leader == target {
            return;
        }
        for n in nodes {
            if let Some((id, _, mut one)) = status(n.client_url.clone()).await
                && id == leader
            {
                let _ = one.move_leader(target).await;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node-{to} never became the leader"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Node `node`'s last step in `r`, as `step status`.
fn last_step(r: &bulwark_backup::restore::record::RestoreRecord, node: &str) -> String {
    r.nodes
        .iter()
        .find(|n| n.node == node)
        .map(|n| format!("{} {}", n.step, n.status))
        .unwrap_or_default()
}

/// A condition on a restore's record.
type RecordTest = fn(&bulwark_backup::restore::record::RestoreRecord) -> bool;

/// One round of the kill test.
struct Kill {
    what: &'static str,
    /// The process killed.
    victim: usize,
    /// A node whose kubelet keeps its etcd running until the kill.
    hold_running: Option<usize>,
    /// A node whose kubelet holds its member's start until the kill (or
    /// until `freeze` freezes its node).
    hold_start: Option<usize>,
    /// A node whose etcd is frozen (SIGSTOP) once the condition holds,
    /// until the kill: a member that stops answering after it was healthy,
    /// which holds the final check's status call.
    freeze: Option<(usize, RecordTest)>,
    /// When to kill.
    ready: RecordTest,
}

/// bulwark-backup SIGKILLed mid-restore, each instance a process of its
/// own: the coordinator before any member is touched (pre-flight to
/// prepare), once node-0's member is restored (RESTORE MEMBERS under way)
/// and once START MEMBERS began; node-1's agent while it fetches and
/// decodes the snapshot (its half-written staging file must not outlive
/// its restart); node-2's agent while it stops etcd and
/// sets its data dir aside; node-1's agent once its member is restored
/// (its restart holds the node for the coordinator); node-1's agent while
/// it waits for its restarted member to be healthy (its kubelet holds the
/// start until the kill); the coordinator during the final check (held
/// there by a member frozen with SIGSTOP once healthy). The killed
/// process is restarted; agents recover from their journals, the
/// coordinator finishes what its record says it was running, and where
/// that leaves a node unreachable the operator's `restore rollback`
/// finishes the job. Every time the cluster ends on the snapshot's state
/// on every member (record `done`) or on the state it had before the
/// restore on every member (record `failed`, rolled back), never a mix;
/// every manifest is in place, no journal is left beside a data dir, no
/// staged target in a state dir, and no data dir was deleted.
#[tokio::test]
async fn heavy_a_kill_mid_restore_ends_restored_or_original_never_a_mix() {
    let root = tempfile::tempdir().unwrap();
    let mut lab = Lab::start(
        root.path(),
        LabSpec {
            etcd: tools::etcd(EtcdVersion::V3_5).unwrap(),
            data_dir: |_, dir| dir.join("etcd-data"),
            configure: Box::new(|_, c| {
                c.deltas.enabled = false;
                c.restore.stop_timeout = Duration::from_secs(60);
            }),
        },
    )
    .await;
    let mut c = lab.client().await;
    for i in 0..40 {
        c.put(format!("base/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    // Big enough (24 MB, incompressible beyond hex) that each agent's
    // fetch and decode lasts long enough to be killed in.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..24 {
        let value: String = (0..125_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("{x:016x}")[..8].to_owned()
            })
            .collect();
        c.put(format!("bulk/{i:02}"), value, None).await.unwrap();
    }
    let want = user_state(&mut c, 0).await;
    lab.start_backup_processes().await;
    let snapshot_id = lab.scheduled_snapshot().await;
    let operator = lab.pki.client("alice", &["system:masters"]).unwrap();
    // Every member is restored at once, the old leader's node last (once
    // the others' etcd is down), so "restore members" outlasts one
    // member's restore only while another node is slower: where a round
    // kills after a member is restored, node-2 is made the leader and its
    // kubelet holds its etcd (the node waits for it to stop) until the
    // kill, then lets it go.
    let cases = [
        Kill {
            what: "the coordinator before any member is touched",
            victim: 0,
            hold_running: None,
            hold_start: None,
            freeze: None,
            ready: |r| matches!(r.phase.as_str(), "preflight" | "prepare"),
        },
        Kill {
            what: "node-1's agent while it fetches the snapshot",
            victim: 1,
            hold_running: None,
            hold_start: None,
            freeze: None,
            ready: |r| {
                let s = last_step(r, "node-1");
                r.phase == "prepare" && s.starts_with("fetch_snapshot") && !s.ends_with("done")
            },
        },
        Kill {
            what: "the coordinator during restore members",
            victim: 0,
            hold_running: Some(2),
            hold_start: None,
            freeze: None,
            ready: |r| {
                r.phase == "restore_members" && last_step(r, "node-0") == "restore_snapshot done"
            },
        },
        Kill {
            what: "the coordinator during start members",
            victim: 0,
            hold_running: None,
            hold_start: None,
            freeze: None,
            ready: |r| r.phase == "start_members",
        },
        // Setting aside (stop, wait for the stop, move) lasts milliseconds
        // on its own: node-2's kubelet holds its etcd, so the node waits
        // for it to stop until the kill.
        Kill {
            what: "node-2's agent while it sets its member aside",
            victim: 2,
            hold_running: Some(2),
            hold_start: None,
            freeze: None,
            ready: |r| {
                r.phase == "restore_members" && last_step(r, "node-2").starts_with("wait_stopped")
            },
        },
        Kill {
            what: "node-1's agent once its member is restored",
            victim: 1,
            hold_running: Some(2),
            hold_start: None,
            freeze: None,
            ready: |r| {
                r.phase == "restore_members" && last_step(r, "node-1") == "restore_snapshot done"
            },
        },
        Kill {
            what: "node-1's agent while its member starts",
            victim: 1,
            hold_running: None,
            hold_start: Some(1),
            freeze: None,
            ready: |r| {
                r.phase == "start_members" && last_step(r, "node-1").starts_with("wait_healthy")
            },
        },
        // The final check is one status call per member: node-1's start is
        // held until node-2's member is healthy, node-2's etcd is then
        // frozen, and the check's status call to it hangs (for etcd's
        // request timeout, 15 s) while the coordinator is killed.
        Kill {
            what: "the coordinator during the final check",
            victim: 0,
            hold_running: None,
            hold_start: Some(1),
            freeze: Some((2, |r| {
                r.phase == "start_members" && last_step(r, "node-2") == "wait_healthy done"
            })),
            // START MEMBERS timed: the coordinator is in the check.
            ready: |r| {
                r.phase == "start_members"
                    && r.timings
                        .iter()
                        .any(|t| t.name == "start_members" && t.node.is_empty())
            },
        },
    ];
    for (
        round,
        Kill {
            what,
            victim,
            hold_running: held,
            hold_start: start_held,
            freeze,
            ready,
        },
    ) in cases.into_iter().enumerate()
    {
        let mut c = lab.client().await;
        // Each round's "before" differs from the snapshot's state.
        for i in 0..10 {
            c.put(format!("round{round}/{i:03}"), "x", None)
                .await
                .unwrap();
        }
        let before = user_state(&mut c, 0).await;
        let old_cluster = c.status().await.unwrap().header().unwrap().cluster_id();
        if let Some(h) = held {
            make_leader(&lab.nodes, h).await;
            lab.kubelets[h].pause(true);
        }
        if let Some(h) = start_held {
            lab.kubelets[h].hold_starts(true);
        }
        let (agent, op) = (lab.agents[0].clone(), operator.clone());
        let sid = snapshot_id.clone();
        let restore = tokio::spawn(async move {
            ctl(
                &["restore", "--snapshot", &sid, "--snapshot-only", "--yes"],
                &agent,
                &op,
            )
            .await
        });
        if let Some((f, when)) = freeze {
            wait_record(lab.engine(), what, |r| {
                r.state == bulwark_backup::restore::record::RecordState::Running && when(r)
            })
            .await;
            lab.kubelets[f].freeze(true).await.unwrap();
            if let Some(h) = start_held {
                lab.kubelets[h].hold_starts(false);
            }
        }
        let at = wait_record(lab.engine(), what, |r| {
            r.state == bulwark_backup::restore::record::RecordState::Running && ready(r)
        })
        .await;
        lab.processes[victim].kill().unwrap();
        if let Some((f, _)) = freeze {
            lab.kubelets[f].freeze(false).await.unwrap();
        }
        if let Some(h) = held {
            lab.kubelets[h].pause(false);
        }
        if let Some(h) = start_held {
            lab.kubelets[h].hold_starts(false);
        }
        println!(
            "round {round}: killed {what} (restore {}, phase {}, nodes {:?})",
            at.restore_id,
            at.phase,
            at.nodes
                .iter()
                .map(|n| format!("{} {} {}", n.node, n.step, n.status))
                .collect::<Vec<_>>()
        );
        let first = restore.await.unwrap();
        println!("{}", text(&first));
        lab.processes[victim].start().unwrap();
        // Its port opens once its agent has dealt with its journal.
        lab.processes[victim]
            .wait_for_port(lab.agents[victim].parse().unwrap(), Duration::from_secs(60))
            .await
            .unwrap();
        let ended = wait_record(lab.engine(), "the restore's end", |r| {
            r.restore_id == at.restore_id
                && r.state != bulwark_backup::restore::record::RecordState::Running
        })
        .await;
        println!(
            "round {round}: {:?} rolled back {} ({})",
            ended.state, ended.rolled_back, ended.error
        );
        let ended = if ended.state == bulwark_backup::restore::record::RecordState::Failed
            && !ended.rolled_back
        {
            // A node the rollback could not reach: the operator finishes it.
            let out = ctl(
                &["restore", "rollback", &at.restore_id],
                &lab.agents[1],
                &operator,
            )
            .await;
            println!("{}", text(&out));
            assert!(out.status.success(), "{}", text(&out));
            lab.engine().restore_record(&at.restore_id).await.unwrap()
        } else {
            ended
        };
        lab.wait_every_member(what).await;
        let mut c = lab.client().await;
        let cluster = c.status().await.unwrap().header().unwrap().cluster_id();
        match ended.state {
            bulwark_backup::restore::record::RecordState::Done => {
                assert_eq!(user_state(&mut c, 0).await, want, "{what}: restored");
                assert_ne!(cluster, old_cluster, "{what}: a new cluster");
            }
            bulwark_backup::restore::record::RecordState::Failed => {
                assert!(ended.rolled_back, "{what}: {ended:?}");
                assert_eq!(user_state(&mut c, 0).await, before, "{what}: original");
                assert_eq!(cluster, old_cluster, "{what}: the old cluster");
            }
            s => panic!("{what}: ended {s:?}"),
        }
        // Every member agrees: one cluster, the same keys.
        for n in &lab.nodes {
            let mut one = etcd_client::Client::connect([n.client_url.clone()], None)
                .await
                .unwrap();
            let s = one.status().await.unwrap();
            assert_eq!(
                s.header().unwrap().cluster_id(),
                cluster,
                "{what}: {}",
                n.client_url
            );
            assert!(n.manifest.exists(), "{what}: {}", n.manifest.display());
            let left: Vec<PathBuf> = aside_dirs(&n.data_dir)
                .into_iter()
                .filter(|p| {
                    p.to_string_lossy().ends_with(".journal")
                        || p.to_string_lossy().ends_with("-partial")
                })
                .collect();
            assert!(left.is_empty(), "{what}: {left:?}");
        }
        // No staged target is left in any node's state dir, a killed
        // fetch's included.
        for i in 0..3 {
            let state = lab.root.join(format!("node-{i}/state"));
            let staged: Vec<PathBuf> = std::fs::read_dir(&state)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("snapshot.db"))
                .filter(|p| p.exists())
                .collect();
            assert!(staged.is_empty(), "{what}: {staged:?}");
        }
    }
    for p in &mut lab.processes {
        p.stop().await.unwrap();
    }
}

/// The processes whose command line names `needle` (a scratch etcd names
/// its data dir under the work dir).
fn processes_naming(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

/// The coordinator SIGKILLed while it replays deltas onto its scratch etcd
/// (a point-in-time build), the signal to its own pid only, as the OOM
/// killer sends it: the scratch etcd dies with it (it is tied to the
/// process), nothing was touched, the restarted instance rolls the
/// restore back, and its start-up sweep removes the build's work dir,
/// whose owner is gone.
#[tokio::test]
async fn heavy_a_coordinator_killed_mid_build_leaves_no_scratch_etcd_or_work_dir() {
    let root = tempfile::tempdir().unwrap();
    let mut lab = Lab::start(
        root.path(),
        LabSpec {
            etcd: tools::etcd(EtcdVersion::V3_5).unwrap(),
            data_dir: |_, dir| dir.join("etcd-data"),
            configure: Box::new(|_, c| {
                c.deltas.flush_interval = Duration::from_millis(200);
            }),
        },
    )
    .await;
    lab.start_backup_processes().await;
    let base_id = lab.scheduled_snapshot().await;
    // Enough revisions that the replay lasts long enough to be killed in.
    let c = lab.client().await;
    for chunk in 0..40 {
        let mut puts = tokio::task::JoinSet::new();
        for i in 0..50 {
            let mut c = c.clone();
            puts.spawn(async move { c.put(format!("k/{chunk:02}/{i:02}"), "v", None).await });
        }
        for put in puts.join_all().await {
            put.unwrap();
        }
    }
    let mut c = lab.client().await;
    let target = c.get("x", None).await.unwrap().header().unwrap().revision();
    let before = user_state(&mut c, 0).await;
    let old_cluster = c.status().await.unwrap().header().unwrap().cluster_id();
    wait_deltas_cover(lab.engine(), &base_id, target).await;
    let operator = lab.pki.client("alice", &["system:masters"]).unwrap();
    let (agent, op) = (lab.agents[0].clone(), operator.clone());
    let restore = tokio::spawn(async move {
        let target = target.to_string();
        ctl(&["restore", "--to-revision", &target, "--yes"], &agent, &op).await
    });
    let at = wait_record(lab.engine(), "the replay", |r| {
        r.state == bulwark_backup::restore::record::RecordState::Running
            && r.phase == "download"
            && !r.progress.is_empty()
    })
    .await;
    let work_dirs = || -> Vec<PathBuf> {
        std::fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("/bulwark-restore-"))
            .collect()
    };
    let built_in = work_dirs();
    assert_eq!(built_in.len(), 1, "{built_in:?}");
    let needle = built_in[0].to_string_lossy().into_owned();
    assert!(
        !processes_naming(&needle).is_empty(),
        "the scratch etcd runs during the replay ({})",
        at.progress
    );
    // SIGKILL (9) to bulwark-backup alone, not its process group: only
    // the kernel's parent-death signal can stop the scratch etcd then.
    lab.processes[0].signal(9).unwrap();
    println!("killed the coordinator during the build ({})", at.progress);
    wait_for("the scratch etcd to die with its parent", || {
        let gone = processes_naming(&needle).is_empty();
        async move { gone }
    })
    .await;
    lab.processes[0]
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    let first = restore.await.unwrap();
    assert!(!first.status.success(), "{}", text(&first));
    assert_eq!(
        work_dirs(),
        built_in,
        "the dead build's work dir is still there"
    );

    lab.processes[0].start().unwrap();
    lab.processes[0]
        .wait_for_port(lab.agents[0].parse().unwrap(), Duration::from_secs(60))
        .await
        .unwrap();
    let ended = wait_record(lab.engine(), "the restore's end", |r| {
        r.restore_id == at.restore_id
            && r.state != bulwark_backup::restore::record::RecordState::Running
    })
    .await;
    assert_eq!(
        ended.state,
        bulwark_backup::restore::record::RecordState::Failed,
        "{ended:?}"
    );
    assert!(ended.rolled_back, "{ended:?}");
    assert!(work_dirs().is_empty(), "{:?}", work_dirs());
    let mut c = lab.client().await;
    assert_eq!(user_state(&mut c, 0).await, before);
    let cluster = c.status().await.unwrap().header().unwrap().cluster_id();
    assert_eq!(cluster, old_cluster);
    for p in &mut lab.processes {
        p.stop().await.unwrap();
    }
}
