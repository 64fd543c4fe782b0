//! Scenario `distribution`: how evenly each front spreads the load over the
//! three apiservers, what one apiserver's crash costs, and how long a
//! restarted apiserver takes to carry its share again, with the
//! apiservers' goaway chance off and on (kube-apiserver's
//! `--goaway-chance`, which the fixture apiserver imitates).
//!
//! One run per front and goaway chance, on the suite's topology:
//!
//! ```text
//! apiservers restarted with the run's goaway chance (if it changed)
//! front up ─ load up (every watcher streaming) ─┬─ steady ─┬─ down ─┬─ recovery ─┐
//!                                               ready     SIGKILL  restart      stop
//!                                                         api-a    api-a
//! ```
//!
//! The load is client-go-like (`load.rs`): each watcher holds one HTTP/2
//! connection carrying its watch (re-established on the same connection at
//! its `timeoutSeconds`) and its own short requests; short-request clients,
//! half of them connecting per request. A GOAWAY moves a client's next
//! requests and its next watch to a new connection; a watch already
//! running stays on the old one until it ends, as in kube.
//!
//! Measured on the apiservers' side (their stats, sampled every 250 ms over
//! the control sockets, the same for both fronts), so what counts is where
//! the connections and requests really land:
//! - shares, over the steady window: live connections (median of the
//!   samples), new connections and requests (counter increments), each as
//!   the three apiservers' shares and the max/min ratio;
//! - watches lost: watchers whose stream failed after the SIGKILL, out of
//!   all watchers (from the load driver's events);
//! - recovery: from the restart to the first sample where the restarted
//!   apiserver holds at least 80 % of its fair share (a third) of all live
//!   connections.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bulwark_testkit::fixture::{ControlClient, Stats};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::load::{self, Event, Kind, now_ns};
use super::report::{self, FailedRun};
use super::{Contender, LoadSpec, Marker, Scenario, Topology, ZONES};

/// The goaway chance of the runs with it on, unless `--goaway-chance`
/// says otherwise: kube-apiserver's largest. A client moves after about
/// 1 / (chance × its requests per second) seconds; at 0.02 and the load's
/// ~2 draws per second per watcher that is ~25 s, so the move shows within
/// the run; at 0.001 (the GUIDE's production advice, where minutes do not
/// matter) it would take ~500 s.
pub const DEFAULT_GOAWAY_CHANCE: f64 = 0.02;

/// The restarted apiserver has recovered at this fraction of its fair
/// share of the live connections.
const RECOVERED: f64 = 0.8;

/// Targets shown in the report.
const TARGET_MAX_MIN: f64 = 1.15;
const TARGET_WATCHES_LOST_PCT: f64 = 40.0;

/// How often the apiservers' stats are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Sizes and schedule of the distribution runs.
#[derive(Clone, Debug, Serialize)]
pub struct DistParams {
    pub watchers: usize,
    /// Short-request clients (half connect per request) and each one's rate.
    pub requesters: usize,
    pub rate: f64,
    /// Short requests per second each watcher sends on its connection.
    pub watcher_rate: f64,
    /// Watches last between this and twice this (client-go: 5-10 min).
    pub watch_timeout_s: u64,
    /// Load before the SIGKILL, while api-a is down, after its restart.
    pub steady_s: f64,
    pub down_s: f64,
    pub recovery_s: f64,
    /// The goaway chances run (0 first).
    pub goaway_chances: Vec<f64>,
}

impl DistParams {
    /// 60 s of load with 600 watchers; `--quick`: 30 s with 150.
    pub fn new(quick: bool, goaway_chance: f64) -> Self {
        let (watchers, requesters, steady_s, down_s, recovery_s) = if quick {
            (150, 8, 6.0, 3.0, 21.0)
        } else {
            (600, 16, 12.0, 5.0, 43.0)
        };
        Self {
            watchers,
            requesters,
            rate: 20.0,
            watcher_rate: 2.0,
            watch_timeout_s: 10,
            steady_s,
            down_s,
            recovery_s,
            goaway_chances: vec![0.0, goaway_chance],
        }
    }
}

/// One apiserver's share of something, and the spread.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Shares {
    /// Per apiserver (zones a, b, c), the count (or median for live
    /// connections).
    pub values: [f64; 3],
    /// Each as a fraction of the sum.
    pub shares: [f64; 3],
    /// max / min; `None` when one apiserver got nothing.
    pub max_min: Option<f64>,
}

impl Shares {
    fn of(values: [f64; 3]) -> Self {
        let sum: f64 = values.iter().sum();
        let shares = values.map(|v| if sum > 0.0 { v / sum } else { 0.0 });
        let max = values.iter().copied().fold(f64::MIN, f64::max);
        let min = values.iter().copied().fold(f64::MAX, f64::min);
        Self {
            values,
            shares,
            max_min: (min > 0.0).then(|| max / min),
        }
    }
}

/// Live connections per apiserver at one time (`None`: no answer).
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// s from the SIGKILL.
    pub t_s: f64,
    pub active: [Option<u64>; 3],
}

/// The figures of one run.
#[derive(Clone, Debug, Serialize)]
pub struct DistributionResult {
    pub contender: Contender,
    pub goaway_chance: f64,
    pub watchers: usize,
    pub live_connections: Shares,
    pub new_connections: Shares,
    pub requests: Shares,
    pub watches_lost: usize,
    pub watches_lost_pct: f64,
    /// Restart to 80 % of the fair share of live connections, s; `None`:
    /// not within the run.
    pub recovery_s: Option<f64>,
    /// The restarted apiserver's share of the live connections at the end.
    pub final_share: Option<f64>,
    pub goaways: u64,
    pub failed_requests: usize,
    pub requests_after_kill: usize,
    pub failed_connects: usize,
    pub connects_after_kill: usize,
    pub markers: Vec<Marker>,
    pub series: Vec<Point>,
}

impl DistributionResult {
    /// A progress line.
    pub fn one_line(&self) -> String {
        format!(
            "max/min live {} new {} req {}, watches lost {}/{} ({:.0} %), recovery {}, {} GOAWAYs",
            ratio_cell(self.live_connections.max_min),
            ratio_cell(self.new_connections.max_min),
            ratio_cell(self.requests.max_min),
            self.watches_lost,
            self.watchers,
            self.watches_lost_pct,
            recovery_cell(self.recovery_s),
            self.goaways,
        )
    }
}

/// Every run of the scenario: each front (in `order`) with each goaway
/// chance; a run that fails is reported and the next goes on. The
/// apiservers are back at chance 0 afterwards, for the other scenarios.
pub async fn run_all(
    topo: &mut Topology,
    order: [Contender; 2],
    p: &DistParams,
) -> anyhow::Result<(Vec<DistributionResult>, Vec<FailedRun>)> {
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for &chance in &p.goaway_chances {
        for contender in order {
            eprintln!(
                "suite: distribution / {} / goaway-chance {chance}",
                contender.key()
            );
            match run_one(topo, contender, chance, p).await {
                Ok(r) => {
                    eprintln!("suite:   {}", r.one_line());
                    results.push(r);
                }
                Err(e) => {
                    let error = format!("goaway-chance {chance}: {e:#}");
                    eprintln!("suite:   FAILED: {error}");
                    failed.push(FailedRun {
                        scenario: Scenario::Distribution,
                        contender,
                        error,
                    });
                    topo.heal()
                        .await
                        .context("healing the lab after a failed run")?;
                    super::clear_vip(topo.lb_hosts(), topo.vip_of(contender));
                }
            }
        }
    }
    topo.set_goaway_chance(0.0).await?;
    Ok((results, failed))
}

async fn run_one(
    topo: &mut Topology,
    contender: Contender,
    chance: f64,
    p: &DistParams,
) -> anyhow::Result<DistributionResult> {
    topo.set_goaway_chance(chance).await?;
    let front = super::start_front(topo, contender).await?;
    let spec = LoadSpec {
        name: format!("distribution-{}-{chance}", contender.key()),
        watchers: p.watchers,
        requesters: p.requesters,
        rate: p.rate,
        vip: topo.vip,
        extra: vec![
            format!("--watcher-rate={}", p.watcher_rate),
            format!("--watch-timeout={}s", p.watch_timeout_s),
            "--follow-goaway".to_owned(),
        ],
    };
    let (mut load, csv) = super::spawn_load(topo, &spec).await?;
    let ready_ns = now_ns();
    let sampler = Sampler::start(topo.apis.iter().map(|a| a.control().clone()).collect());

    let mut markers = Vec::new();
    tokio::time::sleep(Duration::from_secs_f64(p.steady_s)).await;
    super::mark(&mut markers, "SIGKILL api-a");
    topo.apis[0].kill()?;
    tokio::time::sleep(Duration::from_secs_f64(p.down_s)).await;
    topo.apis[0].restart().await?;
    super::mark(&mut markers, "api-a restarted");
    tokio::time::sleep(Duration::from_secs_f64(p.recovery_s)).await;

    load.stop().await?;
    let samples = sampler.finish().await;
    topo.heal().await?;
    front.shutdown().await?;
    super::clear_vip(topo.lb_hosts(), topo.vip_of(contender));

    let events = load::read_events(&csv)?;
    Ok(analyse(&Input {
        contender,
        goaway_chance: chance,
        watchers: p.watchers,
        ready_ns,
        markers,
        samples: &samples,
        events: &events,
    }))
}

/// One sample of the three apiservers' stats.
#[derive(Clone, Debug)]
struct Sample {
    at_ns: u64,
    stats: [Option<Stats>; 3],
}

/// Polls the apiservers' stats over their control sockets until finished.
struct Sampler {
    stop: CancellationToken,
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(controls: Vec<ControlClient>) -> Self {
        let stop = CancellationToken::new();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), samples.clone());
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SAMPLE_EVERY);
            while !s.is_cancelled() {
                ticks.tick().await;
                let at_ns = now_ns();
                let mut stats = [None; 3];
                for (slot, c) in stats.iter_mut().zip(&controls) {
                    // A killed apiserver's socket refuses at once.
                    *slot = tokio::time::timeout(Duration::from_millis(200), c.stats())
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                if let Ok(mut v) = out.lock() {
                    v.push(Sample { at_ns, stats });
                }
            }
        });
        Self {
            stop,
            samples,
            task,
        }
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.cancel();
        let _ = self.task.await;
        self.samples.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// What one run produced.
struct Input<'a> {
    contender: Contender,
    goaway_chance: f64,
    watchers: usize,
    ready_ns: u64,
    /// The SIGKILL, then the restart.
    markers: Vec<Marker>,
    samples: &'a [Sample],
    events: &'a [Event],
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Computes the figures (module header).
fn analyse(i: &Input<'_>) -> DistributionResult {
    let kill = i.markers.first().map_or(i.ready_ns, |m| m.at_ns);
    let restart = i.markers.get(1).map_or(kill, |m| m.at_ns);
    let steady: Vec<[Stats; 3]> = i
        .samples
        .iter()
        .filter(|s| s.at_ns >= i.ready_ns && s.at_ns < kill)
        .filter_map(|s| all_three(&s.stats))
        .collect();
    let counter_delta = |f: fn(&Stats) -> u64| -> [f64; 3] {
        match (steady.first(), steady.last()) {
            (Some(a), Some(b)) => std::array::from_fn(|k| f(&b[k]).saturating_sub(f(&a[k])) as f64),
            _ => [0.0; 3],
        }
    };
    let live: [f64; 3] = std::array::from_fn(|k| {
        crate::stats::median(steady.iter().map(|s| s[k].active_connections as f64))
    });

    let mut lost = vec![false; i.watchers];
    for e in i
        .events
        .iter()
        .filter(|e| e.kind == Kind::WatchDown && e.client < i.watchers && e.end_ns >= kill)
    {
        lost[e.client] = true;
    }
    let watches_lost = lost.iter().filter(|&&l| l).count();
    let after_kill = |kind: Kind| -> Vec<&Event> {
        i.events
            .iter()
            .filter(|e| e.kind == kind && e.end_ns >= kill)
            .collect()
    };
    let requests = after_kill(Kind::Request);
    let connects = after_kill(Kind::Connect);

    // The restarted apiserver's share of all live connections, from the
    // restart on.
    let share_after: Vec<(u64, f64)> = i
        .samples
        .iter()
        .filter(|s| s.at_ns >= restart)
        .filter_map(|s| {
            let all = all_three(&s.stats)?;
            let total: u64 = all.iter().map(|x| x.active_connections).sum();
            (total > 0).then(|| (s.at_ns, all[0].active_connections as f64 / total as f64))
        })
        .collect();
    let recovery_s = share_after
        .iter()
        .find(|(_, share)| *share >= RECOVERED / 3.0)
        .map(|(t, _)| secs(t - restart));

    DistributionResult {
        contender: i.contender,
        goaway_chance: i.goaway_chance,
        watchers: i.watchers,
        live_connections: Shares::of(live),
        new_connections: Shares::of(counter_delta(|s| s.connections)),
        requests: Shares::of(counter_delta(|s| s.requests)),
        watches_lost,
        watches_lost_pct: if i.watchers == 0 {
            0.0
        } else {
            100.0 * watches_lost as f64 / i.watchers as f64
        },
        recovery_s,
        final_share: share_after.last().map(|(_, s)| *s),
        goaways: goaways(i.samples),
        failed_requests: requests.iter().filter(|e| !e.ok).count(),
        requests_after_kill: requests.len(),
        failed_connects: connects.iter().filter(|e| !e.ok).count(),
        connects_after_kill: connects.len(),
        markers: i.markers.clone(),
        series: i
            .samples
            .iter()
            .map(|s| Point {
                t_s: (s.at_ns as f64 - kill as f64) / 1e9,
                active: s.stats.map(|x| x.map(|x| x.active_connections)),
            })
            .collect(),
    }
}

fn all_three(stats: &[Option<Stats>; 3]) -> Option<[Stats; 3]> {
    Some([stats[0]?, stats[1]?, stats[2]?])
}

/// GOAWAYs sent over the run, all apiservers: the counters' increments,
/// so a restarted apiserver's counter starting over is no loss.
fn goaways(samples: &[Sample]) -> u64 {
    let mut total = 0;
    for k in 0..3 {
        let mut last: Option<u64> = None;
        for s in samples {
            let Some(stats) = s.stats[k] else { continue };
            total += match last {
                Some(l) if stats.goaways >= l => stats.goaways - l,
                // Restarted: everything counted since its start is new.
                Some(_) => stats.goaways,
                None => 0,
            };
            last = Some(stats.goaways);
        }
    }
    total
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("∞".to_owned(), |r| format!("{r:.2}"))
}

fn recovery_cell(r: Option<f64>) -> String {
    r.map_or("not within the run".to_owned(), |r| format!("{r:.1} s"))
}

fn shares_cell(s: &Shares) -> String {
    let pct: Vec<String> = s
        .shares
        .iter()
        .map(|x| format!("{:.0}", x * 100.0))
        .collect();
    format!("{} % ({})", pct.join("/"), ratio_cell(s.max_min))
}

/// The report's section on this scenario.
pub fn markdown(runs: &[DistributionResult], p: &DistParams, plot: Option<&str>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## distribution: spread over the apiservers, and recovery after a restart\n\n\
         Load through the VIP: {} watchers, each one HTTP/2 connection carrying its watch (re-established on the same connection after its `timeoutSeconds`, {}-{} s) and {} short requests/s, plus {} short-request clients at {} req/s (half connect per request); a GOAWAY sends a client's next requests and next watch to a new connection, the running watch stays on the old one until it ends (client-go). {} s steady, then api-a is SIGKILLed, restarted {} s later, and {} s more. Figures from the apiservers' own counters, sampled every {} ms. Goaway chances: {:?} (kube-apiserver's `--goaway-chance`).\n",
        p.watchers,
        p.watch_timeout_s,
        2 * p.watch_timeout_s,
        p.watcher_rate,
        p.requesters,
        p.rate,
        p.steady_s,
        p.down_s,
        p.recovery_s,
        SAMPLE_EVERY.as_millis(),
        p.goaway_chances,
    );
    let _ = writeln!(
        s,
        "Targets: max/min share ≤ {TARGET_MAX_MIN} for bulwark; watches lost on the kill ≤ {TARGET_WATCHES_LOST_PCT:.0} % of the streams.\n"
    );
    let _ = writeln!(
        s,
        "| front | goaway-chance | live connections a/b/c (max/min) | new connections | requests | watches lost | recovery to {:.0} % of fair share | api-a's share at the end | GOAWAYs | failed req | failed conn |\n|---|---|---|---|---|---|---|---|---|---|---|",
        RECOVERED * 100.0
    );
    for r in runs {
        // ✗ marks a bulwark figure that misses its target.
        let mark = |miss: bool| {
            if miss && r.contender == Contender::Bulwark {
                " ✗"
            } else {
                ""
            }
        };
        let share = |x: &Shares| {
            let miss = !x.max_min.is_some_and(|m| m <= TARGET_MAX_MIN);
            format!("{}{}", shares_cell(x), mark(miss))
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {}/{} ({:.0} %){} | {} | {} | {} | {}/{} | {}/{} |",
            r.contender.key(),
            r.goaway_chance,
            share(&r.live_connections),
            share(&r.new_connections),
            share(&r.requests),
            r.watches_lost,
            r.watchers,
            r.watches_lost_pct,
            mark(r.watches_lost_pct > TARGET_WATCHES_LOST_PCT),
            recovery_cell(r.recovery_s),
            r.final_share
                .map_or("-".to_owned(), |x| format!("{:.0} %", x * 100.0)),
            r.goaways,
            r.failed_requests,
            r.requests_after_kill,
            r.failed_connects,
            r.connects_after_kill,
        );
    }
    let _ = writeln!(
        s,
        "\n- **shares**: over the steady window, each apiserver's share of the live connections (median of the samples), of the connections it accepted and of the requests it answered (health checks included: a handful next to the load); ∞ when one apiserver got none. ✗ marks a bulwark figure that misses its target.\n\
         - **watches lost**: watchers whose stream failed after the SIGKILL (a balanced front loses about a third).\n\
         - **failed req**: short requests that failed from the SIGKILL on; a request a GOAWAY refused before it was sent is sent again on a new connection (client-go's transport does the same) and is not a failure.\n\
         - **recovery**: from the restart until api-a holds {:.0} % of a third of all live connections. Without the goaway chance, HTTP/2 clients never leave the survivors: only new clients land on api-a. With it, each request moves its client with that chance; a front that sends new connections to the least-loaded apiserver refills api-a faster than round-robin, which gives it only a third of the movers. The chance sets the pace: a client making r requests/s moves after about 1/(chance·r) s, so 0.02 shows the move within this run and 0.001 (what GUIDE recommends in production) would take ~20× longer.\n",
        RECOVERED * 100.0
    );
    if let Some(file) = plot {
        let _ = writeln!(
            s,
            "![distribution]({file})\n\nLive connections per apiserver over time, one panel per run; lines at the SIGKILL and the restart.\n"
        );
    }
    s
}

/// One SVG: a panel per run, live connections per apiserver over time.
pub fn plot(path: &std::path::Path, runs: &[DistributionResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 260 * runs.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((runs.len().max(1), 1));
    let points = || runs.iter().flat_map(|r| r.series.iter());
    let x0 = points().map(|p| p.t_s).fold(f64::INFINITY, f64::min);
    let x1 = points().map(|p| p.t_s).fold(f64::NEG_INFINITY, f64::max);
    let (x0, x1) = if x0 < x1 { (x0, x1) } else { (0.0, 1.0) };
    let ymax = points()
        .flat_map(|p| p.active.iter().flatten())
        .copied()
        .max()
        .unwrap_or(1) as f64
        * 1.1;
    let colors = [BLUE, RED, RGBColor(0, 150, 0)];
    for (area, r) in panels.iter().zip(runs) {
        let caption = format!(
            "distribution — {}, goaway-chance {}",
            r.contender.key(),
            r.goaway_chance
        );
        let mut chart = report::panel(
            area,
            &caption,
            x0..x1,
            ymax,
            ("s from the SIGKILL", "live connections"),
        )?;
        for (k, color) in colors.into_iter().enumerate() {
            report::line(
                &mut chart,
                format!("api-{}", ZONES[k]),
                color,
                r.series
                    .iter()
                    .filter_map(|p| p.active[k].map(|a| (p.t_s, a as f64))),
            )?;
        }
        let kill = r.markers.first().map_or(0, |m| m.at_ns);
        report::markers_and_legend(&mut chart, &r.markers, kill, ymax)?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use bulwark_testkit::fixture::Phase;

    use super::*;

    fn stats(active: u64, connections: u64, requests: u64, goaways: u64) -> Stats {
        Stats {
            requests,
            connections,
            active_connections: active,
            goaways,
            open_streams: 0,
            ready: true,
            phase: Phase::Serving,
        }
    }

    fn sample(at_s: u64, three: [Option<Stats>; 3]) -> Sample {
        Sample {
            at_ns: at_s * 1_000_000_000,
            stats: three,
        }
    }

    fn ev(kind: Kind, client: usize, end_s: u64, ok: bool) -> Event {
        Event {
            kind,
            client,
            start_ns: end_s * 1_000_000_000,
            end_ns: end_s * 1_000_000_000,
            ok,
            detail: String::new(),
        }
    }

    #[test]
    fn shares_and_their_spread() {
        let s = Shares::of([100.0, 110.0, 90.0]);
        assert!((s.max_min.expect("all got some") - 110.0 / 90.0).abs() < 1e-9);
        assert!((s.shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert_eq!(Shares::of([10.0, 0.0, 5.0]).max_min, None);
        assert_eq!(Shares::of([0.0; 3]).shares, [0.0; 3]);
    }

    #[test]
    fn figures_come_from_the_samples_and_events() {
        let s = |a, c, r, g| Some(stats(a, c, r, g));
        // Ready at 0, SIGKILL at 10, restart at 15; api-a comes back to 10,
        // then 30 of 100 live connections (80 % of a third is 26.7).
        let samples = vec![
            sample(0, [s(30, 30, 0, 0), s(30, 30, 0, 0), s(30, 30, 0, 0)]),
            sample(5, [s(32, 40, 500, 1), s(30, 45, 550, 0), s(28, 50, 450, 0)]),
            sample(
                9,
                [s(30, 60, 1000, 2), s(30, 60, 1100, 1), s(30, 60, 900, 0)],
            ),
            sample(12, [None, s(45, 70, 1500, 1), s(45, 70, 1300, 0)]),
            sample(
                16,
                [s(10, 10, 10, 1), s(45, 70, 1600, 2), s(45, 70, 1400, 0)],
            ),
            sample(
                20,
                [s(30, 40, 200, 3), s(35, 70, 1700, 2), s(35, 70, 1500, 0)],
            ),
        ];
        let events = vec![
            ev(Kind::WatchDown, 0, 10, false),
            ev(Kind::WatchDown, 0, 11, false),
            ev(Kind::WatchDown, 1, 10, false),
            // Before the kill: not counted.
            ev(Kind::WatchDown, 2, 3, false),
            // A requester (id ≥ watchers): not a watch.
            ev(Kind::WatchDown, 5, 10, false),
            ev(Kind::Request, 5, 11, false),
            ev(Kind::Request, 5, 12, true),
            ev(Kind::Connect, 5, 11, false),
        ];
        let marker = |t: u64, l: &str| Marker {
            at_ns: t * 1_000_000_000,
            label: l.into(),
        };
        let r = analyse(&Input {
            contender: Contender::Bulwark,
            goaway_chance: 0.02,
            watchers: 4,
            ready_ns: 0,
            markers: vec![marker(10, "kill"), marker(15, "restart")],
            samples: &samples,
            events: &events,
        });
        assert_eq!(r.requests.values, [1000.0, 1100.0, 900.0]);
        assert_eq!(r.new_connections.values, [30.0; 3]);
        assert_eq!(r.live_connections.values, [30.0, 30.0, 30.0]);
        assert!((r.requests.max_min.expect("all served") - 1100.0 / 900.0).abs() < 1e-9);
        assert_eq!((r.watches_lost, r.watchers), (2, 4));
        assert!((r.watches_lost_pct - 50.0).abs() < 1e-9);
        assert_eq!(r.recovery_s, Some(5.0));
        assert!((r.final_share.expect("a last sample") - 0.3).abs() < 1e-9);
        // api-a: 1 + 1, then 1 since its restart and 2 more; api-b: 2.
        assert_eq!(r.goaways, 2 + 3 + 2);
        assert_eq!((r.failed_requests, r.requests_after_kill), (1, 2));
        assert_eq!((r.failed_connects, r.connects_after_kill), (1, 1));
        assert_eq!(r.series.len(), samples.len());
        assert_eq!(r.series[3].active[0], None);

        // The plot draws both markers and the legend.
        let svg = tempfile::NamedTempFile::new().expect("temp file");
        plot(svg.path(), std::slice::from_ref(&r)).expect("plot");
        let drawn = std::fs::read_to_string(svg.path()).expect("svg");
        for label in ["kill", "restart", "api-a", "api-c"] {
            assert!(drawn.contains(label), "{label} missing from the plot");
        }
    }

    #[test]
    fn no_recovery_when_the_restarted_apiserver_stays_short() {
        let s = |a| Some(stats(a, 0, 0, 0));
        let samples = vec![
            sample(0, [s(30), s(30), s(30)]),
            sample(20, [s(5), s(50), s(50)]),
        ];
        let r = analyse(&Input {
            contender: Contender::Baseline,
            goaway_chance: 0.0,
            watchers: 0,
            ready_ns: 0,
            markers: vec![
                Marker {
                    at_ns: 5_000_000_000,
                    label: "kill".into(),
                },
                Marker {
                    at_ns: 10_000_000_000,
                    label: "restart".into(),
                },
            ],
            samples: &samples,
            events: &[],
        });
        assert_eq!(r.recovery_s, None);
        assert_eq!(r.watches_lost_pct, 0.0);
        assert_eq!(r.goaways, 0);
    }
}
