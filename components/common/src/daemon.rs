//! What every daemon's `main` does the same way: the shared flags, loading
//! and checking the config, starting logs, and the admin server.
//!
//! A daemon's `main` stays short:
//!
//! ```ignore
//! let args = Args::parse();
//! let Some(config) = args.daemon.load_or_exit::<LbConfig>(args.overrides()) else {
//!     return ExitCode::SUCCESS; // --check-config passed
//! };
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{ComponentConfig, ConfigError, Loaded, Overrides};
use crate::telemetry::LogFormat;

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
    /// Admin HTTP address (`/livez`, `/readyz`, `/metrics`); overrides `admin.address`.
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
