//! Verification and restore drills.
//!
//! A verification reads a stored snapshot back in one streaming pass
//! ([`crate::snapshot::read`]): every hash and layer checked, each
//! failed check reported by name. A drill also writes the decoded snapshot
//! to a throwaway directory and restores and starts etcd on it
//! ([`drill`], on [`scratch`]'s throwaway members). The outcome is stored
//! as `verify/<time>.json` next to the manifest, never in it, and returned.
//!
//! | module | owns |
//! |---|---|
//! | [`check`] | `Engine::verify_snapshot`: stream check, drill, record |
//! | [`drill`] | restore, start and compare a throwaway etcd |
//! | [`scratch`] | a throwaway loopback etcd restored from a snapshot file |
//! | [`workdir`] | locked throwaway work dirs, and the start-up sweep of a killed instance's |

pub mod check;
pub mod drill;
pub mod scratch;
pub mod workdir;

use std::time::Duration;

/// Stages, as in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Download, hashes, decryption, decompression.
    StreamCheck,
    /// `etcdutl snapshot restore`.
    DrillRestore,
    /// Starting the throwaway etcd.
    DrillStart,
    /// Reading and comparing revision and key count.
    DrillCompare,
}

/// Progress of a verification.
#[derive(Clone, Debug)]
pub struct VerifyEvent {
    /// The stage.
    pub stage: Stage,
    /// Stored bytes read so far (stream check).
    pub bytes_done: u64,
    /// Stored bytes in total (stream check).
    pub bytes_total: u64,
    /// Time since the stage began.
    pub elapsed: Duration,
    /// Free text, e.g. the throwaway etcd's endpoint.
    pub detail: String,
}

/// Progress sink for verifications.
pub trait VerifyProgress: Send + Sync {
    /// One event.
    fn event(&self, event: VerifyEvent);
}

impl VerifyProgress for () {
    fn event(&self, _: VerifyEvent) {}
}

impl<F: Fn(VerifyEvent) + Send + Sync> VerifyProgress for F {
    fn event(&self, event: VerifyEvent) {
        self(event)
    }
}
