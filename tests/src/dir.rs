//! Temporary directories that a failing test can leave behind on request.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Env var: keep every [`TestDir`] on disk instead of deleting it.
pub const KEEP_DIRS_ENV: &str = "BULWARK_KEEP_TEST_DIRS";

/// A temporary directory, deleted on drop unless `BULWARK_KEEP_TEST_DIRS=1`.
///
/// Everything a harness object writes (data dirs, logs, certificates,
/// sockets) lives in one of these, so nothing is left in shared places.
#[derive(Debug)]
pub struct TestDir {
    // Option so Drop can take it to `keep()` it.
    inner: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates `<tmp>/bulwark-<label>-XXXXXX`.
    ///
    /// The label is for humans reading a kept directory; keep it short,
    /// because Unix socket paths inside it are limited to 107 bytes.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let inner = tempfile::Builder::new()
            .prefix(&format!("bulwark-{label}-"))
            .tempdir()
            .with_context(|| format!("creating a temporary directory for {label}"))?;
        let path = inner.path().to_path_buf();
        Ok(Self {
            inner: Some(inner),
            path,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if crate::env_flag(KEEP_DIRS_ENV)
            && let Some(dir) = self.inner.take()
        {
            let path = dir.keep();
            eprintln!("[bulwark-testkit] kept {}", path.display());
        }
    }
}
