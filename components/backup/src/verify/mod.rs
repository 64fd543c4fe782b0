//! Verification and restore drills.
//!
//! A verification reads a stored snapshot back in one streaming pass
//! ([`crate::pipeline::download`]): every hash and layer checked, each
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

pub mod check;
pub mod drill;
pub mod scratch;

pub use check::{Stage, VerifyEvent, VerifyProgress};
