//! Timelines: every restore starts a new history, as a PostgreSQL recovery
//! starts a new timeline; so does a cluster rebuilt outside bulwark.
//!
//! A restore to revision R of some history makes a new etcd cluster (a new
//! cluster id) whose revisions continue after R (plus the bump). The
//! revisions after R of the history restored from still exist in the store
//! (snapshots and deltas of the abandoned cluster), so "revision 205" can
//! mean two different states. A cluster rebuilt by hand (`etcdutl snapshot
//! restore`, a new kubeadm cluster) and then backed up into the same store
//! is worse: its revisions restart or overlap the old ones with no branch
//! point at all. A timeline names one history:
//!
//! - a root timeline is an etcd cluster no restore made, with no parent:
//!   the original cluster, and every cluster rebuilt outside bulwark;
//! - a restore that finished at its target starts a timeline branched from
//!   its base snapshot's timeline at the revision it restored to.
//!
//! They are numbered from 1 in the order they began: a root when backups
//! first saw its cluster (`clusters/<id>.json`, snapshot/clusters.rs), a
//! restore's when it finished. Timeline 1 is the oldest root (unknown, with
//! no cluster id, when no record names the cluster the first restore came
//! from). Those records and the restore records (`restores/<id>.json`) are
//! never deleted by retention or garbage collection, so the numbers stay as
//! snapshots expire. A snapshot's timeline follows from the cluster id in
//! its manifest, a delta segment's from its base snapshot.
//!
//! Timeline n's history is its parent's up to the branch revision, then its
//! own; a root's is only its own. A revision or time is resolved along that
//! path ([`Timelines::locate`]), so a plain restore never lands in an
//! abandoned history or another root's, and going back to one is
//! `--timeline N`.

use chrono::{DateTime, Utc};

use std::collections::{BTreeMap, BTreeSet};

use super::pitr::Target;
use super::record::{RecordState, RestoreRecord};
use crate::error::{BackupError, Result};
use crate::snapshot::clusters::ClusterRecord;
use crate::snapshot::manifest::Manifest;

/// The original cluster's timeline.
pub const ROOT: u32 = 1;

/// One history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeline {
    /// From 1, in the order the timelines began.
    pub number: u32,
    /// Its etcd cluster id: the one its restore made, or a root's cluster;
    /// `None` only for timeline 1 when no record names its cluster.
    pub cluster_id: Option<u64>,
    /// The timeline restored from; `None` for a root.
    pub parent: Option<u32>,
    /// The parent's revision this timeline starts from (0 for a root).
    pub branch_revision: i64,
    /// When its restore finished, or when backups first saw a root's
    /// cluster (`None` when unknown).
    pub began_at: Option<DateTime<Utc>>,
    /// The restore that started it (`None` for a root).
    pub restore_id: Option<String>,
}

/// How a timeline began, for ordering them.
enum Began<'a> {
    /// Backups first saw this cluster, which no restore made.
    Root(u64),
    /// This restore finished at its target.
    Restore(&'a RestoreRecord),
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
    /// The timelines the restore records and the clusters backups have
    /// seen ([`crate::Engine::seen_clusters`]) describe, numbered in the
    /// order they began.
    pub fn new(records: &[RestoreRecord], clusters: &[ClusterRecord]) -> Self {
        let mut t = Timelines { list: Vec::new() };
        for (at, began) in began(records, clusters) {
            match began {
                Began::Root(id) => t.push(Some(id), None, 0, at, None),
                Began::Restore(r) => {
                    if t.list.is_empty() {
                        // The cluster the first restore came from is on no
                        // record: timeline 1 is that unknown original.
                        t.push(None, None, 0, None, None);
                    }
                    // Records from before `fromClusterId` was kept: the
                    // history that was newest when the restore ran.
                    let parent = match r.from_cluster_id {
                        0 => t.current(),
                        id => t.of_cluster(id),
                    };
                    t.push(
                        Some(r.cluster_id),
                        Some(parent),
                        r.revision,
                        r.finished_at,
                        Some(r.restore_id.clone()),
                    );
                }
            }
        }
        if t.list.is_empty() {
            t.push(None, None, 0, None, None);
        }
        t
    }

    fn push(
        &mut self,
        cluster_id: Option<u64>,
        parent: Option<u32>,
        branch_revision: i64,
        began_at: Option<DateTime<Utc>>,
        restore_id: Option<String>,
    ) {
        self.list.push(Timeline {
            number: self.list.len() as u32 + 1,
            cluster_id,
            parent,
            branch_revision,
            began_at,
            restore_id,
        });
    }

    /// The newest timeline: the live cluster's, unless it was rebuilt
    /// outside bulwark and has not been backed up since.
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
    /// the root it is; timeline 1 for an id on no record.
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

/// Every timeline's start, oldest first: each restore that finished at its
/// target (when it finished), and each cluster seen that no restore made
/// or is making (when first seen). A restore's source cluster was backed up
/// before the restore ran, so it counts as seen by then even when its
/// snapshots and record are gone. Ties put roots first, then go by id.
fn began<'a>(
    records: &'a [RestoreRecord],
    clusters: &[ClusterRecord],
) -> Vec<(Option<DateTime<Utc>>, Began<'a>)> {
    let done: Vec<&RestoreRecord> = records
        .iter()
        .filter(|r| r.state == RecordState::Done && r.cluster_id != 0)
        .collect();
    let made: BTreeSet<u64> = records
        .iter()
        .filter(|r| matches!(r.state, RecordState::Done | RecordState::Running))
        .map(|r| r.cluster_id)
        .collect();
    let mut roots: BTreeMap<u64, DateTime<Utc>> = BTreeMap::new();
    let sources = done
        .iter()
        .filter_map(|r| Some((r.from_cluster_id, r.started_at.or(r.finished_at)?)));
    let seen = clusters.iter().map(|c| (c.cluster_id, c.first_seen_at));
    for (id, at) in seen.chain(sources) {
        if id != 0 && !made.contains(&id) {
            let first = roots.entry(id).or_insert(at);
            *first = (*first).min(at);
        }
    }
    let mut out: Vec<(Option<DateTime<Utc>>, Began<'a>)> = roots
        .into_iter()
        .map(|(id, at)| (Some(at), Began::Root(id)))
        .collect();
    out.extend(
        done.into_iter()
            .map(|r| (r.finished_at.or(r.started_at), Began::Restore(r))),
    );
    let key = |b: &Began<'_>| match b {
        Began::Root(id) => (0, format!("{id:016x}")),
        Began::Restore(r) => (1, r.restore_id.clone()),
    };
    out.sort_by(|(a, x), (b, y)| a.cmp(b).then_with(|| key(x).cmp(&key(y))));
    out
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
        let t = Timelines::new(
            &[
                done("r-2", 20, 205, 0xc, 0xa),
                failed,
                done("r-1", 10, 104, 0xb, 0xa),
            ],
            &[],
        );
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
        let t = Timelines::new(
            &[
                done("r-1", 10, 104, 0xb, 0xa),
                done("r-2", 20, 2_000_000_150, 0xc, 0xb),
            ],
            &[],
        );
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
        let t = Timelines::new(&[done("r-1", 10, 104, 0xb, 0xa)], &[]);
        assert_eq!(t.locate(2, Target::Time(at(5))).unwrap().timeline, 1);
        assert_eq!(t.locate(2, Target::Time(at(5))).unwrap().upper, Some(104));
        assert_eq!(t.locate(2, Target::Time(at(12))).unwrap().timeline, 2);
    }

    #[test]
    fn records_without_the_source_cluster_branch_from_the_newest_timeline() {
        let t = Timelines::new(
            &[done("r-1", 10, 104, 0xb, 0), done("r-2", 20, 5, 0xc, 0)],
            &[],
        );
        assert_eq!(t.get(2).unwrap().parent, Some(1));
        assert_eq!(t.get(3).unwrap().parent, Some(2));
    }

    fn seen(cluster: u64, minute: u32) -> ClusterRecord {
        ClusterRecord {
            cluster_id: cluster,
            first_seen_at: at(minute),
            first_revision: 1,
            first_snapshot_id: format!("s-{cluster:x}"),
            restore_id: String::new(),
            back_filled: false,
        }
    }

    /// The original cluster 0xa, a restore to 104 that made 0xb, then 0xc
    /// rebuilt by hand (first backed up at minute 30) and a restore from
    /// it to 77 that made 0xd.
    fn rebuilt_by_hand() -> Timelines {
        let records = [
            done("r-2", 40, 77, 0xd, 0xc),
            done("r-1", 10, 104, 0xb, 0xa),
        ];
        // The restore wrote 0xb's record too; it is numbered as a restore.
        let clusters = [seen(0xc, 30), seen(0xb, 11), seen(0xa, 0)];
        Timelines::new(&records, &clusters)
    }

    #[test]
    fn a_cluster_rebuilt_outside_bulwark_is_a_root_timeline_of_its_own() {
        let t = rebuilt_by_hand();
        let numbers: Vec<(u32, Option<u64>, Option<u32>)> = t
            .all()
            .iter()
            .map(|t| (t.number, t.cluster_id, t.parent))
            .collect();
        assert_eq!(
            numbers,
            [
                (1, Some(0xa), None),
                (2, Some(0xb), Some(1)),
                (3, Some(0xc), None),
                (4, Some(0xd), Some(3)),
            ]
        );
        assert_eq!(t.current(), 4);
        assert_eq!(t.get(3).unwrap().began_at, Some(at(30)));
        assert_eq!(t.get(3).unwrap().restore_id, None);
        // Timeline 3's revisions and times are its own, however far back:
        // its history is not timeline 1's or 2's.
        for target in [
            Target::Revision(5),
            Target::Revision(500),
            Target::Time(at(1)),
            Target::Latest,
        ] {
            assert_eq!(
                t.locate(3, target).unwrap(),
                Located {
                    timeline: 3,
                    target,
                    upper: None
                },
                "{target:?}"
            );
        }
        assert_eq!(t.start_of(3).unwrap(), None);
        // The restore from it branches from it, not from timeline 1.
        assert_eq!(
            t.locate(4, Target::Revision(50)).unwrap(),
            Located {
                timeline: 3,
                target: Target::Revision(50),
                upper: Some(77)
            }
        );
        // An id on no record is the original's, as before records.
        assert_eq!(t.of_cluster(0xeeee), 1);
    }

    #[test]
    fn numbers_stay_as_retention_deletes_the_oldest_snapshots() {
        use crate::snapshot::clusters::back_fill;
        use crate::snapshot::manifest::tests::sample;
        let snap = |id: &str, cluster: u64, minute: u32| {
            let mut m = sample();
            m.id = id.into();
            m.etcd.cluster_id = format!("{cluster:016x}");
            m.started_at = at(minute);
            m
        };
        let records = [done("r-1", 10, 104, 0xb, 0xa)];
        let mut snapshots = vec![
            snap("a-0", 0xa, 0),
            snap("a-5", 0xa, 5),
            snap("b-12", 0xb, 12),
            snap("c-30", 0xc, 30),
            snap("c-35", 0xc, 35),
        ];
        // A store from before the records: the clusters of the snapshots
        // present count as seen at their oldest, and the next commit
        // writes that down.
        let recorded = back_fill(&[], &snapshots);
        let before = Timelines::new(&records, &recorded);
        assert_eq!(before.of_cluster(0xc), 3);
        // Retention deletes the oldest snapshots, then every one of the
        // original cluster and of the restored one.
        for gone in [vec!["a-0", "c-30"], vec!["a-5", "b-12"]] {
            snapshots.retain(|m| !gone.contains(&m.id.as_str()));
            let mut seen = recorded.clone();
            seen.extend(back_fill(&seen, &snapshots));
            assert_eq!(Timelines::new(&records, &seen), before, "after {gone:?}");
        }
        // Without the records, the rebuilt cluster would move up once the
        // original's snapshots were gone.
        let unrecorded = Timelines::new(&[], &back_fill(&[], &snapshots));
        assert_eq!(unrecorded.of_cluster(0xc), 1);
    }

    #[test]
    fn a_running_restore_s_cluster_is_no_root() {
        let mut running = RestoreRecord::started("r-3", "node-0", at(50));
        running.cluster_id = 0xe;
        // Its first snapshot was recorded before the restore's record said
        // done: not a history of its own meanwhile.
        let t = Timelines::new(&[running], &[seen(0xa, 0), seen(0xe, 51)]);
        assert_eq!(t.current(), 1);
        assert_eq!(t.of_cluster(0xa), 1);
    }
}
