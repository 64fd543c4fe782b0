//! Reaching a service: try its endpoints in turn, follow leader hints, apply
//! the per-call deadline, and turn failures into errors with a next step.

use std::future::Future;
use std::time::Duration;

use bulwark_common::tls::TlsMaterial;
use tonic::transport::Channel;

use crate::context::{Resolved, ServiceEndpoints};
use crate::error::{CliError, Exit};

/// How many leader hints a call follows before giving up (a leader change
/// during the call can need a second hop; more means the cluster is flapping).
const MAX_REDIRECTS: usize = 3;

/// The connection settings with TLS material loaded.
pub struct Session {
    tls: TlsMaterial,
    resolved: Resolved,
}

impl Session {
    /// Loads the client certificate so a bad path fails before any call.
    pub fn open(resolved: Resolved) -> Result<Self, CliError> {
        bulwark_common::tls::install_crypto_provider();
        let tls = resolved.tls.load()?;
        Ok(Self { tls, resolved })
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
            timeout: self.resolved.timeout,
        })
    }
}

/// One service's endpoints.
pub struct Service<'a> {
    name: &'static str,
    endpoints: ServiceEndpoints,
    tls: &'a TlsMaterial,
    timeout: Duration,
}

impl<'a> Service<'a> {
    /// The service's name, for messages.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The same service with `address` tried first (e.g. the leader, for
    /// what only the leader knows); the configured endpoints follow.
    pub fn preferring(&self, address: &str) -> Service<'a> {
        let mut endpoints = self.endpoints.clone();
        endpoints.endpoints.retain(|e| e != address);
        endpoints.endpoints.insert(0, address.to_owned());
        Service {
            name: self.name,
            endpoints,
            tls: self.tls,
            timeout: self.timeout,
        }
    }

    fn channel(&self, address: &str) -> Result<Channel, CliError> {
        bulwark_common::grpc::channel(address, self.tls, self.endpoints.server_name.as_deref())
            .map_err(|e| {
                CliError::new(
                    Exit::Usage,
                    format!("{}: bad endpoint {address:?}: {e}", self.name),
                )
            })
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
        let mut queue: Vec<String> = self.endpoints.endpoints.iter().rev().cloned().collect();
        let mut redirects = 0;
        while let Some(address) = queue.pop() {
            let result = match tokio::time::timeout(self.timeout, f(self.channel(&address)?)).await
            {
                Ok(r) => r,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {} (raise --timeout if the cluster is slow)",
                    humantime::format_duration(self.timeout)
                ))),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(status) => {
                    if let Some(hint) = bulwark_api::leader_hint::from_status(&status)
                        && !hint.address.is_empty()
                        && hint.address != address
                        && redirects < MAX_REDIRECTS
                    {
                        redirects += 1;
                        queue.push(hint.address.clone());
                    } else if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) {
                        // Try the next endpoint; remember why this one failed.
                    } else {
                        return Err(CliError::from_status(&status, self.name, &address));
                    }
                    last = Some((status, address));
                }
            }
        }
        let (status, address) =
            last.unwrap_or_else(|| (tonic::Status::unavailable("no endpoints"), String::new()));
        Err(CliError::from_status(&status, self.name, &address))
    }
}
