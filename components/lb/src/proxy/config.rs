//! The data path's settings (`proxy:` in the LB configuration).

use std::time::Duration;

use bulwark_common::config::{Validate, Validator, duration};
use serde::{Deserialize, Serialize};

/// Upper bound for [`ProxyConfig::connect_attempts`]: tried backends are
/// remembered in a fixed array so a connection allocates nothing for them.
pub const MAX_CONNECT_ATTEMPTS: u32 = 16;

/// Upper bound for [`ProxyConfig::workers`]: more threads than this only
/// add context switches.
const MAX_WORKERS: u32 = 256;

/// How the proxy connects, limits and copies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Time allowed for one TCP connect to a backend. 500 ms: an apiserver
    /// in the same region answers a SYN in well under 10 ms even across
    /// zones, so a connect still pending after 500 ms means a dead host or
    /// a full accept queue, and the next backend is the better bet; it also
    /// stays under Linux's 1 s first SYN retransmit, so a lost SYN costs a
    /// retry elsewhere instead of a second wait on the same host. Worst case
    /// before a client sees a failure: `connectAttempts × connectTimeout`.
    #[serde(default = "d_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// A connect still pending this long gets a second one raced beside
    /// it, on another backend (a hedged connect): the first to connect
    /// takes the client, the other is dropped, and a backend overtaken
    /// that way is avoided like one whose connect failed. 100 ms: ten times
    /// what an apiserver in the same region takes to answer a SYN, so it
    /// only fires on a host that went dark or a full accept queue, and a
    /// client that drew such a backend waits 100 ms instead of the whole
    /// `connectTimeout`. The race counts against `connectAttempts` and
    /// never runs more than two connects at once. `0s` turns it off; a
    /// value of `connectTimeout` or more never fires (the timeout's retry
    /// comes first).
    #[serde(default = "d_connect_hedge_after", with = "duration")]
    pub connect_hedge_after: Duration,
    /// Connect tries per client connection, each on a different backend,
    /// before the client's connection is closed. A backend that accepted
    /// but reset or closed before its first byte counts as one: the
    /// client's first flight is replayed to the next (docs/HEALTH.md).
    #[serde(default = "d_connect_attempts")]
    pub connect_attempts: u32,
    /// Client connections served at once; beyond it the proxy stops
    /// accepting and new clients wait in the kernel's accept queue. Each
    /// connection costs two descriptors (its two sockets) and, while bytes
    /// wait to be written, up to `2 × bufferSize` of memory (an idle one
    /// holds no buffer); with `splice` on, up to six descriptors (a pipe of
    /// two more for each direction that carries bulk data), which is what
    /// the startup check of the descriptor limit counts.
    #[serde(default = "d_max_connections")]
    pub max_connections: u32,
    /// TCP keepalive on both sides of every connection.
    #[serde(default)]
    pub tcp_keepalive: KeepaliveConfig,
    /// Close a connection after this long without a byte in either
    /// direction. Off by default: `kubectl logs -f`, `exec` and watches are
    /// silent for long stretches and must never be cut.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
    /// Longest time a drained backend's connections may continue on this
    /// node after the drain was applied, even when the drain has no deadline
    /// (or a later one). Off by default: the drain's own deadline rules.
    #[serde(
        default,
        with = "duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub drain_max_duration: Option<Duration>,
    /// On shutdown the listener closes at once; open connections get this
    /// long to finish before they are closed.
    #[serde(default = "d_shutdown_grace", with = "duration")]
    pub shutdown_grace: Duration,
    /// Copy buffer per direction, in bytes, for the exchanges that do not
    /// go through splice. 16 KiB holds a full TLS record (as HAProxy's
    /// default buffer does). A direction borrows its buffer from the
    /// data-path thread only while it has bytes to write, so an idle watch
    /// holds none; bulk transfers move through pipes instead when `splice`
    /// is on. Also
    /// the bound on the client's first flight that is kept for a replay
    /// until the backend's first byte.
    #[serde(default = "d_buffer_size")]
    pub buffer_size: usize,
    /// Zero-copy forwarding: a direction that carries bulk data (a read of
    /// 16 KiB or more) moves on with `splice(2)` through a pipe, so its
    /// bytes never enter user space; small exchanges stay on read/write.
    /// Costs two more descriptors per bulk direction. On by default: it
    /// measurably pays on 64 KiB responses (bench/results); `false` keeps
    /// every byte on the buffered path.
    #[serde(default = "d_true")]
    pub splice: bool,
    /// Threads that run this node's proxied connections, per listener; a
    /// connection stays on one thread for its whole life. 0 (the default):
    /// one per CPU the process may use.
    #[serde(default)]
    pub workers: u32,
}

/// TCP keepalive probes, so a peer that vanished (power loss, cut link)
/// does not hold a connection and its buffers forever.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// Send keepalive probes at all.
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Silence before the first probe.
    #[serde(default = "d_ka_idle", with = "duration")]
    pub idle: Duration,
    /// Time between probes.
    #[serde(default = "d_ka_interval", with = "duration")]
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    #[serde(default = "d_ka_count")]
    pub count: u32,
}

fn d_connect_timeout() -> Duration {
    Duration::from_millis(500)
}
fn d_connect_hedge_after() -> Duration {
    Duration::from_millis(100)
}
fn d_connect_attempts() -> u32 {
    3
}
fn d_max_connections() -> u32 {
    // Well under the usual 1 Mi descriptor limit of a static pod, and far
    // above what a few thousand kubelets and controllers open.
    16_384
}
fn d_shutdown_grace() -> Duration {
    // Inside the kubelet's default 30 s termination grace, leaving room
    // for the rest of the daemon's shutdown.
    Duration::from_secs(10)
}
fn d_buffer_size() -> usize {
    16 * 1024
}
fn d_true() -> bool {
    true
}
fn d_ka_idle() -> Duration {
    // Below common 60 s NAT/conntrack idle limits on the way to clients.
    Duration::from_secs(30)
}
fn d_ka_interval() -> Duration {
    Duration::from_secs(10)
}
fn d_ka_count() -> u32 {
    3
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            idle: d_ka_idle(),
            interval: d_ka_interval(),
            count: d_ka_count(),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: d_connect_timeout(),
            connect_hedge_after: d_connect_hedge_after(),
            connect_attempts: d_connect_attempts(),
            max_connections: d_max_connections(),
            tcp_keepalive: KeepaliveConfig::default(),
            idle_timeout: None,
            drain_max_duration: None,
            shutdown_grace: d_shutdown_grace(),
            buffer_size: d_buffer_size(),
            splice: true,
            workers: 0,
        }
    }
}

impl Validate for ProxyConfig {
    fn validate(&self, v: &mut Validator) {
        v.duration_in(
            "connectTimeout",
            self.connect_timeout,
            Duration::from_millis(1),
            Duration::from_secs(60),
        );
        v.duration_in(
            "connectHedgeAfter",
            self.connect_hedge_after,
            Duration::ZERO,
            Duration::from_secs(60),
        );
        v.check(
            (1..=MAX_CONNECT_ATTEMPTS).contains(&self.connect_attempts),
            "connectAttempts",
            format!(
                "{} is out of range: expected between 1 and {MAX_CONNECT_ATTEMPTS}",
                self.connect_attempts
            ),
        );
        v.check(
            self.max_connections >= 1,
            "maxConnections",
            "must be at least 1",
        );
        v.nested("tcpKeepalive", &self.tcp_keepalive);
        if let Some(idle) = self.idle_timeout {
            v.duration_in(
                "idleTimeout",
                idle,
                Duration::from_secs(1),
                Duration::from_secs(7 * 24 * 3600),
            );
        }
        if let Some(d) = self.drain_max_duration {
            v.duration_in(
                "drainMaxDuration",
                d,
                Duration::ZERO,
                Duration::from_secs(7 * 24 * 3600),
            );
        }
        v.duration_in(
            "shutdownGrace",
            self.shutdown_grace,
            Duration::ZERO,
            Duration::from_secs(3600),
        );
        v.check(
            (1024..=16 * 1024 * 1024).contains(&self.buffer_size),
            "bufferSize",
            format!(
                "{} is out of range: expected between 1024 and 16777216 bytes",
                self.buffer_size
            ),
        );
        v.check(
            self.workers <= MAX_WORKERS,
            "workers",
            format!(
                "{} is out of range: expected between 0 (one per CPU) and {MAX_WORKERS}",
                self.workers
            ),
        );
    }
}

impl ProxyConfig {
    /// When a pending connect gets a second one raced beside it; `None`
    /// when hedging is off.
    pub(super) fn hedge_after(&self) -> Option<Duration> {
        (!self.connect_hedge_after.is_zero()).then_some(self.connect_hedge_after)
    }
}

impl Validate for KeepaliveConfig {
    fn validate(&self, v: &mut Validator) {
        if !self.enabled {
            return;
        }
        // The kernel takes whole seconds for both.
        let secs = Duration::from_secs(1)..=Duration::from_secs(32_767);
        v.check(
            secs.contains(&self.idle),
            "idle",
            "out of range: expected between 1s and 32767s",
        );
        v.check(
            secs.contains(&self.interval),
            "interval",
            "out of range: expected between 1s and 32767s",
        );
        v.check(
            (1..=127).contains(&self.count),
            "count",
            format!("{} is out of range: expected between 1 and 127", self.count),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        assert!(bulwark_common::config::validate_at("proxy", &ProxyConfig::default()).is_empty());
    }

    #[test]
    fn camel_case_with_durations_and_unknown_fields_refused() {
        let c: ProxyConfig = serde_json::from_str(
            r#"{"connectTimeout":"250ms","idleTimeout":"1h","tcpKeepalive":{"idle":"10s"}}"#,
        )
        .unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.tcp_keepalive.idle, Duration::from_secs(10));
        assert_eq!(c.tcp_keepalive.count, 3);
        let e = serde_json::from_str::<ProxyConfig>(r#"{"idletimeout":"1s"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `idletimeout`"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let c = ProxyConfig {
            connect_hedge_after: Duration::from_secs(61),
            connect_attempts: 0,
            max_connections: 0,
            buffer_size: 10,
            workers: 1000,
            idle_timeout: Some(Duration::from_millis(5)),
            tcp_keepalive: KeepaliveConfig {
                count: 0,
                ..Default::default()
            },
            ..Default::default()
        };
        let errs: Vec<String> = bulwark_common::config::validate_at("proxy", &c)
            .iter()
            .map(ToString::to_string)
            .collect();
        let fields: Vec<&str> = errs
            .iter()
            .map(|e| e.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            fields,
            [
                "proxy.connectHedgeAfter",
                "proxy.connectAttempts",
                "proxy.maxConnections",
                "proxy.tcpKeepalive.count",
                "proxy.idleTimeout",
                "proxy.bufferSize",
                "proxy.workers"
            ],
            "{errs:?}"
        );
    }
}
