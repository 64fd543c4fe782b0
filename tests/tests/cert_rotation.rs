//! Certificate rotation across the whole control plane, as an operator
//! does it, under load (issue 16, "How it is shown").
//!
//! One control plane of real processes on loopback: three `bulwark-lb`
//! nodes (each with a node-local listener in front of an echo backend),
//! three `bulwark-prober`s reporting to them, and three `bulwark-backup`
//! instances on one etcd member (the schedule leader records deltas, the
//! other two ask it over their peer mTLS for every status). Under load —
//! LB reads on kept and on new connections, writes through Raft to the
//! leader, an open watch stream, the probers' report streams, backup
//! status and list calls on kept and new connections, and client
//! connections through every node-local listener — the real `bulwarkctl
//! certs renew` rewrites the certificates:
//!
//! - `heavy_every_certificate_rotates_under_load_and_a_corrupt_one_is_refused`:
//!   every daemon's and the operator's, with new keys, from the same CA;
//!   then a corrupt LB certificate and a corrupt backup key are refused
//!   (metric) while the renewed ones keep serving;
//! - `heavy_the_ca_rotates_through_a_two_ca_bundle_under_load`: the
//!   procedure of deploy/GUIDE.md's "Rotating the CA": the bundles get the
//!   new CA beside the old, every certificate is re-issued from the new
//!   CA, then the old CA leaves the bundles; a certificate of the old CA
//!   is refused at the end.
//!
//! At every step no RPC and no proxied connection fails, the probers'
//! report streams never end, and no backup instance fails to reach the
//! schedule leader. The daemons pick the files up by themselves (every 2 s);
//! a step waits until every daemon counts each of its certificates as
//! applied (`bulwark_certificate_reloads_total` on its /metrics).
//!
//! It replaces the in-process rotation tests of components/lb/tests/
//! cert_rotation.rs (three LB nodes and a prober) and components/backup/
//! tests/daemon.rs (one backup instance), which it covers whole; the LB
//! binary's SIGHUP test stays there.

// Test code: a failed expectation panics, which prints the processes' logs.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;
use bulwark_api::backup::v1::backup_client::BackupClient;
use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::backend_watch_client::BackendWatchClient;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use bulwark_common::grpc::channel;
use bulwark_common::tls::TlsMaterial;
use bulwark_common::tls::reload::{RELOADS, Reload};
use bulwark_prober::config::TcpTarget;
use bulwark_testkit::admin::http_get;
use bulwark_testkit::cluster::{
    LbCluster, Options, backup_config, backup_process, echo_backend, prober_config, prober_process,
    write_named,
};
use bulwark_testkit::{CertFiles, Etcd, Pki, Process, TestDir, ports, tools};
use rustls_pki_types::pem::PemObject;

/// One bulwark-backup instance.
struct Backup {
    process: Process,
    grpc: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    cert: CertFiles,
}

/// One bulwark-prober.
struct Prober {
    name: String,
    process: Process,
    admin: SocketAddr,
    config: PathBuf,
}

/// The control plane under test.
struct Plane {
    lbs: LbCluster,
    probers: Vec<Prober>,
    backups: Vec<Backup>,
    /// The operator's files and the material the load dials with (reloaded
    /// by the test after each change, as a new `bulwarkctl` run would
    /// read the files again).
    operator_files: CertFiles,
    operator: TlsMaterial,
    /// The echo server every backend points at.
    echo: SocketAddr,
    _echo: tokio::task::JoinHandle<()>,
    _etcd: Etcd,
    _dir: TestDir,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

impl Plane {
    async fn start() -> Self {
        bulwark_testkit::install_crypto_provider();
        let pki = Pki::new().unwrap();
        let dir = TestDir::new("cert-rotation").unwrap();
        let (echo, echo_task) = echo_backend().await;
        let etcd = Etcd::start().await.unwrap();
        let lbs = LbCluster::start_with_pki(
            pki.clone(),
            Options {
                nodes: 3,
                backends: vec![("api-1".into(), echo)],
                local_listeners: true,
                relaxed_timers: true,
                ..Default::default()
            },
        )
        .await;
        // Every node has the configured backend (the leader's seeding is
        // applied everywhere) before anything is proxied.
        for n in &lbs.nodes {
            lbs.wait_for_backends(n.id, 1).await;
        }
        let operator_files = lbs.operator_files.clone();
        let operator = operator_files.tls_files().load().unwrap();
        let probers = start_probers(&pki, &lbs, dir.path()).await;
        let backups = start_backups(&pki, &etcd, dir.path()).await;
        Self {
            lbs,
            probers,
            backups,
            operator_files,
            operator,
            echo,
            _echo: echo_task,
            _etcd: etcd,
            _dir: dir,
        }
    }

    fn pki(&self) -> &Pki {
        &self.lbs.pki
    }

    /// Every daemon's config file.
    fn configs(&self) -> Vec<PathBuf> {
        let lbs = self.lbs.nodes.iter().map(|n| n.config.clone());
        let probers = self.probers.iter().map(|p| p.config.clone());
        lbs.chain(probers)
            .chain(self.backups.iter().map(|b| b.config.clone()))
            .collect()
    }

    /// Every daemon's admin address (its /metrics), with its name.
    fn admins(&self) -> Vec<(String, SocketAddr)> {
        let lbs = self
            .lbs
            .nodes
            .iter()
            .map(|n| (format!("lb-{}", n.id), n.admin));
        let probers = self.probers.iter().map(|p| (p.name.clone(), p.admin));
        let backups = self
            .backups
            .iter()
            .map(|b| (b.process.name().to_owned(), b.admin));
        lbs.chain(probers).chain(backups).collect()
    }

    /// Every gRPC server: the LB APIs and the backup instances.
    fn servers(&self) -> Vec<SocketAddr> {
        let lbs = self.lbs.nodes.iter().map(|n| n.api);
        lbs.chain(self.backups.iter().map(|b| b.grpc)).collect()
    }

    /// `bulwarkctl certs renew` from `ca` with `args` over every daemon
    /// config and the operator's certificate; panics with its output on
    /// failure.
    async fn renew(&self, ca: &Pki, args: &[&str]) {
        let out = tokio::process::Command::new(tools::bin_path("bulwarkctl").unwrap())
            .args(["certs", "renew", "--ca-cert"])
            .arg(ca.ca_path())
            .arg("--ca-key")
            .arg(ca.dir().join("ca.key"))
            .args(args)
            .args(self.configs())
            .arg("--file")
            .arg(&self.operator_files.cert)
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "bulwarkctl certs renew {args:?}:\n{text}"
        );
        // 3 LB nodes, 3 probers, 3 backups and the operator.
        assert_eq!(text.matches("renewed").count(), 10, "{text}");
    }
}

/// Three probers, each probing a TCP port (an LB API) and reporting to
/// every LB node.
async fn start_probers(pki: &Pki, lbs: &LbCluster, dir: &Path) -> Vec<Prober> {
    let endpoints: Vec<String> = lbs.nodes.iter().map(|n| n.api.to_string()).collect();
    let mut probers = Vec::new();
    for i in 1..=3 {
        let name = format!("prober-{i}");
        let admin = loopback(ports::loopback_port().unwrap());
        let mut c = prober_config(pki, &name, "", Vec::new(), endpoints.clone()).unwrap();
        c.admin.address = admin;
        c.tcp = vec![TcpTarget {
            id: "t1".into(),
            address: lbs.nodes[0].api.to_string(),
            zone: String::new(),
        }];
        let config = write_named(dir, &name, &c).unwrap();
        let process = prober_process(&name, &config).unwrap().spawn().unwrap();
        process
            .wait_for_port(admin, Duration::from_secs(30))
            .await
            .unwrap();
        probers.push(Prober {
            name,
            process,
            admin,
            config,
        });
    }
    probers
}

/// Three backup instances on `etcd`: the schedule leader records deltas,
/// the others ask it for their status (peer mTLS, `bulwark:backup`).
async fn start_backups(pki: &Pki, etcd: &Etcd, dir: &Path) -> Vec<Backup> {
    let p = ports::free_ports(IpAddr::V4(Ipv4Addr::LOCALHOST), 6).unwrap();
    let grpc: Vec<SocketAddr> = (0..3).map(|i| loopback(p[2 * i])).collect();
    let store = dir.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let store_url = format!("file://{}", store.display());
    let mut backups = Vec::new();
    for i in 0..3 {
        let name = format!("backup-{}", i + 1);
        let cert = pki
            .peer(&name, &["bulwark:backup"], &["127.0.0.1", "localhost"])
            .unwrap();
        let mut c = backup_config(
            &format!("node-{}", i + 1),
            "lab",
            &cert,
            etcd.endpoints(),
            &store_url,
        );
        c.grpc.address = grpc[i];
        c.admin.address = loopback(p[2 * i + 1]);
        // One snapshot, the delta recorder's base; then only deltas.
        c.schedule.interval = Some(Duration::from_secs(24 * 3600));
        c.schedule.lease_ttl = Duration::from_secs(3);
        c.restore.peers = grpc.iter().map(ToString::to_string).collect();
        c.restore.state_dir = dir.join(format!("{name}-restore"));
        let config = write_named(dir, &name, &c).unwrap();
        let process = backup_process(&name, &config).unwrap().spawn().unwrap();
        backups.push(Backup {
            process,
            grpc: grpc[i],
            admin: c.admin.address,
            config,
            cert,
        });
    }
    for b in &backups {
        b.process
            .wait_for_port(b.grpc, Duration::from_secs(30))
            .await
            .unwrap();
    }
    backups
}

/// `bulwark_certificate_reloads_total` of the daemon at `admin`, by
/// certificate file: (applied, refused).
async fn reloads(admin: SocketAddr) -> BTreeMap<String, (u64, u64)> {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{admin}/metrics: {body}");
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with(RELOADS)) {
        let Some(file) = line
            .split("file=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let entry = out.entry(file.to_owned()).or_default();
        if line.contains("result=\"applied\"") {
            entry.0 = value;
        } else if line.contains("result=\"refused\"") {
            entry.1 = value;
        }
    }
    out
}

/// Every daemon's reload counts.
async fn all_reloads(plane: &Plane) -> Vec<BTreeMap<String, (u64, u64)>> {
    let mut out = Vec::new();
    for (_, admin) in plane.admins() {
        out.push(reloads(admin).await);
    }
    out
}

/// Waits until every daemon has applied each of its certificates once
/// more than in `before`, and refused none more.
async fn wait_applied(plane: &Plane, before: &[BTreeMap<String, (u64, u64)>], step: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for ((name, admin), before) in plane.admins().into_iter().zip(before) {
        assert!(!before.is_empty(), "{name} follows no certificate");
        loop {
            let now = reloads(admin).await;
            let pending: Vec<_> = before
                .iter()
                .filter(|(file, (applied, _))| now.get(*file).is_none_or(|n| n.0 <= *applied))
                .map(|(file, _)| file.clone())
                .collect();
            for (file, (_, refused)) in before {
                assert_eq!(
                    now.get(file).map(|n| n.1),
                    Some(*refused),
                    "{step}: {name} refused {file}"
                );
            }
            if pending.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{step}: {name} has not applied {pending:?} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The certificate a fresh handshake with `server` presents.
async fn served_cert(server: SocketAddr, tls: &TlsMaterial) -> Vec<u8> {
    let config = tls.client_h2().unwrap();
    let tcp = tokio::net::TcpStream::connect(server).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The DER of the certificate in `path`.
fn der_of(path: &Path) -> Vec<u8> {
    rustls_pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}

/// Every server presents the certificate its files hold now.
async fn servers_present_their_files(plane: &Plane) {
    let files = plane
        .lbs
        .nodes
        .iter()
        .map(|n| plane.pki().dir().join(format!("lb-{}.crt", n.id)))
        .chain(plane.backups.iter().map(|b| b.cert.cert.clone()));
    for (server, file) in plane.servers().into_iter().zip(files) {
        assert_eq!(
            served_cert(server, &plane.operator).await,
            der_of(&file),
            "{server} does not present {}",
            file.display()
        );
    }
}

/// The LB leader's API address.
async fn leader(api: SocketAddr, tls: &TlsMaterial) -> SocketAddr {
    let mut client = LoadBalancerClient::new(channel(&api.to_string(), tls, None).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get_status(lb::GetStatusRequest::default()).await
            && let Some(l) = r.into_inner().leader
            && let Ok(a) = l.api_address.parse()
        {
            return a;
        }
        assert!(Instant::now() < deadline, "no leader within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last report sequence the leader accepted from each prober, once
/// every one reports.
async fn prober_sequences(plane: &Plane) -> Vec<u64> {
    let lead = leader(plane.lbs.nodes[0].api, &plane.operator).await;
    let mut client =
        LoadBalancerClient::new(channel(&lead.to_string(), &plane.operator, None).unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = client
            .get_health(lb::GetHealthRequest::default())
            .await
            .unwrap()
            .into_inner();
        let seqs: Vec<Option<u64>> = plane
            .probers
            .iter()
            .map(|p| {
                health
                    .probers
                    .iter()
                    .find(|r| r.node_name == p.name && !r.stale && r.last_sequence > 0)
                    .map(|r| r.last_sequence)
            })
            .collect();
        if seqs.iter().all(Option::is_some) {
            return seqs.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "not every prober reports: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until a backup instance leads the schedule and its delta
/// recorder runs, so the others' status calls go to it.
async fn backup_leader_records(plane: &Plane) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for b in &plane.backups {
            let s = BackupClient::new(channel(&b.grpc.to_string(), &plane.operator, None).unwrap())
                .get_status(pb::GetStatusRequest { local_only: true })
                .await
                .unwrap()
                .into_inner();
            let running = s
                .deltas
                .is_some_and(|d| d.state() == pb::DeltaState::Running);
            if s.schedule.is_some_and(|sc| sc.is_leader) && running {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no backup instance records deltas within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What one task of the load does, again and again.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `GetStatus` on one LB channel kept open.
    LbKept(SocketAddr),
    /// `ListBackends` on a new connection each time.
    LbNew(SocketAddr),
    /// `AddBackend` through the leader (found anew each time, as
    /// bulwarkctl does), pointing at the echo server.
    LbWrites(SocketAddr, SocketAddr),
    /// A new client connection through a node-local listener, 64 bytes
    /// echoed.
    Proxied(SocketAddr),
    /// `GetStatus` (not local-only: a non-leader asks the schedule
    /// leader) on one backup channel kept open.
    BackupKept(SocketAddr),
    /// `ListSnapshots` on a new connection each time.
    BackupNew(SocketAddr),
}

#[derive(Default)]
struct Counters {
    rpc_ok: AtomicU64,
    rpc_failed: AtomicU64,
    proxied_ok: AtomicU64,
    proxied_failed: AtomicU64,
    /// Backup statuses a non-leader answered (it asked the leader).
    from_leader: AtomicU64,
}

/// The load, running until [`Load::stop`].
struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The counts once the load stopped.
#[derive(Debug)]
struct Totals {
    rpc_ok: u64,
    rpc_failed: u64,
    proxied_ok: u64,
    proxied_failed: u64,
    from_leader: u64,
}

impl Load {
    /// Every kind of load against every server of `plane`.
    async fn start(plane: &Plane) -> Self {
        let lead = leader(plane.lbs.nodes[0].api, &plane.operator).await;
        let mut kinds = vec![Kind::LbWrites(lead, plane.echo)];
        for n in &plane.lbs.nodes {
            kinds.extend([
                Kind::LbKept(n.api),
                Kind::LbNew(n.api),
                Kind::Proxied(n.local.unwrap()),
            ]);
        }
        for b in &plane.backups {
            kinds.extend([Kind::BackupKept(b.grpc), Kind::BackupNew(b.grpc)]);
        }
        let (stop, counters) = (Arc::new(AtomicBool::new(false)), Arc::default());
        let mut tasks = Vec::new();
        for kind in kinds {
            let (tls, stop, counters) =
                (plane.operator.clone(), stop.clone(), Arc::clone(&counters));
            tasks.push(tokio::spawn(run(kind, tls, stop, counters)));
        }
        Self {
            stop,
            counters,
            tasks,
        }
    }

    async fn stop(mut self) -> Totals {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.tasks) {
            t.await.unwrap();
        }
        let c = &self.counters;
        Totals {
            rpc_ok: c.rpc_ok.load(Ordering::Relaxed),
            rpc_failed: c.rpc_failed.load(Ordering::Relaxed),
            proxied_ok: c.proxied_ok.load(Ordering::Relaxed),
            proxied_failed: c.proxied_failed.load(Ordering::Relaxed),
            from_leader: c.from_leader.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Load {
    /// A test that fails midway stops its load, so the failure is not
    /// buried under the load's errors against the processes going away.
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

/// One client connection through `local`: 64 bytes out, the same back
/// within 2 s.
async fn proxied_echo(local: SocketAddr, n: u64) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(local).await?;
        let sent = [(n % 251) as u8; 64];
        s.write_all(&sent).await?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back).await?;
        match back == sent {
            true => Ok(()),
            false => Err(std::io::Error::other("echoed bytes differ")),
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::other("no echo within 2 s"))?
}

async fn run(kind: Kind, tls: TlsMaterial, stop: Arc<AtomicBool>, counters: Arc<Counters>) {
    let ch = |a: SocketAddr| channel(&a.to_string(), &tls, None).unwrap();
    let mut kept_lb = None;
    let mut kept_backup = None;
    match kind {
        Kind::LbKept(a) => kept_lb = Some(LoadBalancerClient::new(ch(a))),
        Kind::BackupKept(a) => kept_backup = Some(BackupClient::new(ch(a))),
        _ => {}
    }
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let result: Result<(), String> = match kind {
            Kind::LbKept(_) => kept_lb
                .as_mut()
                .unwrap()
                .get_status(lb::GetStatusRequest::default())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Kind::LbNew(a) => LoadBalancerClient::new(ch(a))
                .list_backends(lb::ListBackendsRequest::default())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Kind::LbWrites(first, echo) => {
                let target = leader(first, &tls).await;
                LoadBalancerClient::new(ch(target))
                    .add_backend(lb::AddBackendRequest {
                        id: format!("b-{n}"),
                        address: echo.to_string(),
                        ..Default::default()
                    })
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            Kind::Proxied(local) => {
                let r = proxied_echo(local, n).await;
                let counter = match &r {
                    Ok(()) => &counters.proxied_ok,
                    Err(e) => {
                        eprintln!("failed proxied connection ({local}): {e}");
                        &counters.proxied_failed
                    }
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Kind::BackupKept(_) => kept_backup
                .as_mut()
                .unwrap()
                .get_status(pb::GetStatusRequest { local_only: false })
                .await
                .map(|r| {
                    let s = r.into_inner();
                    if s.schedule
                        .is_some_and(|sc| !sc.is_leader && !sc.leader.is_empty())
                    {
                        counters.from_leader.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .map_err(|e| e.to_string()),
            Kind::BackupNew(a) => BackupClient::new(ch(a))
                .list_snapshots(pb::ListSnapshotsRequest::default())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        let counter = match &result {
            Ok(()) => &counters.rpc_ok,
            Err(e) => {
                eprintln!("failed RPC ({kind:?}): {e}");
                &counters.rpc_failed
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let pause = match kind {
            Kind::LbWrites(..) => 100,
            _ => 20,
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Where each prober's and backup instance's log stands now.
fn log_marks(plane: &Plane) -> Vec<usize> {
    let probers = plane.probers.iter().map(|p| p.process.current_log().len());
    probers
        .chain(plane.backups.iter().map(|b| b.process.current_log().len()))
        .collect()
}

/// Since `marks`: no prober's report stream ended, no backup instance
/// failed to reach the schedule leader.
fn no_peer_failures_since(plane: &Plane, marks: &[usize]) {
    let processes = plane
        .probers
        .iter()
        .map(|p| (&p.process, "report stream ended"))
        .chain(
            plane
                .backups
                .iter()
                .map(|b| (&b.process, "the schedule leader did not answer")),
        );
    for ((process, failure), mark) in processes.zip(marks) {
        let log = process.current_log();
        let since = log.get(*mark..).unwrap_or_default();
        assert!(
            !since.contains(failure),
            "{}: {failure:?} during the rotation:\n{since}",
            process.name()
        );
    }
}

/// The checks every test makes of the load once it stopped.
fn assert_nothing_failed(totals: &Totals, step: &str) {
    eprintln!("{step}: {totals:?}");
    assert_eq!(totals.rpc_failed, 0, "{step}: failed RPCs: {totals:?}");
    assert_eq!(
        totals.proxied_failed, 0,
        "{step}: failed proxied connections: {totals:?}"
    );
    assert!(totals.rpc_ok > 200, "{step}: too few RPCs ran: {totals:?}");
    assert!(
        totals.proxied_ok > 100,
        "{step}: too few proxied connections ran: {totals:?}"
    );
    assert!(
        totals.from_leader > 10,
        "{step}: too few backup statuses came from the schedule leader: {totals:?}"
    );
}

/// An open watch stream on LB node 2, read to its first set.
async fn open_watch(plane: &Plane) -> tonic::Streaming<lb::BackendSet> {
    let api = plane.lbs.nodes[1].api;
    let mut watch =
        BackendWatchClient::new(channel(&api.to_string(), &plane.operator, None).unwrap())
            .watch(lb::WatchBackendsRequest::default())
            .await
            .unwrap()
            .into_inner();
    watch.message().await.unwrap().unwrap();
    watch
}

/// The stream opened before the rotation still delivers a change made
/// after it.
async fn watch_still_delivers(plane: &Plane, watch: &mut tonic::Streaming<lb::BackendSet>) {
    let lead = leader(plane.lbs.nodes[0].api, &plane.operator).await;
    LoadBalancerClient::new(channel(&lead.to_string(), &plane.operator, None).unwrap())
        .add_backend(lb::AddBackendRequest {
            id: "after-rotation".into(),
            address: "127.0.0.1:9".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let set = watch.message().await.unwrap().unwrap();
            if set.backends.iter().any(|b| b.id == "after-rotation") {
                return;
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "the watch stream stopped delivering");
}

/// The probers kept reporting: every sequence moved on from `before`.
async fn probers_kept_reporting(plane: &Plane, before: &[u64]) {
    let after = prober_sequences(plane).await;
    for ((p, b), a) in plane.probers.iter().zip(before).zip(&after) {
        assert!(a > b, "{} stopped reporting ({b} -> {a})", p.name);
    }
}

/// What a rotation runs under and is checked against: the probers'
/// sequences, a watch stream and the logs' lengths from before it, and the
/// load.
struct UnderLoad {
    reported: Vec<u64>,
    watch: tonic::Streaming<lb::BackendSet>,
    marks: Vec<usize>,
    load: Load,
}

impl UnderLoad {
    /// Waits for every prober to report and for the backup leader to
    /// record, opens the watch, marks the logs, starts the load and lets
    /// it run for a second.
    async fn start(plane: &Plane) -> Self {
        let reported = prober_sequences(plane).await;
        backup_leader_records(plane).await;
        let watch = open_watch(plane).await;
        let marks = log_marks(plane);
        let load = Load::start(plane).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        Self {
            reported,
            watch,
            marks,
            load,
        }
    }

    /// Stops the load and checks that nothing failed during `step`, the
    /// probers kept reporting, the watch still delivers and no peer
    /// connection failed.
    async fn stop_and_check(mut self, plane: &Plane, step: &str) {
        let totals = self.load.stop().await;
        assert_nothing_failed(&totals, step);
        probers_kept_reporting(plane, &self.reported).await;
        watch_still_delivers(plane, &mut self.watch).await;
        no_peer_failures_since(plane, &self.marks);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_every_certificate_rotates_under_load_and_a_corrupt_one_is_refused() {
    let plane = Plane::start().await;
    let under_load = UnderLoad::start(&plane).await;

    // Every certificate and key, renewed in place with new keys.
    let before = all_reloads(&plane).await;
    let old_operator = der_of(&plane.operator_files.cert);
    plane.renew(plane.pki(), &["--new-key"]).await;
    assert_eq!(plane.operator.reload(), Reload::Applied);
    assert_ne!(der_of(&plane.operator_files.cert), old_operator);
    wait_applied(&plane, &before, "renew --new-key").await;
    servers_present_their_files(&plane).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Corrupt replacements, still under load: an LB node's certificate
    // and a backup instance's key. Each is refused (counted), and the
    // renewed certificate keeps serving.
    let (lb1, backup1) = (&plane.lbs.nodes[0], &plane.backups[0]);
    let lb1_cert = plane.pki().dir().join("lb-1.crt");
    let (lb1_der, backup1_der) = (der_of(&lb1_cert), der_of(&backup1.cert.cert));
    std::fs::write(&lb1_cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    std::fs::write(&backup1.cert.key, "-----BEGIN PRIVATE KEY-----\ngarbage\n").unwrap();
    for (admin, file) in [(lb1.admin, &lb1_cert), (backup1.admin, &backup1.cert.cert)] {
        let file = file.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(15);
        while reloads(admin).await.get(&file).is_none_or(|c| c.1 == 0) {
            assert!(Instant::now() < deadline, "{file}: not refused within 15 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(served_cert(lb1.api, &plane.operator).await, lb1_der);
    assert_eq!(
        served_cert(backup1.grpc, &plane.operator).await,
        backup1_der
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    under_load.stop_and_check(&plane, "rotation").await;
    // Those two were refused, and nothing else was. (A backup instance
    // follows its files twice: as its server's and as its peer client's.)
    let corrupted = [
        lb1_cert.display().to_string(),
        backup1.cert.cert.display().to_string(),
    ];
    for (file, (_, refused)) in all_reloads(&plane).await.iter().flatten() {
        assert_eq!(
            *refused > 0,
            corrupted.contains(file),
            "{file}: refused {refused} times"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_the_ca_rotates_through_a_two_ca_bundle_under_load() {
    let plane = Plane::start().await;
    let under_load = UnderLoad::start(&plane).await;
    // Every daemon and the operator read one bundle here (each node's
    // /etc/kubernetes/pki/ca.crt in a real cluster).
    let bundle = plane.pki().ca_path().to_owned();
    let old_ca = plane.pki().ca_pem().to_owned();
    let new_ca = Pki::with_ca_name("bulwark-test-ca-2").unwrap();

    // 1. Every bundle holds the old and the new CA.
    let before = all_reloads(&plane).await;
    std::fs::write(&bundle, format!("{old_ca}{}", new_ca.ca_pem())).unwrap();
    assert_eq!(plane.operator.reload(), Reload::Applied);
    wait_applied(&plane, &before, "1. old+new bundle").await;

    // 2. Every certificate re-issued from the new CA (same keys).
    let before = all_reloads(&plane).await;
    plane.renew(&new_ca, &[]).await;
    assert_eq!(plane.operator.reload(), Reload::Applied);
    wait_applied(&plane, &before, "2. re-issued from the new CA").await;
    servers_present_their_files(&plane).await;

    // 3. The old CA leaves the bundles.
    let before = all_reloads(&plane).await;
    std::fs::write(&bundle, new_ca.ca_pem()).unwrap();
    assert_eq!(plane.operator.reload(), Reload::Applied);
    wait_applied(&plane, &before, "3. new CA only").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    under_load.stop_and_check(&plane, "CA rotation").await;

    // Only the new CA is trusted now: servers present certificates of the
    // new CA (the operator trusts nothing else), and a client certificate
    // the old CA issues is refused by every server.
    servers_present_their_files(&plane).await;
    let stale = plane
        .pki()
        .client("stale-operator", &["system:masters"])
        .unwrap()
        .tls_files()
        .load()
        .unwrap();
    for n in &plane.lbs.nodes {
        assert!(lb_answers(n.api, &plane.operator).await);
        assert!(
            !lb_answers(n.api, &stale).await,
            "lb-{} admits a certificate of the old CA",
            n.id
        );
    }
    for b in &plane.backups {
        assert!(backup_answers(b.grpc, &plane.operator).await);
        assert!(
            !backup_answers(b.grpc, &stale).await,
            "{} admits a certificate of the old CA",
            b.process.name()
        );
    }
}

/// Whether the LB API at `api` answers a status call made with `tls`.
async fn lb_answers(api: SocketAddr, tls: &TlsMaterial) -> bool {
    LoadBalancerClient::new(channel(&api.to_string(), tls, None).unwrap())
        .get_status(lb::GetStatusRequest::default())
        .await
        .is_ok()
}

/// Whether the backup instance at `grpc` answers a status call made with
/// `tls`.
async fn backup_answers(grpc: SocketAddr, tls: &TlsMaterial) -> bool {
    BackupClient::new(channel(&grpc.to_string(), tls, None).unwrap())
        .get_status(pb::GetStatusRequest { local_only: true })
        .await
        .is_ok()
}
