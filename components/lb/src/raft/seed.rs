//! lb.yaml's `backends` and the registry. A leader seeds an empty registry
//! with them, once ([`seed`]); from then on the registry (changed with
//! `bulwarkctl lb add-backend`, `update-backend`, `remove-backend`) is what
//! every node routes to, and a later edit of the file changes nothing. An
//! operator who edited it and restarted the node would see no effect and no
//! reason, so each node says, in its log, where its file and the registry
//! part ([`watch_drift`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bulwark_api::raft::v1 as pb;
use bulwark_common::shutdown::next_change;
use openraft::async_runtime::WatchReceiver;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendConfig, LbConfig};
use crate::raft::Raft;
use crate::raft::state::command;
use crate::raft::store::StateMachineStore;

/// How long the registry must stay unchanged before it is compared: a
/// restarted node replays its log, and the states it passes on the way say
/// nothing about the file.
const SETTLED: Duration = Duration::from_secs(2);

/// As leader, proposes the configured backends once, if the registry was
/// never seeded.
pub async fn seed(
    raft: Raft,
    sm: StateMachineStore,
    config: LbConfig,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut rx = raft.metrics();
    loop {
        if sm.current().seeded() {
            return Ok(());
        }
        let leading = crate::raft::leads(&rx.borrow_watched(), config.node_id);
        if leading {
            let backends = config
                .backends
                .iter()
                .map(|b| pb::BackendRecord {
                    id: b.id.clone(),
                    address: b.address.to_string(),
                    zone: b.zone.clone(),
                    weight: b.weight,
                    admin_state: pb::AdminState::Active as i32,
                    drain_deadline: None,
                })
                .collect();
            let cmd = command(
                std::time::SystemTime::now(),
                pb::command::Command::SeedBackends(pb::SeedBackends { backends }),
            );
            match raft.client_write(cmd).await {
                Ok(_) => {
                    tracing::info!(
                        count = config.backends.len(),
                        "seeded the backend registry from the configuration"
                    );
                    continue;
                }
                // A new leader accepts writes once a quorum acknowledged
                // it (openraft's check-quorum lease): try again shortly.
                Err(e) => tracing::debug!(error = %e, "seeding the backend registry: retrying"),
            }
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        }
        if !next_change(&token, rx.changed()).await {
            return Ok(());
        }
    }
}

/// Where lb.yaml's backends and the registry part, by backend id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// Listed in lb.yaml, not registered (removed, or added to the file
    /// after the registry was seeded).
    pub file_only: Vec<String>,
    /// In both, with another address, zone or weight: what differs.
    pub changed: Vec<String>,
    /// Registered, not listed in lb.yaml (added with bulwarkctl).
    pub registry_only: Vec<String>,
}

impl Drift {
    /// `configured` against `registered`.
    pub fn between(configured: &[BackendConfig], registered: &[pb::BackendRecord]) -> Self {
        let registered: BTreeMap<&str, &pb::BackendRecord> =
            registered.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut drift = Self::default();
        for c in configured {
            match registered.get(c.id.as_str()) {
                None => drift.file_only.push(format!("{} ({})", c.id, c.address)),
                Some(r) => {
                    let differences = differences(c, r);
                    if !differences.is_empty() {
                        drift
                            .changed
                            .push(format!("{}: {}", c.id, differences.join(", ")));
                    }
                }
            }
        }
        drift.registry_only = registered
            .values()
            .filter(|r| !configured.iter().any(|c| c.id == r.id))
            .map(|r| format!("{} ({})", r.id, r.address))
            .collect();
        drift
    }

    /// Whether lb.yaml says something the registry does not do: a backend
    /// it lists is missing or set otherwise. A registry that only holds
    /// more is the normal result of `add-backend`.
    pub fn file_is_stale(&self) -> bool {
        !self.file_only.is_empty() || !self.changed.is_empty()
    }

    fn is_empty(&self) -> bool {
        !self.file_is_stale() && self.registry_only.is_empty()
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = [
            ("in lb.yaml only", &self.file_only),
            ("set otherwise in lb.yaml", &self.changed),
            ("in the registry only", &self.registry_only),
        ];
        let mut first = true;
        for (what, items) in parts.into_iter().filter(|(_, items)| !items.is_empty()) {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{what}: {}", items.join(", "))?;
        }
        Ok(())
    }
}

/// The fields of `c` that `r` has otherwise, as `field file → registry`.
fn differences(c: &BackendConfig, r: &pb::BackendRecord) -> Vec<String> {
    let mut out = Vec::new();
    let address = c.address.to_string();
    if address != r.address {
        out.push(format!("address {address} → {}", r.address));
    }
    if c.zone != r.zone {
        out.push(format!("zone {:?} → {:?}", c.zone, r.zone));
    }
    if c.weight != r.weight {
        out.push(format!("weight {} → {}", c.weight, r.weight));
    }
    out
}

/// Compares `configured` with the registry once it was seeded and each
/// time it settles after a change, and logs each new difference: a warning
/// when lb.yaml says something the registry does not do, else a note. A
/// file that lists no backends seeds nothing and is not compared.
pub async fn watch_drift(
    sm: StateMachineStore,
    configured: Vec<BackendConfig>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    if configured.is_empty() {
        return Ok(());
    }
    let mut rx = sm.subscribe();
    let mut said = Drift::default();
    loop {
        if !settled(&mut rx, &token).await {
            return Ok(());
        }
        let state = rx.borrow_and_update().clone();
        if state.seeded() {
            let drift = Drift::between(&configured, state.backends());
            if drift != said {
                log(&drift);
                said = drift;
            }
        }
        if !next_change(&token, rx.changed()).await {
            return Ok(());
        }
    }
}

/// Waits until the registry went [`SETTLED`] without a change: `false`
/// when the watch should end.
async fn settled<T>(rx: &mut tokio::sync::watch::Receiver<T>, token: &CancellationToken) -> bool {
    loop {
        tokio::select! {
            () = token.cancelled() => return false,
            changed = tokio::time::timeout(SETTLED, rx.changed()) => match changed {
                Err(_) => return true,
                Ok(Err(_)) => return false,
                Ok(Ok(())) => {}
            },
        }
    }
}

fn log(drift: &Drift) {
    if drift.file_is_stale() {
        tracing::warn!(
            %drift,
            "lb.yaml's backends differ from the registry, which is what bulwark-lb routes to \
             (lb.yaml only seeds an empty registry, once): change backends with bulwarkctl lb \
             add-backend, update-backend or remove-backend, and edit lb.yaml to match for the \
             next cluster it seeds"
        );
    } else if !drift.is_empty() {
        tracing::info!(%drift, "the registry holds backends lb.yaml does not list");
    } else {
        tracing::info!("lb.yaml's backends match the registry again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configured(id: &str, address: &str, zone: &str, weight: u32) -> BackendConfig {
        BackendConfig {
            id: id.into(),
            address: address.parse().unwrap(),
            zone: zone.into(),
            weight,
        }
    }

    fn registered(id: &str, address: &str, zone: &str, weight: u32) -> pb::BackendRecord {
        pb::BackendRecord {
            id: id.into(),
            address: address.into(),
            zone: zone.into(),
            weight,
            ..Default::default()
        }
    }

    #[test]
    fn the_file_and_the_registry_are_compared_by_id() {
        let file = [
            configured("cp-1", "10.0.0.11:6443", "a", 100),
            configured("cp-2", "10.0.0.12:6443", "b", 100),
            configured("cp-4", "10.0.0.14:6443", "a", 100),
        ];
        let registry = [
            registered("cp-1", "10.0.0.11:6443", "a", 100),
            registered("cp-2", "10.0.0.22:6443", "c", 200),
            registered("cp-3", "10.0.0.13:6443", "c", 100),
        ];
        let drift = Drift::between(&file, &registry);
        assert_eq!(drift.file_only, ["cp-4 (10.0.0.14:6443)"]);
        assert_eq!(
            drift.changed,
            ["cp-2: address 10.0.0.12:6443 → 10.0.0.22:6443, zone \"b\" → \"c\", weight 100 → 200"]
        );
        assert_eq!(drift.registry_only, ["cp-3 (10.0.0.13:6443)"]);
        assert!(drift.file_is_stale());
        assert_eq!(
            drift.to_string(),
            "in lb.yaml only: cp-4 (10.0.0.14:6443); set otherwise in lb.yaml: cp-2: address \
             10.0.0.12:6443 → 10.0.0.22:6443, zone \"b\" → \"c\", weight 100 → 200; in the \
             registry only: cp-3 (10.0.0.13:6443)"
        );
    }

    #[test]
    fn a_registry_that_only_holds_more_is_no_stale_file() {
        let file = [configured("cp-1", "10.0.0.11:6443", "a", 100)];
        let same = [registered("cp-1", "10.0.0.11:6443", "a", 100)];
        assert_eq!(Drift::between(&file, &same), Drift::default());
        let more = [
            registered("cp-1", "10.0.0.11:6443", "a", 100),
            registered("cp-2", "10.0.0.12:6443", "b", 100),
        ];
        let drift = Drift::between(&file, &more);
        assert!(!drift.file_is_stale());
        assert_eq!(
            drift.to_string(),
            "in the registry only: cp-2 (10.0.0.12:6443)"
        );
        // An empty lb.yaml (backends added with bulwarkctl only) is the
        // same case.
        assert!(!Drift::between(&[], &more).file_is_stale());
    }
}
