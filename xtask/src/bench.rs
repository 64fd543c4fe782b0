//! `cargo xtask bench [SCENARIO...] [--quick]`: the failover scenario suite
//! (bench/README.md, "Scenario suite").
//!
//! Builds every binary the suite starts in release mode (debug figures
//! mean nothing), runs setup (keepalived and HAProxy, the baseline, come
//! from Debian), then runs `bulwark-bench suite` as root: network
//! namespaces need it. Results go to `bench/results/<date>-suite.{md,json}`
//! and `bench/results/<date>-suite-*.svg` with `--quick`, to
//! `<date>-suite-full.*` without; each scenario named appends `-<scenario>`.
//!
//! `cargo xtask bench rolling-upgrade [--from REV]` is not part of the
//! suite: it builds an old revision and runs its own scenario
//! ([`crate::upgrade`]).

use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;

use crate::setup::{SetupArgs, tools_dir};
use crate::upgrade;
use crate::{cargo, is_root, run_cmd, workspace_root};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The scenarios to run (`bulwark-bench suite --help` lists them); all
    /// when none is given.
    pub scenarios: Vec<String>,
    /// Shorter phases and fewer clients: the whole suite in a few minutes.
    #[arg(long)]
    pub quick: bool,
    /// Where the results go.
    #[arg(long, default_value = "bench/results")]
    pub out_dir: PathBuf,
    /// `rolling-upgrade` only: the git revision whose `bulwark-lb` the
    /// cluster starts on (the last release before the lease-expiry
    /// elector by default).
    #[arg(long, default_value = "01c4b78")]
    pub from: String,
    /// `rolling-upgrade` only: upgrade-and-rollback trials.
    #[arg(long)]
    pub trials: Option<usize>,
}

/// The packages whose release binaries the suite runs: the load balancer,
/// the prober, the fixture apiserver (`bulwark-testkit`) and the bench
/// binary itself (the orchestrator and the load driver).
const PACKAGES: &[&str] = &[
    "bulwark-lb",
    "bulwark-prober",
    "bulwark-testkit",
    "bulwark-bench",
];

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.scenarios.iter().any(|s| s == upgrade::SCENARIO) {
        if args.scenarios.len() > 1 {
            bail!(
                "{} runs on its own (it is not part of the suite): give it as the only scenario",
                upgrade::SCENARIO
            );
        }
        return upgrade::run(args);
    }
    if !is_root() {
        bail!("the bench suite builds network namespaces: run it as root");
    }
    let root = workspace_root();
    let mut build = cargo();
    build
        .current_dir(&root)
        .args(["build", "--release", "--locked", "--bins"]);
    for p in PACKAGES {
        build.args(["-p", p]);
    }
    run_cmd(&mut build)?;
    crate::setup::run(&SetupArgs::default())?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bench = target.join("release").join("bulwark-bench");
    let mut cmd = Command::new(&bench);
    cmd.current_dir(&root)
        .arg("suite")
        .arg("--out-dir")
        .arg(&args.out_dir)
        .env("BULWARK_TOOLS_DIR", tools_dir())
        // The report's command: what the operator typed.
        .env(
            "BULWARK_BENCH_COMMAND",
            std::iter::once("cargo xtask".to_owned())
                .chain(std::env::args().skip(1))
                .collect::<Vec<_>>()
                .join(" "),
        );
    if args.quick {
        cmd.arg("--quick");
    }
    cmd.args(&args.scenarios);
    run_cmd(&mut cmd)
}
