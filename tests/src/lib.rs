//! Real-process test harness for bulwark.
//!
//! Every other crate's tests use this to start the real things bulwark talks
//! to — etcd, an S3 server, a stand-in for kube-apiserver, whole hosts as
//! network namespaces — instead of mocks. Each started process gets its own
//! temporary directory and ephemeral ports, is killed (with its whole process
//! group) when its handle drops, and has its log printed when the test fails.
//!
//! | module | what it gives a test |
//! |---|---|
//! | [`tools`] | where etcd, moto and kubectl live, and where our own binaries were built |
//! | [`process`] | [`Process`]: a supervised child with a temp dir, a log and readiness waits |
//! | [`ports`] | ephemeral ports, and a retry for the small race that comes with them |
//! | [`pki`] | [`Pki`]: a test CA issuing server, client and peer certificates as PEM files |
//! | [`etcd`] | [`Etcd`]: one etcd member or an N-member cluster, optionally with TLS |
//! | [`s3`] | [`S3Server`]: `moto_server` with a bucket, ready for `object_store` |
//! | [`fixture`] | a kube-apiserver test double, in-process or as a real process |
//! | [`disk`] | [`disk::SmallDisk`]: a small tmpfs (root) that fills up, for disk-full faults |
//! | [`kubelet`] | [`kubelet::Kubelet`]: a static-pod runner that starts/stops the process a manifest describes |
//! | [`netns`] | [`Lab`]: hosts in network namespaces on a private bridge, links to cut |
//! | [`config`] | typed config writers: the daemons' own config types, serialized with `apiVersion`/`kind` |
//! | [`cluster`] | our daemons as clusters: LB nodes' configs and processes, [`cluster::LbCluster`] on loopback, [`cluster::lab::LbLab`] on a netns lab, probers and backup nodes |
//! | [`access`] | the access-control matrix: every rpc of `METHOD_ACCESS` called as every kind of caller |
//!
//! # Environment
//!
//! - `BULWARK_TOOLS_DIR`: where the tools live (default `<workspace>/.tools`).
//! - `BULWARK_KEEP_TEST_DIRS=1`: keep every temporary directory (data, logs,
//!   certificates) and print where it is.
//! - `BULWARK_PRINT_LOGS=1`: print process logs on every drop, not only when
//!   the test panics.
//! - `BULWARK_REQUIRE_PRIVILEGED=1`: a network-namespace or small-disk test
//!   that would skip for lack of root fails instead (CI sets it).
//! - `BULWARK_REQUIRE_ALL_TOOLS=1`: a test of an optional tool (etcd 3.4) that
//!   would skip because the tool is missing fails instead.
//!
//! # Writing tests with it
//!
//! Logs are printed when a handle drops while the thread is panicking, so
//! prefer `unwrap`/`expect` in tests over returning `Err`: a test that returns
//! `Err` drops its processes normally and their logs stay quiet (set
//! `BULWARK_PRINT_LOGS=1` to see them anyway). Tests that start etcd clusters
//! or network labs are named `heavy_*` so the nextest `heavy` group in
//! `.config/nextest.toml` runs at most two at once.
//!
//! Errors are `anyhow` with context, because every caller is a test that
//! reports them; the outcomes a caller acts on have types: [`Skipped`],
//! [`tools::ToolError`], [`process::ExitedEarly`], [`netns::LabError`],
//! [`disk::DiskError`]. The exceptions are [`cluster::LbCluster`] and
//! [`cluster::lab::LbLab`] and their waits, which panic like the tests they
//! were lifted from, so the failing test prints their processes' logs.

pub mod access;
pub mod admin;
pub mod bulwarkctl;
pub mod cluster;
pub mod config;
pub mod disk;
pub mod etcd;
pub mod fixture;
pub mod kubelet;
pub mod netns;
pub mod pki;
pub mod ports;
pub mod process;
pub mod s3;
pub mod tools;

mod dir;
mod skip;

pub use dir::TestDir;
pub use etcd::{Etcd, EtcdVersion};
pub use netns::{Host, Lab};
pub use pki::{CertFiles, Pki};
pub use process::{Process, ProcessBuilder};
pub use s3::S3Server;
pub use skip::{Skipped, skip_or_fail};

/// Installs ring as the process-wide rustls crypto provider, once.
///
/// The workspace builds rustls and reqwest without a bundled provider (one
/// provider, ring, in the whole build), so something must install it before
/// the first TLS or reqwest client is built; reqwest panics otherwise. Every
/// harness entry point that needs TLS calls this; calling it again is free.
pub fn install_crypto_provider() {
    // An Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// True when the environment variable is set to `1` (or `true`).
pub(crate) fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}
