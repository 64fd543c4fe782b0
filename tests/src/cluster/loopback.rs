//! A bulwark-lb cluster of real `bulwark-lb` processes on loopback, for the
//! cluster tests: a test PKI (LB peers `O=bulwark:lb`, an operator, a
//! viewer), one config per node, ephemeral ports, bind-mode VIP on a
//! 127.0.0.0/8 address, and mTLS gRPC clients.

// Test helpers panic rather than return errors: a panic in the calling test
// is what prints the processes' logs (see the crate docs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use bulwark_common::tls::TlsMaterial;
use bulwark_lb::config::{BackendConfig, VipMode};
use tonic::transport::Channel;

use super::{LbSpec, lb_process, test_timers};
use crate::{CertFiles, Pki, Process, TestDir, config, ports};

/// One node's process and addresses.
pub struct LbNode {
    pub id: u64,
    pub process: Process,
    pub raft: SocketAddr,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    /// The node-local listener, with [`Options::local_listeners`].
    pub local: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub config: PathBuf,
}

/// A running cluster.
pub struct LbCluster {
    pub pki: Pki,
    pub nodes: Vec<LbNode>,
    pub vip: SocketAddr,
    pub operator: TlsMaterial,
    pub operator_files: CertFiles,
    pub viewer: TlsMaterial,
    pub peer_files: CertFiles,
    // Held for its files: the configs and data dirs.
    _dir: TestDir,
}

/// Cluster options.
#[derive(Default)]
pub struct Options {
    pub nodes: u64,
    /// Backends (id, address) seeded from the config.
    pub backends: Vec<(String, SocketAddr)>,
    /// The VIP; `None` picks one with [`new_vip`].
    pub vip: Option<SocketAddr>,
    /// `raft.snapshotEveryEntries`; `None` keeps the default.
    pub snapshot_every: Option<u64>,
    /// Zone of each backend, by position in `backends` (missing: none).
    pub backend_zones: Vec<String>,
    /// Give every node a node-local listener on 127.0.0.1 (its address
    /// in [`LbNode::local`]).
    pub local_listeners: bool,
    /// Raft and VIP timers that tolerate a loaded machine: heartbeats
    /// every 200 ms, an election timeout of 1.5–3 s, a 1 s VIP lease. For
    /// tests that count failed requests over many seconds and measure no
    /// failover: with the defaults (a heartbeat must be answered within
    /// 50 ms) a busy machine lapses the leader's quorum acknowledgement,
    /// and writes fail with "retry shortly" for reasons of CPU alone.
    pub relaxed_timers: bool,
}

/// A VIP:port of its own on loopback (127.77.0.0/16), so parallel tests do
/// not meet.
pub fn new_vip() -> SocketAddr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    let ip = IpAddr::V4(Ipv4Addr::new(
        127,
        77,
        (pid % 250) as u8,
        (n % 250) as u8 + 2,
    ));
    SocketAddr::new(ip, ports::free_port(ip).unwrap())
}

impl LbCluster {
    /// Starts `opts.nodes` nodes and waits until one holds the VIP.
    pub async fn start(opts: Options) -> Self {
        crate::install_crypto_provider();
        Self::start_with_pki(Pki::new().unwrap(), opts).await
    }

    /// [`LbCluster::start`] with certificates from `pki` (shared with
    /// fixture apiservers).
    pub async fn start_with_pki(pki: Pki, opts: Options) -> Self {
        crate::install_crypto_provider();
        let dir = TestDir::new("lb-cluster").unwrap();
        let operator_files = pki.admin().unwrap();
        let operator = config::tls(&operator_files).load().unwrap();
        let viewer = config::tls(&pki.client("viewer", &["system:nodes"]).unwrap())
            .load()
            .unwrap();
        // A VIP address of its own on loopback, so parallel tests do not meet.
        let vip = opts.vip.unwrap_or_else(new_vip);

        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let ports = ports::free_ports(loopback, 4 * opts.nodes as usize).unwrap();
        let addr = |i: u64, k: usize| SocketAddr::new(loopback, ports[i as usize * 4 + k]);
        let spec = LbSpec {
            pki: &pki,
            dir: dir.path(),
            members: (0..opts.nodes)
                .map(|i| {
                    let id = i + 1;
                    config::lb_member(id, &format!("lb-{id}"), "", addr(i, 0), addr(i, 1))
                })
                .collect(),
        };
        let backends: Vec<BackendConfig> = opts
            .backends
            .iter()
            .enumerate()
            .map(|(i, (id, a))| {
                let zone = opts.backend_zones.get(i).map_or("", String::as_str);
                config::lb_backend(id, *a, zone)
            })
            .collect();

        let peer_files = pki
            .peer("lb-peer", &["bulwark:lb"], &["127.0.0.1", "localhost"])
            .unwrap();
        let mut nodes = Vec::new();
        for i in 0..opts.nodes {
            let id = i + 1;
            let local = opts.local_listeners.then_some(addr(i, 3));
            let (mut c, _) = spec.node(id, &["127.0.0.1", "localhost"]).unwrap();
            if let Some(n) = opts.snapshot_every {
                c.raft.snapshot_every_entries = n;
            }
            c.admin.address = addr(i, 2);
            c.access.probers = Some(config::orgs(&["bulwark:probers"]));
            c.vip.mode = VipMode::Bind;
            c.vip.address = Some(vip.ip());
            c.vip.port = vip.port();
            c.backends.clone_from(&backends);
            test_timers(&mut c);
            if opts.relaxed_timers {
                c.raft.heartbeat_interval = Duration::from_millis(200);
                c.raft.election_timeout_min = Duration::from_millis(1500);
                c.raft.election_timeout_max = Duration::from_millis(3000);
                c.vip.lease = Duration::from_secs(1);
            }
            c.local_listener = local;
            let config = spec.write(&c).unwrap();
            let process = lb_process(&format!("lb-{id}"), &config)
                .unwrap()
                .spawn()
                .unwrap();
            nodes.push(LbNode {
                id,
                process,
                raft: addr(i, 0),
                api: addr(i, 1),
                admin: addr(i, 2),
                local,
                data_dir: c.data_dir,
                config,
            });
        }
        let cluster = Self {
            pki,
            nodes,
            vip,
            operator,
            operator_files,
            viewer,
            peer_files,
            _dir: dir,
        };
        for n in &cluster.nodes {
            n.process
                .wait_for_port(n.api, Duration::from_secs(30))
                .await
                .unwrap();
        }
        cluster.wait_for_holder(None, Duration::from_secs(30)).await;
        cluster
    }

    pub fn node(&self, id: u64) -> &LbNode {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }

    pub fn node_mut(&mut self, id: u64) -> &mut LbNode {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap()
    }

    /// An operator client to node `id`.
    pub fn client(&self, id: u64) -> LoadBalancerClient<Channel> {
        self.client_as(id, &self.operator)
    }

    pub fn client_as(&self, id: u64, tls: &TlsMaterial) -> LoadBalancerClient<Channel> {
        let addr = self.node(id).api.to_string();
        LoadBalancerClient::new(bulwark_common::grpc::channel(&addr, tls, None).unwrap())
    }

    /// Status of node `id`, if it answers.
    pub async fn status(&self, id: u64) -> Option<lb::GetStatusResponse> {
        let mut c = self.client(id);
        tokio::time::timeout(
            Duration::from_secs(2),
            c.get_status(lb::GetStatusRequest::default()),
        )
        .await
        .ok()?
        .ok()
        .map(|r| r.into_inner())
    }

    /// Nodes that say they hold the VIP now (lease_remaining is only set
    /// on the holder).
    pub async fn holders(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for n in &self.nodes {
            if !n.process.is_running() {
                continue;
            }
            if let Some(s) = self.status(n.id).await
                && s.vip.as_ref().is_some_and(|v| v.lease_remaining.is_some())
            {
                out.push(n.id);
            }
        }
        out
    }

    /// Waits until exactly one running node other than `not` holds the VIP
    /// and a client connect to it succeeds; returns the holder.
    pub async fn wait_for_holder(&self, not: Option<u64>, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let holders = self.holders().await;
            if holders.len() == 1
                && Some(holders[0]) != not
                && tokio::net::TcpStream::connect(self.vip).await.is_ok()
            {
                return holders[0];
            }
            assert!(
                Instant::now() < deadline,
                "no single VIP holder (other than {not:?}) within {timeout:?}; holders now: {holders:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `id` lists `n` backends.
    pub async fn wait_for_backends(&self, id: u64, n: usize) -> lb::ListBackendsResponse {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let list = self
                .client(id)
                .list_backends(lb::ListBackendsRequest::default())
                .await
                .unwrap()
                .into_inner();
            if list.backends.len() == n {
                return list;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} lists {:?}, expected {n} backends",
                list.backends
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `id` shows a failover to `to` as the latest (the
    /// new holder commits its record right after claiming).
    pub async fn wait_for_failover(&self, id: u64, to: u64) -> lb::Failover {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(f) = self
                .status(id)
                .await
                .and_then(|s| s.recent_failovers.into_iter().next())
                .filter(|f| f.to_node_id == to)
            {
                return f;
            }
            assert!(
                Instant::now() < deadline,
                "no failover record to node {to} on node {id}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader as node `id` sees it.
    pub async fn leader(&self, id: u64) -> Option<u64> {
        self.status(id).await.and_then(|s| s.leader).map(|l| l.id)
    }
}

/// An echo server on 127.0.0.1 (a stand-in backend for TCP-level tests).
pub async fn echo_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, serve_echo(listener))
}

/// Echoes every connection `listener` accepts until the task is aborted.
pub fn serve_echo(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

/// Sends `msg` through `addr` and reads the echo.
pub async fn echo_through(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    s.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    Ok(buf)
}
