//! Bringing the demo's control plane up on loopback: etcd, three fixture
//! apiservers in zones a/b/c, three bulwark-lb nodes sharing a bind-mode
//! VIP, a prober per zone and a backup service per node, all with mTLS from
//! one demo CA, and a bulwarkctl context for the operator.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_testkit::fixture::ApiServerProcess;
use bulwark_testkit::{CertFiles, Pki, Process, ProcessBuilder, TestDir, ports, tools};

/// The zones, one apiserver, LB node, prober and backup service each.
pub const ZONES: [&str; 3] = ["a", "b", "c"];

/// One bulwark-lb node.
pub struct LbNode {
    pub id: u64,
    pub name: String,
    pub process: Process,
    pub api: SocketAddr,
}

/// Everything the demo runs.
pub struct ControlPlane {
    pub dir: TestDir,
    pub pki: Pki,
    pub operator: CertFiles,
    pub apiservers: Vec<ApiServerProcess>,
    pub lbs: Vec<LbNode>,
    pub probers: Vec<Process>,
    pub vip: SocketAddr,
    pub ctl_config: PathBuf,
}

/// The VIP: 127.0.10.1:6443 like a real control-plane endpoint when that
/// port is free, else an ephemeral port on the same address.
fn pick_vip() -> anyhow::Result<SocketAddr> {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 10, 1));
    let preferred = SocketAddr::new(ip, 6443);
    if std::net::TcpListener::bind(preferred).is_ok() {
        return Ok(preferred);
    }
    Ok(SocketAddr::new(ip, ports::free_port(ip)?))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

impl ControlPlane {
    /// A directory and a CA for the demo.
    pub fn new() -> anyhow::Result<Self> {
        bulwark_testkit::install_crypto_provider();
        let pki = Pki::with_ca_name("bulwark-demo-ca")?;
        let operator = pki.admin()?;
        let dir = TestDir::new("bulwark-demo")?;
        let ctl_config = dir.join("bulwarkctl.yaml");
        Ok(Self {
            dir,
            pki,
            operator,
            apiservers: Vec::new(),
            lbs: Vec::new(),
            probers: Vec::new(),
            vip: pick_vip()?,
            ctl_config,
        })
    }

    /// Three fixture apiservers, one per zone, whose certificates also name
    /// the VIP (clients reach them through it).
    pub async fn start_apiservers(&mut self) -> anyhow::Result<()> {
        for zone in ZONES {
            let server = ApiServerProcess::builder(zone)
                .san(self.vip.ip().to_string())
                .start(&self.pki)
                .await
                .with_context(|| format!("starting the apiserver of zone {zone}"))?;
            self.apiservers.push(server);
        }
        Ok(())
    }

    /// Three bulwark-lb nodes (one per zone) with the apiservers as
    /// backends; returns once they answer on their API port.
    pub async fn start_lbs(&mut self) -> anyhow::Result<()> {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let ports = ports::free_ports(lo, 3 * ZONES.len())?;
        let addr = |i: usize, k: usize| loopback(ports[3 * i + k]);
        let mut members = String::new();
        for (i, zone) in ZONES.iter().enumerate() {
            writeln!(
                members,
                "- {{id: {id}, name: lb-{zone}, zone: {zone}, raftAddress: '{raft}', apiAddress: '{api}'}}",
                id = i + 1,
                raft = addr(i, 0),
                api = addr(i, 1),
            )?;
        }
        let mut backends = String::new();
        for (server, zone) in self.apiservers.iter().zip(ZONES) {
            writeln!(
                backends,
                "- {{id: apiserver-{zone}, address: '{}', zone: {zone}}}",
                server.addr()
            )?;
        }
        for (i, zone) in ZONES.iter().enumerate() {
            let id = i as u64 + 1;
            let name = format!("lb-{zone}");
            let cert = self
                .pki
                .peer(&name, &["bulwark:lb"], &["127.0.0.1", "localhost"])?;
            let config = self.dir.join(format!("{name}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "apiVersion: bulwark.dev/v1alpha1
kind: LoadBalancerConfiguration
nodeId: {id}
name: {name}
zone: {zone}
dataDir: {data}
raft:
  address: '{raft}'
api:
  address: '{api}'
admin:
  address: '{admin}'
tls:
  certFile: {cert}
  keyFile: {key}
  caFile: {ca}
access:
  operators: {{organizations: [system:masters]}}
  peers: {{organizations: ['bulwark:lb']}}
  probers: {{organizations: ['bulwark:probers']}}
initialMembers:
{members}vip:
  mode: bind
  address: {vip_ip}
  port: {vip_port}
backends:
{backends}proxy:
  connectTimeout: 300ms
  shutdownGrace: 1s
shutdownGrace: 5s
",
                    data = self.dir.join(format!("{name}-data")).display(),
                    raft = addr(i, 0),
                    api = addr(i, 1),
                    admin = addr(i, 2),
                    cert = cert.cert.display(),
                    key = cert.key.display(),
                    ca = cert.ca.display(),
                    vip_ip = self.vip.ip(),
                    vip_port = self.vip.port(),
                ),
            )?;
            let process = ProcessBuilder::new(name.clone(), tools::bin_path("bulwark-lb")?)
                .arg("--config")
                .arg(&config)
                .env("BULWARK_LOG_LEVEL", "info,openraft=warn")
                .spawn()?;
            self.lbs.push(LbNode {
                id,
                name,
                process,
                api: addr(i, 1),
            });
        }
        for lb in &self.lbs {
            lb.process
                .wait_for_port(lb.api, Duration::from_secs(60))
                .await?;
        }
        Ok(())
    }

    /// A bulwark-prober per zone, probing every apiserver's `/readyz` and
    /// `/livez` and reporting to the LB leader.
    pub async fn start_probers(&mut self) -> anyhow::Result<()> {
        let mut targets = String::new();
        for (server, zone) in self.apiservers.iter().zip(ZONES) {
            writeln!(
                targets,
                "  - {{id: apiserver-{zone}, address: '{}', zone: {zone}}}",
                server.addr()
            )?;
        }
        let endpoints: Vec<String> = self.lbs.iter().map(|l| format!("'{}'", l.api)).collect();
        for zone in ZONES {
            let name = format!("prober-{zone}");
            let cert = self.pki.client(&name, &["bulwark:probers"])?;
            let admin = loopback(ports::loopback_port()?);
            let config = self.dir.join(format!("{name}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "apiVersion: bulwark.dev/v1alpha1
kind: ProberConfiguration
nodeName: {name}
zone: {zone}
admin: {{address: '{admin}'}}
apiservers:
  tls: {{caFile: '{ca}'}}
  targets:
{targets}report:
  endpoints: [{endpoints}]
  tls: {{certFile: '{cert}', keyFile: '{key}', caFile: '{ca}'}}
  serverName: localhost
",
                    ca = self.pki.ca_path().display(),
                    endpoints = endpoints.join(", "),
                    cert = cert.cert.display(),
                    key = cert.key.display(),
                ),
            )?;
            let process = ProcessBuilder::new(name, tools::bin_path("bulwark-prober")?)
                .arg("--config")
                .arg(&config)
                .spawn()?;
            process
                .wait_for_port(admin, Duration::from_secs(60))
                .await?;
            self.probers.push(process);
        }
        Ok(())
    }

    /// Writes the operator's bulwarkctl context (every LB and backup
    /// endpoint, the demo CA, the operator certificate).
    pub fn write_ctl_config(&self, backup_endpoints: &[SocketAddr]) -> anyhow::Result<()> {
        let list = |addrs: Vec<String>| addrs.join(", ");
        std::fs::write(
            &self.ctl_config,
            format!(
                "apiVersion: bulwark.dev/v1alpha1
kind: BulwarkctlConfiguration
currentContext: demo
contexts:
- name: demo
  ca: {ca}
  cert: {cert}
  key: {key}
  lb:
    endpoints: [{lb}]
{backup}",
                ca = self.operator.ca.display(),
                cert = self.operator.cert.display(),
                key = self.operator.key.display(),
                lb = list(self.lbs.iter().map(|l| format!("'{}'", l.api)).collect()),
                backup = if backup_endpoints.is_empty() {
                    String::new()
                } else {
                    format!(
                        "  backup:\n    endpoints: [{}]\n",
                        list(backup_endpoints.iter().map(|a| format!("'{a}'")).collect())
                    )
                },
            ),
        )?;
        Ok(())
    }
}
