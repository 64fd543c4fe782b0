//! What happens on restore: one instance coordinates, every control-plane
//! node's agent does its part, and a failure after PREPARE rolls every
//! node back.
//!
//! ```text
//! PLAN     GetNodeInfo on every agent in restore.peers; choose snapshot + deltas
//! PREFLIGHT CheckRestore on every agent at once (free space for the target,
//!          restore tool and its flags, manifest, data dir); every problem on
//!          every node, and every agent that does not answer, in one refusal
//! DOWNLOAD/BUILD  point in time only: the target snapshot, once (pitr); every check fails here, before any node
//! PREPARE  every agent at once fetches the target and checks it, restores its member from it
//!          with etcdutl (etcdctl on 3.4) beside the running one, takes its lock (dry run ends here);
//!          snapshot only: the committed snapshot object itself, streamed through the decoder
//!          into the staging file, the stored and etcd's hashes checked against its manifest;
//!          point in time: the built target, served by this node's agent (FetchTarget) and
//!          copied by it, never through the store
//! RESTORE  every agent at once (the old leader's once the others stopped): manifest out,
//!          wait stopped, data dir aside, the prebuilt member renamed into its place
//! START    every agent at once: manifest back, wait healthy
//! VERIFY   the restored members answer and hold at least the target revision
//! ROLLBACK (on any failure after PREPARE) AbortRestore on every prepared agent
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`coordinator`] | `Backup.Restore`: the phases above, each a function |
//! | [`rollback`] | undoing a failed restore on every prepared node, and what the failure reports |
//! | `preflight` | the checks on every node before anything is fetched, and the one refusal |
//! | [`pitr`] | point-in-time restore: the plan and the one target snapshot every member restores |
//! | `resume` | finishing a restore that stopped half-way: resumed where every member is restored, else rolled back; a restarted coordinator's own pass |
//! | [`record`] | `restores/<id>.json`, the restore point later coverage starts from |
//! | [`timeline`] | the histories restores start, derived from the records; where a revision or time lies in one |
//! | `timing` | how long each phase and each node's step took: log, gauges, summary |
//! | [`agent`] | this node's part: manifest out, data dir aside, restore tool, manifest back |
//! | [`api`] | the `RestoreAgent` gRPC handlers over the local agent |

pub mod agent;
pub mod api;
pub mod coordinator;
pub mod pitr;
mod preflight;
pub mod record;
mod resume;
pub mod rollback;
pub mod timeline;
mod timing;

pub use api::AgentApi;
pub use coordinator::{Coordinator, DEFAULT_BUMP};
