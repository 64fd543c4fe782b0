//! In-process backends and a proxy on 127.0.0.1, port 0, for the data-path
//! tests. Each backend announces its id in a first line, so a test can see
//! which backend answered, then behaves per its [`Mode`].

// Test helpers: a failed bind or a broken socket should fail the test loudly,
// and not every test binary uses every helper.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bulwark_lb::backends::{
    AdminState, BackendSpec, Backends, RoutingMode, RoutingPolicy, Verdict,
};
use bulwark_lb::proxy::{self, ProxyConfig};
use bulwark_testkit::ports::ClosedPort;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// What a backend does after announcing itself.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Echo everything until the client's FIN, then FIN.
    Echo,
    /// Send `hello`, FIN at once, then count what the client still sends.
    CloseFirst,
}

/// A backend listening on 127.0.0.1.
pub struct TestBackend {
    pub id: String,
    pub address: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    /// Bytes received by `CloseFirst` connections after their FIN.
    pub received_after_fin: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TestBackend {
    pub async fn start(id: &str, mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let received_after_fin = Arc::new(AtomicUsize::new(0));
        let (a, r, name) = (accepted.clone(), received_after_fin.clone(), id.to_owned());
        let task = tokio::spawn(async move {
            // Dropping this task (kill) drops the listener and every
            // connection with it, like a process dying.
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (name, r) = (name.clone(), r.clone());
                conns.spawn(async move {
                    if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                        return;
                    }
                    match mode {
                        Mode::Echo => {
                            let (mut rd, mut wr) = s.split();
                            let _ = tokio::io::copy(&mut rd, &mut wr).await;
                            let _ = wr.shutdown().await;
                        }
                        Mode::CloseFirst => {
                            let _ = s.write_all(b"hello").await;
                            let _ = s.shutdown().await;
                            let mut buf = vec![0u8; 64 * 1024];
                            while let Ok(n) = s.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                r.fetch_add(n, Ordering::SeqCst);
                            }
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Self {
            id: id.to_owned(),
            address,
            accepted,
            received_after_fin,
            task,
        }
    }

    /// Drops the listener and every open connection, and returns once they
    /// are gone (abort alone only requests it; a connect could still land
    /// in the dying listener's backlog).
    pub async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    pub fn spec(&self, zone: &str) -> BackendSpec {
        healthy_spec(&self.id, self.address, zone)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend address where nothing listens, held closed while this lives
/// (a released port could be taken by a parallel test's listener).
pub struct ClosedBackend {
    pub id: String,
    port: ClosedPort,
}

impl ClosedBackend {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.into(),
            port: ClosedPort::loopback().unwrap(),
        }
    }

    pub fn spec(&self, zone: &str) -> BackendSpec {
        healthy_spec(&self.id, self.port.address(), zone)
    }
}

/// A backend whose host hangs: connects to it are never answered. Its
/// listener's accept queue holds one connection, that one is taken, and
/// nothing accepts, so the kernel drops every later SYN (as a host that
/// went dark, or an apiserver whose accept queue overflowed).
pub struct HungBackend {
    pub id: String,
    address: SocketAddr,
    _listener: TcpListener,
    _filler: TcpStream,
}

impl HungBackend {
    pub async fn start(id: &str) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let address = listener.local_addr().unwrap();
        let filler = TcpStream::connect(address).await.unwrap();
        Self {
            id: id.into(),
            address,
            _listener: listener,
            _filler: filler,
        }
    }

    pub fn spec(&self, zone: &str) -> BackendSpec {
        healthy_spec(&self.id, self.address, zone)
    }
}

/// An active, healthy backend of weight 1 (no prober has said otherwise).
fn healthy_spec(id: &str, address: SocketAddr, zone: &str) -> BackendSpec {
    BackendSpec {
        id: id.into(),
        address,
        zone: zone.into(),
        weight: 1,
        admin: AdminState::Active,
        verdict: Verdict::Healthy,
    }
}

/// A running proxy.
pub struct TestProxy {
    pub address: SocketAddr,
    pub backends: Backends,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), proxy::ProxyError>>,
}

impl TestProxy {
    /// A balanced listener (the VIP's default) over `specs`.
    pub async fn start(
        config: ProxyConfig,
        policy: RoutingPolicy,
        specs: Vec<BackendSpec>,
    ) -> Self {
        Self::start_mode(config, policy, RoutingMode::Balanced, specs).await
    }

    /// A listener routing in `mode` over `specs`.
    pub async fn start_mode(
        config: ProxyConfig,
        policy: RoutingPolicy,
        mode: RoutingMode,
        specs: Vec<BackendSpec>,
    ) -> Self {
        // The recorder first: per-backend counters are registered when the
        // backends are published.
        bulwark_common::telemetry::metrics_handle();
        let backends = Backends::new(policy);
        backends.publish(specs, 1).unwrap();
        Self::serve(config, backends.with_mode(mode)).await
    }

    /// A listener serving through `backends` (and its mode): several
    /// listeners may share one registry, as a node's VIP and local ones do.
    pub async fn serve(config: ProxyConfig, backends: Backends) -> Self {
        bulwark_common::telemetry::metrics_handle();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(proxy::serve(
            listener,
            backends.clone(),
            Arc::new(config),
            shutdown.clone(),
        ));
        Self {
            address,
            backends,
            shutdown,
            task,
        }
    }

    /// Publishes `specs` as the next version.
    pub fn publish(&self, specs: Vec<BackendSpec>) {
        let v = self.backends.load().version() + 1;
        self.backends.publish(specs, v).unwrap();
    }

    /// Connects and reads the answering backend's id line.
    pub async fn connect(&self) -> std::io::Result<(String, BufReader<TcpStream>)> {
        let s = TcpStream::connect(self.address).await?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok((line.trim_end().to_owned(), r))
    }
}

/// Sends `data` and expects it echoed back, through `conn`.
pub async fn roundtrip(conn: &mut BufReader<TcpStream>, data: &[u8]) -> std::io::Result<()> {
    conn.get_mut().write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    conn.read_exact(&mut back).await?;
    if back != data {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A 64-bit FNV-1a checksum.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Waits until `f` holds, up to `limit`.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}
