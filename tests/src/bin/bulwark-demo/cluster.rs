//! Bringing the demo's control plane up on loopback: etcd, three fixture
//! apiservers in zones a/b/c, three bulwark-lb nodes sharing a bind-mode
//! VIP, a prober per zone and a backup service per node, all with mTLS from
//! one demo CA, and a bulwarkctl context for the operator.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_testkit::fixture::ApiServerProcess;
use bulwark_testkit::kubelet::{EtcdPod, Kubelet};

use crate::prometheus::Target;
use bulwark_ctl::context::{Context, CtlConfig, ServiceEndpoints};
use bulwark_lb::config::{BackendConfig, VipMode};
use bulwark_testkit::cluster::{
    LbSpec, backup_config, backup_process, lb_process, prober_config, prober_process, write_named,
};
use bulwark_testkit::{CertFiles, EtcdVersion, Pki, Process, TestDir, config, ports, tools};

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
            EtcdPod {
                pod_name: &name,
                etcd: &etcd,
                name: &name,
                data_dir: &data_dir,
                client_url: &client,
                peer_url: &peer,
                initial_cluster: &cluster.join(","),
                token: "bulwark-demo",
                heartbeat_ms: 100,
                election_ms: 1000,
            }
            .write(&manifest)?;
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
        let peers: Vec<String> = grpc.iter().map(ToString::to_string).collect();
        let endpoints: Vec<String> = self.etcd.iter().map(|e| e.client_url.clone()).collect();
        let store = self.dir.join("backups");
        std::fs::create_dir_all(&store)?;
        let store_url = format!("file://{}", store.display());
        for (i, zone) in ZONES.iter().enumerate() {
            let name = format!("backup-{zone}");
            let node = self.dir.join(format!("node-{zone}"));
            let cert = self
                .pki
                .peer(&name, &["bulwark:backup"], &["127.0.0.1", "localhost"])?;
            std::fs::create_dir_all(node.join("work"))?;
            let mut c = backup_config(
                &format!("node-{zone}"),
                "demo",
                &cert,
                endpoints.clone(),
                &store_url,
            );
            c.admin.address = loopback(ports[2 * i + 1]);
            c.grpc.address = grpc[i];
            c.schedule.interval = Some(Duration::from_secs(3600));
            c.deltas.flush_interval = Duration::from_millis(200);
            c.drill.etcdutl = tools::etcdutl()?;
            c.drill.etcd = tools::etcd(EtcdVersion::V3_5)?;
            c.drill.work_dir = Some(node.join("work"));
            c.restore.etcd_manifest.clone_from(&self.etcd[i].manifest);
            c.restore.state_dir = node.join("restore-state");
            c.restore.peers.clone_from(&peers);
            let config = write_named(self.dir.path(), &name, &c)?;
            let process = backup_process(&name, &config)?.spawn()?;
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
        let spec = LbSpec {
            pki: &self.pki,
            dir: self.dir.path(),
            members: ZONES
                .iter()
                .enumerate()
                .map(|(i, zone)| {
                    let id = i as u64 + 1;
                    config::lb_member(id, &format!("lb-{zone}"), zone, addr(i, 0), addr(i, 1))
                })
                .collect(),
        };
        let backends: Vec<BackendConfig> = self
            .apiservers
            .iter()
            .zip(ZONES)
            .map(|(server, zone)| {
                config::lb_backend(&format!("apiserver-{zone}"), server.addr(), zone)
            })
            .collect();
        for (i, zone) in ZONES.iter().enumerate() {
            let id = i as u64 + 1;
            let name = format!("lb-{zone}");
            let (mut c, _) = spec.node(id, &["127.0.0.1", "localhost"])?;
            c.admin.address = addr(i, 2);
            c.access.probers = Some(config::orgs(&["bulwark:probers"]));
            c.vip.mode = VipMode::Bind;
            c.vip.address = Some(self.vip.ip());
            c.vip.port = self.vip.port();
            c.backends.clone_from(&backends);
            c.proxy.connect_timeout = Duration::from_millis(300);
            c.proxy.shutdown_grace = Duration::from_secs(1);
            c.shutdown_grace = Duration::from_secs(5);
            let config = spec.write(&c)?;
            let process = lb_process(&name, &config)?.spawn()?;
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
        let targets: Vec<_> = self
            .apiservers
            .iter()
            .zip(ZONES)
            .map(|(server, zone)| {
                config::apiserver_target(&format!("apiserver-{zone}"), server.addr(), zone)
            })
            .collect();
        let endpoints: Vec<String> = self.lbs.iter().map(|l| l.api.to_string()).collect();
        for zone in ZONES {
            let name = format!("prober-{zone}");
            let admin = loopback(ports::loopback_port()?);
            let mut c = prober_config(&self.pki, &name, zone, targets.clone(), endpoints.clone())?;
            c.admin.address = admin;
            c.report.server_name = Some("localhost".into());
            let config = write_named(self.dir.path(), &name, &c)?;
            let process = prober_process(&name, &config)?.spawn()?;
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
        let endpoints = |addrs: &mut dyn Iterator<Item = SocketAddr>| ServiceEndpoints {
            endpoints: addrs.map(|a| a.to_string()).collect(),
            server_name: None,
        };
        let context = Context {
            name: "demo".into(),
            ca: Some(self.operator.ca.clone()),
            cert: Some(self.operator.cert.clone()),
            key: Some(self.operator.key.clone()),
            lb: Some(endpoints(&mut self.lbs.iter().map(|l| l.api))),
            backup: (!backup_endpoints.is_empty())
                .then(|| endpoints(&mut backup_endpoints.iter().copied())),
        };
        let ctl = CtlConfig {
            current_context: Some(context.name.clone()),
            contexts: vec![context],
        };
        config::write(&self.ctl_config, &ctl)?;
        Ok(())
    }
}
