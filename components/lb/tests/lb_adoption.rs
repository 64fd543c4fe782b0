//! Adopting a VIP that keepalived + HAProxy hold, as the kubeadm HA guide
//! sets them up, without downtime (root only: a network-namespace lab;
//! skipped without it, failed with BULWARK_REQUIRE_PRIVILEGED=1). The
//! steps are deploy/GUIDE.md's "Adopting a keepalived + HAProxy front":
//!
//! ```text
//!   baseline   keepalived (h1 MASTER, h2/h3 BACKUP) + HAProxy *:8443 on h1..h3
//!   beside     bulwark-lb on h1, one-member cluster, no VIP: seeds its backends
//!   takeover   h1 restarted in arp mode: binds VIP:8443 beside HAProxy (the
//!              exact address wins over HAProxy's wildcard), claims the VIP
//!              keepalived put on h1 (the address never leaves the interface)
//!   keepalived stopped on h2, h3, then h1 (it deletes the VIP; bulwark's next
//!              renewal adds it back); HAProxy on h1 soft-stopped
//!   grow       h2, h3: HAProxy soft-stopped, bulwark-lb started and added
//! ```
//!
//! A client on h4 makes requests through the VIP the whole time (a new
//! connection per request, as a client after a reconnect does); the test
//! prints, per step, the requests, failures and the longest wait, and
//! asserts that no more requests failed than one failover's worth, that
//! no two hosts ever held the VIP, and that the adopted three-member cluster
//! moves the VIP on a leadership transfer.

// Helpers outside #[test] fns fail the test loudly too.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use bulwark_common::tls::{TlsFiles, TlsMaterial};
use bulwark_lb::config::VipMode;
use bulwark_testkit::cluster::lab::{api_via, echo, holders_of, keepalived_conf};
use bulwark_testkit::{Host, Lab, Pki, Process, ProcessBuilder, TestDir, config, tools};
use tonic::transport::Channel;

/// The VIP's port: the kubeadm guide's HAProxy port.
const FRONT_PORT: u16 = 8443;
/// The "apiserver" (an echo server, a test double) on the client host.
const BACKEND_PORT: u16 = 6443;
/// bulwark-lb's API port on every LB host.
const API_PORT: u16 = 9442;
/// Load generators, each making one request at a time.
const CLIENTS: usize = 4;
/// Pause between one client's requests.
const PAUSE: Duration = Duration::from_millis(20);
/// A request's deadline: a client that waits for one lost SYN (resent
/// after 1 s) still succeeds; one that waits longer has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// One failover's worth of time: bulwark's own failover on a link cut
/// (docs/FAILOVER.md, bench/results: median about 0.5 s).
const ONE_FAILOVER: Duration = Duration::from_millis(500);

/// One request of the load.
#[derive(Clone, Copy, Debug)]
struct Request {
    start: Instant,
    end: Instant,
    ok: bool,
}

/// Requests through `vip` from `client` until `stop`.
fn start_load(
    client: &Host,
    vip: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<Request>>>, Vec<tokio::task::JoinHandle<()>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let tasks = (0..CLIENTS)
        .map(|_| {
            let (client, stop, log) = (client.clone(), stop.clone(), log.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let ok = echo(&client, vip, REQUEST_TIMEOUT).await;
                    let end = Instant::now();
                    log.lock().unwrap().push(Request { start, end, ok });
                    if !ok {
                        // A refused connect returns at once; do not spin.
                        tokio::time::sleep(PAUSE).await;
                    }
                    tokio::time::sleep(PAUSE).await;
                }
            })
        })
        .collect();
    (log, tasks)
}

/// What the client saw during one step.
#[derive(Debug, Default)]
struct StepFigures {
    requests: usize,
    failed: usize,
    /// The longest time between two successful completions in the step
    /// (or from the step's start to its first): how long the client saw
    /// nothing work.
    gap: Duration,
    /// The slowest successful request.
    slowest: Duration,
}

/// Figures of the requests started in `[from, to)`.
fn figures(requests: &[Request], from: Instant, to: Instant) -> StepFigures {
    let mut f = StepFigures::default();
    let mut done: Vec<Instant> = Vec::new();
    for r in requests.iter().filter(|r| r.start >= from && r.start < to) {
        f.requests += 1;
        if r.ok {
            done.push(r.end);
            f.slowest = f.slowest.max(r.end - r.start);
        } else {
            f.failed += 1;
        }
    }
    done.sort();
    let mut last = from;
    for t in done {
        f.gap = f.gap.max(t.saturating_duration_since(last));
        last = last.max(t);
    }
    f
}

fn tls_files(c: &bulwark_testkit::CertFiles) -> TlsFiles {
    TlsFiles {
        cert_file: c.cert.clone(),
        key_file: c.key.clone(),
        ca_file: c.ca.clone(),
    }
}

/// The lab: three LB hosts and the client host with the backend.
struct Adoption {
    lab: Lab,
    dir: TestDir,
    pki: Pki,
    operator: TlsMaterial,
    vip: SocketAddr,
    backend: SocketAddr,
    /// keepalived and HAProxy per LB host.
    keepalived: Vec<Process>,
    haproxy: Vec<Process>,
    /// bulwark-lb per LB host, once started.
    lb: Vec<Option<Process>>,
}

impl Adoption {
    fn hosts(&self) -> Vec<Host> {
        self.lab.hosts()[..3].to_vec()
    }

    fn client(&self) -> Host {
        self.lab.host(3).clone()
    }

    /// The operator API of LB host `i`, dialled from the client host.
    fn api(&self, i: usize) -> LoadBalancerClient<Channel> {
        let addr = SocketAddr::new(IpAddr::V4(self.lab.host(i).addr()), API_PORT);
        api_via(&self.client(), addr, &self.operator)
    }

    /// HAProxy and keepalived on LB host `i` as the kubeadm guide
    /// configures them (the bench's baseline, bench/src/suite/stack.rs),
    /// with a TCP health check: the test double does not answer HTTP.
    fn start_baseline(&mut self, i: usize) {
        let host = self.lab.host(i).clone();
        let id = i + 1;
        let haproxy_cfg = self.dir.join(format!("haproxy-{id}.cfg"));
        std::fs::write(
            &haproxy_cfg,
            format!(
                "global
    log stdout format raw local0

defaults
    mode                    tcp
    log                     global
    option                  dontlognull
    option                  redispatch
    retries                 1
    timeout connect         5s
    timeout client          35s
    timeout server          35s

frontend apiserver
    bind *:{FRONT_PORT}
    mode tcp
    option tcplog
    default_backend apiserverbackend

backend apiserverbackend
    mode tcp
    balance roundrobin
    default-server inter 2s fall 3 rise 2
    server api-1 {backend} check
",
                backend = self.backend
            ),
        )
        .unwrap();
        let keepalived_cfg = self.dir.join(format!("keepalived-{id}.conf"));
        std::fs::write(
            &keepalived_cfg,
            keepalived_conf(id, host.interface(), self.vip.ip()),
        )
        .unwrap();
        self.haproxy.push(
            host.spawn(
                ProcessBuilder::new(format!("haproxy-{id}"), "/usr/sbin/haproxy")
                    .arg("-db")
                    .arg("-f")
                    .arg(&haproxy_cfg),
            )
            .unwrap(),
        );
        let run = self.dir.join(format!("keepalived-{id}"));
        std::fs::create_dir_all(&run).unwrap();
        self.keepalived.push(
            host.spawn(
                ProcessBuilder::new(format!("keepalived-{id}"), "/usr/sbin/keepalived")
                    .args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
                    .arg("--use-file")
                    .arg(&keepalived_cfg)
                    .arg("--pid")
                    .arg(run.join("keepalived.pid"))
                    .arg("--vrrp_pid")
                    .arg(run.join("vrrp.pid"))
                    .arg("--checkers_pid")
                    .arg(run.join("checkers.pid")),
            )
            .unwrap(),
        );
    }

    /// Writes LB host `i`'s bulwark-lb config: the first node forms the
    /// cluster alone (`initialMembers`: itself) and seeds the backend;
    /// the others wait to be added. `arp`: with the VIP (else no VIP).
    fn write_lb_config(&self, i: usize, arp: bool) -> PathBuf {
        let host = self.lab.host(i);
        let id = i as u64 + 1;
        let a = IpAddr::V4(host.addr());
        let cert = self
            .pki
            .peer(&format!("lb-{id}"), &["bulwark:lb"], &[&a.to_string()])
            .unwrap();
        let me = config::lb_member(
            id,
            &format!("lb-{id}"),
            "",
            SocketAddr::new(a, 9441),
            SocketAddr::new(a, API_PORT),
        );
        let mut c = config::lb_node(
            std::slice::from_ref(&me),
            id,
            &cert,
            &self.dir.join(format!("data-{id}")),
        )
        .unwrap();
        if i != 0 {
            // Joins when the first node adds it.
            c.initial_members.clear();
        }
        if arp {
            c.vip.mode = VipMode::Arp;
            c.vip.address = Some(self.vip.ip());
            c.vip.port = FRONT_PORT;
            c.vip.interface = Some(host.interface().to_owned());
        }
        c.admin.address = SocketAddr::from(([127, 0, 0, 1], 9440));
        c.backends = vec![config::lb_backend("api-1", self.backend, "")];
        c.proxy.connect_timeout = Duration::from_secs(1);
        c.shutdown_grace = Duration::from_secs(5);
        config::write(self.dir.join(format!("lb-{id}.yaml")), &c).unwrap()
    }

    fn start_lb(&mut self, i: usize, config: &std::path::Path) {
        let p = self
            .lab
            .host(i)
            .spawn(
                ProcessBuilder::new(
                    format!("lb-{}", i + 1),
                    tools::bin_path("bulwark-lb").unwrap(),
                )
                .arg("--config")
                .arg(config)
                .env("BULWARK_LOG_LEVEL", "info,openraft=warn"),
            )
            .unwrap();
        self.lb[i] = Some(p);
    }

    /// Node 1's status once it answers with a leader and `backends`
    /// routable backends.
    async fn wait_for_leader(&self, i: usize, timeout: Duration) -> lb::GetStatusResponse {
        let deadline = Instant::now() + timeout;
        loop {
            let status = tokio::time::timeout(
                Duration::from_secs(1),
                self.api(i)
                    .get_status(lb::GetStatusRequest { max_failovers: 8 }),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(tonic::Response::into_inner);
            if let Some(s) = status.filter(|s| s.leader.is_some()) {
                return s;
            }
            assert!(Instant::now() < deadline, "lb-{} has no leader", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until bulwark-lb on host `i` records itself as the VIP holder.
    async fn wait_for_bulwark_holder(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.wait_for_leader(i, timeout).await;
            if s.vip.and_then(|v| v.holder_node_id) == Some(i as u64 + 1) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "lb-{} did not take the VIP",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sweeps `ip addr` on the LB hosts until `stop`; every sweep's holders.
fn sweep(
    hosts: Vec<Host>,
    vip: IpAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Vec<usize>>> {
    std::thread::spawn(move || {
        let mut sweeps = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            sweeps.push(holders_of(&hosts, vip));
            // Each sweep runs `ip` three times; leave the CPU some room.
            std::thread::sleep(Duration::from_millis(20));
        }
        sweeps
    })
}

/// Soft-stops HAProxy (SIGUSR1: it stops listening and exits once its
/// connections have ended), as an operator removing it would.
async fn soft_stop(haproxy: &mut Process) {
    haproxy.signal(libc::SIGUSR1).unwrap();
    haproxy
        .wait_exit(Duration::from_secs(40))
        .await
        .expect("HAProxy exits once its connections end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_netns_adopt_a_keepalived_haproxy_vip_without_downtime() {
    bulwark_testkit::install_crypto_provider();
    let Some(lab) = Lab::start_or_skip(4).unwrap() else {
        return;
    };
    let pki = Pki::new().unwrap();
    let operator = tls_files(&pki.admin().unwrap()).load().unwrap();
    let vip = SocketAddr::new(IpAddr::V4(lab.spare_addr(0)), FRONT_PORT);
    let backend = SocketAddr::new(IpAddr::V4(lab.host(3).addr()), BACKEND_PORT);
    let listener = lab.host(3).tcp_listener(backend).unwrap();
    let echo_server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut a = Adoption {
        lab,
        dir: TestDir::new("lb-adoption").unwrap(),
        pki,
        operator,
        vip,
        backend,
        keepalived: Vec::new(),
        haproxy: Vec::new(),
        lb: vec![None, None, None],
    };
    let hosts = a.hosts();

    // Baseline: keepalived's MASTER (h1) holds the VIP, HAProxy serves it.
    for i in 0..3 {
        a.start_baseline(i);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(holders_of(&hosts, vip.ip()) == vec![0]
        && echo(&a.client(), vip, Duration::from_millis(500)).await)
    {
        assert!(
            Instant::now() < deadline,
            "keepalived + HAProxy did not bring the VIP up on h1: {:?}",
            holders_of(&hosts, vip.ip())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop_sweep = Arc::new(AtomicBool::new(false));
    let sweeper = sweep(hosts.clone(), vip.ip(), stop_sweep.clone());
    let stop_load = Arc::new(AtomicBool::new(false));
    let (requests, load) = start_load(&a.client(), vip, &stop_load);
    let mut steps: Vec<(&str, Instant)> = vec![("keepalived + HAProxy", Instant::now())];
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Beside: a one-member bulwark cluster on h1, without the VIP.
    steps.push(("bulwark beside, no VIP", Instant::now()));
    let config = a.write_lb_config(0, false);
    a.start_lb(0, &config);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = a.wait_for_leader(0, Duration::from_secs(20)).await;
        if s.backends_total == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no backend seeded: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Takeover: h1 restarted in arp mode takes the VIP keepalived put
    // there; its front listener takes the VIP's new connections.
    steps.push(("bulwark on h1 takes the VIP", Instant::now()));
    a.write_lb_config(0, true);
    a.lb[0].as_mut().unwrap().restart().await.unwrap();
    a.wait_for_bulwark_holder(0, Duration::from_secs(20)).await;
    assert!(
        a.lb[0]
            .as_ref()
            .unwrap()
            .current_log()
            .contains("the VIP is on the interface without a lifetime"),
        "the start-up left keepalived's address in place"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // keepalived stops: the BACKUPs first, so none takes the VIP when the
    // MASTER goes; the MASTER deletes the VIP as it stops, and bulwark's
    // next renewal (a quarter of its 1 s lifetime) adds it back.
    steps.push(("keepalived stopped", Instant::now()));
    for i in [1, 2, 0] {
        a.keepalived[i].stop().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while holders_of(&hosts, vip.ip()) != vec![0] {
        assert!(
            Instant::now() < deadline,
            "bulwark did not add the VIP back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    soft_stop(&mut a.haproxy[0]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Grow: h2 and h3 drop HAProxy and join the bulwark cluster.
    steps.push(("h2, h3 join bulwark", Instant::now()));
    for i in [1, 2] {
        soft_stop(&mut a.haproxy[i]).await;
        let config = a.write_lb_config(i, true);
        a.start_lb(i, &config);
        let addr = a.lab.host(i).addr();
        let request = lb::AddMemberRequest {
            node: Some(lb::NodeInfo {
                id: i as u64 + 1,
                name: format!("lb-{}", i + 1),
                raft_address: format!("{addr}:9441"),
                api_address: format!("{addr}:{API_PORT}"),
                ..Default::default()
            }),
            stay_learner: false,
            catch_up_timeout: None,
        };
        // The new process may not listen yet: the leader says unavailable.
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = a.api(0).add_member(request.clone()).await {
            assert!(
                e.code() == tonic::Code::Unavailable && Instant::now() < deadline,
                "adding lb-{}: {e}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = Instant::now();
    stop_load.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }

    // The figures, per step.
    let requests = requests.lock().unwrap().clone();
    let mut total = StepFigures::default();
    eprintln!(
        "{:<32} {:>8} {:>7} {:>10} {:>10}",
        "step", "requests", "failed", "gap", "slowest"
    );
    for (k, (name, from)) in steps.iter().enumerate() {
        let to = steps.get(k + 1).map_or(end, |s| s.1);
        let f = figures(&requests, *from, to);
        eprintln!(
            "{name:<32} {:>8} {:>7} {:>10.0?} {:>10.0?}",
            f.requests, f.failed, f.gap, f.slowest
        );
        if k > 0 {
            total.requests += f.requests;
            total.failed += f.failed;
            total.gap = total.gap.max(f.gap);
            total.slowest = total.slowest.max(f.slowest);
        }
    }
    let baseline = figures(&requests, steps[0].1, steps[1].1);
    let rate = baseline.requests as f64 / (steps[1].1 - steps[0].1).as_secs_f64();
    let worth = (rate * ONE_FAILOVER.as_secs_f64()).ceil() as usize;
    eprintln!(
        "adoption: {} requests, {} failed (one failover's worth at {rate:.0} req/s: {worth}), \
         longest gap {:?}, slowest request {:?}",
        total.requests, total.failed, total.gap, total.slowest
    );
    assert!(
        baseline.failed == 0 && baseline.requests > 20,
        "{baseline:?}"
    );
    assert!(
        total.failed <= worth,
        "{} requests failed during the adoption, more than one failover's worth ({worth})",
        total.failed
    );

    // The adopted cluster: three voters, the VIP on h1 only, and a
    // leadership transfer moves it within bulwark's fencing.
    let members = a
        .api(0)
        .list_members(lb::ListMembersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(
        members
            .iter()
            .filter(|m| m.role == lb::MemberRole::Voter as i32)
            .count(),
        3,
        "{members:?}"
    );
    a.api(0)
        .transfer_leadership(lb::TransferLeadershipRequest { to_node_id: None })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = holders_of(&hosts, vip.ip());
        if h.len() == 1 && h[0] != 0 && echo(&a.client(), vip, Duration::from_secs(1)).await {
            eprintln!("after a transfer the VIP is on h{}", h[0] + 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VIP did not move off h1: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop_sweep.store(true, Ordering::Relaxed);
    let sweeps = sweeper.join().unwrap();
    let two = sweeps.iter().filter(|h| h.len() > 1).count();
    eprintln!("ip addr sweeps: {}, with two holders: {two}", sweeps.len());
    assert!(sweeps.len() > 100, "{}", sweeps.len());
    assert_eq!(two, 0, "two hosts held the VIP at once");
    echo_server.abort();
}
