//! `bulwark-prober`: parse flags; the shared daemon `main` loads the
//! config, binds the admin port and runs [`bulwark_prober::Prober`] until
//! SIGTERM.

use std::process::ExitCode;

use bulwark_common::config::Overrides;
use bulwark_common::daemon::DaemonArgs;
use clap::Parser;

/// Probes apiservers and etcd members and streams the observations to the
/// bulwark-lb leader.
#[derive(Debug, Parser)]
#[command(name = "bulwark-prober", version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// This prober's node name; overrides `nodeName`.
    #[arg(long, env = "BULWARK_NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// The zone it probes from; overrides `zone`.
    #[arg(long, env = "BULWARK_ZONE", value_name = "ZONE")]
    zone: Option<String>,
    /// LB API endpoints (host:port, comma-separated); overrides
    /// `report.endpoints`.
    #[arg(
        long,
        env = "BULWARK_LB_ENDPOINTS",
        value_name = "ADDRS",
        value_delimiter = ','
    )]
    lb_endpoints: Option<Vec<String>>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut overrides = Overrides::new();
    overrides
        .set_opt("nodeName", args.node_name.clone())
        .set_opt("zone", args.zone.clone())
        .set_opt("report.endpoints", args.lb_endpoints.clone());
    bulwark_common::daemon::main::<bulwark_prober::Prober>(&args.daemon, overrides)
}
