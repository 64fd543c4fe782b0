//! Scenario `probe-cost`: what bulwark-prober's probing costs in CPU, with a
//! fresh TCP+TLS connection per probe (the default) and with kept-alive
//! connections (`reuseConnections: true`), on both sides: the prober and
//! the servers it probes (an apiserver pays for every handshake too).
//!
//! Setup: `--targets` HTTPS backends (this binary's `backend` subcommand,
//! serving a CA-signed certificate so the prober verifies it like the
//! cluster CA), and the real `bulwark-prober` binary probing `/readyz` and
//! `/livez` on each at `--interval` (default 200 ms: 3 targets × 2 signals
//! × 5/s = 30 probes/s). CPU time is read from `/proc/<pid>/stat` of the
//! prober and of the backend process over `--duration`, after a warm-up;
//! the number of probes from the prober's own metrics. Modes alternate
//! between runs; figures are medians.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulwark_testkit::config;
use serde::Serialize;

use crate::datapath::{free_port, spawn, wait_listening};
use crate::report::{ReportHead, publish};
use crate::stats::{cpu_seconds, loadavg, median, report_machine};

/// Flags of `bulwark-bench probe-cost`.
#[derive(clap::Args)]
pub struct Args {
    /// Measured time per run (after a 2 s warm-up).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Runs per mode; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Number of apiserver-like targets (each probed on /readyz and /livez).
    #[arg(long, default_value_t = 3)]
    targets: usize,
    /// The prober's probe interval.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// The bulwark-prober binary (default: next to this one).
    #[arg(long)]
    prober: Option<PathBuf>,
    /// Where to write `<date>-probe-cost.md` and `.json`.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Print the table only; write no files.
    #[arg(long)]
    no_write: bool,
}

/// One run's figures.
#[derive(Clone, Copy, Debug, Serialize)]
struct Sample {
    probes_per_s: f64,
    prober_cpu_pct: f64,
    prober_us_per_probe: f64,
    backend_cpu_pct: f64,
    backend_us_per_probe: f64,
}

#[derive(Serialize)]
struct Row {
    mode: String,
    probes_per_s: f64,
    prober_cpu_pct: f64,
    prober_us_per_probe: f64,
    backend_cpu_pct: f64,
    backend_us_per_probe: f64,
    samples: Vec<Sample>,
}

#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    head: ReportHead,
    rows: Vec<Row>,
}

/// Sum of `bulwark_prober_probes_total` from the prober's /metrics.
fn probes_done(admin: SocketAddr) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("bulwark_prober_probes_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum())
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as files.
fn pki(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench-ca");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])?;
    let cert = params.signed_by(&key, &issuer)?;
    let paths = (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("locating this binary")?;
    let prober = match &args.prober {
        Some(p) => p.clone(),
        None => me
            .parent()
            .context("this binary has no directory")?
            .join("bulwark-prober"),
    };
    if !prober.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p bulwark-prober` or pass --prober",
            prober.display()
        );
    }
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let (ca, cert, key) = pki(dir.path())?;
    let load_before = loadavg();

    let targets: Vec<SocketAddr> = (0..args.targets)
        .map(|_| free_port())
        .collect::<anyhow::Result<_>>()?;
    let mut cmd = Command::new(&me);
    cmd.arg("backend").args(["--threads", "1"]);
    for t in &targets {
        cmd.arg("--listen").arg(t.to_string());
    }
    cmd.arg("--cert").arg(&cert).arg("--key").arg(&key);
    let mut backend = spawn("backend", cmd, &dir.path().join("backend.log"))?;
    for t in &targets {
        wait_listening(&mut backend, *t)?;
    }

    let mut samples: BTreeMap<bool, Vec<Sample>> = BTreeMap::new();
    for run in 0..args.runs {
        // Alternate which mode goes first.
        let order = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for reuse in order {
            let s = measure(
                args,
                &prober,
                dir.path(),
                &ca,
                &targets,
                reuse,
                &mut backend,
            )?;
            eprintln!(
                "run {run} reuse={reuse}: {:.1} probes/s, prober {:.2} % CPU ({:.0} µs/probe), backend {:.2} % CPU",
                s.probes_per_s, s.prober_cpu_pct, s.prober_us_per_probe, s.backend_cpu_pct
            );
            samples.entry(reuse).or_default().push(s);
        }
    }

    let rows = samples
        .into_iter()
        .map(|(reuse, v)| {
            let med = |f: fn(&Sample) -> f64| median(v.iter().map(f));
            Row {
                mode: if reuse {
                    "kept-alive connection".into()
                } else {
                    "fresh TCP+TLS per probe (default)".into()
                },
                probes_per_s: med(|s| s.probes_per_s),
                prober_cpu_pct: med(|s| s.prober_cpu_pct),
                prober_us_per_probe: med(|s| s.prober_us_per_probe),
                backend_cpu_pct: med(|s| s.backend_cpu_pct),
                backend_us_per_probe: med(|s| s.backend_us_per_probe),
                samples: v,
            }
        })
        .collect();
    let machine = report_machine(&[], load_before);
    let settings: BTreeMap<String, String> = [
        (
            "duration",
            humantime::format_duration(args.duration).to_string(),
        ),
        ("runs", args.runs.to_string()),
        ("targets", args.targets.to_string()),
        (
            "interval",
            humantime::format_duration(args.interval).to_string(),
        ),
        ("signals", "readyz, livez".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let report = Report {
        head: ReportHead::new(machine, settings),
        rows,
    };
    publish(
        &args.out,
        args.no_write,
        &report.head,
        "probe-cost",
        &markdown(&report),
        &report,
    )
}

fn measure(
    args: &Args,
    prober: &Path,
    dir: &Path,
    ca: &Path,
    targets: &[SocketAddr],
    reuse: bool,
    backend: &mut crate::datapath::Proc,
) -> anyhow::Result<Sample> {
    let admin = free_port()?;
    let mut c = config::prober();
    c.node_name = "bench".into();
    c.admin.address = admin;
    c.logging.level = "warn".into();
    // Whole milliseconds, as the flag is documented.
    let interval_ms = args.interval.as_millis() as u64;
    c.probing.interval = Duration::from_millis(interval_ms);
    c.probing.fast_interval = Duration::from_millis((interval_ms / 2).max(10));
    c.probing.reuse_connections = reuse;
    c.apiservers.tls.ca_file = ca.to_owned();
    c.apiservers.targets = targets
        .iter()
        .enumerate()
        .map(|(i, t)| config::apiserver_target(&format!("t{i}"), *t, ""))
        .collect();
    let config = config::write(dir.join(format!("prober-{reuse}.yaml")), &c)?;
    let mut cmd = Command::new(prober);
    cmd.arg("--config").arg(&config);
    let mut p = spawn(
        "bulwark-prober",
        cmd,
        &dir.join(format!("prober-{reuse}.log")),
    )?;
    wait_listening(&mut p, admin)?;
    std::thread::sleep(Duration::from_secs(2));

    let (p_pid, b_pid) = (p.child.id(), backend.child.id());
    let start = Instant::now();
    let (p0, b0, n0) = (
        cpu_seconds(p_pid)?,
        cpu_seconds(b_pid)?,
        probes_done(admin)?,
    );
    std::thread::sleep(args.duration);
    let (p1, b1, n1) = (
        cpu_seconds(p_pid)?,
        cpu_seconds(b_pid)?,
        probes_done(admin)?,
    );
    let wall = start.elapsed().as_secs_f64();
    if let Some(status) = p.child.try_wait()? {
        bail!("bulwark-prober died during the run ({status})");
    }
    let probes = (n1 - n0).max(1.0);
    Ok(Sample {
        probes_per_s: probes / wall,
        prober_cpu_pct: 100.0 * (p1 - p0) / wall,
        prober_us_per_probe: 1e6 * (p1 - p0) / probes,
        backend_cpu_pct: 100.0 * (b1 - b0) / wall,
        backend_us_per_probe: 1e6 * (b1 - b0) / probes,
    })
}

fn markdown(r: &Report) -> String {
    let mut s = r.head.markdown("probe-cost");
    let _ = writeln!(
        s,
        "CPU of the bulwark-prober process and of the probed HTTPS servers \
         (one process for all targets), % of one core; medians of {} alternating runs.\n",
        r.head.setting("runs")
    );
    let _ = writeln!(
        s,
        "| mode | probes/s | prober CPU % | prober µs/probe | servers CPU % | servers µs/probe |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.2} | {:.0} | {:.2} | {:.0} |",
            row.mode,
            row.probes_per_s,
            row.prober_cpu_pct,
            row.prober_us_per_probe,
            row.backend_cpu_pct,
            row.backend_us_per_probe
        );
    }
    s
}
