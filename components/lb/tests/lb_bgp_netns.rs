//! bgp mode against a real router: BIRD 2 (Debian's `bird2`, installed by
//! `cargo xtask setup`) on a network-namespace lab. Root only; skipped
//! without it, failed instead with BULWARK_REQUIRE_PRIVILEGED=1.
//!
//! ```text
//!   h1 h2 h3: bulwark-lb, bgp mode, AS 65010, VIP 10.255.0.10 bound on lo
//!      |  eBGP to 198.18.0.4 (hold time 3s)
//!   br0 (the lab's bridge, 198.18.0.0/24)
//!      |
//!   h4: bird (AS 65000), forwards; exports what it learns to its kernel
//!      |  veth 10.99.0.0/30
//!   h5: the client, whose only route to the VIP is via h4
//! ```
//!
//! The dual-stack variant adds an IPv6 VIP (`fd00:255::10`, announced as a
//! /128 in MP_REACH_NLRI over IPv6 sessions to `fd00:18::4`); both routes
//! must move together. Its IPv4 sessions carry a TCP MD5 password.
//!
//! The VIP is outside every link's subnet, so nothing reaches it by ARP:
//! only the route the holder announces brings the client's connections to
//! it. A link cut of the holder, a SIGKILL and a SIGSTOP of it must each move the
//! route (`birdc show route` in the router's namespace) to the new holder
//! and the client must reach the VIP through it; meanwhile a sampler reads
//! the router's RIB and every host's `lo`, and no sample may show routes
//! via two hosts that both hold the VIP (two live holders announced at
//! once).
//!
//! The partition trials run the jepsen schedule of lb_jepsen.rs (shared in
//! tests/jepsen/mod.rs: the leader isolated from its peers while its
//! session to the router stays up, a 1|2 split, one-way, link flaps, kills
//! and restarts; seeded, replayable with `BULWARK_JEPSEN_SEED`, more trials
//! with `BULWARK_JEPSEN_TRIALS`) with the same sampler as the witness. It
//! counts instants with routes via two hosts, with a stale route (via a
//! dead or restarting node, or one that no longer has the VIP — a killed
//! holder's route may linger until the hold timer), and with routes via two
//! live holders, which must never happen; a route stale for longer than
//! [`STALE_ROUTE_GRACE`] fails the trial. After healing, one route via the
//! one holder, the client reaching the VIP, every node agreeing on the
//! holder; the figures (samples, instants, convergence time) are printed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_api::lb::v1 as lb;
use bulwark_common::tls::TlsMaterial;
use bulwark_lb::config::{BgpConfig, VipMode};
use bulwark_testkit::cluster::lab::{api_via, echo};
use bulwark_testkit::cluster::{LbSpec, lb_process, test_timers};
use bulwark_testkit::config;
use bulwark_testkit::{Host, Lab, Pki, Process, ProcessBuilder, TestDir, tools};
use jepsen::{Life, NODES, Rng, SEED_ENV, STEPS_ENV, Target, classify, schedule};

mod jepsen;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, 0x10);
const VIP_PORT: u16 = 6443;
const BACKEND_PORT: u16 = 8443;
const LB_ASN: u32 = 65010;
const ROUTER_ASN: u32 = 65000;
/// The router's side of the client link.
const ROUTER_CLIENT_SIDE: &str = "10.99.0.1";
const CLIENT_ADDR: &str = "10.99.0.2";
/// The dual-stack lab's IPv4 sessions are TCP-MD5 signed with this key
/// (both sides), its IPv6 ones are not.
const PASSWORD: &str = "bulwark-md5";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_bgp_cut_leader_link_moves_the_route() {
    trial(Trial::CutLink, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_bgp_killed_leader_moves_the_route() {
    trial(Trial::Kill, false).await;
}

/// A frozen holder (SIGSTOP) cannot withdraw: the router keeps its route
/// until the hold timer expires (the documented worst case). Woken up
/// (SIGCONT) long after its lease, it must not announce again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_bgp_frozen_leader_loses_the_route_and_does_not_take_it_back() {
    trial(Trial::Freeze, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_bgp_dual_stack_killed_leader_moves_both_routes() {
    trial(Trial::Kill, true).await;
}

/// CI's partition trials, [`jepsen::DEFAULT_STEPS`] faults each (the first
/// six one of each kind). The second starts with a long link flap of the
/// holder, so its route lingers beside the new holder's until bird's hold
/// timer: the witness sees two routes, one stale, and must not count them
/// as two live holders. `BULWARK_JEPSEN_SEED` / `BULWARK_JEPSEN_TRIALS` /
/// `BULWARK_JEPSEN_STEPS` replay one or run more.
const CI_SEEDS: &[u64] = &[0x6267_7073_656e_0001, 0x6267_7073_656e_05ed];
/// How long the cluster has to converge after healing.
const SETTLE: Duration = Duration::from_secs(30);

/// Jepsen-style partition trials in bgp mode (see the module doc): a
/// seeded schedule of partitions, link flaps and kills, with the RIB
/// witness sampling throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_bgp_jepsen_partitions_never_route_to_two_live_holders() {
    let steps = jepsen::steps();
    let seeds = jepsen::seeds(CI_SEEDS);
    for (n, &seed) in seeds.iter().enumerate() {
        eprintln!(
            "bgp jepsen: trial {}/{} seed {seed:#x} (replay: {SEED_ENV}={seed} {STEPS_ENV}={steps})",
            n + 1,
            seeds.len()
        );
        let Some(figures) = partition_trial(seed, steps).await else {
            return; // skipped: no root
        };
        println!("bgp jepsen: trial {} seed {seed:#x}: {figures}", n + 1);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trial {
    CutLink,
    Kill,
    Freeze,
}

/// Three LB hosts, the router and the client, with bird and the LB nodes
/// running.
struct BgpLab {
    lab: Lab,
    nodes: Vec<Process>,
    bird_socket: std::path::PathBuf,
    /// The VIP's addresses: IPv4, and IPv6 when dual-stack.
    vips: Vec<IpAddr>,
    operator: TlsMaterial,
    _bird: Process,
    /// The certificates the nodes read at start (its directory must
    /// outlive them).
    _pki: Pki,
    _dir: TestDir,
    backend: tokio::task::JoinHandle<()>,
}

impl Drop for BgpLab {
    fn drop(&mut self) {
        self.backend.abort();
    }
}

impl BgpLab {
    async fn start(dual: bool) -> Option<Self> {
        bulwark_testkit::install_crypto_provider();
        let lab = Lab::start_or_skip(5).unwrap()?;
        let dir = TestDir::new("lb-bgp").unwrap();
        let pki = Pki::new().unwrap();
        let operator = config::tls(&pki.admin().unwrap()).load().unwrap();
        let (router, client) = (lab.host(3).clone(), lab.host(4).clone());
        wire_client_behind_router(&lab, &router, &client, dual);

        // The backend: an echo server on the client host's bridge address
        // (the LB hosts reach it directly).
        let backend_addr = SocketAddr::new(IpAddr::V4(client.addr()), BACKEND_PORT);
        let listener = client.tcp_listener(backend_addr).unwrap();
        let backend = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });

        let bird_socket = dir.join("bird.ctl");
        let bird = start_bird(&lab, &router, &dir, &bird_socket, dual);
        let nodes = (0..3)
            .map(|i| start_lb(&lab, i, &pki, &dir, backend_addr, &router, dual))
            .collect();
        let mut vips = vec![IpAddr::V4(VIP)];
        if dual {
            vips.push(IpAddr::V6(VIP6));
        }
        Some(Self {
            lab,
            nodes,
            bird_socket,
            vips,
            operator,
            _bird: bird,
            _pki: pki,
            _dir: dir,
            backend,
        })
    }

    /// The LB hosts, in node order.
    fn lb_hosts(&self) -> Vec<Host> {
        (0..NODES).map(|i| self.lab.host(i).clone()).collect()
    }

    fn router(&self) -> &Host {
        self.lab.host(3)
    }

    fn client(&self) -> &Host {
        self.lab.host(4)
    }

    /// The next hops the router's RIB has for each VIP address (every
    /// route, best first), or `None` if birdc did not answer.
    fn ribs(&self) -> Option<Vec<Vec<IpAddr>>> {
        self.vips
            .iter()
            .map(|v| rib(self.router(), &self.bird_socket, *v))
            .collect()
    }

    /// Waits until the router has exactly one route for each VIP address,
    /// all via one host other than `not` that has the VIP on `lo`, and the
    /// client gets an echo through every VIP address. Returns that host.
    async fn wait_for_route(&self, not: Option<usize>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let hosts = self.lb_hosts();
        loop {
            let ribs = self.ribs().unwrap_or_default();
            let hops: Vec<Option<usize>> = ribs
                .iter()
                .map(|r| match r.as_slice() {
                    [hop] => host_of(&hosts, *hop),
                    _ => None,
                })
                .collect();
            let holder = match hops.first() {
                Some(Some(h))
                    if ribs.len() == self.vips.len()
                        && hops.iter().all(|x| *x == Some(*h))
                        && Some(*h) != not
                        && holds(&hosts[*h], &self.vips) =>
                {
                    Some(*h)
                }
                _ => None,
            };
            if let Some(h) = holder {
                let mut answered = true;
                for v in &self.vips {
                    let vip = SocketAddr::new(*v, VIP_PORT);
                    answered &= echo(self.client(), vip, Duration::from_millis(500)).await;
                }
                if answered {
                    return h;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no single route to a holder within {timeout:?}: RIBs {ribs:?}\nbird:\n{}",
                self.router()
                    .exec(
                        "birdc",
                        [
                            "-s",
                            &self.bird_socket.display().to_string(),
                            "show",
                            "protocols",
                            "all"
                        ]
                    )
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Node `i`'s status over the API, from the client host.
    async fn status(&self, i: usize) -> Option<lb::GetStatusResponse> {
        let addr = SocketAddr::new(IpAddr::V4(self.lab.host(i).addr()), 9442);
        let mut c = api_via(self.client(), addr, &self.operator);
        tokio::time::timeout(
            Duration::from_secs(2),
            c.get_status(lb::GetStatusRequest::default()),
        )
        .await
        .ok()?
        .ok()
        .map(|r| r.into_inner())
    }
}

/// A veth from the router to the client; the client's route to the VIP
/// (and only route off its link) goes through the router, and the LB
/// hosts route the client's link back through it too. Dual-stack: the same
/// in IPv6 (`fd00:99::/64`).
fn wire_client_behind_router(lab: &Lab, router: &Host, client: &Host, dual: bool) {
    let ip = |h: &Host, args: &[&str]| {
        h.exec_ok("ip", args).unwrap();
    };
    ip(
        router,
        &[
            "link",
            "add",
            "rt0",
            "type",
            "veth",
            "peer",
            "name",
            "cl0",
            "netns",
            client.netns(),
        ],
    );
    ip(
        router,
        &[
            "addr",
            "add",
            &format!("{ROUTER_CLIENT_SIDE}/30"),
            "dev",
            "rt0",
        ],
    );
    ip(router, &["link", "set", "rt0", "up"]);
    router
        .exec_ok("sysctl", ["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    ip(
        client,
        &["addr", "add", &format!("{CLIENT_ADDR}/30"), "dev", "cl0"],
    );
    ip(client, &["link", "set", "cl0", "up"]);
    ip(
        client,
        &[
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            ROUTER_CLIENT_SIDE,
        ],
    );
    let router4 = router.addr().to_string();
    for i in 0..3 {
        ip(
            lab.host(i),
            &["route", "add", "10.99.0.0/30", "via", &router4],
        );
    }
    if !dual {
        return;
    }
    router
        .exec_ok("sysctl", ["-qw", "net.ipv6.conf.all.forwarding=1"])
        .unwrap();
    ip(
        router,
        &["addr", "add", "fd00:99::1/64", "dev", "rt0", "nodad"],
    );
    ip(
        client,
        &["addr", "add", "fd00:99::2/64", "dev", "cl0", "nodad"],
    );
    ip(
        client,
        &[
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            "fd00:99::1",
        ],
    );
    let router6 = router.addr6().to_string();
    for i in 0..3 {
        ip(
            lab.host(i),
            &["-6", "route", "add", "fd00:99::/64", "via", &router6],
        );
    }
}

/// bird in the router's namespace: eBGP with each LB host, everything
/// learned exported to the kernel (so the router forwards to the holder).
/// Short timers: the LB side proposes 3s hold time; after an error bird
/// would wait a minute before talking to that peer again. Dual-stack: a
/// second session per host over IPv6, with an IPv6 channel.
fn start_bird(
    lab: &Lab,
    router: &Host,
    dir: &TestDir,
    socket: &std::path::Path,
    dual: bool,
) -> Process {
    let bird = tools::system("bird").expect("bird (Debian bird2; cargo xtask setup installs it)");
    let mut peers: String = (0..3)
        .map(|i| {
            format!(
                "protocol bgp lb{n} from lb {{ neighbor {addr} as {LB_ASN};{pw} }}\n",
                pw = if dual {
                    format!(" password \"{PASSWORD}\";")
                } else {
                    String::new()
                },
                n = i + 1,
                addr = lab.host(i).addr()
            )
        })
        .collect();
    if dual {
        peers.push_str(&format!(
            "protocol kernel {{ ipv6 {{ import none; export all; }}; }}
template bgp lb6 {{
  local {rid6} as {ROUTER_ASN};
  hold time 3;
  keepalive time 1;
  connect retry time 1;
  error wait time 1, 2;
  ipv6 {{ import all; export none; }};
}}
",
            rid6 = router.addr6()
        ));
        for i in 0..3 {
            peers.push_str(&format!(
                "protocol bgp lb{n}v6 from lb6 {{ neighbor {addr} as {LB_ASN}; }}\n",
                n = i + 1,
                addr = lab.host(i).addr6()
            ));
        }
    }
    let config = dir.join("bird.conf");
    std::fs::write(
        &config,
        format!(
            "router id {rid};
log \"{log}\" all;
protocol device {{ scan time 1; }}
protocol kernel {{ ipv4 {{ import none; export all; }}; }}
template bgp lb {{
  local {rid} as {ROUTER_ASN};
  hold time 3;
  keepalive time 1;
  connect retry time 1;
  error wait time 1, 2;
  ipv4 {{ import all; export none; }};
}}
{peers}",
            rid = router.addr(),
            log = dir.join("bird.log").display(),
        ),
    )
    .unwrap();
    let process = router
        .spawn(
            ProcessBuilder::new("bird", bird)
                .arg("-f")
                .arg("-c")
                .arg(&config)
                .arg("-s")
                .arg(socket),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rib(router, socket, IpAddr::V4(VIP)).is_none() {
        assert!(
            Instant::now() < deadline,
            "bird did not come up: {}",
            process.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    process
}

fn start_lb(
    lab: &Lab,
    i: usize,
    pki: &Pki,
    dir: &TestDir,
    backend: SocketAddr,
    router: &Host,
    dual: bool,
) -> Process {
    let host = lab.host(i);
    let id = i + 1;
    let a = host.addr();
    let spec = LbSpec {
        pki,
        dir: dir.path(),
        members: (0..3)
            .map(|j| {
                let (a, n) = (IpAddr::V4(lab.host(j).addr()), j as u64 + 1);
                let (raft, api) = (SocketAddr::new(a, 9441), SocketAddr::new(a, 9442));
                config::lb_member(n, &format!("lb-{n}"), "", raft, api)
            })
            .collect(),
    };
    let sans = [a.to_string(), host.addr6().to_string()];
    let (mut c, _) = spec.node(id as u64, &[&sans[0], &sans[1]]).unwrap();
    c.admin.address = SocketAddr::from(([127, 0, 0, 1], 9440));
    c.vip.mode = VipMode::Bgp;
    c.vip.address = Some(IpAddr::V4(VIP));
    c.vip.address6 = dual.then_some(IpAddr::V6(VIP6));
    c.vip.port = VIP_PORT;
    let mut peer4 = config::bgp_peer(IpAddr::V4(router.addr()), ROUTER_ASN);
    peer4.password = dual.then(|| PASSWORD.to_owned());
    let mut peers = vec![peer4];
    if dual {
        peers.push(config::bgp_peer(IpAddr::V6(router.addr6()), ROUTER_ASN));
    }
    c.vip.bgp = Some(BgpConfig {
        local_asn: LB_ASN,
        router_id: None,
        peers,
    });
    c.backends = vec![config::lb_backend("api-1", backend, "")];
    test_timers(&mut c);
    let config = spec.write(&c).unwrap();
    // The config an operator would write passes --check-config cleanly
    // (on the node: the interface check runs there).
    let bin = tools::bin_path("bulwark-lb").unwrap();
    let check = host
        .exec(
            &bin.display().to_string(),
            ["--check-config", "--config", &config.display().to_string()],
        )
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        check.status.success() && !said.contains("warning"),
        "--check-config: {said}"
    );
    host.spawn(lb_process(&format!("lb-{id}"), &config).unwrap())
        .unwrap()
}

/// `birdc show route for <vip>`: the next hop of every route, best first.
fn rib(router: &Host, socket: &std::path::Path, vip: IpAddr) -> Option<Vec<IpAddr>> {
    let out = router
        .exec(
            "birdc",
            [
                "-s",
                &socket.display().to_string(),
                "show",
                "route",
                "for",
                &vip.to_string(),
            ],
        )
        .ok()?;
    // birdc exits 1 for "Network not found" (no route): only a missing
    // greeting means bird did not answer.
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains(" ready.") {
        return None;
    }
    Some(
        text.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect(),
    )
}

/// Which of `hosts` has `hop` as its bridge address (either family).
fn host_of(hosts: &[Host], hop: IpAddr) -> Option<usize> {
    hosts
        .iter()
        .position(|h| IpAddr::V4(h.addr()) == hop || IpAddr::V6(h.addr6()) == hop)
}

/// Whether `host` has any of `vips` on `lo` (bound by a holder).
fn holds(host: &Host, vips: &[IpAddr]) -> bool {
    host.exec_ok("ip", ["-o", "addr", "show", "dev", "lo"])
        .is_ok_and(|out| vips.iter().any(|v| out.contains(&format!(" {v}/"))))
}

/// What the sampler saw.
#[derive(Debug, Default)]
struct Witness {
    samples: u64,
    /// Samples whose RIB had routes via two different hosts (either
    /// family), live holders or not.
    two_routes: u64,
    /// Samples with a route via a host that was no live holder: dead,
    /// stopped, restarting, or no longer holding the VIP (its withdrawal
    /// or the router's hold timer still to come).
    stale: u64,
    /// Violations, with what was seen: routes via two live holders at
    /// once, or a stale route the hold timer should have removed.
    double: Vec<String>,
    /// The most routes the RIB had at once.
    max_routes: usize,
}

/// How long the router may keep routing to a host that is no live holder:
/// the hold time (3s) bird applies when nothing withdraws the route (a
/// dead or frozen process, a cut link), plus margin for a loaded machine.
/// A live node that released the VIP withdraws at once.
const STALE_ROUTE_GRACE: Duration = Duration::from_secs(5);

/// What the sampler thread reads: the router and the LB hosts.
struct View {
    router: Host,
    socket: std::path::PathBuf,
    hosts: Vec<Host>,
    vips: Vec<IpAddr>,
}

/// Samples the router's RIB for every VIP address, then the `lo` of every
/// LB host it routes to, until `stop`. Two live holders routed to at once,
/// in one family or across the two of a dual-stack VIP, is a violation. A
/// host whose node `life` says is dead (SIGKILLed or stopped: its address
/// lingers until its kernel lifetime ends, its route until the router's
/// hold timer, but nothing serves it) or restarting is not a live holder;
/// a route via such a host, or via one that no longer has the VIP, is
/// stale, and a violation once it outlives [`STALE_ROUTE_GRACE`].
fn sample(v: &View, life: &Mutex<Vec<Life>>, stop: &AtomicBool) -> Witness {
    let mut w = Witness::default();
    let mut stale_since: Vec<Option<Instant>> = vec![None; v.hosts.len()];
    while !stop.load(Ordering::Relaxed) {
        // RIB first: a route seen here was announced before the `ip addr`
        // below, so a host holding then and routed to now is a holder the
        // router sends traffic to.
        let Some(ribs) = v
            .vips
            .iter()
            .map(|vip| rib(&v.router, &v.socket, *vip))
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let mut routed: Vec<usize> = ribs
            .iter()
            .flatten()
            .filter_map(|hop| host_of(&v.hosts, *hop))
            .collect();
        routed.sort_unstable();
        routed.dedup();
        let holding: Vec<usize> = routed
            .iter()
            .copied()
            .filter(|&h| holds(&v.hosts[h], &v.vips))
            .collect();
        let live = classify(life, &holding);
        w.samples += 1;
        w.two_routes += u64::from(routed.len() > 1);
        w.stale += u64::from(live.len() < routed.len());
        w.max_routes = w
            .max_routes
            .max(ribs.iter().map(Vec::len).max().unwrap_or(0));
        if live.len() > 1 {
            w.double
                .push(format!("RIBs {ribs:?}, live holders {live:?}"));
        }
        for (h, since) in stale_since.iter_mut().enumerate() {
            if !routed.contains(&h) || live.contains(&h) {
                *since = None;
                continue;
            }
            let first = *since.get_or_insert_with(Instant::now);
            if first.elapsed() > STALE_ROUTE_GRACE {
                w.double.push(format!(
                    "RIBs {ribs:?}: still routed via h{} {:?} after it stopped being a live holder",
                    h + 1,
                    first.elapsed()
                ));
                *since = None;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    w
}

/// Runs [`sample`] on a thread until [`Sampler::finish`].
struct Sampler {
    stop: Arc<AtomicBool>,
    life: Arc<Mutex<Vec<Life>>>,
    thread: std::thread::JoinHandle<Witness>,
}

impl Sampler {
    fn start(l: &BgpLab) -> Self {
        let view = View {
            router: l.router().clone(),
            socket: l.bird_socket.clone(),
            hosts: l.lb_hosts(),
            vips: l.vips.clone(),
        };
        let life = Arc::new(Mutex::new(vec![Life::Alive(Instant::now()); NODES]));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (life, stop) = (life.clone(), stop.clone());
            std::thread::spawn(move || sample(&view, &life, &stop))
        };
        Self { stop, life, thread }
    }

    fn set(&self, node: usize, life: Life) {
        self.life.lock().unwrap()[node] = life;
    }

    fn finish(self) -> Witness {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// What each of node `i`'s sessions should announce: the holder the VIP
/// address of the session's family, the others nothing.
fn expected_announced(peer: &lb::BgpPeer, holder: bool) -> Vec<String> {
    if !holder {
        return Vec::new();
    }
    if peer.address.starts_with('[') {
        vec![format!("{VIP6}/128")]
    } else {
        vec![format!("{VIP}/32")]
    }
}

async fn trial(kind: Trial, dual: bool) {
    let Some(mut l) = BgpLab::start(dual).await else {
        return;
    };
    let old = l.wait_for_route(None, Duration::from_secs(30)).await;

    // Status: the holder announces the host route to each established
    // session (of that session's family); followers keep theirs up and
    // announce nothing.
    for i in 0..3 {
        let bgp = l
            .status(i)
            .await
            .and_then(|s| s.vip?.bgp)
            .expect("status with bgp");
        assert_eq!(bgp.peers.len(), l.vips.len());
        for peer in &bgp.peers {
            assert_eq!(
                peer.state,
                lb::BgpSessionState::Established as i32,
                "node {i}: {peer:?}"
            );
            assert_eq!(
                peer.announced,
                expected_announced(peer, i == old),
                "node {i}"
            );
        }
        if i == old {
            let reason = bgp.last_announce.map(|e| e.reason).unwrap_or_default();
            assert!(reason.contains("quorum lease"), "{reason}");
        }
    }

    let sampler = Sampler::start(&l);
    // Let the sampler see the steady state first.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    match kind {
        Trial::CutLink => l.lab.cut_link(l.lab.host(old)).unwrap(),
        Trial::Kill => {
            l.nodes[old].kill().unwrap();
            sampler.set(old, Life::Dead(Instant::now()));
        }
        Trial::Freeze => {
            // Frozen, it serves nothing: not a live holder while stopped.
            l.nodes[old].signal(libc::SIGSTOP).unwrap();
            sampler.set(old, Life::Dead(Instant::now()));
        }
    }
    // A cut link or a frozen process cannot withdraw: the router drops
    // the old route when its hold timer (3s) runs out, and until then may
    // prefer it. A killed process's socket closes at once and the route
    // goes with it.
    let new = l.wait_for_route(Some(old), Duration::from_secs(20)).await;
    let moved = started.elapsed();
    if kind == Trial::Freeze {
        // Wake it well after its lease: it is live again, must release
        // whatever it thinks it holds and announce nothing, while its
        // sessions come back (the router dropped them on its hold timer).
        sampler.set(old, Life::Alive(Instant::now()));
        l.nodes[old].signal(libc::SIGCONT).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let peers = l
                .status(old)
                .await
                .and_then(|s| s.vip?.bgp)
                .map(|b| b.peers)
                .unwrap_or_default();
            if !peers.is_empty()
                && peers.iter().all(|p| {
                    p.state == lb::BgpSessionState::Established as i32 && p.announced.is_empty()
                })
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the woken node's sessions did not come back announcing nothing: {peers:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Keep sampling a little past the move.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let w = sampler.finish();
    println!(
        "{kind:?} (dual-stack: {dual}): route moved from lb-{} to lb-{} in {moved:?}; {} RIB samples ({} with routes via two hosts, {} with a stale route), at most {} routes at once",
        old + 1,
        new + 1,
        w.samples,
        w.two_routes,
        w.stale,
        w.max_routes
    );
    assert!(w.samples > 10, "too few samples: {w:?}");
    assert!(
        w.double.is_empty(),
        "routes via two live holders at once: {:?}",
        w.double
    );
    let host = l.lab.host(new);
    let want: Vec<Vec<IpAddr>> = l
        .vips
        .iter()
        .map(|v| {
            vec![if v.is_ipv4() {
                IpAddr::V4(host.addr())
            } else {
                IpAddr::V6(host.addr6())
            }]
        })
        .collect();
    assert_eq!(
        l.ribs(),
        Some(want),
        "one route per family, via the new holder"
    );
    let bgp = l
        .status(new)
        .await
        .and_then(|s| s.vip?.bgp)
        .expect("status of the new holder");
    for peer in &bgp.peers {
        assert_eq!(peer.announced, expected_announced(peer, true));
    }
}

/// The figures of one partition trial.
struct TrialFigures {
    faults: BTreeMap<&'static str, u64>,
    witness: Witness,
    /// From healing to one route via the one holder, answering the client,
    /// with every node agreeing on it.
    converged: Duration,
}

impl fmt::Display for TrialFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.witness;
        write!(
            f,
            "faults {:?}; {} RIB samples, {} with routes via two hosts, {} with a stale route \
             (dead, restarting or released holder), {} with two live holders, at most {} routes; \
             converged {:?} after healing",
            self.faults,
            w.samples,
            w.two_routes,
            w.stale,
            w.double.len(),
            w.max_routes,
            self.converged
        )
    }
}

/// Which of `hosts` have any of `vips` on `lo` (the bgp holders).
fn holders_on_lo(hosts: &[Host], vips: &[IpAddr]) -> Vec<usize> {
    (0..hosts.len())
        .filter(|&i| holds(&hosts[i], vips))
        .collect()
}

/// One partition trial with `seed`; `None` when the lab cannot run here.
/// Panics on a violation or if the cluster does not converge.
async fn partition_trial(seed: u64, steps: usize) -> Option<TrialFigures> {
    let mut l = BgpLab::start(false).await?;
    l.wait_for_route(None, SETTLE).await;
    let sampler = Sampler::start(&l);
    let t0 = Instant::now();
    let hosts = l.lb_hosts();
    let mut faults = BTreeMap::new();
    let mut r = Rng::new(seed ^ 0x466c_6170);
    let mut target = Target {
        lab: &l.lab,
        nodes: &mut l.nodes,
        hosts: &hosts,
        vips: &l.vips,
        life: &sampler.life,
        holders: holders_on_lo,
    };
    for (n, step) in schedule(seed, steps).iter().enumerate() {
        let kind = target.run_step(n, step, &mut r, t0).await;
        *faults.entry(kind).or_default() += 1;
    }
    eprintln!("bgp jepsen {:>6.1?}: healing", t0.elapsed());
    let healed = Instant::now();
    target.heal_everything();
    let holder = l.wait_for_route(None, SETTLE).await;
    agree_on(&l, holder, healed + SETTLE).await;
    let converged = healed.elapsed();
    // Keep sampling the healed state a little.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let witness = sampler.finish();
    assert!(
        witness.double.is_empty(),
        "seed {seed:#x}: the RIB routed to two live holders, or kept a stale route: {:#?}",
        witness.double
    );
    assert!(witness.samples > 50, "too few samples: {witness:?}");
    assert_eq!(
        l.ribs(),
        Some(vec![vec![IpAddr::V4(hosts[holder].addr())]]),
        "one route, via the holder"
    );
    Some(TrialFigures {
        faults,
        witness,
        converged,
    })
}

/// Waits until every node names `holder` as leader and VIP holder, has its
/// sessions established, and only the holder announces (the VIP /32).
async fn agree_on(l: &BgpLab, holder: usize, deadline: Instant) {
    let want = Some(holder as u64 + 1);
    loop {
        let mut last = None;
        for i in 0..NODES {
            let s = l.status(i).await;
            let ok = s.as_ref().is_some_and(|s| {
                let bgp = s.vip.as_ref().and_then(|v| v.bgp.as_ref());
                s.leader.as_ref().map(|n| n.id) == want
                    && s.vip.as_ref().and_then(|v| v.holder_node_id) == want
                    && bgp.is_some_and(|b| {
                        !b.peers.is_empty()
                            && b.peers.iter().all(|p| {
                                p.state == lb::BgpSessionState::Established as i32
                                    && p.announced == expected_announced(p, i == holder)
                            })
                    })
            });
            if !ok {
                last = Some((i, s));
                break;
            }
        }
        let Some((i, s)) = last else {
            return;
        };
        assert!(
            Instant::now() < deadline,
            "after healing, node {i} does not agree that h{} holds the VIP: {s:?}",
            holder + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
