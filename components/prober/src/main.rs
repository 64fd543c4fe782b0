//! `bulwark-prober`: parse flags, load the config, bind the admin port,
//! run until SIGTERM. Everything else is in the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_common::config::Overrides;
use bulwark_common::daemon::DaemonArgs;
use bulwark_common::shutdown::Shutdown;
use bulwark_prober::ProberConfig;
use clap::Parser;

/// How long a graceful shutdown may take: checks stop at once, the report
/// stream closes, the admin server drains.
const GRACE: Duration = Duration::from_secs(5);

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
    bulwark_common::tls::install_crypto_provider();
    let args = Args::parse();
    let mut overrides = Overrides::new();
    overrides
        .set_opt("nodeName", args.node_name.clone())
        .set_opt("zone", args.zone.clone())
        .set_opt("report.endpoints", args.lb_endpoints.clone());
    let config = match args.daemon.load_or_exit::<ProberConfig>(overrides) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Err(e) = bulwark_common::telemetry::init_logging(&config.logging) {
        eprintln!("error: cannot start logging: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match serve(config).await {
            Ok(code) => code,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "bulwark-prober failed to start");
                ExitCode::FAILURE
            }
        }
    })
}

async fn serve(config: ProberConfig) -> anyhow::Result<ExitCode> {
    bulwark_prober::metrics::register(&config);
    let admin = tokio::net::TcpListener::bind(config.admin.address)
        .await
        .with_context(|| format!("binding the admin address {}", config.admin.address))?;
    let shutdown = Shutdown::new();
    shutdown
        .listen_for_signals()
        .context("installing signal handlers")?;
    let token = shutdown.token();
    shutdown.spawn_critical("prober", async move {
        bulwark_prober::run(config, Some(admin), token)
            .await
            .map_err(anyhow::Error::from)
    });
    Ok(shutdown.wait(GRACE).await)
}
