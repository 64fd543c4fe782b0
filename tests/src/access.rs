//! The access-control matrix: every rpc of `bulwark_api::METHOD_ACCESS`
//! that a server hosts, called by every kind of caller, with the outcome
//! its declared access level demands. A new rpc is covered as soon as it
//! is in the protos.
//!
//! Calls carry an empty message (every request type decodes from zero
//! bytes) and are made with a codec that accepts any response, so one
//! generic call reaches any rpc; the matrix checks who gets *past*
//! authorization, not what the handler does with an empty request. The
//! access check runs before routing and before the handler, so a denied
//! caller gets `PERMISSION_DENIED` (or, without a certificate the server
//! trusts, no TLS session at all) immediately.

use std::fmt;
use std::time::Duration;

use bulwark_api::Access;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::pki::Pki;

/// Who calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Caller {
    /// `O=system:masters` from the server's CA.
    Operator,
    /// A bulwark-prober identity (`O=bulwark:prober`) from the server's CA.
    Prober,
    /// A peer of the same service (the organization the test configures).
    Peer,
    /// Any other identity from the server's CA (`O=system:nodes`).
    Viewer,
    /// An operator identity signed by another CA.
    ForeignCa,
    /// TLS without a client certificate.
    NoCertificate,
}

impl Caller {
    /// Every caller.
    pub const ALL: [Caller; 6] = [
        Caller::Operator,
        Caller::Prober,
        Caller::Peer,
        Caller::Viewer,
        Caller::ForeignCa,
        Caller::NoCertificate,
    ];

    /// Whether a server with operators, probers and peers configured lets
    /// this caller past authorization for an rpc declaring `access`.
    pub fn allowed(self, access: Access) -> bool {
        match self {
            Caller::ForeignCa | Caller::NoCertificate => false,
            _ if access == Access::Read => true,
            Caller::Operator => access == Access::Operator,
            Caller::Prober => access == Access::Prober,
            Caller::Peer => access == Access::Peer,
            Caller::Viewer => false,
        }
    }
}

/// Channels for every [`Caller`] to one server address.
pub struct Callers {
    channels: Vec<(Caller, Channel)>,
}

impl Callers {
    /// Channels to `address` (`host:port`, server certificate valid for
    /// `localhost`), identities from `pki`; `peer_org` is the organization
    /// the server lists as peers.
    pub fn new(pki: &Pki, address: &str, peer_org: &str) -> anyhow::Result<Self> {
        let foreign = Pki::with_ca_name("some other CA")?;
        let mut channels = Vec::new();
        for caller in Caller::ALL {
            let files = match caller {
                Caller::Operator => Some(pki.admin()?.tls_files()),
                Caller::Prober => Some(pki.client("prober-a", &["bulwark:prober"])?.tls_files()),
                Caller::Peer => Some(
                    pki.peer("peer-a", &[peer_org], &["127.0.0.1", "localhost"])?
                        .tls_files(),
                ),
                Caller::Viewer => Some(pki.client("viewer", &["system:nodes"])?.tls_files()),
                Caller::ForeignCa => {
                    // The foreign client trusts the real server; the server
                    // must not trust it.
                    let mut f = foreign.admin()?.tls_files();
                    f.ca_file = pki.ca_path().to_owned();
                    Some(f)
                }
                Caller::NoCertificate => None,
            };
            let channel = match files {
                Some(f) => bulwark_common::grpc::channel(address, &f.load()?, Some("localhost"))?,
                None => Endpoint::from_shared(format!("https://{address}"))?
                    .tls_config(
                        ClientTlsConfig::new()
                            .ca_certificate(Certificate::from_pem(pki.ca_pem()))
                            .domain_name("localhost"),
                    )?
                    .connect_timeout(Duration::from_secs(3))
                    .connect_lazy(),
            };
            channels.push((caller, channel));
        }
        Ok(Self { channels })
    }

    /// Calls `path` as every caller and compares with what `access`
    /// demands; returns one line per mismatch (empty: all as expected).
    pub async fn check(&self, path: &str, access: Access) -> Vec<String> {
        let mut wrong = Vec::new();
        for (caller, channel) in &self.channels {
            let outcome = call(channel.clone(), path).await;
            let expect_allowed = caller.allowed(access);
            let ok = match (&outcome, expect_allowed) {
                (Outcome::PastAuth(_), true) => true,
                (Outcome::Denied(c), false) => match caller {
                    Caller::ForeignCa | Caller::NoCertificate => {
                        matches!(
                            c,
                            Code::Unavailable
                                | Code::Unknown
                                | Code::Cancelled
                                | Code::Unauthenticated
                        )
                    }
                    _ => *c == Code::PermissionDenied,
                },
                _ => false,
            };
            if !ok {
                wrong.push(format!(
                    "{path} ({access:?}) as {caller:?}: expected {}, got {outcome}",
                    if expect_allowed {
                        "to pass authorization"
                    } else {
                        "a denial"
                    }
                ));
            }
        }
        wrong
    }
}

/// How one call ended, as far as authorization goes.
#[derive(Debug)]
pub enum Outcome {
    /// The handler ran (or the call is still running after the patience
    /// below: a denial is immediate): OK or its own error.
    PastAuth(String),
    /// Rejected: `PERMISSION_DENIED`, `UNAUTHENTICATED`, or no TLS session.
    Denied(Code),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::PastAuth(s) => write!(f, "past authorization ({s})"),
            Outcome::Denied(c) => write!(f, "denied ({c:?})"),
        }
    }
}

/// One call of `path` with an empty request message.
pub async fn call(channel: Channel, path: &str) -> Outcome {
    let attempt = async {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let path = http::uri::PathAndQuery::try_from(path.to_owned())
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        // Server streaming works for every rpc shape: one request message,
        // and the call is judged by the response headers.
        grpc.server_streaming(tonic::Request::new(()), path, codec)
            .await
            .map(drop)
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Err(_) => Outcome::PastAuth("still running after 10s".into()),
        Ok(Ok(())) => Outcome::PastAuth("OK".into()),
        Ok(Err(s)) => match s.code() {
            Code::PermissionDenied | Code::Unauthenticated => Outcome::Denied(s.code()),
            // No TLS session: the server's alert closes the connection and
            // the client's transport error surfaces as one of these.
            Code::Unavailable | Code::Unknown | Code::Cancelled if is_transport(&s) => {
                Outcome::Denied(s.code())
            }
            c => Outcome::PastAuth(format!("{c:?}: {}", s.message())),
        },
    }
}

fn is_transport(s: &tonic::Status) -> bool {
    let m = s.message().to_ascii_lowercase();
    [
        "transport",
        "connect",
        "tls",
        "broken pipe",
        "reset",
        "operation was canceled",
    ]
    .iter()
    .any(|k| m.contains(k))
}

/// The rpcs of `services` (full names, e.g. `bulwark.lb.v1.LoadBalancer`)
/// with their declared access, from the generated table.
pub fn methods_of(services: &[&str]) -> Vec<(&'static str, Access)> {
    bulwark_api::METHOD_ACCESS
        .iter()
        .filter(|(path, _)| {
            let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
            services.contains(&service)
        })
        .copied()
        .collect()
}
