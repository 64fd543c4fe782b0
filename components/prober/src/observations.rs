//! The latest settled observation of every check, shared between the
//! checks (writers) and the reporter (reader).
//!
//! This is the coalescing point that keeps probing independent of the
//! report stream: a check writes its observation here and moves on — a
//! short mutex, never an await on the network — and the reporter reads the
//! whole table when it can send. A slow stream therefore sees fewer, newer
//! reports instead of a queue of old ones: only the latest state per target
//! matters.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bulwark_api::lb::v1::{Observation, ProbeKind};
use tokio::sync::watch;

/// A check's identity: target id and probe kind.
pub type CheckKey = (String, ProbeKind);

/// What CHANGES reports compare: an observation whose outcome class is
/// unchanged (only its latency or time moved) is not a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutcomeClass {
    ok: bool,
    reason: i32,
    http_status: Option<u32>,
}

impl OutcomeClass {
    /// The class of `o`.
    pub fn of(o: &Observation) -> Self {
        Self {
            ok: o.ok,
            reason: o.reason,
            http_status: o.http_status,
        }
    }
}

/// The shared table. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Observations {
    table: Arc<Mutex<BTreeMap<CheckKey, Observation>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for Observations {
    fn default() -> Self {
        Self::new()
    }
}

impl Observations {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            table: Arc::new(Mutex::new(BTreeMap::new())),
            changed: Arc::new(watch::Sender::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<CheckKey, Observation>> {
        // Writers replace whole entries, so a panic elsewhere cannot leave
        // one half-written.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores the latest settled observation of its check. Subscribers are
    /// woken only when the outcome class changed. Returns whether it did.
    pub fn update(&self, o: Observation) -> bool {
        let Ok(kind) = ProbeKind::try_from(o.kind) else {
            return false;
        };
        let key = (o.target_id.clone(), kind);
        let class = OutcomeClass::of(&o);
        let previous = self.lock().insert(key, o);
        let changed = previous.is_none_or(|p| OutcomeClass::of(&p) != class);
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
        changed
    }

    /// Every settled observation, sorted by (target, kind).
    pub fn snapshot(&self) -> Vec<Observation> {
        self.lock().values().cloned().collect()
    }

    /// The settled observation of one check.
    pub fn get(&self, target_id: &str, kind: ProbeKind) -> Option<Observation> {
        self.lock().get(&(target_id.to_owned(), kind)).cloned()
    }

    /// A receiver that is marked changed whenever an outcome class changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(ok: bool, latency_ms: i32) -> Observation {
        Observation {
            target_id: "cp-1".into(),
            kind: ProbeKind::Readyz as i32,
            ok,
            reason: if ok { 1 } else { 5 },
            latency: Some(prost_types::Duration {
                seconds: 0,
                nanos: latency_ms * 1_000_000,
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn only_class_changes_wake_the_reporter() {
        let t = Observations::new();
        let mut rx = t.subscribe();
        assert!(t.update(obs(true, 1)));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // A new latency is stored but is not a change.
        assert!(!t.update(obs(true, 7)));
        assert!(!rx.has_changed().unwrap());
        assert_eq!(
            t.get("cp-1", ProbeKind::Readyz)
                .unwrap()
                .latency
                .unwrap()
                .nanos,
            7_000_000
        );
        assert!(t.update(obs(false, 2)));
        assert!(rx.has_changed().unwrap());
        assert_eq!(t.snapshot().len(), 1);
    }
}
