//! `bulwark-backup`: parse flags; the shared daemon `main` loads the
//! config, binds and runs [`bulwark_backup::Backup`] until SIGTERM.

use std::process::ExitCode;

use bulwark_common::config::Overrides;
use bulwark_common::daemon::DaemonArgs;
use clap::Parser;

/// etcd snapshots streamed to object storage: verified, compressed,
/// encrypted, scheduled and retained.
#[derive(Debug, Parser)]
#[command(name = "bulwark-backup", version)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// This instance's name; overrides `nodeName`.
    #[arg(long, env = "BULWARK_NODE_NAME")]
    node_name: Option<String>,
    /// Store URL (file://, s3://, gs://, az://); overrides `store.url`.
    #[arg(long, env = "BULWARK_BACKUP_STORE_URL", value_name = "URL")]
    store_url: Option<String>,
    /// etcd client URLs, comma-separated; overrides `etcd.endpoints`.
    #[arg(
        long,
        env = "BULWARK_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    etcd_endpoints: Option<Vec<String>>,
    /// gRPC listen address; overrides `grpc.address`.
    #[arg(long, env = "BULWARK_BACKUP_GRPC_ADDRESS", value_name = "ADDR")]
    grpc_address: Option<std::net::SocketAddr>,
}

impl Args {
    fn overrides(&self) -> Overrides {
        let mut o = Overrides::new();
        o.set_opt("nodeName", self.node_name.clone())
            .set_opt("store.url", self.store_url.clone())
            .set_opt("etcd.endpoints", self.etcd_endpoints.clone())
            .set_opt("grpc.address", self.grpc_address.map(|a| a.to_string()));
        o
    }
}

fn main() -> ExitCode {
    // Before the runtime starts its threads.
    bulwark_backup::tune_allocator();
    let args = Args::parse();
    bulwark_common::daemon::main::<bulwark_backup::Backup>(&args.daemon, args.overrides())
}
