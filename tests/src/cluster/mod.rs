//! Clusters of our own daemons, started the one way the tests, the demo and
//! the bench all use.
//!
//! - [`LbSpec`] writes the config of each node of a bulwark-lb cluster (its
//!   certificate, data dir, members, access), [`lb_process`] starts one;
//! - [`prober_config`] and [`prober_process`] do the same for a
//!   bulwark-prober reporting to an LB cluster;
//! - [`backup_config`] is a bulwark-backup node's base config;
//! - [`loopback`]: [`LbCluster`], real `bulwark-lb` processes on loopback
//!   with a bind-mode VIP (the lb cluster tests);
//! - [`lab`]: [`lab::LbLab`], an arp-mode cluster on a network-namespace
//!   lab with the witnesses of "never two holders" (the netns tests and
//!   the failover benchmark, which so measure exactly what the tests check);
//! - [`bgp`]: the bgp-mode lab: a BIRD router peering with the LB hosts and
//!   a client behind it ([`bgp::BgpLab`] for the netns tests, its pieces for
//!   the bench suite's bgp runs).
//!
//! Each set-up differs in where nodes listen and how the VIP is announced;
//! those are fields the caller sets on the typed config
//! ([`crate::config`]), not copies of the whole start-up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use bulwark_backup::config::BackupConfig;
use bulwark_lb::config::{LbConfig, MemberConfig};
use bulwark_prober::config::{ApiserverTarget, ProberConfig};

use crate::{CertFiles, Pki, ProcessBuilder, config, tools};

pub mod bgp;
pub mod lab;
pub mod loopback;

pub use loopback::{LbCluster, LbNode, Options, echo_backend, echo_through, new_vip, serve_echo};

/// The log filter every LB node runs with: openraft's info lines are
/// per-heartbeat noise in a test log. [`LB_LOG_LEVEL_ENV`] replaces it.
pub const LB_LOG_LEVEL: &str = "info,openraft=warn";

/// Names a log filter for every LB node a test or bench starts, instead
/// of [`LB_LOG_LEVEL`] (e.g. `info,openraft=info` to read an election
/// step by step).
pub const LB_LOG_LEVEL_ENV: &str = "BULWARK_LB_LOG_LEVEL";

/// An LB cluster's shared facts: its members, the CA that issues each
/// node's certificate, and the directory the configs and data dirs go in.
pub struct LbSpec<'a> {
    /// Issues each node's peer certificate.
    pub pki: &'a Pki,
    /// Where `lb-<id>.yaml` and `data-<id>` go.
    pub dir: &'a Path,
    /// `initialMembers`, the same on every node.
    pub members: Vec<MemberConfig>,
}

impl LbSpec<'_> {
    /// Node `id`'s config ([`config::lb_node`]): a peer certificate in
    /// `bulwark:lb` named like the member, for `sans`, and its data in
    /// `<dir>/data-<id>`. The caller sets the VIP, backends and the rest.
    pub fn node(&self, id: u64, sans: &[&str]) -> anyhow::Result<(LbConfig, CertFiles)> {
        let name = self
            .members
            .iter()
            .find(|m| m.id == id)
            .and_then(|m| m.name.clone())
            .unwrap_or_else(|| format!("lb-{id}"));
        let cert = self.pki.peer(&name, &["bulwark:lb"], sans)?;
        let data = self.dir.join(format!("data-{id}"));
        Ok((config::lb_node(&self.members, id, &cert, &data)?, cert))
    }

    /// Writes node `config` to `<dir>/lb-<id>.yaml`.
    pub fn write(&self, config: &LbConfig) -> anyhow::Result<PathBuf> {
        config::write(self.dir.join(format!("lb-{}.yaml", config.node_id)), config)
    }
}

/// The timers every test cluster runs with: a 200 ms backend connect
/// timeout (a dead fixture backend fails fast), and a 1 s proxy drain
/// inside a 5 s shutdown, so a SIGTERMed node is gone in seconds.
pub fn test_timers(c: &mut LbConfig) {
    c.proxy.connect_timeout = Duration::from_millis(200);
    c.proxy.shutdown_grace = Duration::from_secs(1);
    c.shutdown_grace = Duration::from_secs(5);
}

/// A `bulwark-lb` process named `name` reading `config` (not yet spawned:
/// the caller picks where).
pub fn lb_process(name: &str, config: &Path) -> anyhow::Result<ProcessBuilder> {
    Ok(lb_process_of(&tools::bin_path("bulwark-lb")?, name, config))
}

/// [`lb_process`] running the `bulwark-lb` at `binary` (another build, e.g.
/// the previous release in the rolling-upgrade bench).
pub fn lb_process_of(binary: &Path, name: &str, config: &Path) -> ProcessBuilder {
    ProcessBuilder::new(name, binary)
        .arg("--config")
        .arg(config)
        .env(
            "BULWARK_LOG_LEVEL",
            std::env::var(LB_LOG_LEVEL_ENV).unwrap_or_else(|_| LB_LOG_LEVEL.to_owned()),
        )
}

/// A prober named `name` in `zone` probing `targets` (the apiservers,
/// trusted through `pki`'s CA) and reporting to the LB APIs `endpoints`
/// with a client certificate in `bulwark:probers`. The caller sets the
/// admin address and the rest.
pub fn prober_config(
    pki: &Pki,
    name: &str,
    zone: &str,
    targets: Vec<ApiserverTarget>,
    endpoints: Vec<String>,
) -> anyhow::Result<ProberConfig> {
    let cert = pki.client(name, &["bulwark:probers"])?;
    let mut c = config::prober();
    c.node_name = name.to_owned();
    c.zone = zone.to_owned();
    c.apiservers.tls.ca_file = pki.ca_path().to_owned();
    c.apiservers.targets = targets;
    c.report.endpoints = endpoints;
    c.report.tls = config::tls(&cert);
    Ok(c)
}

/// A `bulwark-prober` process named `name` reading `config`.
pub fn prober_process(name: &str, config: &Path) -> anyhow::Result<ProcessBuilder> {
    Ok(
        ProcessBuilder::new(name, tools::bin_path("bulwark-prober")?)
            .arg("--config")
            .arg(config),
    )
}

/// A backup node named `node_name` of cluster `cluster_name`: its gRPC
/// server with `cert` (operators `system:masters`, peers `bulwark:backup`),
/// etcd at `etcd_endpoints` without TLS, snapshots to `store_url`. The
/// caller sets the addresses, schedule, drill and restore sections.
pub fn backup_config(
    node_name: &str,
    cluster_name: &str,
    cert: &CertFiles,
    etcd_endpoints: Vec<String>,
    store_url: &str,
) -> BackupConfig {
    let mut c = config::backup();
    c.node_name = node_name.to_owned();
    c.cluster_name = cluster_name.to_owned();
    c.grpc.tls = config::tls(cert);
    c.grpc.access.operators = config::orgs(&["system:masters"]);
    c.grpc.access.peers = Some(config::orgs(&["bulwark:backup"]));
    c.etcd.endpoints = etcd_endpoints;
    c.etcd.tls = None;
    c.store.url = store_url.to_owned();
    c
}

/// A `bulwark-backup` process named `name` reading `config`.
pub fn backup_process(name: &str, config: &Path) -> anyhow::Result<ProcessBuilder> {
    Ok(
        ProcessBuilder::new(name, tools::bin_path("bulwark-backup")?)
            .arg("--config")
            .arg(config),
    )
}

/// Writes `config` into `dir` as `<name>.yaml`.
pub fn write_named<T>(dir: &Path, name: &str, config: &T) -> anyhow::Result<PathBuf>
where
    T: bulwark_common::config::ComponentConfig + serde::Serialize,
{
    config::write(dir.join(format!("{name}.yaml")), config)
        .with_context(|| format!("the config of {name}"))
}
