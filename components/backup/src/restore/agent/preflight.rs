//! The agent's pre-flight (`RestoreAgent.CheckRestore`): every reason this
//! node could not take its part of a restore, found before anything is
//! fetched, staged or moved, and listed together so one refusal names them
//! all. Nothing here changes the node.

use std::path::Path;

use bulwark_api::backup::v1 as pb;

use super::Agent;
use super::disk::{aside_path, check_space, free_bytes};
use crate::error::{BackupError, Result};

impl Agent {
    /// CheckRestore: the problems found, none when the node is ready.
    pub async fn check(&self, req: pb::CheckRestoreRequest) -> Result<pb::CheckRestoreResponse> {
        if !crate::store::layout::is_valid_id(&req.restore_id) {
            return Err(BackupError::InvalidArgument(format!(
                "restore_id {:?}: expected letters, digits, '-' or '_'",
                req.restore_id
            )));
        }
        let mut problems = Vec::new();
        if let Some(h) = self.held.lock().await.as_ref()
            && h.restore_id != req.restore_id
        {
            problems.push(format!(
                "the node is held by restore {} (finish it with `bulwarkctl restore status {}`)",
                h.restore_id, h.restore_id
            ));
        }
        let manifest = &self.config.etcd_manifest;
        if !manifest.exists() {
            problems.push(format!(
                "etcd's manifest {} is not in place (is another restore half-done here?)",
                manifest.display()
            ));
        }
        if !req.key_id.is_empty()
            && let Err(why) = self.decrypts(&req.key_id)
        {
            problems.push(why);
        }
        let (tool, tool_problem) = self.check_tool_for(&req).await;
        problems.extend(tool_problem);
        let mut free = 0;
        match self.member(None).await {
            Ok(member) => {
                problems.extend(data_dir_problems(&member.data_dir, &req.restore_id));
                let node = self.engine.node_name.clone();
                let state_dir = self.config.state_dir.clone();
                let size = req.target_size_bytes;
                let skip = req.skip_space_check;
                let (f, space) = tokio::task::spawn_blocking(move || {
                    let free = free_bytes(&member.data_dir);
                    let space = if skip {
                        Ok(())
                    } else {
                        check_space(&node, &member.data_dir, &state_dir, size)
                    };
                    (free, space)
                })
                .await
                .map_err(|e| BackupError::local("checking free space", e))?;
                free = f;
                if let Err(e) = space {
                    problems.push(e.to_string());
                }
            }
            Err(e) => problems.push(format!("etcd's member cannot be resolved: {e}")),
        }
        if !problems.is_empty() {
            tracing::warn!(restore_id = %req.restore_id, ?problems, "restore pre-flight found problems");
        }
        Ok(pb::CheckRestoreResponse {
            node_name: self.engine.node_name.clone(),
            problems,
            restore_tool: tool,
            data_dir_free_bytes: free,
        })
    }

    /// The restore tool's name and version ("etcdutl 3.5.1", empty when it
    /// does not run), and what keeps it from doing what `req` asks.
    async fn check_tool_for(&self, req: &pb::CheckRestoreRequest) -> (String, Option<String>) {
        let caps = self.etcdutl_capabilities().await;
        let tool = self.restore_tool();
        if caps.version.is_empty() {
            let problem = format!(
                "the restore tool {} ({}) does not run here (`{} version` failed)",
                tool.path.display(),
                tool.name,
                tool.path.display()
            );
            return (String::new(), Some(problem));
        }
        let named = format!("{} {}", tool.name, caps.version);
        let lacking = (req.bump_revision > 0 && !caps.bump_revision)
            || (req.mark_compacted && !caps.mark_compacted);
        let problem = lacking.then(|| {
            format!(
                "{named} at {} has no --bump-revision/--mark-compacted, which the restore asks \
                 for (etcdutl 3.5.10+ has them; or restore without a bump)",
                tool.path.display()
            )
        });
        (named, problem)
    }
}

/// What keeps the data dir from being set aside and replaced: a parent
/// that does not exist, a path that is not a directory, and this restore's
/// aside names already taken (a restore never overwrites them).
fn data_dir_problems(data_dir: &Path, restore_id: &str) -> Vec<String> {
    let mut problems = Vec::new();
    match data_dir.parent() {
        Some(parent) if parent.is_dir() => {}
        _ => problems.push(format!(
            "the data dir {}'s parent directory does not exist",
            data_dir.display()
        )),
    }
    // A dangling symlink or a file where the data dir should be cannot be
    // set aside and replaced by a directory.
    if std::fs::symlink_metadata(data_dir).is_ok() && !data_dir.is_dir() {
        problems.push(format!(
            "the data dir {} exists but is not a directory",
            data_dir.display()
        ));
    }
    for suffix in ["", "-partial", super::PREBUILT, "-restored"] {
        let p = aside_path(data_dir, restore_id, suffix);
        if std::fs::symlink_metadata(&p).is_ok() {
            problems.push(format!(
                "{} already exists; a restore never overwrites it",
                p.display()
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_problems_name_each_path() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("etcd");
        // Absent is fine: a rebuilt host has no data dir yet.
        assert!(data_dir_problems(&data, "r1").is_empty());
        std::fs::create_dir(&data).unwrap();
        assert!(data_dir_problems(&data, "r1").is_empty());
        std::fs::create_dir(dir.path().join("etcd.bulwark-r1-partial")).unwrap();
        let p = data_dir_problems(&data, "r1");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("etcd.bulwark-r1-partial already exists"),
            "{p:?}"
        );

        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let p = data_dir_problems(&file, "r2");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("is not a directory"), "{p:?}");

        let orphan = dir.path().join("missing/etcd");
        let p = data_dir_problems(&orphan, "r3");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("parent directory does not exist"), "{p:?}");
    }
}
