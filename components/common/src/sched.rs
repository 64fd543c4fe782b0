//! Real-time scheduling for a daemon's control threads.
//!
//! A failover is timers: the leader's heartbeats, the followers' election
//! timeouts, the VIP lease check that releases the address. On a control-
//! plane node whose cores are busy (an apiserver serving a list storm, etcd
//! compacting) an ordinary thread waits its turn behind them, so those
//! timers run late: the bench measured a failover p99 of 0.41 s with four
//! busy threads on two cores against 0.28 s idle, and one frozen leader
//! released its address late. Corosync runs its token timers under
//! `SCHED_RR` for the same reason.
//!
//! [`make_realtime`] puts the calling thread under `SCHED_RR` with
//! `SCHED_RESET_ON_FORK`: a real-time thread preempts every ordinary one
//! the moment its timer fires, and the threads and processes it starts
//! (the data path's threads, a child process) begin as ordinary ones, so
//! only the threads that ask for it run ahead of the node's other work.
//!
//! Real-time threads that stay busy take the node: the kernel's throttling
//! (`kernel.sched_rt_runtime_us`, 95 % by default) leaves everything else
//! 5 %. That happened once in the reconnect-storm bench, through a loop
//! that retried a refused write (since fixed): the node's apiservers got
//! no CPU for 45 s. [`spawn_guard`] bounds what such a bug can cost: a
//! thread of its own, at one priority above the ones it watches, adds up
//! their CPU time every second and, when they used more than their
//! [`Budget`] (half a core) for two seconds running, runs them all as
//! ordinary threads; after a minute under the budget they are real-time
//! again. [`demotions`] counts those steps down for the daemon's metrics.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The priority the control threads run at now (0: ordinary, because none
/// was asked for, the kernel refused it, or the guard stepped them down).
static APPLIED: AtomicU8 = AtomicU8::new(0);

/// Times the guard ran the control threads as ordinary ones.
static DEMOTIONS: AtomicU64 = AtomicU64::new(0);

/// The kernel ids of the threads made real-time: what the guard watches.
/// Held while a thread joins and while the guard changes them all, so no
/// thread starts real-time after a step down.
static THREADS: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// The highest priority `SCHED_RR` accepts on Linux.
pub const MAX_PRIORITY: u8 = 99;

/// Runs the calling thread under `SCHED_RR` at `priority` (1 to
/// [`MAX_PRIORITY`]); threads and processes it starts afterwards begin
/// under the ordinary policy. Needs `CAP_SYS_NICE` (or root outside a
/// container): without it the kernel answers `EPERM` and nothing changes.
/// The thread is one of those [`spawn_guard`] watches.
pub fn make_realtime(priority: u8) -> io::Result<()> {
    if priority == 0 || priority > MAX_PRIORITY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("real-time priority {priority} is outside 1 to {MAX_PRIORITY}"),
        ));
    }
    let mut threads = lock_threads();
    set_policy(0, priority)?;
    threads.push(this_thread());
    APPLIED.store(priority, Ordering::Relaxed);
    Ok(())
}

/// Runs the calling thread at the priority the control threads run at now
/// (for a thread the runtime starts): nothing when they are ordinary,
/// including after the guard stepped them down.
pub fn adopt() -> io::Result<()> {
    let mut threads = lock_threads();
    let priority = applied();
    if priority == 0 {
        return Ok(());
    }
    set_policy(0, priority)?;
    threads.push(this_thread());
    Ok(())
}

/// Runs the calling thread `above` priorities over the control threads
/// when those are real-time (capped at [`MAX_PRIORITY`]), and as an
/// ordinary thread when they are not. For a thread that does almost no
/// work but must run on time, whatever the control threads do: the guard,
/// the VIP's lease watchdog. The guard does not watch it. Returns the
/// priority it got (0: ordinary).
pub fn make_sentinel(above: u8) -> io::Result<u8> {
    let control = applied();
    if control == 0 {
        return Ok(0);
    }
    let priority = control.saturating_add(above).min(MAX_PRIORITY);
    set_policy(0, priority)?;
    Ok(priority)
}

/// The real-time priority this process's control threads run at: 0 when
/// none was asked for, the kernel refused it or the guard stepped them
/// down.
pub fn applied() -> u8 {
    APPLIED.load(Ordering::Relaxed)
}

/// How many times the guard ran the control threads as ordinary ones.
pub fn demotions() -> u64 {
    DEMOTIONS.load(Ordering::Relaxed)
}

/// The calling thread's scheduling policy (without the reset-on-fork flag)
/// and priority, as the kernel reports them.
pub fn current() -> io::Result<(i32, i32)> {
    of_thread(0)
}

/// Thread `tid`'s (0: the caller's) policy and priority.
fn of_thread(tid: libc::pid_t) -> io::Result<(i32, i32)> {
    // SAFETY: no arguments beyond the thread id.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the kernel writes only into `param`, which lives for the call.
    if unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((policy & !libc::SCHED_RESET_ON_FORK, param.sched_priority))
}

/// Puts thread `tid` (0: the caller) under `SCHED_RR` at `priority`, or
/// under the ordinary policy when `priority` is 0; reset-on-fork either
/// way.
fn set_policy(tid: libc::pid_t, priority: u8) -> io::Result<()> {
    let policy = if priority == 0 {
        libc::SCHED_OTHER
    } else {
        libc::SCHED_RR
    };
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: `param` lives for the call, which only reads it.
    let rc = unsafe { libc::sched_setscheduler(tid, policy | libc::SCHED_RESET_ON_FORK, &param) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn this_thread() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

fn lock_threads() -> std::sync::MutexGuard<'static, Vec<libc::pid_t>> {
    THREADS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The CPU time thread `tid` of this process has used, or `None` once it
/// has ended. The clock id is the kernel's encoding of a thread's CPU
/// clock (glibc's `MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`).
fn cpu_time(tid: libc::pid_t) -> Option<Duration> {
    let clock = (!tid << 3) | 6;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the kernel writes only into `ts`, which lives for the call.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec).ok()?;
    Some(Duration::new(secs, nanos))
}

/// How much CPU the real-time threads may use, and for how long they may
/// use more, before the guard runs them as ordinary threads.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// One measurement's length.
    pub window: Duration,
    /// The share of one core the watched threads may use per window.
    pub share: f64,
    /// Windows in a row over `share` that step the threads down.
    pub demote_after: u32,
    /// Windows in a row under `share` that make them real-time again.
    pub restore_after: u32,
}

impl Default for Budget {
    /// Half a core for two seconds; real-time again after a minute under
    /// it. The LB's control threads use about 1 % of a core on an idle
    /// node and under 15 % in the reconnect-storm bench.
    fn default() -> Self {
        Budget {
            window: Duration::from_secs(1),
            share: 0.5,
            demote_after: 2,
            restore_after: 60,
        }
    }
}

/// What the guard does after a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Run the watched threads as ordinary ones.
    Demote,
    /// Make them real-time again.
    Restore,
}

/// The guard's count of windows over and under the budget.
#[derive(Debug)]
pub struct Tally {
    budget: Budget,
    over: u32,
    under: u32,
    demoted: bool,
}

impl Tally {
    pub fn new(budget: Budget) -> Self {
        Tally {
            budget,
            over: 0,
            under: 0,
            demoted: false,
        }
    }

    /// Counts a window in which the watched threads used `share` of a
    /// core, and says whether to change their policy now.
    pub fn observe(&mut self, share: f64) -> Option<Step> {
        if share > self.budget.share {
            self.over += 1;
            self.under = 0;
        } else {
            self.under += 1;
            self.over = 0;
        }
        if !self.demoted && self.over >= self.budget.demote_after {
            self.demoted = true;
            return Some(Step::Demote);
        }
        if self.demoted && self.under >= self.budget.restore_after {
            self.demoted = false;
            return Some(Step::Restore);
        }
        None
    }
}

/// Starts the guard over the threads [`make_realtime`] and [`adopt`] made
/// real-time at `priority` (call it after them): see the module header.
/// The guard runs at one priority above them (so their busy loops cannot
/// starve it) when the kernel allows, and for the rest of the process.
pub fn spawn_guard(priority: u8, budget: Budget) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rt-guard".into())
        .spawn(move || {
            if let Err(e) = make_sentinel(1) {
                tracing::warn!(error = %e, "the real-time guard runs as an ordinary thread");
            }
            guard(priority, budget);
        })
}

fn guard(priority: u8, budget: Budget) {
    let mut tally = Tally::new(budget);
    let mut usage = Usage::default();
    loop {
        std::thread::sleep(budget.window);
        let share = usage.share_since_last();
        match tally.observe(share) {
            Some(Step::Demote) => {
                step_all(0);
                DEMOTIONS.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    share = format!("{:.0} %", share * 100.0),
                    budget = format!("{:.0} %", budget.share * 100.0),
                    "the real-time control threads used more than their budget of a core: \
                     they run as ordinary threads now, and real-time again after {} s under it",
                    (budget.window * budget.restore_after).as_secs()
                );
            }
            Some(Step::Restore) => {
                step_all(priority);
                tracing::info!(priority, "the control threads run under SCHED_RR again");
            }
            None => {}
        }
    }
}

/// Puts every watched thread at `priority` (0: ordinary), forgetting the
/// ones that ended, and records it for threads that join later.
fn step_all(priority: u8) {
    let mut threads = lock_threads();
    threads.retain(|&tid| match set_policy(tid, priority) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => false,
        Err(e) => {
            tracing::warn!(error = %e, tid, priority, "cannot change a control thread's policy");
            true
        }
    });
    APPLIED.store(priority, Ordering::Relaxed);
}

/// The watched threads' CPU time at the last reading.
#[derive(Default)]
struct Usage {
    at: Option<Instant>,
    seen: std::collections::HashMap<libc::pid_t, Duration>,
}

impl Usage {
    /// The share of one core the watched threads used since the last call
    /// (0 at the first); threads that ended are forgotten.
    fn share_since_last(&mut self) -> f64 {
        let now = Instant::now();
        let mut seen = std::collections::HashMap::new();
        lock_threads().retain(|&tid| match cpu_time(tid) {
            Some(total) => {
                seen.insert(tid, total);
                true
            }
            None => false,
        });
        let used: Duration = seen
            .iter()
            .filter_map(|(tid, total)| Some(total.saturating_sub(*self.seen.get(tid)?)))
            .sum();
        self.seen = seen;
        let share = match self.at {
            Some(at) => used.as_secs_f64() / now.duration_since(at).as_secs_f64().max(1e-3),
            None => 0.0,
        };
        self.at = Some(now);
        share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this process holds `CAP_SYS_NICE` (bit 23 of `CapEff`).
    fn may_raise_priority() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let caps = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        caps & (1 << 23) != 0
    }

    fn budget(demote_after: u32, restore_after: u32) -> Budget {
        Budget {
            window: Duration::from_millis(50),
            share: 0.5,
            demote_after,
            restore_after,
        }
    }

    #[test]
    fn the_tally_steps_down_after_windows_in_a_row_over_and_back_after_windows_under() {
        let mut t = Tally::new(budget(2, 3));
        // One window over, then one under: the run of windows over restarts.
        assert_eq!(t.observe(0.9), None);
        assert_eq!(t.observe(0.1), None);
        assert_eq!(t.observe(0.9), None);
        assert_eq!(t.observe(0.9), Some(Step::Demote));
        // Still over: no second step down.
        assert_eq!(t.observe(1.0), None);
        assert_eq!(t.observe(0.2), None);
        assert_eq!(t.observe(0.2), None);
        // Over again before the third window under: the count restarts.
        assert_eq!(t.observe(0.7), None);
        assert_eq!(t.observe(0.5), None, "exactly the budget is within it");
        assert_eq!(t.observe(0.0), None);
        assert_eq!(t.observe(0.0), Some(Step::Restore));
        assert_eq!(t.observe(0.0), None);
        assert_eq!(t.observe(0.6), None);
        assert_eq!(t.observe(0.6), Some(Step::Demote), "and down again");
    }

    #[test]
    fn the_default_budget_is_half_a_core_for_two_seconds_and_a_minute_to_come_back() {
        let b = Budget::default();
        assert_eq!(b.window * b.demote_after, Duration::from_secs(2));
        assert_eq!(b.window * b.restore_after, Duration::from_secs(60));
        assert!((b.share - 0.5).abs() < f64::EPSILON);
    }

    /// Waits up to 5 s for `what` to hold.
    fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_guard_runs_a_busy_realtime_thread_as_an_ordinary_one_and_restores_it_when_quiet() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;

        let spin = Arc::new(AtomicBool::new(true));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let busy = std::thread::spawn({
            let spin = Arc::clone(&spin);
            move || {
                let made = make_realtime(5).map_err(|e| e.to_string());
                tid_tx.send((made, this_thread())).unwrap();
                while spin.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
                // Quiet from here on, and alive until the test ends.
                let _ = done_rx.recv();
            }
        });
        let (made, tid) = tid_rx.recv().unwrap();
        if let Err(e) = made {
            spin.store(false, Ordering::Relaxed);
            drop(done_tx);
            busy.join().unwrap();
            assert!(!may_raise_priority(), "refused with CAP_SYS_NICE: {e}");
            return;
        }
        spawn_guard(5, budget(2, 4)).unwrap();
        eventually("the busy thread runs as an ordinary one", || {
            of_thread(tid).unwrap() == (libc::SCHED_OTHER, 0)
        });
        assert_eq!(demotions(), 1);
        assert_eq!(applied(), 0);
        // A runtime thread that starts now stays ordinary.
        let joined =
            std::thread::spawn(|| (adopt().map_err(|e| e.to_string()), current().unwrap()))
                .join()
                .unwrap();
        assert_eq!(joined, (Ok(()), (libc::SCHED_OTHER, 0)));

        spin.store(false, Ordering::Relaxed);
        eventually("the quiet thread is real-time again", || {
            of_thread(tid).unwrap() == (libc::SCHED_RR, 5)
        });
        assert_eq!(applied(), 5);
        assert_eq!(demotions(), 1, "one step down only");
        done_tx.send(()).unwrap();
        busy.join().unwrap();
    }

    #[test]
    fn priorities_outside_the_range_are_refused_before_the_kernel() {
        for p in [0, 100, 255] {
            let e = make_realtime(p).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{p}");
        }
    }

    #[test]
    fn a_realtime_thread_starts_ordinary_threads() {
        let outcome = std::thread::spawn(|| {
            let made = make_realtime(7);
            let here = current().unwrap();
            let child = std::thread::spawn(|| current().unwrap()).join().unwrap();
            (made, here, child)
        })
        .join()
        .unwrap();
        match outcome {
            (Ok(()), here, child) => {
                assert_eq!(here, (libc::SCHED_RR, 7));
                assert_eq!(child, (libc::SCHED_OTHER, 0), "reset on fork");
                assert_eq!(applied(), 7);
            }
            (Err(e), here, _) => {
                // Without CAP_SYS_NICE the kernel refuses and nothing changes.
                assert!(!may_raise_priority(), "refused with CAP_SYS_NICE: {e}");
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                assert_eq!(here, (libc::SCHED_OTHER, 0));
            }
        }
    }
}
