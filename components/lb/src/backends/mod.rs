//! The backend registry as the data path sees it: an immutable
//! [`BackendSet`] snapshot behind an `ArcSwap`, and the [`Backends`] handle
//! through which the control plane (Raft apply, health aggregation, the API)
//! publishes a new one.
//!
//! Readers never lock and never wait: a connection loads the current `Arc`,
//! picks a backend from lists computed at publish time (with its listener's
//! [`RoutingMode`], carried by the handle it was given), and keeps the chosen
//! backend's live counters (which outlive any one snapshot) for its
//! lifetime. Writers are rare and serialized by a mutex that readers never
//! touch.
//!
//! Drain deadlines are enforced by one timer task per draining backend that
//! cancels the backend's close token; every connection to that backend
//! selects on the token, so nothing polls.

mod set;
mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bulwark_common::config::{Validate, Validator};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use set::{Backend, BackendSet};
pub use stats::{
    AVOID_AFTER_FAILURE, BackendStats, BackendStatus, ConnectErrorKind, StatsSnapshot,
};

/// One apiserver endpoint as the registry describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSpec {
    /// Stable identity; live counters follow it across publishes.
    pub id: String,
    /// Where to connect.
    pub address: SocketAddr,
    /// Failure domain, compared with [`RoutingPolicy::local_zone`]; may be
    /// empty when zones are not used.
    #[serde(default)]
    pub zone: String,
    /// Relative capacity, at least 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// What the operator wants.
    #[serde(default)]
    pub admin: AdminState,
    /// What the health checks concluded.
    #[serde(default)]
    pub verdict: Verdict,
}

fn default_weight() -> u32 {
    1
}

/// The operator's intent for a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AdminState {
    /// Takes new connections (if its verdict allows).
    #[default]
    Active,
    /// Takes no new connections; existing ones continue, and are closed at
    /// `deadline` when there is one.
    Drain {
        /// Wall-clock time at which remaining connections are closed. An
        /// absolute time (not a duration) so that every LB node, applying
        /// the same Raft entry at slightly different moments, agrees.
        #[serde(default)]
        deadline: Option<SystemTime>,
    },
}

impl AdminState {
    /// Whether the operator has drained this backend.
    pub fn is_drain(&self) -> bool {
        matches!(self, AdminState::Drain { .. })
    }
}

/// What the health checks concluded about a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// Ready: takes new connections.
    Healthy,
    /// Not reachable or not alive: no new connections.
    Down,
    /// `/readyz` fails while `/livez` passes: the apiserver is shutting down
    /// gracefully. No new connections; existing ones finish on their own.
    Draining,
    /// Not (yet) checked. Routable: before the prober reports, refusing
    /// traffic would black-hole a fresh cluster.
    #[default]
    Unknown,
}

impl Verdict {
    /// Whether a backend with this verdict may take new connections.
    pub fn is_routable(self) -> bool {
        matches!(self, Verdict::Healthy | Verdict::Unknown)
    }
}

/// How one listener chooses among the routable backends.
///
/// Why per listener: the VIP's clients are the whole cluster, so preferring
/// the VIP holder's zone would send every client to one zone's apiservers
/// (with one apiserver per zone, to one apiserver). The node-local
/// listener's clients are that node's kubelet and controllers, spread over
/// the nodes of every zone, so keeping them in their zone saves cross-zone
/// traffic without concentrating anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RoutingMode {
    /// Every routable backend of every zone (weighted power of two choices).
    #[default]
    Balanced,
    /// The local zone's routable backends while at least
    /// `minLocalHealthyShare` of them are routable, else every routable one.
    ZonePreferred,
}

impl RoutingMode {
    /// The name used in configs and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Balanced => "balanced",
            RoutingMode::ZonePreferred => "zonePreferred",
        }
    }
}

/// Zone preference of this LB node (Envoy's zone-aware routing idea): what
/// the zone-preferred list of every snapshot is computed from. Listeners in
/// [`RoutingMode::Balanced`] ignore it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingPolicy {
    /// This node's zone; `None` spreads over all zones equally.
    #[serde(default)]
    pub local_zone: Option<String>,
    /// Routable share of the local zone's backends (routable / all local,
    /// drained ones included: a drained backend is capacity the zone does
    /// not have) below which new connections spread over every zone.
    #[serde(default = "default_min_share")]
    pub min_local_healthy_share: f64,
}

fn default_min_share() -> f64 {
    // Half: with two apiservers in a zone, one failure keeps traffic local
    // (the survivor can take it); with three, losing two spills over.
    0.5
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        Self {
            local_zone: None,
            min_local_healthy_share: default_min_share(),
        }
    }
}

impl Validate for RoutingPolicy {
    fn validate(&self, v: &mut Validator) {
        let s = self.min_local_healthy_share;
        v.check(
            s.is_finite() && (0.0..=1.0).contains(&s),
            "minLocalHealthyShare",
            format!("{s} is out of range: expected a fraction between 0.0 and 1.0"),
        );
        if let Some(z) = &self.local_zone {
            v.check(
                !z.is_empty(),
                "localZone",
                "must not be empty: omit it to disable zone preference",
            );
        }
    }
}

/// Why a backend list was refused. Nothing is applied when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendsError {
    /// A backend has an empty id.
    #[error("backends[{index}].id: must not be empty")]
    EmptyId {
        /// Position in the list.
        index: usize,
    },
    /// Two backends share an id.
    #[error("backends[{index}].id: duplicate id {id:?}")]
    DuplicateId {
        /// Position of the second occurrence.
        index: usize,
        /// The repeated id.
        id: String,
    },
    /// A backend has weight 0.
    #[error("backends[{index}].weight: must be at least 1 (backend {id:?}); drain it instead")]
    ZeroWeight {
        /// Position in the list.
        index: usize,
        /// Its id.
        id: String,
    },
    /// The version is older than the published one (an out-of-order apply).
    #[error("stale backend set: version {offered} is older than the published {current}")]
    StaleVersion {
        /// The published version.
        current: u64,
        /// The refused version.
        offered: u64,
    },
}

/// Checks a backend list without publishing it (for the API and Raft
/// proposals, so that apply never meets a list it must refuse).
pub fn validate_specs(specs: &[BackendSpec]) -> Result<(), BackendsError> {
    let mut seen = HashMap::with_capacity(specs.len());
    for (index, s) in specs.iter().enumerate() {
        if s.id.is_empty() {
            return Err(BackendsError::EmptyId { index });
        }
        if s.weight == 0 {
            return Err(BackendsError::ZeroWeight {
                index,
                id: s.id.clone(),
            });
        }
        if seen.insert(s.id.as_str(), index).is_some() {
            return Err(BackendsError::DuplicateId {
                index,
                id: s.id.clone(),
            });
        }
    }
    Ok(())
}

/// The shared handle: the proxy reads through it, the control plane
/// publishes through it. Cheap to clone.
#[derive(Clone)]
pub struct Backends {
    inner: Arc<Inner>,
    /// How picks through this handle choose (one handle per listener, all
    /// sharing `inner`).
    mode: RoutingMode,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.load();
        f.debug_struct("Backends")
            .field("version", &set.version())
            .field("backends", &set.len())
            .field("fail_open", &set.fail_open())
            .field("mode", &self.mode)
            .finish()
    }
}

struct Inner {
    current: ArcSwap<BackendSet>,
    /// Control-plane state, touched only by publishers.
    control: Mutex<Control>,
}

struct Control {
    policy: RoutingPolicy,
    drain_max: Option<Duration>,
    specs: Vec<BackendSpec>,
    /// Live state by backend id, kept across publishes.
    live: HashMap<String, Arc<BackendStats>>,
}

impl Default for Backends {
    fn default() -> Self {
        Self::new(RoutingPolicy::default())
    }
}

impl Backends {
    /// An empty registry (version 0) with this node's routing policy; the
    /// handle routes [`RoutingMode::Balanced`] (see [`Backends::with_mode`]).
    pub fn new(policy: RoutingPolicy) -> Self {
        let empty = BackendSet::build(0, &[], &[], &policy);
        Self {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(empty),
                control: Mutex::new(Control {
                    policy,
                    drain_max: None,
                    specs: Vec::new(),
                    live: HashMap::new(),
                }),
            }),
            mode: RoutingMode::Balanced,
        }
    }

    /// A handle to the same registry whose picks use `mode`: what a
    /// listener is given.
    pub fn with_mode(&self, mode: RoutingMode) -> Self {
        Self {
            inner: self.inner.clone(),
            mode,
        }
    }

    /// How picks through this handle choose.
    pub fn mode(&self) -> RoutingMode {
        self.mode
    }

    /// The current snapshot. Lock-free; hold it only as long as needed.
    pub fn load(&self) -> Arc<BackendSet> {
        self.inner.current.load_full()
    }

    /// Replaces the backend list. Live counters carry over by id; removed
    /// backends' existing connections continue (drain with a deadline first
    /// to close them). Drain deadlines are (re)armed here; call it within a
    /// Tokio runtime so the timers can run.
    pub fn publish(&self, specs: Vec<BackendSpec>, version: u64) -> Result<(), BackendsError> {
        validate_specs(&specs)?;
        let mut control = self.lock();
        let current = self.inner.current.load().version();
        if version < current {
            return Err(BackendsError::StaleVersion {
                current,
                offered: version,
            });
        }
        control.specs = specs;
        self.rebuild(&mut control, version);
        Ok(())
    }

    /// Changes this node's routing policy and recomputes the snapshot.
    pub fn set_policy(&self, policy: RoutingPolicy) {
        let mut control = self.lock();
        control.policy = policy;
        let version = self.inner.current.load().version();
        self.rebuild(&mut control, version);
    }

    /// Caps how long a drained backend's connections may continue on this
    /// node: at most `max` after this node applied the drain, whatever the
    /// drain's own deadline. `None` (the default) keeps the drain's deadline.
    pub fn set_drain_max_duration(&self, max: Option<Duration>) {
        let mut control = self.lock();
        if control.drain_max != max {
            control.drain_max = max;
            let version = self.inner.current.load().version();
            self.rebuild(&mut control, version);
        }
    }

    /// Every published backend with its live counters, in registry order.
    pub fn stats(&self) -> Vec<BackendStatus> {
        self.load().iter().map(Backend::status).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        // A publisher that panicked mid-way left the previous snapshot in
        // place (the swap is the last step), so the state is still usable.
        self.inner.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rebuild(&self, control: &mut Control, version: u64) {
        let now = SystemTime::now();
        let drain_max = control.drain_max;
        let mut live = Vec::with_capacity(control.specs.len());
        let mut next = HashMap::with_capacity(control.specs.len());
        for spec in &control.specs {
            let stats = control
                .live
                .get(&spec.id)
                .cloned()
                .unwrap_or_else(|| BackendStats::shared(&spec.id));
            let close = stats.apply_admin(&spec.admin, drain_max, now);
            next.insert(spec.id.clone(), stats.clone());
            live.push((stats, close));
        }
        control.live = next;
        let set = BackendSet::build(version, &control.specs, &live, &control.policy);
        let was_fail_open = self.inner.current.load().fail_open();
        if set.fail_open() != was_fail_open {
            if set.fail_open() {
                tracing::error!(
                    version,
                    "ALERT fail-open: no backend is routable by verdict; routing to every active backend"
                );
            } else {
                tracing::info!(version, "routable backends are back: fail-open ended");
            }
        }
        metrics::gauge!("bulwark_lb_fail_open").set(f64::from(u8::from(set.fail_open())));
        metrics::gauge!("bulwark_lb_zone_spillover").set(f64::from(u8::from(set.spilled_over())));
        metrics::gauge!("bulwark_lb_backends_routable").set(set.routable_len() as f64);
        self.inner.current.store(Arc::new(set));
    }
}

/// A token that is cancelled when `deadline` passes; used for drain
/// deadlines. Without a runtime a past deadline still cancels at once.
fn arm_deadline(
    token: &CancellationToken,
    deadline: SystemTime,
) -> Option<tokio::task::AbortHandle> {
    let wait = deadline
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    if wait.is_zero() {
        token.cancel();
        return None;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            let token = token.clone();
            let task = rt.spawn(async move {
                tokio::time::sleep(wait).await;
                token.cancel();
            });
            Some(task.abort_handle())
        }
        Err(_) => {
            tracing::error!(
                "drain deadline published outside a Tokio runtime: it cannot be enforced"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests;
