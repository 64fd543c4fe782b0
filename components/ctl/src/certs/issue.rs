//! `bulwarkctl certs issue` and `certs renew`: bulwark's own certificates
//! from the cluster CA, derived from the daemon configs that use them.
//!
//! `issue` reads each config the way the daemon does (without the files,
//! which may not exist yet) and derives what its certificate must say from
//! it: the CN `bulwark-<component>-<node>`, the O that the peers' access
//! rule admits (`access.peers`, `access.probers` of an LB config given in
//! the same run, `grpc.access.peers`), the addresses peers dial as SANs
//! (plus the node name), and the usages the daemon's start-up check asks
//! for. The files it writes are the ones the config names. An operator's
//! certificate carries `O=bulwark:operators`, a group Kubernetes binds to
//! nothing, so the file grants bulwark operations and no cluster access.
//!
//! `renew` re-signs existing certificates with what they already say and
//! the same key (unless `--new-key`), so a renewal never changes an
//! identity. Files are rewritten in place (same inode): the static pods
//! bind-mount each file, and a rename would leave a running container on
//! the old one; the daemons reload the new contents without a restart and
//! refuse a half-written or mismatched file (docs/SECURITY.md).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use bulwark_common::authz::{BULWARK_OPERATORS, IdentityRule};
use bulwark_common::config::{ComponentConfig, check_offline};
use bulwark_common::tls::{KUBEADM_CA_CERT, PeerIdentity, TlsFiles};
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::ca::{ClusterCa, LeafSpec, signing_key};
use crate::error::{CliError, Exit};

/// kubeadm's cluster CA key.
pub const KUBEADM_CA_KEY: &str = "/etc/kubernetes/pki/ca.key";

/// The CA to sign with.
#[derive(Debug, clap::Args)]
pub struct CaArgs {
    /// The CA certificate (kubeadm's cluster CA).
    #[arg(long, value_name = "FILE", default_value = KUBEADM_CA_CERT)]
    pub ca_cert: PathBuf,
    /// The CA's private key (PKCS#8, PKCS#1 or SEC1 PEM).
    #[arg(long, value_name = "FILE", default_value = KUBEADM_CA_KEY)]
    pub ca_key: PathBuf,
}

/// `bulwarkctl certs issue`'s arguments.
#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// Daemon configs (kind LoadBalancerConfiguration, ProberConfiguration,
    /// BackupConfiguration) whose certificates to issue. None: the ones
    /// present in --dir (unless --operator is given).
    #[arg(value_name = "CONFIG")]
    pub configs: Vec<PathBuf>,
    /// Where the daemon configs are when none is named.
    #[arg(long, value_name = "DIR", default_value = "/etc/bulwark")]
    pub dir: PathBuf,
    /// Issue an operator certificate for NAME (CN=NAME,
    /// O=bulwark:operators, clientAuth) into --out-dir.
    #[arg(long, value_name = "NAME")]
    pub operator: Option<String>,
    /// Where the operator certificate goes (NAME.crt, NAME.key).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out_dir: PathBuf,
    /// Another subjectAltName for the serving certificates (an IP or DNS
    /// name clients dial, e.g. when a daemon listens on 0.0.0.0).
    #[arg(long = "san", value_name = "NAME")]
    pub sans: Vec<String>,
    /// Validity in days (never past the CA's own expiry).
    #[arg(long, value_name = "DAYS", default_value_t = 365)]
    pub days: u32,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub ca: CaArgs,
}

/// `bulwarkctl certs renew`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RenewArgs {
    /// Daemon configs whose bulwark certificates to renew. None: the ones
    /// present in --dir (unless --file is given).
    #[arg(value_name = "CONFIG")]
    pub configs: Vec<PathBuf>,
    /// Where the daemon configs are when none is named.
    #[arg(long, value_name = "DIR", default_value = "/etc/bulwark")]
    pub dir: PathBuf,
    /// Another certificate file to renew (e.g. an operator's); its key is
    /// the file beside it ending in `.key`.
    #[arg(long = "file", value_name = "CERT")]
    pub certs: Vec<PathBuf>,
    /// Renew only certificates that expire within DAYS (for a timer).
    #[arg(long, value_name = "DAYS")]
    pub within: Option<u32>,
    /// Generate a new key instead of keeping the current one.
    #[arg(long)]
    pub new_key: bool,
    /// Validity in days (never past the CA's own expiry).
    #[arg(long, value_name = "DAYS", default_value_t = 365)]
    pub days: u32,
    #[command(flatten)]
    pub ca: CaArgs,
}

/// One certificate `issue` or `renew` handles.
#[derive(Debug, Serialize)]
pub struct Target {
    /// The config file naming it (`-` for an operator's or a `--file`).
    pub config: String,
    /// Its field in that config.
    pub field: String,
    /// Its files.
    #[serde(skip)]
    pub files: TlsFiles,
    /// The certificate file.
    pub file: String,
    /// What it says.
    pub spec: LeafSpec,
    /// `issued`, `renewed`, or `kept` (renew, not yet within --within).
    pub action: &'static str,
    /// RFC 3339 notAfter of the file as written (or kept).
    pub not_after: Option<String>,
}

/// The result of `issue` or `renew`.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub certificates: Vec<Target>,
}

/// The configs to read: the ones named, else those present in `dir`.
fn config_files(named: &[PathBuf], dir: &Path) -> Vec<PathBuf> {
    if !named.is_empty() {
        return named.to_vec();
    }
    ["lb.yaml", "prober.yaml", "backup.yaml"]
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.exists())
        .collect()
}

/// Why there is nothing to `verb`: no config found, or configs that name
/// no bulwark certificate.
fn nothing_to(verb: &str, named: &[PathBuf], dir: &Path) -> String {
    let found = config_files(named, dir);
    if found.is_empty() {
        return format!(
            "nothing to {verb}: no lb.yaml, prober.yaml or backup.yaml in {}",
            dir.display()
        );
    }
    let found: Vec<_> = found.iter().map(|p| p.display().to_string()).collect();
    format!(
        "nothing to {verb}: no config read names a bulwark certificate ({}; a prober without report endpoints uses none)",
        found.join(", ")
    )
}

/// A daemon config, parsed and validated without reading the files it
/// names.
enum Daemon {
    Lb(Box<bulwark_lb::config::LbConfig>),
    Prober(Box<bulwark_prober::ProberConfig>),
    Backup(Box<bulwark_backup::BackupConfig>),
}

fn read_config(path: &Path, problems: &mut Vec<String>) -> Option<Daemon> {
    let name = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            problems.push(format!("{name}: cannot read it: {e}"));
            return None;
        }
    };
    let kind = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
        .unwrap_or_default();
    fn parse<T: ComponentConfig>(name: &str, text: &str, p: &mut Vec<String>) -> Option<T> {
        match check_offline::<T>(text) {
            Ok(loaded) => Some(loaded.config),
            Err(e) => {
                p.extend(super::config_problems(name, &e));
                None
            }
        }
    }
    use bulwark_backup::BackupConfig as B;
    use bulwark_lb::config::LbConfig as L;
    use bulwark_prober::ProberConfig as P;
    match kind.as_str() {
        L::KIND => parse::<L>(&name, &text, problems).map(|c| Daemon::Lb(Box::new(c))),
        P::KIND => parse::<P>(&name, &text, problems).map(|c| Daemon::Prober(Box::new(c))),
        B::KIND => parse::<B>(&name, &text, problems).map(|c| Daemon::Backup(Box::new(c))),
        other => {
            problems.push(format!(
                "{name}: kind {other:?} is none of {}, {}, {}",
                L::KIND,
                P::KIND,
                B::KIND
            ));
            None
        }
    }
}

/// The organization a certificate gets so that `rule` (at `rule_path`)
/// admits it: the rule's first organization, or `default` without a
/// rule. A rule of common names only must list `cn`.
fn organizations(
    rule: Option<&IdentityRule>,
    rule_path: &str,
    cn: &str,
    default: &str,
) -> Result<Vec<String>, String> {
    match rule {
        None => Ok(vec![default.to_owned()]),
        Some(r) => match r.organizations.first() {
            Some(o) => Ok(vec![o.clone()]),
            None if r.common_names.iter().any(|c| c == cn) => Ok(Vec::new()),
            None => Err(format!(
                "{rule_path} admits only commonNames {:?}, not {cn}: add it there, or an \
                 organization",
                r.common_names
            )),
        },
    }
}

/// Adds `host` to `sans` once (an IPv6 literal without its brackets).
fn add_san(sans: &mut Vec<String>, host: &str) {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if !host.is_empty() && !sans.iter().any(|s| s.eq_ignore_ascii_case(host)) {
        sans.push(host.to_owned());
    }
}

/// Every bulwark certificate the configs name, with what it must say.
/// Kubernetes' own files a config names (etcd's client certificates) are
/// kubeadm's to issue and renew, and are left out.
fn plan(args: &IssueArgs, problems: &mut Vec<String>) -> Vec<Target> {
    let daemons: Vec<(String, Daemon)> = config_files(&args.configs, &args.dir)
        .iter()
        .filter_map(|p| read_config(p, problems).map(|d| (p.display().to_string(), d)))
        .collect();
    // A prober's O is what the LB's access.probers admits, when an LB
    // config is in the same run.
    let probers_rule = daemons.iter().find_map(|(_, d)| match d {
        Daemon::Lb(c) => c.access.probers.clone(),
        _ => None,
    });
    let mut targets = Vec::new();
    let mut push = |config: &str,
                    field: &str,
                    files: &TlsFiles,
                    orgs: Result<Vec<String>, String>,
                    spec: LeafSpec| match orgs {
        Ok(organizations) => targets.push(Target {
            config: config.to_owned(),
            field: field.to_owned(),
            file: files.cert_file.display().to_string(),
            files: files.clone(),
            spec: LeafSpec {
                organizations,
                ..spec
            },
            action: "issued",
            not_after: None,
        }),
        Err(e) => problems.push(format!("{config}: {field}: {e}")),
    };
    for (config, daemon) in &daemons {
        match daemon {
            Daemon::Lb(c) => {
                let cn = format!("bulwark-lb-{}", c.node_name());
                let mut sans = Vec::new();
                for a in [c.raft.advertised(), c.api.advertised()] {
                    add_san(&mut sans, &bulwark_common::grpc::host_of(&a));
                }
                add_san(&mut sans, &c.node_name());
                args.sans.iter().for_each(|s| add_san(&mut sans, s));
                let orgs =
                    organizations(c.access.peers.as_ref(), "access.peers", &cn, "bulwark:lb");
                push(config, "tls", &c.tls, orgs, leaf(cn, sans, true, true));
            }
            // A prober that reports nowhere has no identity to issue.
            Daemon::Prober(c) => {
                let Some(tls) = c.report.identity() else {
                    continue;
                };
                let cn = format!("bulwark-prober-{}", c.node_name);
                let orgs = organizations(
                    probers_rule.as_ref(),
                    "access.probers of the LB config",
                    &cn,
                    "bulwark:probers",
                );
                push(
                    config,
                    "report.tls",
                    tls,
                    orgs,
                    leaf(cn, Vec::new(), false, true),
                );
            }
            Daemon::Backup(c) => {
                let cn = format!("bulwark-backup-{}", c.node_name);
                let mut sans = Vec::new();
                if !c.grpc.address.ip().is_unspecified() {
                    add_san(&mut sans, &c.grpc.address.ip().to_string());
                }
                if let Some(a) = &c.restore.agent_address {
                    add_san(&mut sans, &bulwark_common::grpc::host_of(a));
                }
                add_san(&mut sans, &c.node_name);
                args.sans.iter().for_each(|s| add_san(&mut sans, s));
                let rule = c.grpc.access.peers.as_ref();
                let orgs = || organizations(rule, "grpc.access.peers", &cn, "bulwark:backup");
                push(
                    config,
                    "grpc.tls",
                    &c.grpc.tls,
                    orgs(),
                    leaf(cn.clone(), sans, true, true),
                );
                if let Some(t) = c.restore.client_tls.as_ref()
                    && t.cert_file != c.grpc.tls.cert_file
                {
                    push(
                        config,
                        "restore.clientTls",
                        t,
                        orgs(),
                        leaf(cn, Vec::new(), false, true),
                    );
                }
            }
        }
    }
    targets
}

fn leaf(common_name: String, sans: Vec<String>, server: bool, client: bool) -> LeafSpec {
    LeafSpec {
        common_name,
        organizations: Vec::new(),
        sans,
        server,
        client,
    }
}

/// The operator's certificate: `O=bulwark:operators` only, so the file
/// grants nothing in Kubernetes.
fn operator_target(name: &str, args: &IssueArgs) -> Result<Target, String> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if !valid {
        return Err(format!(
            "--operator {name:?}: use letters, digits and - _ . @ (it is the CN and the file name)"
        ));
    }
    let files = TlsFiles {
        cert_file: args.out_dir.join(format!("{name}.crt")),
        key_file: args.out_dir.join(format!("{name}.key")),
        ca_file: args.ca.ca_cert.clone(),
    };
    Ok(Target {
        config: "-".into(),
        field: "operator".into(),
        file: files.cert_file.display().to_string(),
        files,
        spec: LeafSpec {
            common_name: name.to_owned(),
            organizations: vec![BULWARK_OPERATORS.to_owned()],
            sans: Vec::new(),
            server: false,
            client: true,
        },
        action: "issued",
        not_after: None,
    })
}

/// Runs `certs issue` as of `now` (Unix seconds).
pub fn issue(args: &IssueArgs, now: i64) -> Result<Outcome, CliError> {
    let mut problems = Vec::new();
    let mut targets = match &args.operator {
        Some(name) => operator_target(name, args)
            .map_err(|e| CliError::new(Exit::Usage, e))
            .map(|t| vec![t])?,
        None => Vec::new(),
    };
    if args.operator.is_none() || !args.configs.is_empty() {
        targets.extend(plan(args, &mut problems));
    }
    if targets.is_empty() && problems.is_empty() {
        return Err(
            CliError::new(Exit::Usage, nothing_to("issue", &args.configs, &args.dir))
                .hint("name the daemon configs, pass --dir, or --operator NAME"),
        );
    }
    let ca = ClusterCa::load(&args.ca.ca_cert, &args.ca.ca_key)?;
    dedupe(&mut targets, &mut problems);
    for t in &targets {
        trusted_by_config(&ca, t, &mut problems);
        if !args.force {
            for f in [&t.files.cert_file, &t.files.key_file] {
                if f.exists() {
                    problems.push(format!(
                        "{}: {}: {} exists: pass --force to replace it, or use `certs renew` to \
                         extend it",
                        t.config,
                        t.field,
                        f.display()
                    ));
                }
            }
        }
    }
    refuse_problems(problems, "nothing was written")?;
    for t in &mut targets {
        let key = KeyPair::generate()
            .map_err(|e| CliError::new(Exit::Failure, format!("cannot generate a key: {e}")))?;
        let cert = ca.sign(&t.spec, &key, args.days, now)?;
        write_file(&t.files.key_file, &key.serialize_pem(), 0o600, args.force)?;
        write_file(&t.files.cert_file, &cert, 0o644, args.force)?;
        t.not_after = super::file_not_after(&t.files.cert_file);
    }
    Ok(Outcome {
        certificates: targets,
    })
}

/// Two fields naming the same certificate file get it once, and only if
/// they want the same certificate.
fn dedupe(targets: &mut Vec<Target>, problems: &mut Vec<String>) {
    let mut kept: Vec<Target> = Vec::new();
    for t in targets.drain(..) {
        match kept.iter().find(|k| k.files.cert_file == t.files.cert_file) {
            Some(k) if k.spec == t.spec => {}
            Some(k) => problems.push(format!(
                "{}: {} and {}: {}: both name {}, but need different certificates ({} vs {})",
                k.config,
                k.field,
                t.config,
                t.field,
                t.file,
                describe(&k.spec),
                describe(&t.spec)
            )),
            None => kept.push(t),
        }
    }
    *targets = kept;
}

fn describe(s: &LeafSpec) -> String {
    let mut d = format!("CN={}", s.common_name);
    for o in &s.organizations {
        d.push_str(&format!(",O={o}"));
    }
    d
}

/// A daemon must trust the CA its certificate comes from: its `caFile`
/// holds it (an operator's certificate has no config to check).
fn trusted_by_config(ca: &ClusterCa, t: &Target, problems: &mut Vec<String>) {
    if t.config == "-" {
        return;
    }
    match ca.is_in_bundle(&t.files.ca_file) {
        Ok(true) => {}
        Ok(false) => problems.push(format!(
            "{}: {}.caFile: {} does not hold the CA {} signs with, so the daemon and its \
             peers would refuse this certificate: point caFile at it, or pass the CA it holds \
             with --ca-cert/--ca-key",
            t.config,
            t.field,
            t.files.ca_file.display(),
            ca.cert_path().display()
        )),
        Err(e) => problems.push(format!("{}: {}.caFile: {e}", t.config, t.field)),
    }
}

fn refuse_problems(problems: Vec<String>, what: &str) -> Result<(), CliError> {
    if problems.is_empty() {
        return Ok(());
    }
    Err(CliError::new(
        Exit::Usage,
        format!(
            "{} problem(s), {what}:\n  {}",
            problems.len(),
            problems.join("\n  ")
        ),
    ))
}

/// Runs `certs renew` as of `now` (Unix seconds).
pub fn renew(args: &RenewArgs, now: i64) -> Result<Outcome, CliError> {
    let mut problems = Vec::new();
    let mut targets = Vec::new();
    if args.certs.is_empty() || !args.configs.is_empty() {
        let as_issue = IssueArgs {
            configs: args.configs.clone(),
            dir: args.dir.clone(),
            operator: None,
            out_dir: PathBuf::new(),
            sans: Vec::new(),
            days: args.days,
            force: true,
            ca: CaArgs {
                ca_cert: args.ca.ca_cert.clone(),
                ca_key: args.ca.ca_key.clone(),
            },
        };
        targets = plan(&as_issue, &mut problems);
    }
    for cert in &args.certs {
        let files = TlsFiles {
            cert_file: cert.clone(),
            key_file: cert.with_extension("key"),
            ca_file: args.ca.ca_cert.clone(),
        };
        targets.push(Target {
            config: "-".into(),
            field: "--file".into(),
            file: cert.display().to_string(),
            files,
            spec: leaf(String::new(), Vec::new(), false, false),
            action: "renewed",
            not_after: None,
        });
    }
    if targets.is_empty() && problems.is_empty() {
        return Err(
            CliError::new(Exit::Usage, nothing_to("renew", &args.configs, &args.dir))
                .hint("name the daemon configs, pass --dir, or --file CERT"),
        );
    }
    let ca = ClusterCa::load(&args.ca.ca_cert, &args.ca.ca_key)?;
    dedupe(&mut targets, &mut problems);
    let mut planned = Vec::new();
    for mut t in targets {
        trusted_by_config(&ca, &t, &mut problems);
        match current(&t.files, args.new_key) {
            Ok((spec, key, not_after)) => {
                t.spec = spec;
                let due = args
                    .within
                    .is_none_or(|d| not_after - now < i64::from(d) * 86_400);
                if !due {
                    t.action = "kept";
                    t.not_after = super::file_not_after(&t.files.cert_file);
                }
                planned.push((t, key));
            }
            Err(e) => problems.push(format!("{}: {}: {e}", t.config, t.field)),
        }
    }
    refuse_problems(problems, "nothing was renewed")?;
    let mut done = Vec::new();
    for (mut t, key) in planned {
        if t.action != "kept" {
            t.action = "renewed";
            let cert = match &key {
                Renewal::Keep(public) => ca.sign(&t.spec, public, args.days, now)?,
                Renewal::New(pair) => {
                    let cert = ca.sign(&t.spec, pair, args.days, now)?;
                    write_file(&t.files.key_file, &pair.serialize_pem(), 0o600, true)?;
                    cert
                }
            };
            write_file(&t.files.cert_file, &cert, 0o644, true)?;
            t.not_after = super::file_not_after(&t.files.cert_file);
        }
        done.push(t);
    }
    Ok(Outcome { certificates: done })
}

/// The key a renewed certificate is signed over.
enum Renewal {
    /// The current key (its public half, from the key file).
    Keep(KeyPair),
    /// A freshly generated one, written with the certificate.
    New(KeyPair),
}

/// What the current certificate says, the key to renew it with, and its
/// notAfter. Keeping the key requires the key file to be the
/// certificate's.
fn current(files: &TlsFiles, new_key: bool) -> Result<(LeafSpec, Renewal, i64), String> {
    let pem = std::fs::read(&files.cert_file).map_err(|e| {
        format!(
            "cannot read {}: {e} (`certs issue` makes a missing one)",
            files.cert_file.display()
        )
    })?;
    let der = CertificateDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: no PEM certificate: {e}", files.cert_file.display()))?;
    let (_, x509) = X509Certificate::from_der(&der)
        .map_err(|e| format!("{}: not X.509: {e}", files.cert_file.display()))?;
    let id = PeerIdentity::from_der(&der).map_err(|e| e.to_string())?;
    let (server, client) = match x509.extended_key_usage() {
        Ok(Some(eku)) => (eku.value.server_auth, eku.value.client_auth),
        _ => (true, true),
    };
    let spec = LeafSpec {
        common_name: id.common_name.unwrap_or_default(),
        organizations: id.organizations,
        sans: id
            .dns_names
            .into_iter()
            .chain(id.ip_addresses.iter().map(ToString::to_string))
            .collect(),
        server,
        client,
    };
    let key = if new_key {
        Renewal::New(KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?)
    } else {
        let key_pem = std::fs::read(&files.key_file).map_err(|e| {
            format!(
                "cannot read {}: {e} (--new-key makes a new one)",
                files.key_file.display()
            )
        })?;
        let pair = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| e.to_string())
            .and_then(|k| signing_key(&k))
            .map_err(|e| format!("{}: {e}", files.key_file.display()))?;
        if pair.der_bytes() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(format!(
                "{} is not the key of {} (their public keys differ): pass --new-key, or \
                 restore the matching key",
                files.key_file.display(),
                files.cert_file.display()
            ));
        }
        Renewal::Keep(pair)
    };
    Ok((spec, key, x509.validity().not_after.timestamp()))
}

/// Writes `contents` to `path` with `mode`. A new file is created (never
/// replacing one unless `replace`); an existing one is rewritten in place,
/// keeping its inode, so a container that bind-mounts the file sees the
/// new contents (a rename would leave it on the old inode).
fn write_file(path: &Path, contents: &str, mode: u32, replace: bool) -> Result<(), CliError> {
    let failed = |e: std::io::Error| {
        CliError::new(
            Exit::Failure,
            format!("cannot write {}: {e}", path.display()),
        )
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(failed)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(mode);
    match replace {
        true => options.create(true).truncate(true),
        false => options.create_new(true),
    };
    let mut file = options.open(path).map_err(failed)?;
    // An existing file keeps its mode otherwise; a key must end up 0600.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(failed)?;
    file.write_all(contents.as_bytes()).map_err(failed)?;
    file.sync_all().map_err(failed)
}

/// The table `issue` and `renew` print.
pub fn render(o: &Outcome) -> String {
    let rows: Vec<Vec<String>> = o
        .certificates
        .iter()
        .map(|t| {
            vec![
                t.config.clone(),
                t.field.clone(),
                t.file.clone(),
                describe(&t.spec),
                t.spec.sans.join(","),
                t.spec.usages(),
                t.not_after.clone().unwrap_or_else(|| "-".into()),
                t.action.to_owned(),
            ]
        })
        .collect();
    super::output_table(
        &[
            "CONFIG",
            "FIELD",
            "FILE",
            "SUBJECT",
            "SANS",
            "USAGES",
            "NOT AFTER",
            "ACTION",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{CheckArgs, check};

    /// A CA made the way kubeadm makes one: openssl writes a PKCS#1
    /// (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`) key, as Go does.
    fn kubeadm_ca(dir: &Path, ec: bool) -> CaArgs {
        let key = dir.join("ca.key");
        let cert = dir.join("ca.crt");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl (Debian's openssl package) runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        let key_s = key.to_str().unwrap();
        match ec {
            true => {
                let pem = run(&["ecparam", "-name", "prime256v1", "-genkey", "-noout"]);
                std::fs::write(&key, pem).unwrap();
            }
            false => {
                run(&["genrsa", "-traditional", "-out", key_s, "2048"]);
            }
        }
        let key_text = std::fs::read_to_string(&key).unwrap();
        let kind = if ec {
            "EC PRIVATE KEY"
        } else {
            "RSA PRIVATE KEY"
        };
        assert!(key_text.contains(kind), "{key_text}");
        run(&[
            "req",
            "-x509",
            "-new",
            "-key",
            key_s,
            "-subj",
            "/CN=kubernetes",
            "-days",
            "3650",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,digitalSignature,keyEncipherment",
            "-out",
            cert.to_str().unwrap(),
        ]);
        CaArgs {
            ca_cert: cert,
            ca_key: key,
        }
    }

    /// Node cp-1's three configs in `dir`, their certificates (not issued
    /// yet) under `dir/pki` and trusting `ca`.
    fn configs(dir: &Path, ca: &Path) {
        use bulwark_testkit::config as tk;
        let pki = dir.join("pki");
        let files = |name: &str| bulwark_common::tls::TlsFiles {
            cert_file: pki.join(format!("{name}.crt")),
            key_file: pki.join(format!("{name}.key")),
            ca_file: ca.to_owned(),
        };

        let mut lb = tk::lb(1);
        lb.name = Some("cp-1".into());
        lb.raft.address = "127.0.0.1:9441".parse().unwrap();
        lb.api.address = "0.0.0.0:9442".parse().unwrap();
        lb.api.advertise_address = Some("cp-1.example:9442".into());
        lb.tls = files("bulwark-lb");
        lb.access.probers = Some(tk::orgs(&["bulwark:probers"]));
        lb.access.peers = Some(tk::orgs(&["bulwark:lb"]));
        tk::write(dir.join("lb.yaml"), &lb).unwrap();

        let mut prober = tk::prober();
        prober.node_name = "cp-1".into();
        prober.tcp = vec![bulwark_prober::config::TcpTarget {
            id: "cp-1".into(),
            address: "127.0.0.1:6443".into(),
            zone: String::new(),
        }];
        prober.report.endpoints = vec!["127.0.0.1:9442".into()];
        prober.report.tls = files("prober");
        tk::write(dir.join("prober.yaml"), &prober).unwrap();

        let mut backup = tk::backup();
        backup.node_name = "cp-1".into();
        backup.store.url = "file:///tmp/x".into();
        backup.etcd.endpoints = vec!["http://127.0.0.1:2379".into()];
        backup.etcd.tls = None;
        backup.grpc.address = "127.0.0.1:9445".parse().unwrap();
        backup.grpc.tls = files("backup");
        backup.grpc.access.peers = Some(tk::orgs(&["bulwark:backup"]));
        tk::write(dir.join("backup.yaml"), &backup).unwrap();
    }

    fn issue_args(dir: &Path, ca: &CaArgs) -> IssueArgs {
        IssueArgs {
            configs: Vec::new(),
            dir: dir.to_owned(),
            operator: None,
            out_dir: dir.to_owned(),
            sans: Vec::new(),
            days: 365,
            force: false,
            ca: CaArgs {
                ca_cert: ca.ca_cert.clone(),
                ca_key: ca.ca_key.clone(),
            },
        }
    }

    fn renew_args(dir: &Path, ca: &CaArgs) -> RenewArgs {
        RenewArgs {
            configs: Vec::new(),
            dir: dir.to_owned(),
            certs: Vec::new(),
            within: None,
            new_key: false,
            days: 365,
            ca: CaArgs {
                ca_cert: ca.ca_cert.clone(),
                ca_key: ca.ca_key.clone(),
            },
        }
    }

    fn check_dir(dir: &Path) -> Vec<String> {
        let args = CheckArgs {
            dir: dir.to_owned(),
            warn_days: 30,
        };
        check(&args, crate::certs::now()).unwrap().problems
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn issued_certificates_pass_every_daemons_checks() {
        for ec in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let ca = kubeadm_ca(dir.path(), ec);
            configs(dir.path(), &ca.ca_cert);
            let out = issue(&issue_args(dir.path(), &ca), crate::certs::now()).unwrap();
            let got: Vec<(&str, String, String, String)> = out
                .certificates
                .iter()
                .map(|t| {
                    (
                        t.field.as_str(),
                        describe(&t.spec),
                        t.spec.sans.join(","),
                        t.spec.usages(),
                    )
                })
                .collect();
            let s = |x: &str| x.to_owned();
            assert_eq!(
                got,
                vec![
                    (
                        "tls",
                        s("CN=bulwark-lb-cp-1,O=bulwark:lb"),
                        s("127.0.0.1,cp-1.example,cp-1"),
                        s("serverAuth,clientAuth")
                    ),
                    (
                        "report.tls",
                        s("CN=bulwark-prober-cp-1,O=bulwark:probers"),
                        s(""),
                        s("clientAuth")
                    ),
                    (
                        "grpc.tls",
                        s("CN=bulwark-backup-cp-1,O=bulwark:backup"),
                        s("127.0.0.1,cp-1"),
                        s("serverAuth,clientAuth")
                    ),
                ],
                "ec CA: {ec}"
            );
            assert_eq!(check_dir(dir.path()), Vec::<String>::new(), "ec CA: {ec}");
            for t in &out.certificates {
                assert_eq!(mode(&t.files.key_file), 0o600, "{}", t.file);
                assert!(t.not_after.is_some(), "{t:?}");
            }
        }
    }

    /// A prober that reports nowhere never reads its report identity, so
    /// `issue` and `renew` make none (as `certs check` lists none).
    #[test]
    fn a_prober_without_report_endpoints_gets_no_certificate() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("prober.yaml"),
            "apiVersion: bulwark.dev/v1alpha1\nkind: ProberConfiguration\nnodeName: cp-1\n\
             tcp:\n- {id: t1, address: 10.0.0.1:6443}\n",
        )
        .unwrap();
        let ca = CaArgs {
            ca_cert: PathBuf::from(KUBEADM_CA_CERT),
            ca_key: PathBuf::from(KUBEADM_CA_KEY),
        };
        let mut problems = Vec::new();
        let targets = plan(&issue_args(dir.path(), &ca), &mut problems);
        assert_eq!(problems, Vec::<String>::new());
        assert!(
            targets.is_empty(),
            "{:?}",
            targets.iter().map(|t| &t.file).collect::<Vec<_>>()
        );
        let why = nothing_to("issue", &[], dir.path());
        assert!(
            why.starts_with("nothing to issue: no config read names a bulwark certificate (")
                && why.contains("prober.yaml"),
            "{why}"
        );
    }

    /// The GUIDE's certificate table is what `issue` makes of the shipped
    /// example configs.
    #[test]
    fn the_shipped_configs_get_the_guides_certificates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/cp-1");
        let ca = CaArgs {
            ca_cert: PathBuf::from(KUBEADM_CA_CERT),
            ca_key: PathBuf::from(KUBEADM_CA_KEY),
        };
        let mut problems = Vec::new();
        let targets = plan(&issue_args(&dir, &ca), &mut problems);
        assert_eq!(problems, Vec::<String>::new());
        let got: Vec<(String, String, String, String)> = targets
            .iter()
            .map(|t| {
                (
                    t.file.clone(),
                    describe(&t.spec),
                    t.spec.sans.join(","),
                    t.spec.usages(),
                )
            })
            .collect();
        let pki = "/etc/kubernetes/pki/bulwark";
        let row = |f: &str, s: &str, sans: &str, u: &str| {
            (
                format!("{pki}/{f}"),
                s.to_owned(),
                sans.to_owned(),
                u.to_owned(),
            )
        };
        assert_eq!(
            got,
            vec![
                row(
                    "bulwark-lb.crt",
                    "CN=bulwark-lb-cp-1,O=bulwark:lb",
                    "10.0.0.11,cp-1",
                    "serverAuth,clientAuth"
                ),
                row(
                    "prober.crt",
                    "CN=bulwark-prober-cp-1,O=bulwark:probers",
                    "",
                    "clientAuth"
                ),
                row(
                    "backup.crt",
                    "CN=bulwark-backup-cp-1,O=bulwark:backup",
                    "10.0.0.11,cp-1",
                    "serverAuth,clientAuth"
                ),
            ]
        );
    }

    #[test]
    fn existing_files_are_kept_unless_forced_and_nothing_is_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let ca = kubeadm_ca(dir.path(), true);
        configs(dir.path(), &ca.ca_cert);
        let mut args = issue_args(dir.path(), &ca);
        issue(&args, crate::certs::now()).unwrap();
        let lb_key = dir.path().join("pki/bulwark-lb.key");
        let before = std::fs::read(&lb_key).unwrap();
        // Only the prober's files are gone: the run still writes nothing.
        std::fs::remove_file(dir.path().join("pki/prober.crt")).unwrap();
        std::fs::remove_file(dir.path().join("pki/prober.key")).unwrap();
        let e = issue(&args, crate::certs::now()).unwrap_err();
        assert_eq!(e.exit(), Exit::Usage);
        let msg = e.to_string();
        assert!(msg.contains("bulwark-lb.key exists: pass --force"), "{msg}");
        assert!(!dir.path().join("pki/prober.crt").exists(), "{msg}");
        args.force = true;
        issue(&args, crate::certs::now()).unwrap();
        assert_ne!(std::fs::read(&lb_key).unwrap(), before);
        assert_eq!(mode(&lb_key), 0o600);
        assert_eq!(check_dir(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn a_config_that_trusts_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = kubeadm_ca(dir.path(), true);
        let other = tempfile::tempdir().unwrap();
        let other_ca = kubeadm_ca(other.path(), true);
        configs(dir.path(), &other_ca.ca_cert);
        let e = issue(&issue_args(dir.path(), &ca), crate::certs::now()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("3 problem(s), nothing was written")
                && msg.contains("tls.caFile: ")
                && msg.contains("does not hold the CA"),
            "{msg}"
        );
        assert!(!dir.path().join("pki").exists());
    }

    #[test]
    fn the_operator_certificate_is_an_operator_for_bulwark_and_nothing_for_kubernetes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = kubeadm_ca(dir.path(), false);
        let mut args = issue_args(dir.path(), &ca);
        args.operator = Some("alice".into());
        let out = issue(&args, crate::certs::now()).unwrap();
        assert_eq!(out.certificates.len(), 1, "no daemon config is read");
        let files = &out.certificates[0].files;
        assert_eq!(mode(&files.key_file), 0o600);
        let id = files.load().unwrap().identity().unwrap();
        assert_eq!(id.to_string(), "CN=alice,O=bulwark:operators");
        let policy = bulwark_common::authz::AccessPolicy::default();
        assert!(
            policy
                .check("/bulwark.lb.v1.LoadBalancer/DrainBackend", Some(id))
                .is_ok()
        );
        // No group Kubernetes binds to a role (kubeadm's admin groups,
        // system:*).
        let pem = std::fs::read_to_string(&files.cert_file).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, x509) = X509Certificate::from_der(&der).unwrap();
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);

        args.operator = Some("../alice".into());
        let e = issue(&args, crate::certs::now()).unwrap_err();
        assert!(e.to_string().contains("--operator"), "{e}");
    }

    fn spki(path: &Path) -> Vec<u8> {
        let pem = std::fs::read(path).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, x509) = X509Certificate::from_der(&der).unwrap();
        x509.public_key().raw.to_vec()
    }

    fn serial(path: &Path) -> String {
        let pem = std::fs::read(path).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, x509) = X509Certificate::from_der(&der).unwrap();
        x509.raw_serial_as_string()
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn renew_keeps_identity_key_and_inode_and_extends_the_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let ca = kubeadm_ca(dir.path(), false);
        configs(dir.path(), &ca.ca_cert);
        let mut args = issue_args(dir.path(), &ca);
        args.days = 10;
        issue(&args, crate::certs::now()).unwrap();
        let cert = dir.path().join("pki/bulwark-lb.crt");
        let key = dir.path().join("pki/bulwark-lb.key");
        let (key_before, spki_before, serial_before, inode_before) = (
            std::fs::read(&key).unwrap(),
            spki(&cert),
            serial(&cert),
            inode(&cert),
        );
        let days = |p: &Path| {
            (bulwark_common::telemetry::catalog::not_after(p, false).unwrap() - crate::certs::now())
                / 86_400
        };
        assert!((9..=10).contains(&days(&cert)), "{}", days(&cert));

        // Not yet due: kept as they are.
        let mut r = renew_args(dir.path(), &ca);
        r.within = Some(5);
        let out = renew(&r, crate::certs::now()).unwrap();
        assert!(
            out.certificates.iter().all(|t| t.action == "kept"),
            "{out:?}"
        );
        assert_eq!(serial(&cert), serial_before);

        r.within = Some(30);
        let out = renew(&r, crate::certs::now()).unwrap();
        assert!(
            out.certificates.iter().all(|t| t.action == "renewed"),
            "{out:?}"
        );
        assert!((364..=365).contains(&days(&cert)), "{}", days(&cert));
        assert_eq!(std::fs::read(&key).unwrap(), key_before);
        assert_eq!(spki(&cert), spki_before);
        assert_ne!(serial(&cert), serial_before);
        assert_eq!(inode(&cert), inode_before, "rewritten in place");
        assert_eq!(
            out.certificates[0].spec.organizations,
            vec!["bulwark:lb".to_owned()]
        );
        assert_eq!(check_dir(dir.path()), Vec::<String>::new());

        // A new key on request (and any expiry); the pair still matches.
        r.new_key = true;
        r.within = None;
        renew(&r, crate::certs::now()).unwrap();
        assert_ne!(std::fs::read(&key).unwrap(), key_before);
        assert_ne!(spki(&cert), spki_before);
        assert_eq!(mode(&key), 0o600);
        assert_eq!(check_dir(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn renew_refuses_a_key_that_is_not_the_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = kubeadm_ca(dir.path(), true);
        configs(dir.path(), &ca.ca_cert);
        issue(&issue_args(dir.path(), &ca), crate::certs::now()).unwrap();
        let pki = dir.path().join("pki");
        std::fs::copy(pki.join("prober.key"), pki.join("bulwark-lb.key")).unwrap();
        let before = std::fs::read(pki.join("bulwark-lb.crt")).unwrap();
        let e = renew(&renew_args(dir.path(), &ca), crate::certs::now()).unwrap_err();
        assert!(
            e.to_string().contains("bulwark-lb.key is not the key of")
                && e.to_string().contains("--new-key"),
            "{e}"
        );
        assert_eq!(std::fs::read(pki.join("bulwark-lb.crt")).unwrap(), before);

        // An operator's file, renewed by name.
        let mut args = issue_args(dir.path(), &ca);
        args.operator = Some("alice".into());
        issue(&args, crate::certs::now()).unwrap();
        let mut r = renew_args(dir.path(), &ca);
        r.certs = vec![dir.path().join("alice.crt")];
        let out = renew(&r, crate::certs::now()).unwrap();
        assert_eq!(out.certificates.len(), 1);
        assert_eq!(
            describe(&out.certificates[0].spec),
            "CN=alice,O=bulwark:operators"
        );
    }
}
