//! One probe: connect, ask, and classify the answer into an [`Outcome`]
//! with a reason (ok, HTTP status, timeout, TLS error, refused, reset, DNS,
//! other) and the latency.
//!
//! - [`http`]: HTTPS `GET` (`/readyz`, `/livez` on apiservers, `/health` on
//!   etcd members), the serving certificate verified against the configured
//!   CA, optionally with a client certificate;
//! - [`tcp`]: a plain TCP connect;
//! - [`tls`]: the client TLS config of a probe group, following its files.
//!
//! Each probe runs under one overall timeout; when it fires, the outcome
//! names the stage that was still waiting (connect, TLS handshake,
//! response), which is what an operator needs to tell a dead host from a
//! hung process.

pub mod http;
pub mod tcp;
pub mod tls;

use std::fmt;
use std::io;
use std::time::{Duration, SystemTime};

use bulwark_api::lb::v1::{Observation, ProbeKind, ProbeReason};

/// Longest `detail` text sent to the LB (lb.proto: at most 1 KiB).
pub const MAX_DETAIL: usize = 1024;

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the probe passed.
    pub ok: bool,
    /// The class of the result.
    pub reason: ProbeReason,
    /// Human detail: the error, or the start of a failing response body.
    pub detail: String,
    /// HTTP status, when a response arrived.
    pub http_status: Option<u16>,
    /// From starting to resolve/connect to the end of the answer or the
    /// failure.
    pub latency: Duration,
    /// When it finished, by this host's clock.
    pub observed_at: SystemTime,
}

impl Outcome {
    pub(crate) fn passed(http_status: Option<u16>, latency: Duration) -> Self {
        Self {
            ok: true,
            reason: ProbeReason::Ok,
            detail: String::new(),
            http_status,
            latency,
            observed_at: SystemTime::now(),
        }
    }

    pub(crate) fn failed(failure: Failure, latency: Duration) -> Self {
        Self {
            ok: false,
            reason: failure.reason,
            detail: truncate(failure.detail),
            http_status: failure.http_status,
            latency,
            observed_at: SystemTime::now(),
        }
    }

    /// The wire form for the report stream.
    pub fn to_observation(&self, target_id: &str, address: &str, kind: ProbeKind) -> Observation {
        Observation {
            target_id: target_id.to_owned(),
            target_address: address.to_owned(),
            kind: kind as i32,
            ok: self.ok,
            reason: self.reason as i32,
            detail: self.detail.clone(),
            http_status: self.http_status.map(u32::from),
            // Both conversions fail only for spans of thousands of years.
            latency: bulwark_api::time::duration_to_proto(self.latency).ok(),
            observed_at: bulwark_api::time::timestamp_to_proto(self.observed_at).ok(),
        }
    }
}

/// Why a probe failed, before the latency is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub reason: ProbeReason,
    pub detail: String,
    pub http_status: Option<u16>,
}

impl Failure {
    pub fn new(reason: ProbeReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            http_status: None,
        }
    }

    /// Classifies an I/O error from connecting, the TLS handshake or the
    /// exchange. `during` says what was going on, for the detail.
    pub fn io(during: Stage, e: &io::Error) -> Self {
        use io::ErrorKind as K;
        let reason = match e.kind() {
            K::ConnectionRefused => ProbeReason::ConnectionRefused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                ProbeReason::ConnectionReset
            }
            K::TimedOut => ProbeReason::Timeout,
            // tokio-rustls reports handshake failures (bad certificate,
            // alert from the peer) as an io::Error wrapping rustls::Error.
            _ if e
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
            {
                ProbeReason::TlsError
            }
            _ => ProbeReason::Other,
        };
        Self::new(reason, format!("{during}: {e}"))
    }
}

/// Where a probe was when it failed or timed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Resolving the host name.
    Resolving,
    /// Waiting for the TCP connect.
    Connecting,
    /// Waiting for the TLS handshake.
    TlsHandshake,
    /// Waiting for the HTTP response.
    Response,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Resolving => "resolving",
            Stage::Connecting => "connecting",
            Stage::TlsHandshake => "TLS handshake",
            Stage::Response => "waiting for the response",
        })
    }
}

/// Resolves `host:port`; every address, in resolver order.
pub(crate) async fn resolve(host: &str, port: u16) -> Result<Vec<std::net::SocketAddr>, Failure> {
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            if addrs.is_empty() {
                Err(Failure::new(
                    ProbeReason::Dns,
                    format!("resolving {host}: no addresses"),
                ))
            } else {
                Ok(addrs)
            }
        }
        Err(e) => Err(Failure::new(
            ProbeReason::Dns,
            format!("resolving {host}: {e}"),
        )),
    }
}

/// Connects to the first address that accepts; the last error otherwise.
pub(crate) async fn connect(
    addrs: &[std::net::SocketAddr],
) -> Result<tokio::net::TcpStream, Failure> {
    let mut last = None;
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                // Requests are single small writes; do not wait for more.
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(Failure::io(Stage::Connecting, &e)),
        }
    }
    Err(last.unwrap_or_else(|| Failure::new(ProbeReason::Dns, "no address to connect to")))
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_DETAIL {
        let mut cut = MAX_DETAIL;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_reasons() {
        let r = |kind| Failure::io(Stage::Connecting, &io::Error::from(kind)).reason;
        assert_eq!(
            r(io::ErrorKind::ConnectionRefused),
            ProbeReason::ConnectionRefused
        );
        assert_eq!(
            r(io::ErrorKind::ConnectionReset),
            ProbeReason::ConnectionReset
        );
        assert_eq!(
            r(io::ErrorKind::UnexpectedEof),
            ProbeReason::ConnectionReset
        );
        assert_eq!(r(io::ErrorKind::TimedOut), ProbeReason::Timeout);
        assert_eq!(r(io::ErrorKind::PermissionDenied), ProbeReason::Other);
        let tls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let f = Failure::io(Stage::TlsHandshake, &tls);
        assert_eq!(f.reason, ProbeReason::TlsError);
        assert!(
            f.detail
                .starts_with("TLS handshake: invalid peer certificate"),
            "{}",
            f.detail
        );
    }

    #[test]
    fn details_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_DETAIL);
        let cut = truncate(long);
        assert!(cut.len() <= MAX_DETAIL && cut.len() >= MAX_DETAIL - 1);
        assert_eq!(truncate("short".into()), "short");
    }

    #[tokio::test]
    async fn unresolvable_hosts_are_dns_failures() {
        let f = resolve("no-such-host.invalid", 443).await.unwrap_err();
        assert_eq!(f.reason, ProbeReason::Dns);
    }
}
