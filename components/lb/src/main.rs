//! `bulwark-lb`: parse flags; the shared daemon `main` loads the config,
//! binds and runs [`bulwark_lb::Lb`] until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use bulwark_common::config::Overrides;
use bulwark_common::daemon::DaemonArgs;
use clap::Parser;

/// The apiserver front: a Raft-elected, quorum-fenced virtual IP and an L4
/// TCP proxy to the kube-apiservers.
#[derive(Debug, Parser)]
#[command(name = "bulwark-lb", version)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// This node's Raft id; overrides `nodeId`.
    #[arg(long, env = "BULWARK_LB_NODE_ID")]
    node_id: Option<u64>,
    /// Data directory; overrides `dataDir`.
    #[arg(long, env = "BULWARK_LB_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Raft listen address; overrides `raft.address`.
    #[arg(long, env = "BULWARK_LB_RAFT_ADDRESS", value_name = "ADDR")]
    raft_address: Option<SocketAddr>,
    /// API listen address; overrides `api.address`.
    #[arg(long, env = "BULWARK_LB_API_ADDRESS", value_name = "ADDR")]
    api_address: Option<SocketAddr>,
}

impl Args {
    fn overrides(&self) -> Overrides {
        let mut o = Overrides::new();
        o.set_opt("nodeId", self.node_id)
            .set_opt(
                "dataDir",
                self.data_dir.as_ref().map(|p| p.display().to_string()),
            )
            .set_opt("raft.address", self.raft_address.map(|a| a.to_string()))
            .set_opt("api.address", self.api_address.map(|a| a.to_string()));
        o
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    bulwark_common::daemon::main::<bulwark_lb::Lb>(&args.daemon, args.overrides())
}
