//! The command tree. Each service's commands live in their own module; this
//! file holds the global flags and the commands about bulwarkctl itself.

use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;

use crate::connect::Session;
use crate::context::{self, ConnectionArgs, CtlConfig};
use crate::error::{CliError, EXIT_CODES_HELP, Exit};
use crate::output::{self, OutputFormat};

/// The operator CLI for bulwark: the load balancer in front of the
/// apiservers, its health verdicts, and etcd backups and restores.
#[derive(Debug, Parser)]
#[command(name = "bulwarkctl", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = OutputFormat::Table,
          help_heading = context::GLOBAL_OPTIONS)]
    pub output: OutputFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// etcd snapshots: create, list, show, verify, delete, status.
    #[command(subcommand)]
    Backup(crate::backup::BackupCommand),
    /// Show and select contexts in the config file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The load balancer: status, backends, drain, members.
    #[command(subcommand)]
    Lb(crate::lb::LbCommand),
    /// Health verdicts: votes per zone, probers, zones down, fail-open.
    Health(crate::health::HealthArgs),
    /// The whole control plane at a glance: LB leader, VIP holder, members,
    /// backends with verdicts and zones, probers, last backup, RPO lag, last
    /// restore drill. Prints what it can reach; exits non-zero (the code of
    /// the first failure) when a part is UNAVAILABLE. A service with no
    /// endpoint configured is shown as not configured, which is no failure.
    Status,
    /// Restore the whole etcd cluster from a snapshot (and its deltas, to
    /// the latest state, a revision or a time). Operators only.
    Restore(crate::restore::RestoreArgs),
    /// Certificates on this node: `issue` them from the cluster CA as the
    /// daemon configs need them (and operators'), `renew` them in place,
    /// `check` every file the configs name (key, chain, usages, SANs,
    /// identity, expiry).
    #[command(subcommand)]
    Certs(crate::certs::CertsCommand),
    /// Generate every node's configs, the kubeadm config, bulwarkctl.yaml
    /// and the static pod manifests from a cluster description.
    Init(crate::init::InitArgs),
    /// Print a daemon's static pod manifest (lb, prober, backup).
    Manifest(crate::init::ManifestArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `bulwarkctl config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// List the contexts; the current one is marked with `*`.
    GetContexts,
    /// Print the config file as loaded.
    View,
    /// Make NAME the current context (rewrites the config file).
    UseContext {
        /// The context to select.
        name: String,
    },
}

impl Cli {
    /// Runs the command.
    pub async fn run(self) -> Result<(), CliError> {
        match &self.command {
            Command::Backup(c) => {
                let session = self.session()?;
                crate::backup::run(c, &session.backup()?, self.output).await
            }
            Command::Restore(args) => {
                let session = self.session()?;
                crate::restore::run(args, &session.backup()?, self.output).await
            }
            Command::Config(c) => self.config(c),
            Command::Certs(c) => crate::certs::run(c, self.output),
            Command::Init(args) => crate::init::run_init(args),
            Command::Manifest(args) => crate::init::run_manifest(args),
            Command::Lb(c) => {
                let session = self.session()?;
                c.run(&session.lb()?, self.output).await
            }
            Command::Health(c) => {
                let session = self.session()?;
                c.run(&session.lb()?, self.output).await
            }
            Command::Status => {
                let session = self.session()?;
                crate::status::run(&session, self.output).await
            }
            Command::Completion { shell } => {
                // Rendered first: clap_complete panics on a write error,
                // and a closed pipe must stay quiet (see output::emit).
                let mut script = Vec::new();
                clap_complete::generate(*shell, &mut Cli::command(), "bulwarkctl", &mut script);
                output::emit(&script)
            }
        }
    }

    /// Opens a session for the service commands: the context merged with the
    /// flags, and the client certificate loaded.
    pub fn session(&self) -> Result<Session, CliError> {
        let (cfg, file) = context::load(self.connection.config.as_deref())?;
        Session::open(self.connection.resolve(&cfg, file.as_deref())?)
    }

    fn config(&self, cmd: &ConfigCommand) -> Result<(), CliError> {
        let (cfg, path) = context::load(self.connection.config.as_deref())?;
        match cmd {
            ConfigCommand::GetContexts => {
                #[derive(Serialize)]
                struct Row {
                    name: String,
                    current: bool,
                    lb: Vec<String>,
                    backup: Vec<String>,
                }
                let rows: Vec<Row> = cfg
                    .contexts
                    .iter()
                    .map(|c| Row {
                        name: c.name.clone(),
                        current: cfg.current_context.as_deref() == Some(c.name.as_str()),
                        lb: c
                            .lb
                            .as_ref()
                            .map(|e| e.endpoints.clone())
                            .unwrap_or_default(),
                        backup: c
                            .backup
                            .as_ref()
                            .map(|e| e.endpoints.clone())
                            .unwrap_or_default(),
                    })
                    .collect();
                output::print(self.output, &rows, |rows| {
                    let cells: Vec<Vec<String>> = rows
                        .iter()
                        .map(|r| {
                            vec![
                                if r.current { "*".into() } else { String::new() },
                                r.name.clone(),
                                r.lb.join(","),
                                r.backup.join(","),
                            ]
                        })
                        .collect();
                    output::table(&["CURRENT", "NAME", "LB", "BACKUP"], &cells)
                })
            }
            ConfigCommand::View => output::print(self.output, &cfg, |cfg| {
                serde_yaml_ng::to_string(cfg).unwrap_or_else(|e| format!("cannot render: {e}\n"))
            }),
            ConfigCommand::UseContext { name } => {
                let path = path.ok_or_else(|| {
                    CliError::new(Exit::Usage, "no config file to change")
                        .hint("create ~/.config/bulwark/bulwarkctl.yaml or pass --config FILE")
                })?;
                use_context(cfg, &path, name)?;
                output::emit(
                    format!("switched to context {name:?} in {}\n", path.display()).as_bytes(),
                )
            }
        }
    }
}

fn use_context(mut cfg: CtlConfig, path: &std::path::Path, name: &str) -> Result<(), CliError> {
    if !cfg.contexts.iter().any(|c| c.name == name) {
        let known: Vec<&str> = cfg.contexts.iter().map(|c| c.name.as_str()).collect();
        return Err(
            CliError::new(Exit::NotFound, format!("no context named {name:?}"))
                .hint(format!("known contexts: {known:?}")),
        );
    }
    cfg.current_context = Some(name.to_owned());
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct File<'a> {
        api_version: &'a str,
        kind: &'a str,
        #[serde(flatten)]
        cfg: &'a CtlConfig,
    }
    let text = serde_yaml_ng::to_string(&File {
        api_version: bulwark_common::config::API_VERSION,
        kind: <CtlConfig as bulwark_common::config::ComponentConfig>::KIND,
        cfg: &cfg,
    })
    .map_err(|e| CliError::new(Exit::Failure, format!("cannot render config: {e}")))?;
    // Write beside and rename, so an interrupted write never leaves a
    // truncated config behind.
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            CliError::new(
                Exit::Failure,
                format!("cannot write {}: {e}", path.display()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_context_rewrites_the_file_and_it_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bulwarkctl.yaml");
        std::fs::write(
            &path,
            "apiVersion: bulwark.dev/v1alpha1\nkind: BulwarkctlConfiguration\ncurrentContext: a\ncontexts:\n- name: a\n- name: b\n",
        )
        .unwrap();
        let (cfg, _) = context::load(Some(&path)).unwrap();
        use_context(cfg, &path, "b").unwrap();
        let (cfg, _) = context::load(Some(&path)).unwrap();
        assert_eq!(cfg.current_context.as_deref(), Some("b"));
        assert_eq!(cfg.contexts.len(), 2);

        let err = use_context(cfg, &path, "zzz").unwrap_err();
        assert_eq!(err.exit(), Exit::NotFound);
    }

    /// A subcommand's `--help` shows its own options first; the global
    /// connection flags follow under their own heading.
    #[test]
    fn subcommand_help_puts_the_commands_own_flags_first() {
        let help = Cli::try_parse_from(["bulwarkctl", "backup", "delete", "--help"])
            .unwrap_err()
            .to_string();
        let at = |needle: &str| {
            help.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in:\n{help}"))
        };
        let globals = at("Global options:");
        assert!(at("--force") < globals, "{help}");
        for global in ["--lb-endpoint", "--ca <FILE>", "--timeout", "--output"] {
            assert!(at(global) > globals, "{global} above the globals:\n{help}");
        }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn an_explicit_missing_config_is_an_error_but_the_default_may_be_absent() {
        let err =
            context::load(Some(std::path::Path::new("/nonexistent/bulwarkctl.yaml"))).unwrap_err();
        assert_eq!(err.exit(), Exit::Usage);
        assert!(
            err.to_string().contains("/nonexistent/bulwarkctl.yaml"),
            "{err}"
        );
    }
}
