//! One `main` for every daemon: the shared flags, loading and checking the
//! config (or exiting with the documented code), logs, the runtime,
//! binding, running and the graceful shutdown.
//!
//! A daemon implements [`Daemon`] in its library (its config type, what it
//! binds, its `run(config, listeners, &Shutdown)`), and its `main.rs` only
//! parses its own flags:
//!
//! ```ignore
//! fn main() -> ExitCode {
//!     let args = Args::parse();
//!     bulwark_common::daemon::main::<bulwark_lb::Lb>(&args.daemon, args.overrides())
//! }
//! ```
//!
//! The lifecycle [`main`] runs, the same in every daemon:
//!
//! ```text
//! load config ──invalid──▶ exit 2      (--check-config valid ──▶ exit 0)
//!     │
//! logs, runtime (control threads real-time if asked), metrics, signals
//!     │
//! Daemon::bind ──error──▶ "<name> failed to start", exit 1
//!     │
//! Daemon::run: spawns its workers on the Shutdown and returns
//!     │
//! Shutdown::wait ◀── SIGTERM/SIGINT, or a critical worker ended
//!     │              ("critical task <name> <why>; shutting down")
//!     ├── every task done within the grace period ──▶ exit 0
//!     ├── a critical worker failed ─────────────────▶ exit 1
//!     └── grace period over, or a second signal ────▶ exit 3
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use tracing::Instrument as _;

use crate::config::{ComponentConfig, ConfigError, Loaded, Overrides};
use crate::shutdown::Shutdown;
use crate::telemetry::{LogFormat, LoggingConfig};

/// A bulwark daemon, as [`main`] runs it.
pub trait Daemon {
    /// The binary's name (`bulwark-lb`), in start-up errors.
    const NAME: &'static str;
    /// The configuration file's type.
    type Config: ComponentConfig;
    /// The sockets [`run`](Daemon::run) serves on, bound by
    /// [`bind`](Daemon::bind) (tests bind port 0 themselves).
    type Listeners;

    /// The `logging:` section.
    fn logging(config: &Self::Config) -> &LoggingConfig;
    /// How long a graceful shutdown may take.
    fn grace(config: &Self::Config) -> Duration;
    /// Declares the daemon's metrics (after the recorder is installed).
    fn register_metrics(config: &Self::Config);
    /// The `SCHED_RR` priority of the runtime's threads (0: the ordinary
    /// policy); see [`crate::sched`]. Threads the daemon starts itself
    /// (the LB's data path) stay ordinary.
    fn realtime_priority(_config: &Self::Config) -> u8 {
        0
    }
    /// The span every log line carries (the LB: its node id).
    fn span(_config: &Self::Config) -> tracing::Span {
        tracing::Span::none()
    }
    /// Binds every listener the config names.
    fn bind(config: &Self::Config) -> impl Future<Output = anyhow::Result<Self::Listeners>>;
    /// Starts the daemon's workers as tasks of `shutdown` and returns once
    /// they run; an error here is a failed start.
    fn run(
        config: Self::Config,
        listeners: Self::Listeners,
        shutdown: &Shutdown,
    ) -> impl Future<Output = anyhow::Result<()>>;
}

/// The whole life of daemon `D`: see the module header. `args` and
/// `overrides` are the shared flags and the daemon's own.
pub fn main<D: Daemon>(args: &DaemonArgs, overrides: Overrides) -> ExitCode {
    crate::tls::install_crypto_provider();
    let config = match args.load_or_exit::<D::Config>(overrides) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = crate::telemetry::init_logging(D::logging(&config)) {
        eprintln!("error: cannot start logging: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match runtime(D::realtime_priority(&config)).build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let span = D::span(&config);
    runtime.block_on(
        async move {
            match serve::<D>(config).await {
                Ok(code) => code,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "{} failed to start", D::NAME);
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        .instrument(span),
    )
}

/// The daemon's runtime: every thread of it under `SCHED_RR` at
/// `priority` when that is nonzero and the kernel allows it; a refusal is
/// logged and the daemon runs on with ordinary threads.
fn runtime(priority: u8) -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if priority == 0 {
        return builder;
    }
    // The calling thread first: it tells whether the kernel allows it, and
    // it starts the runtime's threads.
    match crate::sched::make_realtime(priority) {
        Ok(()) => {
            tracing::info!(priority, "control threads run under SCHED_RR");
            builder.on_thread_start(|| {
                if let Err(e) = crate::sched::adopt() {
                    tracing::warn!(error = %e, "a runtime thread could not be made real-time");
                }
            });
            if let Err(e) = crate::sched::spawn_guard(priority, crate::sched::Budget::default()) {
                tracing::warn!(error = %e, "cannot start the real-time guard");
            }
        }
        Err(e) => tracing::warn!(
            error = %e,
            priority,
            "cannot run the control threads under SCHED_RR (the container needs \
             the SYS_NICE capability); they run as ordinary threads \
             (realtimePriority: 0 asks for that and ends this warning)"
        ),
    }
    builder
}

/// Binds, runs and waits: the part of [`main`] inside the runtime.
async fn serve<D: Daemon>(config: D::Config) -> anyhow::Result<ExitCode> {
    D::register_metrics(&config);
    let shutdown = Shutdown::new();
    shutdown
        .listen_for_signals()
        .context("installing signal handlers")?;
    let grace = D::grace(&config);
    let listeners = D::bind(&config).await?;
    D::run(config, listeners, &shutdown).await?;
    let code = shutdown.wait(grace).await;
    let short = D::NAME.trim_start_matches("bulwark-");
    tracing::info!("{short} stopped");
    Ok(code)
}

/// Exit code for a configuration that does not load or validate (the same
/// code clap uses for bad arguments).
pub const EXIT_CONFIG: u8 = 2;

/// Flags every bulwark daemon accepts. Each also reads an environment
/// variable, so a static pod manifest can set either.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DaemonArgs {
    /// Configuration file (YAML, `apiVersion: bulwark.dev/v1alpha1`).
    #[arg(long, env = "BULWARK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Load and validate the configuration (files it names included), print
    /// the result and exit: 0 when valid, 2 when not.
    #[arg(long)]
    pub check_config: bool,
    /// Log format; overrides `logging.format`.
    #[arg(long, env = "BULWARK_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter such as `info` or `info,bulwark_lb=debug`; overrides `logging.level`.
    #[arg(long, env = "BULWARK_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Admin HTTP address (`/livez`, `/readyz`, `/metrics`, `/debug/workers`);
    /// overrides `admin.address`.
    #[arg(long, env = "BULWARK_ADMIN_ADDRESS", value_name = "ADDR")]
    pub admin_address: Option<SocketAddr>,
}

impl DaemonArgs {
    /// Adds the shared flags to a daemon's own overrides.
    pub fn add_overrides(&self, overrides: &mut Overrides) {
        overrides
            .set_opt("logging.format", self.log_format)
            .set_opt("logging.level", self.log_level.clone())
            .set_opt("admin.address", self.admin_address.map(|a| a.to_string()));
    }

    /// Loads the config from `--config` plus `overrides` and the shared
    /// flags, with the preflight checks (TLS material read and
    /// cross-checked) and the warnings.
    pub fn load<T: ComponentConfig>(
        &self,
        mut overrides: Overrides,
    ) -> Result<Loaded<T>, ConfigError> {
        self.add_overrides(&mut overrides);
        crate::config::load_checked(self.config.as_deref(), &overrides)
    }

    /// Loads the config, handling the two outcomes that end the process:
    /// an invalid config (every problem printed to stderr, exit 2) and
    /// `--check-config` (a summary on stdout, exit 0). Warnings go to
    /// stderr either way (logging is not set up yet; stderr is the pod
    /// log). Otherwise makes the files the daemon will create private
    /// ([`private_files`]) and returns the config to run.
    pub fn load_or_exit<T: ComponentConfig>(&self, overrides: Overrides) -> Result<T, ExitCode> {
        let loaded = match self.load::<T>(overrides) {
            Err(e) => {
                eprintln!("error: {e}");
                for w in e.warnings() {
                    eprintln!("warning: {w}");
                }
                return Err(ExitCode::from(EXIT_CONFIG));
            }
            Ok(loaded) => loaded,
        };
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        if self.check_config {
            let warned = match loaded.warnings.len() {
                0 => String::new(),
                n => format!(" ({n} warning{})", if n == 1 { "" } else { "s" }),
            };
            match &self.config {
                Some(path) => println!("{}: valid {}{warned}", path.display(), T::KIND),
                None => println!("valid {} (built-in defaults and flags){warned}", T::KIND),
            }
            return Err(ExitCode::SUCCESS);
        }
        private_files();
        Ok(loaded.config)
    }
}

/// Sets the process umask to 077: every file and directory the daemon
/// creates from now on — the LB's Raft log, a `file://` backup store
/// (snapshots hold every Secret of the cluster), restore and drill work
/// directories, and whatever child processes such as etcdutl write — is
/// readable by its own user only (0600 / 0700), whatever the umask it
/// was started with.
pub fn private_files() {
    // SAFETY: umask(2) cannot fail and touches no memory.
    unsafe {
        libc::umask(0o077);
    }
}
