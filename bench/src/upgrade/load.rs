//! The client load of the rolling-upgrade scenario, run on the lab's
//! client host through the VIP for the whole run, and what it saw in a
//! window of time.
//!
//! One loop opens a fresh TCP connection with an echo round trip every
//! ~10 ms (what a client that reconnects sees); [`KEEPALIVE_LOOPS`] loops
//! each keep one connection and send a request on it every ~10 ms,
//! reconnecting after a failure (what a kubelet's or controller's watch
//! sees). Every outcome is recorded with its time, so each step of the
//! upgrade is judged on the same record afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use bulwark_testkit::Host;
use bulwark_testkit::cluster::lab::{LbLab, echo};

use crate::stats::ms;

/// Kept-alive request loops beside the connect loop.
pub const KEEPALIVE_LOOPS: usize = 3;

/// The pace of every loop.
const PACE: Duration = Duration::from_millis(10);

/// How long one connect (with its echo) or one request may take.
const ATTEMPT: Duration = Duration::from_millis(100);

/// One outcome: `stream` 0 is the connect loop, 1.. the kept-alive loops.
#[derive(Clone, Copy)]
struct Event {
    at: Instant,
    stream: usize,
    ok: bool,
}

/// The running load.
pub struct Load {
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the load saw between two instants.
#[derive(Serialize)]
pub struct Window {
    /// Longest time without a successful fresh connection.
    pub connect_gap_ms: f64,
    /// Longest time one kept-alive loop went without a successful request.
    pub request_gap_ms: f64,
    pub failed_connects: usize,
    pub failed_requests: usize,
    pub connects: usize,
    pub requests: usize,
}

impl Load {
    /// Starts the loops on `lab`'s client host.
    pub fn start(lab: &LbLab) -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (client, vip) = (lab.client(), lab.vip);
        let mut tasks = vec![tokio::spawn(connect_loop(
            client.clone(),
            vip,
            events.clone(),
            stop.clone(),
        ))];
        for stream in 1..=KEEPALIVE_LOOPS {
            tasks.push(tokio::spawn(keepalive_loop(
                client.clone(),
                vip,
                stream,
                events.clone(),
                stop.clone(),
            )));
        }
        Self {
            events,
            stop,
            tasks,
        }
    }

    /// Stops every loop.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// What the load saw in `[from, to]`.
    pub fn window(&self, from: Instant, to: Instant) -> Window {
        let events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let failed = |keep: &dyn Fn(usize) -> bool| {
            events
                .iter()
                .filter(|e| keep(e.stream) && !e.ok && e.at >= from && e.at <= to)
                .count()
        };
        let total = |keep: &dyn Fn(usize) -> bool| {
            events
                .iter()
                .filter(|e| keep(e.stream) && e.at >= from && e.at <= to)
                .count()
        };
        let gap = |stream: usize| {
            let ok: Vec<Instant> = events
                .iter()
                .filter(|e| e.stream == stream && e.ok)
                .map(|e| e.at)
                .collect();
            longest_gap(&ok, from, to)
        };
        Window {
            connect_gap_ms: ms(gap(0)),
            request_gap_ms: ms((1..=KEEPALIVE_LOOPS).map(gap).max().unwrap_or_default()),
            failed_connects: failed(&|s| s == 0),
            failed_requests: failed(&|s| s > 0),
            connects: total(&|s| s == 0),
            requests: total(&|s| s > 0),
        }
    }
}

/// The longest interval between consecutive successes (`ok`, in time
/// order) that overlaps `[from, to]`; an interval still open at `to` counts
/// up to `to`.
fn longest_gap(ok: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut longest = Duration::ZERO;
    let mut prev: Option<Instant> = None;
    for &t in ok {
        if let Some(p) = prev
            && t >= from
            && p <= to
        {
            longest = longest.max(t - p);
        }
        prev = Some(t);
        if t > to {
            return longest;
        }
    }
    // No success after `to` yet: the gap since the last one runs to the
    // window's end.
    longest.max(to.saturating_duration_since(prev.unwrap_or(from)))
}

fn record(events: &Mutex<Vec<Event>>, stream: usize, ok: bool) {
    events
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Event {
            at: Instant::now(),
            stream,
            ok,
        });
}

/// Waits out the rest of one pace after an attempt that began at `start`.
async fn pace(start: Instant) {
    if let Some(rest) = PACE.checked_sub(start.elapsed()) {
        tokio::time::sleep(rest).await;
    }
}

async fn connect_loop(
    client: Host,
    vip: SocketAddr,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let ok = echo(&client, vip, ATTEMPT).await;
        record(&events, 0, ok);
        pace(start).await;
    }
}

async fn keepalive_loop(
    client: Host,
    vip: SocketAddr,
    stream: usize,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let Ok(Ok(mut conn)) = tokio::time::timeout(ATTEMPT, client.tcp_connect(vip)).await else {
            record(&events, stream, false);
            pace(start).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            let request = async {
                conn.write_all(b"bulwark").await?;
                let mut buf = [0u8; 7];
                conn.read_exact(&mut buf).await?;
                std::io::Result::Ok(&buf == b"bulwark")
            };
            let ok = matches!(tokio::time::timeout(ATTEMPT, request).await, Ok(Ok(true)));
            record(&events, stream, ok);
            if !ok {
                break;
            }
            pace(start).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_overlapping_the_window_counts_open_ends() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ok = [at(0), at(10), at(20), at(300), at(310), at(900)];
        // 20 -> 300 overlaps [100, 200].
        assert_eq!(
            longest_gap(&ok, at(100), at(200)),
            Duration::from_millis(280)
        );
        // 310 -> 900 is the longest overlapping [0, 1000].
        assert_eq!(
            longest_gap(&ok, at(0), at(1000)),
            Duration::from_millis(590)
        );
        // Nothing after 900: the gap runs to the window's end.
        assert_eq!(
            longest_gap(&ok, at(950), at(1500)),
            Duration::from_millis(600)
        );
        // A window between two close successes sees just their distance.
        assert_eq!(longest_gap(&ok, at(5), at(8)), Duration::from_millis(10));
        assert_eq!(longest_gap(&[], at(0), at(50)), Duration::from_millis(50));
    }
}
