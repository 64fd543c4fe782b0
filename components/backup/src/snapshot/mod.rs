//! Snapshots as the store holds them: taking one and committing it, the
//! manifest that is its commit point, the catalog of what is stored, and
//! the retention policy.
//!
//! | module | owns |
//! |---|---|
//! | [`take`] | etcd stream → trailer check → zstd → age → multipart upload → manifest (`Engine::take_snapshot`) |
//! | [`read`] | the read path: store → SHA-256 → age → zstd → etcd's trailer, every hash checked against the manifest (`Engine::stream_check`) |
//! | [`manifest`] | `manifest.json` (the commit point) and `verify/*.json` records |
//! | [`clusters`] | `clusters/<id>.json`: each etcd cluster backups have seen, written once at its first commit (timelines are numbered from them) |
//! | [`catalog`] | listing, get, delete and retention against the store (`Engine` methods) |
//! | [`gc`] | garbage collection: objects no committed record names (`Engine::collect_garbage`) |
//! | [`retention`] | the pure keep/delete policy |

pub mod catalog;
pub mod clusters;
pub mod gc;
pub mod manifest;
pub mod read;
pub mod retention;
pub mod take;

pub use take::{Progress, SnapshotEvent, SnapshotOptions};
