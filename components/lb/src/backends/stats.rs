//! Live per-backend state that outlives snapshots: connection and byte
//! counters (atomics, plus `metrics` handles resolved once per backend) and
//! the close token that a drain deadline cancels.
//!
//! Bytes are counted after every write of the data path, so they are
//! kept per thread ([`ByteShard`]): a counter shared by the data-path
//! threads would bounce its cache line between cores on every message.
//! Reads sum the shards; the Prometheus counters get the sums at scrape
//! time ([`bulwark_common::telemetry::scrape`]).
//!
//! A failed connect also marks the backend *avoided* for
//! [`AVOID_AFTER_FAILURE`]: selection prefers any other candidate until
//! then (`set.rs`). When that runs out, the next connection picked for it
//! is its trial and renews the avoidance for everyone else while it
//! connects; the first connect that succeeds ends it. This is the node's
//! own data path steering around what it just saw fail, in the time before
//! the probers' verdict: an apiserver whose host went dark (a stacked
//! control-plane node powered off) would otherwise cost every new
//! connection sent there the whole connect timeout.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use metrics::{Counter, Gauge};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{AdminState, BackendSpec, arm_deadline};
use bulwark_common::telemetry::scrape::{Publish, publish_on_scrape};

/// Why a connect to a backend failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectErrorKind {
    /// Nothing listens (RST to our SYN).
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// The connection was reset or aborted while being set up.
    Reset,
    /// Anything else (unreachable network, no buffers, …).
    Other,
    /// Still pending when a connect to another backend, started after it
    /// (`proxy.connectHedgeAfter` later), had succeeded.
    Overtaken,
}

impl ConnectErrorKind {
    const ALL: [ConnectErrorKind; 5] = [
        Self::Refused,
        Self::Timeout,
        Self::Reset,
        Self::Other,
        Self::Overtaken,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Other => "other",
            Self::Overtaken => "overtaken",
        }
    }

    /// Classifies an I/O error from `connect`.
    pub fn of(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Self::Refused,
            K::TimedOut => Self::Timeout,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Self::Reset,
            _ => Self::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How long new connections prefer other backends after a connect to a
/// backend failed, and after each trial connection picked for it since.
/// Long enough that the probers' verdict on a dead apiserver (a few
/// seconds) costs a few trial connections; short enough that a backend
/// that failed once under a burst is back in the rotation at once.
pub const AVOID_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A backend's counters at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    /// Open client connections proxied to it now.
    pub active_connections: u64,
    /// Connections proxied to it since this node started.
    pub total_connections: u64,
    /// Bytes from clients forwarded to it.
    pub bytes_in: u64,
    /// Bytes from it forwarded to clients.
    pub bytes_out: u64,
    /// Failed connect attempts to it.
    pub connect_errors: u64,
    /// Connect attempts to it that were retries after another backend failed.
    pub retries: u64,
    /// When its last connect failed on this node; `None` if never.
    pub last_connect_error_at: Option<SystemTime>,
    /// New connections on this node prefer other backends: a connect to
    /// it failed and none has succeeded since (one trial a second).
    pub avoided: bool,
}

/// A backend as the API shows it: its spec, whether it takes new
/// connections, and its counters.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    /// The published spec.
    pub spec: BackendSpec,
    /// Whether it may be picked for a new connection now (in the routable
    /// set, or in the fail-open set while nothing is routable).
    pub routable: bool,
    /// Its counters.
    pub stats: StatsSnapshot,
}

struct Handles {
    active: Gauge,
    total: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    connect_errors: [Counter; 5],
    retries: Counter,
    avoided: Counter,
}

/// Drain bookkeeping; only publishers touch it.
#[derive(Default)]
struct DrainControl {
    token: CancellationToken,
    /// When this node first applied the current drain.
    since: Option<SystemTime>,
    /// The armed deadline and its timer.
    timer: Option<(SystemTime, Option<tokio::task::AbortHandle>)>,
}

/// Monotonic nanoseconds since the first call in this process (at least 1).
fn mono_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// How many byte counters each backend keeps: threads share one only
/// beyond this many (the data path has one thread per core).
const BYTE_SHARDS: usize = 8;

/// One thread's byte counters, alone on its cache lines (two: the CPU
/// fetches adjacent lines in pairs).
#[derive(Default)]
#[repr(align(128))]
struct ByteShard {
    r#in: AtomicU64,
    out: AtomicU64,
}

/// This thread's shard, handed out in turn to threads as they first count.
fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Relaxed) % BYTE_SHARDS;
    }
    SHARD.with(|s| *s)
}

/// Live counters of one backend, shared by its connections and every
/// snapshot that lists it.
pub struct BackendStats {
    active: AtomicU64,
    total: AtomicU64,
    bytes: [ByteShard; BYTE_SHARDS],
    /// Bytes in and out already added to the Prometheus counters.
    published: Mutex<(u64, u64)>,
    connect_errors: AtomicU64,
    retries: AtomicU64,
    /// When the last connect failed, in milliseconds since the Unix
    /// epoch; 0 if never.
    last_error_unix_ms: AtomicU64,
    /// Until when new connections prefer other backends, on [`mono_ns`]'s
    /// scale; 0 once a connect succeeded. Set by a failed connect and by
    /// a trial's pick.
    avoid_until: AtomicU64,
    m: Handles,
    drain: Mutex<DrainControl>,
}

impl std::fmt::Debug for BackendStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl BackendStats {
    /// The counters of backend `id`, registered for publishing at scrape
    /// time.
    pub(crate) fn shared(id: &str) -> Arc<Self> {
        let stats = Arc::new(Self::new(id));
        publish_on_scrape(Arc::downgrade(&stats) as Weak<dyn Publish>);
        stats
    }

    fn new(id: &str) -> Self {
        let b = id.to_owned();
        let err = |k: ConnectErrorKind| metrics::counter!("bulwark_lb_connect_errors_total", "backend" => b.clone(), "reason" => k.as_str());
        Self {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes: Default::default(),
            published: Mutex::new((0, 0)),
            connect_errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            last_error_unix_ms: AtomicU64::new(0),
            avoid_until: AtomicU64::new(0),
            m: Handles {
                active: metrics::gauge!("bulwark_lb_connections_active", "backend" => b.clone()),
                total: metrics::counter!("bulwark_lb_connections_total", "backend" => b.clone()),
                bytes_in: metrics::counter!("bulwark_lb_bytes_in_total", "backend" => b.clone()),
                bytes_out: metrics::counter!("bulwark_lb_bytes_out_total", "backend" => b.clone()),
                connect_errors: ConnectErrorKind::ALL.map(err),
                retries: metrics::counter!("bulwark_lb_backend_retries_total", "backend" => b.clone()),
                avoided: metrics::counter!("bulwark_lb_backend_avoided_total", "backend" => b.clone()),
            },
            drain: Mutex::new(DrainControl::default()),
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            active_connections: self.active.load(Relaxed),
            total_connections: self.total.load(Relaxed),
            bytes_in: self.bytes.iter().map(|s| s.r#in.load(Relaxed)).sum(),
            bytes_out: self.bytes.iter().map(|s| s.out.load(Relaxed)).sum(),
            connect_errors: self.connect_errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            last_connect_error_at: match self.last_error_unix_ms.load(Relaxed) {
                0 => None,
                ms => Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
            },
            avoided: self.avoid_until.load(Relaxed) != 0,
        }
    }

    /// Current active connections (the load that selection compares).
    #[inline]
    pub(crate) fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }

    /// Counts the end of a connection counted by [`BackendStats::confirm`].
    pub(crate) fn connection_closed(&self) {
        self.active.fetch_sub(1, Relaxed);
        self.m.active.decrement(1.0);
    }

    /// Reserves a slot before connecting, so that concurrent picks see the
    /// load they are about to add (otherwise a burst of accepts all choose
    /// the same idle backend). Undone by [`BackendStats::release`] when the
    /// connect fails.
    #[inline]
    pub(crate) fn reserve(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    #[inline]
    pub(crate) fn release(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    /// Counts the reserved slot as an established connection (which ends
    /// any avoidance).
    pub(crate) fn confirm(&self) {
        if self.avoid_until.load(Relaxed) != 0 {
            self.avoid_until.store(0, Relaxed);
        }
        self.total.fetch_add(1, Relaxed);
        self.m.active.increment(1.0);
        self.m.total.increment(1);
    }

    #[inline]
    pub(crate) fn add_bytes_in(&self, n: u64) {
        self.bytes[my_shard()].r#in.fetch_add(n, Relaxed);
    }

    #[inline]
    pub(crate) fn add_bytes_out(&self, n: u64) {
        self.bytes[my_shard()].out.fetch_add(n, Relaxed);
    }

    /// Counts a failed connect and avoids the backend for
    /// [`AVOID_AFTER_FAILURE`] from now. True when that starts an
    /// avoidance: a connect to it had succeeded since its last failure
    /// (a failed trial goes on with the same one).
    pub(crate) fn connect_failed(&self, kind: ConnectErrorKind) -> bool {
        self.connect_errors.fetch_add(1, Relaxed);
        self.m.connect_errors[kind.index()].increment(1);
        let wall = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
        let ms = wall.map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_error_unix_ms.store(ms.max(1), Relaxed);
        let now = mono_ns();
        let until = now + AVOID_AFTER_FAILURE.as_nanos() as u64;
        let started = self.avoid_until.swap(until, Relaxed) == 0;
        if started {
            self.m.avoided.increment(1);
        }
        started
    }

    /// Whether new connections should prefer other backends now. Reads
    /// the clock only while an avoidance is recorded.
    #[inline]
    pub(crate) fn avoided(&self) -> bool {
        let until = self.avoid_until.load(Relaxed);
        until != 0 && until > mono_ns()
    }

    /// Notes that a new connection picked it while it was not avoided. If
    /// an avoidance ran out with no successful connect since, this
    /// connection is the trial: the others keep avoiding it for another
    /// [`AVOID_AFTER_FAILURE`] unless the trial's connect succeeds.
    #[inline]
    pub(crate) fn picked(&self) {
        if self.avoid_until.load(Relaxed) != 0 {
            let until = mono_ns() + AVOID_AFTER_FAILURE.as_nanos() as u64;
            self.avoid_until.store(until, Relaxed);
        }
    }

    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Relaxed);
        self.m.retries.increment(1);
    }

    /// Applies the admin state at publish time and returns the token that
    /// this backend's connections select on.
    pub(super) fn apply_admin(
        &self,
        admin: &AdminState,
        drain_max: Option<Duration>,
        now: SystemTime,
    ) -> CancellationToken {
        let mut d = self.drain.lock().unwrap_or_else(|p| p.into_inner());
        match admin {
            AdminState::Active => {
                if let Some((_, Some(timer))) = d.timer.take() {
                    timer.abort();
                }
                d.since = None;
                // Connections closed by a past deadline are gone; an
                // undrained backend needs a fresh token for its new ones.
                if d.token.is_cancelled() {
                    d.token = CancellationToken::new();
                }
            }
            AdminState::Drain { deadline } => {
                let since = *d.since.get_or_insert(now);
                let capped = drain_max.map(|m| since + m);
                let effective = match (*deadline, capped) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let armed = d.timer.as_ref().map(|(t, _)| *t);
                if armed != effective {
                    if let Some((_, Some(timer))) = d.timer.take() {
                        timer.abort();
                    }
                    // A deadline moved later than one that already fired
                    // cannot reopen closed connections; new ones would not
                    // come anyway (drained).
                    if let Some(t) = effective {
                        let timer = arm_deadline(&d.token, t);
                        d.timer = Some((t, timer));
                    }
                }
            }
        }
        d.token.clone()
    }
}

impl Drop for DrainControl {
    fn drop(&mut self) {
        // Connections hold the stats (and so this) alive: dropping means
        // the backend left the registry and its last connection ended, so
        // nothing is left for the timer to close.
        if let Some((_, Some(timer))) = self.timer.take() {
            timer.abort();
        }
    }
}

impl Publish for BackendStats {
    fn publish(&self) {
        let now = self.snapshot();
        // Under the lock, so two scrapes never add the same bytes twice.
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        self.m.bytes_in.increment(now.bytes_in - published.0);
        self.m.bytes_out.increment(now.bytes_out - published.1);
        *published = (now.bytes_in, now.bytes_out);
    }
}

impl Drop for BackendStats {
    /// The backend left the registry and its last connection ended: what
    /// it counted since the last scrape still reaches the counters.
    fn drop(&mut self) {
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes counted on several threads add up, in the API's snapshot and,
    /// at each scrape, in the Prometheus counters, each byte once.
    #[test]
    fn bytes_from_every_thread_reach_snapshot_and_counters_once() {
        let handle = bulwark_common::telemetry::metrics_handle();
        let stats = BackendStats::shared("stats-shard-test");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        stats.add_bytes_in(3);
                        stats.add_bytes_out(5);
                    }
                });
            }
        });
        let snap = stats.snapshot();
        assert_eq!((snap.bytes_in, snap.bytes_out), (12_000, 20_000));
        let series = |name: &str| {
            let text = handle.render();
            let prefix = format!("{name}{{backend=\"stats-shard-test\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .map(|v| v.parse::<u64>().unwrap())
        };
        bulwark_common::telemetry::scrape::publish_all();
        bulwark_common::telemetry::scrape::publish_all();
        assert_eq!(series("bulwark_lb_bytes_in_total"), Some(12_000));
        assert_eq!(series("bulwark_lb_bytes_out_total"), Some(20_000));
        stats.add_bytes_in(7);
        drop(stats);
        assert_eq!(series("bulwark_lb_bytes_in_total"), Some(12_007));
    }
}
