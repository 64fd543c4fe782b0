//! Scenario `datapath`: HTTP(S) through an L4 proxy, measured with `wrk`
//! against (a) one backend directly, (b) HAProxy in mode tcp, (c) bulwark's
//! proxy, all in front of the same backends, in one invocation.
//!
//! The workloads are the shapes of the independent run quoted in issue 19
//! (wrk, 1 thread, 32 connections, nginx backends): small keep-alive over
//! TLS, an 87 KiB body over TLS keep-alive, and a new connection per
//! request with `Connection: close`, both plain and with a new TLS
//! connection each time (TLS passed through to a TLS backend, as bulwark
//! does for the apiserver). Plain and TLS backends are separate stacks
//! (nginx, HAProxy and each bulwark contender started afresh for each), as
//! bulwark's listener routes to one backend set.
//!
//! Runs alternate the contenders' order so slow drift (thermal, noisy
//! neighbours) does not favour one; each figure is the median of the runs.
//!
//! After the plain workloads, each proxy's resident memory is read with
//! `--idle-connections` keep-alive connections open through it, each idle
//! after one request (what thousands of watches cost a node).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::report::{ReportHead, publish};
use crate::stats::{cpu_seconds, loadavg, median, report_machine};

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
    #[arg(long, default_value_t = 1)]
    wrk_threads: usize,
    /// wrk connections (keep-alive workloads).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// wrk connections for the connection-per-request workloads.
    #[arg(long, default_value_t = 32)]
    close_connections: usize,
    /// The backends: `nginx` (as the outside run) or `builtin` (this
    /// binary's hyper server).
    #[arg(long, value_enum, default_value_t = BackendKind::Nginx)]
    backend: BackendKind,
    /// nginx binary (`--backend nginx`).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
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
    /// two builds in one run, on the same machine state. Every build reads
    /// a configuration holding only what differs from the defaults, so a
    /// build from before a field was added starts too.
    #[arg(long = "also-lb")]
    also_lb: Vec<PathBuf>,
    /// HAProxy binary.
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy: PathBuf,
    /// wrk binary.
    #[arg(long, default_value = "/usr/bin/wrk")]
    wrk: PathBuf,
    /// Where to write `<date>-datapath[-<tag>].md` and `.json`.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Run only the workloads whose name contains one of these (repeatable;
    /// e.g. `87 KiB`, `new TLS`); default: all.
    #[arg(long = "workload")]
    workloads: Vec<String>,
    /// Suffix of the result files' names (e.g. `before-after`).
    #[arg(long)]
    tag: Option<String>,
    /// Keep-alive connections held open and idle through each proxy (one
    /// plain request each) while its resident memory is read, after the
    /// plain workloads; 0 skips it.
    #[arg(long, default_value_t = 2000)]
    idle_connections: usize,
    /// Print the table only; write no files.
    #[arg(long)]
    no_write: bool,
}

const BACKENDS: usize = 3;

/// Which server the backends are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BackendKind {
    Nginx,
    Builtin,
}

struct Workload {
    name: &'static str,
    path: &'static str,
    /// A new connection per request (`Connection: close`).
    close: bool,
    /// HTTPS (TLS passed through) rather than plain HTTP.
    tls: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "small keep-alive (TLS)",
        path: "/small",
        close: false,
        tls: true,
    },
    Workload {
        name: "87 KiB keep-alive (TLS)",
        path: "/87k",
        close: false,
        tls: true,
    },
    Workload {
        name: "new TLS connection per request",
        path: "/small",
        close: true,
        tls: true,
    },
    Workload {
        name: "new connection per request (plain)",
        path: "/small",
        close: true,
        tls: false,
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
    // The line `wait_seeded` waits for: from raft::seed since b565451,
    // from node before (an --also-lb build may be older).
    c.logging.level = "warn,bulwark_lb::raft::seed=info,bulwark_lb::node=info".into();
    c.proxy.splice = !buffered;
    if let Some(b) = args.buffer_size {
        c.proxy.buffer_size = b;
    }
    c.backends = backends
        .iter()
        .enumerate()
        .map(|(i, b)| config::lb_backend(&format!("b{i}"), *b, ""))
        .collect();
    // Only what differs from the defaults: an --also-lb build from before
    // a field was added reads the same file.
    let config = config::write_lean(work.join("lb.yaml"), &c, &config::lb(1), &["nodeId"])?;
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

/// wrk's throughput and latency figures: one run's, or the medians of
/// several.
#[derive(Clone, Copy, Debug, Serialize)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// wrk's per-thread latency statistics (mean, standard deviation and
    /// maximum; with one wrk thread, of every request).
    avg_ms: f64,
    stdev_ms: f64,
    max_ms: f64,
}

impl Figures {
    /// The median of each figure over `samples`.
    fn median(samples: &[Sample]) -> Self {
        let med = |f: fn(&Self) -> f64| median(samples.iter().map(|s| f(&s.figures)));
        Self {
            rps: med(|f| f.rps),
            p50_ms: med(|f| f.p50_ms),
            p99_ms: med(|f| f.p99_ms),
            avg_ms: med(|f| f.avg_ms),
            stdev_ms: med(|f| f.stdev_ms),
            max_ms: med(|f| f.max_ms),
        }
    }
}

/// One wrk run's figures.
#[derive(Clone, Copy, Debug, Serialize)]
struct Sample {
    #[serde(flatten)]
    figures: Figures,
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
    let mut stats = None;
    let mut errors = 0u64;
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Latency")
            && !v.trim_start().starts_with("Distribution")
        {
            // "Latency   631.06us  218.09us   5.36ms   83.02%"
            let f: Vec<Option<f64>> = v.split_whitespace().take(3).map(parse_latency).collect();
            if let [Some(avg), Some(sd), Some(max)] = f[..] {
                stats = Some((avg, sd, max));
            }
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
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
    match (rps, p50, p99, stats) {
        (Some(rps), Some(p50_ms), Some(p99_ms), Some((avg_ms, stdev_ms, max_ms))) => Ok(Sample {
            figures: Figures {
                rps,
                p50_ms,
                p99_ms,
                avg_ms,
                stdev_ms,
                max_ms,
            },
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
    /// The median of each figure over the runs.
    #[serde(flatten)]
    median: Figures,
    /// The largest maximum latency of any run.
    worst_max_ms: f64,
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
    #[serde(flatten)]
    head: ReportHead,
    note: String,
    rows: Vec<Row>,
    idle_memory: Vec<IdleMemory>,
}

/// A proxy's resident memory with idle keep-alive connections open.
#[derive(Serialize)]
struct IdleMemory {
    contender: String,
    connections: usize,
    rss_before_kib: u64,
    rss_idle_kib: u64,
    /// (idle − before) ÷ connections.
    per_connection_kib: f64,
}

/// Opens `n` keep-alive connections through each proxy, sends one plain
/// request on each and reads the answer, then reads the proxy's resident
/// memory while all of them are open and idle (and closes them).
fn idle_memory(targets: &[Target], n: usize) -> anyhow::Result<Vec<IdleMemory>> {
    let mut out = Vec::new();
    for t in targets {
        let Some(pid) = t.pid else { continue };
        let before = rss_kib(pid)?;
        let held = (0..n)
            .map(|_| one_request(t.addr))
            .collect::<anyhow::Result<Vec<TcpStream>>>()
            .with_context(|| format!("holding {n} idle connections through {}", t.name))?;
        // The proxy has written every answer; give its threads a moment to
        // finish their side of the last ones.
        std::thread::sleep(Duration::from_millis(500));
        let idle = rss_kib(pid)?;
        drop(held);
        eprintln!(
            "idle connections: {:<18} {n} open: RSS {before} KiB -> {idle} KiB",
            t.name
        );
        out.push(IdleMemory {
            contender: t.name.clone(),
            connections: n,
            rss_before_kib: before,
            rss_idle_kib: idle,
            per_connection_kib: (idle as f64 - before as f64) / n as f64,
        });
    }
    Ok(out)
}

/// A connection to `addr` that has carried one `GET /small` and its whole
/// answer, left open.
fn one_request(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !whole_response(&got) {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("the connection closed before the whole answer");
        }
        got.extend_from_slice(&chunk[..n]);
    }
    Ok(s)
}

/// Whether `got` holds an HTTP response's head and its `Content-Length`
/// bytes of body.
fn whole_response(got: &[u8]) -> bool {
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    got.len() >= end + 4 + length
}

/// `VmRSS` of process `pid`, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
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
    // The held idle connections, and the proxies and nginx they reach,
    // need more descriptors than the usual 1,024 (spawned ones inherit it).
    crate::suite::raise_nofile()?;
    let mut samples = Samples::new();
    let mut memory = Vec::new();
    let mut names = Vec::new();
    // One stack per scheme: bulwark's listener routes to one backend set.
    for tls in [true, false] {
        if !WORKLOADS.iter().any(|w| w.tls == tls && selected(args, w)) {
            continue;
        }
        let sub = dir.path().join(if tls { "tls" } else { "plain" });
        std::fs::create_dir_all(&sub)?;
        let mut stack = Stack::start(args, &exe, &sub, tls)?;
        let targets = stack.targets();
        measure(args, &targets, tls, &mut samples)?;
        if !tls && args.idle_connections > 0 {
            memory = idle_memory(&targets, args.idle_connections)?;
        }
        stack.check_alive()?;
        names = targets.into_iter().map(|t| t.name).collect();
    }
    let rows = rows(&samples, &names);

    let mut tools = vec![("haproxy", "-v"), ("wrk", "-v")];
    if args.backend == BackendKind::Nginx {
        tools.push(("nginx", "-v"));
    }
    let report = Report {
        head: ReportHead::new(report_machine(&tools, load_before), settings(args)),
        note: format!(
            "bulwark = the bulwark-lb binary (a one-node cluster: Raft, store and API \
             running; the contender is its node-local listener), with the backends \
             seeded from its configuration. Backends: {}.",
            match args.backend {
                BackendKind::Nginx => "nginx (three servers in one nginx)",
                BackendKind::Builtin => "bulwark-bench's hyper server",
            }
        ),
        rows,
        idle_memory: memory,
    };
    let scenario = match &args.tag {
        Some(t) => format!("datapath-{t}"),
        None => "datapath".into(),
    };
    publish(
        &args.out,
        args.no_write,
        &report.head,
        &scenario,
        &markdown(&report),
        &report,
    )
}

/// Every process of one datapath run (killed when dropped): the backends,
/// HAProxy and each bulwark contender, all in front of the same backends.
struct Stack {
    backend: Backends,
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
    /// Backends over TLS (`tls`) or plain HTTP, and the proxies in front.
    fn start(args: &Args, exe: &Path, dir: &Path, tls: bool) -> anyhow::Result<Self> {
        let (backend, backend_addrs) = start_backends(args, exe, dir, tls)?;
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
        for p in [&mut self.backend.proc, &mut self.haproxy]
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

/// The backends' process. nginx is stopped with SIGTERM first: its
/// workers outlive a master killed with SIGKILL, still listening.
struct Backends {
    proc: Proc,
    graceful: bool,
}

impl Drop for Backends {
    fn drop(&mut self) {
        if !self.graceful {
            return;
        }
        let pid = self.proc.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn start_backends(
    args: &Args,
    exe: &Path,
    dir: &Path,
    tls: bool,
) -> anyhow::Result<(Backends, Vec<SocketAddr>)> {
    let addrs: Vec<SocketAddr> = (0..BACKENDS)
        .map(|_| free_port())
        .collect::<anyhow::Result<_>>()?;
    let cmd = match args.backend {
        BackendKind::Nginx => {
            let cfg = nginx_files(dir, &addrs, args.backend_threads, tls)?;
            let mut cmd = pinned(&args.cpus_backend, &args.nginx);
            cmd.arg("-p").arg(dir).arg("-c").arg(cfg);
            cmd
        }
        BackendKind::Builtin => {
            let mut cmd = pinned(&args.cpus_backend, exe);
            cmd.arg("backend")
                .arg("--threads")
                .arg(args.backend_threads.to_string());
            if !tls {
                cmd.arg("--plain");
            }
            for a in &addrs {
                cmd.arg("--listen").arg(a.to_string());
            }
            cmd
        }
    };
    let mut backend = Backends {
        proc: spawn("backends", cmd, &dir.join("backends.log"))?,
        graceful: args.backend == BackendKind::Nginx,
    };
    for a in &addrs {
        wait_listening(&mut backend.proc, *a)?;
    }
    Ok((backend, addrs))
}

/// Writes nginx's configuration, certificate and bodies under `dir`: one
/// server per address, serving `/small` and `/87k` as static files, over
/// TLS (a fresh self-signed ECDSA certificate, as an apiserver's) or plain.
fn nginx_files(
    dir: &Path,
    addrs: &[SocketAddr],
    workers: usize,
    tls: bool,
) -> anyhow::Result<PathBuf> {
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::write(www.join("small"), crate::backend::SMALL)?;
    std::fs::write(www.join("87k"), vec![b'x'; crate::backend::BODY_87K])?;
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("generating the backends' certificate")?;
    std::fs::write(dir.join("backend.crt"), key.cert.pem())?;
    std::fs::write(dir.join("backend.key"), key.signing_key.serialize_pem())?;
    let d = dir.display();
    let mut servers = String::new();
    for a in addrs {
        let ssl = if tls { " ssl" } else { "" };
        let _ = writeln!(servers, "    server {{\n        listen {a}{ssl};");
        if tls {
            let _ = writeln!(
                servers,
                "        ssl_certificate {d}/backend.crt;\n        ssl_certificate_key {d}/backend.key;"
            );
        }
        let _ = writeln!(
            servers,
            "        root {d}/www;\n        default_type application/json;\n    }}"
        );
    }
    // Runs as root (the temp dir is private to root); no access log, as
    // the outside run's backends would only have spent CPU on it.
    let cfg = format!(
        "daemon off;\nuser root;\nworker_processes {workers};\npid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\n\
         events {{\n    worker_connections 8192;\n}}\n\
         http {{\n    access_log off;\n    sendfile on;\n    tcp_nodelay on;\n\
         \x20   keepalive_requests 1000000;\n    keepalive_timeout 120s;\n\
         \x20   client_body_temp_path {d}/tmp;\n    proxy_temp_path {d}/tmp;\n\
         \x20   fastcgi_temp_path {d}/tmp;\n    uwsgi_temp_path {d}/tmp;\n    scgi_temp_path {d}/tmp;\n\
         {servers}}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, cfg)?;
    Ok(path)
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

fn selected(args: &Args, w: &Workload) -> bool {
    args.workloads.is_empty() || args.workloads.iter().any(|s| w.name.contains(s.as_str()))
}

/// Runs the workloads of one scheme (`tls` or plain) against `targets`.
fn measure(
    args: &Args,
    targets: &[Target],
    tls: bool,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    for run in 0..args.runs {
        for (wi, w) in WORKLOADS
            .iter()
            .enumerate()
            .filter(|(_, w)| w.tls == tls && selected(args, w))
        {
            // Rotate the order every run: no contender always goes first.
            let n = targets.len();
            for k in 0..n {
                let target = &targets[(k + run) % n];
                let s = wrk(args, w, target)?;
                eprintln!(
                    "run {}/{} {:<34} {:<18} {:>8.0} req/s  p50 {:>6.3}  p99 {:>6.3}  max {:>7.2} ms  errors {}  cpu {}",
                    run + 1,
                    args.runs,
                    w.name,
                    target.name,
                    s.figures.rps,
                    s.figures.p50_ms,
                    s.figures.p99_ms,
                    s.figures.max_ms,
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
    Ok(())
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
    let scheme = if w.tls { "https" } else { "http" };
    cmd.arg(format!("{scheme}://{}{}", target.addr, w.path));
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
        let requests = s.figures.rps * elapsed;
        if requests > 0.0 {
            s.cpu_us_per_req = Some((b - a) * 1e6 / requests);
        }
    }
    Ok(s)
}

/// One row per (workload, contender): medians over the runs and the ratios
/// to HAProxy's medians in the same run.
fn rows(samples: &Samples, names: &[String]) -> Vec<Row> {
    let mut rows = Vec::new();
    for (wi, w) in WORKLOADS.iter().enumerate().filter(|(wi, _)| {
        names
            .iter()
            .any(|n| samples.contains_key(&(*wi, n.clone())))
    }) {
        let get = |name: &str| {
            samples
                .get(&(wi, name.to_owned()))
                .cloned()
                .unwrap_or_default()
        };
        let ha = get("haproxy");
        let ha_median = Figures::median(&ha);
        let cpu = |v: &[Sample]| {
            let c: Vec<f64> = v.iter().filter_map(|s| s.cpu_us_per_req).collect();
            (!c.is_empty()).then(|| median(c))
        };
        let ha_cpu = cpu(&ha);
        for name in names {
            let v = get(name);
            let m = Figures::median(&v);
            let is_ha = name == "haproxy";
            rows.push(Row {
                workload: w.name.into(),
                contender: name.clone(),
                median: m,
                worst_max_ms: v.iter().map(|s| s.figures.max_ms).fold(0.0, f64::max),
                errors: v.iter().map(|s| s.errors).sum(),
                rps_ratio_to_haproxy: (!is_ha).then(|| m.rps / ha_median.rps),
                p99_ratio_to_haproxy: (!is_ha).then(|| m.p99_ms / ha_median.p99_ms),
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
        ("workloads", args.workloads.join(" | ")),
        (
            "backend",
            match args.backend {
                BackendKind::Nginx => "nginx",
                BackendKind::Builtin => "builtin",
            }
            .to_owned(),
        ),
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
    let mut s = r.head.markdown("datapath");
    let _ = writeln!(s, "Note: {}\n", r.note);
    let _ = writeln!(
        s,
        "Figures are medians of {} alternating runs; ratios are to HAProxy \
         (throughput: higher is better, ≥ 1.1 is issue 19's target; p99: lower is better, ≤ 1.0 is the \
         target; CPU per request: ≤ 0.9 is the target). \
         CPU is the user + system time of the proxy's process (all threads) per request, from \
         /proc/<pid>/stat around each wrk run: it does not depend on what else the machine runs, \
         unlike throughput on a shared 2-core machine, where the load generator, the backends and \
         the proxy compete for the same cores.\n",
        r.head.setting("runs")
    );
    let _ = writeln!(
        s,
        "| workload | contender | req/s | p50 ms | p99 ms | avg ms | sd ms | max ms (median / worst) | errors | CPU µs/req | req/s ÷ HAProxy | p99 ÷ HAProxy | CPU ÷ HAProxy |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in &r.rows {
        let ratio = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "—".into());
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} / {:.2} | {} | {} | {} | {} | {} |",
            row.workload,
            row.contender,
            row.median.rps,
            row.median.p50_ms,
            row.median.p99_ms,
            row.median.avg_ms,
            row.median.stdev_ms,
            row.median.max_ms,
            row.worst_max_ms,
            row.errors,
            row.cpu_us_per_req
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "—".into()),
            ratio(row.rps_ratio_to_haproxy),
            ratio(row.p99_ratio_to_haproxy),
            ratio(row.cpu_ratio_to_haproxy)
        );
    }
    idle_memory_table(&mut s, &r.idle_memory);
    s
}

fn idle_memory_table(s: &mut String, rows: &[IdleMemory]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nResident memory (VmRSS) of each proxy's process with {} keep-alive connections \
         open through it, each idle after one plain request (after the plain workloads):\n",
        rows[0].connections
    );
    let _ = writeln!(
        s,
        "| contender | RSS before | RSS with them open | per idle connection |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for m in rows {
        let _ = writeln!(
            s,
            "| {} | {} KiB | {} KiB | {:.1} KiB |",
            m.contender, m.rss_before_kib, m.rss_idle_kib, m.per_connection_kib
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "Running 1s test @ https://127.0.0.1:1/small
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   631.06us  218.09us   5.36ms   83.02%
    Req/Sec     7.80k   311.65     8.41k    70.00%
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
        assert_eq!(s.figures.rps, 1234.56);
        assert!((s.figures.p50_ms - 0.52).abs() < 1e-9);
        assert!((s.figures.p99_ms - 2.5).abs() < 1e-9);
        assert_eq!(s.errors, 6);
        assert!((s.figures.avg_ms - 0.63106).abs() < 1e-9);
        assert!((s.figures.stdev_ms - 0.21809).abs() < 1e-9);
        assert!((s.figures.max_ms - 5.36).abs() < 1e-9);
        assert!(parse_wrk("garbage").is_err());
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert!(!whole_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"));
        assert!(!whole_response(&[&head[..], b"abc"].concat()));
        assert!(whole_response(&[&head[..], b"abcde"].concat()));
        assert!(whole_response(b"HTTP/1.1 204 No Content\r\n\r\n"));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
