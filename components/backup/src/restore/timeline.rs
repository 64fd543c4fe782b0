//! Timelines: every restore starts a new history, as a PostgreSQL recovery
//! starts a new timeline.
//!
//! A restore to revision R of some history makes a new etcd cluster (a new
//! cluster id) whose revisions continue after R (plus the bump). The
//! revisions after R of the history restored from still exist in the store
//! (snapshots and deltas of the abandoned cluster), so "revision 205" can
//! mean two different states. A timeline names one history:
//!
//! - timeline 1 is the original cluster (every cluster id no restore made);
//! - the k-th restore that finished at its target starts timeline k + 1:
//!   the cluster id it made, branched from its base snapshot's timeline at
//!   the revision it restored to.
//!
//! Nothing new is stored: a snapshot's timeline follows from the cluster id
//! in its manifest, a delta segment's from its base snapshot, and the
//! timelines themselves from the restore records (`restores/<id>.json`),
//! which retention and garbage collection never delete, so the numbers
//! stay stable.
//!
//! Timeline n's history is its parent's up to the branch revision, then its
//! own. A revision or time is resolved along that path ([`Timelines::locate`]),
//! so a plain restore never lands in an abandoned history, and going back to
//! one is `--timeline N`.

use chrono::{DateTime, Utc};

use super::pitr::Target;
use super::record::{RecordState, RestoreRecord};
use crate::error::{BackupError, Result};
use crate::snapshot::manifest::Manifest;

/// The original cluster's timeline.
pub const ROOT: u32 = 1;

/// One history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeline {
    /// 1 for the original cluster, then one per finished restore.
    pub number: u32,
    /// The cluster id the restore made; `None` for timeline 1.
    pub cluster_id: Option<u64>,
    /// The timeline restored from; `None` for timeline 1.
    pub parent: Option<u32>,
    /// The parent's revision this timeline starts from (0 for timeline 1).
    pub branch_revision: i64,
    /// When its restore finished (`None` for timeline 1).
    pub began_at: Option<DateTime<Utc>>,
    /// The restore that started it (`None` for timeline 1).
    pub restore_id: Option<String>,
}

/// Where a target lies in one timeline's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// The timeline whose own snapshots and deltas hold the target.
    pub timeline: u32,
    /// The target to resolve there (the same, or the branch revision when
    /// the asked timeline has nothing of its own yet).
    pub target: Target,
    /// The highest revision of that timeline that belongs to the asked
    /// history (its child's branch revision), when it is an ancestor.
    pub upper: Option<i64>,
}

/// Every timeline of a cluster's store, numbered from 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timelines {
    list: Vec<Timeline>,
}

impl Timelines {
    /// The timelines the restore records describe: one per restore that
    /// finished at its target, in the order they finished.
    pub fn new(records: &[RestoreRecord]) -> Self {
        let mut done: Vec<&RestoreRecord> = records
            .iter()
            .filter(|r| r.state == RecordState::Done && r.cluster_id != 0)
            .collect();
        done.sort_by(|a, b| {
            let at = |r: &RestoreRecord| r.finished_at.or(r.started_at);
            at(a)
                .cmp(&at(b))
                .then_with(|| a.restore_id.cmp(&b.restore_id))
        });
        let mut t = Timelines {
            list: vec![Timeline {
                number: ROOT,
                cluster_id: None,
                parent: None,
                branch_revision: 0,
                began_at: None,
                restore_id: None,
            }],
        };
        for r in done {
            // Records from before `fromClusterId` was kept: the history the
            // cluster had when the restore ran, which is the newest one.
            let parent = match r.from_cluster_id {
                0 => t.current(),
                id => t.of_cluster(id),
            };
            let number = t.current() + 1;
            t.list.push(Timeline {
                number,
                cluster_id: Some(r.cluster_id),
                parent: Some(parent),
                branch_revision: r.revision,
                began_at: r.finished_at,
                restore_id: Some(r.restore_id.clone()),
            });
        }
        t
    }

    /// The newest timeline: the live cluster's, unless it was rebuilt
    /// outside bulwark.
    pub fn current(&self) -> u32 {
        self.list.last().map_or(ROOT, |t| t.number)
    }

    /// Every timeline, oldest first.
    pub fn all(&self) -> &[Timeline] {
        &self.list
    }

    /// Timeline `n`, or a clear error naming the ones that exist.
    pub fn get(&self, n: u32) -> Result<&Timeline> {
        self.list.iter().find(|t| t.number == n).ok_or_else(|| {
            BackupError::InvalidArgument(format!(
                "timeline {n} does not exist: this store has timelines 1 to {}",
                self.current()
            ))
        })
    }

    /// The timeline of an etcd cluster id: the restore that made it, or
    /// the original cluster's.
    pub fn of_cluster(&self, cluster_id: u64) -> u32 {
        self.list
            .iter()
            .rev()
            .find(|t| t.cluster_id == Some(cluster_id))
            .map_or(ROOT, |t| t.number)
    }

    /// The timeline a snapshot (and so its delta segments) belongs to.
    pub fn of_manifest(&self, m: &Manifest) -> u32 {
        self.of_cluster(m.cluster_id())
    }

    /// Where `target` lies in timeline `n`'s history: in `n` itself when
    /// it is after `n` began, else (recursively) in its parent, capped at
    /// the branch revision. `Latest` and `Snapshot` always lie in `n`.
    pub fn locate(&self, n: u32, target: Target) -> Result<Located> {
        let mut here = self.get(n)?;
        let mut upper = None;
        loop {
            let in_here = match (target, here.parent) {
                (_, None) => true,
                (Target::Latest | Target::Snapshot, _) => true,
                (Target::Revision(r), _) => r > here.branch_revision,
                (Target::Time(t), _) => here.began_at.is_none_or(|b| t >= b),
            };
            if in_here {
                return Ok(Located {
                    timeline: here.number,
                    target,
                    upper,
                });
            }
            upper = Some(here.branch_revision);
            here = self.get(here.parent.unwrap_or(ROOT))?;
        }
    }

    /// Where the state timeline `n` began with is kept: its parent's branch
    /// revision. `None` for timeline 1.
    pub fn start_of(&self, n: u32) -> Result<Option<Located>> {
        let t = self.get(n)?;
        Ok(t.parent.map(|parent| Located {
            timeline: parent,
            target: Target::Revision(t.branch_revision),
            upper: Some(t.branch_revision),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(id: &str, minute: u32, revision: i64, cluster: u64, from: u64) -> RestoreRecord {
        let mut r = RestoreRecord::started(id, "node-0", at(minute));
        r.state = RecordState::Done;
        r.finished_at = Some(at(minute + 1));
        r.revision = revision;
        r.cluster_id = cluster;
        r.from_cluster_id = from;
        r
    }

    fn at(minute: u32) -> DateTime<Utc> {
        format!("2026-12-05T10:{minute:02}:00Z").parse().unwrap()
    }

    #[test]
    fn each_finished_restore_starts_the_next_timeline() {
        let mut failed = done("r-failed", 5, 50, 0xf, 0xa);
        failed.state = RecordState::Failed;
        // Restore 1 from the original cluster (0xa) at 104 made 0xb; then
        // restore 2 went back to the original history at 205 and made 0xc.
        let t = Timelines::new(&[
            done("r-2", 20, 205, 0xc, 0xa),
            failed,
            done("r-1", 10, 104, 0xb, 0xa),
        ]);
        assert_eq!(t.current(), 3);
        assert_eq!(t.of_cluster(0xa), 1);
        assert_eq!(t.of_cluster(0xb), 2);
        assert_eq!(t.of_cluster(0xc), 3);
        assert_eq!(t.get(3).unwrap().parent, Some(1));
        assert_eq!(t.get(3).unwrap().branch_revision, 205);
        assert_eq!(t.get(2).unwrap().restore_id.as_deref(), Some("r-1"));
        let err = t.get(4).unwrap_err().to_string();
        assert!(err.contains("timelines 1 to 3"), "{err}");
    }

    #[test]
    fn a_revision_before_the_branch_is_found_in_the_parent_capped_there() {
        let t = Timelines::new(&[
            done("r-1", 10, 104, 0xb, 0xa),
            done("r-2", 20, 2_000_000_150, 0xc, 0xb),
        ]);
        // Timeline 3 = 1 up to 104, then 2 up to 2_000_000_150, then 3.
        assert_eq!(
            t.locate(3, Target::Revision(90)).unwrap(),
            Located {
                timeline: 1,
                target: Target::Revision(90),
                upper: Some(104)
            }
        );
        assert_eq!(
            t.locate(3, Target::Revision(1_000_000_200))
                .unwrap()
                .timeline,
            2
        );
        assert_eq!(
            t.locate(3, Target::Revision(1_000_000_200)).unwrap().upper,
            Some(2_000_000_150)
        );
        assert_eq!(t.locate(3, Target::Latest).unwrap().timeline, 3);
        // Asked for timeline 1 itself, its abandoned revisions are its own.
        assert_eq!(
            t.locate(1, Target::Revision(205)).unwrap(),
            Located {
                timeline: 1,
                target: Target::Revision(205),
                upper: None
            }
        );
        assert_eq!(
            t.start_of(2).unwrap().unwrap().target,
            Target::Revision(104)
        );
        assert_eq!(t.start_of(1).unwrap(), None);
    }

    #[test]
    fn a_time_before_a_timeline_began_is_found_in_its_parent() {
        let t = Timelines::new(&[done("r-1", 10, 104, 0xb, 0xa)]);
        assert_eq!(t.locate(2, Target::Time(at(5))).unwrap().timeline, 1);
        assert_eq!(t.locate(2, Target::Time(at(5))).unwrap().upper, Some(104));
        assert_eq!(t.locate(2, Target::Time(at(12))).unwrap().timeline, 2);
    }

    #[test]
    fn records_without_the_source_cluster_branch_from_the_newest_timeline() {
        let t = Timelines::new(&[done("r-1", 10, 104, 0xb, 0), done("r-2", 20, 5, 0xc, 0)]);
        assert_eq!(t.get(2).unwrap().parent, Some(1));
        assert_eq!(t.get(3).unwrap().parent, Some(2));
    }
}
