//! The lease watchdog: the fence's deadline, kept off the runtime.
//!
//! The VIP task releases the VIP when the holder's lease runs out
//! ([`super::fence`]), but it runs on the control runtime, where a busy
//! node (every core taken, or the runtime's threads behind other work) can
//! run it late; a holder that lets go late overlaps its successor. The
//! watchdog is one OS thread per arp-mode actuator that does nothing but
//! wait for the deadline the VIP task last recorded ([`Watchdog::hold_until`])
//! plus a grace of one check interval, by when the task should have
//! released already. If by then the task has neither moved the deadline
//! on nor released, the watchdog closes the front gate (the holding's
//! clients are reset) and deletes the addresses itself, over its own
//! blocking netlink socket, and says so in the log and in
//! `bulwark_lb_vip_watchdog_releases_total`.
//!
//! It keeps the release on time where the runtime does not: it runs a
//! little real-time priority above the control threads when they are
//! real-time ([`bulwark_common::sched::make_sentinel`]), and is otherwise
//! an ordinary thread that sleeps nearly always, which the kernel wakes
//! promptly. It only ever deletes: the addresses come back only through
//! the VIP task's claim or renewal, both of which check the lease first.
//! docs/FAILOVER.md ("The lease watchdog") places it in the safety
//! argument.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::arp::{VipAddress, address_message, already_gone};
use crate::proxy::FrontGate;

/// Real-time priorities above the control threads' (the guard is one
/// above them).
const ABOVE_CONTROL: u8 = 2;

/// The arp-mode actuator's side of the watchdog. Dropping it ends the
/// thread.
pub struct Watchdog {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Until when the holder's lease is known to be fresh.
    until: Option<Instant>,
    /// Whether the deadline is enforced (not for a sole voter).
    fenced: bool,
    /// The interface the addresses were added to, while they may be held.
    armed: Option<u32>,
    /// The front gate to close before deleting.
    gate: Option<FrontGate>,
    /// Releases the watchdog made.
    fired: u64,
    /// Set when the actuator is dropped.
    ended: bool,
}

impl Watchdog {
    /// Starts the thread. The netlink socket is opened here, so it talks to
    /// the caller's network namespace.
    pub fn start(addresses: Vec<VipAddress>, grace: Duration) -> std::io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let mut deleter = Deleter {
            socket,
            addresses,
            sequence: 0,
        };
        Self::spawn(grace, move |index, gate, late| {
            release(&mut deleter, index, gate, late);
        })
    }

    /// Starts the thread with what it does when the deadline passes (the
    /// interface, the gate, how late the VIP task is).
    fn spawn(
        grace: Duration,
        expired: impl FnMut(u32, Option<&FrontGate>, Duration) + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let watched = shared.clone();
        std::thread::Builder::new()
            .name("vip-watchdog".into())
            .spawn(move || {
                match bulwark_common::sched::make_sentinel(ABOVE_CONTROL) {
                    Ok(0) => {}
                    Ok(priority) => {
                        tracing::debug!(priority, "the VIP lease watchdog runs real-time");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the VIP lease watchdog runs as an ordinary thread");
                    }
                }
                watch(&watched, grace, expired);
            })?;
        Ok(Self { shared })
    }

    /// Records that the holder's lease is fresh until `until`, and whether
    /// the watchdog enforces it (`fenced`; a sole voter's is not: nothing
    /// else can lead while it does). Called on every check while holding,
    /// so it wakes the thread only when the deadline comes earlier or
    /// starts to count (a new holding), never for the usual renewal.
    pub fn hold_until(&self, until: tokio::time::Instant, fenced: bool) {
        let until = until.into_std();
        let mut state = self.shared.lock();
        let sooner = fenced && (!state.fenced || state.until.is_none_or(|u| until < u));
        state.until = Some(until);
        state.fenced = fenced;
        drop(state);
        if sooner {
            self.shared.changed.notify_one();
        }
    }

    /// A handle for a task that only asks whether the lease is still fresh
    /// (announcements go out only then).
    pub fn lease(&self) -> Lease {
        Lease(self.shared.clone())
    }

    /// The addresses are (about to be) on interface `index`: delete them
    /// there if the lease runs out.
    pub fn arm(&self, index: u32) {
        self.shared.lock().armed = Some(index);
        self.shared.changed.notify_one();
    }

    /// The VIP task let go: forget the lease and the interface.
    pub fn disarm(&self) {
        let mut state = self.shared.lock();
        state.until = None;
        state.armed = None;
    }

    /// The front gate the watchdog closes before it deletes.
    pub fn gate(&self, gate: FrontGate) {
        self.shared.lock().gate = Some(gate);
    }

    /// How many times the watchdog released the VIP itself (counted as it
    /// starts deleting).
    pub fn fired(&self) -> u64 {
        self.shared.lock().fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().ended = true;
        self.shared.changed.notify_one();
    }
}

/// Read access to the lease alone.
#[derive(Clone)]
pub struct Lease(Arc<Shared>);

impl Lease {
    /// Whether the lease is still fresh.
    pub fn fresh(&self) -> bool {
        self.0.fresh()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self) -> bool {
        self.lock().until.is_some_and(|u| Instant::now() < u)
    }
}

/// The thread: sleeps until the armed deadline (lease plus `grace`), and
/// calls `expired` if it passes unmoved.
fn watch(
    shared: &Shared,
    grace: Duration,
    mut expired: impl FnMut(u32, Option<&FrontGate>, Duration),
) {
    let mut state = shared.lock();
    loop {
        if state.ended {
            return;
        }
        let (Some(until), Some(index), true) = (state.until, state.armed, state.fenced) else {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let deadline = until + grace;
        let now = Instant::now();
        if now < deadline {
            state = shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        }
        state.until = None;
        state.armed = None;
        // Counted before the deletion: whoever finds the address gone (the
        // VIP task's renewal) finds the count that explains it.
        state.fired += 1;
        let gate = state.gate.clone();
        drop(state);
        expired(index, gate.as_ref(), now - deadline);
        state = shared.lock();
    }
}

/// The VIP task missed the deadline: reset the holding's clients, delete
/// the addresses, say so.
fn release(deleter: &mut Deleter, index: u32, gate: Option<&FrontGate>, late: Duration) {
    let started = Instant::now();
    let reset = gate.map_or(0, FrontGate::close_now);
    let mut deleted = 0;
    for a in deleter.addresses.clone() {
        match deleter.delete(index, a) {
            Ok(true) => deleted += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(vip = %a.ip, error = %e, "the lease watchdog could not delete a VIP address");
            }
        }
    }
    metrics::counter!("bulwark_lb_vip_watchdog_releases_total").increment(1);
    tracing::warn!(
        deleted,
        reset,
        late = ?late,
        took = ?started.elapsed(),
        "the VIP task had not released by its lease deadline (a busy node?); the lease watchdog deleted the VIP"
    );
}

/// Deletes addresses over a blocking netlink socket.
struct Deleter {
    socket: Socket,
    addresses: Vec<VipAddress>,
    sequence: u32,
}

impl Deleter {
    /// Deletes `a` from interface `index`; `false` when it was not there.
    fn delete(&mut self, index: u32, a: VipAddress) -> std::io::Result<bool> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = self.sequence;
        let body = address_message(index, a.ip, a.prefix, 0);
        let mut request = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(body)),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        match self.ack()? {
            0 => Ok(true),
            code if already_gone(code) => Ok(false),
            code => Err(std::io::Error::from_raw_os_error(-code)),
        }
    }

    /// The kernel's answer to the last request: 0 or a negative errno.
    fn ack(&self) -> std::io::Result<i32> {
        loop {
            let (bytes, _) = self.socket.recv_from_full()?;
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes)
                .map_err(|e| std::io::Error::other(format!("reading netlink's answer: {e}")))?;
            if reply.header.sequence_number != self.sequence {
                continue;
            }
            if let NetlinkPayload::Error(e) = reply.payload {
                return Ok(e.raw_code());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expiries a test watchdog saw: interface and time.
    type Expiries = Arc<Mutex<Vec<(u32, Instant)>>>;

    /// A watchdog whose expiries are recorded instead of deleting anything.
    fn recording(grace: Duration) -> (Watchdog, Expiries) {
        let fired = Arc::new(Mutex::new(Vec::new()));
        let log = fired.clone();
        let dog = Watchdog::spawn(grace, move |index, _, _| {
            log.lock().unwrap().push((index, Instant::now()));
        })
        .unwrap();
        (dog, fired)
    }

    /// Waits until `fired` expiries are recorded.
    fn wait_for(log: &Expiries, fired: usize) {
        let start = Instant::now();
        while log.lock().unwrap().len() < fired {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the watchdog never fired"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn an_armed_lease_left_to_run_out_is_released_after_its_grace_and_not_before() {
        let grace = Duration::from_millis(20);
        let (dog, fired) = recording(grace);
        let until = tokio::time::Instant::now() + Duration::from_millis(60);
        dog.hold_until(until, true);
        assert!(dog.lease().fresh());
        dog.arm(7);
        wait_for(&fired, 1);
        let log = fired.lock().unwrap().clone();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].0, 7, "deleted on the armed interface");
        assert!(
            log[0].1 >= until.into_std() + grace,
            "never before the deadline and its grace"
        );
        assert!(!dog.lease().fresh(), "the lease is forgotten once released");
        // Disarmed by its own release: nothing more happens.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(dog.fired(), 1);
    }

    #[test]
    fn a_lease_moved_on_in_time_or_released_by_the_task_is_never_fired() {
        let (dog, fired) = recording(Duration::from_millis(10));
        dog.arm(3);
        for _ in 0..20 {
            dog.hold_until(
                tokio::time::Instant::now() + Duration::from_millis(300),
                true,
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        dog.disarm();
        std::thread::sleep(Duration::from_millis(100));
        assert!(fired.lock().unwrap().is_empty());
        assert_eq!(dog.fired(), 0);
        // Not armed (no addresses added): a lease alone is not released.
        dog.hold_until(tokio::time::Instant::now(), true);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(dog.fired(), 0);
        // A sole voter's lease is not enforced: run out, armed, kept. (The
        // lease is recorded before the arming, as the VIP task does before
        // a claim: armed first, the lease above, run out and fenced, would
        // be released at once.)
        dog.hold_until(tokio::time::Instant::now(), false);
        dog.arm(3);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(dog.fired(), 0);
        assert!(fired.lock().unwrap().is_empty());
    }

    #[test]
    fn a_new_holding_with_an_earlier_deadline_wakes_the_thread() {
        let (dog, fired) = recording(Duration::ZERO);
        dog.arm(1);
        // The thread sleeps toward a far deadline...
        dog.hold_until(
            tokio::time::Instant::now() + Duration::from_secs(3600),
            true,
        );
        std::thread::sleep(Duration::from_millis(20));
        // ...a new holding's short lease must not wait for it.
        dog.disarm();
        dog.hold_until(
            tokio::time::Instant::now() + Duration::from_millis(30),
            true,
        );
        dog.arm(1);
        wait_for(&fired, 1);
    }
}
