//! `cargo xtask bench rolling-upgrade [--from REV] [--trials N]`: the
//! rolling-upgrade scenario (bench/README.md, "Rolling upgrade") from the
//! `bulwark-lb` of git revision REV to this checkout's, and back.
//!
//! The old revision is checked out in a git worktree under
//! `target/upgrade-from/<commit>/src` and built in release mode into
//! `target/upgrade-from/target` (shared by every old revision, so a second
//! one rebuilds only our crates); its binary is kept as
//! `target/upgrade-from/<commit>/bulwark-lb`, so a second run with the same
//! commit builds nothing. Then this checkout's `bulwark-lb` and
//! `bulwark-bench` are built and `bulwark-bench rolling-upgrade` runs as
//! root (network namespaces).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::bench::BenchArgs;
use crate::{cargo, is_root, output_of, run_cmd, workspace_root};

/// The scenario's name on the `cargo xtask bench` command line.
pub const SCENARIO: &str = "rolling-upgrade";

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the rolling-upgrade scenario builds network namespaces: run it as root");
    }
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let commit = resolve(&root, &args.from)?;
    let old = old_binary(&root, &target, &commit)?;
    run_cmd(cargo().args([
        "build",
        "--release",
        "--locked",
        "--bins",
        "-p",
        "bulwark-lb",
        "-p",
        "bulwark-bench",
    ]))?;
    let release = target.join("release");
    let mut new_rev = git(&root, &["rev-parse", "--short=12", "HEAD"])?;
    if !git(&root, &["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
        new_rev.push_str(" with uncommitted changes");
    }
    let mut cmd = Command::new(release.join("bulwark-bench"));
    cmd.current_dir(&root)
        .arg(SCENARIO)
        .arg("--old-lb")
        .arg(&old)
        .arg("--new-lb")
        .arg(release.join("bulwark-lb"))
        .args(["--old-rev", &commit[..12], "--new-rev", &new_rev])
        .arg("--out-dir")
        .arg(&args.out_dir);
    if let Some(n) = args.trials {
        cmd.args(["--trials", &n.to_string()]);
    }
    run_cmd(&mut cmd)
}

/// `rev` as a full commit id.
fn resolve(root: &Path, rev: &str) -> anyhow::Result<String> {
    git(
        root,
        &["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
    )
    .with_context(|| format!("--from {rev}: not a commit of this repository"))
}

/// The release `bulwark-lb` of `commit`, built once and then reused.
fn old_binary(root: &Path, target: &Path, commit: &str) -> anyhow::Result<PathBuf> {
    let base = target.join("upgrade-from");
    let dir = base.join(commit);
    let binary = dir.join("bulwark-lb");
    if binary.is_file() {
        eprintln!(
            "xtask: bulwark-lb of {commit} already built: {}",
            binary.display()
        );
        return Ok(binary);
    }
    let src = dir.join("src");
    if !src.join("Cargo.toml").is_file() {
        let src_str = src.to_str().context("the target dir's path is not UTF-8")?;
        // A worktree left half-made by an interrupted run is replaced.
        git(root, &["worktree", "prune"])?;
        git(
            root,
            &["worktree", "add", "--force", "--detach", src_str, commit],
        )?;
    }
    let shared = base.join("target");
    run_cmd(
        cargo()
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", &shared)
            .args([
                "build",
                "--release",
                "--locked",
                "-p",
                "bulwark-lb",
                "--bin",
                "bulwark-lb",
            ]),
    )?;
    std::fs::copy(shared.join("release").join("bulwark-lb"), &binary)
        .with_context(|| format!("keeping the old build as {}", binary.display()))?;
    // The binary is what is cached; the checkout would only leave a
    // registered worktree behind.
    let src_str = src.to_str().context("the target dir's path is not UTF-8")?;
    git(root, &["worktree", "remove", "--force", src_str])?;
    Ok(binary)
}

/// `git args` in `root`, its trimmed stdout.
fn git(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    output_of(Command::new("git").current_dir(root).args(args))
        .map(|s| s.trim().to_owned())
        .with_context(|| format!("git {} failed", args.join(" ")))
}
