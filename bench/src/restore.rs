//! Benchmark: restore time and delta RPO.
//!
//! Restore: a single-member etcd 3.5.1 filled with JSON-like 1 MiB values
//! is snapshotted through bulwark-backup's pipeline to the file store.
//! Then, per run, side by side: `etcdutl snapshot restore` of the plain
//! snapshot file (the baseline), and bulwark's restore of one member — the
//! target build (download, stored hash, zstd, etcd's trailer check; no
//! deltas) and the member step (`etcdutl snapshot restore` of the target,
//! which is what every agent runs). A point-in-time build is also timed:
//! the same snapshot rolled forward by `--delta-writes` recorded puts.
//!
//! RPO: the delta recorder with its defaults (500 ms flush) follows etcd
//! while a writer puts small keys at `--write-rate` per second for
//! `--rpo-seconds`; every acknowledged write's revision and time are
//! recorded, and the recorder's committed revision is sampled every 5 ms.
//! Reported: the lag from acknowledgement to committed segment (p50, p99,
//! max), and at the end the recorder is aborted without a flush (a crash):
//! how many acknowledged writes no committed segment holds, and how old the
//! oldest of them was.
//!
//! ```text
//! target/release/bulwark-bench restore --size-mib 1100 --runs 3
//! ```
//!
//! Results go to `bench/results/<date>-restore.md` and `.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bulwark_backup::config::MemberChoice;
use bulwark_backup::delta::{DeltaSettings, DeltaStatus, Recorder};
use bulwark_backup::engine::{DrillSettings, Engine, PipelineSettings};
use bulwark_backup::etcd::EtcdConnector;
use bulwark_backup::pipeline::encryption::Keyring;
use bulwark_backup::restore::pitr::Target;
use bulwark_backup::snapshot::SnapshotOptions;
use bulwark_backup::snapshot::retention::RetentionPolicy;
use bulwark_backup::store::StoreSpec;
use bulwark_testkit::{Etcd, EtcdVersion, tools};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backup::{etcd_machine, fill};
use crate::stats::{median, percentile};

/// `bulwark-bench restore`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Database size to fill, in MiB of values.
    #[arg(long, default_value_t = 1100)]
    size_mib: usize,
    /// Runs per variant (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Recorded puts replayed by the point-in-time build.
    #[arg(long, default_value_t = 5000)]
    delta_writes: usize,
    /// RPO: writes per second.
    #[arg(long, default_value_t = 200)]
    write_rate: u32,
    /// RPO: how long the writer runs.
    #[arg(long, default_value_t = 20)]
    rpo_seconds: u64,
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct RestoreRun {
    etcdutl_seconds: f64,
    build_seconds: f64,
    member_restore_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Rpo {
    writes: usize,
    write_rate: u32,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    lag_max_ms: f64,
    missing_after_crash: usize,
    oldest_missing_age_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    date: String,
    command: String,
    machine: BTreeMap<String, String>,
    db_size_bytes: u64,
    stored_bytes: u64,
    runs: Vec<RestoreRun>,
    median_etcdutl_seconds: f64,
    median_build_seconds: f64,
    median_member_restore_seconds: f64,
    member_ratio_to_etcdutl: f64,
    total_ratio_to_etcdutl: f64,
    pitr_events: u64,
    pitr_build_seconds: f64,
    rpo: Rpo,
}

/// Runs the scenario.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let cmdline = std::env::args().collect::<Vec<_>>().join(" ");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args, cmdline))
}

fn etcdutl_restore(db: &Path, dir: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let out = Command::new(tools::etcdutl()?)
        .args(["snapshot", "restore"])
        .arg(db)
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--name",
            "m",
            "--initial-cluster",
            "m=http://127.0.0.1:2380",
        ])
        .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "etcdutl snapshot restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn bench(args: &Args, cmdline: String) -> anyhow::Result<()> {
    bulwark_common::tls::install_crypto_provider();
    let work = tempfile::Builder::new()
        .prefix("bench-restore-")
        .tempdir()?;
    let etcd = Etcd::start().await?;
    eprintln!("filling etcd with {} MiB", args.size_mib);
    fill(&etcd, "text", args.size_mib).await?;
    let store_dir = work.path().join("store");
    std::fs::create_dir_all(&store_dir)?;
    let store = StoreSpec::parse(&format!("file://{}", store_dir.display()), &BTreeMap::new())
        .map_err(anyhow::Error::msg)?
        .build()?;
    let engine = Arc::new(Engine::new(
        "bench".into(),
        "bench".into(),
        EtcdConnector::plain(etcd.endpoints(), Duration::from_secs(30)),
        store,
        Keyring::none(),
        PipelineSettings {
            level: 1,
            workers: 0,
            part_size: 8 << 20,
            upload_concurrency: 2,
            stall_timeout: Duration::from_secs(60),
            member_choice: MemberChoice::Leader,
        },
        DrillSettings {
            etcdutl: tools::etcdutl()?,
            etcd: tools::etcd(EtcdVersion::V3_5)?,
            work_dir: Some(work.path().to_owned()),
            start_timeout: Duration::from_secs(120),
        },
        RetentionPolicy::default(),
        Duration::from_secs(3600),
    ));
    let cancel = CancellationToken::new();
    let manifest = engine
        .take_snapshot(SnapshotOptions::manual("bench"), &(), &cancel, &|| Ok(()))
        .await
        .context("snapshot")?;
    eprintln!(
        "snapshot {}: {} MiB raw, {} MiB stored",
        manifest.id,
        manifest.raw_size_bytes >> 20,
        manifest.stored_size_bytes >> 20
    );

    let mut runs = Vec::new();
    for run in 0..args.runs {
        let dir = work.path().join(format!("run-{run}"));
        std::fs::create_dir_all(&dir)?;
        // bulwark: build the target (download and every check), then the
        // member step.
        let started = Instant::now();
        let plan = engine
            .plan_restore(Some(&manifest.id), Target::Snapshot)
            .await?;
        let built = engine.build_target(&plan, &dir, &|_| {}, &cancel).await?;
        let build_seconds = started.elapsed().as_secs_f64();
        let member_restore_seconds = etcdutl_restore(&built.path, &dir.join("member-data"))?;
        // Baseline: etcdutl on the same plain file, into another dir.
        let etcdutl_seconds = etcdutl_restore(&built.path, &dir.join("etcdutl-data"))?;
        eprintln!(
            "run {run}: etcdutl {etcdutl_seconds:.2} s; bulwark build {build_seconds:.2} s + member {member_restore_seconds:.2} s"
        );
        runs.push(RestoreRun {
            etcdutl_seconds,
            build_seconds,
            member_restore_seconds,
        });
        std::fs::remove_dir_all(&dir)?;
    }

    // The recorder follows the snapshot (PITR, then RPO).
    let status = Arc::new(Mutex::new(DeltaStatus::default()));
    let recorder = Recorder::new(engine.clone(), DeltaSettings::default(), status.clone());
    let rec_cancel = CancellationToken::new();
    let task = {
        let rec_cancel = rec_cancel.clone();
        tokio::spawn(async move {
            recorder
                .run(&rec_cancel, &|| {
                    Box::pin(async {
                        Err(bulwark_backup::BackupError::Refused(
                            "no gap expected in the bench".into(),
                        ))
                    })
                })
                .await
        })
    };

    // PITR: replay --delta-writes puts.
    let mut c = etcd.client().await?;
    let mut last = 0;
    for i in 0..args.delta_writes {
        last = c
            .put(format!("delta/{i:06}"), format!("value-{i}"), None)
            .await?
            .header()
            .map(|h| h.revision())
            .unwrap_or(0);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while status.lock().map(|s| s.newest_revision).unwrap_or(0) < last {
        if Instant::now() > deadline {
            bail!("the recorder never covered revision {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dir = work.path().join("pitr");
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let plan = engine
        .plan_restore(Some(&manifest.id), Target::Revision(last))
        .await?;
    let built = engine.build_target(&plan, &dir, &|_| {}, &cancel).await?;
    let pitr_build_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "pitr: {} events replayed, build {pitr_build_seconds:.2} s",
        built.events_applied
    );
    std::fs::remove_dir_all(&dir)?;

    // RPO under steady writes.
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.write_rate.max(1)));
    let acks: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let commits: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let sampler = {
        let status = status.clone();
        let commits = commits.clone();
        tokio::spawn(async move {
            let mut prev = 0;
            loop {
                let r = status.lock().map(|s| s.newest_revision).unwrap_or(0);
                if r != prev {
                    prev = r;
                    if let Ok(mut c) = commits.lock() {
                        c.push((r, Instant::now()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let end = Instant::now() + Duration::from_secs(args.rpo_seconds);
    let mut tick = tokio::time::interval(interval);
    let mut i = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let r = c
            .put(format!("rpo/{i:08}"), "x".repeat(200), None)
            .await?
            .header()
            .map(|h| h.revision())
            .unwrap_or(0);
        if let Ok(mut a) = acks.lock() {
            a.push((r, Instant::now()));
        }
        i += 1;
    }
    // Crash: the recorder stops without flushing its buffer.
    let crash = Instant::now();
    task.abort();
    let _ = task.await;
    sampler.abort();
    let committed_at_crash = status.lock().map(|s| s.newest_revision).unwrap_or(0);
    let acks = acks.lock().map(|a| a.clone()).unwrap_or_default();
    let commits = commits.lock().map(|c| c.clone()).unwrap_or_default();
    let mut lags: Vec<f64> = acks
        .iter()
        .filter_map(|(rev, at)| {
            commits
                .iter()
                .find(|(r, _)| r >= rev)
                .map(|(_, t)| t.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    lags.sort_by(|a, b| a.total_cmp(b));
    let missing: Vec<&(i64, Instant)> = acks
        .iter()
        .filter(|(r, _)| *r > committed_at_crash)
        .collect();
    let rpo = Rpo {
        writes: acks.len(),
        write_rate: args.write_rate,
        lag_p50_ms: percentile(&lags, 50.0),
        lag_p99_ms: percentile(&lags, 99.0),
        lag_max_ms: lags.last().copied().unwrap_or(0.0),
        missing_after_crash: missing.len(),
        oldest_missing_age_ms: missing
            .first()
            .map(|(_, t)| crash.saturating_duration_since(*t).as_secs_f64() * 1000.0)
            .unwrap_or(0.0),
    };
    eprintln!("rpo: {rpo:?}");
    rec_cancel.cancel();

    let med = |f: fn(&RestoreRun) -> f64| median(runs.iter().map(f));
    let (e, b, m) = (
        med(|r| r.etcdutl_seconds),
        med(|r| r.build_seconds),
        med(|r| r.member_restore_seconds),
    );
    let report = Report {
        date: chrono::Utc::now().to_rfc3339(),
        command: cmdline,
        machine: etcd_machine(),
        db_size_bytes: manifest.raw_size_bytes,
        stored_bytes: manifest.stored_size_bytes,
        runs,
        median_etcdutl_seconds: e,
        median_build_seconds: b,
        median_member_restore_seconds: m,
        member_ratio_to_etcdutl: m / e.max(1e-9),
        total_ratio_to_etcdutl: (b + m) / e.max(1e-9),
        pitr_events: built.events_applied,
        pitr_build_seconds,
        rpo,
    };
    write_report(&args.out, &report)
}

fn write_report(dir: &Path, r: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let day = &r.date[..10];
    let json = dir.join(format!("{day}-restore.json"));
    std::fs::write(&json, serde_json::to_vec_pretty(r)?)?;
    let mut md = format!(
        "# Restore benchmark, {day}\n\nCommand: `{}`\n\n## Machine\n\n",
        r.command
    );
    for (k, v) in &r.machine {
        md.push_str(&format!("- {k}: {v}\n"));
    }
    md.push_str(&format!(
        "\n## Restore of one member, DB {:.0} MiB ({:.0} MiB stored, zstd 1, file store)\n\n\
         | step | median |\n|---|---|\n\
         | `etcdutl snapshot restore` of the plain snapshot (baseline) | {:.2} s |\n\
         | bulwark member step (`etcdutl snapshot restore` of the built target, as each agent runs it) | {:.2} s ({:.2}×) |\n\
         | bulwark target build (download, stored SHA-256, zstd, etcd trailer check) | {:.2} s |\n\
         | bulwark total (build + member step) | {:.2} s ({:.2}×) |\n\n\
         Point-in-time build: {} recorded events replayed onto the same snapshot in {:.2} s \
         (download and checks, scratch etcd, replay, snapshot of the result).\n\n\
         ## Delta RPO under steady writes\n\n\
         {} writes at {} per second; recorder defaults (flush every 500 ms or 4 MiB).\n\n\
         | acknowledged → committed segment | |\n|---|---|\n| p50 | {:.0} ms |\n| p99 | {:.0} ms |\n| max | {:.0} ms |\n\n\
         Recorder aborted without a flush right after the last write (a crash): \
         {} acknowledged writes were in no committed segment; the oldest of them was {:.0} ms old.\n",
        r.db_size_bytes as f64 / 1048576.0,
        r.stored_bytes as f64 / 1048576.0,
        r.median_etcdutl_seconds,
        r.median_member_restore_seconds,
        r.member_ratio_to_etcdutl,
        r.median_build_seconds,
        r.median_build_seconds + r.median_member_restore_seconds,
        r.total_ratio_to_etcdutl,
        r.pitr_events,
        r.pitr_build_seconds,
        r.rpo.writes,
        r.rpo.write_rate,
        r.rpo.lag_p50_ms,
        r.rpo.lag_p99_ms,
        r.rpo.lag_max_ms,
        r.rpo.missing_after_crash,
        r.rpo.oldest_missing_age_ms,
    ));
    let path = dir.join(format!("{day}-restore.md"));
    std::fs::write(&path, md)?;
    eprintln!("wrote {} and {}", path.display(), json.display());
    Ok(())
}
