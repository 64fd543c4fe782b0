//! Benchmark: restore time and delta RPO.
//!
//! Restore: a single-member etcd 3.5.1 filled with JSON-like 1 MiB values
//! is snapshotted through bulwark-backup's pipeline to the file store.
//! Then, per run, side by side on the same data, timed from the first
//! command to a member with a leader (see [`members`]): the baseline
//! (`etcdutl snapshot restore` of the plain snapshot file, then etcd
//! started on it), bulwark's snapshot-only restore of one member, and of
//! a three-member cluster (every node fetching, decoding and restoring at
//! once). The machine's load average is recorded at the start and end: a
//! ratio to the baseline of the same run is the figure to read. A
//! point-in-time build is also timed: the same snapshot rolled forward by
//! `--delta-writes` recorded puts, and the built target then moved to three
//! nodes through the store and served by its node ([`targets`]).
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

mod members;
mod targets;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
use bulwark_backup::snapshot::manifest::Manifest;
use bulwark_backup::store::StoreSpec;
use bulwark_testkit::{Etcd, EtcdVersion, tools};
use etcd_client::Client;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backup::{etcd_machine, fill};
use crate::stats::{loadavg, median, percentile};

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
    baseline: members::BaselineTimes,
    /// The baseline for three members restored and started at once on
    /// this machine.
    baseline_three: members::BaselineTimes,
    single: members::MemberTimes,
    three: members::MemberTimes,
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
    load_before: String,
    load_after: String,
    runs: Vec<RestoreRun>,
    baseline: members::BaselineTimes,
    baseline_three: members::BaselineTimes,
    single: members::MemberTimes,
    three: members::MemberTimes,
    single_ratio_to_baseline: f64,
    three_ratio_to_single: f64,
    /// Three members against the three-member baseline on the same cores
    /// and disk: the share of the three-member time bulwark adds.
    three_ratio_to_baseline_three: f64,
    /// The three-member baseline against the one-member one: what sharing
    /// this machine's cores and disk between three members costs anyway.
    baseline_three_ratio_to_baseline: f64,
    pitr_events: u64,
    pitr_build_seconds: f64,
    pitr_target: targets::TargetTimes,
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

async fn bench(args: &Args, cmdline: String) -> anyhow::Result<()> {
    bulwark_common::tls::install_crypto_provider();
    let work = tempfile::Builder::new()
        .prefix("bench-restore-")
        .tempdir()?;
    let etcd = Etcd::start().await?;
    eprintln!("filling etcd with {} MiB", args.size_mib);
    fill(&etcd, "text", args.size_mib).await?;
    let engine = engine(&etcd, work.path())?;
    let manifest = engine
        .take_snapshot(
            SnapshotOptions::manual("bench"),
            &(),
            &CancellationToken::new(),
            &|| Ok(()),
        )
        .await
        .context("snapshot")?;
    eprintln!(
        "snapshot {}: {} MiB raw, {} MiB stored",
        manifest.id,
        manifest.raw_size_bytes >> 20,
        manifest.stored_size_bytes >> 20
    );

    let load_before = loadavg();
    let runs = restore_runs(&engine, &manifest, work.path(), args.runs).await?;
    let load_after = loadavg();

    let recorder = Following::start(engine.clone());
    let mut client = etcd.client().await?;
    let (pitr_events, pitr_build_seconds, pitr_target) = pitr(
        &engine,
        &manifest,
        &recorder,
        &mut client,
        args,
        work.path(),
    )
    .await?;
    let rpo = rpo(recorder, &mut client, args).await?;

    let (baseline, baseline_three, single, three) = medians(&runs);
    let report = Report {
        date: chrono::Utc::now().to_rfc3339(),
        command: cmdline,
        machine: etcd_machine(),
        db_size_bytes: manifest.raw_size_bytes,
        stored_bytes: manifest.stored_size_bytes,
        load_before,
        load_after,
        single_ratio_to_baseline: single.total / baseline.total.max(1e-9),
        three_ratio_to_single: three.total / single.total.max(1e-9),
        three_ratio_to_baseline_three: three.total / baseline_three.total.max(1e-9),
        baseline_three_ratio_to_baseline: baseline_three.total / baseline.total.max(1e-9),
        runs,
        baseline,
        baseline_three,
        single,
        three,
        pitr_events,
        pitr_build_seconds,
        pitr_target,
        rpo,
    };
    write_report(&args.out, &report)
}

/// The engine under test: bulwark-backup's pipeline over a file store in
/// `work`, with the drill tools the testkit installed.
fn engine(etcd: &Etcd, work: &Path) -> anyhow::Result<Arc<Engine>> {
    let store_dir = work.join("store");
    std::fs::create_dir_all(&store_dir)?;
    let store = StoreSpec::parse(&format!("file://{}", store_dir.display()), &BTreeMap::new())
        .map_err(anyhow::Error::msg)?
        .build()?;
    Ok(Arc::new(Engine::new(
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
            work_dir: Some(work.to_owned()),
            start_timeout: Duration::from_secs(120),
        },
        Duration::from_secs(3600),
    )))
}

/// The delta recorder following etcd after the snapshot, and the newest
/// revision it has committed.
struct Following {
    status: Arc<Mutex<DeltaStatus>>,
    task: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
}

impl Following {
    fn start(engine: Arc<Engine>) -> Self {
        let status = Arc::new(Mutex::new(DeltaStatus::default()));
        let recorder = Recorder::new(engine, DeltaSettings::default(), status.clone());
        let cancel = CancellationToken::new();
        let task = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                recorder
                    .run(&cancel, &|| {
                        Box::pin(async {
                            Err(bulwark_backup::BackupError::Refused(
                                "no gap expected in the bench".into(),
                            ))
                        })
                    })
                    .await
            })
        };
        Self {
            status,
            task,
            cancel,
        }
    }

    fn committed(&self) -> i64 {
        self.status.lock().map(|s| s.newest_revision).unwrap_or(0)
    }
}

/// Point-in-time build: `--delta-writes` puts, recorded, replayed onto the
/// snapshot; then the built target moved to three nodes both ways
/// ([`targets`]). Returns the events replayed, the build's seconds and the
/// two ways' times.
async fn pitr(
    engine: &Arc<Engine>,
    manifest: &Manifest,
    recorder: &Following,
    client: &mut Client,
    args: &Args,
    work: &Path,
) -> anyhow::Result<(u64, f64, targets::TargetTimes)> {
    let mut last = 0;
    for i in 0..args.delta_writes {
        last = put(client, format!("delta/{i:06}"), format!("value-{i}")).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while recorder.committed() < last {
        if Instant::now() > deadline {
            bail!("the recorder never covered revision {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dir = work.join("pitr");
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let plan = engine
        .plan_restore(Some(&manifest.id), Target::Revision(last))
        .await?;
    let built = engine
        .build_target(&plan, &dir, &|_| {}, &CancellationToken::new())
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "pitr: {} events replayed, build {seconds:.2} s",
        built.events_applied
    );
    let moved = targets::distribute(engine, &work.join("pitr-nodes"), &built).await?;
    std::fs::remove_dir_all(&dir)?;
    Ok((built.events_applied, seconds, moved))
}

/// A put's revision.
async fn put(client: &mut Client, key: String, value: String) -> anyhow::Result<i64> {
    Ok(client
        .put(key, value, None)
        .await?
        .header()
        .map(|h| h.revision())
        .unwrap_or(0))
}

/// RPO under steady writes, then a crash of the recorder (aborted without
/// a flush): what the acknowledged writes lacked.
async fn rpo(recorder: Following, client: &mut Client, args: &Args) -> anyhow::Result<Rpo> {
    let commits: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let sampler = {
        let status = recorder.status.clone();
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
    let acks = steady_writes(client, args).await?;
    let crash = Instant::now();
    recorder.task.abort();
    let _ = recorder.task.await;
    sampler.abort();
    let committed_at_crash = recorder
        .status
        .lock()
        .map(|s| s.newest_revision)
        .unwrap_or(0);
    recorder.cancel.cancel();
    let commits = commits.lock().map(|c| c.clone()).unwrap_or_default();
    let rpo = rpo_figures(&acks, &commits, committed_at_crash, crash, args.write_rate);
    eprintln!("rpo: {rpo:?}");
    Ok(rpo)
}

/// `--write-rate` small puts per second for `--rpo-seconds`: each
/// acknowledged revision and when it was acknowledged.
async fn steady_writes(client: &mut Client, args: &Args) -> anyhow::Result<Vec<(i64, Instant)>> {
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.write_rate.max(1)));
    let end = Instant::now() + Duration::from_secs(args.rpo_seconds);
    let mut tick = tokio::time::interval(interval);
    let mut acks = Vec::new();
    let mut i = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let r = put(client, format!("rpo/{i:08}"), "x".repeat(200)).await?;
        acks.push((r, Instant::now()));
        i += 1;
    }
    Ok(acks)
}

/// Lag from each acknowledgement to the first commit covering it, and the
/// acknowledged writes past the last commit before the crash.
fn rpo_figures(
    acks: &[(i64, Instant)],
    commits: &[(i64, Instant)],
    committed_at_crash: i64,
    crash: Instant,
    write_rate: u32,
) -> Rpo {
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
    Rpo {
        writes: acks.len(),
        write_rate,
        lag_p50_ms: percentile(&lags, 50.0),
        lag_p99_ms: percentile(&lags, 99.0),
        lag_max_ms: lags.last().copied().unwrap_or(0.0),
        missing_after_crash: missing.len(),
        oldest_missing_age_ms: missing
            .first()
            .map(|(_, t)| crash.saturating_duration_since(*t).as_secs_f64() * 1000.0)
            .unwrap_or(0.0),
    }
}

/// Per-phase medians over the runs: the one- and three-member baselines,
/// one member, three members.
fn medians(
    runs: &[RestoreRun],
) -> (
    members::BaselineTimes,
    members::BaselineTimes,
    members::MemberTimes,
    members::MemberTimes,
) {
    let med = |f: &dyn Fn(&RestoreRun) -> f64| median(runs.iter().map(f));
    let member = |pick: fn(&RestoreRun) -> &members::MemberTimes| members::MemberTimes {
        fetch: med(&|r| pick(r).fetch),
        restore: med(&|r| pick(r).restore),
        start: med(&|r| pick(r).start),
        total: med(&|r| pick(r).total),
    };
    let baseline = |pick: fn(&RestoreRun) -> &members::BaselineTimes| members::BaselineTimes {
        etcdutl: med(&|r| pick(r).etcdutl),
        start: med(&|r| pick(r).start),
        total: med(&|r| pick(r).total),
    };
    (
        baseline(|r| &r.baseline),
        baseline(|r| &r.baseline_three),
        member(|r| &r.single),
        member(|r| &r.three),
    )
}

/// `runs` rounds of: the baselines on the plain snapshot file for one
/// member and for three, bulwark's restore of one member, and of three.
async fn restore_runs(
    engine: &Arc<Engine>,
    manifest: &Manifest,
    work: &Path,
    runs: usize,
) -> anyhow::Result<Vec<RestoreRun>> {
    // The baseline's input: the plain snapshot file, as `etcdctl snapshot
    // save` leaves it on local disk (decoded once, untimed).
    let plain = work.join("plain");
    std::fs::create_dir_all(&plain)?;
    let plan = engine
        .plan_restore(Some(&manifest.id), Target::Snapshot)
        .await?;
    let db = engine
        .build_target(&plan, &plain, &|_| {}, &CancellationToken::new())
        .await?
        .path;
    let mut out = Vec::new();
    for run in 0..runs {
        let dir = work.join(format!("run-{run}"));
        let baseline = members::baseline(&db, &dir.join("baseline"), 1).await?;
        std::fs::remove_dir_all(&dir)?;
        let baseline_three = members::baseline(&db, &dir.join("baseline-three"), 3).await?;
        std::fs::remove_dir_all(&dir)?;
        let single = members::restore(engine, &dir.join("one"), 1, manifest).await?;
        std::fs::remove_dir_all(&dir)?;
        let three = members::restore(engine, &dir.join("three"), 3, manifest).await?;
        std::fs::remove_dir_all(&dir)?;
        eprintln!(
            "run {run}: baseline {:.2} s, for three {:.2} s; one member {:.2} s; three members {:.2} s (load {})",
            baseline.total,
            baseline_three.total,
            single.total,
            three.total,
            loadavg()
        );
        out.push(RestoreRun {
            baseline,
            baseline_three,
            single,
            three,
        });
    }
    std::fs::remove_dir_all(&plain)?;
    Ok(out)
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
        "\n## Restore, DB {:.0} MiB ({:.0} MiB stored, zstd 1, file store)\n\n\
         Load average (1, 5, 15 min) before the restore runs: {}; after: {}.\n\n\
         Medians of {} runs, from the first command to a member with a leader:\n\n\
         | | prepare (store → decoder → staging file, both hashes; bulwark: `etcdutl snapshot restore` beside the running member) | restore (bulwark: stop, set aside, the prebuilt member into place; baseline: `etcdutl snapshot restore`) | start to healthy | total | ratio |\n\
         |---|---|---|---|---|---|\n\
         | baseline: `etcdutl snapshot restore` of the plain file + etcd start | — | {:.2} s | {:.2} s | {:.2} s | 1.00× |\n\
         | bulwark, one member | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2}× the baseline |\n\
         | bulwark, three members at once | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2}× one member |\n\
         | baseline for three: three `etcdutl snapshot restore` at once + the three-member cluster started | — | {:.2} s | {:.2} s | {:.2} s | {:.2}× the one-member baseline |\n\n\
         etcd is down for the last two columns (restore, start to healthy); an operator doing \
         it by hand stops etcd before `etcdutl snapshot restore`. \
         All three members share this machine's cores and disk. Bulwark's three members take \
         **{:.2}× the three-member baseline** of the same run: the time bulwark adds on top of \
         the physical work three restores cost here.\n\n\
         Point-in-time build: {} recorded events replayed onto the same snapshot in {:.2} s \
         (download and checks, scratch etcd, replay, snapshot of the result).\n\n\
         The built target ({:.0} MiB) to three nodes' staging files, every node at once, \
         hashes checked:\n\n\
         | way | upload | nodes fetch | total |\n|---|---|---|---|\n\
         | through the store (upload, every node downloads) | {:.2} s | {:.2} s | {:.2} s |\n\
         | served (`FetchTarget`: its own node copies, the others stream over mTLS) | — | {:.2} s | {:.2} s |\n\n\
         ## Delta RPO under steady writes\n\n\
         {} writes at {} per second; recorder defaults (flush every 500 ms or 4 MiB).\n\n\
         | acknowledged → committed segment | |\n|---|---|\n| p50 | {:.0} ms |\n| p99 | {:.0} ms |\n| max | {:.0} ms |\n\n\
         Recorder aborted without a flush right after the last write (a crash): \
         {} acknowledged writes were in no committed segment; the oldest of them was {:.0} ms old.\n",
        r.db_size_bytes as f64 / 1048576.0,
        r.stored_bytes as f64 / 1048576.0,
        r.load_before,
        r.load_after,
        r.runs.len(),
        r.baseline.etcdutl,
        r.baseline.start,
        r.baseline.total,
        r.single.fetch,
        r.single.restore,
        r.single.start,
        r.single.total,
        r.single_ratio_to_baseline,
        r.three.fetch,
        r.three.restore,
        r.three.start,
        r.three.total,
        r.three_ratio_to_single,
        r.baseline_three.etcdutl,
        r.baseline_three.start,
        r.baseline_three.total,
        r.baseline_three_ratio_to_baseline,
        r.three_ratio_to_baseline_three,
        r.pitr_events,
        r.pitr_build_seconds,
        r.pitr_target.bytes as f64 / 1048576.0,
        r.pitr_target.store_upload,
        r.pitr_target.store_fetch,
        r.pitr_target.store_total,
        r.pitr_target.served,
        r.pitr_target.served,
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
