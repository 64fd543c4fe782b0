//! The daemon: [`run`] starts the admin and gRPC servers, the election,
//! the scheduler (with the delta recorder) and the store probe as tasks of
//! a [`Shutdown`], on listeners bound by the caller (so tests can run
//! several instances on port 0 in one process). [`Backup`] is the daemon
//! the shared `main` (`bulwark_common::daemon::main`) runs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_common::admin::Health;
use bulwark_common::daemon::Daemon;
use bulwark_common::grpc::GrpcServer;
use bulwark_common::listen;
use bulwark_common::shutdown::Shutdown;
use bulwark_common::telemetry::LoggingConfig;
use bulwark_common::tls::TlsMaterial;
use bulwark_common::tls::reload::spawn_follow;
use bulwark_common::workers::Worker;
use object_store::ObjectStore as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::BackupConfig;
use crate::engine::Engine;
use crate::error::BackupError;
use crate::restore::agent;
use crate::schedule::{election, service};
use crate::verify::workdir;
use crate::{api, delta, restore};

/// The sockets [`run`] serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC (mTLS) listener.
    pub grpc: TcpListener,
    /// The admin HTTP listener.
    pub admin: TcpListener,
}

/// Pins glibc's mmap threshold at its default (128 KiB). Call it first
/// thing in a process that runs snapshots.
///
/// glibc raises the threshold dynamically after a large mmapped block is
/// freed; from then on the pipeline's MiB-sized buffers (1 MiB chunks,
/// multipart parts, age and zstd buffers, each freed on another thread than
/// the one that allocated it) come from per-thread arenas, which fragment
/// and keep their pages: peak RSS then creeps up with the database size
/// (measured: 60 MiB for a 1.2 GB database with age, 28 MiB for 400 MB with
/// the threshold pinned). Pinned, large buffers are always mmapped and
/// their pages return to the OS on free, so RSS follows the live data,
/// which the bounded stages keep constant.
pub fn tune_allocator() {
    // An operator's explicit MALLOC_MMAP_THRESHOLD_ wins (glibc applied it).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes allocator parameters; it is called
        // before the runtime starts other threads.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
        if ok != 1 {
            eprintln!(
                "warning: mallopt(M_MMAP_THRESHOLD) failed; memory may grow with the database size"
            );
        }
    }
}

/// How often the admin readiness check lists the store.
const STORE_PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// Starts the service: admin server, gRPC server, the election and the
/// scheduler, as tasks of `shutdown`. Returns once they run; the caller
/// waits on `shutdown`.
pub async fn run(
    config: BackupConfig,
    listeners: Listeners,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    bulwark_common::tls::install_crypto_provider();
    let engine = Arc::new(Engine::from_config(&config).context("setting up the backup engine")?);
    let tls = config
        .grpc
        .tls
        .load()
        .context("loading the gRPC server's TLS files")?;
    // The serving certificate and etcd's client certificate (which
    // `kubeadm certs renew` renews) follow their files.
    for material in std::iter::once(&tls).chain(engine.etcd.tls()) {
        spawn_follow(material.clone(), "backup", shutdown);
    }
    let settings = service_settings(&config)?;
    let scheduled_work = settings.schedule.is_some()
        || settings.drill_interval.is_some()
        || settings.deltas.is_some();
    let (leader_tx, leader_rx) = watch::channel(election::LeaderState::default());
    // Only what runs here is listed in /debug/workers.
    let recorder = crate::delta::recorder::WORKER;
    let recorder = match settings.deltas {
        Some(_) => shutdown.worker(recorder),
        None => Worker::detached(recorder),
    };
    let mut service = service::Service::new(engine.clone(), settings, leader_rx);
    if scheduled_work {
        service = service.with_workers(shutdown.worker(service::SCHEDULER), recorder);
    }
    let service = Arc::new(service);
    let health = Health::new();
    health.set_ready("store", Err("not checked yet".into()));
    tracing::info!(
        node = %config.node_name,
        store = %engine.store.display(),
        grpc = %listeners.grpc.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "bulwark-backup starting"
    );
    let Listeners { grpc, admin } = listeners;
    // What the restore agents and the other instances dial.
    let advertised = match &config.restore.agent_address {
        Some(a) => a.clone(),
        None => grpc
            .local_addr()
            .context("reading the gRPC listen address")?
            .to_string(),
    };
    let admin_token = shutdown.token();
    let admin_health = health.clone();
    let workers = shutdown.workers().clone();
    shutdown.spawn_critical("admin server", async move {
        bulwark_common::admin::serve(
            admin,
            admin_health,
            Some(bulwark_common::telemetry::metrics_handle()),
            workers,
            admin_token,
        )
        .await
        .context("admin server")
    });
    spawn_grpc(
        &config,
        (grpc, tls, advertised.clone()),
        &engine,
        &service,
        shutdown,
    )?;
    if scheduled_work {
        let token = shutdown.token();
        let connector = engine.etcd.clone();
        let name = config.schedule.election_name.clone();
        let node = election::LeaderInfo::new(&config.node_name, &advertised);
        let ttl = config.schedule.lease_ttl;
        let worker = shutdown.worker(election::WORKER);
        shutdown.spawn_critical(election::WORKER, async move {
            election::run(connector, name, node, ttl, leader_tx, token, worker).await;
            Ok(())
        });
        let token = shutdown.token();
        shutdown.spawn_critical(service::SCHEDULER, async move {
            service.run_scheduler(token).await;
            Ok(())
        });
    }
    spawn_store_probe(engine, health, shutdown);
    Ok(())
}

/// `bulwark-backup` as the shared daemon `main` runs it.
#[derive(Debug)]
pub enum Backup {}

impl Daemon for Backup {
    const NAME: &'static str = "bulwark-backup";
    type Config = BackupConfig;
    type Listeners = Listeners;

    fn logging(config: &BackupConfig) -> &LoggingConfig {
        &config.logging
    }

    fn grace(config: &BackupConfig) -> Duration {
        config.shutdown_grace_period
    }

    fn register_metrics(config: &BackupConfig) {
        let certificates: Vec<_> = config.certificates().into_iter().map(|(_, f)| f).collect();
        crate::metrics::register(&certificates);
    }

    async fn bind(config: &BackupConfig) -> anyhow::Result<Listeners> {
        let grpc = listen::bind(config.grpc.address, "gRPC (grpc.address)").await?;
        let admin = listen::bind(config.admin.address, "admin (admin.address)").await?;
        Ok(Listeners { grpc, admin })
    }

    async fn run(
        config: BackupConfig,
        listeners: Listeners,
        shutdown: &Shutdown,
    ) -> anyhow::Result<()> {
        run(config, listeners, shutdown).await
    }
}

/// The scheduler's settings from the config.
fn service_settings(config: &BackupConfig) -> anyhow::Result<service::ServiceSettings> {
    let schedule = config
        .schedule
        .schedule()
        .map_err(|e| anyhow::anyhow!("schedule: {e}"))?;
    Ok(service::ServiceSettings {
        schedule,
        retries: config.schedule.retries,
        retry_backoff: config.schedule.retry_backoff,
        retention: config.retention.policy.clone(),
        retention_interval: config.retention.interval,
        drill_interval: config.drill.interval,
        election_name: config.schedule.election_name.clone(),
        deltas: config.deltas.enabled.then(|| delta::DeltaSettings {
            flush_interval: config.deltas.flush_interval,
            max_segment_bytes: usize::try_from(config.deltas.max_segment_bytes.0)
                .unwrap_or(4 << 20),
            rpo_target: config.deltas.rpo_target,
        }),
    })
}

/// The gRPC server: `Backup` (with the restore coordinator) and this
/// node's `RestoreAgent`.
fn spawn_grpc(
    config: &BackupConfig,
    (listener, tls, agent_address): (TcpListener, TlsMaterial, String),
    engine: &Arc<Engine>,
    service: &Arc<service::Service>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let client_tls = config
        .restore
        .client_tls
        .as_ref()
        .unwrap_or(&config.grpc.tls)
        .load()
        .context("loading restore.clientTls")?;
    spawn_follow(client_tls.clone(), "backup", shutdown);
    let agent = Arc::new(
        agent::Agent::new(engine.clone(), config.restore.clone(), agent_address)
            .with_recorder_pause(service.recorder_pause().clone())
            .with_client_tls(client_tls.clone()),
    );
    let coordinator = restore::Coordinator::new(
        service.clone(),
        config.restore.peers.clone(),
        client_tls,
        agent.clone(),
        shutdown,
    );
    let api = api::BackupApi::new(service.clone(), shutdown).with_restore(coordinator.clone());
    let agent_api = restore::AgentApi::new(agent.clone(), shutdown);
    let access = config.grpc.access.clone();
    let token = shutdown.token();
    let recovery_token = shutdown.token();
    let drill = engine.drill.clone();
    shutdown.spawn_critical("gRPC server", async move {
        // A killed instance's drill or point-in-time build left its work
        // dir (gigabytes on a big cluster); blocking reads, off the runtime.
        if let Err(e) = tokio::task::spawn_blocking(move || workdir::sweep(&drill)).await {
            tracing::warn!(error = %e, "could not look for work dirs left behind");
        }
        // Restarted mid-restore: this node's journal is dealt with before
        // any call reaches the agent, and the restores this instance was
        // coordinating are finished once its own agent answers.
        if let Err(e) = agent.recover().await {
            tracing::error!(error = %e, "could not recover this node's restore journal: see `bulwarkctl restore status`");
        }
        let serve = GrpcServer::new()
            .add_service(api.into_server())
            .add_service(agent_api.into_server())
            .serve(listener, &tls, access, token);
        let (served, ()) = tokio::join!(serve, coordinator.recover(&recovery_token));
        served.context("gRPC server")
    });
    Ok(())
}

/// Readiness: the store answers a listing of the cluster's directory.
/// Critical: a /readyz nobody updates any more would lie.
fn spawn_store_probe(engine: Arc<Engine>, health: Health, shutdown: &Shutdown) {
    let token = shutdown.token();
    shutdown.spawn_critical("store probe", async move {
        loop {
            let root = engine.layout.root().clone();
            let state = match engine.store.inner().list_with_delimiter(Some(&root)).await {
                Ok(_) => Ok(()),
                Err(e) => Err(BackupError::store(engine.store.display(), e).to_string()),
            };
            health.set_ready("store", state);
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                _ = tokio::time::sleep(STORE_PROBE_INTERVAL) => {}
            }
        }
    });
}
