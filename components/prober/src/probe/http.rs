//! HTTPS health probes: `GET /readyz`, `GET /livez` on an apiserver,
//! `GET /health` on an etcd member.
//!
//! By default every probe opens a fresh TCP connection and TLS session and
//! sends `Connection: close`. A health check must see what a *new* client of
//! the apiserver sees — the load balancer opens new connections all the
//! time — and a kept-alive connection hides exactly the failures that
//! matter: a listener that closed (the last step of the apiserver's
//! shutdown) still serves requests on connections accepted before, and a
//! full accept queue or an expired certificate never shows on an existing
//! session. The price is one handshake per probe, measured in
//! docs/HEALTH.md. With `reuseConnections` the connection is kept, and a
//! probe whose kept connection fails is retried at once on a fresh one, so
//! an idle close by the server is not a failure.
//!
//! Why etcd's `/health` rather than the gRPC `Maintenance.Status`: `/health`
//! answers whether the member can serve (it has a leader, no alarm such as
//! NOSPACE, and, without `serializable`, a linearizable read goes through
//! Raft), which is the question; `Status` only reports the member's raft
//! indexes and leaves the judgement to us. It also keeps one probe path —
//! same TLS, same reasons, same fresh-connection behaviour — and no gRPC
//! client per etcd member.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_api::lb::v1::ProbeReason;
use bulwark_common::tls::{TlsError, load_certs, load_key};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::task::AbortHandle;
use tokio_rustls::TlsConnector;

use super::tls::ProbeTlsConfig;
use super::{Failure, Outcome, Stage, connect, resolve};
use crate::config::{ProbeTls, split_address};

/// Largest response body read; health answers are a few hundred bytes
/// (`?verbose` lists are a few KiB).
const MAX_BODY: usize = 64 * 1024;

/// What makes an answer a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Any 2xx status (`/readyz`, `/livez`).
    Success,
    /// 200 with etcd's JSON `{"health":"true"}` (`/health`).
    EtcdHealth,
}

/// A rustls client config trusting `tls.ca_file`, presenting the client
/// certificate when one is configured, speaking HTTP/1.1.
pub fn client_config(tls: &ProbeTls) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&tls.ca_file, "CA bundle")? {
        roots
            .add(ca)
            .map_err(TlsError::rustls("adding CA certificate"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(bulwark_common::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::rustls("protocol versions"))?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert, "client certificate")?, load_key(key)?)
            .map_err(TlsError::rustls("client certificate and key"))?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why an HTTP probe could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpProbeError {
    /// The address is not host:port.
    #[error("invalid address: {0}")]
    Address(String),
    /// The name to verify the certificate against is not a DNS name or IP.
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// A kept-alive connection (with `reuseConnections`).
struct Kept {
    sender: SendRequest<Empty<Bytes>>,
    driver: AbortHandle,
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One HTTPS health endpoint on one target.
pub struct HttpProbe {
    host: String,
    port: u16,
    authority: String,
    server_name: ServerName<'static>,
    path: &'static str,
    expect: Expect,
    tls: ProbeTlsConfig,
    reuse: bool,
    kept: Option<Kept>,
}

impl std::fmt::Debug for HttpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProbe")
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field("reuse", &self.reuse)
            .finish_non_exhaustive()
    }
}

impl HttpProbe {
    /// A probe of `https://<address><path>`, verifying the certificate
    /// under `server_name` (default: the host of `address`).
    pub fn new(
        address: &str,
        server_name: Option<&str>,
        path: &'static str,
        expect: Expect,
        tls: impl Into<ProbeTlsConfig>,
        reuse: bool,
    ) -> Result<Self, HttpProbeError> {
        let (host, port) = split_address(address).map_err(HttpProbeError::Address)?;
        let name = server_name.unwrap_or(&host).to_owned();
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| HttpProbeError::ServerName(name))?;
        Ok(Self {
            host,
            port,
            authority: address.to_owned(),
            server_name,
            path,
            expect,
            tls: tls.into(),
            reuse,
            kept: None,
        })
    }

    /// Runs one probe within `timeout`.
    pub async fn run(&mut self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let mut stage = Stage::Resolving;
        let result = tokio::time::timeout(timeout, self.attempt(&mut stage)).await;
        let latency = start.elapsed();
        match result {
            Ok(Ok((status, body))) => match self.judge(status, &body) {
                Ok(()) => Outcome::passed(Some(status.as_u16()), latency),
                Err(f) => Outcome::failed(f, latency),
            },
            Ok(Err(f)) => {
                self.kept = None;
                Outcome::failed(f, latency)
            }
            Err(_) => {
                self.kept = None;
                Outcome::failed(
                    Failure::new(
                        ProbeReason::Timeout,
                        format!("no answer within {} ms ({stage})", timeout.as_millis()),
                    ),
                    latency,
                )
            }
        }
    }

    async fn attempt(&mut self, stage: &mut Stage) -> Result<(http::StatusCode, Bytes), Failure> {
        if self.kept.as_ref().is_some_and(|k| !k.sender.is_closed()) {
            *stage = Stage::Response;
            let request = self.request()?;
            if let Some(kept) = self.kept.as_mut() {
                match exchange(&mut kept.sender, request).await {
                    Ok(answer) => return Ok(answer),
                    // The server may close idle connections; that says
                    // nothing about its health. Try a fresh one below.
                    Err(_) => self.kept = None,
                }
            }
        }
        let mut kept = self.open(stage).await?;
        *stage = Stage::Response;
        let request = self.request()?;
        let answer = exchange(&mut kept.sender, request).await?;
        if self.reuse {
            self.kept = Some(kept);
        }
        Ok(answer)
    }

    async fn open(&self, stage: &mut Stage) -> Result<Kept, Failure> {
        *stage = Stage::Resolving;
        let addrs = resolve(&self.host, self.port).await?;
        *stage = Stage::Connecting;
        let tcp = connect(&addrs).await?;
        *stage = Stage::TlsHandshake;
        // The config current now: a renewed client certificate is used
        // from the next connection on.
        let tls = TlsConnector::from(self.tls.current())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| Failure::io(Stage::TlsHandshake, &e))?;
        *stage = Stage::Response;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| hyper_failure(Stage::Response, &e))?;
        // The connection task ends when the connection does; aborting it
        // (when the probe is done or the kept connection is dropped)
        // closes the socket.
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        })
        .abort_handle();
        Ok(Kept { sender, driver })
    }

    fn request(&self) -> Result<http::Request<Empty<Bytes>>, Failure> {
        let mut builder = http::Request::get(self.path)
            .header(http::header::HOST, &self.authority)
            .header(
                http::header::USER_AGENT,
                concat!("bulwark-prober/", env!("CARGO_PKG_VERSION")),
            )
            .header(http::header::ACCEPT, "*/*");
        if !self.reuse {
            builder = builder.header(http::header::CONNECTION, "close");
        }
        builder
            .body(Empty::new())
            .map_err(|e| Failure::new(ProbeReason::Other, format!("building the request: {e}")))
    }

    fn judge(&self, status: http::StatusCode, body: &[u8]) -> Result<(), Failure> {
        let text = || String::from_utf8_lossy(body).trim().to_owned();
        let http_failure = || Failure {
            reason: ProbeReason::HttpStatus,
            detail: text(),
            http_status: Some(status.as_u16()),
        };
        match self.expect {
            Expect::Success if status.is_success() => Ok(()),
            Expect::Success => Err(http_failure()),
            Expect::EtcdHealth if status != http::StatusCode::OK => Err(http_failure()),
            Expect::EtcdHealth => {
                #[derive(serde::Deserialize)]
                struct Health {
                    health: String,
                    #[serde(default)]
                    reason: String,
                }
                match serde_json::from_slice::<Health>(body) {
                    Ok(h) if h.health == "true" => Ok(()),
                    Ok(h) => Err(Failure {
                        reason: ProbeReason::Other,
                        detail: format!("etcd reports health={} {}", h.health, h.reason),
                        http_status: Some(200),
                    }),
                    Err(e) => Err(Failure {
                        reason: ProbeReason::Other,
                        detail: format!("not an etcd /health answer ({e}): {}", text()),
                        http_status: Some(200),
                    }),
                }
            }
        }
    }
}

/// Sends the request and reads the whole (bounded) body.
async fn exchange(
    sender: &mut SendRequest<Empty<Bytes>>,
    request: http::Request<Empty<Bytes>>,
) -> Result<(http::StatusCode, Bytes), Failure> {
    sender
        .ready()
        .await
        .map_err(|e| hyper_failure(Stage::Response, &e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| hyper_failure(Stage::Response, &e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            match e.downcast::<hyper::Error>() {
                Ok(e) => hyper_failure(Stage::Response, &e),
                // Limited's only other error: the body is too long.
                Err(e) => Failure::new(ProbeReason::Other, format!("reading the body: {e}")),
            }
        })?
        .to_bytes();
    Ok((status, body))
}

/// Classifies a hyper error by the I/O error under it when there is one.
fn hyper_failure(stage: Stage, e: &hyper::Error) -> Failure {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Failure::io(stage, io);
        }
        source = s.source();
    }
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        Failure::new(
            ProbeReason::ConnectionReset,
            format!("{stage}: connection closed before an answer ({e})"),
        )
    } else {
        Failure::new(ProbeReason::Other, format!("{stage}: {e}"))
    }
}
