//! Scenario `failover`: three `bulwark-lb` hosts in arp mode and a client
//! host on a network-namespace bridge (root only). Each trial cuts the
//! current leader's link while a client on the client host opens a fresh
//! TCP connection to VIP:port over and over (100 ms timeout, an echo round
//! trip each); the client-visible gap is from the last success before the
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

use crate::stats::{kernel, machine_summary, median, percentile};

/// Flags of `bulwark-bench failover`.
#[derive(clap::Args)]
pub struct Args {
    /// Trials (one leader link cut each).
    #[arg(long, default_value_t = 20)]
    trials: usize,
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

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    command: String,
    machine: String,
    kernel: String,
    date: String,
    trials: Vec<Trial>,
    gap: Summary,
    time_to_detect: Summary,
    time_to_move: Summary,
    ip_addr_sweeps: u64,
    arp_windows: u64,
    double_holder_samples: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: &Args) -> anyhow::Result<()> {
    let Some(l) = LbLab::start(3).await else {
        bail!("the failover scenario needs root (network namespaces)");
    };
    let sampler = Sampler::start(&l);
    let hosts = l.lb_hosts();
    let mut trials = Vec::new();
    l.wait_for_holder(None, Duration::from_secs(30)).await;
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
    let w = sampler.finish();

    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let report = Report {
        scenario: "failover",
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine_summary(),
        kernel: kernel(),
        date: date.clone(),
        gap: summary(trials.iter().map(|t| t.gap_ms).collect()),
        time_to_detect: summary(trials.iter().filter_map(|t| t.time_to_detect_ms).collect()),
        time_to_move: summary(trials.iter().filter_map(|t| t.time_to_move_ms).collect()),
        ip_addr_sweeps: w.addr_samples,
        arp_windows: w.arp_windows,
        double_holder_samples: w.addr_violations.len() + w.arp_violations.len(),
        trials,
    };
    std::fs::create_dir_all(&args.out_dir)?;
    let stem = args.out_dir.join(format!("{}-failover", &date[..10]));
    std::fs::write(
        stem.with_extension("json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(stem.with_extension("md"), markdown(&report))?;
    println!("{}", markdown(&report));
    if report.double_holder_samples > 0 {
        bail!(
            "the witnesses saw two VIP holders: {:?} {:?}",
            w.addr_violations,
            w.arp_violations
        );
    }
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Failover: leader link cut, arp mode ({})\n", r.date);
    let _ = writeln!(s, "Machine: {} (kernel {}).\n", r.machine, r.kernel);
    let _ = writeln!(
        s,
        "Command: `{}` (as root, after `cargo build --release -p bulwark-lb -p bulwark-bench`).\n",
        r.command
    );
    let _ = writeln!(
        s,
        "Three `bulwark-lb` hosts and a client host in network namespaces on one bridge; default timers (heartbeat 50 ms, election timeout 150-250 ms, VIP lease 180 ms). Each trial cuts the current leader's link; the client opens a fresh TCP connection to VIP:6443 (100 ms timeout, echo round trip) in a loop.\n"
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
        "\n{} trials. Witnesses: {} `ip addr` sweeps and {} ARP probe windows saw {} instants with two holders.\n",
        r.trials.len(),
        r.ip_addr_sweeps,
        r.arp_windows,
        r.double_holder_samples
    );
    let _ = writeln!(
        s,
        "| trial | from | to | gap | detect | move |\n|---|---|---|---|---|---|"
    );
    for t in &r.trials {
        let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ms"));
        let _ = writeln!(
            s,
            "| {} | h{} | h{} | {:.0} ms | {} | {} |",
            t.trial,
            t.from_host,
            t.to_host,
            t.gap_ms,
            f(t.time_to_detect_ms),
            f(t.time_to_move_ms)
        );
    }
    s
}
