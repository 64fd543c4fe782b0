//! Reaching a service: dial its endpoints in turn, each with a head start
//! over the next, follow leader hints, apply the per-call deadline, and
//! turn failures into errors with a next step.

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bulwark_common::grpc::{DIAL_HEAD_START, Dialled};
use bulwark_common::tls::{TlsError, TlsFiles, TlsMaterial};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::context::{Resolved, ServiceEndpoints};
use crate::error::{CliError, Exit, TlsRefusal};

/// How many leader hints a call follows before giving up (a leader change
/// during the call can need a second hop; more means the cluster is flapping).
const MAX_REDIRECTS: usize = 3;

/// How long the handshake that explains a broken connection may take.
const DIAGNOSIS_TIMEOUT: Duration = Duration::from_secs(3);

/// An endpoint a call may try.
#[derive(Debug)]
struct Candidate {
    address: String,
    /// Only this endpoint can give the answer wanted (the preferred one, or
    /// the leader a hint named): it is dialled alone, for as long as its
    /// connect may take, before anything else.
    alone: bool,
}

/// The connection settings with TLS material loaded.
pub struct Session {
    tls: TlsMaterial,
    resolved: Resolved,
    /// Endpoints that did not answer during this command. Later calls try
    /// them last, so a node that is down costs its connect timeout once
    /// per command, not once per call (`status` makes several).
    unreachable: Mutex<Vec<String>>,
}

impl Session {
    /// Loads the client certificate so a bad path fails before any call.
    pub fn open(resolved: Resolved) -> Result<Self, CliError> {
        bulwark_common::tls::install_crypto_provider();
        let tls = resolved.tls.load()?;
        check_key_matches(&tls, &resolved.tls)?;
        Ok(Self {
            tls,
            resolved,
            unreachable: Mutex::default(),
        })
    }

    /// bulwark-lb's API.
    pub fn lb(&self) -> Result<Service<'_>, CliError> {
        self.service("bulwark-lb", self.resolved.lb.as_ref(), "lb")
    }

    /// bulwark-backup's API.
    pub fn backup(&self) -> Result<Service<'_>, CliError> {
        self.service("bulwark-backup", self.resolved.backup.as_ref(), "backup")
    }

    fn service<'a>(
        &'a self,
        name: &'static str,
        endpoints: Option<&'a ServiceEndpoints>,
        flag: &str,
    ) -> Result<Service<'a>, CliError> {
        let endpoints = endpoints
            .filter(|e| !e.endpoints.is_empty())
            .ok_or_else(|| {
                CliError::new(Exit::Usage, format!("no {name} endpoint configured")).hint(format!(
                    "pass --{flag}-endpoint HOST:PORT or add `{flag}.endpoints` to the context"
                ))
            })?;
        Ok(Service {
            name,
            endpoints: endpoints.clone(),
            tls: &self.tls,
            ca_file: &self.resolved.tls.ca_file,
            timeout: self.resolved.timeout,
            preferred: None,
            unreachable: &self.unreachable,
        })
    }
}

/// Fails with both file names when the key is not the certificate's: tonic
/// would only say the endpoint is bad, at the first call.
fn check_key_matches(tls: &TlsMaterial, files: &TlsFiles) -> Result<(), CliError> {
    match tls.client_config(&[]) {
        Ok(_) => Ok(()),
        Err(TlsError::Rustls {
            source: rustls::Error::InconsistentKeys(_),
            ..
        }) => Err(CliError::new(
            Exit::Usage,
            format!(
                "the client certificate {} and the key {} do not match: the key belongs to another certificate",
                files.cert_file.display(),
                files.key_file.display()
            ),
        )
        .hint("pass the key issued with that certificate (--key, or the context's key)")),
        Err(e) => Err(e.into()),
    }
}

/// One service's endpoints.
pub struct Service<'a> {
    name: &'static str,
    endpoints: ServiceEndpoints,
    tls: &'a TlsMaterial,
    /// The CA bundle the services are verified against, for messages.
    ca_file: &'a Path,
    timeout: Duration,
    /// The endpoint [`Service::preferring`] put first.
    preferred: Option<String>,
    /// The session's endpoints that did not answer.
    unreachable: &'a Mutex<Vec<String>>,
}

impl<'a> Service<'a> {
    /// The service's name, for messages.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The same service with `address` tried first, alone (e.g. the
    /// leader, for what only the leader knows); the configured endpoints
    /// follow.
    pub fn preferring(&self, address: &str) -> Service<'a> {
        let mut endpoints = self.endpoints.clone();
        endpoints.endpoints.retain(|e| e != address);
        endpoints.endpoints.insert(0, address.to_owned());
        Service {
            name: self.name,
            endpoints,
            tls: self.tls,
            ca_file: self.ca_file,
            timeout: self.timeout,
            preferred: Some(address.to_owned()),
            unreachable: self.unreachable,
        }
    }

    /// The channel over `connection`, just made to `address`.
    fn channel(&self, connection: Dialled, address: &str) -> Result<Channel, CliError> {
        bulwark_common::grpc::channel_over(
            connection,
            address,
            self.tls,
            self.endpoints.server_name.as_deref(),
        )
        .map_err(|e| self.bad_endpoint(address, &e))
    }

    /// Fails for an `address` no channel can be built for, before it is
    /// dialled.
    fn check_endpoint(&self, address: &str) -> Result<(), CliError> {
        bulwark_common::grpc::plain_endpoint(address)
            .map(drop)
            .map_err(|e| self.bad_endpoint(address, &e))
    }

    fn bad_endpoint(&self, address: &str, e: &dyn std::fmt::Display) -> CliError {
        CliError::new(
            Exit::Usage,
            format!("{}: bad endpoint {address:?}: {e}", self.name),
        )
    }

    /// Whether a refused certificate is why a call failed: from the error
    /// itself when it says so, else, when the call died on a broken
    /// connection (tonic: "transport error" or "operation was canceled"),
    /// from a handshake of our own. With TLS 1.3 a server refuses a client
    /// certificate only after the client's handshake is done, so the alert
    /// reaches the gRPC call as a broken pipe or a cancelled request, never
    /// as itself.
    async fn refusal_behind(&self, status: &tonic::Status, address: &str) -> Option<TlsRefusal> {
        if let Some(refusal) = crate::error::tls_refusal(status) {
            return Some(refusal);
        }
        if address.is_empty() {
            return None;
        }
        let broken = match status.code() {
            tonic::Code::Unknown | tonic::Code::Cancelled => true,
            // A refused or timed-out connect is no certificate problem.
            tonic::Code::Unavailable => !crate::error::never_connected(status),
            _ => false,
        };
        if !broken {
            return None;
        }
        let host = self
            .endpoints
            .server_name
            .clone()
            .unwrap_or_else(|| bulwark_common::grpc::host_of(address));
        let name = rustls_pki_types::ServerName::try_from(host).ok()?;
        let config = self.tls.client_config(&[b"h2"]).ok()?;
        let handshake = async {
            let tcp = tokio::net::TcpStream::connect(address).await.ok()?;
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let mut tls = match connector.connect(name, tcp).await {
                Ok(tls) => tls,
                Err(e) => return TlsRefusal::in_error(&e),
            };
            // A server that accepted us sends its HTTP/2 settings; one that
            // refused us sends the alert.
            let mut byte = [0u8; 1];
            match tokio::io::AsyncReadExt::read(&mut tls, &mut byte).await {
                Err(e) => TlsRefusal::in_error(&e),
                Ok(_) => None,
            }
        };
        tokio::time::timeout(DIAGNOSIS_TIMEOUT, handshake)
            .await
            .ok()
            .flatten()
    }

    /// One rpc through [`Service::call`] with a fresh client per attempt:
    /// `client` builds it from the channel (e.g. `LoadBalancerClient::new`),
    /// `rpc` sends a clone of `req`, and the answer's message comes back.
    pub async fn send<C, Req, Resp, Fut>(
        &self,
        client: fn(Channel) -> C,
        req: Req,
        rpc: impl Fn(C, Req) -> Fut,
    ) -> Result<Resp, CliError>
    where
        Req: Clone,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.call(|ch| {
            let answer = rpc(client(ch), req.clone());
            async move { answer.await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Calls the service under the per-call deadline. Tries each endpoint
    /// while they are unreachable, and follows leader hints for leader-only
    /// calls. For a streaming rpc `f` resolves when the stream opens, so the
    /// deadline covers only opening it, never how long it runs (a restore
    /// can take many minutes).
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, CliError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut last: Option<(tonic::Status, String)> = None;
        let mut queue = self.attempt_order();
        let mut redirects = 0;
        while let Some((address, channel)) = self.connect_next(&mut queue, &mut last).await? {
            let result = match tokio::time::timeout(self.timeout, f(channel)).await {
                Ok(r) => r,
                Err(_) => Err(self.no_answer()),
            };
            match result {
                Ok(v) => {
                    self.answered(&address, true);
                    return Ok(v);
                }
                Err(status) => {
                    if let Some(hint) = bulwark_api::leader_hint::from_status(&status)
                        && !hint.address.is_empty()
                        && hint.address != address
                        && redirects < MAX_REDIRECTS
                    {
                        redirects += 1;
                        queue.push_front(Candidate {
                            address: hint.address.clone(),
                            alone: true,
                        });
                    } else if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) {
                        // Try the next endpoint; remember why this one
                        // failed, and try it last from now on.
                        self.answered(&address, false);
                    } else {
                        return Err(self.failure(&status, &address).await);
                    }
                    last = Some((status, address));
                }
            }
        }
        let (status, address) =
            last.unwrap_or_else(|| (tonic::Status::unavailable("no endpoints"), String::new()));
        Err(self.failure(&status, &address).await)
    }

    /// Takes endpoints from the front of `queue` and dials them, each
    /// within the per-call deadline, until one connects: its address and
    /// channel. Each gets [`DIAL_HEAD_START`] before
    /// the next is dialled as well, and the first to connect wins; one that
    /// must answer alone is dialled alone. An endpoint whose dial failed is
    /// recorded as not answering, its failure kept in `last`; those the
    /// winner overtook go back to the front of the queue, and are tried
    /// last by the rest of the command's calls. `None` once every endpoint
    /// failed.
    async fn connect_next(
        &self,
        queue: &mut VecDeque<Candidate>,
        last: &mut Option<(tonic::Status, String)>,
    ) -> Result<Option<(String, Channel)>, CliError> {
        let mut dials = JoinSet::new();
        let mut dialling: Vec<Candidate> = Vec::new();
        let mut next_at = Instant::now();
        loop {
            let may_start = queue.front().is_some_and(|next| {
                dialling.is_empty()
                    || (!next.alone && !dialling[0].alone && Instant::now() >= next_at)
            });
            if may_start {
                let next = queue.pop_front().expect("checked above");
                self.check_endpoint(&next.address)?;
                let (address, tls) = (next.address.clone(), self.tls.clone());
                let server_name = self.endpoints.server_name.clone();
                let (timeout, no_answer) = (self.timeout, self.no_answer());
                dials.spawn(async move {
                    let dial = bulwark_common::grpc::dial(&address, &tls, server_name.as_deref());
                    let dialled = match tokio::time::timeout(timeout, dial).await {
                        Ok(dialled) => dialled.map_err(bulwark_common::grpc::dial_failure),
                        Err(_) => Err(no_answer),
                    };
                    (address, dialled)
                });
                dialling.push(next);
                next_at = Instant::now() + DIAL_HEAD_START;
                continue;
            }
            let may_add = queue.front().is_some_and(|next| !next.alone)
                && dialling.first().is_some_and(|d| !d.alone);
            let joined = tokio::select! {
                joined = dials.join_next() => joined,
                () = tokio::time::sleep_until(next_at), if may_add => continue,
            };
            let Some(joined) = joined else {
                return Ok(None);
            };
            let (address, dialled) =
                joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            dialling.retain(|d| d.address != address);
            match dialled {
                Ok(connection) => {
                    for overtaken in dialling.into_iter().rev() {
                        self.answered(&overtaken.address, false);
                        queue.push_front(overtaken);
                    }
                    let channel = self.channel(connection, &address)?;
                    return Ok(Some((address, channel)));
                }
                Err(status) => {
                    self.answered(&address, false);
                    *last = Some((status, address));
                    // The next endpoint need not wait for the head start.
                    next_at = Instant::now();
                }
            }
        }
    }

    /// The status of a call, or a dial, that did not end within the
    /// per-call deadline.
    fn no_answer(&self) -> tonic::Status {
        tonic::Status::deadline_exceeded(format!(
            "no answer within {} (raise --timeout if the cluster is slow)",
            humantime::format_duration(self.timeout)
        ))
    }

    /// The endpoints in the order a call tries them: as configured (or
    /// preferred), those that did not answer earlier in this command last.
    fn attempt_order(&self) -> VecDeque<Candidate> {
        let unreachable = self
            .unreachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (late, mut order): (Vec<String>, Vec<String>) = self
            .endpoints
            .endpoints
            .iter()
            .cloned()
            .partition(|e| unreachable.contains(e));
        order.extend(late);
        order
            .into_iter()
            .enumerate()
            .map(|(i, address)| Candidate {
                alone: i == 0 && self.preferred.as_ref() == Some(&address),
                address,
            })
            .collect()
    }

    /// Records whether `address` answered.
    fn answered(&self, address: &str, answered: bool) {
        let mut unreachable = self
            .unreachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        unreachable.retain(|e| e != address);
        if !answered {
            unreachable.push(address.to_owned());
        }
    }

    /// The error for a call that failed at `address`, naming a refused
    /// certificate when one was the reason.
    async fn failure(&self, status: &tonic::Status, address: &str) -> CliError {
        match self.refusal_behind(status, address).await {
            Some(refusal) => refusal.error(self.name, address, Some(self.ca_file)),
            None => CliError::from_call(status, self.name, address, Some(self.ca_file)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bulwark_common::authz::AccessPolicy;
    use bulwark_common::grpc::GrpcServer;
    use bulwark_common::shutdown::Shutdown;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;
    use crate::context::ServiceEndpoints;

    /// A node whose host hangs (it accepts connections and never answers)
    /// costs a head start, not a connect timeout: the next node is dialled
    /// as well and answers. The calls after the first try the other node
    /// first, and the hung one again only when nothing else answers.
    #[tokio::test]
    async fn a_hung_endpoint_is_overtaken_and_tried_last_for_the_rest_of_the_command() {
        let pki = bulwark_testkit::Pki::new().unwrap();
        let (hung_addr, dialled) = hung_listener().await;
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap().to_string();
        let material = pki
            .server("lb", &["127.0.0.1"])
            .unwrap()
            .tls_files()
            .load()
            .unwrap();
        let shutdown = Shutdown::new();
        let token = shutdown.token();
        tokio::spawn(async move {
            GrpcServer::new()
                .serve(live, &material, AccessPolicy::default(), token)
                .await
        });

        let session = lb_session(&pki, vec![hung_addr.clone(), live_addr.clone()]);
        let svc = session.lb().unwrap();
        let started = Instant::now();
        health_check(&svc).await.unwrap();
        assert!(
            started.elapsed() < bulwark_common::grpc::CONNECT_TIMEOUT,
            "the call waited {:?} for the hung node",
            started.elapsed()
        );
        for call in 1..3 {
            health_check(&svc).await.unwrap();
            assert_eq!(dialled.load(Ordering::SeqCst), 1, "call {call}");
        }
        // Preferring it puts it first only while it is not known to hang.
        health_check(&svc.preferring(&hung_addr)).await.unwrap();
        assert_eq!(dialled.load(Ordering::SeqCst), 1);

        // A preferred endpoint not yet known to hang is dialled alone, for
        // the whole connect timeout: only it has the answer wanted.
        let fresh = lb_session(&pki, vec![live_addr, hung_addr.clone()]);
        let started = Instant::now();
        health_check(&fresh.lb().unwrap().preferring(&hung_addr))
            .await
            .unwrap();
        assert!(started.elapsed() >= bulwark_common::grpc::CONNECT_TIMEOUT);
        assert_eq!(dialled.load(Ordering::SeqCst), 2);

        // With no other node to ask, the hung one is reported as
        // unreachable (exit 3), once.
        let alone = lb_session(&pki, vec![hung_addr.clone()]);
        let e = health_check(&alone.lb().unwrap()).await.unwrap_err();
        assert_eq!(e.exit(), Exit::Unavailable, "{e}");
        assert!(
            e.to_string().starts_with(&format!(
                "bulwark-lb at {hung_addr}: no connection within 3s"
            )),
            "{e}"
        );
        assert_eq!(dialled.load(Ordering::SeqCst), 3);
        shutdown.token().cancel();
    }

    /// A listener that accepts connections and never answers, as a host
    /// that hangs: its address, and how many connections it took.
    async fn hung_listener() -> (String, Arc<AtomicUsize>) {
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = hung.local_addr().unwrap().to_string();
        let dialled = Arc::new(AtomicUsize::new(0));
        let count = dialled.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = hung.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        (address, dialled)
    }

    /// A viewer's session with `endpoints` as the LB's.
    fn lb_session(pki: &bulwark_testkit::Pki, endpoints: Vec<String>) -> Session {
        Session::open(Resolved {
            context: None,
            tls: pki.client("viewer", &[]).unwrap().tls_files(),
            lb: Some(ServiceEndpoints {
                endpoints,
                server_name: None,
            }),
            backup: None,
            timeout: Duration::from_secs(10),
        })
        .unwrap()
    }

    /// The gRPC health check, through `svc`.
    async fn health_check(svc: &Service<'_>) -> Result<(), CliError> {
        svc.send(
            HealthClient::new,
            HealthCheckRequest::default(),
            |mut c, r| async move { c.check(r).await },
        )
        .await
        .map(drop)
    }
}
