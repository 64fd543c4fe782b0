//! Talking to etcd: clients with our TLS identity, choosing the member to
//! snapshot, counting keys, and turning client errors into the
//! [`BackupError`] variants an operator can act on (unreachable vs refused
//! credentials).

use std::time::Duration;

use bulwark_common::tls::TlsMaterial;
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};

/// Which etcd member serves snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MemberChoice {
    /// The raft leader: always has every committed write.
    #[default]
    Leader,
    /// The member reporting the highest revision (a follower when it is
    /// caught up), to keep snapshot load off the leader.
    HighestRevision,
}

/// Connects to etcd with the configured endpoints, TLS and timeouts. Each
/// connection takes the TLS material current then, so a client certificate
/// renewed by `kubeadm certs renew` is used without a restart once the
/// daemon's follower has loaded it.
#[derive(Clone)]
pub struct EtcdConnector {
    endpoints: Vec<String>,
    tls: Option<TlsMaterial>,
    dial_timeout: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for EtcdConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConnector")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// One member as its own status call describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    /// The client URL that answered.
    pub endpoint: String,
    /// Its member id.
    pub member_id: u64,
    /// Its `--name`, from the member list (empty when unknown).
    pub member_name: String,
    /// The cluster id.
    pub cluster_id: u64,
    /// Server version.
    pub version: String,
    /// Store revision it reports.
    pub revision: i64,
    /// Raft index it has applied (ties between equal revisions).
    pub raft_index: u64,
    /// The leader's member id as it sees it (0: none).
    pub leader: u64,
    /// Backend size in bytes (what the snapshot will roughly weigh).
    pub db_size: u64,
}

impl EtcdConnector {
    /// A connector for `endpoints` with the client TLS already loaded.
    pub fn with_tls(
        endpoints: Vec<String>,
        tls: Option<TlsMaterial>,
        dial_timeout: Duration,
        request_timeout: Duration,
    ) -> Self {
        Self {
            endpoints,
            tls,
            dial_timeout,
            request_timeout,
        }
    }

    /// A connector for explicit endpoints without TLS (tests, drills).
    pub fn plain(endpoints: Vec<String>, request_timeout: Duration) -> Self {
        Self {
            endpoints,
            tls: None,
            dial_timeout: Duration::from_secs(3),
            request_timeout,
        }
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Timeout for short requests.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    fn options(&self, per_request_timeout: bool) -> ConnectOptions {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(self.dial_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if per_request_timeout {
            o = o.with_timeout(self.request_timeout);
        }
        if let Some(tls) = &self.tls {
            let [cert, key, ca] = tls.pem();
            o = o.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .identity(Identity::from_pem(cert, key)),
            );
        }
        o
    }

    /// The client TLS material, for the daemon to follow its files.
    pub fn tls(&self) -> Option<&TlsMaterial> {
        self.tls.as_ref()
    }

    /// A client over every configured endpoint, for short requests.
    pub async fn client(&self) -> Result<Client> {
        self.client_for(&self.endpoints, true).await
    }

    /// A client for `endpoints`; without a per-request timeout for streams
    /// (a snapshot takes as long as it takes; stalls are caught separately).
    pub async fn client_for(&self, endpoints: &[String], request_timeout: bool) -> Result<Client> {
        Client::connect(endpoints, Some(self.options(request_timeout)))
            .await
            .map_err(|e| classify(endpoints, "connect", &e))
    }

    /// Asks every endpoint for its status and returns those that answered,
    /// with member names filled in. Fails only when none answered.
    pub async fn statuses(&self) -> Result<Vec<MemberStatus>> {
        let mut out = Vec::new();
        let mut last_err = None;
        for ep in &self.endpoints {
            match self.status_of(ep).await {
                Ok(s) => out.push(s),
                Err(e) => {
                    tracing::debug!(endpoint = %ep, error = %e, "etcd member did not answer");
                    last_err = Some(e);
                }
            }
        }
        if out.is_empty() {
            return Err(last_err.unwrap_or_else(|| BackupError::EtcdUnavailable {
                endpoints: self.endpoints.join(","),
                detail: "no endpoints configured".into(),
            }));
        }
        // Names come from the member list; a failure only leaves them empty.
        if let Ok(mut c) = self.client_for(&[out[0].endpoint.clone()], true).await
            && let Ok(list) = c.member_list().await
        {
            for s in &mut out {
                if let Some(m) = list.members().iter().find(|m| m.id() == s.member_id) {
                    s.member_name = m.name().to_owned();
                }
            }
        }
        Ok(out)
    }

    /// The same connection settings for other endpoints (one member's
    /// client URLs, during a restore).
    pub fn with_endpoints(&self, endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            ..self.clone()
        }
    }

    async fn status_of(&self, endpoint: &str) -> Result<MemberStatus> {
        let eps = [endpoint.to_owned()];
        let mut c = self.client_for(&eps, true).await?;
        let s = c.status().await.map_err(|e| classify(&eps, "status", &e))?;
        let h = s.header().ok_or_else(|| BackupError::Etcd {
            operation: "status",
            detail: "response without header".into(),
        })?;
        Ok(MemberStatus {
            endpoint: endpoint.to_owned(),
            member_id: h.member_id(),
            member_name: String::new(),
            cluster_id: h.cluster_id(),
            version: s.version().to_owned(),
            revision: h.revision(),
            raft_index: s.raft_index(),
            leader: s.leader(),
            db_size: u64::try_from(s.db_size()).unwrap_or(0),
        })
    }

    /// Picks the member to snapshot: by name when asked, else by `choice`.
    pub async fn choose_member(
        &self,
        choice: MemberChoice,
        by_name: Option<&str>,
    ) -> Result<MemberStatus> {
        let statuses = self.statuses().await?;
        choose(&statuses, choice, by_name)
    }

    /// The store revision seen by `client` now (serializable).
    pub async fn revision(client: &mut Client, endpoint: &str) -> Result<i64> {
        let r = client
            .get(
                "\0",
                Some(GetOptions::new().with_serializable().with_count_only()),
            )
            .await
            .map_err(|e| classify(&[endpoint.to_owned()], "get", &e))?;
        Ok(r.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Number of keys at `revision` (0: the current one), and the revision
    /// the answer is for.
    pub async fn key_count(
        client: &mut Client,
        endpoint: &str,
        revision: i64,
    ) -> Result<(u64, i64)> {
        let mut opts = GetOptions::new()
            .with_all_keys()
            .with_count_only()
            .with_serializable();
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let r = client
            .get("", Some(opts))
            .await
            .map_err(|e| classify(&[endpoint.to_owned()], "count keys", &e))?;
        Ok((
            u64::try_from(r.count()).unwrap_or(0),
            r.header().map(|h| h.revision()).unwrap_or(0),
        ))
    }
}

/// The member choice as a pure function of the statuses.
pub fn choose(
    statuses: &[MemberStatus],
    choice: MemberChoice,
    by_name: Option<&str>,
) -> Result<MemberStatus> {
    if let Some(name) = by_name.filter(|n| !n.is_empty()) {
        return statuses
            .iter()
            .find(|s| s.member_name == name)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<&str> = statuses.iter().map(|s| s.member_name.as_str()).collect();
                BackupError::InvalidArgument(format!(
                    "etcd member {name:?} is not among the members that answered ({})",
                    names.join(", ")
                ))
            });
    }
    let highest = || {
        // Highest revision; on a tie the member further in the raft log,
        // then a follower (keeps load off the leader).
        statuses
            .iter()
            .max_by_key(|s| (s.revision, s.raft_index, s.member_id != s.leader))
            .cloned()
    };
    let chosen = match choice {
        MemberChoice::Leader => statuses
            .iter()
            .find(|s| s.leader != 0 && s.member_id == s.leader)
            .cloned()
            .or_else(highest),
        MemberChoice::HighestRevision => highest(),
    };
    chosen.ok_or_else(|| BackupError::EtcdUnavailable {
        endpoints: String::new(),
        detail: "no member answered".into(),
    })
}

/// Full text of an etcd client error, causes included (tonic's transport
/// errors put the useful part in their sources).
pub fn error_text(e: &etcd_client::Error) -> String {
    let mut text = match e {
        etcd_client::Error::GRpcStatus(s) => format!("{}: {}", s.code(), s.message()),
        other => other.to_string(),
    };
    let source: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::TransportError(t) => std::error::Error::source(t),
        etcd_client::Error::GRpcStatus(s) => std::error::Error::source(s),
        _ => None,
    };
    crate::error::append_causes(&mut text, source);
    text
}

/// Maps a client error to unreachable, refused credentials or other.
pub fn classify(
    endpoints: &[String],
    operation: &'static str,
    e: &etcd_client::Error,
) -> BackupError {
    let endpoints = endpoints.join(",");
    let detail = error_text(e);
    let lower = detail.to_ascii_lowercase();
    let auth_words = [
        "certificate",
        "unknownissuer",
        "unknown ca",
        "unknownca",
        "bad certificate",
        "badcertificate",
        "handshake",
        "alert",
    ];
    let is_auth = match e {
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) || auth_words.iter().any(|w| lower.contains(w))
        }
        etcd_client::Error::TransportError(_) => auth_words.iter().any(|w| lower.contains(w)),
        _ => false,
    };
    if is_auth {
        return BackupError::EtcdAuth { endpoints, detail };
    }
    // A stream cut by the member going away surfaces as an h2 error, or as
    // a response that ends without its gRPC status (a member stopped
    // mid-call, as a restore does). A member whose host is off or hangs
    // runs out the dial timeout, which tonic reports as an UNKNOWN
    // "transport error" caused by tokio's "deadline has elapsed".
    let connection_lost = [
        "h2 protocol error",
        "missing grpc-status trailer",
        "broken pipe",
        "connection reset",
        "connection refused",
        "deadline has elapsed",
    ]
    .iter()
    .any(|w| lower.contains(w));
    match e {
        etcd_client::Error::GRpcStatus(_) if connection_lost => {
            BackupError::EtcdUnavailable { endpoints, detail }
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            BackupError::EtcdUnavailable { endpoints, detail }
        }
        etcd_client::Error::GRpcStatus(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) =>
        {
            BackupError::EtcdUnavailable { endpoints, detail }
        }
        _ => BackupError::Etcd { operation, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, rev: i64, leader: u64) -> MemberStatus {
        MemberStatus {
            endpoint: format!("http://127.0.0.1:{id}"),
            member_id: id,
            member_name: format!("m{id}"),
            cluster_id: 9,
            version: "3.5.1".into(),
            revision: rev,
            raft_index: rev as u64,
            leader,
            db_size: 0,
        }
    }

    #[test]
    fn member_choice() {
        let ms = [member(1, 10, 2), member(2, 10, 2), member(3, 9, 2)];
        assert_eq!(
            choose(&ms, MemberChoice::Leader, None).unwrap().member_id,
            2
        );
        // Equal revisions: prefer a follower.
        assert_eq!(
            choose(&ms, MemberChoice::HighestRevision, None)
                .unwrap()
                .member_id,
            1
        );
        // No leader among the answers: fall back to the highest revision.
        let no_leader = [member(1, 10, 0), member(3, 11, 0)];
        assert_eq!(
            choose(&no_leader, MemberChoice::Leader, None)
                .unwrap()
                .member_id,
            3
        );
        assert_eq!(
            choose(&ms, MemberChoice::Leader, Some("m3"))
                .unwrap()
                .member_id,
            3
        );
        let e = choose(&ms, MemberChoice::Leader, Some("m9")).unwrap_err();
        assert!(e.to_string().contains("\"m9\" is not among"), "{e}");
    }

    #[test]
    fn auth_errors_are_told_apart() {
        let eps = ["https://e:2379".to_owned()];
        let denied = etcd_client::Error::GRpcStatus(tonic::Status::permission_denied("nope"));
        assert!(matches!(
            classify(&eps, "status", &denied),
            BackupError::EtcdAuth { .. }
        ));
        let down = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("connection refused"));
        assert!(matches!(
            classify(&eps, "status", &down),
            BackupError::EtcdUnavailable { .. }
        ));
        let other = etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument("bad"));
        assert!(matches!(
            classify(&eps, "status", &other),
            BackupError::Etcd { .. }
        ));
        // What tonic reports when a member stops mid-call (a restore).
        let cut = etcd_client::Error::GRpcStatus(tonic::Status::unknown(
            "h2 stream ended: missing grpc-status trailer",
        ));
        assert!(matches!(
            classify(&eps, "campaign", &cut),
            BackupError::EtcdUnavailable { .. }
        ));
        // What tonic reports when the dial timeout runs out (a member whose
        // host is off or hangs): UNKNOWN, with the timeout as its cause.
        let timed_out = etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(
            std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline has elapsed"),
        )));
        assert!(matches!(
            classify(&eps, "status", &timed_out),
            BackupError::EtcdUnavailable { .. }
        ));
    }
}
