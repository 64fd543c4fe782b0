//! Scenario `detection`: how fast a failed or shutting-down apiserver stops
//! getting new connections, bulwark against HAProxy configured as in the
//! kubeadm HA guide, side by side on the same backends in the same trials.
//!
//! Topology (all on loopback): three fixture apiservers (the testkit's
//! kube-apiserver test double) in zones a, b, c. bulwark: a one-node
//! `bulwark-lb` cluster whose node-local listener is the front, fed by three
//! real `bulwark-prober` processes (one per zone, default probing: 200 ms
//! interval, 100 ms fast interval, 300 ms timeout, fall 2, rise 2) and the
//! default aggregation (majority of zones, two votes). HAProxy 2.6: the
//! kubeadm guide's `haproxy.cfg` (mode tcp, `option httpchk`, `http-check
//! connect ssl`, `GET /healthz`, `expect status 200`, `check inter 2s fall
//! 3 rise 2 verify none`, `retries 1`, `option redispatch`).
//!
//! Per trial, one apiserver (rotating) is
//! - **killed** (SIGKILL): detection = from the kill to bulwark's committed
//!   verdict `down` (its `/metrics`), and to HAProxy's server state `DOWN`
//!   (`show stat` on its stats socket);
//! - **shut down gracefully** (SIGTERM: the fixture fails `/readyz` at once,
//!   keeps serving for `--shutdown-delay`, then closes its listener, like
//!   kube-apiserver with `--shutdown-delay-duration`): drained = from the
//!   signal to bulwark's verdict `draining` or `down`, and to HAProxy's
//!   `DOWN` (its `/healthz` check passes until the listener closes).
//!
//! Meanwhile a client opens a new TLS connection and sends `GET /version`
//! through each front every `--load-interval`; failed requests are counted
//! per front, and so is the last request the affected backend served
//! after the signal (in graceful trials). Then the backend is restarted and
//! both fronts must see it up again before the next trial. Figures are
//! medians over the trials.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulwark_lb::config::MemberConfig;
use bulwark_testkit::fixture::{ApiServerProcess, HttpsClient};
use bulwark_testkit::{Pki, cluster, config};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::datapath::free_port;
use crate::report::{ReportHead, publish};
use crate::stats::{loadavg, median, report_machine};

const ZONES: [&str; 3] = ["a", "b", "c"];
/// Longest a trial waits for a front to react.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags of `bulwark-bench detection`.
#[derive(clap::Args)]
pub struct Args {
    /// Trials per kind (kill, graceful).
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// The fixture apiservers' shutdown delay (readyz fails, requests are
    /// still served, then the listener closes).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_delay: Duration,
    /// One new client connection through each front this often.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    load_interval: Duration,
    /// The HAProxy binary.
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy: PathBuf,
    /// Where to write `<date>-detection.md` and `.json`.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Print the table only; write no files.
    #[arg(long)]
    no_write: bool,
}

/// One trial, both fronts.
#[derive(Clone, Debug, Serialize)]
struct Trial {
    kind: &'static str,
    backend: String,
    bulwark_ms: f64,
    haproxy_ms: f64,
    bulwark_failed_requests: u64,
    haproxy_failed_requests: u64,
    /// What failed requests saw (the first few per front).
    bulwark_errors: Vec<String>,
    haproxy_errors: Vec<String>,
    /// Graceful only: the last new request the backend served through
    /// each front, after the signal.
    bulwark_last_served_ms: Option<f64>,
    haproxy_last_served_ms: Option<f64>,
    requests_per_front: u64,
}

#[derive(Serialize)]
struct Row {
    kind: &'static str,
    front: &'static str,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    failed_requests: u64,
    requests: u64,
    median_last_served_ms: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    head: ReportHead,
    rows: Vec<Row>,
    trials: Vec<Trial>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    crate::runtime::two_workers()
        .context("starting the runtime")?
        .block_on(run_async(args))
}

/// A child killed on drop.
struct Child {
    name: String,
    child: tokio::process::Child,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn spawn(name: &str, program: &Path, args: &[&str], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name} ({})", program.display()))?;
    Ok(Child {
        name: name.to_owned(),
        child,
    })
}

/// `GET path` over plain HTTP (the admin servers); the body.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out))
        .await
        .context("read timed out")??;
    Ok(out)
}

/// bulwark's committed verdict of `backend` from the LB's `/metrics`.
async fn bulwark_verdict(admin: SocketAddr, backend: &str) -> anyhow::Result<Option<String>> {
    let text = http_get(admin, "/metrics").await?;
    let prefix = format!("bulwark_lb_backend_verdict{{backend=\"{backend}\",verdict=\"");
    Ok(text.lines().find_map(|l| {
        let rest = l.strip_prefix(&prefix)?;
        let (verdict, value) = rest.split_once("\"} ")?;
        (value.trim() == "1").then(|| verdict.to_owned())
    }))
}

/// HAProxy's state of `server` (`UP`, `DOWN`, `UP 1/3`...) from `show stat`.
async fn haproxy_state(socket: &Path, server: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.write_all(b"show stat\n").await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    // CSV: pxname, svname, ..., status is the 18th column.
    out.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.len() > 17 && f[0] == "apiservers" && f[1] == server)
        .map(|f| f[17].to_owned())
        .with_context(|| format!("no server {server} in HAProxy's stats"))
}

/// The kubeadm HA guide's HAProxy configuration (its checks verbatim, the
/// defaults it sets that matter here), on our addresses.
fn haproxy_config(listen: SocketAddr, socket: &Path, backends: &[(String, SocketAddr)]) -> String {
    let mut c = format!(
        "global
    stats socket {socket} mode 600 level admin
defaults
    mode tcp
    retries 1
    option redispatch
    timeout connect 5s
    timeout client 35s
    timeout server 35s
    timeout check 10s
frontend apiserver
    bind {listen}
    mode tcp
    default_backend apiservers
backend apiservers
    option httpchk
    http-check connect ssl
    http-check send meth GET uri /healthz
    http-check expect status 200
    mode tcp
    balance roundrobin
",
        socket = socket.display()
    );
    for (name, addr) in backends {
        let _ = writeln!(
            c,
            "    server {name} {addr} check inter 2s fall 3 rise 2 verify none"
        );
    }
    c
}

/// A one-node bulwark-lb with its node-local listener on `front`.
#[allow(clippy::too_many_arguments)]
fn lb_config(
    dir: &Path,
    pki: &Pki,
    front: SocketAddr,
    api: SocketAddr,
    raft: SocketAddr,
    admin: SocketAddr,
    backends: &[(String, SocketAddr)],
) -> anyhow::Result<PathBuf> {
    let cert = pki.peer("bench-lb", &["bulwark:lb"], &["127.0.0.1", "localhost"])?;
    let mut c = config::lb(1);
    c.data_dir = dir.join("lb-data");
    c.raft.address = raft;
    c.api.address = api;
    c.admin.address = admin;
    c.tls = config::tls(&cert);
    c.access.peers = Some(config::orgs(&["bulwark:lb"]));
    c.access.probers = Some(config::orgs(&["bulwark:probers"]));
    c.initial_members = vec![MemberConfig {
        name: None,
        ..config::lb_member(1, "", "", raft, api)
    }];
    c.local_listener = Some(front);
    c.logging.level = "warn,bulwark_lb::health=info".into();
    c.backends = backends
        .iter()
        .zip(ZONES)
        .map(|((id, addr), zone)| config::lb_backend(id, *addr, zone))
        .collect();
    config::write(dir.join("lb.yaml"), &c)
}

fn prober_config(
    dir: &Path,
    pki: &Pki,
    zone: &str,
    lb_api: SocketAddr,
    backends: &[(String, SocketAddr)],
) -> anyhow::Result<PathBuf> {
    let name = format!("prober-{zone}");
    let targets = backends
        .iter()
        .zip(ZONES)
        .map(|((id, addr), z)| config::apiserver_target(id, *addr, z))
        .collect();
    let mut c = cluster::prober_config(pki, &name, zone, targets, vec![lb_api.to_string()])?;
    c.admin.address = free_port()?;
    c.logging.level = "warn".into();
    cluster::write_named(dir, &name, &c)
}

/// Requests through one front, counted, until `stop`.
#[derive(Default)]
struct Load {
    requests: AtomicU64,
    failed: AtomicU64,
    /// Microseconds since `epoch` of the last request `watch` served.
    last_served_us: AtomicU64,
    /// What the failed requests saw (the first few).
    errors: std::sync::Mutex<Vec<String>>,
}

impl Load {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if e.len() < 5 {
            e.push(what);
        }
    }

    fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn load(
    https: HttpsClient,
    front: SocketAddr,
    interval: Duration,
    watch: String,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> (Arc<Load>, tokio::task::JoinHandle<()>) {
    let l = Arc::new(Load::default());
    let counters = l.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            counters.requests.fetch_add(1, Ordering::Relaxed);
            match https.get(front, "/version").await {
                Ok(r) if r.status == 200 => {
                    if r.backend() == Some(watch.as_str()) {
                        counters
                            .last_served_us
                            .store(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                }
                Ok(r) => counters.fail(format!("HTTP {}", r.status)),
                Err(e) => counters.fail(format!("{e:#}")),
            }
        }
    });
    (l, task)
}

struct Lab {
    apis: Vec<ApiServerProcess>,
    lb_admin: SocketAddr,
    lb_front: SocketAddr,
    ha_front: SocketAddr,
    ha_socket: PathBuf,
    https: HttpsClient,
    _children: Vec<Child>,
}

impl Lab {
    /// Waits until both fronts see `backend` up.
    async fn both_up(&self, backend: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + TRIAL_TIMEOUT;
        loop {
            let b = bulwark_verdict(self.lb_admin, backend).await.ok().flatten();
            let h = haproxy_state(&self.ha_socket, backend).await.ok();
            if b.as_deref() == Some("up") && h.as_deref() == Some("UP") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{backend} not up on both fronts: bulwark {b:?}, haproxy {h:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn trial(&mut self, i: usize, graceful: bool, args: &Args) -> anyhow::Result<Trial> {
        let idx = i % self.apis.len();
        let backend = self.apis[idx].name().to_owned();
        self.both_up(&backend).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;

        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let (lb_load, lb_task) = load(
            self.https.clone(),
            self.lb_front,
            args.load_interval,
            backend.clone(),
            t0,
            stop.clone(),
        );
        let (ha_load, ha_task) = load(
            self.https.clone(),
            self.ha_front,
            args.load_interval,
            backend.clone(),
            t0,
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;

        let signalled = Instant::now();
        if graceful {
            self.apis[idx].process().terminate()?;
        } else {
            self.apis[idx].kill()?;
        }
        let (mut bulwark, mut haproxy) = (None, None);
        while bulwark.is_none() || haproxy.is_none() {
            if signalled.elapsed() > TRIAL_TIMEOUT {
                bail!(
                    "trial {i}: no detection within {TRIAL_TIMEOUT:?} (bulwark {bulwark:?}, haproxy {haproxy:?})"
                );
            }
            if bulwark.is_none()
                && let Some(v) = bulwark_verdict(self.lb_admin, &backend).await?
                && (v == "down" || (graceful && v == "not_ready"))
            {
                bulwark = Some(signalled.elapsed());
            }
            if haproxy.is_none()
                && haproxy_state(&self.ha_socket, &backend)
                    .await?
                    .starts_with("DOWN")
            {
                haproxy = Some(signalled.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let the load see the aftermath, then stop it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        let _ = lb_task.await;
        let _ = ha_task.await;

        let since_signal = |l: &Load| {
            let at = l.last_served_us.load(Ordering::Relaxed);
            let signal_us = signalled.duration_since(t0).as_micros() as u64;
            (graceful && at > signal_us).then(|| (at - signal_us) as f64 / 1000.0)
        };
        let trial = Trial {
            kind: if graceful { "graceful" } else { "kill" },
            backend: backend.clone(),
            bulwark_ms: bulwark.unwrap_or_default().as_secs_f64() * 1000.0,
            haproxy_ms: haproxy.unwrap_or_default().as_secs_f64() * 1000.0,
            bulwark_failed_requests: lb_load.failed.load(Ordering::Relaxed),
            haproxy_failed_requests: ha_load.failed.load(Ordering::Relaxed),
            bulwark_errors: lb_load.errors(),
            haproxy_errors: ha_load.errors(),
            bulwark_last_served_ms: since_signal(&lb_load),
            haproxy_last_served_ms: since_signal(&ha_load),
            requests_per_front: lb_load
                .requests
                .load(Ordering::Relaxed)
                .min(ha_load.requests.load(Ordering::Relaxed)),
        };
        eprintln!("{trial:?}");
        self.apis[idx]
            .restart()
            .await
            .with_context(|| format!("restarting {backend}"))?;
        Ok(trial)
    }
}

async fn run_async(args: &Args) -> anyhow::Result<()> {
    let (lb_bin, prober_bin) = binaries(args)?;
    bulwark_testkit::install_crypto_provider();
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let pki = Pki::new()?;
    let load_before = loadavg();
    let mut lab = Lab::start(args, dir.path(), &pki, &lb_bin, &prober_bin).await?;

    let mut trials = Vec::new();
    for i in 0..args.trials {
        trials.push(lab.trial(i, false, args).await?);
    }
    for i in 0..args.trials {
        trials.push(lab.trial(i, true, args).await?);
    }
    let rows = rows(&trials);

    let report = Report {
        head: ReportHead::new(
            report_machine(&[("haproxy", "-v")], load_before),
            settings(args),
        ),
        rows,
        trials,
    };
    publish(
        &args.out,
        args.no_write,
        &report.head,
        "detection",
        &markdown(&report),
        &report,
    )
}

/// The `bulwark-lb` and `bulwark-prober` binaries built beside this one
/// (and the fixture apiserver the lab starts), and HAProxy.
fn binaries(args: &Args) -> anyhow::Result<(PathBuf, PathBuf)> {
    let me = std::env::current_exe().context("locating this binary")?;
    let sibling = |name: &str| -> anyhow::Result<PathBuf> {
        let p = me.with_file_name(name);
        if !p.exists() {
            bail!(
                "{} not found: cargo build --release -p bulwark-lb -p bulwark-prober -p bulwark-testkit --bins",
                p.display()
            );
        }
        Ok(p)
    };
    let (lb_bin, prober_bin) = (sibling("bulwark-lb")?, sibling("bulwark-prober")?);
    sibling("bulwark-fixture-apiserver")?;
    if !args.haproxy.exists() {
        bail!(
            "{} not found (apt-get install haproxy)",
            args.haproxy.display()
        );
    }
    Ok((lb_bin, prober_bin))
}

impl Lab {
    /// Three apiservers, bulwark (one LB node and a prober per zone) and
    /// HAProxy in front of them, returned once both fronts see every
    /// apiserver up.
    async fn start(
        args: &Args,
        dir: &Path,
        pki: &Pki,
        lb_bin: &Path,
        prober_bin: &Path,
    ) -> anyhow::Result<Self> {
        let mut apis = Vec::new();
        for i in 1..=3 {
            apis.push(
                ApiServerProcess::builder(format!("api-{i}"))
                    .shutdown_delay(args.shutdown_delay)
                    .shutdown_grace(Duration::from_secs(1))
                    .start(pki)
                    .await?,
            );
        }
        let backends: Vec<(String, SocketAddr)> = apis
            .iter()
            .map(|a| (a.name().to_owned(), a.addr()))
            .collect();

        let mut children = Vec::new();
        let (lb_front, lb_api, lb_raft, lb_admin) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let lb_yaml = lb_config(dir, pki, lb_front, lb_api, lb_raft, lb_admin, &backends)?;
        let lb_yaml = lb_yaml.display().to_string();
        children.push(spawn(
            "bulwark-lb",
            lb_bin,
            &["--config", &lb_yaml],
            &dir.join("lb.log"),
        )?);
        for zone in ZONES {
            let config = prober_config(dir, pki, zone, lb_api, &backends)?;
            let config = config.display().to_string();
            children.push(spawn(
                &format!("prober-{zone}"),
                prober_bin,
                &["--config", &config],
                &dir.join(format!("prober-{zone}.log")),
            )?);
        }
        let ha_front = free_port()?;
        let ha_socket = dir.join("haproxy.sock");
        let ha_cfg = dir.join("haproxy.cfg");
        std::fs::write(&ha_cfg, haproxy_config(ha_front, &ha_socket, &backends))?;
        let ha_cfg = ha_cfg.display().to_string();
        children.push(spawn(
            "haproxy",
            &args.haproxy,
            &["-db", "-f", &ha_cfg],
            &dir.join("haproxy.log"),
        )?);

        let lab = Lab {
            apis,
            lb_admin,
            lb_front,
            ha_front,
            ha_socket,
            https: HttpsClient::new(pki.ca_pem())?.timeout(Duration::from_secs(5)),
            _children: children,
        };
        for (name, _) in &backends {
            lab.both_up(name)
                .await
                .with_context(|| lab.start_failure(dir))?;
        }
        Ok(lab)
    }

    /// Every child's log, for a lab whose fronts never came up.
    fn start_failure(&self, dir: &Path) -> String {
        let logs: Vec<String> = self
            ._children
            .iter()
            .map(|c| {
                let file = format!("{}.log", c.name.trim_start_matches("bulwark-"));
                let log = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
                format!("--- {}\n{log}", c.name)
            })
            .collect();
        format!("waiting for the fronts to start\n{}", logs.join("\n"))
    }
}

/// One front's figures of one trial: detection ms, failed requests, and
/// (graceful only) the last request served after the signal.
fn front_of(t: &Trial, front: &str) -> (f64, u64, Option<f64>) {
    if front == "bulwark" {
        (
            t.bulwark_ms,
            t.bulwark_failed_requests,
            t.bulwark_last_served_ms,
        )
    } else {
        (
            t.haproxy_ms,
            t.haproxy_failed_requests,
            t.haproxy_last_served_ms,
        )
    }
}

/// One row per (signal, front) over that kind's trials.
fn rows(trials: &[Trial]) -> Vec<Row> {
    let mut rows = Vec::new();
    for kind in ["kill", "graceful"] {
        let t: Vec<&Trial> = trials.iter().filter(|t| t.kind == kind).collect();
        let requests = t.iter().map(|t| t.requests_per_front).sum();
        for front in ["bulwark", "haproxy"] {
            let figures: Vec<_> = t.iter().map(|t| front_of(t, front)).collect();
            let ms: Vec<f64> = figures.iter().map(|f| f.0).collect();
            let last: Vec<f64> = figures.iter().filter_map(|f| f.2).collect();
            rows.push(Row {
                kind,
                front,
                median_ms: median(ms.iter().copied()),
                min_ms: ms.iter().copied().fold(f64::INFINITY, f64::min),
                max_ms: ms.iter().copied().fold(0.0, f64::max),
                failed_requests: figures.iter().map(|f| f.1).sum(),
                requests,
                median_last_served_ms: (!last.is_empty()).then(|| median(last)),
            });
        }
    }
    rows
}

fn settings(args: &Args) -> BTreeMap<String, String> {
    [
        ("trials", args.trials.to_string()),
        (
            "shutdown_delay",
            humantime::format_duration(args.shutdown_delay).to_string(),
        ),
        (
            "load_interval",
            humantime::format_duration(args.load_interval).to_string(),
        ),
        (
            "bulwark",
            "1 LB node, 3 probers (zones a, b, c), default probing and aggregation".to_owned(),
        ),
        (
            "haproxy",
            "kubeadm HA guide: httpchk GET /healthz over TLS, inter 2s fall 3 rise 2, retries 1, redispatch".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn markdown(r: &Report) -> String {
    let mut s = r.head.markdown("detection");
    let _ = writeln!(
        s,
        "Time from the signal to the front taking the backend out of rotation \
         (bulwark: committed verdict down, or draining for a graceful shutdown; \
         HAProxy: server state DOWN), over {} trials per kind. Failed requests: \
         new-connection requests through the front that failed during the trials. \
         Last served: the last new request the shutting-down backend served after \
         the signal (graceful only).\n",
        r.head.setting("trials")
    );
    let _ = writeln!(
        s,
        "| signal | front | median ms | min ms | max ms | failed requests / total | last served (median ms) |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} / {} | {} |",
            if row.kind == "kill" {
                "SIGKILL"
            } else {
                "SIGTERM (graceful)"
            },
            row.front,
            row.median_ms,
            row.min_ms,
            row.max_ms,
            row.failed_requests,
            row.requests,
            row.median_last_served_ms
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
        );
    }
    s
}
