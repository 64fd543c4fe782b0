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
use tokio::sync::mpsc;
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
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let api = self.clone();
        tokio::spawn(async move {
            let mut leadership = api.health.leadership();
            leadership.borrow_and_update();
            let heartbeat =
                bulwark_api::time::duration_to_proto(api.health.config().heartbeat_interval).ok();
            let mut prober = String::new();
            loop {
                let message = tokio::select! {
                    m = inbound.message() => m,
                    _ = leadership.changed() => {
                        api.send_hint(&tx, &prober).await;
                        return;
                    }
                };
                let report = match message {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(%prober, error = %e, "report stream ended");
                        // A report that does not decode is the client's
                        // error; say so rather than end the stream cleanly.
                        if e.code() != tonic::Code::Cancelled {
                            let _ = tx
                                .send(Err(Status::invalid_argument(format!(
                                    "a report could not be read: {}",
                                    e.message().chars().take(200).collect::<String>()
                                ))))
                                .await;
                        }
                        return;
                    }
                };
                if prober.is_empty()
                    && let Some(p) = &report.prober
                {
                    prober = format!("{}@{}", p.node_name, p.zone);
                    tracing::info!(%prober, "prober report stream opened");
                }
                let ack = match api.health.report(&report) {
                    Ok(Some(outcome)) => lb::ProbeReportAck {
                        accepted_sequence: outcome.accepted_sequence,
                        leader_hint: None,
                        resync_required: outcome.resync_required,
                        heartbeat_interval: heartbeat,
                    },
                    Ok(None) => {
                        api.send_hint(&tx, &prober).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%prober, error = %e, "malformed prober report refused");
                        let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                        return;
                    }
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

impl Api {
    /// Tells a prober where the leader is now, ending its stream here.
    async fn send_hint(&self, tx: &mpsc::Sender<Result<lb::ProbeReportAck, Status>>, prober: &str) {
        let hint = self.leader_hint().filter(|h| h.node_id != self.node_id);
        tracing::info!(%prober, leader = ?hint.as_ref().map(|h| h.node_id), "leadership moved: sending the prober on");
        let _ = tx
            .send(Ok(lb::ProbeReportAck {
                leader_hint: Some(hint.unwrap_or_default()),
                ..Default::default()
            }))
            .await;
    }
}
