//! bulwark-lb: the apiserver front. Its instances elect a leader through
//! Raft; the leader holds the virtual IP; every instance proxies TCP to the
//! healthy apiservers without ever terminating TLS.
//!
//! Where a client connection goes: [`proxy`] accepts it and asks
//! [`backends`] for a backend, reading the immutable snapshot that the
//! control plane (Raft apply, health aggregation) publishes.
//!
//! Who decides a backend is down: [`health`] aggregates the probers'
//! reports into verdicts that the leader commits.

pub mod backends;
pub mod health;
pub mod proxy;
