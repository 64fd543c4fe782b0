//! `bulwark-bench`: benchmark scenarios, each run side by side with its
//! baseline in one invocation, reported as medians and ratios (see
//! `bench/README.md`).
//!
//! The contenders run as separate processes (the test backends are this
//! same binary re-executed with an internal subcommand; bulwark is the
//! `bulwark-lb` binary), so CPU pinning applies to each alike.

mod backend;
mod backup;
mod datapath;
mod detection;
mod failover;
mod probecost;
mod report;
mod restore;
mod runtime;
mod stats;
mod suite;
mod upgrade;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bulwark-bench", about = "bulwark benchmark scenarios")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Data path: wrk over HTTPS against the backends directly, HAProxy
    /// (mode tcp) and bulwark's proxy, three workloads, alternating runs.
    Datapath(datapath::Args),
    /// Backup: a full snapshot of a ≥ 1 GB etcd through bulwark-backup's
    /// pipeline (file, file+age, S3) against `etcdctl snapshot save`.
    Backup(backup::Args),
    /// Restore: one member's restore against `etcdutl snapshot restore`,
    /// a point-in-time build, and the delta RPO under steady writes.
    Restore(restore::Args),
    /// (internal) one snapshot through bulwark-backup's pipeline.
    BackupOnce(backup::OnceArgs),
    /// VIP failover: netns lab, arp mode, the leader's link cut per trial
    /// (root only).
    Failover(failover::Args),
    /// Probing cost: CPU of bulwark-prober and of the probed servers with
    /// a fresh connection per probe and with kept-alive connections.
    ProbeCost(probecost::Args),
    /// Detection: an apiserver SIGKILLed or shut down gracefully, time until
    /// bulwark (probers + verdicts) and HAProxy (kubeadm guide checks) stop
    /// sending it new connections.
    Detection(detection::Args),
    /// Failover scenario suite (root only): bulwark beside keepalived +
    /// HAProxy on the same netns topology, in one run (`cargo xtask bench`).
    Suite(suite::Args),
    /// Rolling upgrade (root only): the documented upgrade from one
    /// bulwark-lb build to another and the rollback, node by node, under
    /// client load through the VIP (`cargo xtask bench rolling-upgrade`).
    RollingUpgrade(upgrade::Args),
    /// (internal) the suite's load driver, run inside the client host.
    Load(suite::load::Args),
    /// (internal) HTTPS test backends that terminate TLS.
    Backend(backend::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Datapath(a) => datapath::run(&a),
        Cmd::Backup(a) => backup::run(&a),
        Cmd::BackupOnce(a) => backup::run_once(&a),
        Cmd::Restore(a) => restore::run(&a),
        Cmd::Failover(a) => failover::run(&a),
        Cmd::ProbeCost(a) => probecost::run(&a),
        Cmd::Detection(a) => detection::run(&a),
        Cmd::Backend(a) => backend::run(&a),
        Cmd::Suite(a) => suite::run(&a),
        Cmd::RollingUpgrade(a) => upgrade::run(&a),
        Cmd::Load(a) => suite::load::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
