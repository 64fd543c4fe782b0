//! Continuous deltas: every etcd event after a full snapshot, in segments,
//! so a restore can roll the snapshot forward to any later revision or time.
//!
//! The backup leader watches the whole keyspace (with previous values) from
//! the base snapshot's revision + 1 and buffers the events. A segment is
//! written when the oldest buffered event is `flushInterval` old or the
//! buffer reaches `maxSegmentBytes`; with the defaults (500 ms, 4 MiB) what
//! etcd acknowledged is in the store within about a second.
//!
//! A segment goes through the same byte chain as snapshots ([`Encoder`](crate::pipeline::codec::Encoder):
//! zstd, then age) and is committed the same way: the data object first,
//! then a small JSON record that is the commit point; listings read only
//! the records, so a half-written segment is never seen.
//!
//! ```text
//! <root>/delta/<base snapshot id>/<first rev:020>-<last rev:020>.seg.zst[.age]
//! <root>/delta/<base snapshot id>/<first rev:020>-<last rev:020>.json   (commit point)
//! ```
//!
//! Revisions are checked as they arrive: etcd gives every revision at least
//! one event, so the revisions the watch delivers must follow each other
//! without a hole. A hole, or the watch being cancelled because its start
//! was compacted, is a gap: the recorder asks for a new full snapshot and
//! starts again from it. Segments live under their base snapshot's id, so
//! retention deletes them with it.
//!
//! | module | owns |
//! |---|---|
//! | [`format`](mod@format) | the raw segment format: events to bytes and back |
//! | [`segments`] | segment objects and their commit records in the store (the `Engine` methods) |
//! | [`recorder`] | the watch that buffers events and flushes segments |
//! | [`pause`] | the recorder's pause while a restore holds this node |
//! | [`status`] | what the recorder is doing, for status and metrics |

pub mod format;
pub mod pause;
pub mod recorder;
pub mod segments;
pub mod status;

pub use format::{DeltaEvent, EventKind, decode_events, encode_events};
pub use pause::RecorderPause;
pub use recorder::{DeltaSettings, FollowEnd, Recorder, SnapshotFn};
pub use segments::{SEGMENT_FORMAT_VERSION, SegmentMeta, check_continuity};
pub use status::{DeltaStatus, RecorderState};
