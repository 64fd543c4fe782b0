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
//! The kernel's real-time throttling (`kernel.sched_rt_runtime_us`, 95 %
//! by default) leaves the rest of the machine only 5 % should such threads
//! stay busy, which is why the LB asks for it only when configured
//! (`realtimePriority`, default 0): in the reconnect-storm bench its
//! real-time control threads stayed busy for 45 s and starved the node.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

/// The priority [`make_realtime`] last applied in this process (0: none).
static APPLIED: AtomicU8 = AtomicU8::new(0);

/// The highest priority `SCHED_RR` accepts on Linux.
pub const MAX_PRIORITY: u8 = 99;

/// Runs the calling thread under `SCHED_RR` at `priority` (1 to
/// [`MAX_PRIORITY`]); threads and processes it starts afterwards begin
/// under the ordinary policy. Needs `CAP_SYS_NICE` (or root outside a
/// container): without it the kernel answers `EPERM` and nothing changes.
pub fn make_realtime(priority: u8) -> io::Result<()> {
    if priority == 0 || priority > MAX_PRIORITY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("real-time priority {priority} is outside 1 to {MAX_PRIORITY}"),
        ));
    }
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    let policy = libc::SCHED_RR | libc::SCHED_RESET_ON_FORK;
    // SAFETY: `param` lives for the call, which only reads it; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    APPLIED.store(priority, Ordering::Relaxed);
    Ok(())
}

/// The real-time priority this process's control threads run at: 0 when
/// none was asked for or the kernel refused it.
pub fn applied() -> u8 {
    APPLIED.load(Ordering::Relaxed)
}

/// The calling thread's scheduling policy (without the reset-on-fork flag)
/// and priority, as the kernel reports them.
pub fn current() -> io::Result<(i32, i32)> {
    // SAFETY: no arguments beyond the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the kernel writes only into `param`, which lives for the call.
    if unsafe { libc::sched_getparam(0, &mut param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((policy & !libc::SCHED_RESET_ON_FORK, param.sched_priority))
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
