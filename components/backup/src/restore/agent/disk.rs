//! The agent's disk work: fetching the target snapshot (a stored one
//! decoded on the way, or a plain built target), the
//! `<dataDir>.bulwark-<restore id>` names, renames and cross-mount moves,
//! and the free-space check that refuses a node before anything moves.

use std::path::{Path, PathBuf};

use bulwark_api::backup::v1 as pb;
use object_store::ObjectStoreExt;

use tokio_util::sync::CancellationToken;

use super::{Agent, StepSink};
use crate::error::{BackupError, Result};
use crate::snapshot::read::{DownloadProgress, mismatch_error};

impl Agent {
    /// Fetches the target snapshot into `to`: a stored snapshot decoded on
    /// the way (`source.snapshot_id` set), else a plain target copied; its
    /// hashes checked either way. On any failure nothing of it is left in
    /// the state dir.
    pub(super) async fn fetch(
        &self,
        restore_id: &str,
        source: &pb::SnapshotSource,
        to: &Path,
        progress: DownloadProgress<'_>,
    ) -> Result<()> {
        let fetched = if !source.snapshot_id.is_empty() {
            self.fetch_stored(source, to, progress).await
        } else if !source.served_by.is_empty() {
            self.fetch_served(restore_id, source, to, progress).await
        } else {
            self.fetch_into(source, to, progress).await
        };
        if fetched.is_err()
            && let Err(e) = tokio::fs::remove_file(to).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %to.display(), error = %e, "could not remove a failed download");
        }
        fetched
    }

    /// FETCH_SNAPSHOT as `sink` sees it: started, running with the bytes
    /// fetched (about once a second; also in the detail, which `restore
    /// status` shows), done with the staged path. A failure ends the call
    /// with its error.
    pub(super) async fn stage(
        &self,
        restore_id: &str,
        source: &pb::SnapshotSource,
        staged: &Path,
        sink: StepSink<'_>,
    ) -> Result<()> {
        let step = pb::NodeStep::FetchSnapshot;
        let what = if !source.snapshot_id.is_empty() {
            format!("snapshot {} (decoding it)", source.snapshot_id)
        } else if !source.served_by.is_empty() {
            format!("the built target from {}", source.served_by)
        } else {
            format!("target {}", source.object_key)
        };
        sink(self.event(restore_id, step, pb::StepStatus::Started, what, ""));
        let progress = |done: u64, total: u64, elapsed: std::time::Duration| {
            let mut ev = self.event(
                restore_id,
                step,
                pb::StepStatus::Running,
                fetched_text(done, total, elapsed),
                "",
            );
            ev.transfer = Some(pb::TransferProgress {
                bytes_done: done,
                bytes_total: Some(total),
                bytes_per_second: (done as f64 / elapsed.as_secs_f64().max(0.001)) as u64,
                elapsed: bulwark_api::time::duration_to_proto(elapsed).ok(),
            });
            tracing::info!(
                restore_id,
                bytes_done = done,
                bytes_total = total,
                "fetching the target snapshot"
            );
            sink(ev);
        };
        self.fetch(restore_id, source, staged, &progress).await?;
        sink(self.event(
            restore_id,
            step,
            pb::StepStatus::Done,
            String::new(),
            staged.display().to_string(),
        ));
        Ok(())
    }

    /// The committed snapshot `source.snapshot_id`, streamed from the store
    /// through the decoder (age, zstd) straight into `to`: the stored
    /// object's SHA-256 and size and etcd's trailing SHA-256 and size are
    /// checked against its manifest on the way, so no plain copy of it is
    /// ever uploaded or fetched twice. The staged file is not synced: a
    /// node that crashes before its member is touched is released, and
    /// the file fetched again.
    async fn fetch_stored(
        &self,
        source: &pb::SnapshotSource,
        to: &Path,
        progress: DownloadProgress<'_>,
    ) -> Result<()> {
        let entry = self.engine.get_snapshot(&source.snapshot_id).await?;
        let m = &entry.manifest;
        if m.object_key != source.object_key
            || m.stored_sha256 != source.sha256
            || m.stored_size_bytes != source.size_bytes
        {
            return Err(BackupError::Refused(format!(
                "snapshot {}: its manifest names {} ({} bytes, SHA-256 {}), the coordinator \
                 asked for {} ({} bytes, SHA-256 {})",
                m.id,
                m.object_key,
                m.stored_size_bytes,
                m.stored_sha256,
                source.object_key,
                source.size_bytes,
                source.sha256
            )));
        }
        if let Some(key_id) = m.encryption.key_id() {
            self.decrypts(key_id).map_err(BackupError::Refused)?;
        }
        let cancel = CancellationToken::new();
        let mismatches = self
            .engine
            .stream_check(&entry, Some(to.to_owned()), progress, &cancel)
            .await?;
        match mismatch_error(format!("snapshot {} ({})", m.id, m.object_key), &mismatches) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether this node holds the age identity of `key_id`; else what the
    /// refusal says.
    pub(super) fn decrypts(&self, key_id: &str) -> std::result::Result<(), String> {
        match self.engine.keys.identity(key_id) {
            Ok(_) => Ok(()),
            Err(_) => Err(format!(
                "no age identity for key {key_id} here (configured: {}): this node decodes \
                 the encrypted snapshot itself; add its identity to encryption.identityFiles",
                self.engine
                    .keys
                    .identity_ids()
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// A plain target an older coordinator uploaded to the store, copied
    /// and checked against `source`.
    async fn fetch_into(
        &self,
        source: &pb::SnapshotSource,
        to: &Path,
        progress: DownloadProgress<'_>,
    ) -> Result<()> {
        use futures::StreamExt;
        let path =
            crate::store::layout::object_path(self.engine.store.prefix(), &source.object_key);
        let described = self.engine.store.describe(&path);
        let get = self
            .engine
            .store
            .inner()
            .get(&path)
            .await
            .map_err(|e| BackupError::store(described.clone(), e))?;
        let what = described.clone();
        let chunks = get
            .into_stream()
            .map(move |c| c.map_err(|e| BackupError::store(what.clone(), e)));
        super::target::write_checked(
            chunks,
            to,
            source,
            &format!("target snapshot {described}"),
            progress,
        )
        .await
    }
}

/// "120.0 of 215.3 MiB stored fetched, 95.1 MiB/s".
fn fetched_text(done: u64, total: u64, elapsed: std::time::Duration) -> String {
    let mib = |b: u64| b as f64 / 1048576.0;
    format!(
        "{:.1} of {:.1} MiB stored fetched, {:.1} MiB/s",
        mib(done),
        mib(total),
        mib(done) / elapsed.as_secs_f64().max(0.001)
    )
}

/// `<dir>.bulwark-<restore id><suffix>`, next to `dir`.
pub(super) fn aside_path(dir: &Path, restore_id: &str, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "etcd".into());
    dir.with_file_name(format!("{name}.bulwark-{restore_id}{suffix}"))
}

/// Removes the restore tool's output (`-prebuilt`, or an older agent's
/// `-partial`); false when there was none.
pub(super) async fn remove_tool_output(output: &Path) -> Result<bool> {
    match tokio::fs::remove_dir_all(output).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(BackupError::local(
            format!("removing {}", output.display()),
            e,
        )),
    }
}

pub(super) async fn rename(from: &Path, to: &Path) -> Result<()> {
    if tokio::fs::try_exists(to).await.unwrap_or(false) {
        return Err(BackupError::Refused(format!(
            "{} already exists; not overwriting it",
            to.display()
        )));
    }
    let what = || format!("moving {} to {}", from.display(), to.display());
    match tokio::fs::rename(from, to).await {
        Ok(()) => Ok(()),
        // In the static pod, etcd's manifest dir and the state dir are
        // separate bind mounts, so the manifest cannot be renamed across.
        Err(e)
            if e.kind() == std::io::ErrorKind::CrossesDevices
                && tokio::fs::metadata(from).await.is_ok_and(|m| m.is_file()) =>
        {
            move_file_across(from, to)
                .await
                .map_err(|e| BackupError::local(what(), e))
        }
        Err(e) => Err(BackupError::local(what(), e)),
    }
}

/// Moves a file to another mount: a copy beside the target, synced, renamed
/// into place, and only then the source removed. Interrupted, it leaves the
/// source in place (and at worst a `.partial` copy), never neither.
async fn move_file_across(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    tokio::fs::copy(from, &partial).await?;
    tokio::fs::File::open(&partial).await?.sync_all().await?;
    tokio::fs::rename(&partial, to).await?;
    if let Some(dir) = to.parent() {
        tokio::fs::File::open(dir).await?.sync_all().await?;
    }
    tokio::fs::remove_file(from).await
}

/// Free bytes on the file system holding `path` (or its parent).
pub(super) fn free_bytes(path: &Path) -> u64 {
    let probe = if path.exists() {
        path
    } else {
        path.parent().unwrap_or(Path::new("/"))
    };
    statvfs_free(probe).unwrap_or(0)
}

/// Bytes an unprivileged writer may still use on the file system of `path`.
fn statvfs_free(path: &Path) -> std::io::Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a
    // valid NUL-terminated string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) == 0 {
            Ok(st.f_bavail.saturating_mul(st.f_frsize))
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// etcd's WAL segment (64,000,000 bytes), rounded up to 64 MiB.
const WAL_SEGMENT_BYTES: u64 = 64 << 20;

/// The least margin on top of a restored member's database and WAL.
const MIN_SPACE_MARGIN: u64 = 16 << 20;

/// The room a restored member needs on its data dir's file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SpaceNeeded {
    /// The restored database: the target snapshot's raw size.
    database: u64,
    /// The WAL segment etcdutl preallocates, and the next one etcd
    /// preallocates when it starts ("failed to preallocate space when
    /// creating a new WAL" otherwise).
    wal: u64,
    /// A tenth of the database, at least 16 MiB: the database grows as
    /// the restored member serves writes.
    margin: u64,
    /// The staged snapshot, held until the member starts, when the state
    /// dir is on the same file system.
    staged: u64,
}

impl SpaceNeeded {
    fn new(raw_snapshot: u64, staged_on_same_fs: bool) -> Self {
        Self {
            database: raw_snapshot,
            wal: 2 * WAL_SEGMENT_BYTES,
            margin: (raw_snapshot / 10).max(MIN_SPACE_MARGIN),
            staged: if staged_on_same_fs { raw_snapshot } else { 0 },
        }
    }

    fn total(&self) -> u64 {
        self.database
            .saturating_add(self.wal)
            .saturating_add(self.margin)
            .saturating_add(self.staged)
    }
}

impl std::fmt::Display for SpaceNeeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes: the snapshot's {} + two 64 MiB WAL segments {} + margin {}",
            self.total(),
            self.database,
            self.wal,
            self.margin
        )?;
        if self.staged > 0 {
            write!(
                f,
                " + the staged snapshot {} (the state dir is on the same file system)",
                self.staged
            )?;
        }
        Ok(())
    }
}

/// `path`, or its nearest ancestor that exists.
fn existing_ancestor(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
}

/// Where the file system holding `path` (which exists) is mounted: the
/// last ancestor on the same device.
fn mount_point(path: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let Some(own) = dev(path) else {
        return path.to_owned();
    };
    let mut top = path;
    while let Some(parent) = top.parent()
        && dev(parent) == Some(own)
    {
        top = parent;
    }
    top.to_owned()
}

/// Refuses a restore (before anything is fetched or moved) when the file
/// system of `data_dir` has less room than [`SpaceNeeded`] for a snapshot
/// of `raw_snapshot` bytes.
pub(super) fn check_space(
    node: &str,
    data_dir: &Path,
    state_dir: &Path,
    raw_snapshot: u64,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let probe = existing_ancestor(data_dir);
    let free = statvfs_free(probe)
        .map_err(|e| BackupError::local(format!("statvfs {}", probe.display()), e))?;
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let same_fs = dev(probe).is_some() && dev(probe) == dev(existing_ancestor(state_dir));
    let needed = SpaceNeeded::new(raw_snapshot, same_fs);
    if free >= needed.total() {
        return Ok(());
    }
    Err(BackupError::Refused(format!(
        "not enough free space on node {node} for the restored member: the file system \
         mounted on {} (holding the data dir {}) has {free} bytes free, the restore needs \
         {needed}; nothing was changed: free space there, or restore anyway with \
         --skip-space-check",
        mount_point(probe).display(),
        data_dir.display(),
    )))
}

pub(super) fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest moves between two mounts (as between the static pod's
    /// bind mounts): /dev/shm is a tmpfs, the temp dir is not.
    #[tokio::test]
    async fn a_manifest_moves_across_mounts_by_copy_then_remove() {
        use std::os::unix::fs::MetadataExt as _;
        let shm = Path::new("/dev/shm");
        let disk = tempfile::tempdir().unwrap();
        assert_ne!(
            std::fs::metadata(shm).unwrap().dev(),
            std::fs::metadata(disk.path()).unwrap().dev(),
            "this test needs /dev/shm on a mount of its own"
        );
        let mounted = tempfile::tempdir_in(shm).unwrap();
        let from = mounted.path().join("etcd.yaml");
        std::fs::write(&from, "kind: Pod\n").unwrap();
        let to = disk.path().join("etcd.yaml.bulwark-r1");
        rename(&from, &to).await.unwrap();
        assert!(!from.exists());
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "kind: Pod\n");
        assert!(!disk.path().join("etcd.yaml.bulwark-r1.partial").exists());
        // And back, as a restore's last step does.
        rename(&to, &from).await.unwrap();
        assert!(from.exists() && !to.exists());
    }

    #[test]
    fn the_space_needed_is_the_database_two_wal_segments_and_a_margin() {
        let mib = 1 << 20;
        let small = SpaceNeeded::new(12 * mib, false);
        assert_eq!(small.total(), 12 * mib + 128 * mib + 16 * mib);
        let big = SpaceNeeded::new(1000 * mib, true);
        assert_eq!(big.total(), 1000 * mib + 128 * mib + 100 * mib + 1000 * mib);
        assert!(big.to_string().contains("staged snapshot"), "{big}");
        assert_eq!(SpaceNeeded::new(u64::MAX, true).total(), u64::MAX);
    }

    #[test]
    fn the_space_check_names_the_node_the_file_system_and_both_figures() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("etcd-data");
        let state_dir = dir.path().join("state");
        // Neither exists yet: their nearest existing ancestor is measured.
        check_space("n1", &data_dir, &state_dir, 0).unwrap();
        let huge = 1 << 60;
        let err = check_space("n1", &data_dir, &state_dir, huge)
            .unwrap_err()
            .to_string();
        let free = statvfs_free(dir.path()).unwrap();
        assert!(err.contains("node n1"), "{err}");
        assert!(err.contains(&data_dir.display().to_string()), "{err}");
        assert!(
            err.contains(&mount_point(dir.path()).display().to_string()),
            "{err}"
        );
        // Free bytes move with other writers: the figure is near ours.
        let said: u64 = err
            .split(" bytes free")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no free bytes in {err}"));
        assert!(said.abs_diff(free) < 1 << 30, "{said} vs {free}: {err}");
        let needed = SpaceNeeded::new(huge, true);
        assert!(
            err.contains(&format!("needs {needed}")),
            "the state dir shares the file system: {err}"
        );
        assert!(err.contains("--skip-space-check"), "{err}");
        assert!(!data_dir.exists() && !state_dir.exists());
    }
}
