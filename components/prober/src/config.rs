//! `kind: ProberConfiguration`: what to probe, how often, and where to
//! report.
//!
//! ```yaml
//! apiVersion: bulwark.dev/v1alpha1
//! kind: ProberConfiguration
//! nodeName: cp-1
//! zone: zone-a
//! probing: { interval: 200ms, fastInterval: 100ms, timeout: 300ms, fall: 2, rise: 2 }
//! apiservers:
//!   targets:
//!   - { id: cp-1, address: 10.0.0.1:6443, zone: zone-a }
//! etcd:
//!   members:
//!   - { name: cp-1, address: 10.0.0.1:2379 }
//! report:
//!   endpoints: [10.0.0.1:9443, 10.0.0.2:9443, 10.0.0.3:9443]
//! ```
//!
//! TLS paths default to kubeadm's layout: the cluster CA for apiservers,
//! etcd's CA and `healthcheck-client` certificate (made by kubeadm for
//! exactly this) for etcd, and bulwark's own prober certificate for the
//! report stream. docs/HEALTH.md explains the timing defaults.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark_common::admin::AdminConfig;
use bulwark_common::config::{ComponentConfig, Validate, Validator};
use bulwark_common::telemetry::LoggingConfig;
use bulwark_common::tls::{CertFiles, CertUse, KUBEADM_CA_CERT, KUBEADM_ETCD_CA_CERT, TlsFiles};
use serde::{Deserialize, Serialize};

/// kubeadm's client certificate for etcd health checks.
pub const KUBEADM_ETCD_HEALTHCHECK_CERT: &str = "/etc/kubernetes/pki/etcd/healthcheck-client.crt";
/// Key of [`KUBEADM_ETCD_HEALTHCHECK_CERT`].
pub const KUBEADM_ETCD_HEALTHCHECK_KEY: &str = "/etc/kubernetes/pki/etcd/healthcheck-client.key";

/// The whole prober configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProberConfig {
    /// This prober's node name, unique among probers. Default: the host
    /// name (what the kubelet uses as node name by default).
    #[serde(default = "default_node_name")]
    pub node_name: String,
    /// The zone this prober probes from (topology.kubernetes.io/zone).
    /// Empty when zones are not used.
    #[serde(default)]
    pub zone: String,
    /// The admin HTTP server (`/livez`, `/readyz`, `/metrics`, `/debug/workers`).
    #[serde(default = "default_admin")]
    pub admin: AdminConfig,
    /// Logs.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Timing of every check.
    #[serde(default)]
    pub probing: ProbingConfig,
    /// kube-apiserver replicas: `/readyz` and `/livez`, each its own check.
    #[serde(default)]
    pub apiservers: ApiserverTargets,
    /// etcd members: `/health` on the client URL.
    #[serde(default)]
    pub etcd: EtcdTargets,
    /// Plain TCP connects, for anything without a health endpoint. A TCP
    /// target with the id of an apiserver adds a third vote on it.
    #[serde(default)]
    pub tcp: Vec<TcpTarget>,
    /// Where observations go.
    #[serde(default)]
    pub report: ReportConfig,
}

impl ProberConfig {
    /// Every TLS identity this prober uses, with the field naming it:
    /// what the expiry metric and `bulwarkctl certs check` read. A group
    /// with nothing to dial (no report endpoints, no apiserver targets,
    /// no etcd members) uses none: its default kubeadm paths are not
    /// read, so they are not listed either.
    pub fn certificates(&self) -> Vec<(&'static str, CertFiles)> {
        let mut files = Vec::new();
        if let Some(tls) = self.report.identity() {
            files.push(("report.tls", tls.into()));
        }
        if !self.apiservers.targets.is_empty() {
            files.push(("apiservers.tls", (&self.apiservers.tls).into()));
        }
        if !self.etcd.members.is_empty() {
            files.push(("etcd.tls", (&self.etcd.tls).into()));
        }
        files
    }
}

impl ComponentConfig for ProberConfig {
    const KIND: &'static str = "ProberConfiguration";

    /// The report certificate dials the LB: it needs clientAuth and a key
    /// that is its own. (Whether the LB's `access.probers` admits it is in
    /// the LB's config; its CA is the LB's, not necessarily `caFile`.)
    fn preflight(&self, v: &mut Validator) {
        // A file validation found unreadable is not reported again (the
        // loader drops a second error for the same field).
        let Some(tls) = self.report.identity() else {
            return;
        };
        let want = CertUse {
            client: true,
            ..CertUse::default()
        };
        v.at("report.tls", |v| tls.check(&want, v));
    }
}

fn default_node_name() -> String {
    hostname().unwrap_or_default()
}

/// The kernel's host name, as the kubelet reads it.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
}

fn default_admin() -> AdminConfig {
    AdminConfig::on_all_addresses(9443)
}

/// Timing of every check (HAProxy's inter/fastinter/fall/rise).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbingConfig {
    /// Time between probes of a check whose state is settled.
    #[serde(
        default = "default_interval",
        with = "bulwark_common::config::duration"
    )]
    pub interval: Duration,
    /// Time between probes while a check is in transition (a result
    /// contradicts its state, or it has none yet), so a change is confirmed
    /// quickly.
    #[serde(
        default = "default_fast_interval",
        with = "bulwark_common::config::duration"
    )]
    pub fast_interval: Duration,
    /// A probe without a complete answer after this long fails as timeout.
    #[serde(default = "default_timeout", with = "bulwark_common::config::duration")]
    pub timeout: Duration,
    /// Consecutive failures that turn a check down.
    #[serde(default = "default_threshold")]
    pub fall: u32,
    /// Consecutive successes that turn a check up.
    #[serde(default = "default_threshold")]
    pub rise: u32,
    /// Keep HTTPS connections open between probes (a failed probe on a
    /// kept connection is retried at once on a fresh one). Off by default:
    /// a fresh TCP and TLS connection per probe is what a new client of the
    /// apiserver experiences (accept queue, handshake, certificate), and it
    /// notices a closed listener that a kept connection would hide.
    #[serde(default)]
    pub reuse_connections: bool,
}

fn default_interval() -> Duration {
    Duration::from_millis(200)
}
fn default_fast_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_timeout() -> Duration {
    Duration::from_millis(300)
}
fn default_threshold() -> u32 {
    2
}

impl Default for ProbingConfig {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            fast_interval: default_fast_interval(),
            timeout: default_timeout(),
            fall: default_threshold(),
            rise: default_threshold(),
            reuse_connections: false,
        }
    }
}

impl Validate for ProbingConfig {
    fn validate(&self, v: &mut Validator) {
        v.duration_in(
            "interval",
            self.interval,
            Duration::from_millis(20),
            Duration::from_secs(60),
        );
        v.duration_in(
            "fastInterval",
            self.fast_interval,
            Duration::from_millis(10),
            self.interval.max(Duration::from_millis(10)),
        );
        v.duration_in(
            "timeout",
            self.timeout,
            Duration::from_millis(10),
            Duration::from_secs(60),
        );
        for (field, n) in [("fall", self.fall), ("rise", self.rise)] {
            v.check(
                (1..=100).contains(&n),
                field,
                format!("{n} is out of range: expected 1 to 100"),
            );
        }
    }
}

/// TLS for probing HTTPS targets: the CA that signs their serving
/// certificates, and an optional client certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeTls {
    /// PEM bundle of CAs trusted for the targets' serving certificates.
    pub ca_file: PathBuf,
    /// Client certificate (PEM), when the target requires or accepts one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Key of `certFile`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl From<&ProbeTls> for CertFiles {
    fn from(tls: &ProbeTls) -> Self {
        Self {
            cert: tls.cert_file.clone(),
            ca: tls.ca_file.clone(),
        }
    }
}

impl Validate for ProbeTls {
    fn validate(&self, v: &mut Validator) {
        ca_readable(v, "caFile", &self.ca_file);
        match (&self.cert_file, &self.key_file) {
            (Some(_), Some(_)) if !v.reads_files() => {}
            (Some(cert), Some(key)) => {
                if let Err(e) = bulwark_common::tls::load_certs(cert, "client certificate") {
                    v.at("certFile", |v| v.error(e.to_string()));
                }
                if let Err(e) = bulwark_common::tls::load_key(key) {
                    v.at("keyFile", |v| v.error(e.to_string()));
                }
            }
            (Some(_), None) => v.at("keyFile", |v| v.error("required when certFile is set")),
            (None, Some(_)) => v.at("certFile", |v| v.error("required when keyFile is set")),
            (None, None) => {}
        }
    }
}

fn ca_readable(v: &mut Validator, field: &str, path: &Path) {
    if !v.reads_files() {
        return;
    }
    if let Err(e) = bulwark_common::tls::load_certs(path, "CA bundle") {
        v.at(field, |v| v.error(e.to_string()));
    }
}

/// The apiservers to probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiserverTargets {
    /// TLS toward the apiservers. Default: trust kubeadm's cluster CA, no
    /// client certificate (`/readyz` and `/livez` are open to anonymous
    /// clients by default).
    #[serde(default = "default_apiserver_tls")]
    pub tls: ProbeTls,
    /// The replicas.
    #[serde(default)]
    pub targets: Vec<ApiserverTarget>,
}

fn default_apiserver_tls() -> ProbeTls {
    ProbeTls {
        ca_file: PathBuf::from(KUBEADM_CA_CERT),
        cert_file: None,
        key_file: None,
    }
}

impl Default for ApiserverTargets {
    fn default() -> Self {
        Self {
            tls: default_apiserver_tls(),
            targets: Vec::new(),
        }
    }
}

/// One kube-apiserver replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiserverTarget {
    /// Its id: the LB backend id it votes on (normally the node name).
    pub id: String,
    /// host:port of its secure port.
    pub address: String,
    /// The zone the replica runs in (for metrics and logs; the LB knows
    /// backends' zones from its registry).
    #[serde(default)]
    pub zone: String,
    /// Name to verify its certificate against. Default: the host part of
    /// `address` (kubeadm puts node IPs in the apiserver's SANs).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// The etcd members to probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdTargets {
    /// TLS toward etcd. Default: kubeadm's etcd CA and its
    /// `healthcheck-client` certificate.
    #[serde(default = "default_etcd_tls")]
    pub tls: ProbeTls,
    /// The members.
    #[serde(default)]
    pub members: Vec<EtcdMember>,
}

fn default_etcd_tls() -> ProbeTls {
    ProbeTls {
        ca_file: PathBuf::from(KUBEADM_ETCD_CA_CERT),
        cert_file: Some(PathBuf::from(KUBEADM_ETCD_HEALTHCHECK_CERT)),
        key_file: Some(PathBuf::from(KUBEADM_ETCD_HEALTHCHECK_KEY)),
    }
}

impl Default for EtcdTargets {
    fn default() -> Self {
        Self {
            tls: default_etcd_tls(),
            members: Vec::new(),
        }
    }
}

/// One etcd member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdMember {
    /// The member's name.
    pub name: String,
    /// host:port of its client URL.
    pub address: String,
    /// Name to verify its certificate against. Default: the host part of
    /// `address`.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// A plain TCP connect target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpTarget {
    /// Its id (an LB backend id to vote on it).
    pub id: String,
    /// host:port.
    pub address: String,
    /// The zone it runs in (metrics and logs).
    #[serde(default)]
    pub zone: String,
}

/// Where and how observations are reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReportConfig {
    /// API addresses (host:port) of the LB nodes. The prober finds the
    /// leader among them and follows its hints. Empty: report nothing
    /// (probe only, for the metrics).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The prober's mTLS identity toward the LB (its certificate must match
    /// the LB's `probers` rule). Default: kubeadm layout,
    /// `/etc/kubernetes/pki/bulwark/prober.{crt,key}` and the cluster CA.
    #[serde(default = "default_report_tls")]
    pub tls: TlsFiles,
    /// Name to verify LB certificates against. Default: each endpoint's
    /// host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// First wait before reconnecting after a failure; doubles up to
    /// `maxBackoff`.
    #[serde(
        default = "default_initial_backoff",
        with = "bulwark_common::config::duration"
    )]
    pub initial_backoff: Duration,
    /// Longest wait between reconnects.
    #[serde(
        default = "default_max_backoff",
        with = "bulwark_common::config::duration"
    )]
    pub max_backoff: Duration,
}

impl ReportConfig {
    /// The identity the prober reports with: `None` when it reports
    /// nowhere (no endpoints), and then its files are never read, checked,
    /// issued or watched for expiry.
    pub fn identity(&self) -> Option<&TlsFiles> {
        (!self.endpoints.is_empty()).then_some(&self.tls)
    }
}

fn default_report_tls() -> TlsFiles {
    TlsFiles::kubeadm_default("prober")
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(3)
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            tls: default_report_tls(),
            server_name: None,
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

impl Validate for ReportConfig {
    fn validate(&self, v: &mut Validator) {
        let mut seen = HashMap::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            v.at(format!("endpoints[{i}]"), |v| {
                check_address(v, e);
                if let Some(first) = seen.insert(e.as_str(), i) {
                    v.error(format!("duplicate of endpoints[{first}]"));
                }
            });
        }
        if let Some(tls) = self.identity() {
            v.nested("tls", tls);
        }
        v.duration_in(
            "initialBackoff",
            self.initial_backoff,
            Duration::from_millis(10),
            Duration::from_secs(60),
        );
        v.duration_in(
            "maxBackoff",
            self.max_backoff,
            self.initial_backoff,
            Duration::from_secs(600),
        );
    }
}

/// Splits `host:port` (`[v6]:port` for IPv6) and checks both parts.
pub(crate) fn split_address(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{address:?} has no port: expected host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{address:?} has no host: expected host:port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host.to_owned(), p)),
        _ => Err(format!(
            "{address:?} has an invalid port {port:?}: expected 1-65535"
        )),
    }
}

fn check_address(v: &mut Validator, address: &str) {
    if let Err(e) = split_address(address) {
        v.error(e);
    }
}

fn check_server_name(v: &mut Validator, name: Option<&str>) {
    if let Some(name) = name
        && rustls_pki_types::ServerName::try_from(name).is_err()
    {
        v.at("serverName", |v| {
            v.error(format!("{name:?} is not a valid DNS name or IP address"));
        });
    }
}

/// Records duplicate ids and addresses within one target list.
struct Uniq<'a> {
    ids: HashMap<&'a str, usize>,
    addresses: HashMap<&'a str, usize>,
    list: &'static str,
}

impl<'a> Uniq<'a> {
    fn new(list: &'static str) -> Self {
        Self {
            ids: HashMap::new(),
            addresses: HashMap::new(),
            list,
        }
    }

    fn check(
        &mut self,
        v: &mut Validator,
        i: usize,
        id_field: &str,
        id: &'a str,
        address: &'a str,
    ) {
        if id.trim().is_empty() {
            v.at(id_field, |v| v.error("must not be empty"));
        } else if let Some(first) = self.ids.insert(id, i) {
            let list = self.list;
            v.at(id_field, |v| {
                v.error(format!("duplicate {id:?} (also {list}[{first}])"));
            });
        }
        if let Some(first) = self.addresses.insert(address, i) {
            let list = self.list;
            v.at("address", |v| {
                v.error(format!("duplicate {address:?} (also {list}[{first}])"));
            });
        }
    }
}

impl Validate for ProberConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            !self.node_name.trim().is_empty(),
            "nodeName",
            "must not be empty (the host name could not be read: set it)",
        );
        v.check(
            !self.node_name.contains(char::is_whitespace),
            "nodeName",
            "must not contain whitespace",
        );
        v.nested("logging", &self.logging);
        v.nested("probing", &self.probing);

        let apiservers = &self.apiservers;
        v.at("apiservers", |v| {
            if !apiservers.targets.is_empty() {
                v.nested("tls", &apiservers.tls);
            }
            let mut uniq = Uniq::new("targets");
            for (i, t) in apiservers.targets.iter().enumerate() {
                v.at(format!("targets[{i}]"), |v| {
                    uniq.check(v, i, "id", &t.id, &t.address);
                    v.at("address", |v| check_address(v, &t.address));
                    check_server_name(v, t.server_name.as_deref());
                });
            }
        });

        let etcd = &self.etcd;
        v.at("etcd", |v| {
            if !etcd.members.is_empty() {
                v.nested("tls", &etcd.tls);
            }
            let mut uniq = Uniq::new("members");
            for (i, m) in etcd.members.iter().enumerate() {
                v.at(format!("members[{i}]"), |v| {
                    uniq.check(v, i, "name", &m.name, &m.address);
                    v.at("address", |v| check_address(v, &m.address));
                    check_server_name(v, m.server_name.as_deref());
                });
            }
        });

        let mut uniq = Uniq::new("tcp");
        for (i, t) in self.tcp.iter().enumerate() {
            v.at(format!("tcp[{i}]"), |v| {
                uniq.check(v, i, "id", &t.id, &t.address);
                v.at("address", |v| check_address(v, &t.address));
            });
        }

        if self.apiservers.targets.is_empty() && self.etcd.members.is_empty() && self.tcp.is_empty()
        {
            v.error("nothing to probe: list apiservers.targets, etcd.members or tcp");
        }
        v.nested("report", &self.report);
    }
}

#[cfg(test)]
mod tests {
    use bulwark_common::config::{ConfigError, Overrides, from_str_with};

    use super::*;

    /// A CA file that parses, in a temp dir.
    fn pem_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, cert.pem()).unwrap();
        (dir, ca)
    }

    fn parse(body: &str) -> Result<ProberConfig, ConfigError> {
        from_str_with(
            Some(&format!(
                "apiVersion: bulwark.dev/v1alpha1\nkind: ProberConfiguration\nnodeName: cp-1\n{body}"
            )),
            None,
            &Overrides::new(),
        )
    }

    fn errors(body: &str) -> Vec<String> {
        parse(body).unwrap_err().messages()
    }

    fn certificates_of(body: &str) -> Vec<(&'static str, CertFiles)> {
        let text = format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: ProberConfiguration\nnodeName: cp-1\n{body}"
        );
        bulwark_common::config::check_offline::<ProberConfig>(&text)
            .unwrap()
            .config
            .certificates()
    }

    /// The expiry metric and `bulwarkctl certs check` list what the
    /// prober dials with, and only that: a tcp-only prober that reports
    /// nowhere has no certificate to watch (its default kubeadm paths
    /// used to be read and warned about at start).
    #[test]
    fn certificates_are_those_of_the_groups_in_use() {
        assert_eq!(
            certificates_of("tcp:\n- {id: t1, address: 10.0.0.1:6443}\n"),
            []
        );

        let all = certificates_of(
            "apiservers:\n  targets:\n  - {id: cp-1, address: 10.0.0.1:6443}\n\
             etcd:\n  members:\n  - {name: cp-1, address: 10.0.0.1:2379}\n\
             report:\n  endpoints: ['10.0.0.1:9442']\n",
        );
        let kubeadm = |cert: Option<&str>, ca: &str| CertFiles {
            cert: cert.map(PathBuf::from),
            ca: PathBuf::from(ca),
        };
        assert_eq!(
            all,
            [
                (
                    "report.tls",
                    kubeadm(
                        Some("/etc/kubernetes/pki/bulwark/prober.crt"),
                        KUBEADM_CA_CERT
                    )
                ),
                ("apiservers.tls", kubeadm(None, KUBEADM_CA_CERT)),
                (
                    "etcd.tls",
                    kubeadm(Some(KUBEADM_ETCD_HEALTHCHECK_CERT), KUBEADM_ETCD_CA_CERT)
                ),
            ]
        );
    }

    /// A report certificate made for serving only, with another
    /// certificate's key, is refused before the prober starts.
    #[test]
    fn preflight_checks_the_report_certificate() {
        let pki = bulwark_testkit::Pki::new().unwrap();
        let server = pki.server("prober", &["10.0.0.1"]).unwrap().tls_files();
        let other = pki
            .client("other", &["bulwark:probers"])
            .unwrap()
            .tls_files();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prober.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: bulwark.dev/v1alpha1\nkind: ProberConfiguration\nnodeName: cp-1\n\
                 tcp:\n- {{id: t1, address: 10.0.0.1:6443}}\n\
                 report:\n  endpoints: ['10.0.0.1:9442']\n  tls: {{certFile: {}, keyFile: {}, caFile: {}}}\n",
                server.cert_file.display(),
                other.key_file.display(),
                server.ca_file.display()
            ),
        )
        .unwrap();
        let err =
            bulwark_common::config::load_checked::<ProberConfig>(Some(&file), &Overrides::new())
                .unwrap_err();
        let e = err.messages();
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(
            e[0].starts_with("report.tls.keyFile: ")
                && e[0].contains("is not the key of the certificate"),
            "{e:#?}"
        );
        assert!(
            e[1].starts_with("report.tls.certFile: ") && e[1].contains("lacks the clientAuth"),
            "{e:#?}"
        );

        // A readable file that holds no certificate is named by its field.
        let garbage = dir.path().join("garbage.crt");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let text = std::fs::read_to_string(&file).unwrap().replace(
            &server.cert_file.display().to_string(),
            &garbage.display().to_string(),
        );
        std::fs::write(&file, text).unwrap();
        let err =
            bulwark_common::config::load_checked::<ProberConfig>(Some(&file), &Overrides::new())
                .unwrap_err();
        let e = err.messages();
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].starts_with("report.tls.certFile: "), "{e:#?}");
    }

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let (_dir, ca) = pem_dir();
        let c = parse(&format!(
            "apiservers:\n  tls: {{caFile: {}}}\n  targets:\n  - {{id: cp-1, address: 10.0.0.1:6443}}\n",
            ca.display()
        ))
        .unwrap();
        assert_eq!(c.probing, ProbingConfig::default());
        assert_eq!(c.probing.interval, Duration::from_millis(200));
        assert_eq!(c.probing.fast_interval, Duration::from_millis(100));
        assert_eq!(c.probing.timeout, Duration::from_millis(300));
        assert_eq!((c.probing.fall, c.probing.rise), (2, 2));
        assert!(!c.probing.reuse_connections);
        assert_eq!(c.admin.address.to_string(), "0.0.0.0:9443");
        assert!(c.report.endpoints.is_empty());
        assert_eq!(
            c.etcd.tls.cert_file.as_deref(),
            Some(Path::new(KUBEADM_ETCD_HEALTHCHECK_CERT))
        );
    }

    #[test]
    fn duplicates_unknown_fields_and_missing_files_name_the_field() {
        let (_dir, ca) = pem_dir();
        let ca = ca.display();
        let errs = errors(&format!(
            "apiservers:\n  tls: {{caFile: {ca}}}\n  targets:\n  - {{id: a, address: 10.0.0.1:6443}}\n  - {{id: a, address: 10.0.0.1:6443}}\n"
        ));
        assert_eq!(
            errs,
            vec![
                "apiservers.targets[1].id: duplicate \"a\" (also targets[0])",
                "apiservers.targets[1].address: duplicate \"10.0.0.1:6443\" (also targets[0])",
            ]
        );

        let errs =
            errors("apiservers:\n  targets:\n  - {id: a, address: 10.0.0.1:6443, zome: x}\n");
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("apiservers.targets[0].zome: unknown field"),
            "{errs:?}"
        );

        let errs = errors(
            "apiservers:\n  tls: {caFile: /nonexistent/ca.crt}\n  targets:\n  - {id: a, address: 10.0.0.1:6443}\n",
        );
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("apiservers.tls.caFile: cannot read CA bundle /nonexistent/ca.crt"),
            "{errs:?}"
        );

        let errs = errors(&format!(
            "etcd:\n  tls: {{caFile: {ca}, certFile: /nonexistent/c.crt}}\n  members:\n  - {{name: e, address: 10.0.0.1:2379}}\n"
        ));
        assert_eq!(
            errs,
            vec!["etcd.tls.keyFile: required when certFile is set"]
        );
    }

    #[test]
    fn bad_values_are_reported_together() {
        let errs = errors(
            "probing: {interval: 100ms, fastInterval: 150ms, fall: 0}\n\
             tcp:\n- {id: '', address: 'nohost'}\n- {id: x, address: 'h:0'}\n\
             report:\n  endpoints: ['lb:9443', 'lb:9443']\n  tls: {certFile: /n/c, keyFile: /n/k, caFile: /n/ca}\n",
        );
        let expected_prefixes = [
            "probing.fastInterval: 150ms is out of range",
            "probing.fall: 0 is out of range",
            "tcp[0].id: must not be empty",
            "tcp[0].address: \"nohost\" has no port",
            "tcp[1].address: \"h:0\" has an invalid port",
            "report.endpoints[1]: duplicate of endpoints[0]",
            "report.tls.certFile: cannot read /n/c",
            "report.tls.keyFile: cannot read /n/k",
            "report.tls.caFile: cannot read /n/ca",
        ];
        assert_eq!(errs.len(), expected_prefixes.len(), "{errs:#?}");
        for (e, p) in errs.iter().zip(expected_prefixes) {
            assert!(e.starts_with(p), "{e:?} should start with {p:?}");
        }
    }

    #[test]
    fn an_empty_target_list_is_refused() {
        assert_eq!(
            errors(""),
            vec!["nothing to probe: list apiservers.targets, etcd.members or tcp"]
        );
    }

    #[test]
    fn addresses_split_with_ipv6() {
        assert_eq!(split_address("[::1]:6443"), Ok(("::1".into(), 6443)));
        assert_eq!(
            split_address("cp-1.example:6443"),
            Ok(("cp-1.example".into(), 6443))
        );
        assert!(split_address(":6443").is_err());
        assert!(split_address("h:x").is_err());
    }

    /// `admin`, `probing.tls` and the list entries have required fields (an
    /// error names them); every other section has a default for each field.
    #[test]
    fn every_section_merges_with_its_defaults() {
        bulwark_common::assert_sections_merge!(
            "logging" => LoggingConfig,
            "probing" => ProbingConfig,
            "apiservers" => ApiserverTargets,
            "etcd" => EtcdTargets,
            "report" => ReportConfig,
        );
    }
}
