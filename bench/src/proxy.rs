//! bulwark's data path as a bench contender: `bulwark_lb::proxy::serve`
//! with a static backend list, on a Tokio runtime with as many workers as
//! HAProxy gets threads.
//!
//! This is the library's data path, not the `bulwark-lb` binary (which does
//! not exist yet). The figures that close issue 3 must come from the real
//! binary; switch [`crate::datapath`] to it once it can run with static
//! backends.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bulwark_lb::backends::{AdminState, BackendSpec, Backends, RoutingPolicy, Verdict};
use bulwark_lb::proxy::{self, ProxyConfig};
use tokio_util::sync::CancellationToken;

/// Flags of the internal `proxy` subcommand.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// A backend address (repeat).
    #[arg(long = "backend", required = true)]
    backends: Vec<SocketAddr>,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Keep every byte on the buffered path (no splice(2)).
    #[arg(long)]
    no_splice: bool,
    /// Copy buffer per direction, in bytes.
    #[arg(long)]
    buffer_size: Option<usize>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .context("building the runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let backends = Backends::new(RoutingPolicy::default());
        let specs = args
            .backends
            .iter()
            .enumerate()
            .map(|(i, a)| BackendSpec {
                id: format!("b{i}"),
                address: *a,
                zone: String::new(),
                weight: 1,
                admin: AdminState::Active,
                verdict: Verdict::Healthy,
            })
            .collect();
        backends.publish(specs, 1)?;
        let mut config = ProxyConfig::default();
        if args.no_splice {
            config.splice = false;
        }
        if let Some(b) = args.buffer_size {
            config.buffer_size = b;
        }
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        proxy::serve(listener, backends, Arc::new(config), shutdown).await?;
        Ok(())
    })
}
