//! `bulwark-backup`: parse flags, load the config, bind, call
//! [`bulwark_backup::run`], wait for shutdown.

use std::process::ExitCode;

use anyhow::Context as _;
use bulwark_backup::{BackupConfig, Listeners};
use bulwark_common::config::Overrides;
use bulwark_common::daemon::DaemonArgs;
use bulwark_common::shutdown::Shutdown;
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
    bulwark_backup::tune_allocator();
    let args = Args::parse();
    let config = match args.daemon.load_or_exit::<BackupConfig>(args.overrides()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match start(config).await {
            Ok(code) => code,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "bulwark-backup failed to start");
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn start(config: BackupConfig) -> anyhow::Result<ExitCode> {
    bulwark_common::tls::install_crypto_provider();
    bulwark_common::telemetry::init_logging(&config.logging)?;
    bulwark_backup::metrics::register(&config);
    let grpc = tokio::net::TcpListener::bind(config.grpc.address)
        .await
        .with_context(|| format!("binding grpc.address {}", config.grpc.address))?;
    let admin = tokio::net::TcpListener::bind(config.admin.address)
        .await
        .with_context(|| format!("binding admin.address {}", config.admin.address))?;
    let shutdown = Shutdown::new();
    shutdown
        .listen_for_signals()
        .context("installing signal handlers")?;
    let grace = config.shutdown_grace_period;
    bulwark_backup::run(config, Listeners { grpc, admin }, shutdown.clone()).await?;
    Ok(shutdown.wait(grace).await)
}
