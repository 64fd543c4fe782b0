//! [`Engine`]: everything one backup operation needs (etcd, the store, the
//! layout, the keys and the tuning knobs), built once from the config and
//! shared by the scheduler, the gRPC handlers, the tests and the bench.
//!
//! The operations are `Engine` methods, one `impl Engine` per concern, in
//! the module of that concern:
//!
//! | module | methods |
//! |---|---|
//! | [`crate::snapshot::take`] | `take_snapshot` |
//! | [`crate::snapshot::catalog`] | `scan`, `list_snapshots`, `get_snapshot`, `latest_snapshot`, `record_verification`, `delete_snapshot`, `apply_retention` |
//! | [`crate::snapshot::gc`] | `collect_garbage` |
//! | [`crate::pipeline::download`] | `stream_check` (the read path) |
//! | [`crate::verify::check`] | `verify_snapshot` (with a drill when asked) |
//! | [`crate::delta::segments`] | `commit_segment`, `list_segments`, `read_segment`, `delete_segments` |
//! | [`crate::restore::pitr`] | `plan_restore`, `build_target` |

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{BackupConfig, MemberChoice};
use crate::error::Result;
use crate::etcd::EtcdConnector;
use crate::pipeline::encryption::Keyring;
use crate::snapshot::retention::RetentionPolicy;
use crate::store::layout::Layout;
use crate::store::{Store, StoreSpec};

/// Tuning of the snapshot pipeline.
#[derive(Clone, Debug)]
pub struct PipelineSettings {
    /// zstd level.
    pub level: i32,
    /// zstd worker threads (0: none).
    pub workers: u32,
    /// Multipart part size in bytes.
    pub part_size: usize,
    /// Parts in flight.
    pub upload_concurrency: usize,
    /// Longest pause between snapshot chunks.
    pub stall_timeout: Duration,
    /// Which member serves snapshots.
    pub member_choice: MemberChoice,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            level: 1,
            workers: 0,
            part_size: 8 << 20,
            upload_concurrency: 2,
            stall_timeout: Duration::from_secs(60),
            member_choice: MemberChoice::Leader,
        }
    }
}

/// Where drills find etcd's tools and room to work.
#[derive(Clone, Debug)]
pub struct DrillSettings {
    /// `etcdutl`.
    pub etcdutl: PathBuf,
    /// `etcd`.
    pub etcd: PathBuf,
    /// Parent of the throwaway directories; `None`: the system temp dir.
    pub work_dir: Option<PathBuf>,
    /// Limit for the throwaway etcd to become healthy.
    pub start_timeout: Duration,
}

/// The shared dependencies of backup operations.
#[derive(Clone, Debug)]
pub struct Engine {
    /// This instance's name (manifests, records, status).
    pub node_name: String,
    /// The cluster's directory in the store.
    pub cluster_name: String,
    /// etcd.
    pub etcd: EtcdConnector,
    /// The object store.
    pub store: Store,
    /// Paths inside it.
    pub layout: Layout,
    /// Encryption keys.
    pub keys: Keyring,
    /// Pipeline tuning.
    pub pipeline: PipelineSettings,
    /// Drill tools.
    pub drill: DrillSettings,
    /// Retention rules.
    pub retention: RetentionPolicy,
    /// Age after which objects without a manifest are garbage.
    pub gc_grace_period: Duration,
}

impl Engine {
    /// Builds the engine from a validated config: reads key and TLS files
    /// and builds the store client (nothing is contacted yet).
    pub fn from_config(config: &BackupConfig) -> Result<Self> {
        let spec = StoreSpec::parse(&config.store.url, &config.store.options)
            .map_err(crate::error::BackupError::InvalidArgument)?;
        let store = spec.build()?;
        let keys = Keyring::load(
            config.encryption.recipient_file.as_deref(),
            &config.encryption.identity_files,
        )?;
        Ok(Self::new(
            config.node_name.clone(),
            config.cluster_name.clone(),
            EtcdConnector::new(&config.etcd)?,
            store,
            keys,
            PipelineSettings {
                level: config.compression.level,
                workers: config.compression.workers,
                part_size: usize::try_from(config.store.part_size.0).unwrap_or(8 << 20),
                upload_concurrency: config.store.upload_concurrency,
                stall_timeout: config.etcd.stall_timeout,
                member_choice: config.etcd.snapshot_from,
            },
            DrillSettings {
                etcdutl: config.drill.etcdutl.clone(),
                etcd: config.drill.etcd.clone(),
                work_dir: config.drill.work_dir.clone(),
                start_timeout: config.drill.start_timeout,
            },
            config.retention.policy.clone(),
            config.retention.gc_grace_period,
        ))
    }

    /// Assembles an engine from parts (tests and the bench).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_name: String,
        cluster_name: String,
        etcd: EtcdConnector,
        store: Store,
        keys: Keyring,
        pipeline: PipelineSettings,
        drill: DrillSettings,
        retention: RetentionPolicy,
        gc_grace_period: Duration,
    ) -> Self {
        let layout = Layout::new(store.prefix(), &cluster_name);
        Self {
            node_name,
            cluster_name,
            etcd,
            store,
            layout,
            keys,
            pipeline,
            drill,
            retention,
            gc_grace_period,
        }
    }
}
