//! bulwark-lb: the apiserver front. Its instances elect a leader through
//! Raft; the leader holds the virtual IP; every instance proxies TCP to the
//! healthy apiservers without ever terminating TLS.
//!
//! Where a client connection goes: [`proxy`] accepts it and asks
//! [`backends`] for a backend, reading the immutable snapshot that the
//! control plane (Raft apply, health aggregation) publishes.

pub mod backends;
pub mod proxy;
