//! `cargo xtask demo`: the whole product on loopback in one command.
//!
//! Installs what it needs (like the test setup; Debian packages only when
//! run as root, and the demo needs none of them), builds the binaries, then
//! runs `bulwark-demo` (tests/src/bin/bulwark-demo), which starts etcd, the
//! apiserver stand-ins, bulwark-lb, bulwark-prober and bulwark-backup on
//! 127.0.0.0/8 and narrates what they do.

use std::process::Command;

use crate::setup::{SetupArgs, tools_dir};
use crate::{cargo, run_cmd, workspace_root};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Leave everything running at the end (explore it with bulwarkctl);
    /// Ctrl-C tears it down.
    #[arg(long)]
    pub keep: bool,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    println!("xtask demo: installing what the demo needs (quiet when present)");
    crate::setup::run(&SetupArgs::default())?;
    println!("xtask demo: building bulwark (debug; the first build takes a few minutes)");
    run_cmd(cargo().args([
        "build",
        "--locked",
        "-p",
        "bulwark-lb",
        "-p",
        "bulwark-prober",
        "-p",
        "bulwark-backup",
        "-p",
        "bulwark-ctl",
        "-p",
        "bulwark-testkit",
        "--bins",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let mut demo = Command::new(target.join("debug").join("bulwark-demo"));
    demo.env("BULWARK_TOOLS_DIR", tools_dir());
    if args.keep {
        demo.arg("--keep");
    }
    run_cmd(&mut demo)
}
