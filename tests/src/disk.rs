//! A small file system that can fill up: a tmpfs mounted by the test (as
//! root) on a directory of its own, for "disk full" faults. Its size can be
//! changed while mounted, so a test can fill it to the brim and later give
//! the room back ("the operator freed space"). Unmounted on drop (lazily,
//! so a process that still has a file open there does not keep it busy).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::netns::REQUIRE_PRIVILEGED_ENV;
use crate::skip::Skipped;

/// Why [`SmallDisk::mount`] gave no disk: not root (a skip), or a failure.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// This machine cannot run it (not root).
    #[error(transparent)]
    Skipped(#[from] Skipped),
    /// Mounting failed.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// A mounted tmpfs; unmounted on drop.
#[derive(Debug)]
pub struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` on `dir` (created if missing).
    pub fn mount(dir: &Path, bytes: u64) -> Result<Self, DiskError> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(Skipped::new(
                format!("needs root to mount a small file system (running as uid {euid})"),
                REQUIRE_PRIVILEGED_ENV,
            )
            .into());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0700"))
            .arg("bulwark-small-disk")
            .arg(dir))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Bytes in use.
    pub fn used(&self) -> anyhow::Result<u64> {
        let st = statvfs(&self.dir)?;
        Ok((st.f_blocks - st.f_bfree) * st.f_frsize)
    }

    /// Bytes still free.
    pub fn free(&self) -> anyhow::Result<u64> {
        let st = statvfs(&self.dir)?;
        Ok(st.f_bavail * st.f_frsize)
    }

    /// Changes its size (not below what is in use: the kernel refuses).
    pub fn resize(&self, bytes: u64) -> anyhow::Result<()> {
        run(Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={bytes}"))
            .arg(&self.dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("umount").arg("--lazy").arg(&self.dir)) {
            eprintln!("[bulwark-testkit] unmounting {}: {e:#}", self.dir.display());
        }
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn statvfs(path: &Path) -> anyhow::Result<libc::statvfs> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .context("a path with a NUL byte")?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a
    // valid NUL-terminated string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) == 0 {
            Ok(st)
        } else {
            Err(std::io::Error::last_os_error())
                .with_context(|| format!("statvfs {}", path.display()))
        }
    }
}
