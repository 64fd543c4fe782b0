//! `bulwark-lb`: parse flags, load the config, bind, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bulwark_common::config::Overrides;
use bulwark_common::daemon::DaemonArgs;
use bulwark_common::shutdown::Shutdown;
use bulwark_lb::config::LbConfig;
use clap::Parser;
use tracing::Instrument;

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
    let config = match args.daemon.load_or_exit::<LbConfig>(args.overrides()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "bulwark-lb failed to start");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: LbConfig) -> anyhow::Result<ExitCode> {
    bulwark_common::telemetry::init_logging(&config.logging).context("starting logs")?;
    bulwark_lb::metrics::register(&config);
    let span = tracing::info_span!("lb", node = config.node_id);
    run(config).instrument(span).await
}

async fn run(config: LbConfig) -> anyhow::Result<ExitCode> {
    let shutdown = Shutdown::new();
    shutdown
        .listen_for_signals()
        .context("installing signal handlers")?;
    let listeners = bulwark_lb::Listeners::bind(&config).await?;
    let grace = config.shutdown_grace;
    bulwark_lb::run(config, listeners, &shutdown).await?;
    Ok(shutdown.wait(grace).await)
}
