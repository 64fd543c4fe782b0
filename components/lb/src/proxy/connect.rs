//! Choosing and connecting a backend for one client connection.
//!
//! Each connect goes to a backend this client connection has not tried,
//! at most `proxy.connectAttempts` of them in all (first-flight replays
//! included). A connect that fails is followed at once by one to the next
//! backend. A connect still pending after `proxy.connectHedgeAfter` gets a
//! second one raced beside it, on another backend: the first to connect
//! takes the client, the other is dropped. At most two run at once.
//!
//! The race is for the moment an apiserver's host goes dark (a stacked
//! control-plane node that lost power or its link): its connects are not
//! refused, they hang until the connect timeout. Before any connect to it
//! has failed, every client that drew it (a third of them, in the burst of
//! reconnects at a VIP move) waited the whole `connectTimeout`; with the
//! race it waits `connectHedgeAfter`. The overtaken backend is then
//! avoided like one whose connect failed (stats.rs), so the connections
//! after it do not draw it at all. A dropped connect costs the backend
//! nothing it would notice: its SYN was never answered, or (a slow one
//! answered after all) the kernel resets the late handshake before any
//! byte.
//!
//! Nothing here allocates: the two connects live in two pinned slots on
//! this future's stack, and one timer serves every deadline.

use std::fmt::Display;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::config::MAX_CONNECT_ATTEMPTS;
use crate::backends::{AVOID_AFTER_FAILURE, Backend, BackendSet, BackendStats, ConnectErrorKind};

/// A connected backend: the stream, the backend's counters (its active
/// count already includes this connection) and its close token.
pub(super) struct Connected {
    pub stream: TcpStream,
    pub stats: Arc<BackendStats>,
    pub close: CancellationToken,
}

/// The backends one client connection has tried, by address: a replay may
/// load a newer snapshot, where indices mean other backends. A fixed array,
/// so a connection allocates nothing for it.
pub(super) struct Tried {
    addresses: [SocketAddr; MAX_CONNECT_ATTEMPTS as usize],
    len: usize,
}

impl Default for Tried {
    fn default() -> Self {
        Self {
            addresses: [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_CONNECT_ATTEMPTS as usize],
            len: 0,
        }
    }
}

impl Tried {
    /// How many backends were tried.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn contains(&self, address: SocketAddr) -> bool {
        self.addresses[..self.len].contains(&address)
    }

    fn push(&mut self, address: SocketAddr) {
        self.addresses[self.len] = address;
        self.len += 1;
    }
}

/// How often a client that found no backend at all looks at the backend
/// set again while it waits (a path taken only while a node has nothing
/// to offer, so a short poll costs nothing on the data path).
const NO_BACKEND_POLL: Duration = Duration::from_millis(10);

/// Connects a backend this connection has not tried (see the module's
/// doc). Before its first try, a connection that finds no eligible
/// backend waits for the set to offer one until `wait_until`. `None`
/// when no backend could be connected (counted and logged here).
pub(super) async fn connect_some_backend(
    shared: &Shared,
    tried: &mut Tried,
    wait_until: Instant,
) -> Option<Connected> {
    let set = snapshot(shared, tried, wait_until).await;
    Race::new(shared, &set, tried).run().await
}

/// The snapshot all of this call's tries choose from, so indices stay
/// meaningful. A connection with nothing tried yet waits (polling) for one
/// that offers a backend, until `wait_until`.
async fn snapshot(shared: &Shared, tried: &Tried, wait_until: Instant) -> Arc<BackendSet> {
    loop {
        let set = shared.backends.load();
        if tried.len > 0 || set.has_candidates() || Instant::now() >= wait_until {
            return set;
        }
        tokio::time::sleep(NO_BACKEND_POLL).await;
    }
}

/// A slot reserved on a backend while connecting; released unless the
/// connect succeeded, including when the attempt is dropped by shutdown
/// or overtaken.
struct Reservation<'a>(Option<&'a BackendStats>);

impl Reservation<'_> {
    fn confirm(mut self) {
        if let Some(s) = self.0.take() {
            s.confirm();
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.release();
        }
    }
}

/// A connect in flight.
struct Attempt<'s> {
    backend: &'s Backend,
    /// Dropped with the attempt unless confirmed.
    reservation: Reservation<'s>,
    started: Instant,
}

/// What ended a wait of the race.
enum Event {
    /// Slot `i`'s connect finished.
    Done(usize, io::Result<TcpStream>),
    /// A deadline or the moment to race a second connect came.
    Timer,
}

/// The tries of one [`connect_some_backend`] call.
struct Race<'s, 't> {
    shared: &'s Shared,
    set: &'s BackendSet,
    tried: &'t mut Tried,
    /// Snapshot indices not to pick again: tried in this call or before.
    exclude: [usize; MAX_CONNECT_ATTEMPTS as usize],
    excluded: usize,
    /// Tries allowed in all, counting those before this call.
    attempts: usize,
    /// A pick found nothing left to try.
    exhausted: bool,
    /// The connects in flight, by slot.
    slots: [Option<Attempt<'s>>; 2],
}

impl<'s, 't> Race<'s, 't> {
    fn new(shared: &'s Shared, set: &'s BackendSet, tried: &'t mut Tried) -> Self {
        let mut exclude = [0usize; MAX_CONNECT_ATTEMPTS as usize];
        let mut excluded = 0;
        if tried.len > 0 {
            for b in set.iter() {
                if excluded < exclude.len() && tried.contains(b.address()) {
                    exclude[excluded] = b.index();
                    excluded += 1;
                }
            }
        }
        let attempts = (shared.config.connect_attempts as usize).min(tried.addresses.len());
        Self {
            shared,
            set,
            tried,
            exclude,
            excluded,
            attempts,
            exhausted: false,
            slots: [None, None],
        }
    }

    /// Starts connects and waits for them, as the module's doc says.
    async fn run(mut self) -> Option<Connected> {
        let timeout = self.shared.config.connect_timeout;
        let mut connects = [pin!(None), pin!(None)];
        let mut now = Instant::now();
        let mut timer = pin!(tokio::time::sleep_until(now + timeout));
        loop {
            let hedge_due = self.hedge_at().is_some_and(|at| at <= now);
            if self.in_flight() == 0 || hedge_due {
                if let Some((slot, address)) = self.start(now) {
                    connects[slot].set(Some(TcpStream::connect(address)));
                } else if self.in_flight() == 0 {
                    self.give_up();
                    return None;
                }
            }
            let next = self.next_deadline(now, timeout);
            if next != timer.deadline() {
                timer.as_mut().reset(next);
            }
            let event = poll_fn(|cx| {
                for (i, connect) in connects.iter_mut().enumerate() {
                    if let Some(f) = connect.as_mut().as_pin_mut()
                        && let Poll::Ready(r) = f.poll(cx)
                    {
                        connect.set(None);
                        return Poll::Ready(Event::Done(i, r));
                    }
                }
                timer.as_mut().poll(cx).map(|()| Event::Timer)
            })
            .await;
            now = Instant::now();
            match event {
                Event::Done(slot, Ok(stream)) => {
                    let winner = self.slots[slot].take()?;
                    if let Some(loser) = self.slots[1 - slot].take() {
                        connects[1 - slot].set(None);
                        self.lost_race(loser, &winner, now);
                    }
                    return Some(self.connected(winner, stream));
                }
                Event::Done(slot, Err(e)) => {
                    if let Some(failed) = self.slots[slot].take() {
                        connect_failed(failed.backend, ConnectErrorKind::of(&e), &e);
                    }
                }
                Event::Timer => {
                    for (slot, connect) in connects.iter_mut().enumerate() {
                        if self.slots[slot]
                            .as_ref()
                            .is_some_and(|a| a.started + timeout <= now)
                        {
                            connect.set(None);
                            self.timed_out(slot);
                        }
                    }
                }
            }
        }
    }

    /// Whether another connect may start: a pick has not come up empty
    /// and tries are left.
    fn can_start(&self) -> bool {
        !self.exhausted && self.tried.len < self.attempts
    }

    fn in_flight(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// When a second connect is raced beside the one in flight: `None`
    /// with hedging off, two in flight, or nothing left to try.
    fn hedge_at(&self) -> Option<Instant> {
        let after = self.shared.config.hedge_after()?;
        if !self.can_start() {
            return None;
        }
        match &self.slots {
            [Some(a), None] | [None, Some(a)] => Some(a.started + after),
            _ => None,
        }
    }

    /// The next moment the race must look at the clock: a connect's
    /// timeout or the moment to race a second one (`now + timeout` with
    /// nothing in flight, which `run` never waits on).
    fn next_deadline(&self, now: Instant, timeout: Duration) -> Instant {
        let timeouts = self.slots.iter().flatten().map(|a| a.started + timeout);
        timeouts
            .chain(self.hedge_at())
            .min()
            .unwrap_or(now + timeout)
    }

    /// Picks the next backend and reserves a slot on it (so concurrent
    /// picks see the load this connection is about to add). Its race slot
    /// and address, or `None` when nothing is left to try.
    fn start(&mut self, now: Instant) -> Option<(usize, SocketAddr)> {
        if !self.can_start() {
            return None;
        }
        let Some(backend) = self
            .set
            .pick(self.shared.backends.mode(), &self.exclude[..self.excluded])
        else {
            self.exhausted = true;
            return None;
        };
        if self.excluded < self.exclude.len() {
            self.exclude[self.excluded] = backend.index();
            self.excluded += 1;
        }
        let first = self.tried.len == 0;
        self.tried.push(backend.address());
        let stats = backend.stats();
        stats.reserve();
        if self.in_flight() > 0 {
            self.shared.metrics.hedges.increment(1);
        } else if !first {
            stats.retried();
            self.shared.metrics.retries.increment(1);
        }
        let slot = usize::from(self.slots[0].is_some());
        self.slots[slot] = Some(Attempt {
            backend,
            reservation: Reservation(Some(stats)),
            started: now,
        });
        Some((slot, backend.address()))
    }

    fn connected(&self, winner: Attempt<'s>, stream: TcpStream) -> Connected {
        winner.reservation.confirm();
        super::conn::set_options(&stream, self.shared);
        Connected {
            stream,
            stats: winner.backend.stats().clone(),
            close: winner.backend.close_token().clone(),
        }
    }

    /// The connect that lost the race is dropped; one that had been
    /// pending longer than the winner's took is counted as overtaken.
    fn lost_race(&self, loser: Attempt<'s>, winner: &Attempt<'s>, now: Instant) {
        if loser.started < winner.started {
            let waited = now - loser.started;
            let by = winner.started - loser.started;
            connect_failed(
                loser.backend,
                ConnectErrorKind::Overtaken,
                &format_args!(
                    "still connecting after {waited:?}; a connect to another backend started {by:?} after it succeeded first"
                ),
            );
        }
    }

    fn timed_out(&mut self, slot: usize) {
        if let Some(failed) = self.slots[slot].take() {
            let e = io::Error::from(io::ErrorKind::TimedOut);
            connect_failed(failed.backend, ConnectErrorKind::Timeout, &e);
        }
    }

    /// Nothing left to try and nothing in flight: counted and logged.
    fn give_up(&self) {
        let metrics = &self.shared.metrics;
        if self.tried.len == 0 {
            metrics.no_backend.increment(1);
            tracing::warn!(
                version = self.set.version(),
                "no backend available for a new connection"
            );
        } else if self.exhausted {
            metrics.all_attempts_failed.increment(1);
            tracing::warn!(
                attempts = self.tried.len,
                "every eligible backend failed to connect"
            );
        } else {
            metrics.all_attempts_failed.increment(1);
            tracing::warn!(attempts = self.attempts, "every connect attempt failed");
        }
    }
}

/// Counts a failed connect on its backend, which starts (or renews) the
/// backend's avoidance. The failure that starts an avoidance is worth an
/// operator's eye; the failed trials within it are not.
fn connect_failed(backend: &Backend, kind: ConnectErrorKind, error: &dyn Display) {
    if backend.stats().connect_failed(kind) {
        tracing::info!(
            backend = backend.id(),
            address = %backend.address(),
            reason = kind.as_str(),
            error = %error,
            "connect failed; trying another backend (new connections prefer the others, trying it again with one connection every {AVOID_AFTER_FAILURE:?} until one succeeds)"
        );
    } else {
        tracing::debug!(
            backend = backend.id(),
            address = %backend.address(),
            reason = kind.as_str(),
            error = %error,
            "connect failed; trying another backend"
        );
    }
}
