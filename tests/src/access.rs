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

/// Calls `path` with `body` as the raw request message (not necessarily
/// valid protobuf) and returns the status the server answered with, after
/// reading every answer of a stream (`Ok` when it ended cleanly). For
/// hostile-input tests.
pub async fn call_raw(channel: Channel, path: &str, body: Vec<u8>) -> Result<(), tonic::Status> {
    let attempt = async {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::try_from(path.to_owned())
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let mut answers = grpc
            .server_streaming(tonic::Request::new(body), path, RawCodec)
            .await?
            .into_inner();
        // A streaming handler answers its headers first and its verdict on
        // the request in the stream (or its trailers): read it all.
        while answers.message().await?.is_some() {}
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer within 10s")))
}

/// Passes bytes through unchanged, both ways.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Request bodies no protobuf decoder accepts: field 0 with the invalid
/// wire type 7 first, then noise, short and long (over tonic's 4 MiB
/// default limit).
pub fn garbage_bodies() -> Vec<Vec<u8>> {
    let noise = |n: usize| -> Vec<u8> {
        let mut v = vec![0x07];
        v.extend((0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]));
        v
    };
    vec![noise(16), noise(64 * 1024), noise(5 << 20)]
}

/// Sends every [`garbage_bodies`] body to `path`; returns one line per
/// answer that is not a clean decode error (`INVALID_ARGUMENT`,
/// `INTERNAL` naming the decode, or `RESOURCE_EXHAUSTED`/`OUT_OF_RANGE`
/// for the oversized one) — e.g. a reset stream after a handler panic.
/// `UNIMPLEMENTED` (a service the server does not register) is clean too.
pub async fn check_garbage(channel: &Channel, path: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    for body in garbage_bodies() {
        let len = body.len();
        match call_raw(channel.clone(), path, body).await {
            Err(s)
                if matches!(
                    s.code(),
                    Code::InvalidArgument
                        | Code::ResourceExhausted
                        | Code::OutOfRange
                        | Code::Unimplemented
                ) || (s.code() == Code::Internal && s.message().contains("decode")) => {}
            other => wrong.push(format!("{path} with {len} garbage bytes: {other:?}")),
        }
    }
    wrong
}

impl Callers {
    /// The channel of one caller (hostile-input tests call as an
    /// identity that gets past authorization).
    pub fn channel(&self, caller: Caller) -> Channel {
        self.channels
            .iter()
            .find(|(c, _)| *c == caller)
            .map(|(_, ch)| ch.clone())
            .expect("Callers::new makes a channel for every caller")
    }
}
