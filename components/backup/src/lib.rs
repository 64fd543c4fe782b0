//! bulwark-backup: etcd snapshots streamed to object storage — verified on
//! the fly, compressed, optionally encrypted, committed by a manifest,
//! scheduled by one elected instance, retained by policy, and checked by
//! restore drills.
//!
//! Where a snapshot byte goes: [`snapshot`] takes it from etcd and commits
//! it (with its manifest, listed by the catalog, pruned by retention),
//! through [`pipeline`] (etcd's trailer check, zstd, age, multipart upload)
//! into [`store`] (URLs, the key layout, the `file://` store). [`delta`]
//! records every etcd event after a snapshot the same way.
//!
//! Where it comes back: [`snapshot::read`] streams a stored snapshot back
//! through the same stages, checking every hash; [`verify`] runs that as a check or a
//! drill on a throwaway etcd.
//!
//! What happens on restore: [`restore`] plans, builds the target snapshot
//! once (point in time, from a snapshot and deltas), and drives every
//! node's agent through prepare, restore, start — or rolls them all back.
//!
//! Who schedules: [`schedule`] elects one instance, which takes snapshots,
//! applies retention, runs drills and records deltas on its ticks.
//!
//! Around them: [`engine`] (what every operation needs; the list of its
//! methods by concern), [`etcd`] (clients, member choice), [`config`],
//! [`api`] (the `bulwark.backup.v1.Backup` gRPC handlers), [`metrics`],
//! [`error`], and [`daemon`] (`run(config, listeners, shutdown)`).
//!
//! The modules import only downwards, so each reads without the ones
//! above it (`tests/layers.rs` keeps it so), from the bottom: `error`,
//! `store`, `etcd`, `pipeline`, `engine`, `snapshot`, `metrics`, `delta`,
//! `verify`, `schedule`, `config` (what the operator wrote; it builds the
//! engine and the etcd connector, so the layers below never see it),
//! `restore` (its agent takes the `restore:` section; the coordinator
//! pauses the scheduler), `api`, `daemon`.

pub mod api;
pub mod config;
pub mod daemon;
pub mod delta;
pub mod engine;
pub mod error;
pub mod etcd;
pub mod metrics;
pub mod pipeline;
pub mod restore;
pub mod schedule;
pub mod snapshot;
pub mod store;
pub mod verify;

pub use config::BackupConfig;
pub use daemon::{Backup, Listeners, run, tune_allocator};
pub use engine::Engine;
pub use error::{BackupError, Corruption};
