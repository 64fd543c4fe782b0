//! Throwaway work dirs (`bulwark-drill-*`, `bulwark-restore-*` under
//! `drill.workDir` or the temp dir) that a killed instance does not leave
//! behind.
//!
//! A drill or a point-in-time build fills its dir with a decoded snapshot,
//! a scratch etcd's data and a built target: gigabytes on a big cluster.
//! The dir is removed when its [`WorkDir`] drops, which a SIGKILL skips.
//! So each dir holds a `.lock` file its owner keeps `flock`ed for the
//! dir's life; at start-up [`sweep`] removes every such dir whose lock it
//! can take, its owner being gone. Several instances may share the parent
//! (tests do): a live one's dir is locked and stays. A dir without a lock
//! (an older version's, or one a moment old) is never touched.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::engine::DrillSettings;
use crate::error::{BackupError, Result};

/// The lock file inside each work dir.
const LOCK: &str = ".lock";

/// The prefixes of the work dirs [`sweep`] may remove.
pub const PREFIXES: [&str; 2] = ["bulwark-drill-", "bulwark-restore-"];

/// A throwaway dir, locked while this value lives and removed when it
/// drops.
#[derive(Debug)]
pub struct WorkDir {
    // Dropped first: the dir (lock file included) goes while still locked.
    dir: tempfile::TempDir,
    _lock: File,
}

impl WorkDir {
    /// A new dir named `<prefix><random>` under the drill settings' work
    /// dir (else the system temp dir), locked at once.
    pub fn new(drill: &DrillSettings, prefix: &str) -> Result<Self> {
        let parent = drill.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        let failed = |e: std::io::Error| {
            BackupError::local(format!("creating a work dir in {}", parent.display()), e)
        };
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&parent)
            .map_err(failed)?;
        let lock = File::create(dir.path().join(LOCK)).map_err(failed)?;
        if !try_lock(&lock) {
            return Err(failed(std::io::Error::last_os_error()));
        }
        Ok(Self { dir, _lock: lock })
    }

    /// The dir.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// An exclusive `flock` on `file` without waiting; released when the file
/// closes, which the kernel does for a killed process too.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a descriptor this File owns; no memory is shared.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Removes the work dirs under the drill settings' parent whose owner is
/// gone (their lock is free). Returns what was removed; logs each.
pub fn sweep(drill: &DrillSettings) -> Vec<PathBuf> {
    let parent = drill.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for dir in entries.flatten().map(|e| e.path()) {
        let ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| PREFIXES.iter().any(|p| n.starts_with(p)));
        // Held open until the dir is gone, so no new owner can slip in.
        let lock = File::open(dir.join(LOCK));
        let abandoned = ours && lock.as_ref().is_ok_and(try_lock);
        if !abandoned {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::warn!(dir = %dir.display(), "removed a work dir a killed drill or restore left behind");
                removed.push(dir);
            }
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e,
                "could not remove a work dir a killed drill or restore left behind"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings(dir: &Path) -> DrillSettings {
        DrillSettings {
            etcdutl: "etcdutl".into(),
            etcd: "etcd".into(),
            work_dir: Some(dir.to_owned()),
            start_timeout: Duration::from_secs(1),
        }
    }

    /// A live dir stays; a dir whose owner died (its lock free) goes with
    /// everything in it; a dir without a lock, or not ours, stays.
    #[test]
    fn sweep_removes_only_dead_owners_dirs() {
        let parent = tempfile::tempdir().unwrap();
        let drill = settings(parent.path());
        let live = WorkDir::new(&drill, "bulwark-drill-").unwrap();
        std::fs::write(live.path().join("snapshot.db"), b"x").unwrap();
        // A dead owner: the dir and its lock file are there, nobody holds it.
        let dead = parent.path().join("bulwark-restore-dead");
        std::fs::create_dir_all(dead.join("scratch/member")).unwrap();
        std::fs::write(dead.join(LOCK), b"").unwrap();
        std::fs::write(dead.join("target.db"), b"x").unwrap();
        let unlocked = parent.path().join("bulwark-drill-old");
        std::fs::create_dir_all(&unlocked).unwrap();
        let other = parent.path().join("etcd-data");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join(LOCK), b"").unwrap();

        assert_eq!(sweep(&drill), vec![dead.clone()]);
        assert!(!dead.exists());
        assert!(live.path().join("snapshot.db").exists());
        assert!(unlocked.exists() && other.exists());

        // Dropped: removed by its owner, nothing for a sweep.
        let path = live.path().to_owned();
        drop(live);
        assert!(!path.exists());
        assert!(sweep(&drill).is_empty());
    }
}
