//! deploy/GUIDE.md's disaster-recovery runbooks, driven as written: etcd
//! members run by the testkit's kubelet stand-in from static pod
//! manifests, bulwark-backup instances started from fresh configs (a new
//! state dir, nothing cached: the catalog is read from the store), the
//! real `bulwarkctl` and etcd's own `etcdctl member add`.
//!
//! - "Two of three control-plane hosts lost": the survivor restores a
//!   one-member cluster from the bucket, then grows back to three with new
//!   hosts (new member names and URLs).
//! - "All control-plane hosts rebuilt": three new hosts (new names, URLs,
//!   data dirs) and the S3 bucket with its age identity; a config with
//!   another `clusterName` is told what the bucket holds, the fresh
//!   instances hold their scheduled snapshots of the new, empty cluster,
//!   and the restore brings back a three-member cluster serving the data
//!   at the target revision.

// Tests panic on failure: the harness then prints the processes' logs.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_backup::Listeners;
use bulwark_backup::config::BackupConfig;
use bulwark_common::shutdown::Shutdown;
use bulwark_testkit::bulwarkctl::{backup as ctl, text};
use bulwark_testkit::kubelet::{EtcdPod, Kubelet};
use bulwark_testkit::{CertFiles, EtcdVersion, Pki, S3Server, config, tools};
use etcd_client::GetOptions;

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

/// Every key outside bulwark-backup's own election keys, with its value
/// and the revision it was last modified at, as of `revision` (0: now);
/// `serializable` reads the answering member's own copy.
async fn user_state(
    c: &mut etcd_client::Client,
    revision: i64,
    serializable: bool,
) -> Vec<(String, String, i64)> {
    let mut opts = GetOptions::new().with_all_keys();
    if revision > 0 {
        opts = opts.with_revision(revision);
    }
    if serializable {
        opts = opts.with_serializable();
    }
    c.get("", Some(opts))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.mod_revision(),
            )
        })
        .filter(|(k, _, _)| !k.starts_with("bulwark-backup/"))
        .collect()
}

async fn connect(urls: &[String]) -> etcd_client::Client {
    etcd_client::Client::connect(urls, None).await.unwrap()
}

/// One control-plane host: its etcd member (a static pod the kubelet
/// stand-in runs) and, once started, its bulwark-backup.
struct Host {
    /// The node's (and its etcd member's) name.
    name: String,
    dir: PathBuf,
    manifest: PathBuf,
    client_url: String,
    peer_url: String,
    kubelet: Option<Kubelet>,
    backup: Option<Shutdown>,
}

impl Host {
    /// A host under `root/<name>/` with loopback ports of its own; its etcd
    /// is not started.
    fn new(root: &Path, name: &str) -> Host {
        let ports = bulwark_testkit::ports::free_ports(IpAddr::V4(Ipv4Addr::LOCALHOST), 2).unwrap();
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        Host {
            name: name.to_owned(),
            manifest: dir.join("manifests/etcd.yaml"),
            dir,
            client_url: format!("http://127.0.0.1:{}", ports[0]),
            peer_url: format!("http://127.0.0.1:{}", ports[1]),
            kubelet: None,
            backup: None,
        }
    }

    fn member(&self) -> String {
        format!("{}={}", self.name, self.peer_url)
    }

    /// Writes etcd's manifest (kubeadm's shape) and starts the kubelet;
    /// `joining`: a member added with `etcdctl member add`.
    fn start_etcd(&mut self, initial_cluster: &str, token: &str, joining: bool) {
        let pod = EtcdPod {
            pod_name: &format!("etcd-{}", self.name),
            etcd: &tools::etcd(EtcdVersion::V3_5).unwrap(),
            name: &self.name,
            data_dir: &self.dir.join("etcd"),
            client_url: &self.client_url,
            peer_url: &self.peer_url,
            initial_cluster,
            token,
            heartbeat_ms: 50,
            election_ms: 500,
        };
        match joining {
            true => pod.write_joining(&self.manifest).unwrap(),
            false => pod.write(&self.manifest).unwrap(),
        }
        self.kubelet = Some(Kubelet::start(
            &self.manifest,
            &format!("etcd-{}", self.name),
        ));
    }

    /// The host is gone: its etcd and bulwark-backup stop, its disk is lost.
    async fn lose(&mut self) {
        self.stop_backup();
        std::fs::remove_file(&self.manifest).unwrap();
        wait_for(&format!("{}'s etcd to stop", self.name), || {
            let running = self.kubelet.as_ref().is_some_and(Kubelet::is_running);
            async move { !running }
        })
        .await;
        self.kubelet = None;
        std::fs::remove_dir_all(&self.dir).unwrap();
    }

    fn stop_backup(&mut self) {
        if let Some(s) = self.backup.take() {
            s.trigger();
        }
    }

    /// Whether this member answers a linearizable read of its own.
    async fn serves(&self) -> bool {
        match etcd_client::Client::connect([self.client_url.clone()], None).await {
            Ok(mut one) => one.get("x", None).await.is_ok(),
            Err(_) => false,
        }
    }
}

/// What every host's bulwark-backup config shares: the bucket, the
/// cluster name, the age key, the certificates.
struct Site {
    root: PathBuf,
    /// Holds the certificates' directory (removed on drop).
    _pki: Pki,
    cert: CertFiles,
    operator: CertFiles,
    store: String,
    /// object_store options for `store` (an S3 server's endpoint and keys).
    store_options: std::collections::BTreeMap<String, String>,
    age_key: Option<PathBuf>,
}

impl Site {
    fn new(root: &Path, encrypted: bool) -> Site {
        bulwark_common::tls::install_crypto_provider();
        let pki = Pki::new().unwrap();
        let cert = pki
            .peer("backup", &["bulwark:backup"], &["127.0.0.1", "localhost"])
            .unwrap();
        let operator = pki.client("alice", &["system:masters"]).unwrap();
        let bucket = root.join("bucket");
        std::fs::create_dir_all(&bucket).unwrap();
        // The key as the operator keeps it off the hosts (GUIDE: age-keygen).
        let age_key = encrypted.then(|| {
            use age::secrecy::ExposeSecret;
            let id = age::x25519::Identity::generate();
            let path = root.join("safe/backup-age.key");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(
                &path,
                format!(
                    "# public key: {}\n{}\n",
                    id.to_public(),
                    id.to_string().expose_secret()
                ),
            )
            .unwrap();
            path
        });
        Site {
            root: root.to_owned(),
            _pki: pki,
            cert,
            operator,
            store: format!("file://{}", bucket.display()),
            store_options: Default::default(),
            age_key,
        }
    }

    /// Backups go to `s3`'s bucket instead of a directory.
    fn on_s3(mut self, s3: &S3Server) -> Site {
        self.store = s3.url();
        self.store_options = s3.options().into_iter().collect();
        self
    }

    /// A gRPC listener per host, bound first so every config can name
    /// every agent (`restore.peers`).
    async fn listeners(n: usize) -> (Vec<Listeners>, Vec<String>) {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(Listeners {
                grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            });
        }
        let addrs = out
            .iter()
            .map(|l| l.grpc.local_addr().unwrap().to_string())
            .collect();
        (out, addrs)
    }

    /// `host`'s backup.yaml as the runbook has the operator write it on a
    /// new or surviving host: the same bucket, cluster name and age key,
    /// a fresh state dir, etcd's endpoints and every agent as given.
    fn config(&self, host: &Host, etcd: &[String], peers: &[String]) -> BackupConfig {
        let mut c = config::backup();
        c.node_name = host.name.clone();
        c.cluster_name = "prod".into();
        c.admin.address = SocketAddr::from(([127, 0, 0, 1], 0));
        c.grpc.tls = config::tls(&self.cert);
        c.grpc.access.operators = config::orgs(&["system:masters"]);
        c.grpc.access.peers = Some(config::orgs(&["bulwark:backup"]));
        c.etcd.endpoints = etcd.to_vec();
        c.etcd.tls = None;
        c.store.url.clone_from(&self.store);
        c.store.options.clone_from(&self.store_options);
        if let Some(key) = &self.age_key {
            c.encryption.recipient_file = Some(key.clone());
            c.encryption.identity_files = vec![key.clone()];
        }
        c.schedule.interval = Some(Duration::from_secs(3600));
        c.deltas.flush_interval = Duration::from_millis(200);
        c.drill.etcdutl = tools::etcdutl().unwrap();
        c.drill.etcd = tools::etcd(EtcdVersion::V3_5).unwrap();
        c.drill.work_dir = Some(self.root.clone());
        c.restore.etcd_manifest.clone_from(&host.manifest);
        // A new state dir for each instance started on the host.
        let started = std::fs::read_dir(&host.dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("state-"))
            .count();
        c.restore.state_dir = host.dir.join(format!("state-{started}"));
        c.restore.peers = peers.to_vec();
        c.restore.health_timeout = Duration::from_secs(90);
        c
    }

    /// Writes `c` to the host's backup.yaml and starts bulwark-backup on it.
    async fn start_backup(&self, host: &mut Host, c: BackupConfig, listeners: Listeners) {
        config::write(host.dir.join("backup.yaml"), &c).unwrap();
        let shutdown = Shutdown::new();
        bulwark_backup::run(config::validated(&c).unwrap(), listeners, &shutdown)
            .await
            .unwrap();
        host.backup = Some(shutdown);
    }

    /// An engine on the bucket, for the test to look at the catalog.
    fn engine(&self, host: &Host) -> bulwark_backup::Engine {
        let etcd = [host.client_url.clone()];
        bulwark_backup::Engine::from_config(
            &config::validated(&self.config(host, &etcd, &[])).unwrap(),
        )
        .unwrap()
    }
}

/// Three hosts `names` forming one etcd cluster (token `token`), each
/// member serving.
async fn cluster_of(root: &Path, names: [&str; 3], token: &str) -> Vec<Host> {
    let mut hosts: Vec<Host> = names.iter().map(|n| Host::new(root, n)).collect();
    let initial = hosts.iter().map(Host::member).collect::<Vec<_>>().join(",");
    for h in &mut hosts {
        h.start_etcd(&initial, token, false);
    }
    for h in &hosts {
        wait_for(&format!("{} serving", h.name), || h.serves()).await;
    }
    hosts
}

/// Starts bulwark-backup on every host of `hosts`, each naming all of
/// them as etcd endpoints and restore peers; returns the agents.
async fn start_backups(site: &Site, hosts: &mut [Host]) -> Vec<String> {
    let (listeners, agents) = Site::listeners(hosts.len()).await;
    let configs: Vec<BackupConfig> = {
        let all: Vec<String> = hosts.iter().map(|h| h.client_url.clone()).collect();
        hosts
            .iter()
            .map(|h| site.config(h, &all, &agents))
            .collect()
    };
    for ((h, c), l) in hosts.iter_mut().zip(configs).zip(listeners) {
        site.start_backup(h, c, l).await;
    }
    agents
}

/// The first snapshot the elected instance takes on schedule.
async fn first_snapshot(engine: &bulwark_backup::Engine) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(s) = engine.latest_snapshot().await {
            return s.manifest.id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no scheduled snapshot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `backup status` of the first of `agents` whose last error says
/// `needle`.
async fn status_saying(agents: &[String], op: &CertFiles, needle: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        for a in agents {
            let out = ctl(&["backup", "status", "-o", "json"], a, op).await;
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if s["last_error"].as_str().is_some_and(|e| e.contains(needle)) {
                return s;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no instance's status says {needle:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The catalog's snapshot ids, newest first.
async fn snapshot_ids(engine: &bulwark_backup::Engine) -> Vec<String> {
    engine
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.manifest.id)
        .collect()
}

/// Waits until the deltas of snapshot `base` reach `revision`.
async fn deltas_reach(engine: &bulwark_backup::Engine, base: &str, revision: i64) {
    wait_for("deltas to cover the writes", || async move {
        engine
            .list_segments(Some(base))
            .await
            .map(|s| s.last().is_some_and(|s| s.last_revision >= revision))
            .unwrap_or(false)
    })
    .await;
}

/// `etcdctl member add NAME --peer-urls URL` against `endpoint`, as the
/// runbook runs it; returns the `ETCD_INITIAL_CLUSTER` it prints for the
/// new member's manifest. etcd answers `unhealthy cluster` until every
/// member has been connected for 5 s (its strict reconfiguration check):
/// the runbook says to run it again, and so does this.
async fn member_add(endpoint: &str, name: &str, peer_url: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = tokio::process::Command::new(tools::etcdctl(EtcdVersion::V3_5).unwrap())
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoint, "member", "add", name])
            .args(["--peer-urls", peer_url])
            .output()
            .await
            .unwrap();
        let unhealthy = String::from_utf8_lossy(&out.stderr).contains("unhealthy cluster");
        if out.status.success() || !unhealthy || tokio::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(out.status.success(), "etcdctl member add: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no ETCD_INITIAL_CLUSTER in {}", text(&out)))
}

/// Member names of the cluster at `urls`, each with whether it started.
async fn members(urls: &[String]) -> Vec<(String, bool)> {
    let mut c = connect(urls).await;
    let mut out: Vec<(String, bool)> = c
        .member_list()
        .await
        .unwrap()
        .members()
        .iter()
        .map(|m| (m.name().to_owned(), !m.client_urls().is_empty()))
        .collect();
    out.sort();
    out
}

/// Runbook "Two of three control-plane hosts lost" (deploy/GUIDE.md).
#[tokio::test]
async fn heavy_two_of_three_hosts_lost_restore_on_the_survivor_then_grow_back_to_three() {
    let root = tempfile::tempdir().unwrap();
    let site = Site::new(root.path(), false);
    let mut hosts = cluster_of(root.path(), ["cp-1", "cp-2", "cp-3"], "original").await;
    let urls: Vec<String> = hosts.iter().map(|h| h.client_url.clone()).collect();
    let mut c = connect(&urls).await;
    for i in 0..40 {
        c.put(format!("base/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let agents = start_backups(&site, &mut hosts).await;
    let engine = site.engine(&hosts[0]);
    let base = first_snapshot(&engine).await;
    for i in 0..20 {
        c.put(format!("late/{i:03}"), format!("l{i}"), None)
            .await
            .unwrap();
    }
    c.delete("base/000", None).await.unwrap();
    let last = c.get("x", None).await.unwrap().header().unwrap().revision();
    let want = user_state(&mut c, last, false).await;
    deltas_reach(&engine, &base, last).await;
    drop(c);

    // cp-2 and cp-3 are gone with their disks; cp-1's etcd has no quorum.
    for h in &mut hosts[1..] {
        h.lose().await;
    }
    let survivor = hosts.remove(0);
    let mut alone = connect(std::slice::from_ref(&survivor.client_url)).await;
    let write = tokio::time::timeout(Duration::from_secs(3), alone.put("after", "x", None)).await;
    assert!(
        !matches!(write, Ok(Ok(_))),
        "the survivor alone must have no quorum"
    );

    // Its bulwark-backup, configured for three nodes, refuses in the
    // pre-flight and names both lost agents (exit 6).
    let out = ctl(
        &["restore", "--snapshot", "latest", "--dry-run"],
        &agents[0],
        &site.operator,
    )
    .await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    for lost in &agents[1..] {
        assert!(text(&out).contains(lost.as_str()), "{}", text(&out));
    }

    // The runbook: restore.peers lists the survivor alone (etcd's
    // endpoints stay as they were); a fresh bulwark-backup (new state dir)
    // reads the catalog from the bucket.
    let mut survivor = survivor;
    survivor.stop_backup();
    let (mut l, one) = Site::listeners(1).await;
    let c1 = site.config(&survivor, &urls, &one);
    site.start_backup(&mut survivor, c1, l.remove(0)).await;
    let out = ctl(&["backup", "list"], &one[0], &site.operator).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&base), "{}", text(&out));
    let out = ctl(
        &["restore", "--snapshot", "latest", "--yes", "-o", "json"],
        &one[0],
        &site.operator,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["snapshot_id"], base.as_str(), "{summary}");
    assert_eq!(summary["nodes"].as_array().unwrap().len(), 1, "{summary}");
    assert!(summary["revision"].as_i64().unwrap() >= last, "{summary}");
    assert_eq!(
        members(std::slice::from_ref(&survivor.client_url)).await,
        [("cp-1".to_owned(), true)]
    );
    let mut alone = connect(std::slice::from_ref(&survivor.client_url)).await;
    assert_eq!(user_state(&mut alone, 0, false).await, want);
    alone.put("after/restore", "1", None).await.unwrap();

    // Grow back to three: `etcdctl member add`, then the new host's etcd
    // manifest with the cluster etcdctl printed, one host at a time.
    let mut grown = vec![survivor];
    for name in ["cp-4", "cp-5"] {
        let mut h = Host::new(root.path(), name);
        let initial = member_add(&grown[0].client_url, name, &h.peer_url).await;
        h.start_etcd(&initial, "ignored-when-joining", true);
        wait_for(&format!("{name} serving"), || h.serves()).await;
        grown.push(h);
    }
    let urls: Vec<String> = grown.iter().map(|h| h.client_url.clone()).collect();
    assert_eq!(
        members(&urls).await,
        [
            ("cp-1".to_owned(), true),
            ("cp-4".to_owned(), true),
            ("cp-5".to_owned(), true)
        ]
    );
    let mut c = connect(&urls).await;
    let now = user_state(&mut c, 0, false).await;
    let restored: Vec<_> = now
        .iter()
        .filter(|(k, _, _)| k != "after/restore")
        .cloned()
        .collect();
    assert_eq!(restored, want, "the restored keys, unchanged");
    assert_eq!(now.len(), want.len() + 1, "{now:?}");
    for h in &grown {
        let mut one = connect(std::slice::from_ref(&h.client_url)).await;
        assert_eq!(
            user_state(&mut one, 0, true).await,
            now,
            "{}'s own copy",
            h.name
        );
    }

    // bulwark-backup on the new hosts, and the survivor's peers back to
    // three: a dry run plans and prepares every node of the new cluster.
    grown[0].stop_backup();
    let agents = start_backups(&site, &mut grown).await;
    let out = ctl(
        &["restore", "--snapshot", "latest", "--dry-run"],
        &agents[2],
        &site.operator,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    for name in ["cp-1", "cp-4", "cp-5"] {
        assert!(text(&out).contains(name), "{}", text(&out));
    }
    for h in &mut grown {
        h.stop_backup();
    }
}

/// Runbook "All control-plane hosts rebuilt" (deploy/GUIDE.md), with
/// encrypted backups in an S3 bucket: only the bucket and the age key are
/// left.
#[tokio::test]
async fn heavy_all_hosts_rebuilt_restore_a_new_three_member_cluster_from_the_bucket() {
    let root = tempfile::tempdir().unwrap();
    let s3 = S3Server::start().await.unwrap();
    let site = Site::new(root.path(), true).on_s3(&s3);
    let mut old = cluster_of(root.path(), ["cp-1", "cp-2", "cp-3"], "original").await;
    let urls: Vec<String> = old.iter().map(|h| h.client_url.clone()).collect();
    let mut c = connect(&urls).await;
    for i in 0..40 {
        c.put(format!("base/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    start_backups(&site, &mut old).await;
    let engine = site.engine(&old[0]);
    let base = first_snapshot(&engine).await;
    for i in 0..20 {
        c.put(format!("one/{i:03}"), format!("a{i}"), None)
            .await
            .unwrap();
    }
    let target = c.get("x", None).await.unwrap().header().unwrap().revision();
    let want = user_state(&mut c, target, false).await;
    for i in 0..20 {
        c.put(format!("two/{i:03}"), format!("b{i}"), None)
            .await
            .unwrap();
    }
    let last = c.get("x", None).await.unwrap().header().unwrap().revision();
    deltas_reach(&engine, &base, last).await;
    drop(c);
    let before = snapshot_ids(&engine).await;
    for h in &mut old {
        h.lose().await;
    }

    // Three new hosts, new names and addresses: kubeadm's etcd manifests
    // for a new cluster (empty), and fresh backup configs on the bucket.
    let mut hosts = cluster_of(root.path(), ["cp-4", "cp-5", "cp-6"], "rebuilt").await;

    // A config with another clusterName than the old hosts' finds nothing
    // to restore, and says where it looked and what the bucket holds
    // (exit 5). (No schedule and no deltas: it only answers.)
    let (mut l, probe) = Site::listeners(1).await;
    let mut typo = site.config(&hosts[0], &[hosts[0].client_url.clone()], &probe);
    typo.cluster_name = "prod-eu-1".into();
    typo.schedule.interval = None;
    typo.deltas.enabled = false;
    site.start_backup(&mut hosts[0], typo, l.remove(0)).await;
    let out = ctl(
        &["restore", "--snapshot", "latest", "--dry-run"],
        &probe[0],
        &site.operator,
    )
    .await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        text(&out).contains("prod-eu-1/full")
            && text(&out).contains("holds backups under clusterName prod;"),
        "{}",
        text(&out)
    );
    hosts[0].stop_backup();

    let agents = start_backups(&site, &mut hosts).await;
    let urls: Vec<String> = hosts.iter().map(|h| h.client_url.clone()).collect();
    let empty_cluster = connect(&urls)
        .await
        .status()
        .await
        .unwrap()
        .header()
        .unwrap()
        .cluster_id();

    // The elected instance does not back the empty cluster up over the
    // history (its snapshot would be `latest`): status says why.
    let status = status_saying(&agents, &site.operator, "scheduled snapshots are held").await;
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains(&format!("{empty_cluster:016x}")),
        "{status}"
    );
    let engine = site.engine(&hosts[0]);
    assert_eq!(
        snapshot_ids(&engine).await,
        before,
        "nothing of the empty cluster"
    );

    let out = ctl(&["backup", "list"], &agents[1], &site.operator).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&base), "{}", text(&out));
    let target_s = target.to_string();
    let out = ctl(
        &["restore", "--to-revision", &target_s, "--yes", "-o", "json"],
        &agents[1],
        &site.operator,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["snapshot_id"], base.as_str(), "{summary}");
    assert_eq!(summary["revision"].as_i64(), Some(target), "{summary}");
    assert_eq!(summary["nodes"].as_array().unwrap().len(), 3, "{summary}");

    assert_eq!(
        members(&urls).await,
        [
            ("cp-4".to_owned(), true),
            ("cp-5".to_owned(), true),
            ("cp-6".to_owned(), true)
        ]
    );
    let mut c = connect(&urls).await;
    let restored = c.status().await.unwrap().header().unwrap().cluster_id();
    assert_ne!(restored, empty_cluster);
    assert_eq!(user_state(&mut c, 0, false).await, want);
    for h in &hosts {
        assert!(h.serves().await, "{} serves", h.name);
        let mut one = connect(std::slice::from_ref(&h.client_url)).await;
        assert_eq!(
            user_state(&mut one, 0, true).await,
            want,
            "{}'s own copy",
            h.name
        );
    }
    // Backups go on, of the restored cluster, in the same history.
    let restored_hex = format!("{restored:016x}");
    wait_for("a snapshot of the restored cluster", || {
        let engine = &engine;
        let restored_hex = &restored_hex;
        async move {
            engine
                .latest_snapshot()
                .await
                .is_ok_and(|s| s.manifest.etcd.cluster_id == *restored_hex)
        }
    })
    .await;
    let now = snapshot_ids(&engine).await;
    assert!(before.iter().all(|id| now.contains(id)), "{now:?}");
    for h in &mut hosts {
        h.stop_backup();
    }
}
