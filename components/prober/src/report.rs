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
//! jitter; a stream that got acknowledged resets the backoff. Each stream
//! is opened over the first connection made of a race
//! ([`bulwark_common::grpc::dial_first`]): the endpoint it aims at first,
//! then every other configured endpoint 300 ms apart, the one whose stream
//! just failed last. A leader whose host went dark (its SYNs unanswered)
//! then costs 300 ms, not the whole connect timeout, and a follower that
//! answers instead points at the new leader.
//!
//! Noticing a leader that is gone: the leader acknowledges each report as
//! it reads it, so a report unacknowledged for [`ACK_WAIT`] (or a
//! heartbeat, if longer) ends the stream, as does silence for three
//! heartbeats. A check that changes sends a report at once, so when the
//! leader's node goes dark with an apiserver on it, the prober learns it
//! within a second of seeing the apiserver go.
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
/// How long opening a stream may take once connected.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a report may wait for its acknowledgement (at least a
/// heartbeat) before the stream counts as dead.
const ACK_WAIT: Duration = Duration::from_secs(1);

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

impl End {
    /// An error that warrants trying the next endpoint.
    fn error(detail: String) -> Self {
        End::Retry {
            cause: "error",
            detail,
        }
    }
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
    /// Since when the oldest report not yet acknowledged waits (as far as
    /// acknowledgements tell: a partial one restarts the wait).
    unacked_since: Option<Instant>,
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
        // The endpoint whose stream failed last: dialled last for now.
        let mut failed: Option<String> = None;
        loop {
            self.worker.set_state("connecting");
            let order = dial_order(&self.endpoints, &target, failed.as_deref());
            let (end, acked, used) = self.session(&order, &mut sequence, &cancel).await;
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
                End::Redirect(addr) if addr != used && redirects <= self.endpoints.len() => {
                    tracing::info!(from = %used, to = %addr, "following the leader hint");
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
            self.worker
                .failed(&format_args!("stream to {used} ended ({cause}): {detail}"));
            redirects = 0;
            let wait = jitter(backoff);
            tracing::warn!(endpoint = %used, cause, %detail, retry_in = ?wait, "report stream ended");
            failed = Some(used);
            backoff = (backoff * 2).min(self.max_backoff);
            target = self.endpoints[next_endpoint % self.endpoints.len()].clone();
            next_endpoint += 1;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// One stream to the first endpoint of `order` that connects. Returns
    /// how it ended, whether the LB acknowledged anything on it (it is the
    /// leader) and the endpoint's address.
    async fn session(
        &self,
        order: &[String],
        sequence: &mut u64,
        cancel: &CancellationToken,
    ) -> (End, bool, String) {
        match self.open(order, sequence, cancel).await {
            Ok((open, address)) => {
                let (end, acked) = self.pump(&address, open, sequence, cancel).await;
                (end, acked, address)
            }
            Err((end, address)) => (end, false, address),
        }
    }

    /// Connects to the first endpoint of `order` that answers and opens the
    /// stream there, with the first FULL report in the call itself.
    async fn open(
        &self,
        order: &[String],
        sequence: &mut u64,
        cancel: &CancellationToken,
    ) -> Result<(Open, String), (End, String)> {
        let server_name = self.server_name.as_deref();
        let dialled = tokio::select! {
            d = bulwark_common::grpc::dial_first(order, &self.tls, server_name) => d,
            _ = cancel.cancelled() => return Err((End::Cancelled, order[0].clone())),
        };
        let (address, connection) = dialled.map_err(|(address, e)| {
            (
                End::error(format!("no endpoint connected; the last, {address}: {e}")),
                address,
            )
        })?;
        self.open_over(connection, address, sequence, cancel).await
    }

    /// Opens the stream over `connection` to `address`.
    async fn open_over(
        &self,
        connection: bulwark_common::grpc::Dialled,
        address: String,
        sequence: &mut u64,
        cancel: &CancellationToken,
    ) -> Result<(Open, String), (End, String)> {
        let server_name = self.server_name.as_deref();
        let channel = match bulwark_common::grpc::channel_over(
            connection,
            &address,
            &self.tls,
            server_name,
        ) {
            Ok(channel) => channel,
            Err(e) => return Err((End::error(format!("bad endpoint {address}: {e}")), address)),
        };
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
            unacked_since: None,
        };
        changes.borrow_and_update();
        if let Some(full) = self.build(&mut s, sequence)
            && tx.try_send(full).is_err()
        {
            return Err((End::error("report queue unavailable".into()), address));
        }
        let opened = tokio::select! {
            r = tokio::time::timeout(OPEN_TIMEOUT, client.report(ReceiverStream::new(rx))) => r,
            _ = cancel.cancelled() => return Err((End::Cancelled, address)),
        };
        match opened {
            Err(_) => Err((
                End::error(format!("no answer within {OPEN_TIMEOUT:?}")),
                address,
            )),
            Ok(Err(status)) => Err((end_of_status(&status), address)),
            Ok(Ok(response)) => Ok((
                Open {
                    acks: response.into_inner(),
                    tx,
                    changes,
                    s,
                },
                address,
            )),
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
            // A report unacknowledged for ACK_WAIT, or silence for three
            // heartbeats, means the leader is gone or hung; TCP keepalive
            // would take far longer to tell.
            let ack_deadline = s.ack_deadline();
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
                    let waited = s.unacked_since.unwrap_or(s.last_ack).elapsed();
                    return (
                        End::Retry {
                            cause: "ack_timeout",
                            detail: format!("a report unacknowledged for {waited:.1?}"),
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
        if s.last_sent_seq <= s.acked_seq {
            s.unacked_since = Some(now);
        }
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
        s.unacked_since = (s.acked_seq < s.last_sent_seq).then_some(s.last_ack);
        if ack.resync_required {
            tracing::info!(
                accepted = ack.accepted_sequence,
                "the LB asks for a full report"
            );
            metrics::resync();
            s.need_full = true;
            // The LB is alive and answered; what it lacks is resent now.
            s.acked_seq = s.last_sent_seq;
            s.unacked_since = None;
        }
        None
    }
}

impl Stream {
    /// When the stream counts as dead unless an acknowledgement comes:
    /// [`ACK_WAIT`] (at least a heartbeat) after the oldest unacknowledged
    /// report, and never later than three heartbeats of silence. `None`
    /// while nothing waits.
    fn ack_deadline(&self) -> Option<Instant> {
        if self.last_sent_seq <= self.acked_seq {
            return None;
        }
        let silent = self.last_ack + self.heartbeat * 3;
        Some(
            self.unacked_since
                .map_or(silent, |t| silent.min(t + self.heartbeat.max(ACK_WAIT))),
        )
    }
}

/// The endpoints a stream aims at, in the order they are dialled: `first`,
/// the other configured `endpoints`, and `failed` (whose stream failed
/// last, when it is one of them) at the end.
fn dial_order(endpoints: &[String], first: &str, failed: Option<&str>) -> Vec<String> {
    let mut order = vec![first.to_owned()];
    let others = endpoints.iter().filter(|e| *e != first);
    order.extend(
        others
            .clone()
            .filter(|e| Some(e.as_str()) != failed)
            .cloned(),
    );
    order.extend(others.filter(|e| Some(e.as_str()) == failed).cloned());
    order
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
    fn the_endpoint_that_failed_is_dialled_last() {
        let eps: Vec<String> = ["a:1", "b:1", "c:1"].map(String::from).to_vec();
        assert_eq!(dial_order(&eps, "a:1", None), ["a:1", "b:1", "c:1"]);
        assert_eq!(dial_order(&eps, "b:1", Some("a:1")), ["b:1", "c:1", "a:1"]);
        // A hint outside the list goes first; the failed one stays last.
        assert_eq!(
            dial_order(&eps, "h:1", Some("b:1")),
            ["h:1", "a:1", "c:1", "b:1"]
        );
        // Aimed at again (a hint naming it): first, once.
        assert_eq!(dial_order(&eps, "c:1", Some("c:1")), ["c:1", "a:1", "b:1"]);
    }

    #[test]
    fn an_unacknowledged_report_ends_the_stream_after_the_ack_wait() {
        let t0 = Instant::now();
        let mut s = Stream {
            sent: BTreeMap::new(),
            need_full: false,
            dirty: false,
            heartbeat: Duration::from_secs(1),
            last_sent: t0,
            last_sent_seq: 4,
            last_ack: t0,
            acked_seq: 4,
            acked: true,
            unacked_since: None,
        };
        assert_eq!(s.ack_deadline(), None, "nothing waits");
        // A report sent 2.5 s after the last ack: its own wait decides.
        let sent = t0 + Duration::from_millis(2500);
        (s.last_sent_seq, s.unacked_since) = (5, Some(sent));
        assert_eq!(s.ack_deadline(), Some(t0 + Duration::from_secs(3)));
        let sent = t0 + Duration::from_millis(500);
        s.unacked_since = Some(sent);
        assert_eq!(s.ack_deadline(), Some(sent + ACK_WAIT));
        // Long heartbeats wait a heartbeat.
        s.heartbeat = Duration::from_secs(5);
        assert_eq!(s.ack_deadline(), Some(sent + Duration::from_secs(5)));
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
