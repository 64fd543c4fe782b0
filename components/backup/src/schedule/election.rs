//! Who takes scheduled backups: one instance, elected through etcd's own
//! election API (a lease-backed campaign).
//!
//! Every instance campaigns on the same election name with a lease of
//! `leaseTtl`; etcd makes the oldest campaigner the leader and the others
//! wait in line. The leader keeps its lease alive; if it dies, the lease
//! lapses after the TTL, its key disappears, and the next in line is
//! elected. A leader steps down on its own as soon as it has not managed to
//! refresh its lease for two thirds of the TTL, i.e. before etcd could
//! expire it and elect someone else, so two instances do not both think
//! they lead (modulo clock rate differences, which a third of the TTL
//! covers). On graceful shutdown the leader resigns at once, so a rolling
//! restart hands over without waiting for the TTL.
//!
//! Depending on etcd here is deliberate: backups are etcd protecting its
//! own data, and without etcd there is nothing to back up.

use std::time::{Duration, Instant};

use etcd_client::{LeaderKey, ResignOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use bulwark_common::workers::Worker;

use crate::error::{BackupError, Result};
use crate::etcd::{EtcdConnector, classify};

/// This instance's view of the election.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// Whether this instance leads now.
    pub is_leader: bool,
    /// Increments each time this instance becomes leader.
    pub term: u64,
}

/// The election's name as a worker (`/debug/workers`).
pub const WORKER: &str = "leader election";

/// Runs the campaign until `cancel` with `node`'s election value,
/// publishing leadership on `tx` and its state through `worker`.
pub async fn run(
    connector: EtcdConnector,
    name: String,
    node: LeaderInfo,
    ttl: Duration,
    tx: watch::Sender<LeaderState>,
    cancel: CancellationToken,
    worker: Worker,
) {
    let value = node.value();
    let mut publish = Publish {
        tx: &tx,
        worker: &worker,
        term: 0,
        outage: Outage::default(),
    };
    while !cancel.is_cancelled() {
        worker.set_state("campaigning");
        let campaign = campaign_once(&connector, &name, &value, ttl, &mut publish, &cancel);
        if let Err(e) = campaign.await {
            worker.failed(&e);
            publish.outage.failed(&e, Instant::now());
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
    tx.send_modify(|s| s.is_leader = false);
}

/// How often an outage that goes on is logged again.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(30);

/// A run of failed campaigns (etcd stopped for a restore, unreachable,
/// refusing). The first failure and a change of kind are warnings; the
/// same failure again, once a second while etcd is away, is logged once
/// per [`OUTAGE_LOG_EVERY`] with the count, so a restore that stops every
/// member does not fill the log with one line a second.
#[derive(Debug, Default)]
struct Outage {
    since: Option<Instant>,
    kind: &'static str,
    attempts: u32,
    logged_at: Option<Instant>,
}

impl Outage {
    /// Records a failed campaign at `now`; returns whether it was logged
    /// as a warning.
    fn failed(&mut self, e: &crate::error::BackupError, now: Instant) -> bool {
        let since = *self.since.get_or_insert(now);
        self.attempts += 1;
        let new_kind = self.kind != e.reason();
        let due = self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= OUTAGE_LOG_EVERY);
        self.kind = e.reason();
        if new_kind || due {
            self.logged_at = Some(now);
            tracing::warn!(
                error = %e,
                attempts = self.attempts,
                failing_for_s = now.duration_since(since).as_secs(),
                "backup leader election: retrying every second"
            );
            true
        } else {
            tracing::debug!(error = %e, attempts = self.attempts, "backup leader election: retrying");
            false
        }
    }

    /// etcd answered a campaign: the outage, if any, is over.
    fn ended(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                attempts = self.attempts,
                failed_for_s = since.elapsed().as_secs(),
                "backup leader election: etcd answers again"
            );
        }
        *self = Self::default();
    }
}

/// Where a campaign publishes leadership: the scheduler's watch, the
/// election's worker state, the term count, and the run of failures.
struct Publish<'a> {
    tx: &'a watch::Sender<LeaderState>,
    worker: &'a Worker,
    term: u64,
    outage: Outage,
}

async fn campaign_once(
    connector: &EtcdConnector,
    name: &str,
    value: &str,
    ttl: Duration,
    publish: &mut Publish<'_>,
    cancel: &CancellationToken,
) -> Result<()> {
    let eps = connector.endpoints().to_vec();
    // No per-request timeout: a campaign blocks until we are elected.
    let mut client = connector.client_for(&eps, false).await?;
    let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
    let lease = client
        .lease_grant(ttl_secs, None)
        .await
        .map_err(|e| classify(&eps, "lease grant", &e))?
        .id();
    publish.outage.ended();
    // Polled alongside the campaign and the lead, inside this task: it
    // cannot outlive them, and if it ends (the lease is lost) so does
    // the lead, so no leader runs on a lease nobody refreshes.
    let keeper = keep_alive(client.clone(), lease, ttl, eps.clone());
    tokio::pin!(keeper);

    let campaign = tokio::select! {
        r = client.campaign(name, value, lease) => r.map_err(|e| classify(&eps, "campaign", &e)),
        () = &mut keeper => Err(BackupError::Etcd {
            operation: "campaign",
            detail: "the election lease could not be kept alive".into(),
        }),
        _ = cancel.cancelled() => {
            let _ = client.lease_revoke(lease).await;
            return Ok(());
        }
    };
    let leader_key: Option<LeaderKey> = match campaign {
        Ok(resp) => resp.leader().cloned(),
        Err(e) => {
            let _ = client.lease_revoke(lease).await;
            return Err(e);
        }
    };
    publish.term += 1;
    tracing::info!(
        term = publish.term,
        election = name,
        "became the backup leader"
    );
    publish.tx.send_replace(LeaderState {
        is_leader: true,
        term: publish.term,
    });
    publish.worker.set_state("leading");
    publish.worker.succeeded();
    metrics::gauge!(crate::metrics::LEADER).set(1.0);

    tokio::select! {
        () = &mut keeper => {}
        _ = cancel.cancelled() => {}
    }
    publish.tx.send_modify(|s| s.is_leader = false);
    metrics::gauge!(crate::metrics::LEADER).set(0.0);
    if cancel.is_cancelled() {
        // Hand over now rather than after the TTL.
        let resign = ResignOptions::new();
        let resign = match leader_key {
            Some(k) => resign.with_leader(k),
            None => resign,
        };
        let _ =
            tokio::time::timeout(connector.request_timeout(), client.resign(Some(resign))).await;
        let _ = tokio::time::timeout(connector.request_timeout(), client.lease_revoke(lease)).await;
        tracing::info!("resigned as backup leader");
        Ok(())
    } else {
        Err(BackupError::Etcd {
            operation: "lease keep-alive",
            detail: "lost the election lease; stepped down".into(),
        })
    }
}

/// Refreshes the lease every third of the TTL; returns when the lease is
/// gone or has not been refreshed for two thirds of the TTL.
async fn keep_alive(mut client: etcd_client::Client, lease: i64, ttl: Duration, eps: Vec<String>) {
    let period = ttl / 3;
    let deadline = ttl * 2 / 3;
    let mut last_ok = Instant::now();
    let mut channel = None;
    loop {
        if last_ok.elapsed() > deadline {
            tracing::warn!("election lease not refreshed in time; stepping down");
            return;
        }
        if channel.is_none() {
            match tokio::time::timeout(period, client.lease_keep_alive(lease)).await {
                Ok(Ok(pair)) => channel = Some(pair),
                Ok(Err(e)) => {
                    tracing::debug!(error = %classify(&eps, "keep-alive", &e), "keep-alive stream")
                }
                Err(_) => {}
            }
        }
        if let Some((keeper, stream)) = channel.as_mut() {
            let round = async {
                keeper.keep_alive().await?;
                stream.message().await
            };
            match tokio::time::timeout(period, round).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => last_ok = Instant::now(),
                Ok(Ok(Some(_))) => {
                    tracing::warn!("election lease expired; stepping down");
                    return;
                }
                _ => channel = None,
            }
        }
        tokio::time::sleep(period.saturating_sub(Duration::from_millis(10))).await;
    }
}

/// Who leads, as the election value says: the node name and, when the
/// leader has one other instances can dial, its gRPC address (non-leaders
/// forward to it what only the leader knows, such as the delta recorder's
/// state).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderInfo {
    /// Node name.
    pub name: String,
    /// gRPC address (host:port); `None` when it listens on every address
    /// and `restore.agentAddress` is unset.
    pub address: Option<String>,
}

impl LeaderInfo {
    /// This instance's value: `name` and, unless it is a wildcard
    /// address nobody can dial, `address`.
    pub fn new(name: &str, address: &str) -> Self {
        let dialable = address
            .parse::<std::net::SocketAddr>()
            .map_or(true, |a| !a.ip().is_unspecified());
        Self {
            name: name.to_owned(),
            address: dialable.then(|| address.to_owned()),
        }
    }

    /// The election value: `name` or `name address` (node names, being
    /// host names, hold no spaces). An older instance's value is the bare
    /// name, which parses as a leader without an address.
    pub fn value(&self) -> String {
        match &self.address {
            Some(a) => format!("{} {a}", self.name),
            None => self.name.clone(),
        }
    }

    /// Reads an election value.
    pub fn parse(value: &str) -> Self {
        match value.split_once(' ') {
            Some((name, address)) => Self {
                name: name.to_owned(),
                address: Some(address.trim().to_owned()).filter(|a| !a.is_empty()),
            },
            None => Self {
                name: value.to_owned(),
                address: None,
            },
        }
    }
}

/// The current leader, as etcd's election says.
pub async fn current_leader(connector: &EtcdConnector, name: &str) -> Result<Option<LeaderInfo>> {
    let mut client = connector.client().await?;
    match client.leader(name).await {
        Ok(resp) => Ok(resp
            .kv()
            .map(|kv| LeaderInfo::parse(&String::from_utf8_lossy(kv.value())))),
        // etcd answers "election: no leader" as an error.
        Err(e) if e.to_string().contains("no leader") => Ok(None),
        Err(e) => Err(classify(connector.endpoints(), "election leader", &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn election_values_carry_a_dialable_address() {
        let with = LeaderInfo::new("cp-1", "10.0.0.1:9445");
        assert_eq!(with.value(), "cp-1 10.0.0.1:9445");
        assert_eq!(LeaderInfo::parse(&with.value()), with);
        let wildcard = LeaderInfo::new("cp-2", "0.0.0.0:9445");
        assert_eq!(wildcard.address, None);
        assert_eq!(LeaderInfo::parse(&wildcard.value()), wildcard);
        let named = LeaderInfo::new("cp-3", "cp-3.example:9445");
        assert_eq!(named.address.as_deref(), Some("cp-3.example:9445"));
        // An older instance's bare name.
        assert_eq!(LeaderInfo::parse("cp-4").address, None);
    }

    #[test]
    fn an_outage_warns_once_then_every_thirty_seconds() {
        let away = || BackupError::EtcdUnavailable {
            endpoints: "e".into(),
            detail: "connection refused".into(),
        };
        let t0 = Instant::now();
        let mut o = Outage::default();
        assert!(o.failed(&away(), t0));
        // One a second for most of half a minute: quiet.
        for s in 1..30 {
            assert!(!o.failed(&away(), t0 + Duration::from_secs(s)));
        }
        assert!(o.failed(&away(), t0 + Duration::from_secs(30)));
        // Another kind of failure is news at once.
        let refused = BackupError::EtcdAuth {
            endpoints: "e".into(),
            detail: "bad certificate".into(),
        };
        assert!(o.failed(&refused, t0 + Duration::from_secs(31)));
        assert_eq!(o.attempts, 32);
        o.ended();
        assert!(o.since.is_none());
        assert!(o.failed(&away(), t0 + Duration::from_secs(32)));
    }
}
