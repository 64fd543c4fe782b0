//! Shared pieces of the prober's integration tests.
//!
//! [`LbDouble`] is a TEST DOUBLE of bulwark-lb's `ProbeReports` service, not
//! the real thing: a tonic server (served by bulwark-common's mTLS
//! `GrpcServer`, with the real access check for prober identities) whose
//! behaviour the test scripts — act as the leader and acknowledge, act as a
//! follower and hint at a leader (on an ack or on the call's status), ask
//! for a resync, drop every open stream, or stop reading. Everything it
//! receives goes to one channel, in order, so a test sees the exact report
//! sequence across servers and streams.

// Each test binary uses a part of this module.
#![allow(clippy::unwrap_used, dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_api::lb::v1::probe_reports_server::{ProbeReports, ProbeReportsServer};
use bulwark_api::lb::v1::{LeaderHint, ProbeReport, ProbeReportAck};
use bulwark_common::authz::{AccessPolicy, IdentityRule};
use bulwark_common::grpc::GrpcServer;
use bulwark_common::tls::TlsFiles;
use bulwark_testkit::{CertFiles, Pki};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// TLS files in bulwark-common's form.
pub fn tls_files(c: &CertFiles) -> TlsFiles {
    TlsFiles {
        cert_file: c.cert.clone(),
        key_file: c.key.clone(),
        ca_file: c.ca.clone(),
    }
}

/// How the double answers.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Acknowledge every report (and ask for heartbeats this often).
    Leader { heartbeat: Option<Duration> },
    /// Accept the stream, answer each report with a leader hint.
    FollowerAck(LeaderHint),
    /// Refuse the call: FAILED_PRECONDITION with a leader hint.
    FollowerStatus(LeaderHint),
    /// Refuse the call: UNAVAILABLE, no leader known.
    NoLeader,
}

struct State {
    name: &'static str,
    mode: Mutex<Mode>,
    resync_next: AtomicBool,
    paused: watch::Sender<bool>,
    /// Bumped to end every open stream.
    epoch: watch::Sender<u64>,
    received: mpsc::UnboundedSender<(&'static str, ProbeReport)>,
}

/// A running double; dropping it stops the server.
pub struct LbDouble {
    state: Arc<State>,
    address: String,
    stop: CancellationToken,
}

impl Drop for LbDouble {
    fn drop(&mut self) {
        // A graceful server shutdown would wait for open streams: end them.
        self.state.epoch.send_modify(|e| *e += 1);
        self.stop.cancel();
    }
}

impl LbDouble {
    /// Binds a port on 127.0.0.1 (for hints that must name it before it
    /// serves).
    pub async fn bind() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").await.unwrap()
    }

    /// Serves on `listener` as `name` with a server certificate from `pki`;
    /// `received` gets every report.
    pub fn serve(
        name: &'static str,
        listener: TcpListener,
        pki: &Pki,
        mode: Mode,
        received: mpsc::UnboundedSender<(&'static str, ProbeReport)>,
    ) -> Self {
        let address = listener.local_addr().unwrap().to_string();
        let cert = pki.server(name, &["127.0.0.1", "localhost"]).unwrap();
        let material = tls_files(&cert).load().unwrap();
        let state = Arc::new(State {
            name,
            mode: Mutex::new(mode),
            resync_next: AtomicBool::new(false),
            paused: watch::Sender::new(false),
            epoch: watch::Sender::new(0),
            received,
        });
        let policy = AccessPolicy {
            probers: Some(IdentityRule {
                common_names: Vec::new(),
                organizations: vec!["bulwark:probers".into()],
            }),
            ..AccessPolicy::default()
        };
        let stop = CancellationToken::new();
        let server = GrpcServer::new().add_service(ProbeReportsServer::new(Handler(state.clone())));
        let token = stop.clone();
        tokio::spawn(async move { server.serve(listener, &material, policy, token).await });
        Self {
            state,
            address,
            stop,
        }
    }

    /// host:port.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A hint naming this double as the leader.
    pub fn hint(&self, node_id: u64) -> LeaderHint {
        LeaderHint {
            node_id,
            address: self.address.clone(),
        }
    }

    /// Changes how new reports and calls are answered.
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// The ack of the next report received asks for a FULL report.
    pub fn resync_next(&self) {
        self.state.resync_next.store(true, Ordering::SeqCst);
    }

    /// Ends every open stream (the prober sees the stream close).
    pub fn drop_streams(&self) {
        self.state.epoch.send_modify(|e| *e += 1);
    }

    /// Stops (true) or resumes (false) reading reports.
    pub fn pause(&self, paused: bool) {
        self.state.paused.send_replace(paused);
    }
}

/// A client identity the double accepts.
pub fn prober_identity(pki: &Pki, name: &str) -> TlsFiles {
    tls_files(&pki.client(name, &["bulwark:probers"]).unwrap())
}

struct Handler(Arc<State>);

#[tonic::async_trait]
impl ProbeReports for Handler {
    type ReportStream = ReceiverStream<Result<ProbeReportAck, Status>>;

    async fn report(
        &self,
        request: Request<Streaming<ProbeReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let mode = self.0.mode.lock().unwrap().clone();
        match mode {
            Mode::FollowerStatus(hint) => {
                return Err(bulwark_api::leader_hint::not_leader(Some(&hint)));
            }
            Mode::NoLeader => return Err(bulwark_api::leader_hint::not_leader(None)),
            Mode::Leader { .. } | Mode::FollowerAck(_) => {}
        }
        let state = self.0.clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut epoch = state.epoch.subscribe();
            epoch.borrow_and_update();
            let mut paused = state.paused.subscribe();
            loop {
                // While paused, read nothing: the prober's sends back up.
                tokio::select! {
                    _ = paused.wait_for(|p| !p) => {}
                    _ = epoch.changed() => return,
                }
                let message = tokio::select! {
                    m = inbound.message() => m,
                    _ = epoch.changed() => return,
                };
                let Ok(Some(report)) = message else { return };
                let _ = state.received.send((state.name, report.clone()));
                let mode = state.mode.lock().unwrap().clone();
                let ack = match mode {
                    Mode::Leader { heartbeat } => ProbeReportAck {
                        accepted_sequence: report.sequence,
                        leader_hint: None,
                        resync_required: state.resync_next.swap(false, Ordering::SeqCst),
                        heartbeat_interval: heartbeat
                            .map(|d| bulwark_api::time::duration_to_proto(d).unwrap()),
                    },
                    Mode::FollowerAck(hint) | Mode::FollowerStatus(hint) => ProbeReportAck {
                        leader_hint: Some(hint),
                        ..Default::default()
                    },
                    Mode::NoLeader => return,
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The next report received, or a panic after `within`.
pub async fn next_report(
    rx: &mut mpsc::UnboundedReceiver<(&'static str, ProbeReport)>,
    within: Duration,
) -> (&'static str, ProbeReport) {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("no report arrived in time")
        .expect("every double is gone")
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `within`
/// naming `what`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
