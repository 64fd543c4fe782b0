//! The suite's report: `<date>-suite.md` (tables, ratios, machine,
//! command), `<date>-suite.json` (every figure and the plot series) and one
//! SVG per scenario (`<date>-suite-<scenario>.svg`): requests/s, failures/s
//! and watch streams lost/s over time with the fault markers, bulwark above
//! the baseline.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use plotters::prelude::*;
use serde::Serialize;

use super::analysis::{Latency, RunResult};
use super::{Args, Contender, Params, Scenario};

/// Everything the run produced.
#[derive(Serialize)]
pub struct Report {
    suite: &'static str,
    date: String,
    command: String,
    quick: bool,
    duration_s: f64,
    machine: BTreeMap<String, String>,
    loadavg_before: String,
    loadavg_after: String,
    params: Params,
    runs: Vec<RunResult>,
}

impl Report {
    /// Collects the run.
    pub fn new(
        args: &Args,
        params: Params,
        runs: Vec<RunResult>,
        loadavg_before: String,
        loadavg_after: String,
        took: Duration,
    ) -> Self {
        let mut machine = crate::datapath::machine();
        machine.remove("wrk");
        let keepalived = std::process::Command::new("/usr/sbin/keepalived")
            .arg("--version")
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&[o.stdout, o.stderr].concat())
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default();
        machine.insert("keepalived".into(), keepalived);
        let mem_gib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024 / 1024);
        machine.insert("memory".into(), format!("{mem_gib} GiB"));
        let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let mut command = String::from("cargo xtask bench");
        if let Some(s) = args.scenario {
            let _ = write!(command, " {}", s.key());
        }
        if args.quick {
            command.push_str(" --quick");
        }
        Self {
            suite: "failover-suite",
            date,
            command,
            quick: args.quick,
            duration_s: took.as_secs_f64(),
            machine,
            loadavg_before,
            loadavg_after,
            params,
            runs,
        }
    }

    fn stem(&self) -> String {
        format!("{}-suite", &self.date[..10])
    }

    /// Writes the markdown, the JSON and the plots.
    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out)?;
        let stem = self.stem();
        let mut plots = Vec::new();
        for scenario in self.scenarios() {
            let file = format!("{stem}-{}.svg", scenario.key());
            plot(&out.join(&file), scenario, &self.runs_of(scenario))?;
            plots.push((scenario, file));
        }
        std::fs::write(
            out.join(format!("{stem}.json")),
            serde_json::to_string_pretty(self)?,
        )?;
        let md = self.markdown(&plots);
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

    /// bulwark first, then the baseline.
    fn runs_of(&self, s: Scenario) -> Vec<&RunResult> {
        let mut v: Vec<&RunResult> = self.runs.iter().filter(|r| r.scenario == s).collect();
        v.sort_by_key(|r| r.contender != Contender::Bulwark);
        v
    }

    fn markdown(&self, plots: &[(Scenario, String)]) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Failover suite ({})\n", self.date);
        let _ = writeln!(
            s,
            "Command: `{}` (as root; it builds bulwark-lb, bulwark-prober, the fixture apiserver and bulwark-bench in release, runs setup, then `bulwark-bench suite`). The run took {:.0} s.\n",
            self.command, self.duration_s
        );
        let _ = writeln!(s, "Machine: {}.\n", crate::datapath::kv(&self.machine));
        let _ = writeln!(
            s,
            "Load average (1/5/15 min) before: {}, after: {}. The machine is shared with other builds: compare the two fronts within this run, not across runs.\n",
            self.loadavg_before, self.loadavg_after
        );
        let p = &self.params;
        let _ = writeln!(
            s,
            "Topology: network namespaces on one bridge: 3 LB hosts (zones a, b, c), 3 fixture apiservers (the testkit's kube-apiserver test double; shutdown delay 3 s, grace 5 s) on their own hosts in zones a, b, c, one client host. **bulwark**: `bulwark-lb` on each LB host, arp-mode VIP, default timers, and a `bulwark-prober` per zone on that zone's LB host (default probing) feeding the LB's health verdicts. **keepalived+haproxy**: the kubeadm HA guide's setup: keepalived VRRP (defaults, advert 1 s, one MASTER at 101, two BACKUPs at 100) and HAProxy `mode tcp` with `option httpchk GET /healthz`, `http-check expect status 200`, `check check-ssl verify none`, `inter 2s fall 3 rise 2`, `retries 1`, `option redispatch`. Both run on the same hosts in the same run, one after the other, order alternating by scenario.\n"
        );
        let _ = writeln!(
            s,
            "Load (from the client host, over HTTPS through the VIP, HTTP/2): {} watch clients holding a watch stream each ({} in the reconnect storm; a stream silent for 2.5 s is re-established after a 100-300 ms backoff), {} short-request clients at {} req/s each (half keep their connection, half connect per request; 1 s timeout for connects and requests). {} s of load before the fault, {} s after; \"during\" is from the first fault to {} s after the last.\n",
            p.watchers, p.storm_watchers, p.requesters, p.rate, p.before_s, p.after_s, p.during_s
        );
        let _ = writeln!(
            s,
            "| scenario | front | gap | failed req | failed conn | watches lost | all back | detect | VIP moved | two holders | p50/p99 before | during | after |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ms"));
        let lat = |l: &Latency| {
            if l.n == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}/{:.1} ms", l.p50_ms, l.p99_ms)
            }
        };
        for sc in self.scenarios() {
            for r in self.runs_of(sc) {
                let back = if r.watch_never_back > 0 {
                    format!("{} never", r.watch_never_back)
                } else {
                    f(r.watch_all_back_ms)
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} ms | {}/{} | {}/{} | {}/{} | {} | {} | {} | {:.0} ms | {} | {} | {} |",
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
                    f(r.time_to_detect_ms),
                    f(r.vip_moved_ms),
                    r.two_holders_ms,
                    lat(&r.latency_before),
                    lat(&r.latency_during),
                    lat(&r.latency_after),
                );
            }
        }
        let _ = writeln!(
            s,
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
            let ratio = |a: f64, b: f64| {
                if b > 0.0 {
                    format!("{:.2}", a / b)
                } else if a == 0.0 {
                    "both 0".to_owned()
                } else {
                    "baseline 0".to_owned()
                }
            };
            let back = match (b.watch_all_back_ms, k.watch_all_back_ms) {
                (Some(x), Some(y)) => ratio(x, y),
                _ => "-".to_owned(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                sc.key(),
                ratio(b.gap_ms, k.gap_ms),
                ratio(b.failed_requests as f64, k.failed_requests as f64),
                ratio(b.failed_connects as f64, k.failed_connects as f64),
                back,
                ratio(b.latency_during.p99_ms, k.latency_during.p99_ms),
            );
        }
        let _ = writeln!(
            s,
            "\n## How to read it\n\n- **gap**: the longest time between two successful short requests (all clients together) ending after the fault; steady state is a few ms.\n- **failed req / conn**: failed short requests and failed connects (TCP + TLS + HTTP/2) from the fault on, out of all attempted.\n- **watches lost / all back**: watch streams lost after the fault, out of all watch clients, and the time from the fault until the last of them had its stream again.\n- **detect**: VIP scenarios: bulwark's failover record (last contact with the old leader to election won); baseline: the fault to keepalived logging `Entering MASTER STATE` on another host. Backend scenarios (apiserver kill / shutdown, prober isolated): the fault to bulwark's leader logging a committed verdict change (`verdict committed`), or to HAProxy logging a server DOWN; logs polled every 20 ms. In `prober-isolated` a figure here means a verdict changed: for bulwark that would be a wrong eviction; HAProxy on the cut-off host marks its servers down, which harms no client while that host does not hold the VIP.\n- **VIP moved**: the fault to an `ip addr` sampler (every ~10 ms) first seeing the VIP on another host (same yardstick for both).\n- **two holders**: time the sampler saw the VIP on more than one host. After a SIGKILL the dead node's address stays behind (both fronts); after a partition only a fenced leader gives it up.\n- **p50/p99**: successful short requests by start time: before the fault, during, after.\n"
        );
        let _ = writeln!(s, "## Failures by kind\n");
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
                s,
                "- {} / {}: {}",
                r.scenario.key(),
                r.contender.key(),
                kinds.join("; ")
            );
        }
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
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{} — {}: {}",
                    scenario.key(),
                    r.contender.key(),
                    scenario.describe()
                ),
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(x0..x1, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("s from the first fault")
            .y_desc("per second")
            .draw()?;
        let series: [(&str, RGBColor, BucketValue); 3] = [
            ("requests ok/s", BLUE, |b| b.ok_rps),
            ("failed requests+connects/s", RED, |b| b.failed_rps),
            ("watch streams lost/s", RGBColor(230, 140, 0), |b| {
                b.watch_lost_ps
            }),
        ];
        for (label, color, value) in series {
            chart
                .draw_series(LineSeries::new(
                    r.series.iter().map(|b| (b.t_s, value(b))),
                    color.stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        for m in &r.markers {
            let t = (m.at_ns as f64 - fault as f64) / 1e9;
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
    }
    root.present()?;
    Ok(())
}
