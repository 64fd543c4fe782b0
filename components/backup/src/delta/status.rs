//! What the recorder is doing, shared with status, metrics and `GetStatus`.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// What the recorder is doing, for status and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecorderState {
    /// Not running here.
    Stopped,
    /// Following etcd.
    Running,
    /// A gap was found; waiting for a new full snapshot.
    Gap,
}

impl RecorderState {
    /// Lower-case name, as `/debug/workers` shows it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Running => "running",
            Self::Gap => "gap",
        }
    }
}

/// The recorder's shared status.
#[derive(Clone, Debug)]
pub struct DeltaStatus {
    /// State.
    pub state: RecorderState,
    /// Base snapshot being followed.
    pub base_snapshot: Option<String>,
    /// Newest revision in a committed segment.
    pub newest_revision: i64,
    /// When that revision's event was received.
    pub newest_at: Option<DateTime<Utc>>,
    /// Receive time of the oldest event not yet committed.
    pub pending_since: Option<DateTime<Utc>>,
    /// Segments committed by this instance since it started.
    pub committed: u64,
    /// Last error of the recorder.
    pub last_error: Option<String>,
}

impl Default for DeltaStatus {
    fn default() -> Self {
        Self {
            state: RecorderState::Stopped,
            base_snapshot: None,
            newest_revision: 0,
            newest_at: None,
            pending_since: None,
            committed: 0,
            last_error: None,
        }
    }
}

impl DeltaStatus {
    /// RPO lag now: how long the oldest uncommitted event has waited
    /// (zero when everything received is committed).
    pub fn rpo_lag(&self, now: DateTime<Utc>) -> Duration {
        self.pending_since
            .and_then(|t| (now - t).to_std().ok())
            .unwrap_or_default()
    }
}
