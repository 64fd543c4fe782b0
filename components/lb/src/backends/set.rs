//! The immutable snapshot and backend selection.
//!
//! Selection is power-of-two-choices on `(active + 1) / weight`: draw two
//! distinct candidates at random, take the less loaded. Why not plain
//! least-connections: every LB node (and every accept thread) decides on
//! slightly stale counts, and least-connections sends a whole burst of
//! simultaneous connects (kubelets reconnecting after a failover) to the
//! same momentarily-emptiest apiserver; two random choices spread the burst
//! while still steering away from loaded backends, and cost two atomic
//! loads instead of a scan. With two candidates it is least-connections.
//! Apiserver connections are long-lived (watches), so open connections are
//! the load that matters; the `+ 1` lets weights break ties among idle
//! backends.
//!
//! The candidate lists are tiers computed at publish time, both routing
//! modes' at once so that a listener's choice costs nothing per connection:
//!
//! - balanced: every routable backend of every zone;
//! - zone-preferred: the local zone's routable backends (or every routable
//!   backend when the local zone runs short), then every routable backend
//!   (so a retry after a failed connect can leave the zone);
//!
//! and in both, only when nothing at all is routable, every admin-active
//! backend (fail-open, Envoy's panic mode).

use std::cell::Cell;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::stats::{BackendStats, BackendStatus};
use super::{BackendSpec, RoutingMode, RoutingPolicy};

/// One backend in a snapshot.
#[derive(Debug)]
pub struct Backend {
    index: usize,
    spec: BackendSpec,
    stats: Arc<BackendStats>,
    close: CancellationToken,
    eligible: bool,
}

impl Backend {
    /// Its position in the snapshot: what [`BackendSet::pick`] excludes.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its published spec.
    pub fn spec(&self) -> &BackendSpec {
        &self.spec
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Where to connect.
    pub fn address(&self) -> std::net::SocketAddr {
        self.spec.address
    }

    /// Its live counters (shared with every snapshot that lists it).
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }

    /// Cancelled when a drain deadline passes: connections to this backend
    /// must then close.
    pub fn close_token(&self) -> &CancellationToken {
        &self.close
    }

    /// Whether new connections may go to it in this snapshot.
    pub fn is_eligible(&self) -> bool {
        self.eligible
    }

    pub(super) fn status(&self) -> BackendStatus {
        BackendStatus {
            spec: self.spec.clone(),
            routable: self.eligible,
            stats: self.stats.snapshot(),
        }
    }
}

/// An immutable backend list with its selection tiers precomputed.
#[derive(Debug)]
pub struct BackendSet {
    version: u64,
    backends: Vec<Backend>,
    /// Zone-preferred tier 0: the local zone's routable backends, or all
    /// of `routable` without a local zone or after spill-over.
    zone_preferred: Vec<usize>,
    /// Every routable backend: the balanced tier 0, the zone-preferred
    /// tier 1.
    routable: Vec<usize>,
    /// The last tier: every admin-active backend, only when `routable` is
    /// empty.
    fail_open: Vec<usize>,
    spilled_over: bool,
    local_share: Option<f64>,
}

impl BackendSet {
    pub(super) fn build(
        version: u64,
        specs: &[BackendSpec],
        live: &[(Arc<BackendStats>, CancellationToken)],
        policy: &RoutingPolicy,
    ) -> Self {
        let routable: Vec<usize> = specs
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.admin.is_drain() && s.verdict.is_routable())
            .map(|(i, _)| i)
            .collect();
        let fail_open: Vec<usize> = if routable.is_empty() {
            specs
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.admin.is_drain())
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };

        let mut spilled_over = false;
        let mut local_share = None;
        let zone_preferred = match &policy.local_zone {
            None => routable.clone(),
            Some(zone) => {
                let local_total = specs.iter().filter(|s| &s.zone == zone).count();
                let local: Vec<usize> = routable
                    .iter()
                    .copied()
                    .filter(|&i| &specs[i].zone == zone)
                    .collect();
                let share = if local_total == 0 {
                    0.0
                } else {
                    local.len() as f64 / local_total as f64
                };
                local_share = Some(share);
                if local.is_empty() || share < policy.min_local_healthy_share {
                    spilled_over = !routable.is_empty();
                    routable.clone()
                } else {
                    local
                }
            }
        };

        let eligible = |i: usize| routable.contains(&i) || fail_open.contains(&i);
        let backends = specs
            .iter()
            .zip(live)
            .enumerate()
            .map(|(index, (spec, (stats, close)))| Backend {
                index,
                spec: spec.clone(),
                stats: stats.clone(),
                close: close.clone(),
                eligible: eligible(index),
            })
            .collect();
        Self {
            version,
            backends,
            zone_preferred,
            routable,
            fail_open,
            spilled_over,
            local_share,
        }
    }

    /// The registry version this snapshot was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Number of backends (eligible or not).
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether the registry is empty.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Every backend, in registry order.
    pub fn iter(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter()
    }

    /// The backend at `index`.
    pub fn get(&self, index: usize) -> Option<&Backend> {
        self.backends.get(index)
    }

    /// The backend with this id.
    pub fn by_id(&self, id: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.spec.id == id)
    }

    /// No backend is routable by verdict, so picks go to every admin-active
    /// backend regardless of verdict.
    pub fn fail_open(&self) -> bool {
        !self.fail_open.is_empty()
    }

    /// The local zone runs short, so zone-preferred first attempts spread
    /// over all zones too. Says nothing about balanced listeners.
    pub fn spilled_over(&self) -> bool {
        self.spilled_over
    }

    /// The local zone's routable share, when a local zone is configured.
    pub fn local_share(&self) -> Option<f64> {
        self.local_share
    }

    /// Whether a pick with nothing excluded finds a backend: anything is
    /// routable, or fail-open offers the admin-active ones.
    pub fn has_candidates(&self) -> bool {
        !self.routable.is_empty() || !self.fail_open.is_empty()
    }

    /// How many backends are routable by verdict and admin state.
    pub fn routable_len(&self) -> usize {
        self.routable.len()
    }

    /// The backends a first attempt in `mode` chooses among (before
    /// fail-open).
    pub fn first_tier(&self, mode: RoutingMode) -> &[usize] {
        match mode {
            RoutingMode::Balanced => &self.routable,
            RoutingMode::ZonePreferred => &self.zone_preferred,
        }
    }

    /// Chooses a backend for a new connection of a listener in `mode`,
    /// skipping the indices in `exclude` (backends this connection already
    /// failed to reach). `None` when no eligible backend is left. No lock,
    /// no await, no allocation.
    ///
    /// A backend avoided after a failed connect (stats.rs) is taken only
    /// when no tier offers another: it stays a last resort, never excluded.
    /// One whose avoidance ran out is picked as before, and that pick is
    /// its trial.
    pub fn pick(&self, mode: RoutingMode, exclude: &[usize]) -> Option<&Backend> {
        let tiers: [&[usize]; 3] = [self.first_tier(mode), &self.routable, &self.fail_open];
        let mut last_len = usize::MAX;
        let mut last_resort = None;
        for tier in tiers {
            // `routable` repeats the first tier when balanced, or when no
            // zone preference is in effect: same length means same list.
            if tier.len() == last_len {
                continue;
            }
            last_len = tier.len();
            if let Some((i, avoided)) = self.p2c(tier, exclude) {
                if !avoided {
                    self.backends[i].stats.picked();
                    return Some(&self.backends[i]);
                }
                last_resort.get_or_insert(i);
            }
        }
        last_resort.map(|i| &self.backends[i])
    }

    /// Power of two choices over `tier` without `exclude`; an avoided
    /// draw loses to one that is not, and when both are avoided the
    /// lightest candidate that is not (if any) is taken instead. The
    /// choice, and whether it is avoided (then every candidate is).
    fn p2c(&self, tier: &[usize], exclude: &[usize]) -> Option<(usize, bool)> {
        let available = if exclude.is_empty() {
            tier.len()
        } else {
            tier.iter().filter(|i| !exclude.contains(i)).count()
        };
        let nth = |n: usize| -> usize {
            if exclude.is_empty() {
                tier[n]
            } else {
                // `n < available`, so the iterator always yields.
                tier.iter()
                    .copied()
                    .filter(|i| !exclude.contains(i))
                    .nth(n)
                    .unwrap_or(tier[0])
            }
        };
        let (choice, avoided) = match available {
            0 => return None,
            1 => {
                let only = nth(0);
                (only, self.avoided(only))
            }
            n => {
                let a = below(n);
                let mut b = below(n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(a), nth(b));
                match (self.avoided(a), self.avoided(b)) {
                    (false, true) => (a, false),
                    (true, false) => (b, false),
                    (both, _) => (if self.lighter(b, a) { b } else { a }, both),
                }
            }
        };
        if !avoided {
            return Some((choice, false));
        }
        let unavoided = tier
            .iter()
            .copied()
            .filter(|i| !exclude.contains(i) && !self.avoided(*i))
            .reduce(|x, y| if self.lighter(y, x) { y } else { x });
        Some(unavoided.map_or((choice, true), |i| (i, false)))
    }

    #[inline]
    fn avoided(&self, i: usize) -> bool {
        self.backends[i].stats.avoided()
    }

    /// Whether `x` carries clearly less load per unit of weight than `y`:
    /// more than [`TIE_BAND`] less. Loads within the band count as equal,
    /// and the caller keeps its random first choice. Without the band,
    /// three apiservers holding 201/200/201 long-lived watches would get
    /// every new connection that draws the one with 200 (two thirds of
    /// them, and their TLS handshakes): least-connections balances live
    /// connections, the band keeps it from skewing new ones over a
    /// difference of one. A real imbalance (a restarted apiserver with
    /// none) is far outside the band and still wins every draw.
    #[inline]
    fn lighter(&self, x: usize, y: usize) -> bool {
        let (bx, by) = (&self.backends[x], &self.backends[y]);
        let lx = u128::from(bx.stats.active() + 1) * u128::from(by.spec.weight);
        let ly = u128::from(by.stats.active() + 1) * u128::from(bx.spec.weight);
        lx * (TIE_BAND + 1) < ly * TIE_BAND
    }
}

/// Two loads within 1/`TIE_BAND` (about 3 %) of each other are a tie
/// for [`BackendSet::pick`]'s comparison. Small counts stay strict: 1
/// against 2 live connections is far outside it.
const TIE_BAND: u128 = 32;

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    // RandomState is keyed randomly per thread: a cheap, dependency-free
    // seed that differs between accept threads and processes.
    RandomState::new().hash_one(std::thread::current().id())
}

/// A uniform index below `n` (wyrand; not cryptographic, not needed).
#[inline]
fn below(n: usize) -> usize {
    let r = RNG.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    });
    ((u128::from(r) * n as u128) >> 64) as usize
}
