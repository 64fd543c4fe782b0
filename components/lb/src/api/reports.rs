//! `bulwark.lb.v1.ProbeReports`: where bulwark-prober streams its
//! observations.
//!
//! Only the leader takes reports. A follower refuses the call with
//! FAILED_PRECONDITION and the leader hint (the prober goes there at once).
//! On the leader each report goes into the [`HealthService`]'s aggregator
//! and is acknowledged with the accepted sequence, whether a FULL report is
//! needed, and the heartbeat interval. When this node stops leading, every
//! open stream gets one last ack naming the new leader (or none yet: the
//! prober then retries with backoff) and ends.
//!
//! [`HealthService`]: crate::health::HealthService

use std::pin::Pin;

use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::probe_reports_server::ProbeReports;
use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::Api;

type AckStream = Pin<Box<dyn Stream<Item = Result<lb::ProbeReportAck, Status>> + Send>>;

#[tonic::async_trait]
impl ProbeReports for Api {
    type ReportStream = AckStream;

    async fn report(
        &self,
        request: Request<Streaming<lb::ProbeReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        self.require_leader()?;
        if !self.health.is_leading() {
            // Elected a moment ago; the aggregator starts within
            // milliseconds. The prober retries with backoff.
            return Err(Status::unavailable(
                "this node just became leader; health aggregation is starting",
            ));
        }
        let mut leadership = self.health.leadership();
        leadership.borrow_and_update();
        let session = Session {
            api: self.clone(),
            inbound: request.into_inner(),
            leadership,
            heartbeat: bulwark_api::time::duration_to_proto(
                self.health.config().heartbeat_interval,
            )
            .ok(),
            prober: String::new(),
            ended: false,
        };
        // The stream does the work as tonic polls it: no task of its own,
        // and it ends with the connection that owns it.
        Ok(Response::new(Box::pin(futures::stream::unfold(
            session,
            Session::next,
        ))))
    }
}

/// One prober's report stream on the leader: each report read goes into
/// the aggregator and yields its ack; a leadership change, a refused
/// report or an unreadable one yields a last message and ends it.
struct Session {
    api: Api,
    inbound: Streaming<lb::ProbeReport>,
    leadership: watch::Receiver<u64>,
    heartbeat: Option<prost_types::Duration>,
    /// `node@zone`, once the first report named it.
    prober: String,
    /// The last message went out; the stream ends.
    ended: bool,
}

impl Session {
    async fn next(mut self) -> Option<(Result<lb::ProbeReportAck, Status>, Self)> {
        if self.ended {
            return None;
        }
        let message = tokio::select! {
            m = self.inbound.message() => m,
            _ = self.leadership.changed() => return Some((Ok(self.hint()), self.end())),
        };
        let report = match message {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(prober = %self.prober, error = %e, "report stream ended");
                // A report that does not decode is the client's error; say
                // so rather than end the stream cleanly.
                if e.code() == tonic::Code::Cancelled {
                    return None;
                }
                let status = Status::invalid_argument(format!(
                    "a report could not be read: {}",
                    e.message().chars().take(200).collect::<String>()
                ));
                return Some((Err(status), self.end()));
            }
        };
        if self.prober.is_empty()
            && let Some(p) = &report.prober
        {
            self.prober = format!("{}@{}", p.node_name, p.zone);
            tracing::info!(prober = %self.prober, "prober report stream opened");
        }
        match self.api.health.report(&report) {
            Ok(Some(outcome)) => {
                let ack = lb::ProbeReportAck {
                    accepted_sequence: outcome.accepted_sequence,
                    leader_hint: None,
                    resync_required: outcome.resync_required,
                    heartbeat_interval: self.heartbeat,
                };
                Some((Ok(ack), self))
            }
            Ok(None) => Some((Ok(self.hint()), self.end())),
            Err(e) => {
                tracing::warn!(prober = %self.prober, error = %e, "malformed prober report refused");
                let status = Status::invalid_argument(e.to_string());
                Some((Err(status), self.end()))
            }
        }
    }

    fn end(mut self) -> Self {
        self.ended = true;
        self
    }

    /// Tells the prober where the leader is now, ending its stream here.
    fn hint(&self) -> lb::ProbeReportAck {
        let hint = self
            .api
            .leader_hint()
            .filter(|h| h.node_id != self.api.node_id);
        tracing::info!(prober = %self.prober, leader = ?hint.as_ref().map(|h| h.node_id), "leadership moved: sending the prober on");
        lb::ProbeReportAck {
            leader_hint: Some(hint.unwrap_or_default()),
            ..Default::default()
        }
    }
}
