//! Named contexts, like kubeconfig: which endpoints to call and with which
//! client certificate. Flags and environment variables override the
//! selected context field by field.
//!
//! ```yaml
//! apiVersion: bulwark.dev/v1alpha1
//! kind: BulwarkctlConfiguration
//! currentContext: prod
//! contexts:
//! - name: prod
//!   ca: /etc/kubernetes/pki/ca.crt
//!   cert: /etc/kubernetes/pki/bulwark/admin.crt
//!   key: /etc/kubernetes/pki/bulwark/admin.key
//!   lb:
//!     endpoints: [10.0.0.11:9442, 10.0.0.12:9442, 10.0.0.13:9442]
//!   backup:
//!     endpoints: [10.0.0.11:9445, 10.0.0.12:9445, 10.0.0.13:9445]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_common::config::{ComponentConfig, Overrides, Validate, Validator};
use bulwark_common::tls::TlsFiles;
use serde::{Deserialize, Serialize};

use crate::error::{CliError, Exit};

/// The file `bulwarkctl` reads its contexts from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CtlConfig {
    /// The context used when `--context` is not given.
    #[serde(default)]
    pub current_context: Option<String>,
    /// The named contexts.
    #[serde(default)]
    pub contexts: Vec<Context>,
}

impl ComponentConfig for CtlConfig {
    const KIND: &'static str = "BulwarkctlConfiguration";
}

/// One control plane (or one way of reaching it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Context {
    /// The name `--context` selects.
    pub name: String,
    /// CA bundle that issued the services' serving certificates.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (an operator's for destructive commands).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// bulwark-lb's API.
    #[serde(default)]
    pub lb: Option<ServiceEndpoints>,
    /// bulwark-backup's API.
    #[serde(default)]
    pub backup: Option<ServiceEndpoints>,
}

/// Where one service answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEndpoints {
    /// `host:port` of each instance; any of them answers reads.
    pub endpoints: Vec<String>,
    /// Name to verify the serving certificates against, when the endpoints
    /// are addresses that are not in the certificates' SANs.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl Validate for ServiceEndpoints {
    fn validate(&self, v: &mut Validator) {
        if self.endpoints.is_empty() {
            v.at("endpoints", |v| v.error("must list at least one host:port"));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if let Err(msg) = check_endpoint(e) {
                v.at(format!("endpoints[{i}]"), |v| v.error(msg));
            }
        }
    }
}

/// Checks that `e` looks like `host:port`.
pub fn check_endpoint(e: &str) -> Result<(), String> {
    let ok = e
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if ok && !e.contains("://") {
        Ok(())
    } else {
        Err(format!("{e:?} is not host:port (e.g. 10.0.0.11:9442)"))
    }
}

impl Validate for CtlConfig {
    fn validate(&self, v: &mut Validator) {
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.contexts.iter().enumerate() {
            v.at(format!("contexts[{i}]"), |v| {
                if c.name.trim().is_empty() {
                    v.at("name", |v| v.error("must not be empty"));
                } else if !seen.insert(c.name.as_str()) {
                    v.at("name", |v| {
                        v.error(format!("duplicate context name {:?}", c.name))
                    });
                }
                if c.cert.is_some() != c.key.is_some() {
                    v.error("cert and key must be given together");
                }
                if let Some(lb) = &c.lb {
                    v.nested("lb", lb);
                }
                if let Some(b) = &c.backup {
                    v.nested("backup", b);
                }
            });
        }
        if let Some(cur) = &self.current_context
            && !self.contexts.iter().any(|c| &c.name == cur)
        {
            v.at("currentContext", |v| {
                v.error(format!(
                    "names no context: {cur:?} is not among contexts[].name"
                ));
            });
        }
    }
}

/// The default config path: `$XDG_CONFIG_HOME/bulwark/bulwarkctl.yaml` or
/// `~/.config/bulwark/bulwarkctl.yaml`.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("bulwark").join("bulwarkctl.yaml"))
}

/// Reads the config. An explicitly named file must exist; the default file
/// may be absent (everything can come from flags).
pub fn load(explicit: Option<&Path>) -> Result<(CtlConfig, Option<PathBuf>), CliError> {
    let (path, must_exist) = match explicit {
        Some(p) => (Some(p.to_owned()), true),
        None => (default_path(), false),
    };
    match path {
        Some(p) if must_exist || p.exists() => {
            let cfg = bulwark_common::config::load::<CtlConfig>(Some(&p), &Overrides::new())
                .map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
            Ok((cfg, Some(p)))
        }
        _ => Ok((CtlConfig::default(), None)),
    }
}

/// The `--help` heading of the flags every command takes, so that a
/// command's own options come first.
pub const GLOBAL_OPTIONS: &str = "Global options";

/// What the command line says about the connection; each field overrides
/// the context's.
#[derive(Clone, Debug, Default, clap::Args)]
#[command(next_help_heading = GLOBAL_OPTIONS)]
pub struct ConnectionArgs {
    /// Config file with contexts [default: ~/.config/bulwark/bulwarkctl.yaml].
    #[arg(long, global = true, env = "BULWARKCTL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Context to use instead of the file's currentContext.
    #[arg(long, global = true, env = "BULWARKCTL_CONTEXT")]
    pub context: Option<String>,
    /// bulwark-lb API endpoint(s), host:port (repeat or comma-separate).
    #[arg(
        long,
        global = true,
        env = "BULWARKCTL_LB_ENDPOINTS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    pub lb_endpoint: Vec<String>,
    /// bulwark-backup API endpoint(s), host:port (repeat or comma-separate).
    #[arg(
        long,
        global = true,
        env = "BULWARKCTL_BACKUP_ENDPOINTS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    pub backup_endpoint: Vec<String>,
    /// CA bundle that issued the services' certificates.
    #[arg(long, global = true, env = "BULWARKCTL_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate.
    #[arg(long, global = true, env = "BULWARKCTL_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Client key.
    #[arg(long, global = true, env = "BULWARKCTL_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Name to verify server certificates against (when endpoints are IPs
    /// outside the certificates' SANs).
    #[arg(long, global = true, env = "BULWARKCTL_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Deadline for each call, e.g. 10s. Streaming commands (create, verify,
    /// restore) are not cut by it.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Durations as in the config files: `500ms`, `10s`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e} (expected e.g. 500ms, 10s, 1m30s)"))
}

/// The connection settings after merging the context with the flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The context used, if any.
    pub context: Option<String>,
    /// Client TLS files.
    pub tls: TlsFiles,
    /// bulwark-lb endpoints.
    pub lb: Option<ServiceEndpoints>,
    /// bulwark-backup endpoints.
    pub backup: Option<ServiceEndpoints>,
    /// Per-call deadline.
    pub timeout: Duration,
}

/// Why a TLS file is missing when no context file was read: the file is
/// not where it was looked for, which is what the operator needs to hear
/// (not only that `--ca` was not given).
fn no_context_file(what: &str) -> CliError {
    let (message, create) = match default_path() {
        Some(p) => (
            format!(
                "no {what} given, and no context file: {} does not exist",
                p.display()
            ),
            format!("create {}", p.display()),
        ),
        None => (
            format!(
                "no {what} given, and no context file: neither $XDG_CONFIG_HOME nor $HOME is set"
            ),
            "create a context file".to_owned(),
        ),
    };
    CliError::new(Exit::Usage, message).hint(format!(
        "{create} with a context naming ca, cert, key and the lb/backup endpoints \
         (deploy/config/bulwarkctl.yaml is an example; --config FILE or BULWARKCTL_CONFIG \
         name another file), or pass --ca, --cert, --key and --lb-endpoint/--backup-endpoint \
         (or BULWARKCTL_CA, BULWARKCTL_CERT, BULWARKCTL_KEY, BULWARKCTL_LB_ENDPOINTS, \
         BULWARKCTL_BACKUP_ENDPOINTS)"
    ))
}

impl ConnectionArgs {
    /// Merges flags over the selected context. `file` is the context file
    /// `cfg` was read from, `None` when there was none.
    pub fn resolve(&self, cfg: &CtlConfig, file: Option<&Path>) -> Result<Resolved, CliError> {
        let name = self.context.clone().or_else(|| cfg.current_context.clone());
        let ctx = match &name {
            Some(n) => cfg
                .contexts
                .iter()
                .find(|c| &c.name == n)
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&str> = cfg.contexts.iter().map(|c| c.name.as_str()).collect();
                    CliError::new(Exit::Usage, format!("no context named {n:?}")).hint(format!(
                        "known contexts: {known:?}; list them with `bulwarkctl config get-contexts`"
                    ))
                })?,
            None => Context::default(),
        };
        let pick = |flag: &Option<PathBuf>, ctx: &Option<PathBuf>, what: &str, flag_name: &str| {
            flag.clone()
                .or_else(|| ctx.clone())
                .ok_or_else(|| match file {
                    None => no_context_file(what),
                    Some(file) => {
                        CliError::new(Exit::Usage, format!("no {what} given")).hint(format!(
                            "pass --{flag_name} FILE, or set `{flag_name}` in the context in {} \
                     (`bulwarkctl config view`)",
                            file.display()
                        ))
                    }
                })
        };
        let tls = TlsFiles {
            ca_file: pick(&self.ca, &ctx.ca, "CA bundle", "ca")?,
            cert_file: pick(&self.cert, &ctx.cert, "client certificate", "cert")?,
            key_file: pick(&self.key, &ctx.key, "client key", "key")?,
        };
        let merge = |flags: &[String],
                     ctx: Option<ServiceEndpoints>|
         -> Result<Option<ServiceEndpoints>, CliError> {
            for e in flags {
                check_endpoint(e)
                    .map_err(|m| CliError::new(Exit::Usage, format!("endpoint: {m}")))?;
            }
            let mut out = if flags.is_empty() {
                ctx
            } else {
                Some(ServiceEndpoints {
                    endpoints: flags.to_vec(),
                    server_name: ctx.and_then(|c| c.server_name),
                })
            };
            if let (Some(o), Some(name)) = (&mut out, &self.server_name) {
                o.server_name = Some(name.clone());
            }
            Ok(out)
        };
        Ok(Resolved {
            context: name,
            tls,
            lb: merge(&self.lb_endpoint, ctx.lb)?,
            backup: merge(&self.backup_endpoint, ctx.backup)?,
            timeout: self.timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Result<CtlConfig, String> {
        let text =
            format!("apiVersion: bulwark.dev/v1alpha1\nkind: BulwarkctlConfiguration\n{yaml}");
        bulwark_common::config::from_str_with::<CtlConfig>(Some(&text), None, &Overrides::new())
            .map_err(|e| e.to_string())
    }

    const TWO: &str = "currentContext: a
contexts:
- name: a
  ca: /a/ca.crt
  cert: /a/admin.crt
  key: /a/admin.key
  lb: {endpoints: ['10.0.0.1:9440', '10.0.0.2:9440']}
- name: b
  ca: /b/ca.crt
  cert: /b/admin.crt
  key: /b/admin.key
  backup: {endpoints: ['10.1.0.1:9450'], serverName: backup.local}
";

    #[test]
    fn flags_override_the_context_field_by_field() {
        let c = cfg(TWO).unwrap();
        let r = ConnectionArgs::default()
            .resolve(&c, Some(Path::new("/c.yaml")))
            .unwrap();
        assert_eq!(r.context.as_deref(), Some("a"));
        assert_eq!(r.tls.ca_file, PathBuf::from("/a/ca.crt"));
        assert_eq!(r.lb.unwrap().endpoints.len(), 2);
        assert!(r.backup.is_none());

        let args = ConnectionArgs {
            context: Some("b".into()),
            cert: Some("/me.crt".into()),
            backup_endpoint: vec!["127.0.0.1:1".into()],
            ..Default::default()
        };
        let r = args.resolve(&c, Some(Path::new("/c.yaml"))).unwrap();
        assert_eq!(r.tls.cert_file, PathBuf::from("/me.crt"));
        assert_eq!(r.tls.key_file, PathBuf::from("/b/admin.key"));
        let b = r.backup.unwrap();
        assert_eq!(b.endpoints, vec!["127.0.0.1:1"]);
        // The context's server name still applies to overridden endpoints.
        assert_eq!(b.server_name.as_deref(), Some("backup.local"));
    }

    #[test]
    fn missing_pieces_say_what_to_pass() {
        let err = ConnectionArgs::default()
            .resolve(
                &cfg("contexts: [{name: a}]\ncurrentContext: a\n").unwrap(),
                Some(Path::new("/c.yaml")),
            )
            .unwrap_err();
        assert_eq!(err.exit(), Exit::Usage);
        assert!(err.to_string().contains("no CA bundle given"), "{err}");
        let hint = err.hint_text().unwrap_or_default();
        assert!(hint.contains("--ca") && hint.contains("/c.yaml"), "{err:?}");

        let args = ConnectionArgs {
            context: Some("zzz".into()),
            ..Default::default()
        };
        let err = args.resolve(&cfg(TWO).unwrap(), None).unwrap_err();
        assert!(
            err.to_string().contains("no context named \"zzz\""),
            "{err}"
        );
    }

    #[test]
    fn bad_files_name_the_field() {
        let e = cfg("currentContext: nope\ncontexts: []\n").unwrap_err();
        assert!(e.contains("currentContext: names no context"), "{e}");
        let e = cfg("contexts:\n- name: a\n  lb: {endpoints: ['https://x:1']}\n").unwrap_err();
        assert!(
            e.contains("contexts[0].lb.endpoints[0]: \"https://x:1\" is not host:port"),
            "{e}"
        );
        let e = cfg("contexts:\n- name: a\n- name: a\n").unwrap_err();
        assert!(
            e.contains("contexts[1].name: duplicate context name"),
            "{e}"
        );
        let e = cfg("contexts:\n- name: a\n  cert: /x\n").unwrap_err();
        assert!(
            e.contains("contexts[0]: cert and key must be given together"),
            "{e}"
        );
    }

    #[test]
    fn durations_parse_like_the_config() {
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("soon").is_err());
    }
}
