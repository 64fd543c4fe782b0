//! Steady HTTPS traffic through the VIP, the way a newcomer would judge a
//! front: requests that succeed or fail, with a timestamp each.
//!
//! Every worker opens a new TLS connection through the VIP for every
//! request (`GET /version`), so a request shows at once whether the front
//! accepts connections and reaches a live apiserver; nothing is retried, so
//! a failure is a failure the client saw.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_testkit::fixture::HttpsClient;
use tokio_util::sync::CancellationToken;

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When the request started (its connect).
    pub started: Instant,
    /// When the request finished.
    pub at: Instant,
    /// Whether it got a 200.
    pub ok: bool,
    /// The apiserver that answered (the fixture's header), if any.
    pub backend: Option<String>,
    /// What went wrong, when it did.
    pub error: Option<String>,
}

/// Running traffic; stops when dropped.
pub struct Traffic {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: CancellationToken,
    started: Instant,
}

impl Traffic {
    /// Starts `workers` clients against `vip`, each pausing `pause`
    /// between requests.
    pub fn start(client: HttpsClient, vip: SocketAddr, workers: usize, pause: Duration) -> Self {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        for _ in 0..workers {
            let client = client.clone();
            let outcomes = outcomes.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let started = Instant::now();
                    let result = client.get(vip, "/version").await;
                    let outcome = match result {
                        Ok(r) if r.status.is_success() => Outcome {
                            started,
                            at: Instant::now(),
                            ok: true,
                            backend: r.backend().map(str::to_owned),
                            error: None,
                        },
                        Ok(r) => Outcome {
                            started,
                            at: Instant::now(),
                            ok: false,
                            backend: r.backend().map(str::to_owned),
                            error: Some(format!("HTTP {}", r.status)),
                        },
                        Err(e) => Outcome {
                            started,
                            at: Instant::now(),
                            ok: false,
                            backend: None,
                            error: Some(format!("{e:#}")),
                        },
                    };
                    outcomes
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(outcome);
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            });
        }
        Self {
            outcomes,
            stop,
            started: Instant::now(),
        }
    }

    /// When the traffic started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The outcomes recorded since `since`.
    pub fn since(&self, since: Instant) -> Vec<Outcome> {
        self.outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|o| o.at >= since)
            .cloned()
            .collect()
    }

    /// Waits until a request started after `after` succeeded; returns when
    /// it finished, or `None` if none did within `timeout`.
    pub async fn first_success_after(&self, after: Instant, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(o) = self
                .since(after)
                .into_iter()
                .filter(|o| o.ok && o.started > after)
                .min_by_key(|o| o.at)
            {
                return Some(o.at);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Counts of a window of outcomes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub ok: usize,
    pub failed: usize,
}

impl Tally {
    pub fn of(outcomes: &[Outcome]) -> Self {
        let ok = outcomes.iter().filter(|o| o.ok).count();
        Self {
            ok,
            failed: outcomes.len() - ok,
        }
    }
}

/// The longest stretch without a successful request among `outcomes`
/// (sorted or not), counted from `from`: what a client saw as an outage.
pub fn longest_gap(outcomes: &[Outcome], from: Instant) -> Duration {
    let mut times: Vec<Instant> = outcomes.iter().filter(|o| o.ok).map(|o| o.at).collect();
    times.sort();
    let mut last = from;
    let mut gap = Duration::ZERO;
    for t in times {
        if t > last {
            gap = gap.max(t - last);
            last = t;
        }
    }
    gap
}

/// The failures among `outcomes`, grouped by their message (most frequent
/// first), for showing what clients saw.
pub fn error_kinds(outcomes: &[Outcome]) -> Vec<(String, usize)> {
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for e in outcomes.iter().filter_map(|o| o.error.as_deref()) {
        *kinds.entry(e.to_owned()).or_default() += 1;
    }
    let mut kinds: Vec<(String, usize)> = kinds.into_iter().collect();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    kinds
}
