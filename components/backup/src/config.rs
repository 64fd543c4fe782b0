//! `BackupConfiguration`: the YAML file (`apiVersion: bulwark.dev/v1alpha1`)
//! plus flags, validated with errors that name the field.
//!
//! Every field has a default that suits a kubeadm control-plane node, so a
//! minimal file only names the store. `docs/BACKUP.md` lists the schema.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bulwark_common::admin::AdminConfig;
use bulwark_common::authz::AccessPolicy;
use bulwark_common::config::{ComponentConfig, Validate, Validator, duration};
use bulwark_common::telemetry::LoggingConfig;
use bulwark_common::tls::{
    CertFiles, CertUse, KUBEADM_APISERVER_ETCD_CLIENT_CERT, KUBEADM_APISERVER_ETCD_CLIENT_KEY,
    KUBEADM_ETCD_CA_CERT, TlsFiles,
};
use serde::{Deserialize, Deserializer, Serialize};

use crate::schedule::ticks::Schedule;
use crate::snapshot::retention::RetentionPolicy;

/// The whole configuration of one bulwark-backup instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupConfig {
    /// This instance's name in status, manifests and the election (default:
    /// the host name).
    #[serde(default = "default_node_name")]
    pub node_name: String,
    /// Directory name of this cluster's backups in the store; stable across
    /// restores (etcd's cluster id is not).
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    /// Admin HTTP server (`/livez`, `/readyz`, `/metrics`, `/debug/workers`).
    #[serde(default = "default_admin")]
    pub admin: AdminConfig,
    /// Logs.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// The gRPC server (mTLS) behind `bulwarkctl backup`.
    #[serde(default)]
    pub grpc: GrpcConfig,
    /// How to reach etcd.
    #[serde(default)]
    pub etcd: EtcdConfig,
    /// Where backups go.
    #[serde(default)]
    pub store: StoreConfig,
    /// zstd settings.
    #[serde(default)]
    pub compression: CompressionConfig,
    /// Client-side encryption; absent: none.
    #[serde(default)]
    pub encryption: EncryptionConfig,
    /// Scheduled snapshots and the leader election.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// What to keep.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Verification and scheduled restore drills.
    #[serde(default)]
    pub drill: DrillConfig,
    /// Continuous deltas recorded by the leader after each full snapshot.
    #[serde(default)]
    pub deltas: DeltaConfig,
    /// This node's etcd member and the restore agents of every
    /// control-plane node, for whole-cluster restore.
    #[serde(default)]
    pub restore: RestoreConfig,
    /// How long SIGTERM waits for in-flight work before exiting.
    #[serde(default = "default_grace", with = "duration")]
    pub shutdown_grace_period: Duration,
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "bulwark-backup".into())
}

fn default_cluster_name() -> String {
    "kubernetes".into()
}

fn default_admin() -> AdminConfig {
    AdminConfig::on_all_addresses(9446)
}

fn default_grace() -> Duration {
    Duration::from_secs(30)
}

impl BackupConfig {
    /// Every TLS identity this instance uses, with the field naming it:
    /// what the expiry metric and `bulwarkctl certs check` read.
    pub fn certificates(&self) -> Vec<(&'static str, CertFiles)> {
        let mut files = vec![("grpc.tls", (&self.grpc.tls).into())];
        files.extend(
            self.restore
                .client_tls
                .as_ref()
                .map(|t| ("restore.clientTls", t.into())),
        );
        files.extend(self.etcd.tls.as_ref().map(|t| ("etcd.tls", t.into())));
        files
    }
}

impl ComponentConfig for BackupConfig {
    const KIND: &'static str = "BackupConfiguration";

    /// Reads the certificates: the serving one (serverAuth, the addresses
    /// clients and restore agents dial), the one restore agents call each
    /// other with (clientAuth, an identity `grpc.access.peers` admits, the
    /// shared CA), and etcd's client certificate (clientAuth).
    fn preflight(&self, v: &mut Validator) {
        let mut hosts = Vec::new();
        if !self.grpc.address.ip().is_unspecified() {
            hosts.push(("grpc.address", self.grpc.address.ip().to_string()));
        }
        if let Some(a) = &self.restore.agent_address {
            hosts.push(("restore.agentAddress", bulwark_common::grpc::host_of(a)));
        }
        let calls_agents = !self.restore.peers.is_empty();
        let agent_identity = calls_agents
            .then(|| {
                self.grpc
                    .access
                    .peers
                    .as_ref()
                    .map(|p| ("grpc.access.peers", p))
            })
            .flatten();
        let serving = CertUse {
            server: true,
            client: calls_agents && self.restore.client_tls.is_none(),
            hosts,
            identity: agent_identity.filter(|_| self.restore.client_tls.is_none()),
            same_ca: true,
        };
        v.at("grpc.tls", |v| self.grpc.tls.check(&serving, v));
        if let Some(tls) = &self.restore.client_tls {
            let client = CertUse {
                client: true,
                identity: agent_identity,
                same_ca: true,
                ..CertUse::default()
            };
            v.at("restore.clientTls", |v| tls.check(&client, v));
        }
        if let Some(tls) = &self.etcd.tls {
            let client = CertUse {
                client: true,
                ..CertUse::default()
            };
            v.at("etcd.tls", |v| tls.check(&client, v));
        }
    }
}

/// `grpc:`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcConfig {
    /// Listen address.
    #[serde(default = "default_grpc_address")]
    pub address: SocketAddr,
    /// Serving certificate, key and the CA clients must present certificates from.
    #[serde(default = "default_grpc_tls")]
    pub tls: TlsFiles,
    /// Who may call what.
    #[serde(default)]
    pub access: AccessPolicy,
}

fn default_grpc_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9445))
}

fn default_grpc_tls() -> TlsFiles {
    TlsFiles::kubeadm_default("backup")
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            address: default_grpc_address(),
            tls: default_grpc_tls(),
            access: AccessPolicy::default(),
        }
    }
}

pub use crate::etcd::MemberChoice;

/// `etcd:`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the members.
    #[serde(default = "default_endpoints")]
    pub endpoints: Vec<String>,
    /// Client certificate, key and etcd's CA; `null` for plain HTTP.
    #[serde(default = "default_etcd_tls")]
    pub tls: Option<TlsFiles>,
    /// Connection timeout per endpoint.
    #[serde(default = "default_dial_timeout", with = "duration")]
    pub dial_timeout: Duration,
    /// Timeout of short requests (status, counts, election calls).
    #[serde(default = "default_request_timeout", with = "duration")]
    pub request_timeout: Duration,
    /// Longest pause between two chunks of a snapshot stream before the
    /// backup is abandoned as stalled.
    #[serde(default = "default_stall_timeout", with = "duration")]
    pub stall_timeout: Duration,
    /// Which member to snapshot.
    #[serde(default)]
    pub snapshot_from: MemberChoice,
}

fn default_endpoints() -> Vec<String> {
    vec!["https://127.0.0.1:2379".into()]
}

fn default_etcd_tls() -> Option<TlsFiles> {
    Some(TlsFiles {
        cert_file: KUBEADM_APISERVER_ETCD_CLIENT_CERT.into(),
        key_file: KUBEADM_APISERVER_ETCD_CLIENT_KEY.into(),
        ca_file: KUBEADM_ETCD_CA_CERT.into(),
    })
}

fn default_dial_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(15)
}

fn default_stall_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: default_endpoints(),
            tls: default_etcd_tls(),
            dial_timeout: default_dial_timeout(),
            request_timeout: default_request_timeout(),
            stall_timeout: default_stall_timeout(),
            snapshot_from: MemberChoice::default(),
        }
    }
}

/// A byte size written as a number or with a unit: `8MiB`, `5MB`, `1048576`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }

    /// Parses `8MiB`, `8 MiB`, `5MB`, `64KiB`, `1GiB` or a plain number.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected e.g. \"8MiB\" or 8388608"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {s:?}: expected B, KiB, MiB, GiB, KB, MB or GB"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// `store:`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct StoreConfig {
    /// `file:///path`, `s3://bucket/prefix`, `gs://bucket/prefix` or
    /// `az://container/prefix`.
    #[serde(default = "default_store_url")]
    pub url: String,
    /// object_store options for the URL's scheme (e.g. `aws_endpoint`,
    /// `aws_region`, `aws_virtual_hosted_style_request: "false"`,
    /// `aws_allow_http: "true"`); credentials are better left to the
    /// environment (`AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`,
    /// `AZURE_STORAGE_ACCOUNT_KEY`, …), which is read too.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Multipart part size (S3 requires at least 5 MiB except the last).
    #[serde(default = "default_part_size")]
    pub part_size: ByteSize,
    /// Parts uploaded at once. Memory in flight is about
    /// `partSize × (uploadConcurrency + 1)`.
    #[serde(default = "default_upload_concurrency")]
    pub upload_concurrency: usize,
}

fn default_store_url() -> String {
    "file:///var/lib/bulwark/backups".into()
}

fn default_part_size() -> ByteSize {
    ByteSize::mib(8)
}

fn default_upload_concurrency() -> usize {
    2
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: default_store_url(),
            options: BTreeMap::new(),
            part_size: default_part_size(),
            upload_concurrency: default_upload_concurrency(),
        }
    }
}

/// `compression:`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct CompressionConfig {
    /// zstd level, 1–19 (higher: smaller and slower; above 19 needs more
    /// memory than the 64 MiB budget allows).
    #[serde(default = "default_level")]
    pub level: i32,
    /// zstd worker threads (0: compress on the pipeline's own thread).
    #[serde(default)]
    pub workers: u32,
}

fn default_level() -> i32 {
    1
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            level: default_level(),
            workers: 0,
        }
    }
}

/// `encryption:`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct EncryptionConfig {
    /// File with the age recipient (`age1…`) new snapshots are encrypted to,
    /// or an identity whose public key is used. Absent: no encryption.
    #[serde(default)]
    pub recipient_file: Option<PathBuf>,
    /// Files with age identities (`AGE-SECRET-KEY-1…`) to verify, drill and
    /// restore with; snapshots name the key they need by id.
    #[serde(default)]
    pub identity_files: Vec<PathBuf>,
}

/// `schedule:`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Every this long, aligned to the Unix epoch so every instance agrees
    /// on tick times. Exclusive with `cron`. Absent: the default (`1h`),
    /// also when other fields are given; `null` (with no `cron`): on
    /// demand only.
    #[serde(with = "duration::option")]
    pub interval: Option<Duration>,
    /// A cron expression (5 fields, UTC), e.g. `0 */6 * * *`.
    #[serde(default)]
    pub cron: Option<String>,
    /// etcd election name the instances campaign on.
    #[serde(default = "default_election")]
    pub election_name: String,
    /// Lease TTL of the election: how long a dead leader keeps the role.
    #[serde(default = "default_lease_ttl", with = "duration")]
    pub lease_ttl: Duration,
    /// Attempts per tick after a failed scheduled snapshot.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Pause before each retry.
    #[serde(default = "default_retry_backoff", with = "duration")]
    pub retry_backoff: Duration,
}

fn default_election() -> String {
    "bulwark-backup/leader".into()
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(15)
}

fn default_retries() -> u32 {
    2
}

fn default_retry_backoff() -> Duration {
    Duration::from_secs(10)
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            interval: Some(Duration::from_secs(3600)),
            cron: None,
            election_name: default_election(),
            lease_ttl: default_lease_ttl(),
            retries: default_retries(),
            retry_backoff: default_retry_backoff(),
        }
    }
}

impl ScheduleConfig {
    /// The parsed schedule, `None` when scheduling is off.
    pub fn schedule(&self) -> Result<Option<Schedule>, String> {
        match (&self.interval, &self.cron) {
            (Some(_), Some(_)) => Err("set either interval or cron, not both".into()),
            (Some(i), None) => Schedule::interval(*i).map(Some),
            (None, Some(c)) => Schedule::cron(c).map(Some),
            (None, None) => Ok(None),
        }
    }
}

/// `retention:`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionConfig {
    /// The policy.
    #[serde(default)]
    pub policy: RetentionPolicy,
    /// How often the leader applies it besides after each snapshot.
    #[serde(default = "default_retention_interval", with = "duration")]
    pub interval: Duration,
    /// Objects without a manifest (failed or interrupted uploads) older than
    /// this are removed.
    #[serde(default = "default_grace_period", with = "duration")]
    pub gc_grace_period: Duration,
}

fn default_retention_interval() -> Duration {
    Duration::from_secs(3600)
}

fn default_grace_period() -> Duration {
    Duration::from_secs(6 * 3600)
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            policy: RetentionPolicy::default(),
            interval: default_retention_interval(),
            gc_grace_period: default_grace_period(),
        }
    }
}

/// `drill:`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DrillConfig {
    /// How often the leader drills the newest snapshot; absent: never
    /// (drills still run on demand).
    #[serde(default, with = "duration::option")]
    pub interval: Option<Duration>,
    /// `etcdutl` (3.5+).
    #[serde(default = "default_etcdutl")]
    pub etcdutl: PathBuf,
    /// `etcd`, started on loopback for the drill.
    #[serde(default = "default_etcd_bin")]
    pub etcd: PathBuf,
    /// Where the throwaway data dir goes (needs room for one decompressed
    /// snapshot); default: the system temp dir.
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// Limit for the throwaway etcd to become healthy.
    #[serde(default = "default_drill_timeout", with = "duration")]
    pub start_timeout: Duration,
}

fn default_etcdutl() -> PathBuf {
    "/usr/local/bin/etcdutl".into()
}

fn default_etcd_bin() -> PathBuf {
    "/usr/local/bin/etcd".into()
}

fn default_drill_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Default for DrillConfig {
    fn default() -> Self {
        Self {
            interval: None,
            etcdutl: default_etcdutl(),
            etcd: default_etcd_bin(),
            work_dir: None,
            start_timeout: default_drill_timeout(),
        }
    }
}

/// `deltas:`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DeltaConfig {
    /// Record deltas while leading.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Longest time an event waits before its segment is written.
    #[serde(default = "default_flush_interval", with = "duration")]
    pub flush_interval: Duration,
    /// Buffered events that write a segment at once.
    #[serde(default = "default_segment_bytes")]
    pub max_segment_bytes: ByteSize,
    /// Lag above this shows as LAGGING in status.
    #[serde(default = "default_rpo_target", with = "duration")]
    pub rpo_target: Duration,
}

fn default_true() -> bool {
    true
}

fn default_flush_interval() -> Duration {
    Duration::from_millis(500)
}

fn default_segment_bytes() -> ByteSize {
    ByteSize::mib(4)
}

fn default_rpo_target() -> Duration {
    Duration::from_secs(1)
}

impl Default for DeltaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            flush_interval: default_flush_interval(),
            max_segment_bytes: default_segment_bytes(),
            rpo_target: default_rpo_target(),
        }
    }
}

/// `restore:`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreConfig {
    /// etcd's static pod manifest; moving it out of the kubelet's manifest
    /// dir stops etcd, putting it back starts it.
    #[serde(default = "default_etcd_manifest")]
    pub etcd_manifest: PathBuf,
    /// Where moved manifests and staged snapshots go (same file system as
    /// the manifest, so moves are renames).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// etcd's data dir. Empty: `--data-dir` of the manifest.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// etcd member name. Empty: `--name` of the manifest.
    #[serde(default)]
    pub member_name: Option<String>,
    /// Peer URLs. Empty: `--initial-advertise-peer-urls` of the manifest.
    #[serde(default)]
    pub peer_urls: Vec<String>,
    /// Client URLs. Empty: `--advertise-client-urls` of the manifest.
    #[serde(default)]
    pub client_urls: Vec<String>,
    /// This node's agent address (host:port) as the other nodes reach it.
    /// Empty: the gRPC listen address.
    #[serde(default)]
    pub agent_address: Option<String>,
    /// Every control-plane node's agent address (host:port), this one
    /// included: a restore restores exactly these members.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Client certificate for calling the other agents (their `peers`
    /// access rule must match it). Absent: `grpc.tls`.
    #[serde(default)]
    pub client_tls: Option<TlsFiles>,
    /// Longest wait for etcd to stop after its manifest is moved.
    #[serde(default = "default_stop_timeout", with = "duration")]
    pub stop_timeout: Duration,
    /// Longest wait for the restored member to become healthy.
    #[serde(default = "default_health_timeout", with = "duration")]
    pub health_timeout: Duration,
    /// etcd 3.4's `etcdctl`, for nodes whose etcd is 3.4 (which has no
    /// etcdutl): set, this node's member is restored with
    /// `ETCDCTL_API=3 etcdctl snapshot restore` (no `--bump-revision`);
    /// absent, with `drill.etcdutl`.
    #[serde(default)]
    pub etcdctl: Option<PathBuf>,
}

fn default_etcd_manifest() -> PathBuf {
    "/etc/kubernetes/manifests/etcd.yaml".into()
}

fn default_state_dir() -> PathBuf {
    "/var/lib/bulwark/restore".into()
}

fn default_stop_timeout() -> Duration {
    Duration::from_secs(120)
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(300)
}

impl Default for RestoreConfig {
    fn default() -> Self {
        Self {
            etcd_manifest: default_etcd_manifest(),
            state_dir: default_state_dir(),
            data_dir: None,
            member_name: None,
            peer_urls: Vec::new(),
            client_urls: Vec::new(),
            agent_address: None,
            peers: Vec::new(),
            client_tls: None,
            stop_timeout: default_stop_timeout(),
            health_timeout: default_health_timeout(),
            etcdctl: None,
        }
    }
}

impl Validate for BackupConfig {
    fn validate(&self, v: &mut Validator) {
        check_listeners(v, self);
        warn_node_local_store(v, self);
        v.check(
            !self.node_name.trim().is_empty(),
            "nodeName",
            "must not be empty",
        );
        v.check(
            crate::store::layout::is_valid_id(&self.cluster_name),
            "clusterName",
            "must be letters, digits, '-' or '_' (it is a directory name in the store)",
        );
        v.nested("logging", &self.logging);
        v.nested("grpc", &self.grpc);
        v.nested("etcd", &self.etcd);
        v.nested("store", &self.store);
        v.nested("compression", &self.compression);
        // At the top: the key loader's messages name their field in full
        // (`encryption.recipientFile: …`), as the daemon logs them at start.
        self.encryption.validate(v);
        v.nested("schedule", &self.schedule);
        v.nested("retention", &self.retention);
        v.nested("deltas", &self.deltas);
        v.nested("restore", &self.restore);
        v.nested("drill", &self.drill);
    }
}

impl Validate for GrpcConfig {
    fn validate(&self, v: &mut Validator) {
        v.nested("access", &self.access);
        v.nested("tls", &self.tls);
    }
}

impl Validate for EtcdConfig {
    fn validate(&self, v: &mut Validator) {
        if self.endpoints.is_empty() {
            v.at("endpoints", |v| {
                v.error("must list at least one etcd client URL")
            });
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            v.check(
                is_http_url(e),
                format!("endpoints[{i}]"),
                format!("{e:?} is not an etcd client URL: expected http(s)://host:port"),
            );
        }
        if let Some(tls) = &self.tls {
            v.nested("tls", tls);
        }
        let secs = Duration::from_secs;
        v.duration_in(
            "dialTimeout",
            self.dial_timeout,
            Duration::from_millis(100),
            secs(300),
        );
        v.duration_in(
            "requestTimeout",
            self.request_timeout,
            Duration::from_millis(100),
            secs(600),
        );
        v.duration_in("stallTimeout", self.stall_timeout, secs(1), secs(3600));
    }
}

impl StoreConfig {
    /// The store the URL and options name, checked (nothing is contacted).
    pub fn spec(&self) -> Result<crate::store::StoreSpec, String> {
        crate::store::StoreSpec::parse(&self.url, &self.options)
    }
}

impl Validate for StoreConfig {
    fn validate(&self, v: &mut Validator) {
        if let Err(e) = self.spec() {
            v.error(e);
        }
        v.check(
            self.part_size >= ByteSize::mib(5) && self.part_size <= ByteSize::mib(64),
            "partSize",
            format!(
                "{} is out of range: expected between 5MiB (S3's minimum part) and 64MiB (the memory budget)",
                self.part_size
            ),
        );
        v.check(
            (1..=8).contains(&self.upload_concurrency),
            "uploadConcurrency",
            "must be between 1 and 8",
        );
    }
}

impl Validate for CompressionConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            (1..=19).contains(&self.level),
            "level",
            format!("{} is out of range: expected 1 to 19", self.level),
        );
        v.check(self.workers <= 8, "workers", "must be at most 8");
    }
}

impl Validate for EncryptionConfig {
    fn validate(&self, v: &mut Validator) {
        if !v.reads_files() {
            return;
        }
        match crate::pipeline::encryption::Keyring::load(
            self.recipient_file.as_deref(),
            &self.identity_files,
        ) {
            Ok(_) => {}
            // Not "encryption key: …" in a list of field errors.
            Err(crate::error::BackupError::Key(message)) => v.error(message),
            Err(e) => v.at("encryption", |v| v.error(e.to_string())),
        }
    }
}

impl Validate for ScheduleConfig {
    fn validate(&self, v: &mut Validator) {
        if let Err(e) = self.schedule() {
            v.error(e);
        }
        v.check(
            !self.election_name.trim().is_empty(),
            "electionName",
            "must not be empty",
        );
        v.duration_in(
            "leaseTtl",
            self.lease_ttl,
            Duration::from_secs(2),
            Duration::from_secs(300),
        );
        v.duration_in(
            "retryBackoff",
            self.retry_backoff,
            Duration::ZERO,
            Duration::from_secs(3600),
        );
    }
}

impl Validate for RetentionConfig {
    fn validate(&self, v: &mut Validator) {
        v.nested("policy", &self.policy);
        v.duration_in(
            "interval",
            self.interval,
            Duration::from_secs(1),
            Duration::from_secs(7 * 86400),
        );
        v.duration_in(
            "gcGracePeriod",
            self.gc_grace_period,
            Duration::ZERO,
            Duration::from_secs(30 * 86400),
        );
    }
}

impl Validate for DeltaConfig {
    fn validate(&self, v: &mut Validator) {
        v.duration_in(
            "flushInterval",
            self.flush_interval,
            Duration::from_millis(10),
            Duration::from_secs(300),
        );
        v.check(
            self.max_segment_bytes >= ByteSize(64 << 10)
                && self.max_segment_bytes <= ByteSize::mib(64),
            "maxSegmentBytes",
            format!(
                "{} is out of range: expected between 64KiB and 64MiB",
                self.max_segment_bytes
            ),
        );
        v.duration_in(
            "rpoTarget",
            self.rpo_target,
            Duration::from_millis(10),
            Duration::from_secs(86400),
        );
    }
}

impl Validate for RestoreConfig {
    fn validate(&self, v: &mut Validator) {
        self.validate_member(v);
        self.validate_peers(v);
        if let Some(etcdctl) = &self.etcdctl {
            v.file_exists("etcdctl", etcdctl);
        }
        if let Some(tls) = &self.client_tls {
            v.nested("clientTls", tls);
        }
        v.duration_in(
            "stopTimeout",
            self.stop_timeout,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        );
        v.duration_in(
            "healthTimeout",
            self.health_timeout,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        );
    }
}

impl RestoreConfig {
    /// This node's member: its manifest, state and data dirs, name, URLs.
    fn validate_member(&self, v: &mut Validator) {
        v.check(
            self.etcd_manifest.is_absolute() && self.etcd_manifest.parent().is_some(),
            "etcdManifest",
            format!(
                "{} must be an absolute file path",
                self.etcd_manifest.display()
            ),
        );
        v.check(
            self.state_dir.is_absolute(),
            "stateDir",
            format!("{} must be an absolute path", self.state_dir.display()),
        );
        if let Some(d) = &self.data_dir {
            v.check(
                d.is_absolute() && d.parent().is_some() && d.file_name().is_some(),
                "dataDir",
                format!("{} must be an absolute path below /", d.display()),
            );
        }
        if let Some(n) = &self.member_name {
            v.check(
                !n.trim().is_empty(),
                "memberName",
                "must not be empty when set",
            );
        }
        for (field, urls) in [
            ("peerUrls", &self.peer_urls),
            ("clientUrls", &self.client_urls),
        ] {
            for (i, u) in urls.iter().enumerate() {
                v.check(
                    is_http_url(u),
                    format!("{field}[{i}]"),
                    format!("{u:?} is not a URL: expected http(s)://host:port"),
                );
            }
        }
    }

    /// The agents: this one's address and the peers', each once.
    fn validate_peers(&self, v: &mut Validator) {
        let host_port = |a: &str| {
            a.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        };
        if let Some(a) = &self.agent_address {
            v.check(
                host_port(a),
                "agentAddress",
                format!("{a:?}: expected host:port"),
            );
        }
        for (i, a) in self.peers.iter().enumerate() {
            v.check(
                host_port(a),
                format!("peers[{i}]"),
                format!("{a:?}: expected host:port"),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for a in &self.peers {
            if !seen.insert(a) {
                v.at("peers", |v| v.error(format!("{a:?} is listed twice")));
            }
        }
    }
}

impl Validate for DrillConfig {
    fn validate(&self, v: &mut Validator) {
        if let Some(i) = self.interval {
            v.duration_in(
                "interval",
                i,
                Duration::from_secs(1),
                Duration::from_secs(30 * 86400),
            );
            // Scheduled drills need the tools; on-demand ones report
            // their absence as a failed drill.
            v.file_exists("etcdutl", &self.etcdutl);
            v.file_exists("etcd", &self.etcd);
        }
    }
}

/// An `http(s)://host[:port]` URL.
fn is_http_url(u: &str) -> bool {
    url::Url::parse(u)
        .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .unwrap_or(false)
}

/// A `file://` store on a cluster of more than one node is each node's own
/// disk unless every node mounts the same file system: the backups land
/// on whichever node was elected, and go with it when it is lost. Legal
/// (a shared mount is fine), so a warning.
fn warn_node_local_store(v: &mut Validator, config: &BackupConfig) {
    let local = config
        .store
        .spec()
        .is_ok_and(|spec| spec.scheme() == crate::store::Scheme::File);
    let nodes = config.restore.peers.len();
    if local && nodes > 1 {
        v.at("store.url", |v| {
            v.warn(format!(
                "{} on a cluster of {nodes} nodes (restore.peers): unless every node mounts \
                 this directory from one shared file system, each backup stays on the disk of \
                 the node that took it and is lost with that node; use an object store \
                 (s3://, gs://, az://) for a control plane of more than one node",
                config.store.url
            ));
        });
    }
}

/// Every socket the instance binds, each once.
fn check_listeners(v: &mut Validator, config: &BackupConfig) {
    v.distinct_listeners(&[
        ("admin.address", config.admin.address),
        ("grpc.address", config.grpc.address),
    ]);
}

// Building the daemon's parts from a validated config. These sit here, at
// the top of the crate's layers, so the layers below never import the
// config: the engine, etcd and metrics take plain values.

impl crate::etcd::EtcdConnector {
    /// Reads the TLS files now, so a bad path fails at start.
    pub fn new(config: &EtcdConfig) -> crate::error::Result<Self> {
        let tls = match &config.tls {
            None => None,
            Some(files) => {
                for (what, p) in [
                    ("caFile", &files.ca_file),
                    ("certFile", &files.cert_file),
                    ("keyFile", &files.key_file),
                ] {
                    std::fs::read(p).map_err(|e| {
                        crate::error::BackupError::local(
                            format!("reading etcd.tls.{what} {}", p.display()),
                            e,
                        )
                    })?;
                }
                Some(
                    files
                        .load()
                        .map_err(|e| crate::error::BackupError::local("etcd.tls", e))?,
                )
            }
        };
        Ok(Self::with_tls(
            config.endpoints.clone(),
            tls,
            config.dial_timeout,
            config.request_timeout,
        ))
    }
}

impl crate::engine::Engine {
    /// Builds the engine from a validated config: reads key and TLS files
    /// and builds the store client (nothing is contacted yet).
    pub fn from_config(config: &BackupConfig) -> crate::error::Result<Self> {
        let spec = config
            .store
            .spec()
            .map_err(crate::error::BackupError::InvalidArgument)?;
        let store = spec.build()?;
        let keys = crate::pipeline::encryption::Keyring::load(
            config.encryption.recipient_file.as_deref(),
            &config.encryption.identity_files,
        )?;
        Ok(Self::new(
            config.node_name.clone(),
            config.cluster_name.clone(),
            crate::etcd::EtcdConnector::new(&config.etcd)?,
            store,
            keys,
            crate::engine::PipelineSettings {
                level: config.compression.level,
                workers: config.compression.workers,
                part_size: usize::try_from(config.store.part_size.0).unwrap_or(8 << 20),
                upload_concurrency: config.store.upload_concurrency,
                stall_timeout: config.etcd.stall_timeout,
                member_choice: config.etcd.snapshot_from,
            },
            crate::engine::DrillSettings {
                etcdutl: config.drill.etcdutl.clone(),
                etcd: config.drill.etcd.clone(),
                work_dir: config.drill.work_dir.clone(),
                start_timeout: config.drill.start_timeout,
            },
            config.retention.gc_grace_period,
        ))
    }
}

#[cfg(test)]
mod tests {
    use bulwark_common::config::{Overrides, from_str_with};

    use super::*;

    fn parse(body: &str) -> Result<BackupConfig, bulwark_common::config::ConfigError> {
        let text = format!("apiVersion: bulwark.dev/v1alpha1\nkind: BackupConfiguration\n{body}");
        from_str_with(Some(&text), None, &Overrides::new())
    }

    fn errors(body: &str) -> Vec<String> {
        match parse(body) {
            Ok(_) => Vec::new(),
            Err(e) => e.messages(),
        }
    }

    /// A config that validates on any machine: plain-HTTP etcd, gRPC TLS
    /// files that exist (any readable file passes the existence check).
    fn minimal(extra: &str) -> String {
        format!(
            "grpc:\n  tls: {{certFile: /proc/self/status, keyFile: /proc/self/status, caFile: /proc/self/status}}\n\
             etcd:\n  endpoints: [http://127.0.0.1:2379]\n  tls: null\n{extra}"
        )
    }

    #[test]
    fn a_local_store_on_more_than_one_node_is_warned_of() {
        let warnings = |extra: &str| {
            let text = format!(
                "apiVersion: bulwark.dev/v1alpha1\nkind: BackupConfiguration\n{}",
                minimal(extra)
            );
            let loaded = bulwark_common::config::check_offline::<BackupConfig>(&text).unwrap();
            loaded
                .warnings
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        let three = "restore: {peers: ['10.0.0.11:9445', '10.0.0.12:9445', '10.0.0.13:9445']}\n";
        let w = warnings(three);
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(
            w[0].starts_with(
                "store.url: file:///var/lib/bulwark/backups on a cluster of 3 nodes (restore.peers)"
            ),
            "{w:#?}"
        );
        // One node, or an object store: nothing to warn of.
        assert!(warnings("restore: {peers: ['10.0.0.11:9445']}\n").is_empty());
        assert!(warnings(&format!("{three}store: {{url: 's3://b/p'}}\n")).is_empty());
    }

    #[test]
    fn grpc_and_admin_must_not_share_a_port() {
        let e = errors(concat!(
            "admin: {address: 127.0.0.1:9445}\n",
            "grpc:\n  address: 0.0.0.0:9445\n",
            "  tls: {certFile: /proc/self/status, keyFile: /proc/self/status, caFile: /proc/self/status}\n",
            "etcd:\n  endpoints: [http://127.0.0.1:2379]\n  tls: null\n",
        ));
        assert!(
            e.iter()
                .any(|m| m.starts_with("grpc.address: 0.0.0.0:9445 clashes with admin.address")),
            "{e:?}"
        );
    }

    /// Restore agents call each other with the serving certificate: it
    /// needs clientAuth and an identity `grpc.access.peers` admits.
    #[test]
    fn preflight_checks_the_agent_identity_and_the_dialed_address() {
        let pki = bulwark_testkit::Pki::new().unwrap();
        let server_only = pki.server("backup", &["10.0.0.99"]).unwrap().tls_files();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("backup.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: bulwark.dev/v1alpha1\nkind: BackupConfiguration\n\
                 grpc:\n  address: 127.0.0.1:9445\n  tls: {{certFile: {}, keyFile: {}, caFile: {}}}\n  access: {{peers: {{organizations: ['bulwark:backup']}}}}\n\
                 etcd:\n  endpoints: [http://127.0.0.1:2379]\n  tls: null\n\
                 restore:\n  peers: ['127.0.0.1:9445']\n",
                server_only.cert_file.display(),
                server_only.key_file.display(),
                server_only.ca_file.display()
            ),
        )
        .unwrap();
        let err =
            bulwark_common::config::load_checked::<BackupConfig>(Some(&file), &Overrides::new())
                .unwrap_err();
        let e = err.messages();
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(
            e[0].starts_with("grpc.tls.certFile: ") && e[0].contains("lacks the clientAuth"),
            "{e:#?}"
        );
        assert!(
            e[1].contains("does not cover 127.0.0.1 (grpc.address)"),
            "{e:#?}"
        );
        assert!(e[2].contains("grpc.access.peers"), "{e:#?}");
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse(&minimal("")).unwrap();
        assert_eq!(c.cluster_name, "kubernetes");
        assert_eq!(c.store.url, "file:///var/lib/bulwark/backups");
        assert_eq!(c.store.part_size, ByteSize::mib(8));
        assert_eq!(c.store.upload_concurrency, 2);
        assert_eq!(c.compression.level, 1);
        assert_eq!(c.schedule.interval, Some(Duration::from_secs(3600)));
        assert_eq!(c.schedule.lease_ttl, Duration::from_secs(15));
        assert_eq!(c.etcd.snapshot_from, MemberChoice::Leader);
        assert!(c.encryption.recipient_file.is_none());
        assert!(c.drill.interval.is_none());
        assert!(c.deltas.enabled);
        assert_eq!(c.deltas.flush_interval, Duration::from_millis(500));
        assert_eq!(
            c.restore.etcd_manifest,
            PathBuf::from("/etc/kubernetes/manifests/etcd.yaml")
        );
    }

    #[test]
    fn restore_fields_are_checked() {
        let errs = errors(&minimal(
            "deltas:\n  maxSegmentBytes: 1KiB\n\
             restore:\n  etcdManifest: etc/etcd.yaml\n  dataDir: var/lib/etcd\n  peerUrls: [10.0.0.1:2380]\n  peers: ['a:1', 'a:1', 'b']\n  etcdctl: /nonexistent/etcdctl\n",
        ));
        let has = |prefix: &str| errs.iter().any(|e| e.starts_with(prefix));
        assert!(
            has("deltas.maxSegmentBytes: 1KiB is out of range"),
            "{errs:#?}"
        );
        assert!(has("restore.etcdManifest"), "{errs:#?}");
        assert!(has("restore.dataDir"), "{errs:#?}");
        assert!(has("restore.peerUrls[0]"), "{errs:#?}");
        assert!(has("restore.peers: \"a:1\" is listed twice"), "{errs:#?}");
        assert!(has("restore.peers[2]"), "{errs:#?}");
        assert!(
            has("restore.etcdctl: cannot read /nonexistent/etcdctl"),
            "{errs:#?}"
        );
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(ByteSize::parse("8MiB"), Ok(ByteSize::mib(8)));
        assert_eq!(ByteSize::parse("5 MB"), Ok(ByteSize(5_000_000)));
        assert_eq!(ByteSize::parse("1024"), Ok(ByteSize(1024)));
        assert!(ByteSize::parse("8 parsecs").unwrap_err().contains("unit"));
        assert_eq!(ByteSize::mib(8).to_string(), "8MiB");
    }

    #[test]
    fn bad_values_name_their_fields() {
        let errs = errors(&minimal(
            "store:\n  url: ftp://x/y\n  partSize: 1MiB\n  uploadConcurrency: 0\n\
             compression:\n  level: 22\n\
             schedule:\n  interval: 1h\n  cron: '0 * * * *'\n\
             encryption:\n  recipientFile: /nonexistent/key.txt\n",
        ));
        let has = |prefix: &str| errs.iter().any(|e| e.starts_with(prefix));
        assert!(has("store: unsupported store URL scheme"), "{errs:#?}");
        assert!(has("store.partSize: 1MiB is out of range"), "{errs:#?}");
        assert!(has("store.uploadConcurrency"), "{errs:#?}");
        assert!(has("compression.level: 22 is out of range"), "{errs:#?}");
        assert!(has("schedule: set either interval or cron"), "{errs:#?}");
        assert!(
            errs.iter()
                .any(|e| e.starts_with("encryption.recipientFile: cannot read")
                    && e.contains("/nonexistent/key.txt")),
            "{errs:#?}"
        );

        let errs = errors(
            "grpc:\n  tls: {certFile: /nonexistent/c.crt, keyFile: /proc/self/status, caFile: /proc/self/status}\n\
             etcd:\n  endpoints: [127.0.0.1:2379]\n  tls: null\n",
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("grpc.tls.certFile: cannot read /nonexistent/c.crt")),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("etcd.endpoints[0]")),
            "{errs:#?}"
        );
    }

    #[test]
    fn every_section_merges_with_its_defaults() {
        use crate::snapshot::retention::Exponential;
        // `retention.policy` is left out on purpose: it is a set of rules
        // (OR-combined), and a policy that is given is exactly the rules
        // it names (BACKUP.md); its `exponential` rule is a section.
        bulwark_common::assert_sections_merge!(
            "logging" => LoggingConfig,
            "grpc" => GrpcConfig,
            "grpc.access" => AccessPolicy,
            "etcd" => EtcdConfig,
            "store" => StoreConfig,
            "compression" => CompressionConfig,
            "encryption" => EncryptionConfig,
            "schedule" => ScheduleConfig,
            "retention" => RetentionConfig,
            "retention.policy.exponential" => Exponential,
            "drill" => DrillConfig,
            "deltas" => DeltaConfig,
            "restore" => RestoreConfig,
        );
        // Through the whole file too: the reported case.
        let c = parse(&minimal("schedule: {retries: 3}\n")).unwrap();
        assert_eq!(c.schedule.retries, 3);
        assert_eq!(c.schedule.interval, Some(Duration::from_secs(3600)));
        assert!(c.schedule.schedule().unwrap().is_some());
        // Turning the schedule off stays possible, and explicit.
        let c = parse(&minimal("schedule: {interval: null}\n")).unwrap();
        assert!(c.schedule.schedule().unwrap().is_none());
    }
}
