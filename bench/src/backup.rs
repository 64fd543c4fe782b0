//! Benchmark: a full snapshot of a ≥ 1 GB etcd database through
//! bulwark-backup's pipeline (to the file store, with and without age, and
//! to the moto S3 server) against `etcdctl snapshot save` to local disk, in
//! one run, as medians of several runs and ratios.
//!
//! Each measured snapshot runs in its own process (`bulwark-bench
//! backup-once …` for ours, `etcdctl` for the baseline), so wall time and
//! peak RSS (`ru_maxrss` from `wait4`) are those of a process doing exactly
//! that. Two databases are measured: 1 MiB values of random bytes
//! (incompressible, the worst case for time) and of JSON-like text
//! (compressible, like real Kubernetes objects).
//!
//! ```text
//! target/release/bulwark-bench backup --size-mib 1100 --runs 3
//! ```
//!
//! Besides wall time and peak RSS, each run records the CPU time (user +
//! system, from `wait4`) of the measured process and of etcd, per GiB of
//! snapshot: unlike wall time, CPU time barely moves when other work shares
//! the machine. `--baseline-exe` runs the file variants of another build of
//! `bulwark-bench` in the same run (`file@base`, `file+age@base`), so a
//! change to the pipeline can be compared before and after side by side.
//!
//! Results go to `bench/results/<date>-backup.md` and `.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bulwark_backup::config::MemberChoice;
use bulwark_backup::engine::{DrillSettings, Engine, PipelineSettings};
use bulwark_backup::etcd::EtcdConnector;
use bulwark_backup::pipeline::encryption::Keyring;
use bulwark_backup::snapshot::SnapshotOptions;
use bulwark_backup::store::StoreSpec;
use bulwark_testkit::{Etcd, S3Server, tools};

use crate::stats::{cpu_seconds, load_1m, median};
use ring::rand::SecureRandom as _;
use serde::Serialize;

/// `bulwark-bench backup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Database size to fill, in MiB of values (the DB file is a bit larger).
    #[arg(long, default_value_t = 1100)]
    size_mib: usize,
    /// Runs per variant (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Data sets: random, text.
    #[arg(long, value_delimiter = ',', default_value = "random,text")]
    cases: Vec<String>,
    /// zstd level for our pipeline.
    #[arg(long, default_value_t = 1)]
    level: i32,
    /// zstd worker threads (0: none).
    #[arg(long, default_value_t = 0)]
    workers: u32,
    /// Skip the S3 (moto) variant.
    #[arg(long)]
    no_s3: bool,
    /// Another `bulwark-bench` binary (e.g. a build of the previous
    /// commit) whose file variants run in the same run as `…@base`.
    #[arg(long)]
    baseline_exe: Option<PathBuf>,
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// `bulwark-bench backup-once` (internal): one snapshot through the pipeline.
#[derive(Debug, clap::Args)]
pub struct OnceArgs {
    /// etcd client URL.
    #[arg(long)]
    endpoint: String,
    /// Store URL.
    #[arg(long)]
    store: String,
    /// Store options, key=value.
    #[arg(long = "option")]
    options: Vec<String>,
    /// zstd level.
    #[arg(long, default_value_t = 1)]
    level: i32,
    /// zstd workers.
    #[arg(long, default_value_t = 0)]
    workers: u32,
    /// age recipient file (encrypt when given).
    #[arg(long)]
    recipient: Option<PathBuf>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Runs the scenario.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let cmdline = std::env::args().collect::<Vec<_>>().join(" ");
    runtime()?.block_on(bench(args, cmdline))
}

/// Runs one snapshot (the child of [`run`]).
pub fn run_once(a: &OnceArgs) -> anyhow::Result<()> {
    // As the daemon does (see its doc): measure what it would use.
    bulwark_backup::tune_allocator();
    runtime()?.block_on(snapshot_once(
        a.endpoint.clone(),
        a.store.clone(),
        a.options.clone(),
        a.level,
        a.workers,
        a.recipient.clone(),
    ))
}

/// The child: one snapshot, its sizes on stdout as JSON.
async fn snapshot_once(
    endpoint: String,
    store: String,
    options: Vec<String>,
    level: i32,
    workers: u32,
    recipient: Option<PathBuf>,
) -> anyhow::Result<()> {
    bulwark_common::tls::install_crypto_provider();
    let options: BTreeMap<String, String> = options
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let store = StoreSpec::parse(&store, &options)
        .map_err(|e| anyhow::anyhow!(e))?
        .build()?;
    let keys = Keyring::load(recipient.as_deref(), &[])?;
    let engine = Engine::new(
        "bench".into(),
        "bench".into(),
        EtcdConnector::plain(vec![endpoint], Duration::from_secs(30)),
        store,
        keys,
        PipelineSettings {
            level,
            workers,
            part_size: 8 << 20,
            upload_concurrency: 2,
            stall_timeout: Duration::from_secs(120),
            member_choice: MemberChoice::Leader,
        },
        DrillSettings {
            etcdutl: PathBuf::new(),
            etcd: PathBuf::new(),
            work_dir: None,
            start_timeout: Duration::from_secs(1),
        },
        Duration::from_secs(3600),
    );
    let m = engine
        .take_snapshot(
            SnapshotOptions::manual("bench"),
            &(),
            &tokio_util::sync::CancellationToken::new(),
            &|| Ok(()),
        )
        .await?;
    println!(
        "{}",
        serde_json::json!({"raw": m.raw_size_bytes, "stored": m.stored_size_bytes, "id": m.id})
    );
    Ok(())
}

/// Wall time, CPU time and peak RSS of one child process.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    seconds: f64,
    max_rss_kib: u64,
    /// User CPU seconds of the child.
    user_seconds: f64,
    /// System CPU seconds of the child.
    sys_seconds: f64,
    /// CPU seconds etcd used meanwhile.
    etcd_cpu_seconds: f64,
    /// One-minute load average when the run started.
    load_1m: f64,
    stored_bytes: u64,
}

fn seconds(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// Runs `cmd` to completion and measures it with `wait4`.
fn measure(mut cmd: Command) -> anyhow::Result<(Sample, String)> {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let pid = i32::try_from(child.id())?;
    // Read output on threads so a full pipe cannot block the child.
    let mut child = child;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = std::io::Read::read_to_string(o, &mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut s);
        }
        s
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value, and wait4 writes it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet reaped (std's handle never waited).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    // The child is reaped; stop std from trying again.
    std::mem::forget(child);
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{cmd:?} failed (status {status}): {stderr}");
    }
    Ok((
        Sample {
            seconds,
            max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
            user_seconds: self::seconds(usage.ru_utime),
            sys_seconds: self::seconds(usage.ru_stime),
            etcd_cpu_seconds: 0.0,
            load_1m: 0.0,
            stored_bytes: 0,
        },
        stdout,
    ))
}

/// Fills etcd with `mib` values of 1 MiB: random bytes or JSON-like text.
pub(crate) async fn fill(etcd: &Etcd, case: &str, mib: usize) -> anyhow::Result<()> {
    let client = etcd.client().await?;
    let rng = ring::rand::SystemRandom::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..mib {
        let value: Vec<u8> = match case {
            "random" => {
                let mut v = vec![0u8; 1 << 20];
                rng.fill(&mut v)
                    .map_err(|_| anyhow::anyhow!("system RNG failed"))?;
                v
            }
            _ => text_value(&rng)?,
        };
        let mut c = client.clone();
        tasks.spawn(async move { c.put(format!("bench/{i:06}"), value, None).await });
        while tasks.len() >= 8 {
            if let Some(r) = tasks.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// 1 MiB of Kubernetes-like JSON lines with random ids, versions and
/// values in each line, so it compresses like real objects (a few times),
/// not like a repeated block.
fn text_value(rng: &ring::rand::SystemRandom) -> anyhow::Result<Vec<u8>> {
    let mut out = String::with_capacity((1 << 20) + 512);
    let mut n = 0u64;
    while out.len() < (1 << 20) {
        let mut r = [0u8; 28];
        rng.fill(&mut r)
            .map_err(|_| anyhow::anyhow!("system RNG failed"))?;
        let hexed: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let version = u32::from_le_bytes([r[0], r[1], r[2], 0]);
        out.push_str(&format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"cm-{n}\",\
             \"namespace\":\"default\",\"uid\":\"{}-{}-{}\",\"resourceVersion\":\"{version}\"}},\
             \"data\":{{\"checksum\":\"{}\",\"enabled\":\"true\"}}}}\n",
            &hexed[..8],
            &hexed[8..12],
            &hexed[12..24],
            &hexed[24..56],
        ));
        n += 1;
    }
    out.truncate(1 << 20);
    Ok(out.into_bytes())
}

#[derive(Debug, Serialize)]
struct VariantResult {
    variant: String,
    samples: Vec<Sample>,
    median_seconds: f64,
    median_max_rss_mib: f64,
    max_max_rss_mib: f64,
    ratio_to_etcdctl: f64,
    /// Median CPU seconds (user + system) of the process per GiB of snapshot.
    median_cpu_seconds_per_gib: f64,
    /// Median CPU seconds of etcd per GiB of snapshot during the runs.
    median_etcd_cpu_seconds_per_gib: f64,
    stored_bytes: u64,
}

#[derive(Debug, Serialize)]
struct CaseResult {
    case: String,
    db_size_bytes: u64,
    /// Load averages at the start of each run.
    load_1m: Vec<f64>,
    variants: Vec<VariantResult>,
}

#[derive(Debug, Serialize)]
struct Report {
    date: String,
    command: String,
    machine: BTreeMap<String, String>,
    settings: BTreeMap<String, String>,
    cases: Vec<CaseResult>,
}

/// The machine, and the etcd the backup and restore scenarios run against.
pub(crate) fn etcd_machine() -> BTreeMap<String, String> {
    let mut m = crate::stats::machine();
    m.insert("etcd".into(), "3.5.1 (single member, fsync on)".into());
    m
}

async fn bench(args: &Args, cmdline: String) -> anyhow::Result<()> {
    bulwark_common::tls::install_crypto_provider();
    let bench = Bench::new(args).await?;
    let mut cases = Vec::new();
    for case in &args.cases {
        cases.push(bench.case(case).await?);
    }
    let report = Report {
        date: chrono::Utc::now().to_rfc3339(),
        command: cmdline,
        machine: etcd_machine(),
        settings: settings(args),
        cases,
    };
    write_report(&args.out, &report)
}

/// What every case shares: the binaries, a work dir, the age identity and
/// (unless `--no-s3`) the S3 server.
struct Bench<'a> {
    args: &'a Args,
    me: PathBuf,
    etcdctl: PathBuf,
    work: tempfile::TempDir,
    key: PathBuf,
    s3: Option<S3Server>,
}

impl<'a> Bench<'a> {
    async fn new(args: &'a Args) -> anyhow::Result<Self> {
        let work = tempfile::Builder::new().prefix("bench-backup-").tempdir()?;
        let key = work.path().join("age.key");
        write_identity(&key)?;
        let s3 = if args.no_s3 {
            None
        } else {
            Some(S3Server::start().await?)
        };
        Ok(Self {
            args,
            me: std::env::current_exe()?,
            etcdctl: tools::etcdctl(bulwark_testkit::EtcdVersion::V3_5)?,
            work,
            key,
            s3,
        })
    }

    /// One data shape: a fresh etcd filled with it, then every variant
    /// `runs` times, alternating variants within each run.
    async fn case(&self, case: &str) -> anyhow::Result<CaseResult> {
        let args = self.args;
        eprintln!("[{case}] starting etcd and filling {} MiB", args.size_mib);
        let etcd = Etcd::builder()
            .arg("--quota-backend-bytes=8589934592")
            .start()
            .await?;
        fill(&etcd, case, args.size_mib).await?;
        let endpoint = etcd.endpoints()[0].clone();
        let db_size = {
            let mut c = etcd.client().await?;
            u64::try_from(c.status().await?.db_size()).unwrap_or(0)
        };
        eprintln!("[{case}] db size {:.0} MiB", db_size as f64 / 1048576.0);
        let etcd_pid = etcd
            .member(0)
            .pid()
            .context("etcd is not running after the fill")?;

        let variants = self.variants();
        let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
        for run in 0..args.runs {
            for v in &variants {
                let sample = self.run(case, run, v, &endpoint, etcd_pid).await?;
                samples.entry(v).or_default().push(sample);
            }
        }
        drop(etcd);
        Ok(CaseResult {
            case: case.to_owned(),
            db_size_bytes: db_size,
            load_1m: samples.values().flatten().map(|s| s.load_1m).collect(),
            variants: summarise(&variants, &samples, db_size),
        })
    }

    fn variants(&self) -> Vec<&'static str> {
        let mut variants = vec!["etcdctl", "file", "file+age"];
        if self.args.baseline_exe.is_some() {
            variants.extend(["file@base", "file+age@base"]);
        }
        if self.s3.is_some() {
            variants.push("s3");
        }
        variants
    }

    /// One timed backup of variant `v`, then its output removed so the
    /// next run starts from the same free space (and moto's memory).
    async fn run(
        &self,
        case: &str,
        run: usize,
        v: &str,
        endpoint: &str,
        etcd_pid: u32,
    ) -> anyhow::Result<Sample> {
        let store_dir = self
            .work
            .path()
            .join(format!("store-{case}-{run}-{}", v.replace('+', "-")));
        let cmd = self.command(v, endpoint, &store_dir);
        let load = load_1m();
        let etcd_before = cpu_seconds(etcd_pid)?;
        let (mut sample, stdout) = tokio::task::spawn_blocking(move || measure(cmd)).await??;
        sample.etcd_cpu_seconds = cpu_seconds(etcd_pid)? - etcd_before;
        sample.load_1m = load;
        let etcdctl_db = self.work.path().join("etcdctl.db");
        sample.stored_bytes = if v == "etcdctl" {
            std::fs::metadata(&etcdctl_db).map(|m| m.len()).unwrap_or(0)
        } else {
            serde_json::from_str::<serde_json::Value>(stdout.trim())
                .ok()
                .and_then(|j| j["stored"].as_u64())
                .unwrap_or(0)
        };
        eprintln!(
            "[{case}] run {run} {v}: {:.2} s, CPU {:.2} user + {:.2} sys, etcd CPU {:.2}, \
             peak RSS {:.1} MiB, {:.0} MiB stored, load {:.2}",
            sample.seconds,
            sample.user_seconds,
            sample.sys_seconds,
            sample.etcd_cpu_seconds,
            sample.max_rss_kib as f64 / 1024.0,
            sample.stored_bytes as f64 / 1048576.0,
            sample.load_1m
        );
        let _ = std::fs::remove_file(&etcdctl_db);
        let _ = std::fs::remove_dir_all(&store_dir);
        if v == "s3"
            && let Some(s3) = &self.s3
        {
            clear_s3(s3).await?;
        }
        Ok(sample)
    }

    /// The command of variant `v`: `etcdctl snapshot save`, or this
    /// binary's (or the baseline's) `backup-once` into a file or S3 store.
    fn command(&self, v: &str, endpoint: &str, store_dir: &Path) -> Command {
        if v == "etcdctl" {
            let mut c = Command::new(&self.etcdctl);
            c.env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoint}"))
                .args(["snapshot", "save"])
                .arg(self.work.path().join("etcdctl.db"));
            return c;
        }
        let args = self.args;
        let exe = match (v.strip_suffix("@base"), &args.baseline_exe) {
            (Some(_), Some(base)) => base,
            _ => &self.me,
        };
        let mut c = Command::new(exe);
        c.arg("backup-once")
            .args(["--endpoint", endpoint])
            .args(["--level", &args.level.to_string()])
            .args(["--workers", &args.workers.to_string()]);
        match (v, &self.s3) {
            ("s3", Some(s3)) => {
                c.args(["--store", &format!("s3://{}/bench", s3.bucket())]);
                for (k, val) in s3.options() {
                    if k != "aws_bucket" {
                        c.args(["--option", &format!("{k}={val}")]);
                    }
                }
            }
            _ => {
                c.args(["--store", &format!("file://{}", store_dir.display())]);
            }
        }
        if v.starts_with("file+age") {
            c.arg("--recipient").arg(&self.key);
        }
        c
    }
}

/// Each variant's medians, its ratio to etcdctl's median time, and its CPU
/// per GiB of database.
fn summarise(
    variants: &[&str],
    samples: &BTreeMap<&str, Vec<Sample>>,
    db_size: u64,
) -> Vec<VariantResult> {
    let base = median(samples["etcdctl"].iter().map(|s| s.seconds));
    let gib = db_size as f64 / f64::from(1u32 << 30);
    let per_gib = |x: f64| if gib > 0.0 { x / gib } else { 0.0 };
    variants
        .iter()
        .map(|v| {
            let s = &samples[v];
            let t = median(s.iter().map(|x| x.seconds));
            VariantResult {
                variant: (*v).to_owned(),
                samples: s.clone(),
                median_seconds: t,
                median_max_rss_mib: median(s.iter().map(|x| x.max_rss_kib as f64 / 1024.0)),
                max_max_rss_mib: s
                    .iter()
                    .map(|x| x.max_rss_kib as f64 / 1024.0)
                    .fold(0.0, f64::max),
                ratio_to_etcdctl: if base > 0.0 { t / base } else { 0.0 },
                median_cpu_seconds_per_gib: per_gib(median(
                    s.iter().map(|x| x.user_seconds + x.sys_seconds),
                )),
                median_etcd_cpu_seconds_per_gib: per_gib(median(
                    s.iter().map(|x| x.etcd_cpu_seconds),
                )),
                stored_bytes: s.last().map(|x| x.stored_bytes).unwrap_or(0),
            }
        })
        .collect()
}

fn settings(args: &Args) -> BTreeMap<String, String> {
    [
        ("zstd level", args.level.to_string()),
        ("zstd workers", args.workers.to_string()),
        ("part size", "8 MiB".to_owned()),
        ("upload concurrency", "2".to_owned()),
        ("runs", args.runs.to_string()),
        (
            "baseline (…@base)",
            args.baseline_exe
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none".to_owned()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Deletes everything in the moto bucket (moto keeps objects in memory).
async fn clear_s3(s3: &S3Server) -> anyhow::Result<()> {
    use futures::TryStreamExt as _;
    use object_store::{ObjectStore as _, ObjectStoreExt as _};
    let store = s3.store()?;
    let keys: Vec<_> = store
        .list(None)
        .map_ok(|m| m.location)
        .try_collect()
        .await?;
    for k in keys {
        store.delete(&k).await?;
    }
    Ok(())
}

/// A fresh age identity file, as `age-keygen` writes it.
fn write_identity(path: &Path) -> anyhow::Result<()> {
    use age::secrecy::ExposeSecret as _;
    let id = age::x25519::Identity::generate();
    std::fs::write(
        path,
        format!(
            "# public key: {}\n{}\n",
            id.to_public(),
            id.to_string().expose_secret()
        ),
    )?;
    Ok(())
}

fn write_report(dir: &Path, r: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let day = &r.date[..10];
    let json = dir.join(format!("{day}-backup.json"));
    std::fs::write(&json, serde_json::to_vec_pretty(r)?)?;
    let mut md = format!(
        "# Backup benchmark, {day}\n\n\
         Full snapshot of a single-member etcd 3.5.1 through bulwark-backup's pipeline \
         (etcd stream → trailing-hash check → zstd → [age] → multipart upload, manifest last), \
         each run in its own process, against `etcdctl snapshot save` to local disk. \
         Medians of {} runs; peak RSS is the process's `ru_maxrss`.\n\n\
         Command: `{}`\n\n## Machine\n\n",
        r.settings.get("runs").cloned().unwrap_or_default(),
        r.command
    );
    for (k, v) in &r.machine {
        md.push_str(&format!("- {k}: {v}\n"));
    }
    md.push_str("\n## Settings\n\n");
    for (k, v) in &r.settings {
        md.push_str(&format!("- {k}: {v}\n"));
    }
    for c in &r.cases {
        md.push_str(&format!(
            "\n## {} values, DB {:.0} MiB\n\n1-minute load average at the runs' start: {:.2}–{:.2}\n\n\
             | variant | median time | × etcdctl | CPU user+sys | etcd CPU | peak RSS (median / max) | stored |\n\
             |---|---|---|---|---|---|---|\n",
            c.case,
            c.db_size_bytes as f64 / 1048576.0,
            c.load_1m.iter().copied().fold(f64::INFINITY, f64::min),
            c.load_1m.iter().copied().fold(0.0, f64::max),
        ));
        for v in &c.variants {
            md.push_str(&format!(
                "| {} | {:.2} s | {:.2} | {:.2} s/GiB | {:.2} s/GiB | {:.1} / {:.1} MiB | {:.0} MiB |\n",
                v.variant,
                v.median_seconds,
                v.ratio_to_etcdctl,
                v.median_cpu_seconds_per_gib,
                v.median_etcd_cpu_seconds_per_gib,
                v.median_max_rss_mib,
                v.max_max_rss_mib,
                v.stored_bytes as f64 / 1048576.0
            ));
        }
    }
    let path = dir.join(format!("{day}-backup.md"));
    std::fs::write(&path, md)?;
    eprintln!("wrote {} and {}", path.display(), json.display());
    Ok(())
}
