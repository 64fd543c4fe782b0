//! Scenario `failover`: three `bulwark-lb` hosts in arp mode and a client
//! host on a network-namespace bridge (root only). Each trial cuts the
//! current leader's link while a client on the client host starts a fresh
//! TCP connection to VIP:port every 10 ms (100 ms timeout, an echo round
//! trip each, overlapping); the client-visible gap is from the last success before the
//! cut to the first success after it. The new holder's own failover record
//! gives time to detect (last contact with the old leader to election won)
//! and time to move (election won to VIP announced). Then the link comes
//! back, the cluster settles, and the next trial cuts the new leader.
//!
//! The cluster and witnesses are the ones the netns tests use
//! (`bulwark_testkit::cluster::lab`), so the figure and the correctness
//! checks describe the same thing.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use serde::Serialize;

use bulwark_testkit::cluster::lab::{LbLab, Sampler, measure_gap};

use crate::report::LabReportHead;
use crate::stats::{median, ms, ms_cell, percentile};

/// Flags of `bulwark-bench failover`.
#[derive(clap::Args)]
pub struct Args {
    /// Trials (one leader link cut each).
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Before the trials: seconds of steady state under load, counting
    /// elections no fault asked for (0: skip).
    #[arg(long, default_value_t = 60)]
    soak_seconds: u64,
    /// Busy-looping threads the bench runs during the soak, competing with
    /// the LB processes for the cores.
    #[arg(long, default_value_t = 4)]
    soak_burners: usize,
    /// Busy-looping threads the bench runs during the trials (0: the
    /// trials run on an otherwise idle machine).
    #[arg(long, default_value_t = 0)]
    trial_burners: usize,
    /// Run the LB nodes with `realtimePriority: 10` (real-time control
    /// threads) instead of the default ordinary ones, to compare the two
    /// in one session.
    #[arg(long)]
    realtime: bool,
    /// The LB nodes' `raft.heartbeatInterval` (default: the LB's default),
    /// to compare timer settings in one session.
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// The LB nodes' `raft.electionTimeoutMin` (default: the LB's default).
    #[arg(long, value_parser = humantime::parse_duration)]
    election_timeout_min: Option<Duration>,
    /// The LB nodes' `raft.electionTimeoutMax`, the voters' lease `F`
    /// (default: the LB's default).
    #[arg(long, value_parser = humantime::parse_duration)]
    election_timeout_max: Option<Duration>,
    /// The LB nodes' `vip.lease` (default: the LB's default).
    #[arg(long, value_parser = humantime::parse_duration)]
    lease: Option<Duration>,
    /// Where the report goes (`<date>-failover.md` and `.json`).
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

#[derive(Serialize)]
struct Trial {
    trial: usize,
    from_host: usize,
    to_host: usize,
    gap_ms: f64,
    time_to_detect_ms: Option<f64>,
    time_to_move_ms: Option<f64>,
}

#[derive(Serialize)]
struct Summary {
    median_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// The timers the LB nodes ran with (milliseconds in the JSON).
#[derive(Serialize)]
struct Timers {
    #[serde(
        rename = "heartbeat_interval_ms",
        serialize_with = "crate::stats::serialize_ms"
    )]
    heartbeat_interval: Duration,
    #[serde(
        rename = "election_timeout_min_ms",
        serialize_with = "crate::stats::serialize_ms"
    )]
    election_timeout_min: Duration,
    #[serde(
        rename = "election_timeout_max_ms",
        serialize_with = "crate::stats::serialize_ms"
    )]
    election_timeout_max: Duration,
    #[serde(rename = "lease_ms", serialize_with = "crate::stats::serialize_ms")]
    lease: Duration,
    #[serde(
        rename = "check_interval_ms",
        serialize_with = "crate::stats::serialize_ms"
    )]
    check_interval: Duration,
}

impl Timers {
    /// The LB's defaults with the flags' overrides.
    fn from_args(args: &Args) -> Self {
        let (raft, vip) = (
            bulwark_lb::config::RaftConfig::default(),
            bulwark_lb::config::VipConfig::default(),
        );
        Self {
            heartbeat_interval: args.heartbeat_interval.unwrap_or(raft.heartbeat_interval),
            election_timeout_min: args
                .election_timeout_min
                .unwrap_or(raft.election_timeout_min),
            election_timeout_max: args
                .election_timeout_max
                .unwrap_or(raft.election_timeout_max),
            lease: args.lease.unwrap_or(vip.lease),
            check_interval: vip.check_interval,
        }
    }

    /// Writes these timers into a node's configuration.
    fn apply(&self, c: &mut bulwark_lb::config::LbConfig) {
        c.raft.heartbeat_interval = self.heartbeat_interval;
        c.raft.election_timeout_min = self.election_timeout_min;
        c.raft.election_timeout_max = self.election_timeout_max;
        c.vip.lease = self.lease;
    }
}

/// Steady state under load with no fault: elections here are spurious.
#[derive(Serialize)]
struct Soak {
    seconds: u64,
    burners: usize,
    /// `/proc/loadavg` at the end of the soak.
    load_average: String,
    /// Raft terms started (the highest term seen, after minus before).
    elections: u64,
    /// Times the VIP holder changed.
    holder_changes: u64,
    /// Times a node released the VIP (its lease lapsed, say, and it claimed
    /// again): each is a short outage that no fault asked for.
    vip_releases: u64,
    /// Connects from the client host during the soak, and how many failed.
    connects: u64,
    failed_connects: u64,
}

#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    head: LabReportHead,
    soak: Option<Soak>,
    /// The LB nodes' control threads: `SCHED_RR` (`--realtime`) or
    /// ordinary (the default `realtimePriority: 0`).
    realtime: bool,
    timers: Timers,
    /// Busy threads competing with the LB processes during the trials.
    trial_burners: usize,
    /// `/proc/loadavg` after the last trial.
    trial_load_average: String,
    trials: Vec<Trial>,
    gap: Summary,
    time_to_detect: Summary,
    time_to_move: Summary,
    ip_addr_sweeps: u64,
    arp_windows: u64,
    double_holder_samples: usize,
    /// Releases the nodes' lease watchdogs made because a VIP task had not
    /// released in time: their log lines (how late the watchdog itself
    /// was, how long the release took).
    watchdog_releases: Vec<String>,
}

fn pb_ms(d: Option<prost_types::Duration>) -> Option<f64> {
    d.map(|d| d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1e6)
}

fn summary(mut v: Vec<f64>) -> Summary {
    v.sort_by(f64::total_cmp);
    Summary {
        median_ms: median(v.iter().copied()),
        p99_ms: percentile(&v, 99.0),
        max_ms: v.last().copied().unwrap_or(f64::NAN),
    }
}

/// Runs the scenario.
pub fn run(args: &Args) -> anyhow::Result<()> {
    crate::runtime::two_workers()?.block_on(run_async(args))
}

async fn run_async(args: &Args) -> anyhow::Result<()> {
    let timers = Timers::from_args(args);
    let lab = LbLab::start_edited(3, |c| {
        timers.apply(c);
        if args.realtime {
            c.realtime_priority = 10;
        }
    })
    .await;
    let Some(l) = lab else {
        bail!("the failover scenario needs root (network namespaces)");
    };
    let sampler = Sampler::start(&l);
    let hosts = l.lb_hosts();
    let mut trials = Vec::new();
    l.wait_for_holder(None, Duration::from_secs(30)).await;
    let soak = if args.soak_seconds > 0 {
        Some(soak(&l, args.soak_seconds, args.soak_burners).await)
    } else {
        None
    };
    let burners = Burners::start(args.trial_burners);
    for trial in 1..=args.trials {
        // Let every follower catch up and the old leader rejoin first.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = l.wait_for_holder(None, Duration::from_secs(30)).await;
        let cut_host = hosts[leader].clone();
        let gap = measure_gap(
            &l.client(),
            l.vip,
            || {
                if let Err(e) = l.lab.cut_link(&cut_host) {
                    eprintln!("cutting the link failed: {e:#}");
                }
            },
            Duration::from_secs(15),
        )
        .await
        .context("the client never got through after the cut")?;
        let new = l
            .wait_for_holder(Some(leader), Duration::from_secs(15))
            .await;
        // The holder commits its record right after claiming; give it a
        // moment to be applied.
        let mut record = None;
        for _ in 0..40 {
            record = l
                .status(new)
                .await
                .and_then(|s| s.recent_failovers.into_iter().next())
                .filter(|f| {
                    f.to_node_id == new as u64 + 1 && f.from_node_id == Some(leader as u64 + 1)
                });
            if record.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t = Trial {
            trial,
            from_host: leader + 1,
            to_host: new + 1,
            gap_ms: ms(gap),
            time_to_detect_ms: record.as_ref().and_then(|f| pb_ms(f.time_to_detect)),
            time_to_move_ms: record.as_ref().and_then(|f| pb_ms(f.time_to_move_vip)),
        };
        eprintln!(
            "trial {trial:>2}: h{} -> h{}: gap {:.0} ms, detect {:?} ms, move {:?} ms",
            t.from_host, t.to_host, t.gap_ms, t.time_to_detect_ms, t.time_to_move_ms
        );
        trials.push(t);
        l.lab.restore_link(&cut_host)?;
    }
    let trial_load_average = crate::stats::loadavg();
    burners.stop();
    let w = sampler.finish();

    let report = Report {
        head: LabReportHead::new("failover"),
        gap: summary(trials.iter().map(|t| t.gap_ms).collect()),
        time_to_detect: summary(trials.iter().filter_map(|t| t.time_to_detect_ms).collect()),
        time_to_move: summary(trials.iter().filter_map(|t| t.time_to_move_ms).collect()),
        ip_addr_sweeps: w.addr_samples,
        arp_windows: w.arp_windows,
        double_holder_samples: w.addr_violations.len() + w.arp_violations.len(),
        watchdog_releases: watchdog_releases(&l),
        soak,
        realtime: args.realtime,
        timers,
        trial_burners: args.trial_burners,
        trial_load_average,
        trials,
    };
    report
        .head
        .write(&args.out_dir, &markdown(&report), &report)?;
    if report.double_holder_samples > 0 {
        bail!(
            "the witnesses saw two VIP holders: {:?} {:?}",
            w.addr_violations,
            w.arp_violations
        );
    }
    Ok(())
}

/// The lines the nodes' lease watchdogs logged when they released the VIP
/// (`components/lb/src/vip/watchdog.rs`), over the whole run, each with
/// the node's name in front and how much later the node's VIP task then
/// logged its own release: what the watchdog saved.
fn watchdog_releases(l: &LbLab) -> Vec<String> {
    l.nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            let log = n.log();
            let lines: Vec<&str> = log.lines().collect();
            lines
                .iter()
                .enumerate()
                .filter(|(_, line)| line.contains("the lease watchdog deleted the VIP"))
                .map(|(at, line)| {
                    let task = lines[at..]
                        .iter()
                        .find(|l| l.contains(RELEASED))
                        .and_then(|task| Some((logged_at(task)?, logged_at(line)?)))
                        .and_then(|(task, dog)| task.duration_since(dog).ok())
                        .map_or("the VIP task's release was not logged".to_owned(), |d| {
                            format!("the VIP task released {:.1} ms later", ms(d))
                        });
                    format!("lb-{}: {} ({task})", i + 1, line.trim())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// How many times the nodes' VIP tasks have released the VIP so far.
fn vip_releases(l: &LbLab) -> u64 {
    let released = |log: String| log.lines().filter(|l| l.contains(RELEASED)).count() as u64;
    l.nodes.iter().map(|n| released(n.log())).sum()
}

/// What the VIP task logs when it releases the VIP
/// (`components/lb/src/vip/mod.rs`).
const RELEASED: &str = "released the VIP reason=";

/// The time stamp a text log line starts with.
fn logged_at(line: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(line.split_whitespace().next()?).ok()
}

/// The highest Raft term any node reports.
async fn highest_term(l: &LbLab) -> u64 {
    let mut term = 0;
    for i in 0..l.lb_hosts().len() {
        if let Some(s) = l.status(i).await {
            term = term.max(s.current_term);
        }
    }
    term
}

/// `seconds` of steady state with `burners` busy threads and the client
/// connecting every 10 ms: elections and holder changes that no fault
/// asked for.
async fn soak(l: &LbLab, seconds: u64, burners: usize) -> Soak {
    let burning = Burners::start(burners);
    let term_before = highest_term(l).await;
    let releases_before = vip_releases(l);
    let mut holder = l.holders().first().copied();
    let (mut connects, mut failed, mut holder_changes) = (0u64, 0u64, 0u64);
    let client = l.client();
    let end = std::time::Instant::now() + Duration::from_secs(seconds);
    while std::time::Instant::now() < end {
        connects += 1;
        if !bulwark_testkit::cluster::lab::echo(&client, l.vip, Duration::from_millis(100)).await {
            failed += 1;
        }
        let now = l.holders().first().copied();
        if now.is_some() && now != holder {
            holder_changes += u64::from(holder.is_some());
            holder = now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let load_average = crate::stats::loadavg();
    burning.stop();
    let soak = Soak {
        seconds,
        burners,
        load_average,
        elections: highest_term(l).await.saturating_sub(term_before),
        holder_changes,
        vip_releases: vip_releases(l).saturating_sub(releases_before),
        connects,
        failed_connects: failed,
    };
    eprintln!(
        "soak: {} s, {} burners, load {}: {} elections, {} holder changes, {} VIP releases, {}/{} connects failed",
        soak.seconds,
        soak.burners,
        soak.load_average,
        soak.elections,
        soak.holder_changes,
        soak.vip_releases,
        soak.failed_connects,
        soak.connects
    );
    soak
}

/// Busy-looping threads that compete with the LB processes for the cores.
struct Burners {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Burners {
    fn start(n: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(
                                x.wrapping_mul(6364136223846793005).wrapping_add(1),
                            );
                        }
                    }
                })
            })
            .collect();
        Burners { stop, threads }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Failover: leader link cut, arp mode ({})\n",
        r.head.date
    );
    let _ = writeln!(
        s,
        "Machine: {} (kernel {}).\n",
        r.head.machine, r.head.kernel
    );
    let _ = writeln!(
        s,
        "Command: `{}` (as root, after `cargo build --release -p bulwark-lb -p bulwark-bench`).\n",
        r.head.command
    );
    let _ = writeln!(
        s,
        "Three `bulwark-lb` hosts and a client host in network namespaces on one bridge, with the timers below. Each trial cuts the current leader's link; the client starts a fresh TCP connection to VIP:6443 every 10 ms (each with a 100 ms timeout and an echo round trip, not waiting for the previous one).\n"
    );
    let threads = if r.realtime {
        "under SCHED_RR (`realtimePriority: 10`)"
    } else {
        "ordinary threads (`realtimePriority: 0`, the default)"
    };
    let _ = writeln!(
        s,
        "The LB nodes' control threads: {threads}. Timers: heartbeat {:?}, election timeout {:?}-{:?}, lease {:?}, check interval {:?}. Trials with {} busy threads competing for the cores (load average after the last trial: {}).\n",
        r.timers.heartbeat_interval,
        r.timers.election_timeout_min,
        r.timers.election_timeout_max,
        r.timers.lease,
        r.timers.check_interval,
        r.trial_burners,
        r.trial_load_average
    );
    let _ = writeln!(s, "| | median | p99 | max |\n|---|---|---|---|");
    for (name, v) in [
        ("client-visible gap", &r.gap),
        (
            "time to detect (last contact -> elected)",
            &r.time_to_detect,
        ),
        ("time to move (elected -> VIP announced)", &r.time_to_move),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {:.0} ms | {:.0} ms | {:.0} ms |",
            v.median_ms, v.p99_ms, v.max_ms
        );
    }
    let _ = writeln!(
        s,
        "\n{} trials. Witnesses: {} `ip addr` sweeps and {} ARP probe windows saw {} instants with two holders. Lease watchdog releases (a VIP task not yet released one check interval after its lease): {}.\n",
        r.trials.len(),
        r.ip_addr_sweeps,
        r.arp_windows,
        r.double_holder_samples,
        r.watchdog_releases.len()
    );
    for line in &r.watchdog_releases {
        let _ = writeln!(s, "    {line}");
    }
    if !r.watchdog_releases.is_empty() {
        s.push('\n');
    }
    if let Some(k) = &r.soak {
        let _ = writeln!(
            s,
            "Spurious elections: before the trials, {} s of steady state with no fault while {} busy threads compete for the cores (load average at the end: {}) and the client connects every 10 ms: **{} elections**, {} VIP holder changes, {} VIP releases, {} of {} connects failed.\n",
            k.seconds,
            k.burners,
            k.load_average,
            k.elections,
            k.holder_changes,
            k.vip_releases,
            k.failed_connects,
            k.connects
        );
    }
    let _ = writeln!(
        s,
        "| trial | from | to | gap | detect | move |\n|---|---|---|---|---|---|"
    );
    for t in &r.trials {
        let _ = writeln!(
            s,
            "| {} | h{} | h{} | {:.0} ms | {} | {} |",
            t.trial,
            t.from_host,
            t.to_host,
            t.gap_ms,
            ms_cell(t.time_to_detect_ms),
            ms_cell(t.time_to_move_ms)
        );
    }
    s
}
