//! The one way bulwark serves and calls gRPC: mutual TLS, `grpc.health.v1`,
//! reflection (so `grpcurl` works), and authorization of every call by the
//! access level its rpc declares in the protos.
//!
//! Each rpc carries a `(bulwark.auth.v1.access)` option (READ, OPERATOR,
//! PROBER, PEER); [`AccessLayer`] looks the request path up in
//! `bulwark_api::METHOD_ACCESS` and checks the verified client certificate
//! against the matching [`AccessPolicy`] rule before the handler runs, so no
//! handler can forget the check. The caller's [`PeerIdentity`] is put in the
//! request extensions for handlers that log who did what.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint};
use tonic_health::server::HealthReporter;

use crate::authz::AccessPolicy;
use crate::tls::{PeerIdentity, TlsMaterial};

/// Tower layer enforcing an [`AccessPolicy`] on every call.
#[derive(Clone, Debug)]
pub struct AccessLayer {
    policy: Arc<AccessPolicy>,
}

impl AccessLayer {
    /// A layer enforcing `policy`.
    pub fn new(policy: AccessPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = AccessService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`AccessLayer`] wraps around the routes.
#[derive(Clone, Debug)]
pub struct AccessService<S> {
    inner: S,
    policy: Arc<AccessPolicy>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for AccessService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let identity = req
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().and_then(|c| PeerIdentity::from_der(c).ok()));
        match self.policy.check(req.uri().path(), identity) {
            Ok(id) => {
                req.extensions_mut().insert(id);
                // The clone/swap keeps the service that was polled ready.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(req).await })
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

/// The caller's identity as [`AccessLayer`] recorded it.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&PeerIdentity> {
    request.extensions().get::<PeerIdentity>()
}

/// A gRPC server under construction: services, health and reflection.
pub struct GrpcServer {
    routes: tonic::service::RoutesBuilder,
    health: HealthReporter,
    names: Vec<&'static str>,
}

impl Default for GrpcServer {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcServer {
    /// A server with `grpc.health.v1` and reflection already in place.
    pub fn new() -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = Routes::builder();
        routes.add_service(health_service);
        match tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(bulwark_api::FILE_DESCRIPTOR_SET)
            .build_v1()
        {
            Ok(reflection) => {
                routes.add_service(reflection);
            }
            // The descriptor set is compiled in and tested in bulwark-api; if
            // it ever failed to load, serving without reflection beats not
            // serving.
            Err(e) => tracing::error!(error = %e, "gRPC reflection disabled"),
        }
        Self {
            routes,
            health,
            names: Vec::new(),
        }
    }

    /// Adds a service; it is reported SERVING by `grpc.health.v1`.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Error = std::convert::Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// The health reporter, to mark services NOT_SERVING (e.g. while a
    /// node has no leader) and back.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Serves on `listener` with mutual TLS and `policy` until `shutdown`
    /// is cancelled; then stops accepting and drains open calls.
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: &TlsMaterial,
        policy: AccessPolicy,
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        for name in &self.names {
            self.health
                .set_service_status(*name, tonic_health::ServingStatus::Serving)
                .await;
        }
        // The handshake is ours (tls/transport.rs), so each connection
        // gets the certificate current when it arrives.
        let incoming = crate::tls::transport::accept(listener, tls.clone());
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            // Raft cancels a heartbeat that is not answered within its
            // 50 ms deadline. On a loaded machine more than h2's default
            // of 20 such streams can be cancelled before this server has
            // accepted them, and h2 then ends the whole connection with
            // ENHANCE_YOUR_CALM (seen in the jepsen test as
            // "resource exhausted: h2 protocol error"). Every client here
            // has passed mutual TLS, so the rapid-reset guard can be wide.
            .http2_max_pending_accept_reset_streams(Some(1000))
            .tcp_nodelay(true)
            .layer(AccessLayer::new(policy))
            .add_routes(self.routes.routes())
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
    }
}

/// The name to verify `address`'s certificate under: `server_name`, or
/// the address's host part.
fn server_host(address: &str, server_name: Option<&str>) -> String {
    server_name.map_or_else(|| host_of(address), str::to_owned)
}

/// A lazily connecting mTLS channel to `address` (`host:port`), verifying
/// the server certificate under `server_name` (defaults to the host part).
/// Each connection it makes (the first, and every reconnect) handshakes
/// with the material current then, so it follows certificate reloads.
pub fn channel(
    address: &str,
    tls: &TlsMaterial,
    server_name: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    channel_from(address, tls, server_name, None)
}

/// A connection made as [`channel`]'s connector makes one: TCP, then TLS,
/// within [`CONNECT_TIMEOUT`]. For a caller that dials several endpoints
/// at once and keeps the first that answers ([`channel_over`]).
pub async fn dial(
    address: &str,
    tls: &TlsMaterial,
    server_name: Option<&str>,
) -> std::io::Result<Dialled> {
    dial_host(address, &server_host(address, server_name), tls).await
}

/// How long an endpoint may take to connect (TCP and TLS) before the next
/// one is dialled as well ([`dial_first`], bulwarkctl's race): a node that
/// is off, whose host drops the SYN, costs this instead of the connect
/// timeout. Happy Eyeballs (RFC 8305) waits 250 ms; a control-plane node
/// under load can take longer.
pub const DIAL_HEAD_START: Duration = Duration::from_millis(300);

/// Dials `addresses` in order, as [`dial`] does, each given
/// [`DIAL_HEAD_START`] before the next is dialled as well (at once when
/// one fails): the first connection made wins and the dials still running
/// are dropped. A node whose host is off (its SYNs unanswered) then costs
/// the head start, not the whole connect timeout. The winner's address
/// and connection, or the last failure (with its address) when none
/// connected.
pub async fn dial_first(
    addresses: &[String],
    tls: &TlsMaterial,
    server_name: Option<&str>,
) -> Result<(String, Dialled), (String, std::io::Error)> {
    let mut dials = tokio::task::JoinSet::new();
    let mut queue = addresses.iter();
    let mut next_at = tokio::time::Instant::now();
    let mut last = None;
    loop {
        if (dials.is_empty() || tokio::time::Instant::now() >= next_at)
            && let Some(address) = queue.next()
        {
            let (address, tls) = (address.clone(), tls.clone());
            let name = server_name.map(str::to_owned);
            dials.spawn(async move {
                let dialled = dial(&address, &tls, name.as_deref()).await;
                (address, dialled)
            });
            next_at = tokio::time::Instant::now() + DIAL_HEAD_START;
            continue;
        }
        let more = queue.len() > 0;
        let joined = tokio::select! {
            joined = dials.join_next() => joined,
            () = tokio::time::sleep_until(next_at), if more => continue,
        };
        let Some(joined) = joined else {
            break;
        };
        match joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())) {
            (address, Ok(connection)) => return Ok((address, connection)),
            (address, Err(e)) => {
                last = Some((address, e));
                next_at = tokio::time::Instant::now();
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        (
            String::new(),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no endpoints to dial"),
        )
    }))
}

/// A connection [`dial`] made.
pub type Dialled = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// The same channel as [`channel`], whose first connection is `first`,
/// made by [`dial`] to the same `address`; it dials again as [`channel`]
/// does when that connection breaks.
pub fn channel_over(
    first: Dialled,
    address: &str,
    tls: &TlsMaterial,
    server_name: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    channel_from(address, tls, server_name, Some(first))
}

/// `failure`, a failed [`dial`], as the status a call through a
/// [`channel`] whose connect failed that way carries: UNAVAILABLE, with the
/// error in its source chain.
pub fn dial_failure(failure: std::io::Error) -> tonic::Status {
    tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(failure))))
}

fn channel_from(
    address: &str,
    tls: &TlsMaterial,
    server_name: Option<&str>,
    first: Option<Dialled>,
) -> Result<Channel, tonic::transport::Error> {
    let host = server_host(address, server_name);
    // TLS is the connector's, so the URI says http. The connect timeout is
    // the connector's too: tonic reports a failure inside the connector as
    // UNAVAILABLE, as callers expect of a node that is down, but its own
    // connect timeout (which wraps the connector) as an UNKNOWN "transport
    // error", and callers would not try the next node.
    let endpoint = with_keepalives(plain_endpoint(address)?);
    let (address, tls) = (address.to_owned(), tls.clone());
    let first = Arc::new(std::sync::Mutex::new(first));
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let (address, host, tls) = (address.clone(), host.clone(), tls.clone());
            let made = first
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            async move {
                match made {
                    Some(connection) => Ok(connection),
                    None => dial_host(&address, &host, &tls).await,
                }
            }
        })),
    )
}

/// The endpoint [`channel`] builds for `address`; an error when `address`
/// is no `host:port` a channel can be built for (callers that [`dial`]
/// first check it before dialling).
pub fn plain_endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{address}"))
}

/// [`dial`] with the name the server's certificate is checked against.
async fn dial_host(address: &str, host: &str, tls: &TlsMaterial) -> std::io::Result<Dialled> {
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        crate::tls::transport::connect(address, host, tls),
    )
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no connection within {}s (TCP and TLS)",
                CONNECT_TIMEOUT.as_secs()
            ),
        ))
    })
}

/// An endpoint to `address` with TLS from the material current now, fixed
/// for its life, for callers that need their own connector (for example
/// one that dials from inside a network namespace).
pub fn endpoint(
    address: &str,
    tls: &TlsMaterial,
    server_name: Option<&str>,
) -> Result<Endpoint, tonic::transport::Error> {
    let host = server_host(address, server_name);
    Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(tls.tonic_client(&host))
        .map(with_options)
}

/// How long a bulwark client waits for a connection (TCP and TLS) to be
/// made.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Timeouts and keep-alives of every bulwark client connection.
fn with_options(e: Endpoint) -> Endpoint {
    with_keepalives(e.connect_timeout(CONNECT_TIMEOUT))
}

/// The keep-alives of every bulwark client connection.
fn with_keepalives(e: Endpoint) -> Endpoint {
    e.tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
}

/// The host part of `host:port` (an IPv6 literal without its brackets):
/// the name a client verifies the server certificate under by default.
pub fn host_of(address: &str) -> String {
    match address.parse::<SocketAddr>() {
        Ok(sa) => sa.ip().to_string(),
        Err(_) => address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
            .unwrap_or_else(|| address.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("127.0.0.1:9443"), "127.0.0.1");
        assert_eq!(host_of("[::1]:9443"), "::1");
        assert_eq!(host_of("lb-1.example:9443"), "lb-1.example");
    }

    /// A node that accepts connections and never answers (its host hangs)
    /// is UNAVAILABLE after the connect timeout, as a refused connect is, so
    /// callers try their next node.
    #[tokio::test]
    async fn a_connection_not_made_in_time_is_unavailable() {
        let (_pki, client) = viewer();
        let (addr, held) = hung_listener().await;
        let started = tokio::time::Instant::now();
        let status = health(channel(&addr, &client, None).unwrap())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().starts_with("no connection within 3s"),
            "{status:?}"
        );
        assert!(started.elapsed() >= CONNECT_TIMEOUT);
        held.abort();
    }

    /// A caller that dials itself ([`dial`], as bulwarkctl does to race
    /// endpoints) sees a failed dial as a [`channel`]'s call sees the same
    /// failed connect, and its channel's first call uses the connection it
    /// made; the next connection is dialled anew.
    #[tokio::test]
    async fn a_dial_of_our_own_fails_and_serves_as_the_channel_would() {
        let (pki, viewer) = viewer();
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = closed.local_addr().unwrap().to_string();
        drop(closed);
        let through_channel = health(channel(&refused, &viewer, None).unwrap())
            .await
            .unwrap_err();
        let dialled = dial_failure(dial(&refused, &viewer, None).await.unwrap_err());
        assert_eq!(dialled.code(), tonic::Code::Unavailable, "{dialled:?}");
        assert_eq!(dialled.code(), through_channel.code());
        assert_eq!(dialled.message(), through_channel.message());

        let server_tls = pki.issue("server", "bulwark-lb", &[], &["127.0.0.1"]);
        let (addr, shutdown, server) = start_server(server_tls.load().unwrap()).await;
        // Over a connection to the server, a channel to the closed port
        // answers: its first call used the connection.
        let connection = dial(&addr, &viewer, None).await.unwrap();
        let over = channel_over(connection, &refused, &viewer, None).unwrap();
        health(over.clone()).await.unwrap();
        // Once that connection is gone, it dials the closed port.
        shutdown.cancel();
        server.await.unwrap().unwrap();
        // (A call can still meet the closing connection before the channel
        // has seen it close.)
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let again = loop {
            match health(over.clone()).await {
                Err(s) if s.code() == tonic::Code::Unavailable => break s,
                other => assert!(
                    tokio::time::Instant::now() < deadline,
                    "still not a dial of the closed port: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(again.message(), through_channel.message());
    }

    /// [`dial_first`]: a hung node first is overtaken after its head
    /// start, a refused one is passed at once, and the server wins; with
    /// no server the last failure comes back with its address.
    #[tokio::test]
    async fn the_first_endpoint_to_connect_wins_and_a_hung_one_is_overtaken() {
        let (pki, viewer) = viewer();
        let (hung, held) = hung_listener().await;
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = closed.local_addr().unwrap().to_string();
        drop(closed);
        let server_tls = pki.issue("server", "bulwark-lb", &[], &["127.0.0.1"]);
        let (addr, shutdown, server) = start_server(server_tls.load().unwrap()).await;

        let started = tokio::time::Instant::now();
        let order = [hung.clone(), refused.clone(), addr.clone()];
        let (won, connection) = dial_first(&order, &viewer, None).await.unwrap();
        assert_eq!(won, addr);
        // Overtaken, not waited for: well inside the hung dial's timeout.
        assert!(
            started.elapsed() < CONNECT_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        health(channel_over(connection, &won, &viewer, None).unwrap())
            .await
            .unwrap();

        // The refused dial fails first; the hung one's timeout is the last
        // failure.
        let (failed, error) = dial_first(&[hung.clone(), refused], &viewer, None)
            .await
            .unwrap_err();
        assert_eq!(failed, hung);
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        let (_, none) = dial_first(&[], &viewer, None).await.unwrap_err();
        assert_eq!(none.kind(), std::io::ErrorKind::InvalidInput);
        shutdown.cancel();
        server.await.unwrap().unwrap();
        held.abort();
    }

    /// A listener whose connections are accepted and never answered (a
    /// hung host): its address and the task holding them.
    async fn hung_listener() -> (String, tokio::task::JoinHandle<()>) {
        let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = hung.local_addr().unwrap().to_string();
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = hung.accept().await {
                held.push(conn);
            }
        });
        (addr, held)
    }

    /// The test CA and a viewer's client material.
    fn viewer() -> (crate::test_pki::Pki, TlsMaterial) {
        crate::tls::install_crypto_provider();
        let pki = crate::test_pki::Pki::new();
        let viewer = pki.issue("viewer", "viewer", &[], &[]).load().unwrap();
        (pki, viewer)
    }

    /// A server with `material` and the default access policy on a port
    /// of its own: its address, what stops it, and its task.
    async fn start_server(
        material: TlsMaterial,
    ) -> (
        String,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                GrpcServer::new()
                    .serve(listener, &material, AccessPolicy::default(), shutdown)
                    .await
            }
        });
        (addr, shutdown, server)
    }

    /// The gRPC health check over `channel`.
    async fn health(channel: Channel) -> Result<(), tonic::Status> {
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(drop)
    }

    #[tokio::test]
    async fn mtls_server_checks_access_per_rpc() {
        use bulwark_api::backup::v1::RestoreRequest;
        use bulwark_api::backup::v1::backup_client::BackupClient;
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;

        crate::tls::install_crypto_provider();
        let pki = crate::test_pki::Pki::new();
        let server_tls = pki.issue("server", "bulwark-backup", &[], &["localhost", "127.0.0.1"]);
        let admin = pki
            .issue("admin", "admin", &["system:masters"], &[])
            .load()
            .unwrap();
        let viewer = pki
            .issue("viewer", "viewer", &["system:nodes"], &[])
            .load()
            .unwrap();

        let (addr, shutdown, server) = start_server(server_tls.load().unwrap()).await;

        // Health answers any authenticated client.
        let mut health = HealthClient::new(channel(&addr, &viewer, None).unwrap());
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        // An OPERATOR rpc: refused for a viewer before routing; an operator
        // passes the check and reaches the router (no Backup service here).
        let restore = || RestoreRequest::default();
        let err = BackupClient::new(channel(&addr, &viewer, None).unwrap())
            .restore(restore())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        let err = BackupClient::new(channel(&addr, &admin, None).unwrap())
            .restore(restore())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");

        // A client from another CA does not get past the handshake.
        let other = crate::test_pki::Pki::new();
        let mut stranger = other.issue("stranger", "admin", &["system:masters"], &[]);
        stranger.ca_file = pki.dir.path().join("ca.crt");
        let stranger = stranger.load().unwrap();
        let err = HealthClient::new(channel(&addr, &stranger, None).unwrap())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap_err();
        assert_ne!(err.code(), tonic::Code::Ok);

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
