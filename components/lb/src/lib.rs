//! bulwark-lb: the apiserver front. Its instances elect a leader through
//! Raft; the leader holds the virtual IP; every instance proxies TCP to the
//! healthy apiservers without ever terminating TLS.
//!
//! Where a client connection goes: [`proxy`] accepts it and asks
//! [`backends`] for a backend, reading the immutable snapshot that the
//! control plane (Raft apply, health aggregation) publishes.
//!
//! Who decides: [`raft`] replicates the backend registry and elects the
//! leader; [`vip`] lets the leader hold the virtual IP only while its
//! quorum lease is fresh; [`api`] is the operator API; [`node`] wires one
//! node together (`run(config, listeners, shutdown)`), configured by
//! [`config`].
//!
//! After a failover, [`clients`] lets the new holder reset the previous
//! holder's client connections at once (tickle ACKs).
//!
//! Who decides a backend is down: [`health`] aggregates the probers'
//! reports into verdicts that the leader commits.
//!
//! What an operator scrapes: [`metrics`] declares every `bulwark_lb_*`
//! metric with its help text.

pub mod api;
pub mod backends;
pub mod clients;
pub mod config;
pub mod health;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod raft;
pub mod vip;

pub use node::{Lb, Listeners, Node, run};
