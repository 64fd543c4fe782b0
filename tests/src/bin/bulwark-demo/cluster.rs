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
use bulwark_testkit::kubelet::Kubelet;

use crate::prometheus::Target;
use bulwark_testkit::{
    CertFiles, EtcdVersion, Pki, Process, ProcessBuilder, TestDir, ports, tools,
};

/// The zones, one apiserver, LB node, prober and backup service each.
pub const ZONES: [&str; 3] = ["a", "b", "c"];

/// One control-plane node's etcd member, run by a kubelet stand-in from
/// its static pod manifest (so a restore stops and starts it the way it
/// would on a kubeadm node).
pub struct EtcdNode {
    pub name: String,
    pub manifest: PathBuf,
    pub data_dir: PathBuf,
    pub client_url: String,
    /// Runs the member while it lives; dropped with the demo.
    pub _kubelet: Kubelet,
}

/// One bulwark-backup instance.
pub struct BackupNode {
    pub process: Process,
    pub grpc: SocketAddr,
}

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
    pub etcd: Vec<EtcdNode>,
    pub backups: Vec<BackupNode>,
    pub apiservers: Vec<ApiServerProcess>,
    pub lbs: Vec<LbNode>,
    pub probers: Vec<Process>,
    pub vip: SocketAddr,
    pub ctl_config: PathBuf,
    /// Every daemon's admin endpoint (/metrics), for Prometheus.
    pub scrape: Vec<Target>,
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
            etcd: Vec::new(),
            backups: Vec::new(),
            apiservers: Vec::new(),
            lbs: Vec::new(),
            probers: Vec::new(),
            vip: pick_vip()?,
            ctl_config,
            scrape: Vec::new(),
        })
    }

    /// A 3-member etcd cluster, one member per node, each started by a
    /// kubelet stand-in from `<node>/manifests/etcd.yaml`.
    pub async fn start_etcd(&mut self) -> anyhow::Result<()> {
        let etcd = tools::etcd(EtcdVersion::V3_5)?;
        let ports = ports::free_ports(IpAddr::V4(Ipv4Addr::LOCALHOST), 2 * ZONES.len())?;
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let cluster: Vec<String> = ZONES
            .iter()
            .enumerate()
            .map(|(i, z)| format!("etcd-{z}={}", url(ports[2 * i + 1])))
            .collect();
        for (i, zone) in ZONES.iter().enumerate() {
            let name = format!("etcd-{zone}");
            let node = self.dir.join(format!("node-{zone}"));
            std::fs::create_dir_all(node.join("manifests"))?;
            let data_dir = node.join("etcd-data");
            let manifest = node.join("manifests/etcd.yaml");
            let (client, peer) = (url(ports[2 * i]), url(ports[2 * i + 1]));
            std::fs::write(
                &manifest,
                format!(
                    "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: kube-system}}
spec:
  containers:
  - name: etcd
    command:
    - {etcd}
    - --name={name}
    - --data-dir={data}
    - --listen-client-urls={client}
    - --advertise-client-urls={client}
    - --listen-peer-urls={peer}
    - --initial-advertise-peer-urls={peer}
    - --initial-cluster={cluster}
    - --initial-cluster-token=bulwark-demo
    - --initial-cluster-state=new
    - --heartbeat-interval=100
    - --election-timeout=1000
",
                    etcd = etcd.display(),
                    data = data_dir.display(),
                    cluster = cluster.join(","),
                ),
            )?;
            let kubelet = Kubelet::start(&manifest, &name);
            self.etcd.push(EtcdNode {
                name,
                manifest,
                data_dir,
                client_url: client,
                _kubelet: kubelet,
            });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = self.etcd_client().await
                && c.status().await.is_ok()
            {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "etcd did not become healthy within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A client of the whole etcd cluster.
    pub async fn etcd_client(&self) -> anyhow::Result<etcd_client::Client> {
        let endpoints: Vec<String> = self.etcd.iter().map(|e| e.client_url.clone()).collect();
        Ok(etcd_client::Client::connect(endpoints, None).await?)
    }

    /// A bulwark-backup per node: snapshots and deltas to a local file
    /// store, and the restore agent for that node's etcd.
    pub async fn start_backups(&mut self) -> anyhow::Result<()> {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let ports = ports::free_ports(lo, 2 * ZONES.len())?;
        let grpc: Vec<SocketAddr> = (0..ZONES.len()).map(|i| loopback(ports[2 * i])).collect();
        let peers: Vec<String> = grpc.iter().map(|a| format!("'{a}'")).collect();
        let endpoints: Vec<String> = self
            .etcd
            .iter()
            .map(|e| format!("'{}'", e.client_url))
            .collect();
        let store = self.dir.join("backups");
        std::fs::create_dir_all(&store)?;
        for (i, zone) in ZONES.iter().enumerate() {
            let name = format!("backup-{zone}");
            let node = self.dir.join(format!("node-{zone}"));
            let cert = self
                .pki
                .peer(&name, &["bulwark:backup"], &["127.0.0.1", "localhost"])?;
            std::fs::create_dir_all(node.join("work"))?;
            let config = self.dir.join(format!("{name}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "apiVersion: bulwark.dev/v1alpha1
kind: BackupConfiguration
nodeName: node-{zone}
clusterName: demo
admin: {{address: '{admin}'}}
grpc:
  address: '{grpc}'
  tls: {{certFile: {cert}, keyFile: {key}, caFile: {ca}}}
  access:
    operators: {{organizations: [system:masters]}}
    peers: {{organizations: ['bulwark:backup']}}
etcd: {{endpoints: [{endpoints}], tls: null}}
store: {{url: 'file://{store}'}}
schedule: {{interval: 1h}}
deltas: {{flushInterval: 200ms}}
drill: {{etcdutl: {etcdutl}, etcd: {etcd}, workDir: {work}}}
restore:
  etcdManifest: {manifest}
  stateDir: {state}
  peers: [{peers}]
",
                    admin = loopback(ports[2 * i + 1]),
                    grpc = grpc[i],
                    cert = cert.cert.display(),
                    key = cert.key.display(),
                    ca = cert.ca.display(),
                    endpoints = endpoints.join(", "),
                    store = store.display(),
                    etcdutl = tools::etcdutl()?.display(),
                    etcd = tools::etcd(EtcdVersion::V3_5)?.display(),
                    work = node.join("work").display(),
                    manifest = self.etcd[i].manifest.display(),
                    state = node.join("restore-state").display(),
                    peers = peers.join(", "),
                ),
            )?;
            let process = ProcessBuilder::new(name, tools::bin_path("bulwark-backup")?)
                .arg("--config")
                .arg(&config)
                .spawn()?;
            self.scrape.push(Target {
                job: "bulwark-backup",
                admin: loopback(ports[2 * i + 1]),
            });
            self.backups.push(BackupNode {
                process,
                grpc: grpc[i],
            });
        }
        for b in &self.backups {
            b.process
                .wait_for_port(b.grpc, Duration::from_secs(60))
                .await?;
        }
        Ok(())
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
            self.scrape.push(Target {
                job: "bulwark-lb",
                admin: addr(i, 2),
            });
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
            self.scrape.push(Target {
                job: "bulwark-prober",
                admin,
            });
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
