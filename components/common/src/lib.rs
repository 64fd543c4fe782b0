//! What every bulwark daemon shares, so each service is only its own logic:
//!
//! - [`tls`]: PEM loading, mutual-TLS configs for rustls and tonic, the
//!   verified peer's identity, and certificate hot reload;
//! - [`authz`]: identity rules and the access policy for gRPC calls;
//! - [`grpc`]: the mTLS gRPC server (health, reflection, per-rpc access
//!   checks) and client channels;
//! - [`config`]: YAML component-config files merged with flags and env,
//!   validated with errors that name the field;
//! - [`telemetry`]: `tracing` logs (text or JSON) and the Prometheus recorder;
//! - [`admin`]: the `/livez`, `/readyz`, `/metrics` HTTP server;
//! - [`shutdown`]: the root cancellation token, tracked and critical tasks,
//!   signal handling with a grace period;
//! - [`child`]: child processes that die with the daemon (scratch etcd,
//!   the restore tool);
//! - [`sched`]: real-time scheduling for a daemon's control threads;
//! - [`workers`]: each long-running task's state, last success and last
//!   error (`/debug/workers`);
//! - [`daemon`]: the one `main` every daemon runs (flags, config, logs,
//!   bind, `run`, graceful shutdown);
//! - [`listen`]: binding a listener, with an error that says why a port is
//!   taken (another listener, or the host's ephemeral port range).

pub mod admin;
pub mod authz;
pub mod child;
pub mod config;
pub mod daemon;
pub mod grpc;
pub mod listen;
pub mod sched;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod workers;

#[cfg(test)]
mod test_pki;
