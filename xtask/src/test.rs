//! `cargo xtask test`: the one command that says whether main is good.
//!
//! setup → `cargo fmt --check` → `cargo clippy --all-targets -D warnings` →
//! `cargo deny check licenses bans sources` → build every binary and every
//! test (tests start the binaries as real processes) → `cargo nextest run
//! --workspace`. Run as root it also demands that privileged tests (network
//! namespaces) and every tool actually run rather than skip.

use std::time::Instant;

use anyhow::Context;

use crate::setup::{SetupArgs, tools_dir};
use crate::{cargo, is_root, output_of, run_cmd};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the format and clippy checks (a quicker local loop).
    #[arg(long)]
    pub no_lint: bool,
    /// Arguments passed on to `cargo nextest run` (after `--`).
    #[arg(last = true)]
    pub nextest_args: Vec<String>,
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let start = Instant::now();
    println!("xtask test: {name}");
    let r = f().with_context(|| format!("step `{name}` failed"));
    println!("xtask test: {name}: {:.1?}", start.elapsed());
    r
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    let total = Instant::now();
    step("setup", || crate::setup::run(&SetupArgs::default()))?;
    if !args.no_lint {
        step("cargo fmt --check", || {
            run_cmd(cargo().args(["fmt", "--all", "--check"]))
        })?;
        step("cargo clippy", || {
            run_cmd(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
    }
    if !args.no_lint {
        if output_of(cargo().args(["deny", "--version"])).is_none() {
            step("install cargo-deny", || {
                run_cmd(cargo().args(["install", "--locked", "cargo-deny@0.20.2"]))
            })?;
        }
        // Advisories need the RustSec database from GitHub, which this
        // CI machine cannot reach (docs/RELIABILITY.md, "cargo-deny").
        step("cargo deny", || {
            run_cmd(cargo().args(["deny", "check", "licenses", "bans", "sources"]))
        })?;
    }
    // Binaries and tests in one build: with the tests in it, the binaries
    // get the dev-dependencies' features (tokio's test-util, common's
    // faults) as `cargo nextest run` resolves them, so nextest rebuilds
    // nothing. A build of the binaries alone resolves fewer features, and
    // nextest then rebuilt tokio and everything above it (about 150 s on
    // two cores) and overwrote those binaries anyway.
    step("build binaries and tests", || {
        run_cmd(cargo().args(["build", "--workspace", "--bins", "--tests", "--locked"]))
    })?;
    if output_of(cargo().args(["nextest", "--version"])).is_none() {
        step("install cargo-nextest", || {
            run_cmd(cargo().args(["install", "--locked", "cargo-nextest"]))
        })?;
    }
    step("cargo nextest run", || {
        let mut cmd = cargo();
        cmd.args([
            "nextest",
            "run",
            "--workspace",
            "--locked",
            "--profile",
            "ci",
        ])
        .args(&args.nextest_args)
        .env("BULWARK_TOOLS_DIR", tools_dir());
        if is_root() {
            // CI runs as root: a skipped privileged test there is a failure.
            cmd.env("BULWARK_REQUIRE_PRIVILEGED", "1")
                .env("BULWARK_REQUIRE_ALL_TOOLS", "1");
        }
        run_cmd(&mut cmd)
    })?;
    println!("xtask test: all passed in {:.0?}", total.elapsed());
    Ok(())
}
