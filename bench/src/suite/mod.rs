//! Scenario `suite` (`cargo xtask bench [SCENARIO...] [--quick]`): failover
//! scenarios in network namespaces, bulwark and the keepalived + HAProxy
//! baseline one after the other on the same topology in the same run.
//!
//! Topology (one bridge, root only): three LB hosts (zones a, b, c), three
//! fixture apiservers (the testkit's kube-apiserver test double) on their
//! own hosts in zones a, b, c, a client host running the load driver
//! (`load.rs`), and a router host (BIRD, the testkit's bgp lab) with a
//! second link to the client host, through which the client reaches the
//! bgp-mode VIP. Per scenario and contender: start the front, start the
//! load, wait until every watcher has its stream, run `before`, inject the
//! fault(s) on the schedule, run `after`, stop the load, heal the lab,
//! stop the front. The contenders' order alternates between scenarios;
//! `link-cut` and `sigkill` also run bulwark in bgp mode, beside arp mode
//! in the same run.
//!
//! What is measured, and how, is in `analysis.rs`; the report and plots in
//! `report.rs`. The `distribution` scenario (how evenly the fronts spread
//! connections and requests over the apiservers, and how fast a restarted
//! apiserver gets its share back, with and without the apiservers'
//! goaway chance) has its own run and figures in `distribution.rs`.

mod analysis;
mod distribution;
pub mod load;
mod report;
mod stack;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bulwark_testkit::cluster::bgp;
use bulwark_testkit::fixture::ApiServerProcess;
use bulwark_testkit::{Host, Lab, Pki, Process, ProcessBuilder, TestDir};
use serde::Serialize;

use self::analysis::RunResult;
use self::load::now_ns;
use self::stack::{Stack, Vip, clear_vip, holders, wait_single_holder};

/// The VIP's port (also the apiservers').
pub const VIP_PORT: u16 = 6443;
/// The zones, in host order.
pub const ZONES: [&str; 3] = ["a", "b", "c"];

/// The scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// The VIP holder's link is cut (cable pulled); bulwark in arp and in
    /// bgp mode.
    LinkCut,
    /// The VIP holder's front is SIGKILLed (bulwark-lb in arp and in bgp
    /// mode; keepalived and HAProxy for the baseline).
    Sigkill,
    /// The VIP holder is partitioned from the other LB hosts but still
    /// reachable by clients and apiservers.
    Partition,
    /// One apiserver is SIGKILLed.
    ApiserverKill,
    /// One apiserver shuts down gracefully (SIGTERM: /readyz fails, then
    /// the listener closes after its shutdown delay).
    ApiserverShutdown,
    /// A whole zone goes dark: the VIP holder's LB host and the apiserver
    /// host of the same zone lose their links.
    ZoneOutage,
    /// Every LB node in turn is stopped (SIGTERM) and started again.
    RollingRestart,
    /// The prober of a zone whose LB node does not hold the VIP loses the
    /// apiservers (its host is partitioned from them; it still reaches the
    /// LB cluster): its "all down" must not evict healthy backends. For
    /// the baseline the same host loses the apiservers (its HAProxy).
    ProberIsolated,
    /// Many long-lived watch clients, then the holder's link is cut: time
    /// until every watch stream is re-established.
    ReconnectStorm,
    /// The reconnect storm's floor: the same watch clients, and the load
    /// driver drops every client connection at once (SIGUSR1) while the
    /// front stays healthy. No failover and no detection: the time until
    /// all are back is what the clients, the front and the apiservers
    /// need to re-establish them on this machine.
    StormReset,
    /// Watch streams and short requests through the VIP: each apiserver's
    /// share of connections and requests, watches lost when one is
    /// SIGKILLed, and the time until it carries its share again after a
    /// restart, with the apiservers' goaway chance off and on.
    Distribution,
}

impl Scenario {
    const ALL: [Scenario; 11] = [
        Scenario::LinkCut,
        Scenario::Sigkill,
        Scenario::Partition,
        Scenario::ApiserverKill,
        Scenario::ApiserverShutdown,
        Scenario::ZoneOutage,
        Scenario::RollingRestart,
        Scenario::ProberIsolated,
        Scenario::ReconnectStorm,
        Scenario::StormReset,
        Scenario::Distribution,
    ];

    /// The kebab-case name.
    pub fn key(self) -> &'static str {
        match self {
            Scenario::LinkCut => "link-cut",
            Scenario::Sigkill => "sigkill",
            Scenario::Partition => "partition",
            Scenario::ApiserverKill => "apiserver-kill",
            Scenario::ApiserverShutdown => "apiserver-shutdown",
            Scenario::ZoneOutage => "zone-outage",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::ProberIsolated => "prober-isolated",
            Scenario::ReconnectStorm => "reconnect-storm",
            Scenario::StormReset => "storm-reset",
            Scenario::Distribution => "distribution",
        }
    }

    /// The fronts that run this scenario, in the order of the `n`-th
    /// scenario of a run (alternating). bgp mode runs where the VIP moves
    /// because its holder is gone, next to arp mode.
    fn contenders(self, n: usize) -> Vec<Contender> {
        let mut v = vec![Contender::Bulwark];
        if matches!(self, Scenario::LinkCut | Scenario::Sigkill) {
            v.push(Contender::BulwarkBgp);
        }
        v.push(Contender::Baseline);
        if n % 2 == 1 {
            v.reverse();
        }
        v
    }

    /// Whether it runs with the storm's many watch clients.
    fn is_storm(self) -> bool {
        matches!(self, Scenario::ReconnectStorm | Scenario::StormReset)
    }

    /// One line for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Scenario::LinkCut => "the VIP holder's link is cut",
            Scenario::Sigkill => {
                "the VIP holder's front is SIGKILLed (bulwark-lb; keepalived + HAProxy)"
            }
            Scenario::Partition => {
                "the VIP holder is cut off from its LB peers, still reachable by clients"
            }
            Scenario::ApiserverKill => "apiserver in zone a is SIGKILLed",
            Scenario::ApiserverShutdown => {
                "apiserver in zone a shuts down gracefully (readyz fails, listener closes after the delay)"
            }
            Scenario::ZoneOutage => {
                "the holder's zone goes dark (its LB host and apiserver host lose their links)"
            }
            Scenario::RollingRestart => "each LB node in turn: SIGTERM, down 1 s, start, settle",
            Scenario::ProberIsolated => {
                "a non-holder LB host (with its zone's prober) loses the apiservers, keeps its LB peers"
            }
            Scenario::ReconnectStorm => {
                "many watch clients, then the holder's link is cut: time until all are back"
            }
            Scenario::StormReset => {
                "the reconnect storm's floor: its watch clients all drop their connections at once (the front healthy): time until all are back"
            }
            Scenario::Distribution => {
                "spread over the apiservers; apiserver a SIGKILLed and restarted: time until it carries its share"
            }
        }
    }
}

/// The fronts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    /// bulwark-lb, arp-mode VIP.
    Bulwark,
    /// bulwark-lb, bgp-mode VIP announced to the router (link-cut and
    /// sigkill only).
    BulwarkBgp,
    /// keepalived + HAProxy (kubeadm HA guide).
    Baseline,
}

impl Contender {
    /// Short name.
    pub fn key(self) -> &'static str {
        match self {
            Contender::Bulwark => "bulwark",
            Contender::BulwarkBgp => "bulwark-bgp",
            Contender::Baseline => "keepalived+haproxy",
        }
    }

    /// bulwark-lb, in either mode.
    pub fn is_bulwark(self) -> bool {
        self != Contender::Baseline
    }
}

/// Flags of `bulwark-bench suite`.
#[derive(clap::Args)]
pub struct Args {
    /// The scenarios to run, in this order; all when none is given.
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Short phases and fewer clients (the whole suite in a few minutes).
    #[arg(long)]
    quick: bool,
    /// Where the report goes (`<date>-suite[-full].md`, `.json`,
    /// `-<scenario>.svg`; `report.rs` has the naming).
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
    /// The apiservers' goaway chance in the `distribution` scenario's runs
    /// with it on (kube-apiserver's --goaway-chance, at most 0.02; the runs
    /// with it off always run too).
    #[arg(long, default_value_t = distribution::DEFAULT_GOAWAY_CHANCE)]
    goaway_chance: f64,
    /// bulwark-bgp runs with BFD on every session, ours and BIRD's
    /// (100 ms × 3, the daemon's default). Through `cargo xtask bench`:
    /// set the environment variable (`1`, `true`, `yes`).
    #[arg(
        long,
        env = "BULWARK_BENCH_BGP_BFD",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    bgp_bfd: bool,
}

/// Durations and client counts of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Params {
    /// Steady load before the first fault, s.
    pub before_s: f64,
    /// Load after the (last) fault, s.
    pub after_s: f64,
    /// "During" is this long from the first fault; "after" is the rest.
    pub during_s: f64,
    /// Watch clients.
    pub watchers: usize,
    /// Watch clients in the reconnect storm.
    pub storm_watchers: usize,
    /// Short-request clients and each one's rate.
    pub requesters: usize,
    pub rate: f64,
    /// Rolling restart: how long a node stays down, and the settle time
    /// before the next.
    pub restart_down_s: f64,
    pub restart_settle_s: f64,
}

impl Params {
    fn new(quick: bool) -> Self {
        if quick {
            Params {
                before_s: 4.0,
                after_s: 8.0,
                during_s: 4.0,
                watchers: 50,
                storm_watchers: 500,
                requesters: 8,
                rate: 20.0,
                restart_down_s: 1.0,
                restart_settle_s: 3.0,
            }
        } else {
            Params {
                before_s: 10.0,
                after_s: 20.0,
                during_s: 5.0,
                watchers: 200,
                storm_watchers: 5000,
                requesters: 16,
                rate: 20.0,
                restart_down_s: 1.0,
                restart_settle_s: 5.0,
            }
        }
    }
}

/// The lab: 3 LB hosts, 3 apiserver hosts, a client host, a router host.
pub struct Topology {
    pub lab: Lab,
    pub pki: Pki,
    pub apis: Vec<ApiServerProcess>,
    pub vip: Ipv4Addr,
    /// bgp mode: BFD on the sessions, ours and BIRD's (`--bgp-bfd`).
    pub bgp_bfd: bool,
    /// The apiservers' `--goaway-chance` now.
    pub goaway_chance: f64,
    ca: PathBuf,
    dir: TestDir,
}

impl Topology {
    async fn start() -> anyhow::Result<Self> {
        bulwark_testkit::install_crypto_provider();
        let Some(lab) = Lab::start_or_skip(8)? else {
            bail!("the suite needs root (network namespaces)");
        };
        // The client reaches the bgp-mode VIP only through the router (its
        // own link to it); the arp-mode VIP stays on the bridge.
        bgp::wire_client_behind_router(&lab.hosts()[..3], lab.host(7), lab.host(6), false)
            .context("wiring the client behind the router")?;
        let pki = Pki::new()?;
        let vip = lab.spare_addr(0);
        let mut apis = Vec::new();
        for i in 0..ZONES.len() {
            apis.push(start_api(&lab, &pki, vip, i, 0.0).await?);
        }
        // The reconnect storm: thousands of connects within a second from
        // the client host to the VIP, and as many from the front to the
        // apiservers. A namespace starts with the kernel's defaults
        // (28k ephemeral ports, SYN backlog 128 per listener at most
        // `tcp_max_syn_backlog`); widen them on every host, for both fronts
        // alike. The ports stay above every listener of the suite (6443,
        // 9441, 9442, BGP's 179): with the range from 1024, an outgoing
        // connection that happened to take 9442 as its source port made
        // the next bulwark-lb on that host fail to bind its API listener.
        for host in lab.hosts() {
            for setting in [
                "net.ipv4.ip_local_port_range=10000 65535",
                "net.ipv4.tcp_max_syn_backlog=8192",
                "net.core.somaxconn=8192",
            ] {
                host.exec_ok("sysctl", ["-q", "-w", setting])
                    .with_context(|| format!("sysctl {setting} on {}", host.name()))?;
            }
        }
        let dir = TestDir::new("suite")?;
        let ca = apis[0].ca_path().to_owned();
        Ok(Self {
            lab,
            pki,
            apis,
            vip,
            bgp_bfd: false,
            goaway_chance: 0.0,
            ca,
            dir,
        })
    }

    /// Replaces the apiservers with ones running with this goaway chance
    /// (same hosts, addresses and certificates' CA), unless they already do.
    async fn set_goaway_chance(&mut self, chance: f64) -> anyhow::Result<()> {
        if self.goaway_chance == chance {
            return Ok(());
        }
        for i in 0..self.apis.len() {
            self.apis[i].kill()?;
            self.apis[i] = start_api(&self.lab, &self.pki, self.vip, i, chance).await?;
        }
        self.goaway_chance = chance;
        Ok(())
    }

    /// The LB hosts (zones a, b, c).
    pub fn lb_hosts(&self) -> &[Host] {
        &self.lab.hosts()[..3]
    }

    /// The apiserver hosts (zones a, b, c).
    pub fn api_hosts(&self) -> &[Host] {
        &self.lab.hosts()[3..6]
    }

    /// The client host.
    pub fn client(&self) -> &Host {
        self.lab.host(6)
    }

    /// The router host (bird runs there in bgp-mode runs).
    pub fn router(&self) -> &Host {
        self.lab.host(7)
    }

    /// The VIP `contender` serves, and where its holder binds it.
    pub fn vip_of(&self, contender: Contender) -> Vip {
        match contender {
            Contender::BulwarkBgp => Vip {
                addr: bgp::VIP,
                on_lo: true,
            },
            Contender::Bulwark | Contender::Baseline => Vip {
                addr: self.vip,
                on_lo: false,
            },
        }
    }

    /// Undoes every fault: links up, partitions healed, apiservers running
    /// and serving.
    async fn heal(&mut self) -> anyhow::Result<()> {
        for h in self.lab.hosts() {
            self.lab.restore_link(h)?;
        }
        self.lab.heal_all()?;
        for api in &mut self.apis {
            let serving = api.process().is_running()
                && api
                    .stats()
                    .await
                    .is_ok_and(|s| s.phase == bulwark_testkit::fixture::Phase::Serving);
            if !serving {
                api.restart().await?;
            }
        }
        Ok(())
    }
}

/// Starts the apiserver of zone `i` on its host, on the VIP's port.
async fn start_api(
    lab: &Lab,
    pki: &Pki,
    vip: Ipv4Addr,
    i: usize,
    goaway_chance: f64,
) -> anyhow::Result<ApiServerProcess> {
    let zone = ZONES[i];
    let host = lab.host(3 + i);
    ApiServerProcess::builder(format!("api-{zone}"))
        .on_host(host)
        .listen(SocketAddr::new(IpAddr::V4(host.addr()), VIP_PORT))
        .san(vip.to_string())
        .san(bgp::VIP.to_string())
        .shutdown_delay(Duration::from_secs(3))
        .shutdown_grace(Duration::from_secs(5))
        .goaway_chance(goaway_chance)
        .start(pki)
        .await
        .with_context(|| format!("starting apiserver {zone}"))
}

/// A fault marker on the time line.
#[derive(Clone, Debug, Serialize)]
pub struct Marker {
    /// Unix ns.
    pub at_ns: u64,
    pub label: String,
}

/// (unix ns, the LB hosts holding the VIP from then on).
type HolderChanges = Vec<(u64, Vec<usize>)>;

/// Records the changes of what `probe` sees (every ~10 ms): which LB
/// hosts hold the VIP (`ip addr` on each), or which the router routes it
/// via (bgp mode). A probe that returns `None` (bird did not answer)
/// records nothing.
struct VipSampler {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<HolderChanges>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VipSampler {
    fn start(probe: impl Fn() -> Option<Vec<usize>> + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let (s, c) = (stop.clone(), changes.clone());
        let thread = std::thread::spawn(move || {
            let mut last: Option<Vec<usize>> = None;
            while !s.load(Ordering::Relaxed) {
                let Some(h) = probe() else {
                    continue;
                };
                if last.as_ref() != Some(&h) {
                    if let Ok(mut c) = c.lock() {
                        c.push((now_ns(), h.clone()));
                    }
                    last = Some(h);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            stop,
            changes,
            thread: Some(thread),
        }
    }

    /// Samples which of `hosts` hold `vip`.
    fn holders(hosts: Vec<Host>, vip: Vip) -> Self {
        Self::start(move || Some(holders(&hosts, vip)))
    }

    /// Samples which of `hosts` the router routes the bgp VIP via, best
    /// route first.
    fn routes(hosts: Vec<Host>, rib: bgp::RibReader) -> Self {
        Self::start(move || {
            let hops = rib.rib(IpAddr::V4(bgp::VIP))?;
            let mut via: Vec<usize> = Vec::new();
            for h in hops.into_iter().filter_map(|hop| bgp::host_of(&hosts, hop)) {
                if !via.contains(&h) {
                    via.push(h);
                }
            }
            Some(via)
        })
    }

    fn finish(mut self) -> HolderChanges {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.changes.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Watches log files for a line (keepalived taking over, HAProxy marking a
/// server down) and records when it first showed after the fault.
struct LogWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Option<u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogWatch {
    fn start(paths: Vec<PathBuf>, needle: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(None));
        let mut tail = stack::LogTail::at_end(paths);
        let (s, out) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if tail.seen(needle) {
                    if let Ok(mut o) = out.lock() {
                        *o = Some(now_ns());
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen.lock().ok().and_then(|s| *s)
    }
}

/// What the suite asks for: the reconnect storm's 5,000 watch streams hold
/// two descriptors each in a front (client and backend side), one in the
/// load driver and one in an apiserver, plus the short requests' churn.
const NOFILE_WANTED: u64 = 1 << 20;

/// Raises this process's descriptor limit (soft and, with
/// CAP_SYS_RESOURCE, hard) towards [`NOFILE_WANTED`], capped by
/// `fs.nr_open`; without the capability (a container's root may lack it)
/// the soft limit rises to the hard one. Every process the suite
/// spawns (fronts, apiservers, the load driver) inherits it, so HAProxy,
/// bulwark-lb and the fixture apiservers all run with it. Returns the soft
/// limit now in force.
pub fn raise_nofile() -> anyhow::Result<u64> {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_WANTED);
    let limit = nofile_limit()?;
    let want = NOFILE_WANTED.min(nr_open).max(limit.rlim_cur);
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(limit.rlim_max),
    };
    // SAFETY: `raised` is a valid rlimit; raising the hard limit needs
    // CAP_SYS_RESOURCE (root), otherwise the soft limit goes to the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(want);
    }
    let soft = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above; the soft limit may always rise to the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(limit.rlim_max)
}

/// The descriptor limit (soft, hard) of this process.
fn nofile_limit() -> anyhow::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok(limit)
}

/// The soft descriptor limit the suite's processes inherit.
pub fn nofile_soft() -> anyhow::Result<u64> {
    Ok(nofile_limit()?.rlim_cur)
}

/// Runs the suite.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let nofile = raise_nofile()?;
    let needed = Params::new(args.quick).storm_watchers as u64 * 3;
    anyhow::ensure!(
        nofile >= needed,
        "the descriptor limit is {nofile}, the reconnect storm needs about {needed}: raise ulimit -n (as root the suite raises it itself)"
    );
    crate::runtime::two_workers()?.block_on(run_async(args))
}

async fn run_async(args: &Args) -> anyhow::Result<()> {
    bulwark_testkit::fixture::validate_goaway_chance(args.goaway_chance)
        .context("--goaway-chance")?;
    let started = std::time::Instant::now();
    let params = Params::new(args.quick);
    let dist_params = distribution::DistParams::new(args.quick, args.goaway_chance);
    let mut dist_results = Vec::new();
    let scenarios: Vec<Scenario> = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    let load_before = crate::stats::loadavg();
    let mut topo = Topology::start().await?;
    topo.bgp_bfd = args.bgp_bfd;
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for (n, &scenario) in scenarios.iter().enumerate() {
        if scenario == Scenario::Distribution {
            let order = if n % 2 == 0 {
                [Contender::Bulwark, Contender::Baseline]
            } else {
                [Contender::Baseline, Contender::Bulwark]
            };
            let (runs, errors) = distribution::run_all(&mut topo, order, &dist_params).await?;
            dist_results.extend(runs);
            failed.extend(errors);
            continue;
        }
        for contender in scenario.contenders(n) {
            eprintln!("suite: {} / {}", scenario.key(), contender.key());
            match run_one(&mut topo, scenario, contender, &params).await {
                Ok(r) => {
                    eprintln!("suite:   {}", r.one_line());
                    results.push(r);
                }
                // One run going wrong (a front that never elects, a load
                // driver that never gets every stream) is a result too:
                // report it and go on with the next rather than lose the
                // whole run.
                Err(e) => {
                    let error = format!("{e:#}");
                    eprintln!("suite:   FAILED: {error}");
                    failed.push(report::FailedRun {
                        scenario,
                        contender,
                        error,
                    });
                    topo.heal()
                        .await
                        .context("healing the lab after a failed run")?;
                    clear_vip(topo.lb_hosts(), topo.vip_of(contender));
                }
            }
        }
    }
    let n_failed = failed.len();
    let report = report::Report::new(
        args,
        params,
        results,
        failed,
        load_before,
        crate::stats::loadavg(),
        started.elapsed(),
    )
    .with_distribution(dist_results, dist_params);
    report.write(&args.out_dir)?;
    anyhow::ensure!(
        n_failed == 0,
        "{n_failed} run(s) failed (listed in the report)"
    );
    Ok(())
}

async fn run_one(
    topo: &mut Topology,
    scenario: Scenario,
    contender: Contender,
    p: &Params,
) -> anyhow::Result<RunResult> {
    let lb_hosts = topo.lb_hosts().to_vec();
    let vip = topo.vip_of(contender);
    let mut front = start_front(topo, contender).await?;
    let watchers = if scenario.is_storm() {
        p.storm_watchers
    } else {
        p.watchers
    };
    let spec = LoadSpec {
        name: format!("{}-{}", scenario.key(), contender.key()),
        watchers,
        requesters: p.requesters,
        rate: p.rate,
        vip: vip.addr,
        extra: Vec::new(),
    };
    let (mut load, csv) = spawn_load(topo, &spec).await?;
    let load_ready_ns = now_ns();
    let sampler = VipSampler::holders(lb_hosts.clone(), vip);
    let route_sampler = front
        .router
        .as_ref()
        .map(|bird| VipSampler::routes(lb_hosts.clone(), bird.reader()));
    tokio::time::sleep(Duration::from_secs_f64(p.before_s)).await;
    // The holder now, not at start: keepalived's MASTER may preempt a
    // BACKUP that took the VIP first while the load ramped up.
    let holder = wait_single_holder(&lb_hosts, vip, Duration::from_secs(10)).await?;

    // Detection witnesses for the baseline: keepalived on the other LB
    // hosts entering MASTER, HAProxy (anywhere) marking a server down.
    let others: Vec<PathBuf> = (0..lb_hosts.len())
        .filter(|&i| i != holder)
        .flat_map(|i| front.logs(i))
        .collect();
    let all_logs: Vec<PathBuf> = (0..lb_hosts.len()).flat_map(|i| front.logs(i)).collect();
    let master_watch = (contender == Contender::Baseline)
        .then(|| LogWatch::start(others, stack::KEEPALIVED_MASTER));
    let down_watch = LogWatch::start(
        all_logs,
        match contender {
            Contender::Baseline => stack::HAPROXY_DOWN,
            Contender::Bulwark | Contender::BulwarkBgp => stack::BULWARK_VERDICT,
        },
    );

    let markers = inject(topo, &mut front, &load, scenario, holder, p).await?;
    tokio::time::sleep(Duration::from_secs_f64(p.after_s)).await;

    load.stop().await?;
    let load_end_ns = now_ns();
    let vip_changes = sampler.finish();
    let route_changes = route_sampler.map(VipSampler::finish);
    let keepalived_master_ns = master_watch.and_then(LogWatch::finish);
    let backend_verdict_ns = down_watch.finish();
    let failovers = front.failovers(topo).await;
    topo.heal().await?;
    front.shutdown().await?;
    clear_vip(&lb_hosts, vip);

    let events = load::read_events(&csv)?;
    Ok(analysis::analyse(analysis::Input {
        scenario,
        contender,
        params: p,
        watchers,
        holder,
        events: &events,
        markers,
        load_ready_ns,
        load_end_ns,
        vip_changes,
        route_changes,
        keepalived_master_ns,
        backend_verdict_ns,
        failovers,
    }))
}

/// Starts `contender` on a clean lab and waits until one LB host holds
/// the VIP (in bgp mode: and the router routes it there) and bulwark has
/// had time to commit its backends.
async fn start_front(topo: &Topology, contender: Contender) -> anyhow::Result<Stack> {
    let lb_hosts = topo.lb_hosts().to_vec();
    let vip = topo.vip_of(contender);
    clear_vip(&lb_hosts, vip);
    let _ = topo
        .client()
        .exec("ip", ["neigh", "flush", "dev", topo.client().interface()]);
    let front = Stack::start(topo, contender)?;
    let routed = async {
        let holder = wait_single_holder(&lb_hosts, vip, Duration::from_secs(60)).await?;
        front
            .wait_routed(&lb_hosts, holder, Duration::from_secs(30))
            .await
    };
    if let Err(e) = routed.await {
        stack::check_running(&front)?;
        return Err(e);
    }
    // bulwark proposes its backends once elected; let it commit them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack::check_running(&front)?;
    Ok(front)
}

/// What the load driver of one run does.
struct LoadSpec {
    /// The run's directory name under the suite's temp dir.
    name: String,
    watchers: usize,
    requesters: usize,
    rate: f64,
    /// The VIP the clients connect to (port [`VIP_PORT`]).
    vip: Ipv4Addr,
    /// More `bulwark-bench load` flags.
    extra: Vec<String>,
}

/// Starts the load driver on the client host and waits until every
/// watcher has its stream; returns it and the CSV it writes when stopped.
async fn spawn_load(topo: &Topology, spec: &LoadSpec) -> anyhow::Result<(Process, PathBuf)> {
    let run_dir = topo.dir.join(&spec.name);
    std::fs::create_dir_all(&run_dir)?;
    let ready = run_dir.join("ready");
    let csv = run_dir.join("events.csv");
    let load = topo.client().spawn(
        ProcessBuilder::new(
            format!("load-{}", spec.name),
            std::env::current_exe().context("locating bulwark-bench")?,
        )
        .arg("load")
        .arg("--target")
        .arg(SocketAddr::new(IpAddr::V4(spec.vip), VIP_PORT).to_string())
        .arg("--ca")
        .arg(&topo.ca)
        .arg("--watchers")
        .arg(spec.watchers.to_string())
        .arg("--requesters")
        .arg(spec.requesters.to_string())
        .arg("--rate")
        .arg(spec.rate.to_string())
        .arg("--ready-file")
        .arg(&ready)
        .arg("--out")
        .arg(&csv)
        .args(&spec.extra)
        .stop_timeout(Duration::from_secs(60)),
    )?;
    load.wait_for_file(&ready, Duration::from_secs(300))
        .await
        .context("the load driver never had every watch stream up")?;
    Ok((load, csv))
}

fn mark(markers: &mut Vec<Marker>, label: impl Into<String>) {
    markers.push(Marker {
        at_ns: now_ns(),
        label: label.into(),
    });
}

/// Injects the scenario's fault(s); returns the markers.
async fn inject(
    topo: &mut Topology,
    front: &mut Stack,
    load: &Process,
    scenario: Scenario,
    holder: usize,
    p: &Params,
) -> anyhow::Result<Vec<Marker>> {
    let lb = topo.lb_hosts().to_vec();
    let mut m = Vec::new();
    match scenario {
        Scenario::LinkCut | Scenario::ReconnectStorm => {
            mark(&mut m, format!("cut lb-{}", holder + 1));
            topo.lab.cut_link(&lb[holder])?;
        }
        Scenario::Sigkill => {
            mark(&mut m, format!("SIGKILL lb-{}", holder + 1));
            front.kill(holder)?;
        }
        Scenario::Partition => {
            mark(&mut m, format!("partition lb-{} from peers", holder + 1));
            for (i, h) in lb.iter().enumerate() {
                if i != holder {
                    topo.lab.partition(&lb[holder], h)?;
                }
            }
        }
        Scenario::StormReset => {
            mark(&mut m, "every client connection dropped");
            load.signal(libc::SIGUSR1)
                .context("asking the load driver to drop its connections")?;
        }
        Scenario::ProberIsolated => {
            let i = (holder + 1) % lb.len();
            mark(&mut m, format!("lb-{} host cut from apiservers", i + 1));
            for api in topo.api_hosts() {
                topo.lab.partition(&lb[i], api)?;
            }
        }
        Scenario::ApiserverKill => {
            mark(&mut m, "SIGKILL api-a");
            topo.apis[0].kill()?;
        }
        Scenario::ApiserverShutdown => {
            mark(&mut m, "SIGTERM api-a");
            topo.apis[0].process().terminate()?;
        }
        Scenario::ZoneOutage => {
            mark(&mut m, format!("zone {} dark", ZONES[holder]));
            topo.lab.cut_link(&lb[holder])?;
            let api_host = topo.api_hosts()[holder].clone();
            topo.lab.cut_link(&api_host)?;
        }
        // Its own run, with its own schedule (distribution.rs).
        Scenario::Distribution => bail!("the distribution scenario runs in distribution.rs"),
        Scenario::RollingRestart => {
            for i in 0..lb.len() {
                mark(&mut m, format!("restart lb-{}", i + 1));
                front.stop(i).await?;
                tokio::time::sleep(Duration::from_secs_f64(p.restart_down_s)).await;
                front.restart(i)?;
                tokio::time::sleep(Duration::from_secs_f64(p.restart_settle_s)).await;
            }
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bgp_mode_runs_beside_arp_mode_only_where_the_holder_goes() {
        use Contender::{Baseline, Bulwark, BulwarkBgp};
        assert_eq!(
            Scenario::LinkCut.contenders(0),
            [Bulwark, BulwarkBgp, Baseline]
        );
        assert_eq!(
            Scenario::Sigkill.contenders(1),
            [Baseline, BulwarkBgp, Bulwark]
        );
        assert_eq!(Scenario::Partition.contenders(0), [Bulwark, Baseline]);
        assert_eq!(Scenario::ZoneOutage.contenders(1), [Baseline, Bulwark]);
    }
}
