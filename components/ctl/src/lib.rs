//! `bulwarkctl`, the operator CLI: one consistent command line over
//! bulwark-lb's and bulwark-backup's gRPC APIs (mTLS).
//!
//! - [`context`]: named contexts (endpoints, CA, client certificate) in a
//!   kubeconfig-like file, overridden by flags and environment;
//! - [`connect`]: endpoint fail-over, leader redirects, deadlines;
//! - [`output`]: `-o table|json|yaml`;
//! - [`error`]: errors with a next step, and the documented exit codes;
//! - [`cli`]: the command tree;
//! - [`backup`]: `bulwarkctl backup …`;
//! - [`lb`]: `bulwarkctl lb …`, bulwark-lb's operator commands;
//! - [`health`]: `bulwarkctl health`, the LB leader's health aggregation.
//! - [`status`]: `bulwarkctl status`, the whole control plane at a glance.
//! - [`restore`]: `bulwarkctl restore`, whole-cluster etcd restore.

pub mod backup;
pub mod certs;
pub mod cli;
pub mod connect;
pub mod context;
pub mod error;
pub mod health;
pub mod init;
pub mod lb;
pub mod output;
pub mod restore;
pub mod status;
