//! Scenario `rolling-upgrade` (root only): the documented rolling upgrade
//! (docs/UPGRADES.md, "Rolling upgrade") from one `bulwark-lb` build to
//! another and the rollback, under client load, on the network-namespace
//! lab the failover bench and the netns tests use
//! (`bulwark_testkit::cluster::lab`).
//!
//! Three LB hosts start on the OLD binary with one config each (the same
//! files for both builds). A client host keeps a load running through the
//! VIP the whole time: a fresh TCP connection with an echo round trip every
//! ~10 ms, and a few kept-alive connections each sending a request every
//! ~10 ms (reconnecting after a failure). An `ip addr` sampler and an ARP
//! prober (the lab's witnesses) run per step.
//!
//! Each trial upgrades, then rolls back: every follower in turn gets
//! SIGTERM, then the other binary on the same data dir and config, and the
//! step waits until the leader lists it as a voter with lag 0 (what
//! `bulwarkctl lb members` shows); then the leader gets `TransferLeadership`
//! first and is replaced the same way. Per step: the longest time without a
//! successful connect and without a successful request, failed connects and
//! requests, two-holder samples, time until the replaced node caught up,
//! and whether the leader changed. While the cluster is mixed, a registry
//! write (add a drained backend, then remove it) goes through the leader
//! and must become visible on every node, old and new.

mod load;
mod steps;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use bulwark_testkit::cluster::lab::{LbLab, Stack};

use crate::report::LabReportHead;
use crate::stats::{loadavg, median};
use load::Load;
use steps::{MixedCheck, Step, Upgrade};

/// Flags of `bulwark-bench rolling-upgrade`.
#[derive(clap::Args)]
pub struct Args {
    /// The build the cluster starts on (and is rolled back to).
    #[arg(long)]
    old_lb: PathBuf,
    /// The build it is upgraded to.
    #[arg(long)]
    new_lb: PathBuf,
    /// What the old build is (a git revision), for the report.
    #[arg(long, default_value = "")]
    old_rev: String,
    /// What the new build is (a git revision), for the report.
    #[arg(long, default_value = "")]
    new_rev: String,
    /// Trials: one upgrade and one rollback each, on the same cluster.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// Where the report goes (`<date>-rolling-upgrade.md` and `.json`).
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    head: LabReportHead,
    load_average_before: String,
    load_average_after: String,
    old_lb: String,
    old_rev: String,
    new_lb: String,
    new_rev: String,
    steps: Vec<Step>,
    mixed_checks: Vec<MixedCheck>,
    /// Connect and request gaps while nothing was being replaced (between
    /// trials), for scale.
    idle_connect_gap_ms: f64,
    idle_request_gap_ms: f64,
    double_holder_samples: usize,
    error_log_lines: Vec<String>,
}

/// Runs the scenario.
pub fn run(args: &Args) -> anyhow::Result<()> {
    for (flag, p) in [("--old-lb", &args.old_lb), ("--new-lb", &args.new_lb)] {
        anyhow::ensure!(
            p.is_file(),
            "{flag} {}: no such file (a bulwark-lb binary)",
            p.display()
        );
    }
    anyhow::ensure!(args.trials > 0, "--trials must be at least 1");
    crate::runtime::two_workers()?.block_on(run_async(args))
}

async fn run_async(args: &Args) -> anyhow::Result<()> {
    let load_before = loadavg();
    let (old, new) = (abs(&args.old_lb)?, abs(&args.new_lb)?);
    let Some(lab) = LbLab::start_binary(3, Stack::V4, &old).await else {
        bail!("the rolling-upgrade scenario needs root (network namespaces)");
    };
    lab.wait_for_holder(None, Duration::from_secs(30)).await;
    let load = Load::start(&lab);
    let mut up = Upgrade::new(lab);
    // Let the load settle, and measure it untouched for scale.
    let idle_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = load.window(idle_from, Instant::now());
    let result = async {
        for trial in 1..=args.trials {
            up.roll(trial, "upgrade", &new, &load).await?;
            up.roll(trial, "rollback", &old, &load).await?;
        }
        anyhow::Ok(())
    }
    .await;
    load.stop().await;
    let errors = up.error_lines();
    if let Err(e) = result {
        up.print_logs();
        return Err(e);
    }

    let report = Report {
        head: LabReportHead::new("rolling-upgrade"),
        load_average_before: load_before,
        load_average_after: loadavg(),
        old_lb: old.display().to_string(),
        old_rev: args.old_rev.clone(),
        new_lb: new.display().to_string(),
        new_rev: args.new_rev.clone(),
        idle_connect_gap_ms: idle.connect_gap_ms,
        idle_request_gap_ms: idle.request_gap_ms,
        double_holder_samples: up.steps.iter().map(|s| s.double_holder_samples).sum(),
        steps: std::mem::take(&mut up.steps),
        mixed_checks: std::mem::take(&mut up.mixed),
        error_log_lines: errors,
    };
    report
        .head
        .write(&args.out_dir, &markdown(&report), &report)?;
    if report.double_holder_samples > 0 {
        bail!("the witnesses saw two VIP holders during the upgrade");
    }
    if let Some(c) = report.mixed_checks.iter().find(|c| !c.visible_everywhere) {
        bail!(
            "a registry write in a mixed cluster was not seen by every node: {}",
            c.state
        );
    }
    Ok(())
}

/// `p` made absolute: the LB processes run in their own directories.
fn abs(p: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Rolling upgrade and rollback under load ({})\n",
        r.head.date
    );
    let _ = writeln!(s, "Machine: {} (kernel {}).", r.head.machine, r.head.kernel);
    let _ = writeln!(
        s,
        "Load average (1, 5, 15 min) before: {}; after: {}. The machine is shared with other builds and benches, so absolute times carry their noise.\n",
        r.load_average_before, r.load_average_after
    );
    let _ = writeln!(s, "Command: `{}` (as root).\n", r.head.command);
    let _ = writeln!(
        s,
        "Old: `{}` ({}). New: `{}` ({}).\n",
        r.old_rev, r.old_lb, r.new_rev, r.new_lb
    );
    let _ = writeln!(
        s,
        "Three `bulwark-lb` hosts in arp mode and a client host on one netns bridge, default timers, every node started on the old build. Load through VIP:6443 the whole time: a fresh TCP connection with an echo round trip every ~10 ms, and {} kept-alive connections sending a request every ~10 ms each. Each trial upgrades (old -> new) and rolls back (new -> old) as docs/UPGRADES.md says: each follower SIGTERMed and restarted on the other build with the same data dir and config, waited for until the leader lists it as a voter with lag 0; then the leader's `TransferLeadership`, then the old leader replaced.\n",
        load::KEEPALIVE_LOOPS
    );
    summary_table(&mut s, r);
    let _ = writeln!(
        s,
        "\nUntouched, for scale: longest connect gap {:.0} ms, request gap {:.0} ms over 3 s. `ip addr` and ARP witnesses: {} two-holder samples in all.\n",
        r.idle_connect_gap_ms, r.idle_request_gap_ms, r.double_holder_samples
    );
    steps::step_table(&mut s, &r.steps);
    steps::mixed_table(&mut s, &r.mixed_checks);
    let _ = writeln!(
        s,
        "\nERROR lines in the nodes' logs: {}.",
        r.error_log_lines.len()
    );
    for l in r.error_log_lines.iter().take(10) {
        let _ = writeln!(s, "- `{}`", l.trim());
    }
    s
}

/// Medians and maxima per kind of step.
fn summary_table(s: &mut String, r: &Report) {
    let _ = writeln!(
        s,
        "| step kind | n | connect gap median / max | request gap median / max | failed connects (sum) | failed requests (sum) | caught up median / max | leader changes |\n|---|---|---|---|---|---|---|---|"
    );
    for (phase, kind) in [
        ("upgrade", "follower"),
        ("upgrade", "transfer"),
        ("upgrade", "leader"),
        ("rollback", "follower"),
        ("rollback", "transfer"),
        ("rollback", "leader"),
    ] {
        let v: Vec<&Step> = r
            .steps
            .iter()
            .filter(|x| x.phase == phase && x.kind == kind)
            .collect();
        if v.is_empty() {
            continue;
        }
        let med_max = |f: &dyn Fn(&Step) -> Option<f64>| {
            let xs: Vec<f64> = v.iter().filter_map(|x| f(x)).collect();
            if xs.is_empty() {
                return "-".to_owned();
            }
            let max = xs.iter().copied().fold(f64::MIN, f64::max);
            format!("{:.0} / {:.0} ms", median(xs), max)
        };
        let _ = writeln!(
            s,
            "| {phase}: {kind} | {} | {} | {} | {} | {} | {} | {} |",
            v.len(),
            med_max(&|x| Some(x.window.connect_gap_ms)),
            med_max(&|x| Some(x.window.request_gap_ms)),
            v.iter().map(|x| x.window.failed_connects).sum::<usize>(),
            v.iter().map(|x| x.window.failed_requests).sum::<usize>(),
            med_max(&|x| x.caught_up_ms),
            v.iter().filter(|x| x.leader_changed).count(),
        );
    }
}
