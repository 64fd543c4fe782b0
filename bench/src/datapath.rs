//! Scenario `datapath`: HTTPS through TLS passthrough, measured with `wrk`
//! against (a) one backend directly, (b) HAProxy in mode tcp, (c) bulwark's
//! proxy, all in front of the same backends, in one invocation. Three
//! workloads: small keep-alive, 64 KiB keep-alive, and a new connection (so
//! a new TLS handshake and a new proxied TCP connection) per request.
//!
//! Runs alternate the contenders' order so slow drift (thermal, noisy
//! neighbours) does not favour one; each figure is the median of the runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::stats::{cpu_seconds, loadavg, median, tool_version};

use anyhow::{Context, bail};
use bulwark_common::tls::TlsFiles;
use bulwark_lb::config::MemberConfig;
use bulwark_testkit::config;
use serde::Serialize;

/// Flags of `bulwark-bench datapath`.
#[derive(clap::Args)]
pub struct Args {
    /// Duration of one wrk run.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Runs per (workload, contender); the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    wrk_threads: usize,
    /// wrk connections (keep-alive workloads).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// wrk connections for the connection-per-request workload.
    #[arg(long, default_value_t = 16)]
    close_connections: usize,
    /// Threads of each proxy (HAProxy nbthread, bulwark's runtime workers).
    #[arg(long, default_value_t = 2)]
    proxy_threads: usize,
    /// Worker threads of the backend process.
    #[arg(long, default_value_t = 2)]
    backend_threads: usize,
    /// CPU list (taskset -c) for wrk; empty: no pinning.
    #[arg(long, default_value = "")]
    cpus_load: String,
    /// CPU list for the backends; empty: no pinning.
    #[arg(long, default_value = "")]
    cpus_backend: String,
    /// CPU list for both proxies (the same for each); empty: no pinning.
    #[arg(long, default_value = "")]
    cpus_proxy: String,
    /// Copy buffer per direction for bulwark (default: ProxyConfig's).
    #[arg(long)]
    buffer_size: Option<usize>,
    /// Also run bulwark with splice(2) off (buffered copy only) as a
    /// fourth contender.
    #[arg(long)]
    compare_buffered: bool,
    /// Another `bulwark-lb` binary (e.g. a build of an earlier commit) to
    /// run as one more contender, named after its file; repeatable. Compares
    /// two builds in one run, on the same machine state.
    #[arg(long = "also-lb")]
    also_lb: Vec<PathBuf>,
    /// HAProxy binary.
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy: PathBuf,
    /// wrk binary.
    #[arg(long, default_value = "/usr/bin/wrk")]
    wrk: PathBuf,
    /// Where to write `<date>-datapath.md` and `.json`.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Print the table only; write no files.
    #[arg(long)]
    no_write: bool,
}

const BACKENDS: usize = 3;

struct Workload {
    name: &'static str,
    path: &'static str,
    close: bool,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "small keep-alive",
        path: "/small",
        close: false,
    },
    Workload {
        name: "64 KiB keep-alive",
        path: "/64k",
        close: false,
    },
    Workload {
        name: "new connection per request",
        path: "/small",
        close: true,
    },
];

/// A child process killed on drop, so no contender outlives the bench.
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pinned(cpus: &str, program: &Path) -> Command {
    if cpus.is_empty() {
        Command::new(program)
    } else {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(cpus).arg(program);
        c
    }
}

pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc {
        name: name.to_owned(),
        child,
    })
}

/// Starts the real `bulwark-lb` (built beside this binary) as a one-node
/// cluster whose node-local listener on `addr` is the contender, with the
/// backends seeded from its configuration and as many runtime workers as
/// HAProxy gets threads.
fn bulwark_lb(
    bin: &Path,
    dir: &Path,
    name: &str,
    addr: SocketAddr,
    backends: &[SocketAddr],
    args: &Args,
    buffered: bool,
) -> anyhow::Result<Proc> {
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p bulwark-lb",
            bin.display()
        );
    }
    let work = dir.join(name.replace([' ', '(', ')'], ""));
    std::fs::create_dir_all(&work)?;
    // Its gRPC needs an mTLS identity; a throwaway CA is enough.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench-lb");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "bulwark:lb");
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::write(work.join("ca.crt"), ca_cert.pem())?;
    std::fs::write(work.join("lb.crt"), cert.pem())?;
    std::fs::write(work.join("lb.key"), key.serialize_pem())?;
    let (raft, api, admin) = (free_port()?, free_port()?, free_port()?);
    let mut c = config::lb(1);
    c.data_dir = work.join("data");
    c.raft.address = raft;
    c.api.address = api;
    c.admin.address = admin;
    c.tls = TlsFiles {
        cert_file: work.join("lb.crt"),
        key_file: work.join("lb.key"),
        ca_file: work.join("ca.crt"),
    };
    c.initial_members = vec![MemberConfig {
        name: None,
        ..config::lb_member(1, "", "", raft, api)
    }];
    c.local_listener = Some(addr);
    c.logging.level = "warn,bulwark_lb::node=info".into();
    c.proxy.splice = !buffered;
    if let Some(b) = args.buffer_size {
        c.proxy.buffer_size = b;
    }
    c.backends = backends
        .iter()
        .enumerate()
        .map(|(i, b)| config::lb_backend(&format!("b{i}"), *b, ""))
        .collect();
    let config = config::write(work.join("lb.yaml"), &c)?;
    let mut cmd = pinned(&args.cpus_proxy, bin);
    cmd.arg("--config")
        .arg(&config)
        .env("TOKIO_WORKER_THREADS", args.proxy_threads.to_string());
    spawn(name, cmd, &dir.join(format!("{name}.log")))
}

/// Waits until `bulwark-lb` says it seeded the backends from its
/// configuration (before that its listener has nothing to route to).
fn wait_seeded(p: &mut Proc, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(status) = p.child.try_wait()? {
            bail!("{} exited early with {status}", p.name);
        }
        if std::fs::read_to_string(log).is_ok_and(|l| l.contains("seeded the backend registry")) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{} did not seed its backends within 15 s; see {}",
        p.name,
        log.display()
    )
}

pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    // Bound and released at once; the short race with other processes is
    // acceptable for a benchmark on a quiet machine.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

pub(crate) fn wait_listening(p: &mut Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(status) = p.child.try_wait()? {
            bail!("{} exited early with {status}", p.name);
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} is not listening on {addr} after 15 s", p.name)
}

/// One wrk run's figures.
#[derive(Clone, Copy, Debug, Serialize)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// CPU time (user + system, all threads) the contender's process spent
    /// per request during the run, µs; `None` for `direct`.
    cpu_us_per_req: Option<f64>,
}

fn parse_latency(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(out: &str) -> anyhow::Result<Sample> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut errors = 0u64;
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = parse_latency(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = parse_latency(v);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    match (rps, p50, p99) {
        (Some(rps), Some(p50_ms), Some(p99_ms)) => Ok(Sample {
            rps,
            p50_ms,
            p99_ms,
            errors,
            cpu_us_per_req: None,
        }),
        _ => bail!("cannot read wrk's output:\n{out}"),
    }
}

#[derive(Serialize)]
struct Row {
    workload: String,
    contender: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    rps_ratio_to_haproxy: Option<f64>,
    p99_ratio_to_haproxy: Option<f64>,
    /// Median CPU time per request of the contender's process, µs.
    cpu_us_per_req: Option<f64>,
    cpu_ratio_to_haproxy: Option<f64>,
    samples: Vec<Sample>,
}

#[derive(Serialize)]
struct Report {
    date: String,
    command: String,
    machine: BTreeMap<String, String>,
    settings: BTreeMap<String, String>,
    note: String,
    rows: Vec<Row>,
}

fn haproxy_config(listen: SocketAddr, backends: &[SocketAddr], threads: usize) -> String {
    let mut c = format!(
        "global\n    nbthread {threads}\n    maxconn 8000\n\n\
         defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1h\n    timeout server 1h\n\n\
         frontend fe\n    bind {listen}\n    default_backend be\n\n\
         backend be\n    balance leastconn\n"
    );
    for (i, b) in backends.iter().enumerate() {
        let _ = writeln!(c, "    server b{i} {b}");
    }
    c
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let load_before = loadavg();
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let mut stack = Stack::start(args, &exe, dir.path())?;
    let targets = stack.targets();
    let samples = measure(args, &targets)?;
    stack.check_alive()?;
    let rows = rows(&samples, &targets);

    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut machine = crate::stats::machine();
    machine.insert("haproxy".into(), tool_version("haproxy", "-v"));
    machine.insert("wrk".into(), tool_version("wrk", "-v"));
    machine.insert("loadavg_before".into(), load_before);
    machine.insert("loadavg_after".into(), loadavg());
    let report = Report {
        date: date.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine,
        settings: settings(args),
        note: "bulwark = the bulwark-lb binary (a one-node cluster: Raft, store and API \
               running; the contender is its node-local listener), with the backends \
               seeded from its configuration."
            .into(),
        rows,
    };
    publish(
        &args.out,
        args.no_write,
        &date,
        "datapath",
        &markdown(&report),
        &report,
    )
}

/// Every process of one datapath run (killed when dropped): the backends,
/// HAProxy and each bulwark contender, all in front of the same backends.
struct Stack {
    backend: Proc,
    backend_addrs: Vec<SocketAddr>,
    haproxy: Proc,
    haproxy_addr: SocketAddr,
    contenders: Vec<(String, SocketAddr, Proc)>,
}

/// One contender as wrk sees it: its name, address, and the process whose
/// CPU time is charged to it (none for the backends measured directly).
struct Target {
    name: String,
    addr: SocketAddr,
    pid: Option<u32>,
}

impl Stack {
    fn start(args: &Args, exe: &Path, dir: &Path) -> anyhow::Result<Self> {
        let (backend, backend_addrs) = start_backends(args, exe, dir)?;
        let (haproxy, haproxy_addr) = start_haproxy(args, dir, &backend_addrs)?;
        let mut contenders = Vec::new();
        for (name, bin, buffered) in variants(args, exe) {
            let addr = free_port()?;
            let mut p = bulwark_lb(&bin, dir, &name, addr, &backend_addrs, args, buffered)?;
            wait_listening(&mut p, addr)?;
            wait_seeded(&mut p, &dir.join(format!("{name}.log")))?;
            contenders.push((name, addr, p));
        }
        Ok(Self {
            backend,
            backend_addrs,
            haproxy,
            haproxy_addr,
            contenders,
        })
    }

    fn targets(&self) -> Vec<Target> {
        let mut targets = vec![
            Target {
                name: "direct".into(),
                addr: self.backend_addrs[0],
                pid: None,
            },
            Target {
                name: "haproxy".into(),
                addr: self.haproxy_addr,
                pid: Some(self.haproxy.child.id()),
            },
        ];
        targets.extend(self.contenders.iter().map(|(name, addr, p)| Target {
            name: name.clone(),
            addr: *addr,
            pid: Some(p.child.id()),
        }));
        targets
    }

    /// A contender that died mid-run would have made its figures (and the
    /// others', through the shared backends) meaningless.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in [&mut self.backend, &mut self.haproxy]
            .into_iter()
            .chain(self.contenders.iter_mut().map(|(_, _, p)| p))
        {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} died during the bench ({status})", p.name);
            }
        }
        Ok(())
    }
}

fn start_backends(args: &Args, exe: &Path, dir: &Path) -> anyhow::Result<(Proc, Vec<SocketAddr>)> {
    let addrs: Vec<SocketAddr> = (0..BACKENDS)
        .map(|_| free_port())
        .collect::<anyhow::Result<_>>()?;
    let mut cmd = pinned(&args.cpus_backend, exe);
    cmd.arg("backend")
        .arg("--threads")
        .arg(args.backend_threads.to_string());
    for a in &addrs {
        cmd.arg("--listen").arg(a.to_string());
    }
    let mut backend = spawn("backends", cmd, &dir.join("backends.log"))?;
    for a in &addrs {
        wait_listening(&mut backend, *a)?;
    }
    Ok((backend, addrs))
}

fn start_haproxy(
    args: &Args,
    dir: &Path,
    backends: &[SocketAddr],
) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = free_port()?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(addr, backends, args.proxy_threads))?;
    let mut cmd = pinned(&args.cpus_proxy, &args.haproxy);
    cmd.arg("-f").arg(&cfg).arg("-db");
    let mut haproxy = spawn("haproxy", cmd, &dir.join("haproxy.log"))?;
    wait_listening(&mut haproxy, addr)?;
    Ok((haproxy, addr))
}

/// The bulwark contenders: (name, binary, buffered copy only).
fn variants(args: &Args, exe: &Path) -> Vec<(String, PathBuf, bool)> {
    let ours = exe.with_file_name("bulwark-lb");
    let mut variants = vec![("bulwark".to_owned(), ours.clone(), false)];
    if args.compare_buffered {
        variants.push(("bulwark (buffered)".to_owned(), ours, true));
    }
    for bin in &args.also_lb {
        let file = bin
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| bin.display().to_string());
        variants.push((format!("bulwark ({file})"), bin.clone(), false));
    }
    variants
}

/// Every (workload, contender) sample of every run.
type Samples = BTreeMap<(usize, String), Vec<Sample>>;

fn measure(args: &Args, targets: &[Target]) -> anyhow::Result<Samples> {
    let mut samples = Samples::new();
    for run in 0..args.runs {
        for (wi, w) in WORKLOADS.iter().enumerate() {
            // Rotate the order every run: no contender always goes first.
            let n = targets.len();
            for k in 0..n {
                let target = &targets[(k + run) % n];
                let s = wrk(args, w, target)?;
                eprintln!(
                    "run {}/{} {:<28} {:<18} {:>10.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  errors {}  cpu {}",
                    run + 1,
                    args.runs,
                    w.name,
                    target.name,
                    s.rps,
                    s.p50_ms,
                    s.p99_ms,
                    s.errors,
                    s.cpu_us_per_req
                        .map(|c| format!("{c:.1} µs/req"))
                        .unwrap_or_else(|| "-".into())
                );
                samples
                    .entry((wi, target.name.clone()))
                    .or_default()
                    .push(s);
            }
        }
    }
    Ok(samples)
}

/// One wrk run of workload `w` against `target`, with the CPU time its
/// process spent per request.
fn wrk(args: &Args, w: &Workload, target: &Target) -> anyhow::Result<Sample> {
    let conns = if w.close {
        args.close_connections
    } else {
        args.connections
    };
    let mut cmd = pinned(&args.cpus_load, &args.wrk);
    cmd.arg("-t")
        .arg(args.wrk_threads.to_string())
        .arg("-c")
        .arg(conns.to_string())
        .arg("-d")
        .arg(format!("{}s", args.duration.as_secs().max(1)))
        .arg("--latency");
    if w.close {
        cmd.arg("-H").arg("Connection: close");
    }
    cmd.arg(format!("https://{}{}", target.addr, w.path));
    let cpu_before = target.pid.map(cpu_seconds).transpose()?;
    let started = Instant::now();
    let out = cmd.output().context("running wrk")?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = target.pid.map(cpu_seconds).transpose()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed against {}: {}\n{text}",
            target.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut s = parse_wrk(&text)?;
    // wrk's own start-up and TLS set-up are inside `elapsed`, so this
    // slightly overstates the cost per request, the same way for every
    // contender.
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        let requests = s.rps * elapsed;
        if requests > 0.0 {
            s.cpu_us_per_req = Some((b - a) * 1e6 / requests);
        }
    }
    Ok(s)
}

/// One row per (workload, contender): medians over the runs and the ratios
/// to HAProxy's medians in the same run.
fn rows(samples: &Samples, targets: &[Target]) -> Vec<Row> {
    let mut rows = Vec::new();
    for (wi, w) in WORKLOADS.iter().enumerate() {
        let get = |name: &str| {
            samples
                .get(&(wi, name.to_owned()))
                .cloned()
                .unwrap_or_default()
        };
        let med = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f));
        let ha = get("haproxy");
        let (ha_rps, ha_p99) = (med(&ha, |s| s.rps), med(&ha, |s| s.p99_ms));
        let cpu = |v: &[Sample]| {
            let c: Vec<f64> = v.iter().filter_map(|s| s.cpu_us_per_req).collect();
            (!c.is_empty()).then(|| median(c))
        };
        let ha_cpu = cpu(&ha);
        for Target { name, .. } in targets {
            let v = get(name);
            let rps = med(&v, |s| s.rps);
            let p99 = med(&v, |s| s.p99_ms);
            let is_ha = name == "haproxy";
            rows.push(Row {
                workload: w.name.into(),
                contender: name.clone(),
                rps,
                p50_ms: med(&v, |s| s.p50_ms),
                p99_ms: p99,
                errors: v.iter().map(|s| s.errors).sum(),
                rps_ratio_to_haproxy: (!is_ha).then(|| rps / ha_rps),
                p99_ratio_to_haproxy: (!is_ha).then(|| p99 / ha_p99),
                cpu_us_per_req: cpu(&v),
                cpu_ratio_to_haproxy: match (is_ha, cpu(&v), ha_cpu) {
                    (false, Some(c), Some(h)) if h > 0.0 => Some(c / h),
                    _ => None,
                },
                samples: v,
            });
        }
    }
    rows
}

fn settings(args: &Args) -> BTreeMap<String, String> {
    let also_lb = args
        .also_lb
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let buffer_size = args
        .buffer_size
        .unwrap_or(bulwark_lb::proxy::ProxyConfig::default().buffer_size);
    [
        ("duration", format!("{}s", args.duration.as_secs())),
        ("runs", args.runs.to_string()),
        ("wrk_threads", args.wrk_threads.to_string()),
        ("connections", args.connections.to_string()),
        ("close_connections", args.close_connections.to_string()),
        ("proxy_threads", args.proxy_threads.to_string()),
        ("backend_threads", args.backend_threads.to_string()),
        ("cpus_load", args.cpus_load.clone()),
        ("cpus_backend", args.cpus_backend.clone()),
        ("cpus_proxy", args.cpus_proxy.clone()),
        ("also_lb", also_lb),
        ("bulwark_buffer_size", buffer_size.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn markdown(r: &Report) -> String {
    let mut s = markdown_head("datapath", &r.date, &r.command, &r.machine, &r.settings);
    let _ = writeln!(s, "Note: {}\n", r.note);
    let _ = writeln!(
        s,
        "Figures are medians of {} alternating runs; ratios are to HAProxy \
         (throughput: higher is better, ≥ 1.0 is the target; p99: lower is better, ≤ 1.0 is the target). \
         CPU is the user + system time of the proxy's process (all threads) per request, from \
         /proc/<pid>/stat around each wrk run: it does not depend on what else the machine runs, \
         unlike throughput on a shared 2-core machine, where the load generator, the backends and \
         the proxy compete for the same cores.\n",
        r.settings.get("runs").map(String::as_str).unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "| workload | contender | req/s | p50 ms | p99 ms | errors | CPU µs/req | req/s ÷ HAProxy | p99 ÷ HAProxy | CPU ÷ HAProxy |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        let ratio = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "—".into());
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.3} | {:.3} | {} | {} | {} | {} | {} |",
            row.workload,
            row.contender,
            row.rps,
            row.p50_ms,
            row.p99_ms,
            row.errors,
            row.cpu_us_per_req
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "—".into()),
            ratio(row.rps_ratio_to_haproxy),
            ratio(row.p99_ratio_to_haproxy),
            ratio(row.cpu_ratio_to_haproxy)
        );
    }
    s
}

/// Prints a scenario's report (markdown) and, unless `no_write`, writes it
/// as `<out>/<day>-<scenario>.md` and `.json`.
pub(crate) fn publish(
    out: &std::path::Path,
    no_write: bool,
    date: &str,
    scenario: &str,
    md: &str,
    report: &impl Serialize,
) -> anyhow::Result<()> {
    println!("{md}");
    if no_write {
        return Ok(());
    }
    std::fs::create_dir_all(out)?;
    let day = &date[..10];
    let md_path = out.join(format!("{day}-{scenario}.md"));
    let json_path = out.join(format!("{day}-{scenario}.json"));
    std::fs::write(&md_path, md)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(report)?)?;
    eprintln!("wrote {} and {}", md_path.display(), json_path.display());
    Ok(())
}

/// A scenario report's first lines: title and date, command, machine,
/// settings.
pub(crate) fn markdown_head(
    scenario: &str,
    date: &str,
    command: &str,
    machine: &BTreeMap<String, String>,
    settings: &BTreeMap<String, String>,
) -> String {
    format!(
        "# {scenario} — {date}\n\nCommand: `{command}`\n\nMachine: {}\n\nSettings: {}\n\n",
        kv(machine),
        kv(settings)
    )
}

pub(crate) fn kv(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "Running 1s test @ https://127.0.0.1:1/small
  2 threads and 8 connections
  Latency Distribution
     50%  520.00us
     75%  600.00us
     90%    1.00ms
     99%    2.50ms
  1000 requests in 1.00s, 100KB read
  Socket errors: connect 1, read 2, write 0, timeout 3
Requests/sec:   1234.56
Transfer/sec:    100.00KB
";
        let s = parse_wrk(out).unwrap();
        assert_eq!(s.rps, 1234.56);
        assert!((s.p50_ms - 0.52).abs() < 1e-9);
        assert!((s.p99_ms - 2.5).abs() < 1e-9);
        assert_eq!(s.errors, 6);
        assert!(parse_wrk("garbage").is_err());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
