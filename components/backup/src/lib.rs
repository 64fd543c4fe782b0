//! bulwark-backup: etcd snapshots streamed to object storage — verified on
//! the fly, compressed, optionally encrypted, committed by a manifest,
//! scheduled by one elected instance, retained by policy, and checked by
//! restore drills.
//!
//! | module | owns |
//! |---|---|
//! | [`snapshot`] | the pipeline: etcd stream → trailer check → zstd → age → multipart upload → manifest |
//! | [`delta`] | continuous deltas: the watch recorder, segments, their commit records |
//! | [`codec`] | the zstd/age write and read chains and the channel adapters between stages |
//! | [`hashing`] | SHA-256 and etcd's trailing-hash verifier |
//! | [`upload`] | multipart upload with bounded parallelism and a guaranteed abort |
//! | [`manifest`] | `manifest.json` (the commit point) and `verify/*.json` records |
//! | [`layout`] | object keys and snapshot ids |
//! | [`store`] | store URLs (`file://`, `s3://`, `gs://`, `az://`) |
//! | [`filestore`] | the `file://` store: streaming write-back and durable multipart uploads |
//! | [`encryption`] | age recipients, identities and key ids |
//! | [`etcd`] | etcd clients, member choice, error classification |
//! | [`engine`] | the shared dependencies of every operation |
//! | [`config`] | `BackupConfiguration` |
//! | [`schedule`] | interval and cron ticks |
//! | [`retention`] | the pure keep/delete policy |
//! | [`catalog`] | listing, get, delete, retention and garbage collection against the store |
//! | [`pitr`] | point-in-time restore: the plan and the one target snapshot every member restores |
//! | [`scratch`] | a throwaway loopback etcd restored from a snapshot file |
//! | [`verify`] | verification and restore drills |
//! | [`election`] | the etcd election of the instance that does scheduled work |
//! | [`service`] | the scheduler and the state behind `GetStatus` |
//! | [`agent`] | this node's part of a restore: manifest out, data dir aside, etcdutl restore, manifest back |
//! | [`restore`] | the restore coordinator and the `RestoreAgent` gRPC handlers |
//! | [`api`] | the `bulwark.backup.v1.Backup` gRPC handlers |
//! | [`metrics`] | `bulwark_backup_*` metrics |
//! | [`faults`] | an object store that fails on demand, for tests |
//!
//! [`run`] starts everything on listeners bound by the caller, so tests can
//! run several instances on port 0 in one process.
pub mod agent;
pub mod api;
pub mod catalog;
pub mod codec;
pub mod config;
pub mod delta;
pub mod election;
pub mod encryption;
pub mod engine;
pub mod error;
pub mod etcd;
pub mod faults;
pub mod filestore;
pub mod hashing;
pub mod layout;
pub mod manifest;
pub mod metrics;
pub mod pitr;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod scratch;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod upload;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_common::admin::Health;
use bulwark_common::grpc::GrpcServer;
use bulwark_common::shutdown::Shutdown;
use object_store::ObjectStore as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::BackupConfig;
pub use engine::Engine;
pub use error::{BackupError, Corruption};

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
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    bulwark_common::tls::install_crypto_provider();
    let engine = Arc::new(Engine::from_config(&config).context("setting up the backup engine")?);
    let tls = config
        .grpc
        .tls
        .load()
        .context("loading the gRPC server's TLS files")?;
    let schedule = config
        .schedule
        .schedule()
        .map_err(|e| anyhow::anyhow!("schedule: {e}"))?;
    let scheduled_work =
        schedule.is_some() || config.drill.interval.is_some() || config.deltas.enabled;
    let settings = service::ServiceSettings {
        schedule,
        retries: config.schedule.retries,
        retry_backoff: config.schedule.retry_backoff,
        retention_interval: config.retention.interval,
        drill_interval: config.drill.interval,
        election_name: config.schedule.election_name.clone(),
        deltas: config.deltas.enabled.then(|| delta::DeltaSettings {
            flush_interval: config.deltas.flush_interval,
            max_segment_bytes: usize::try_from(config.deltas.max_segment_bytes.0)
                .unwrap_or(4 << 20),
            rpo_target: config.deltas.rpo_target,
        }),
    };
    let (leader_tx, leader_rx) = watch::channel(election::LeaderState::default());
    let service = Arc::new(service::Service::new(engine.clone(), settings, leader_rx));
    let health = Health::new();
    health.set_ready("store", Err("not checked yet".into()));
    tracing::info!(
        node = %config.node_name,
        store = %engine.store.display(),
        grpc = %listeners.grpc.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "bulwark-backup starting"
    );

    let admin_token = shutdown.token();
    let admin_health = health.clone();
    shutdown.spawn_critical("admin server", async move {
        bulwark_common::admin::serve(
            listeners.admin,
            admin_health,
            Some(bulwark_common::telemetry::metrics_handle()),
            admin_token,
        )
        .await
        .context("admin server")
    });

    let grpc_token = shutdown.token();
    let agent_address = match &config.restore.agent_address {
        Some(a) => a.clone(),
        None => listeners
            .grpc
            .local_addr()
            .context("reading the gRPC listen address")?
            .to_string(),
    };
    let agent = Arc::new(agent::Agent::new(
        engine.clone(),
        config.restore.clone(),
        agent_address,
    ));
    let client_tls = config
        .restore
        .client_tls
        .as_ref()
        .unwrap_or(&config.grpc.tls)
        .load()
        .context("loading restore.clientTls")?;
    let coordinator =
        restore::Coordinator::new(service.clone(), config.restore.peers.clone(), client_tls);
    let api = api::BackupApi::new(service.clone(), shutdown.token()).with_restore(coordinator);
    let agent_api = restore::AgentApi::new(agent, shutdown.token());
    let access = config.grpc.access.clone();
    shutdown.spawn_critical("gRPC server", async move {
        GrpcServer::new()
            .add_service(api.into_server())
            .add_service(agent_api.into_server())
            .serve(listeners.grpc, &tls, access, grpc_token)
            .await
            .context("gRPC server")
    });

    if scheduled_work {
        let token = shutdown.token();
        let connector = engine.etcd.clone();
        let name = config.schedule.election_name.clone();
        let node = config.node_name.clone();
        let ttl = config.schedule.lease_ttl;
        shutdown.spawn_critical("leader election", async move {
            election::run(connector, name, node, ttl, leader_tx, token).await;
            Ok(())
        });
        let token = shutdown.token();
        let svc = service.clone();
        shutdown.spawn_critical("scheduler", async move {
            svc.run_scheduler(token).await;
            Ok(())
        });
    }

    let token = shutdown.token();
    shutdown.spawn("store probe", async move {
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
    Ok(())
}
