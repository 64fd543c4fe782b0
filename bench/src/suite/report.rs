//! The suite's report: `<stem>.md` (tables, ratios, machine, command,
//! duration), `<stem>.json` (every figure and the plot series) and one SVG
//! per scenario (`<stem>-<scenario>.svg`): requests/s, failures/s and watch
//! streams lost/s over time with the fault markers, bulwark above the
//! baseline. The stem is `<date>-suite` for `--quick`, `<date>-suite-full`
//! otherwise, with `-<scenario>` appended for each scenario named on the
//! command line (none: all ran).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, SystemTime};

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::Serialize;

use super::analysis::{Latency, RunResult};
use super::distribution::{self, DistParams, DistributionResult};
use super::{Args, Contender, Params, Scenario};
use crate::stats::ms_cell;

/// How `cargo xtask bench` tells the suite the command it was given, for
/// the report.
pub const COMMAND_ENV: &str = "BULWARK_BENCH_COMMAND";
const BGP_BFD_ENV: &str = "BULWARK_BENCH_BGP_BFD";
const TOOLS_ENV: &str = "BULWARK_TOOLS_DIR";

/// The command that produced a report, as typed: xtask's (`cargo xtask
/// bench …`, which sets the tools directory itself) when xtask ran the
/// suite, else this process's arguments with the program by its file
/// name; led by the variables of `env` that were set and that the
/// command does not already say.
fn command_line(
    xtask: Option<String>,
    mut argv: impl Iterator<Item = String>,
    env: &[(&str, Option<String>)],
) -> String {
    let via_xtask = xtask.is_some();
    let command = xtask.unwrap_or_else(|| {
        let program = argv.next().unwrap_or_default();
        let program = Path::new(&program)
            .file_name()
            .map_or(program.clone(), |n| n.to_string_lossy().into_owned());
        std::iter::once(program)
            .chain(argv)
            .collect::<Vec<_>>()
            .join(" ")
    });
    let mut line = String::new();
    for (name, value) in env {
        if let Some(value) = value
            && !(via_xtask && *name == TOOLS_ENV)
        {
            let _ = write!(line, "{name}={value} ");
        }
    }
    line + &command
}

/// A scenario run that did not complete, and why.
#[derive(Serialize)]
pub struct FailedRun {
    pub scenario: Scenario,
    pub contender: Contender,
    pub error: String,
}

/// Everything the run produced.
#[derive(Serialize)]
pub struct Report {
    suite: &'static str,
    date: String,
    command: String,
    quick: bool,
    /// bulwark-bgp ran with BFD (`--bgp-bfd`).
    bgp_bfd: bool,
    /// The scenarios named on the command line (empty: all ran).
    only: Vec<Scenario>,
    duration_s: f64,
    machine: BTreeMap<String, String>,
    loadavg_before: String,
    loadavg_after: String,
    params: Params,
    runs: Vec<RunResult>,
    /// The `distribution` scenario's runs and their parameters.
    distribution: Vec<DistributionResult>,
    distribution_params: Option<DistParams>,
    failed: Vec<FailedRun>,
}

impl Report {
    /// Collects the run.
    pub fn new(
        args: &Args,
        params: Params,
        runs: Vec<RunResult>,
        failed: Vec<FailedRun>,
        loadavg_before: String,
        loadavg_after: String,
        took: Duration,
    ) -> Self {
        let mut machine = crate::stats::machine();
        let version = crate::stats::tool_version;
        machine.insert("haproxy".into(), version("haproxy", "-v"));
        machine.insert(
            "keepalived".into(),
            version("/usr/sbin/keepalived", "--version"),
        );
        let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let env = |name| std::env::var(name).ok();
        let command = command_line(
            env(COMMAND_ENV),
            std::env::args(),
            &[(BGP_BFD_ENV, env(BGP_BFD_ENV)), (TOOLS_ENV, env(TOOLS_ENV))],
        );
        Self {
            suite: "failover-suite",
            date,
            command,
            quick: args.quick,
            bgp_bfd: args.bgp_bfd,
            only: args.scenarios.clone(),
            duration_s: took.as_secs_f64(),
            machine,
            loadavg_before,
            loadavg_after,
            params,
            runs,
            distribution: Vec::new(),
            distribution_params: None,
            failed,
        }
    }

    /// Adds the `distribution` scenario's runs, when it ran.
    pub fn with_distribution(mut self, runs: Vec<DistributionResult>, params: DistParams) -> Self {
        if !runs.is_empty() {
            self.distribution = runs;
            self.distribution_params = Some(params);
        }
        self
    }

    /// `<day>-suite` (quick), `<day>-suite-full`, plus `-<scenario>` for
    /// each scenario named: a full run on the day of a quick one keeps both.
    fn stem(&self) -> String {
        let mut stem = format!("{}-suite", &self.date[..10]);
        if !self.quick {
            stem.push_str("-full");
        }
        for s in &self.only {
            let _ = write!(stem, "-{}", s.key());
        }
        if self.bgp_bfd {
            stem.push_str("-bgp-bfd");
        }
        stem
    }

    /// Writes the markdown, the JSON and the plots.
    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out)?;
        let stem = self.stem();
        let mut plots = Vec::new();
        for scenario in self.scenarios() {
            let file = if self.only.len() == 1 {
                format!("{stem}.svg")
            } else {
                format!("{stem}-{}.svg", scenario.key())
            };
            plot(&out.join(&file), scenario, &self.runs_of(scenario))?;
            plots.push((scenario, file));
        }
        let dist_plot = if self.distribution.is_empty() {
            None
        } else {
            let file = if self.only.len() == 1 {
                format!("{stem}.svg")
            } else {
                format!("{stem}-distribution.svg")
            };
            distribution::plot(&out.join(&file), &self.distribution)?;
            Some(file)
        };
        std::fs::write(
            out.join(format!("{stem}.json")),
            serde_json::to_string_pretty(self)?,
        )?;
        let mut md = self.markdown(&plots);
        if let Some(params) = &self.distribution_params {
            md.push_str(&distribution::markdown(
                &self.distribution,
                params,
                dist_plot.as_deref(),
            ));
        }
        std::fs::write(out.join(format!("{stem}.md")), &md)?;
        println!("{md}");
        Ok(())
    }

    fn scenarios(&self) -> Vec<Scenario> {
        let mut v: Vec<Scenario> = Vec::new();
        for r in &self.runs {
            if !v.contains(&r.scenario) {
                v.push(r.scenario);
            }
        }
        v
    }

    /// bulwark (arp mode, then bgp mode), then the baseline.
    fn runs_of(&self, s: Scenario) -> Vec<&RunResult> {
        let mut v: Vec<&RunResult> = self.runs.iter().filter(|r| r.scenario == s).collect();
        v.sort_by_key(|r| r.contender);
        v
    }

    fn markdown(&self, plots: &[(Scenario, String)]) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Failover suite ({})\n", self.date);
        let how = if self.command.contains("cargo xtask bench") {
            "as root; it builds bulwark-lb, bulwark-prober, the fixture apiserver and bulwark-bench in release, runs setup, then `bulwark-bench suite`"
        } else {
            "as root, with bulwark-lb, bulwark-prober and the fixture apiserver built in release beside bulwark-bench, as `cargo xtask bench` builds them"
        };
        let _ = writeln!(
            s,
            "Command: `{}` ({how}). The run took {:.0} s.\n",
            self.command, self.duration_s
        );
        let _ = writeln!(s, "Machine: {}.\n", crate::report::kv(&self.machine));
        let _ = writeln!(
            s,
            "Load average (1/5/15 min) before: {}, after: {}. The machine is shared with other builds: compare the fronts (and bulwark's bgp mode with its arp mode) within this run, not across runs.\n",
            self.loadavg_before, self.loadavg_after
        );
        let p = &self.params;
        let _ = writeln!(
            s,
            "Topology: network namespaces on one bridge: 3 LB hosts (zones a, b, c), 3 fixture apiservers (the testkit's kube-apiserver test double; shutdown delay 3 s, grace 5 s) on their own hosts in zones a, b, c, one client host, one router host. **bulwark**: `bulwark-lb` on each LB host, arp-mode VIP, default timers, and a `bulwark-prober` per zone on that zone's LB host (default probing) feeding the LB's health verdicts. **bulwark-bgp** (link-cut and sigkill): the same nodes and probers in bgp mode (default timers: hold time 3 s), the VIP (`10.255.0.10`, outside the bridge's subnet) bound on `lo` and announced over eBGP to BIRD 2 on the router host (`hold time 3`, `keepalive time 1`, learned routes exported to its kernel){bfd}; the client host reaches that VIP only through its own link to the router (the testkit's bgp lab, the one `lb_bgp_netns.rs` tests), while the arp-mode VIP stays on the bridge. **keepalived+haproxy**: the kubeadm HA guide's setup: keepalived VRRP (defaults, advert 1 s, one MASTER at 101, two BACKUPs at 100) and HAProxy `mode tcp` with `option httpchk GET /healthz`, `http-check expect status 200`, `check check-ssl verify none`, `inter 2s fall 3 rise 2`, `retries 1`, `option redispatch`. All run on the same hosts in the same run, one after the other, order alternating by scenario.\n",
            bfd = if self.bgp_bfd {
                ", **with BFD** on every session (`bfd: {enabled: true}` on the LB side, 100 ms × 3 by default; BIRD `protocol bfd` at 100 ms × 3 and `bfd on`)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "Load (from the client host, over HTTPS through the VIP, HTTP/2): {} watch clients holding a watch stream each ({} in the reconnect storm and in storm-reset; a stream silent for 2.5 s is re-established after a 100-300 ms backoff), {} short-request clients at {} req/s each (half keep their connection, half connect per request); 1 s timeout for the TCP connect and for a short request, 10 s for the TLS + HTTP/2 handshakes once TCP is up (client-go's TLS handshake timeout; giving up sooner only repeats the work). {} s of load before the fault, {} s after; \"during\" is from the first fault to {} s after the last.\n",
            p.watchers, p.storm_watchers, p.requesters, p.rate, p.before_s, p.after_s, p.during_s
        );
        self.runs_table(&mut s);
        self.ratios_table(&mut s);
        self.bgp_table(&mut s);
        let _ = writeln!(
            s,
            "\nA ratio needs a sample on both sides (at least {MIN_SAMPLE}): **p99 during** is \"-\" when either front had fewer than {MIN_SAMPLE} successful requests in its during window (a p99 of a handful is its maximum); **failed requests / connects** show both counts (\"4 vs 1\") when both are below {MIN_SAMPLE}; **watch streams all back** is \"-\" when either front lost fewer than {MIN_SAMPLE} streams or some never came back. The **gap** is one measurement per run, not a sample, and is always a ratio."
        );
        let _ = writeln!(
            s,
            "\n## How to read it\n\n- **gap**: the longest time between two successful short requests (all clients together) ending after the fault; steady state is a few ms.\n- **failed req / conn**: failed short requests and failed connects (TCP + TLS + HTTP/2) from the fault on, out of all attempted. A requester whose connect fails sends no request, so when the VIP or every backend is unreachable the failures show under conn, not req.\n- **watches lost / all back**: watch streams lost after the fault, out of all watch clients, and the time from the fault until the last of them had its stream again (p50: the median stream); \"N never\" when N streams were still down when the load stopped.\n- **detect**: VIP scenarios: bulwark's failover record (last contact with the old leader to election won); baseline: the fault to keepalived logging `Entering MASTER STATE` on another host. Backend scenarios (apiserver kill / shutdown, prober isolated) and storm-reset: the fault to bulwark's leader logging a committed verdict change (`verdict committed`), or to HAProxy logging a server DOWN; logs polled every 20 ms. In `prober-isolated` and `storm-reset` a figure here means a verdict changed: for bulwark that would be a wrong eviction; HAProxy on the cut-off host marks its servers down, which harms no client while that host does not hold the VIP.\n- **VIP moved**: the fault to an `ip addr` sampler (every ~10 ms) first seeing the VIP on another host (same yardstick for both).\n- **two holders**: time the sampler saw the VIP on more than one host. After a SIGKILL the dead node's address stays behind (both fronts); after a partition only a fenced leader gives it up.\n- **bulwark-bgp**: VIP moved and two holders are read from `lo`, where a bgp-mode holder binds the VIP; **route moved** is the fault to the router's best route (`birdc show route`, sampled like `ip addr`) first going via another host, which is when the clients' packets go there, and **two routes** the time the router had routes via two hosts: a cut-off holder cannot withdraw, so its route stays (and may stay best) until BIRD's hold timer expires; a SIGKILLed holder's sessions close at once and its route goes with them.\n- **p50/p99**: successful short requests by start time: before the fault, during, after; \"(n=…)\" marks a window with fewer than {MIN_SAMPLE} successes.\n- **connect p50/p99 during**: successful connects (TCP, TLS and HTTP/2 handshakes through the front, as the client times them) started in the \"during\" window: watch clients reconnecting and the requesters that connect per request. A backend the front tries first and in vain (a dead apiserver still routed) shows here as its connect timeout.\n- **zone-outage, keepalived+haproxy** is slow for two reasons of the baseline itself, not of the harness. (1) The two BACKUPs have the same priority (100, as in the guide), so when the MASTER's zone goes dark both time out at the same instant, both enter MASTER and send gratuitous ARPs, and the one with the lower address yields at once (keepalived's log: `Entering MASTER STATE`, then `same priority 100 but higher IP address`, `Entering BACKUP STATE`). A client whose neighbour entry took the loser's ARP last sends its SYNs to a host that no longer has the VIP until keepalived repeats its gratuitous ARPs (`garp_master_delay`, 5 s later). (2) HAProxy keeps the dead zone's apiserver in the round robin until three checks have failed (`inter 2s fall 3`, each check waiting 2 s): a connection sent there waits `timeout connect 5s` before `retries 1` with `redispatch` moves it, so a third of the watch streams come back only 8-10 s after the fault.\n"
        );
        self.failures(&mut s);
        let _ = writeln!(s, "\n## Plots\n");
        for (sc, file) in plots {
            let _ = writeln!(
                s,
                "### {}: {}\n\n![{}]({file})\n",
                sc.key(),
                sc.describe(),
                sc.key()
            );
        }
        s
    }

    /// One row per scenario and front: the figures.
    fn runs_table(&self, s: &mut String) {
        let _ = writeln!(
            *s,
            "| scenario | front | gap | failed req | failed conn | watches lost | all back | detect | VIP moved | two holders | p50/p99 before | during | after | connect p50/p99 during |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for sc in self.scenarios() {
            for r in self.runs_of(sc) {
                let back = match (r.watch_never_back, r.watch_all_back_ms) {
                    (0, Some(all)) => format!(
                        "{all:.0} ms (p50 {:.0})",
                        r.watch_median_back_ms.unwrap_or(all)
                    ),
                    (0, None) => "-".to_owned(),
                    (n, _) => format!("{n} never"),
                };
                let _ = writeln!(
                    *s,
                    "| {} | {} | {:.0} ms | {}/{} | {}/{} | {}/{} | {} | {} | {} | {:.0} ms | {} | {} | {} | {} |",
                    sc.key(),
                    r.contender.key(),
                    r.gap_ms,
                    r.failed_requests,
                    r.requests_after_fault,
                    r.failed_connects,
                    r.connects_after_fault,
                    r.watch_streams_lost,
                    r.watchers,
                    back,
                    ms_cell(r.time_to_detect_ms),
                    ms_cell(r.vip_moved_ms),
                    r.two_holders_ms,
                    latency_cell(&r.latency_before),
                    latency_cell(&r.latency_during),
                    latency_cell(&r.latency_after),
                    latency_cell(&r.connect_latency_during),
                );
            }
        }
    }

    /// bulwark / baseline per scenario.
    fn ratios_table(&self, s: &mut String) {
        let _ = writeln!(
            *s,
            "\n## Ratios, bulwark / baseline (below 1 is better for bulwark)\n\n| scenario | gap | failed requests | failed connects | watch streams all back | p99 during |\n|---|---|---|---|---|---|"
        );
        for sc in self.scenarios() {
            let runs = self.runs_of(sc);
            let (Some(b), Some(k)) = (
                runs.iter().find(|r| r.contender == Contender::Bulwark),
                runs.iter().find(|r| r.contender == Contender::Baseline),
            ) else {
                continue;
            };
            let _ = writeln!(
                *s,
                "| {} | {} | {} | {} | {} | {} |",
                sc.key(),
                ratio(b.gap_ms, k.gap_ms),
                count_ratio(b.failed_requests, k.failed_requests),
                count_ratio(b.failed_connects, k.failed_connects),
                back_ratio(b, k),
                latency_ratio(&b.latency_during, &k.latency_during),
            );
        }
    }

    /// bgp mode / arp mode per scenario with both, from this run.
    fn bgp_table(&self, s: &mut String) {
        let pairs: Vec<(Scenario, &RunResult, &RunResult)> = self
            .scenarios()
            .into_iter()
            .filter_map(|sc| {
                let runs = self.runs_of(sc);
                let of = |c: Contender| runs.iter().copied().find(|r| r.contender == c);
                Some((sc, of(Contender::BulwarkBgp)?, of(Contender::Bulwark)?))
            })
            .collect();
        if pairs.is_empty() {
            return;
        }
        let _ = writeln!(
            *s,
            "\n## bulwark, bgp mode beside arp mode (same run)\n\n| scenario | gap bgp / arp | failed conn bgp, arp | failed req bgp, arp | watch streams all back, bgp / arp | route moved | two routes | detect bgp, arp |\n|---|---|---|---|---|---|---|---|"
        );
        for (sc, g, a) in pairs {
            let _ = writeln!(
                *s,
                "| {} | {:.0} / {:.0} ms = {} | {}/{}, {}/{} | {}/{}, {}/{} | {} | {} | {} | {}, {} |",
                sc.key(),
                g.gap_ms,
                a.gap_ms,
                ratio(g.gap_ms, a.gap_ms),
                g.failed_connects,
                g.connects_after_fault,
                a.failed_connects,
                a.connects_after_fault,
                g.failed_requests,
                g.requests_after_fault,
                a.failed_requests,
                a.requests_after_fault,
                back_ratio(g, a),
                ms_cell(g.route_moved_ms),
                ms_cell(g.two_routes_ms),
                ms_cell(g.time_to_detect_ms),
                ms_cell(a.time_to_detect_ms),
            );
        }
    }

    /// Runs that did not complete, and failures by kind.
    fn failures(&self, s: &mut String) {
        if !self.failed.is_empty() {
            let _ = writeln!(*s, "## Runs that did not complete\n");
            for f in &self.failed {
                let _ = writeln!(
                    *s,
                    "- {} / {}: {}",
                    f.scenario.key(),
                    f.contender.key(),
                    f.error.replace('\n', " ")
                );
            }
            let _ = writeln!(*s);
        }
        let _ = writeln!(*s, "## Failures by kind\n");
        for r in &self.runs {
            if r.failure_kinds.is_empty() {
                continue;
            }
            let kinds: Vec<String> = r
                .failure_kinds
                .iter()
                .map(|(k, n)| format!("{n}× {k}"))
                .collect();
            let _ = writeln!(
                *s,
                "- {} / {}: {}",
                r.scenario.key(),
                r.contender.key(),
                kinds.join("; ")
            );
        }
    }
}

/// Fewer samples than this on either side and a ratio is noise.
pub const MIN_SAMPLE: usize = 20;

/// `a / b`, or what stands in for it when `b` is 0.
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else if a == 0.0 {
        "both 0".to_owned()
    } else {
        "baseline 0".to_owned()
    }
}

/// A ratio of two counts, or both counts when both are small.
fn count_ratio(a: usize, b: usize) -> String {
    if a < MIN_SAMPLE && b < MIN_SAMPLE {
        format!("{a} vs {b}")
    } else {
        ratio(a as f64, b as f64)
    }
}

/// The ratio of two p99s, only when both rest on enough requests.
fn latency_ratio(a: &Latency, b: &Latency) -> String {
    if a.n < MIN_SAMPLE || b.n < MIN_SAMPLE {
        "-".to_owned()
    } else {
        ratio(a.p99_ms, b.p99_ms)
    }
}

/// The ratio of the "all back" times, only when both fronts lost enough
/// streams and got every one back.
fn back_ratio(a: &RunResult, b: &RunResult) -> String {
    match (a.watch_all_back_ms, b.watch_all_back_ms) {
        (Some(x), Some(y))
            if a.watch_streams_lost >= MIN_SAMPLE && b.watch_streams_lost >= MIN_SAMPLE =>
        {
            ratio(x, y)
        }
        _ => "-".to_owned(),
    }
}

/// A latency cell: p50/p99, with the sample size when it is small.
fn latency_cell(l: &Latency) -> String {
    if l.n == 0 {
        "-".to_owned()
    } else if l.n < MIN_SAMPLE {
        format!("{:.1}/{:.1} ms (n={})", l.p50_ms, l.p99_ms, l.n)
    } else {
        format!("{:.1}/{:.1} ms", l.p50_ms, l.p99_ms)
    }
}

/// Which figure of a plot bucket a line shows.
type BucketValue = fn(&super::analysis::Bucket) -> f64;

/// One SVG per scenario: one panel per front.
fn plot(path: &Path, scenario: Scenario, runs: &[&RunResult]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (960, 300 * runs.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((runs.len().max(1), 1));
    let x0 = runs
        .iter()
        .filter_map(|r| r.series.first().map(|b| b.t_s))
        .fold(f64::INFINITY, f64::min);
    let x1 = runs
        .iter()
        .filter_map(|r| r.series.last().map(|b| b.t_s + 0.25))
        .fold(f64::NEG_INFINITY, f64::max);
    let (x0, x1) = if x0 < x1 { (x0, x1) } else { (0.0, 1.0) };
    let ymax = runs
        .iter()
        .flat_map(|r| r.series.iter())
        .map(|b| b.ok_rps.max(b.failed_rps).max(b.watch_lost_ps))
        .fold(1.0, f64::max)
        * 1.1;
    for (area, r) in panels.iter().zip(runs) {
        let fault = r.markers.first().map_or(0, |m| m.at_ns);
        let caption = format!(
            "{} — {}: {}",
            scenario.key(),
            r.contender.key(),
            scenario.describe()
        );
        let mut chart = panel(
            area,
            &caption,
            x0..x1,
            ymax,
            ("s from the first fault", "per second"),
        )?;
        let series: [(&str, RGBColor, BucketValue); 3] = [
            ("requests ok/s", BLUE, |b| b.ok_rps),
            ("failed requests+connects/s", RED, |b| b.failed_rps),
            ("watch streams lost/s", RGBColor(230, 140, 0), |b| {
                b.watch_lost_ps
            }),
        ];
        for (label, color, value) in series {
            line(
                &mut chart,
                label,
                color,
                r.series.iter().map(|b| (b.t_s, value(b))),
            )?;
        }
        markers_and_legend(&mut chart, &r.markers, fault, ymax)?;
    }
    root.present()?;
    Ok(())
}

/// A plot panel: seconds across, a figure up.
pub(super) type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A panel on `area` with `caption` above it, `x` (seconds) across and 0
/// to `ymax` up, its mesh drawn with the axis descriptions `x_desc` and
/// `y_desc`.
pub(super) fn panel<'a, 'b: 'a>(
    area: &DrawingArea<SVGBackend<'b>, Shift>,
    caption: &str,
    x: Range<f64>,
    ymax: f64,
    (x_desc, y_desc): (&str, &str),
) -> anyhow::Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(x, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    Ok(chart)
}

/// Draws `points` on a panel as a 2-pixel `color` line with the legend
/// entry `label`.
pub(super) fn line<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    label: impl Into<String>,
    color: RGBColor,
    points: impl IntoIterator<Item = (f64, f64)>,
) -> anyhow::Result<()> {
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    Ok(())
}

/// A panel's fault markers (a vertical line and its label each, time 0 at
/// `origin_ns`) and its legend box.
pub(super) fn markers_and_legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    markers: &[super::Marker],
    origin_ns: u64,
    ymax: f64,
) -> anyhow::Result<()> {
    for m in markers {
        let t = (m.at_ns as f64 - origin_ns as f64) / 1e9;
        chart.draw_series(LineSeries::new(
            vec![(t, 0.0), (t, ymax)],
            BLACK.stroke_width(1),
        ))?;
        chart.draw_series(std::iter::once(Text::new(
            m.label.clone(),
            (t, ymax * 0.95),
            ("sans-serif", 12),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report says the command that ran it: a direct run as typed
    /// (it used to say `cargo xtask bench` whatever ran it), xtask's own
    /// line when xtask ran it, each with the variables that changed it.
    #[test]
    fn the_command_line_is_the_one_that_ran() {
        let argv = |s: &str| {
            s.split(' ')
                .map(str::to_owned)
                .collect::<Vec<_>>()
                .into_iter()
        };
        let direct = command_line(
            None,
            argv("/w/target/release/bulwark-bench suite --out-dir d storm-reset"),
            &[(BGP_BFD_ENV, None), (TOOLS_ENV, Some("/w/.tools".into()))],
        );
        assert_eq!(
            direct,
            "BULWARK_TOOLS_DIR=/w/.tools bulwark-bench suite --out-dir d storm-reset"
        );
        let xtask = command_line(
            Some("cargo xtask bench link-cut --quick".into()),
            argv("/w/target/release/bulwark-bench suite --out-dir d --quick link-cut"),
            &[
                (BGP_BFD_ENV, Some("1".into())),
                (TOOLS_ENV, Some("/w/.tools".into())),
            ],
        );
        assert_eq!(
            xtask,
            "BULWARK_BENCH_BGP_BFD=1 cargo xtask bench link-cut --quick"
        );
    }

    fn lat(n: usize, p99_ms: f64) -> Latency {
        Latency {
            n,
            p50_ms: 1.0,
            p99_ms,
        }
    }

    #[test]
    fn a_p99_of_a_handful_of_requests_gets_no_ratio() {
        assert_eq!(latency_ratio(&lat(500, 15.7), &lat(3, 0.3)), "-");
        assert_eq!(latency_ratio(&lat(19, 15.7), &lat(500, 0.3)), "-");
        assert_eq!(latency_ratio(&lat(20, 10.0), &lat(20, 5.0)), "2.00");
        assert_eq!(latency_cell(&lat(3, 0.3)), "1.0/0.3 ms (n=3)");
        assert_eq!(latency_cell(&lat(300, 0.3)), "1.0/0.3 ms");
        assert_eq!(latency_cell(&lat(0, f64::NAN)), "-");
    }

    #[test]
    fn small_counts_show_both_counts_instead_of_a_ratio() {
        assert_eq!(count_ratio(4, 1), "4 vs 1");
        assert_eq!(count_ratio(0, 0), "0 vs 0");
        assert_eq!(count_ratio(4, 1401), "0.00");
        assert_eq!(count_ratio(159, 1401), "0.11");
        assert_eq!(count_ratio(30, 0), "baseline 0");
    }
}
