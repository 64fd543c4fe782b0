//! The replicated state and its deterministic apply.
//!
//! The state is the protobuf `StateMachineData` itself: the same bytes are
//! kept on disk after every apply, sent as snapshots, and read by the API.
//! Apply reads no clock and no local configuration; times come from the
//! command's `proposed_at`, so every node ends in the same state.
//! A command that no longer fits the state (an id taken or removed by a
//! concurrent write) changes nothing and returns an [`ApplyError`] to the
//! proposer.

use std::net::SocketAddr;
use std::time::SystemTime;

use bulwark_api::raft::v1 as pb;
use openraft::EntryPayload;

use super::convert::{log_id_to_pb, stored_membership_to_pb};
use super::types::{Cmd, CmdResult, Entry, LogId, StoredMembership};
use crate::backends::{AdminState, BackendSpec, Verdict};

/// Current format of `StateMachineData`.
pub const FORMAT_VERSION: u32 = 1;
/// Failovers kept in the history.
pub const MAX_FAILOVERS: usize = 32;

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The backend does not exist.
    #[error("backend {id:?} does not exist")]
    NotFound {
        /// Its id.
        id: String,
    },
    /// The backend id is taken.
    #[error("backend {id:?} already exists")]
    AlreadyExists {
        /// Its id.
        id: String,
    },
    /// The command is malformed (a bug in the proposer, or a log written by
    /// a newer version).
    #[error("malformed command: {0}")]
    Malformed(String),
}

/// The replicated state of the LB cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LbState {
    data: pb::StateMachineData,
}

impl LbState {
    /// Wraps decoded data (from disk or a snapshot). Data of a newer
    /// format than this build's (a rollback after the new version wrote)
    /// is refused: read as this format it could lose fields silently.
    pub fn from_data(data: pb::StateMachineData) -> Result<Self, String> {
        if data.format_version > FORMAT_VERSION {
            return Err(format!(
                "written by a newer bulwark-lb (state format {}; this build reads up to {FORMAT_VERSION}): \
                 run the newer version again, or restore the data dir kept from before the upgrade \
                 (docs/UPGRADES.md)",
                data.format_version
            ));
        }
        Ok(Self { data })
    }

    /// The data, as persisted and sent in snapshots.
    pub fn data(&self) -> &pb::StateMachineData {
        &self.data
    }

    /// The last applied log index (0 when nothing was applied).
    pub fn applied_index(&self) -> u64 {
        self.data.last_applied.as_ref().map_or(0, |l| l.index)
    }

    /// Registered backends, sorted by id.
    pub fn backends(&self) -> &[pb::BackendRecord] {
        &self.data.backends
    }

    /// Where registered backend `id` sits in the sorted list; a command
    /// naming one that is not registered is refused.
    fn registered(&self, id: &str) -> Result<usize, ApplyError> {
        self.data
            .backends
            .binary_search_by(|b| b.id.as_str().cmp(id))
            .map_err(|_| ApplyError::NotFound { id: id.to_owned() })
    }

    /// One backend by id.
    pub fn backend(&self, id: &str) -> Option<&pb::BackendRecord> {
        self.data
            .backends
            .binary_search_by(|b| b.id.as_str().cmp(id))
            .ok()
            .map(|i| &self.data.backends[i])
    }

    /// The committed verdict of a backend.
    pub fn verdict(&self, id: &str) -> Option<&pb::VerdictRecord> {
        self.data
            .verdicts
            .binary_search_by(|v| v.backend_id.as_str().cmp(id))
            .ok()
            .map(|i| &self.data.verdicts[i])
    }

    /// The VIP holder as committed.
    pub fn vip_holder(&self) -> Option<&pb::VipHolder> {
        self.data.vip_holder.as_ref()
    }

    /// Failovers, oldest first.
    pub fn failovers(&self) -> &[pb::FailoverRecord] {
        &self.data.failovers
    }

    /// Whether the configured backends were ever seeded.
    pub fn seeded(&self) -> bool {
        self.data.seeded
    }

    /// Applies one log entry.
    pub fn apply(&mut self, entry: &Entry) -> CmdResult {
        self.data.format_version = FORMAT_VERSION;
        self.data.last_applied = Some(log_id_to_pb(&entry.log_id));
        match &entry.payload {
            EntryPayload::Blank => Ok(()),
            EntryPayload::Membership(m) => {
                let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                self.data.last_membership = Some(stored_membership_to_pb(&stored));
                Ok(())
            }
            EntryPayload::Normal(Cmd(cmd)) => self.apply_command(&entry.log_id, cmd),
        }
    }

    fn apply_command(&mut self, _log_id: &LogId, cmd: &pb::Command) -> CmdResult {
        use pb::command::Command as C;
        let proposed_at = cmd.proposed_at;
        match cmd
            .command
            .as_ref()
            .ok_or_else(|| ApplyError::Malformed("no command set".into()))?
        {
            C::SetBackend(s) => {
                let b = s
                    .backend
                    .as_ref()
                    .ok_or_else(|| ApplyError::Malformed("SetBackend.backend is missing".into()))?;
                let pos = self.data.backends.binary_search_by(|x| x.id.cmp(&b.id));
                match (pos, pb::SetMode::try_from(s.mode)) {
                    (Ok(_), Ok(pb::SetMode::Create)) => {
                        return Err(ApplyError::AlreadyExists { id: b.id.clone() });
                    }
                    (Err(_), Ok(pb::SetMode::Update)) => {
                        return Err(ApplyError::NotFound { id: b.id.clone() });
                    }
                    (_, Err(_)) => {
                        return Err(ApplyError::Malformed(format!("unknown SetMode {}", s.mode)));
                    }
                    (Ok(i), _) => self.data.backends[i] = b.clone(),
                    (Err(i), _) => self.data.backends.insert(i, b.clone()),
                }
                Ok(())
            }
            C::RemoveBackend(r) => {
                let i = self.registered(&r.id)?;
                self.data.backends.remove(i);
                if let Ok(v) = self
                    .data
                    .verdicts
                    .binary_search_by(|x| x.backend_id.cmp(&r.id))
                {
                    self.data.verdicts.remove(v);
                }
                Ok(())
            }
            C::SetAdminState(s) => {
                let i = self.registered(&s.id)?;
                let b = &mut self.data.backends[i];
                b.admin_state = s.admin_state;
                b.drain_deadline = if s.admin_state == pb::AdminState::Drain as i32 {
                    s.drain_deadline
                } else {
                    None
                };
                Ok(())
            }
            C::ApplyVerdicts(v) => {
                for change in &v.changes {
                    // Verdicts for backends removed meanwhile are dropped.
                    if self.backend(&change.backend_id).is_none() {
                        continue;
                    }
                    let mut record = change.clone();
                    if record.since.is_none() {
                        record.since = proposed_at;
                    }
                    match self
                        .data
                        .verdicts
                        .binary_search_by(|x| x.backend_id.cmp(&change.backend_id))
                    {
                        Ok(i) => self.data.verdicts[i] = record,
                        Err(i) => self.data.verdicts.insert(i, record),
                    }
                }
                self.data.fail_open = v.fail_open;
                self.data.zones_down = v.zones_down.clone();
                Ok(())
            }
            C::RecordVipHolder(r) => {
                self.data.vip_holder = Some(pb::VipHolder {
                    node_id: r.node_id,
                    term: r.term,
                    since: r.since.or(proposed_at),
                });
                if let Some(f) = &r.failover {
                    self.data.failovers.push(*f);
                    let excess = self.data.failovers.len().saturating_sub(MAX_FAILOVERS);
                    self.data.failovers.drain(..excess);
                }
                Ok(())
            }
            C::SeedBackends(s) => {
                if !self.data.seeded && self.data.backends.is_empty() {
                    let mut backends = s.backends.clone();
                    backends.sort_by(|a, b| a.id.cmp(&b.id));
                    backends.dedup_by(|a, b| a.id == b.id);
                    self.data.backends = backends;
                }
                self.data.seeded = true;
                Ok(())
            }
            C::Noop(_) => Ok(()),
        }
    }

    /// The backend list for the data path.
    pub fn backend_specs(&self) -> Vec<BackendSpec> {
        self.data
            .backends
            .iter()
            .filter_map(|b| {
                let address: SocketAddr = match b.address.parse() {
                    Ok(a) => a,
                    Err(_) => {
                        // The API only accepts IP:port, so this is an old or
                        // foreign log; skip rather than publish nothing.
                        tracing::error!(backend = %b.id, address = %b.address, "backend address is not IP:port; not routed");
                        return None;
                    }
                };
                Some(BackendSpec {
                    id: b.id.clone(),
                    address,
                    zone: b.zone.clone(),
                    weight: b.weight.max(1),
                    admin: admin_of(b),
                    verdict: verdict_of(self.verdict(&b.id)),
                })
            })
            .collect()
    }
}

fn admin_of(b: &pb::BackendRecord) -> AdminState {
    if b.admin_state == pb::AdminState::Drain as i32 {
        AdminState::Drain {
            deadline: b
                .drain_deadline
                .and_then(|t| bulwark_api::time::timestamp_from_proto(&t).ok()),
        }
    } else {
        AdminState::Active
    }
}

fn verdict_of(v: Option<&pb::VerdictRecord>) -> Verdict {
    match v.and_then(|v| pb::Verdict::try_from(v.verdict).ok()) {
        Some(pb::Verdict::Up) => Verdict::Healthy,
        Some(pb::Verdict::Down) => Verdict::Down,
        Some(pb::Verdict::NotReady) => Verdict::Draining,
        _ => Verdict::Unknown,
    }
}

/// A command stamped with the proposer's wall clock.
pub fn command(now: SystemTime, command: pb::command::Command) -> Cmd {
    Cmd(pb::Command {
        proposed_at: bulwark_api::time::timestamp_to_proto(now).ok(),
        command: Some(command),
    })
}

#[cfg(test)]
mod tests {
    use openraft::vote::RaftLeaderId;

    use super::*;

    /// A rollback onto data a newer version wrote is refused, never read
    /// as this format (which could drop what it does not know).
    #[test]
    fn data_of_a_newer_format_is_refused() {
        let current = pb::StateMachineData {
            format_version: FORMAT_VERSION,
            ..Default::default()
        };
        assert!(LbState::from_data(current).is_ok());
        // Data of no format (never applied anything) is the current one.
        assert!(LbState::from_data(pb::StateMachineData::default()).is_ok());
        let newer = pb::StateMachineData {
            format_version: FORMAT_VERSION + 1,
            ..Default::default()
        };
        let e = LbState::from_data(newer).unwrap_err();
        assert!(
            e.starts_with(
                "written by a newer bulwark-lb (state format 2; this build reads up to 1)"
            ),
            "{e}"
        );
    }
    use crate::raft::types::LeaderId;

    fn entry(index: u64, c: pb::command::Command) -> Entry {
        Entry {
            log_id: LogId::new(LeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command(SystemTime::UNIX_EPOCH, c)),
        }
    }

    fn record(id: &str) -> pb::BackendRecord {
        pb::BackendRecord {
            id: id.into(),
            address: "10.0.0.1:6443".into(),
            zone: "a".into(),
            weight: 100,
            admin_state: pb::AdminState::Active as i32,
            drain_deadline: None,
        }
    }

    fn set(id: &str, mode: pb::SetMode) -> pb::command::Command {
        pb::command::Command::SetBackend(pb::SetBackend {
            backend: Some(record(id)),
            mode: mode as i32,
        })
    }

    #[test]
    fn backend_lifecycle_and_conflicts() {
        let mut s = LbState::default();
        assert_eq!(s.apply(&entry(1, set("b", pb::SetMode::Create))), Ok(()));
        assert_eq!(s.apply(&entry(2, set("a", pb::SetMode::Create))), Ok(()));
        assert_eq!(
            s.apply(&entry(3, set("a", pb::SetMode::Create))),
            Err(ApplyError::AlreadyExists { id: "a".into() })
        );
        assert_eq!(
            s.apply(&entry(4, set("zz", pb::SetMode::Update))),
            Err(ApplyError::NotFound { id: "zz".into() })
        );
        let ids: Vec<_> = s.backends().iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"], "sorted by id");
        assert_eq!(
            s.applied_index(),
            4,
            "refused commands still advance applied"
        );

        let drain = pb::command::Command::SetAdminState(pb::SetAdminState {
            id: "a".into(),
            admin_state: pb::AdminState::Drain as i32,
            drain_deadline: None,
        });
        assert_eq!(s.apply(&entry(5, drain)), Ok(()));
        let specs = s.backend_specs();
        assert_eq!(specs[0].admin, AdminState::Drain { deadline: None });
        assert_eq!(specs[1].admin, AdminState::Active);
        assert_eq!(
            specs[0].verdict,
            Verdict::Unknown,
            "healthy unless told otherwise"
        );

        let rm =
            |id: &str| pb::command::Command::RemoveBackend(pb::RemoveBackend { id: id.into() });
        assert_eq!(s.apply(&entry(6, rm("a"))), Ok(()));
        assert_eq!(
            s.apply(&entry(7, rm("a"))),
            Err(ApplyError::NotFound { id: "a".into() })
        );
    }

    #[test]
    fn seeding_happens_once_and_only_into_an_empty_registry() {
        let seed = |ids: &[&str]| {
            pb::command::Command::SeedBackends(pb::SeedBackends {
                backends: ids.iter().map(|i| record(i)).collect(),
            })
        };
        let mut s = LbState::default();
        s.apply(&entry(1, seed(&["x", "y"]))).unwrap();
        assert_eq!(s.backends().len(), 2);
        // A later leader with another config file changes nothing.
        s.apply(&entry(2, seed(&["z"]))).unwrap();
        assert_eq!(s.backends().len(), 2);

        let mut s = LbState::default();
        s.apply(&entry(1, set("op", pb::SetMode::Create))).unwrap();
        s.apply(&entry(2, seed(&["x"]))).unwrap();
        assert!(s.seeded());
        assert_eq!(s.backends().len(), 1, "an operator's registry wins");
    }

    #[test]
    fn failover_history_is_bounded() {
        let mut s = LbState::default();
        for i in 0..(MAX_FAILOVERS as u64 + 5) {
            let c = pb::command::Command::RecordVipHolder(pb::RecordVipHolder {
                node_id: 1 + i % 3,
                term: i,
                since: None,
                failover: Some(pb::FailoverRecord {
                    term: i,
                    ..Default::default()
                }),
            });
            s.apply(&entry(i + 1, c)).unwrap();
        }
        assert_eq!(s.failovers().len(), MAX_FAILOVERS);
        assert_eq!(s.failovers()[0].term, 5, "oldest dropped first");
        assert_eq!(s.vip_holder().unwrap().term, MAX_FAILOVERS as u64 + 4);
    }

    #[test]
    fn apply_is_deterministic() {
        let cmds = [
            set("a", pb::SetMode::Create),
            set("b", pb::SetMode::Upsert),
            pb::command::Command::ApplyVerdicts(pb::ApplyVerdicts {
                changes: vec![pb::VerdictRecord {
                    backend_id: "a".into(),
                    verdict: pb::Verdict::Down as i32,
                    reason: "x".into(),
                    since: None,
                }],
                fail_open: false,
                zones_down: vec![],
            }),
        ];
        let run = || {
            let mut s = LbState::default();
            for (i, c) in cmds.iter().enumerate() {
                let _ = s.apply(&entry(i as u64 + 1, c.clone()));
            }
            s
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert_eq!(a.backend_specs()[0].verdict, Verdict::Down);
        assert!(
            a.verdict("a").unwrap().since.is_some(),
            "since taken from proposed_at"
        );
    }
}
