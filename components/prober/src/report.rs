//! The report stream: one bidirectional `ProbeReports.Report` call to the
//! LB leader, kept open, re-opened wherever the leader moves.
//!
//! Protocol (lb.proto): the first report of every stream is FULL; then
//! CHANGES whenever a check's outcome class changes, HEARTBEAT when nothing
//! was sent for a heartbeat interval (the LB sets it in its acks), FULL
//! again when an ack says `resync_required`. Sequence numbers grow by one
//! per report across every stream of this process, so a new leader can tell
//! a gap from a duplicate; a new process announces itself with a new random
//! instance id.
//!
//! Finding the leader: start with the first configured endpoint; a follower
//! answers with a leader hint (on an ack, or on a FAILED_PRECONDITION
//! status) and the prober goes there at once. Errors, an empty hint, an
//! UNAVAILABLE "no leader", a closed stream or an ack that does not come
//! move on to the next configured endpoint after an exponential backoff with
//! jitter; a stream that got acknowledged resets the backoff.
//!
//! Never blocking probing: the checks write to [`Observations`] and never
//! wait for the stream. The stream's send queue holds two reports; when
//! the LB reads slowly the reporter simply waits for room while changes
//! pile up *coalesced* in the table, and the next CHANGES carries only the
//! latest state of each check. Acks are read all the while, so a slow
//! reader on either side cannot deadlock the other.

use std::collections::BTreeMap;
use std::time::Duration;

use bulwark_api::lb::v1::probe_reports_client::ProbeReportsClient;
use bulwark_api::lb::v1::{ProbeKind, ProbeReport, ProbeReportAck, ProberIdentity, ReportKind};
use bulwark_common::tls::{TlsError, TlsMaterial};
use bulwark_common::workers::Worker;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::ReportConfig;
use crate::metrics;
use crate::observations::{CheckKey, Observations, OutcomeClass};

/// Heartbeat interval until the LB names one.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// Reports queued on a stream before the reporter waits (and coalesces).
const QUEUE: usize = 2;

/// The reporter's name as a worker (`/debug/workers`).
pub const WORKER: &str = "reporter";
/// How long opening a stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// A fresh identity for this process: node name, zone and a random
/// instance id.
pub fn identity(node_name: &str, zone: &str) -> ProberIdentity {
    ProberIdentity {
        node_name: node_name.to_owned(),
        zone: zone.to_owned(),
        instance_id: format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        ),
    }
}

/// Streams the observation table to the LB leader.
#[derive(Debug)]
pub struct Reporter {
    identity: ProberIdentity,
    endpoints: Vec<String>,
    server_name: Option<String>,
    initial_backoff: Duration,
    max_backoff: Duration,
    tls: TlsMaterial,
    table: Observations,
    leader: watch::Sender<Option<String>>,
    /// Where the reporter reports its state (`/debug/workers`).
    worker: Worker,
}

/// How a stream ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// A follower named the leader's address.
    Redirect(String),
    /// Anything else that warrants trying the next endpoint.
    Retry { cause: &'static str, detail: String },
    /// Shutting down.
    Cancelled,
}

/// An opened report stream: the acknowledgements, the sending side, the
/// table's change signal and the stream's bookkeeping.
struct Open {
    acks: tonic::Streaming<ProbeReportAck>,
    tx: mpsc::Sender<ProbeReport>,
    changes: watch::Receiver<u64>,
    s: Stream,
}

/// Per-stream state.
struct Stream {
    /// Outcome class of each check as last sent on this stream.
    sent: BTreeMap<CheckKey, OutcomeClass>,
    need_full: bool,
    dirty: bool,
    heartbeat: Duration,
    last_sent: Instant,
    last_sent_seq: u64,
    last_ack: Instant,
    acked_seq: u64,
    acked: bool,
}

impl Reporter {
    /// A reporter for `table` under `identity`. Loads the TLS identity now
    /// so a bad file fails at start.
    pub fn new(
        identity: ProberIdentity,
        config: &ReportConfig,
        table: Observations,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            identity,
            endpoints: config.endpoints.clone(),
            server_name: config.server_name.clone(),
            initial_backoff: config.initial_backoff,
            max_backoff: config.max_backoff,
            tls: config.tls.load()?,
            table,
            leader: watch::Sender::new(None),
            worker: Worker::detached(WORKER),
        })
    }

    /// Reports through `worker` (the daemon's registry) from now on.
    #[must_use]
    pub fn with_worker(mut self, worker: Worker) -> Self {
        self.worker = worker;
        self
    }

    /// The TLS identity it reports with (which follows its files).
    pub fn tls(&self) -> &TlsMaterial {
        &self.tls
    }

    /// The leader's address while a stream to it is acknowledged, `None`
    /// otherwise.
    pub fn leader(&self) -> watch::Receiver<Option<String>> {
        self.leader.subscribe()
    }

    /// Reports until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let Some(first) = self.endpoints.first().cloned() else {
            return;
        };
        let mut sequence = 0u64;
        let mut target = first;
        let mut next_endpoint = 1usize;
        let mut backoff = self.initial_backoff;
        let mut redirects = 0usize;
        loop {
            self.worker.set_state("connecting");
            let (end, acked) = self.session(&target, &mut sequence, &cancel).await;
            self.leader.send_replace(None);
            metrics::connected(false);
            if acked {
                backoff = self.initial_backoff;
                redirects = 0;
            }
            let (cause, detail) = match end {
                End::Cancelled => return,
                // Follow a hint at once, unless hints go round in circles
                // (a leader election in progress).
                End::Redirect(addr) if addr != target && redirects <= self.endpoints.len() => {
                    tracing::info!(from = %target, to = %addr, "following the leader hint");
                    metrics::reconnect("redirect");
                    redirects += 1;
                    target = addr;
                    continue;
                }
                End::Redirect(addr) => (
                    "redirect",
                    format!("leader hints keep pointing around ({addr})"),
                ),
                End::Retry { cause, detail } => (cause, detail),
            };
            metrics::reconnect(cause);
            self.worker.failed(&format_args!(
                "stream to {target} ended ({cause}): {detail}"
            ));
            redirects = 0;
            let wait = jitter(backoff);
            tracing::warn!(endpoint = %target, cause, %detail, retry_in = ?wait, "report stream ended");
            backoff = (backoff * 2).min(self.max_backoff);
            target = self.endpoints[next_endpoint % self.endpoints.len()].clone();
            next_endpoint += 1;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// One stream to `address`. Returns how it ended and whether the LB
    /// acknowledged anything on it (it is the leader).
    async fn session(
        &self,
        address: &str,
        sequence: &mut u64,
        cancel: &CancellationToken,
    ) -> (End, bool) {
        match self.open(address, sequence, cancel).await {
            Ok(open) => self.pump(address, open, sequence, cancel).await,
            Err(end) => (end, false),
        }
    }

    /// Opens the stream with the first FULL report in the call itself.
    async fn open(
        &self,
        address: &str,
        sequence: &mut u64,
        cancel: &CancellationToken,
    ) -> Result<Open, End> {
        let retry = |detail: String| End::Retry {
            cause: "error",
            detail,
        };
        let channel =
            bulwark_common::grpc::channel(address, &self.tls, self.server_name.as_deref())
                .map_err(|e| retry(format!("bad endpoint {address}: {e}")))?;
        let mut client = ProbeReportsClient::new(channel);
        let (tx, rx) = mpsc::channel::<ProbeReport>(QUEUE);
        let mut changes = self.table.subscribe();
        let now = Instant::now();
        let mut s = Stream {
            sent: BTreeMap::new(),
            need_full: true,
            dirty: false,
            heartbeat: DEFAULT_HEARTBEAT,
            last_sent: now,
            last_sent_seq: 0,
            last_ack: now,
            acked_seq: 0,
            acked: false,
        };
        changes.borrow_and_update();
        if let Some(full) = self.build(&mut s, sequence)
            && tx.try_send(full).is_err()
        {
            return Err(retry("report queue unavailable".into()));
        }
        let opened = tokio::select! {
            r = tokio::time::timeout(OPEN_TIMEOUT, client.report(ReceiverStream::new(rx))) => r,
            _ = cancel.cancelled() => return Err(End::Cancelled),
        };
        match opened {
            Err(_) => Err(retry(format!("no answer within {OPEN_TIMEOUT:?}"))),
            Ok(Err(status)) => Err(end_of_status(&status)),
            Ok(Ok(response)) => Ok(Open {
                acks: response.into_inner(),
                tx,
                changes,
                s,
            }),
        }
    }

    /// Sends changes and heartbeats and reads acknowledgements until the
    /// stream ends.
    async fn pump(
        &self,
        address: &str,
        open: Open,
        sequence: &mut u64,
        cancel: &CancellationToken,
    ) -> (End, bool) {
        let Open {
            mut acks,
            tx,
            mut changes,
            mut s,
        } = open;
        loop {
            let heartbeat_at = s.last_sent + s.heartbeat;
            // An ack that does not come for three heartbeats means a hung
            // leader; TCP keepalive would take far longer to tell.
            let ack_deadline =
                (s.last_sent_seq > s.acked_seq).then(|| s.last_ack + s.heartbeat * 3);
            let want = s.need_full || s.dirty || Instant::now() >= heartbeat_at;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return (End::Cancelled, s.acked),
                message = acks.message() => match message {
                    Ok(Some(ack)) => {
                        if let Some(end) = self.on_ack(address, &ack, &mut s) {
                            return (end, s.acked);
                        }
                    }
                    Ok(None) => return (
                        End::Retry { cause: "closed", detail: "the LB ended the stream".into() },
                        s.acked,
                    ),
                    Err(status) => return (end_of_status(&status), s.acked),
                },
                changed = changes.changed(), if !s.dirty => {
                    if changed.is_err() {
                        // The table is gone: the prober is shutting down.
                        return (End::Cancelled, s.acked);
                    }
                    s.dirty = true;
                }
                _ = tokio::time::sleep_until(heartbeat_at), if !want => {}
                _ = tokio::time::sleep_until(ack_deadline.unwrap_or(heartbeat_at)), if ack_deadline.is_some() => {
                    return (
                        End::Retry {
                            cause: "ack_timeout",
                            detail: format!("no acknowledgement for {:?}", s.heartbeat * 3),
                        },
                        s.acked,
                    );
                }
                permit = tx.reserve(), if want => {
                    let Ok(permit) = permit else {
                        return (
                            End::Retry { cause: "closed", detail: "the stream closed".into() },
                            s.acked,
                        );
                    };
                    if s.dirty {
                        changes.borrow_and_update();
                    }
                    if let Some(report) = self.build(&mut s, sequence) {
                        permit.send(report);
                    }
                }
            }
        }
    }

    /// Builds the next report: FULL when needed, else CHANGES when a check
    /// changed, else HEARTBEAT when one is due; `None` when nothing is to
    /// be sent. Updates the stream's bookkeeping as if it was sent.
    fn build(&self, s: &mut Stream, sequence: &mut u64) -> Option<ProbeReport> {
        let now = Instant::now();
        let (kind, observations) = if s.need_full {
            let all = self.table.snapshot();
            s.sent = all.iter().filter_map(keyed).collect();
            (ReportKind::Full, all)
        } else {
            let changed: Vec<_> = self
                .table
                .snapshot()
                .into_iter()
                .filter(|o| keyed(o).is_some_and(|(k, c)| s.sent.get(&k) != Some(&c)))
                .collect();
            if !changed.is_empty() {
                s.sent.extend(changed.iter().filter_map(keyed));
                (ReportKind::Changes, changed)
            } else if now >= s.last_sent + s.heartbeat {
                (ReportKind::Heartbeat, Vec::new())
            } else {
                s.dirty = false;
                return None;
            }
        };
        s.need_full = false;
        s.dirty = false;
        *sequence += 1;
        s.last_sent = now;
        s.last_sent_seq = *sequence;
        metrics::report_sent(kind);
        Some(ProbeReport {
            prober: Some(self.identity.clone()),
            sequence: *sequence,
            kind: kind as i32,
            observations,
            sent_at: bulwark_api::time::timestamp_to_proto(std::time::SystemTime::now()).ok(),
        })
    }

    /// Handles one ack; `Some` ends the stream.
    fn on_ack(&self, address: &str, ack: &ProbeReportAck, s: &mut Stream) -> Option<End> {
        if let Some(hint) = &ack.leader_hint {
            return Some(if hint.address.is_empty() {
                End::Retry {
                    cause: "redirect",
                    detail: format!(
                        "not the leader; leader is node {} (no address)",
                        hint.node_id
                    ),
                }
            } else {
                End::Redirect(hint.address.clone())
            });
        }
        if let Some(interval) = &ack.heartbeat_interval {
            match bulwark_api::time::duration_from_proto(interval) {
                // Bounded so a bad value can neither flood nor silence us.
                Ok(d) => s.heartbeat = d.clamp(Duration::from_millis(50), Duration::from_secs(60)),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a bad heartbeat interval from the LB")
                }
            }
        }
        if !s.acked {
            s.acked = true;
            tracing::info!(leader = %address, "reporting to the LB leader");
            self.worker.set_state("connected");
            self.leader.send_replace(Some(address.to_owned()));
            metrics::connected(true);
        }
        s.last_ack = Instant::now();
        self.worker.succeeded();
        s.acked_seq = s.acked_seq.max(ack.accepted_sequence);
        if ack.resync_required {
            tracing::info!(
                accepted = ack.accepted_sequence,
                "the LB asks for a full report"
            );
            metrics::resync();
            s.need_full = true;
            // The LB is alive and answered; what it lacks is resent now.
            s.acked_seq = s.last_sent_seq;
        }
        None
    }
}

fn keyed(o: &bulwark_api::lb::v1::Observation) -> Option<(CheckKey, OutcomeClass)> {
    let kind = ProbeKind::try_from(o.kind).ok()?;
    Some(((o.target_id.clone(), kind), OutcomeClass::of(o)))
}

/// A failed call: follow a leader hint, else retry elsewhere.
fn end_of_status(status: &tonic::Status) -> End {
    match bulwark_api::leader_hint::from_status(status) {
        Some(hint) if !hint.address.is_empty() => End::Redirect(hint.address),
        _ => End::Retry {
            cause: "error",
            detail: format!("{:?}: {}", status.code(), status.message()),
        },
    }
}

/// `d` ± 20 %, so probers that lost the same leader do not reconnect in
/// lockstep.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis().max(1) as u64;
    let spread = (ms / 5).max(1);
    Duration::from_millis(ms - spread + rand::random_range(0..=2 * spread))
}

#[cfg(test)]
mod tests {
    use bulwark_api::lb::v1::LeaderHint;

    use super::*;

    #[test]
    fn statuses_with_a_hint_redirect() {
        let hint = LeaderHint {
            node_id: 2,
            address: "10.0.0.2:9443".into(),
        };
        assert_eq!(
            end_of_status(&bulwark_api::leader_hint::not_leader(Some(&hint))),
            End::Redirect("10.0.0.2:9443".into())
        );
        assert!(matches!(
            end_of_status(&bulwark_api::leader_hint::not_leader(None)),
            End::Retry { cause: "error", .. }
        ));
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(1000));
            assert!((800..=1200).contains(&j.as_millis()), "{j:?}");
        }
        assert!(jitter(Duration::ZERO) <= Duration::from_millis(2));
    }

    #[test]
    fn identities_differ_per_process_start() {
        let a = identity("cp-1", "z");
        let b = identity("cp-1", "z");
        assert_ne!(a.instance_id, b.instance_id);
        assert_eq!(a.instance_id.len(), 32);
    }
}
