//! [`Engine`]: everything one backup operation needs (etcd, the store, the
//! layout, the keys and the tuning knobs), built once from the config
//! (`Engine::from_config`, in [`crate::config`]) and shared by the
//! scheduler, the gRPC handlers, the tests and the bench. It holds plain
//! values only, so every layer above can add its methods without an import
//! cycle; policies (retention) travel with the call.
//!
//! The operations are `Engine` methods, one `impl Engine` per concern, in
//! the module of that concern:
//!
//! | module | methods |
//! |---|---|
//! | [`crate::snapshot::take`] | `take_snapshot` |
//! | [`crate::snapshot::catalog`] | `scan`, `list_snapshots`, `get_snapshot`, `latest_snapshot`, `record_verification`, `delete_snapshot`, `apply_retention` |
//! | [`crate::snapshot::clusters`] | `cluster_records`, `seen_clusters`, `record_cluster`, `note_cluster` |
//! | [`crate::snapshot::gc`] | `collect_garbage` |
//! | [`crate::snapshot::read`] | `stream_check` (the read path) |
//! | [`crate::verify::check`] | `verify_snapshot` (with a drill when asked) |
//! | [`crate::delta::segments`] | `commit_segment`, `list_segments`, `read_segment`, `delete_segments` |
//! | [`crate::restore::pitr`] | `plan_restore`, `build_target` |

use std::path::PathBuf;
use std::time::Duration;

use crate::etcd::{EtcdConnector, MemberChoice};
use crate::pipeline::encryption::Keyring;
use crate::store::Store;
use crate::store::layout::Layout;

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
    /// Age after which objects without a manifest are garbage.
    pub gc_grace_period: Duration,
}

impl Engine {
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
            gc_grace_period,
        }
    }
}
