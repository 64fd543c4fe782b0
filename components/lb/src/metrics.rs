//! Every `bulwark_lb_*` metric, declared once: its `# HELP` text and the
//! series that exist from the start ([`bulwark_common::telemetry::catalog`]).
//!
//! Per-listener series (`listener` label) are created when the listener
//! starts and per-backend series (`backend` label) when the backend is
//! published, so they too exist at zero before their first event. Label
//! values are the CLI's words: verdicts are `up`, `not_ready`, `down`,
//! `unknown`, as `bulwarkctl lb status` and `bulwarkctl health` print them.

use bulwark_common::telemetry::catalog::{self, MetricDef, MetricKind::*};
use bulwark_common::telemetry::scrape::Publish;

use crate::health::VERDICT_LABELS;

/// The catalogue.
pub const DEFS: &[MetricDef] = &[
    // Raft and the VIP.
    MetricDef::single(
        "bulwark_lb_is_leader",
        Gauge,
        "1 while this node is the Raft leader.",
    ),
    MetricDef::single(
        "bulwark_lb_term",
        Gauge,
        "The Raft term this node last saw.",
    ),
    MetricDef::single(
        "bulwark_lb_elections_total",
        Counter,
        "Raft term changes seen by this node (each is an election).",
    ),
    MetricDef::single(
        "bulwark_lb_vip_held",
        Gauge,
        "1 while this node holds the VIP; summed over nodes it must never exceed 1.",
    ),
    MetricDef::single(
        "bulwark_lb_vip_acquisitions_total",
        Counter,
        "Times this node took the VIP.",
    ),
    MetricDef::per_label(
        "bulwark_lb_vip_releases_total",
        Counter,
        "Times this node released the VIP, by reason.",
        "reason",
        &[
            "lease_expired",
            "lost_leadership",
            "handover",
            "readd_failed",
        ],
    ),
    MetricDef::single(
        "bulwark_lb_vip_renew_failures_total",
        Counter,
        "arp mode: failed renewals of the VIP address's kernel lifetime (the VIP is kept and the renewal retried).",
    ),
    MetricDef::single(
        "bulwark_lb_vip_readded_total",
        Counter,
        "arp mode: times the VIP address was found missing while held and added again.",
    ),
    MetricDef::single(
        "bulwark_lb_vip_watchdog_releases_total",
        Counter,
        "arp and bgp mode: times the lease watchdog deleted the VIP because the VIP task had not released it one check interval after its lease ran out (a busy or stalled node).",
    ),
    MetricDef::single(
        "bulwark_lb_fence_claim_delay_seconds",
        Gauge,
        "How long this node, elected in a normal election now, would wait before taking the VIP: the longest hold among the nodes it knows of (their lease, check interval, clock drift and release budget), less the shortest electionTimeoutMax. 0 with the same default timers on every node.",
    ),
    MetricDef::single(
        "bulwark_lb_fence_peers_differing",
        Gauge,
        "Peers, heard of in the last minute over Raft, whose fence timers (vip.lease, vip.checkInterval, vip.clockDrift, vip.releaseBudget, raft.electionTimeoutMax) differ from this node's; claims then wait out the longest hold. Expected during a rolling change of those settings only.",
    ),
    MetricDef::single(
        "bulwark_lb_vip_tickles_sent_total",
        Counter,
        "Tickle ACKs this node sent, right after taking the VIP, to the previous holder's clients (two rounds per failover), so their connections are reset at once.",
    ),
    MetricDef::single(
        "bulwark_lb_vip_tickle_failures_total",
        Counter,
        "Tickle ACKs that could not be sent (no CAP_NET_RAW, a send error); those clients wait for their own timeouts.",
    ),
    MetricDef::single(
        "bulwark_lb_vip_refusal_filter_installed",
        Gauge,
        "arp and bgp mode with vip.dropRefusals: 1 while the nftables rule that drops the kernel's connection refusals from VIP:port is installed, 0 when it could not be (no nf_tables, no CAP_NET_ADMIN): clients of a killed holder are then refused until the next holder announces the VIP.",
    ),
    MetricDef::single(
        "bulwark_lb_realtime_priority",
        Gauge,
        "The SCHED_RR priority the threads running Raft, the VIP, health and the API run at now (realtimePriority, default 0); 0 when it is off, the kernel refused it (no SYS_NICE capability), or they used more than their budget of half a core and run as ordinary threads for the moment.",
    ),
    MetricDef::single(
        "bulwark_lb_realtime_demotions_total",
        Counter,
        "Times the real-time control threads used more than half a core for two seconds and were run as ordinary threads (real-time again after a minute under it): a bug or an overload in the control plane, see the log.",
    ),
    MetricDef::single(
        "bulwark_lb_vip_clients_shared",
        Gauge,
        "While holding the VIP: the client connections in the table last pushed to the peers.",
    ),
    MetricDef::single(
        "bulwark_lb_vip_clients_omitted",
        Gauge,
        "While holding the VIP: client connections left out of the shared table (bounded at 65,536); they get no tickle after a failover.",
    ),
    MetricDef::single(
        "bulwark_lb_vip_clients_received",
        Gauge,
        "Client connections in the latest table the VIP holder pushed to this node (what it would tickle on taking the VIP over).",
    ),
    MetricDef::single(
        "bulwark_lb_vip_client_share_failures_total",
        Counter,
        "Pushes of the holder's client table to a peer that failed (the next change or refresh tries again).",
    ),
    MetricDef::single(
        "bulwark_lb_failover_detect_seconds",
        Histogram,
        "Failovers: from the old leader's last contact to this node's election.",
    ),
    MetricDef::single(
        "bulwark_lb_failover_move_seconds",
        Histogram,
        "Failovers: from election to the VIP announced by this node.",
    ),
    MetricDef::single(
        "bulwark_lb_failover_duration_seconds",
        Histogram,
        "Failovers: detection plus move, the client-visible part bulwark controls.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_bgp_session_established",
        Gauge,
        "bgp mode: 1 while the BGP session with the peer (address:port) is established, on every node.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_bgp_announced_prefixes",
        Gauge,
        "bgp mode: VIP host routes this node announces to the peer; summed over nodes, per peer, at most the VIP's families.",
    ),
    MetricDef::single(
        "bulwark_lb_bgp_announces_total",
        Counter,
        "bgp mode: times this node, as holder, asked its sessions to announce the VIP.",
    ),
    MetricDef::single(
        "bulwark_lb_bgp_withdrawals_total",
        Counter,
        "bgp mode: times this node asked its sessions to withdraw the VIP (release, or its local address lost).",
    ),
    MetricDef::dynamic(
        "bulwark_lb_bfd_session_up",
        Gauge,
        "bgp mode with BFD: 1 while the BFD session with the peer (address) is Up, on every node.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_bfd_session_down_total",
        Counter,
        "bgp mode with BFD: times the BFD session with the peer (address) left Up; each takes that BGP session down.",
    ),
    MetricDef::single(
        "bulwark_lb_bfd_discarded_total",
        Counter,
        "bgp mode with BFD: received BFD packets discarded (TTL not 255, malformed, unknown sender or discriminator).",
    ),
    // The data path.
    MetricDef::single(
        "bulwark_lb_backends_routable",
        Gauge,
        "Backends that take new connections on this node (not drained, verdict up or unknown).",
    ),
    MetricDef::single(
        "bulwark_lb_fail_open",
        Gauge,
        "1 while no backend is routable by verdict and every active backend is tried (fail-open).",
    ),
    MetricDef::single(
        "bulwark_lb_zone_spillover",
        Gauge,
        "1 while a zone-preferring listener sends new connections outside this node's zone because the zone runs short.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_connections_active",
        Gauge,
        "Open proxied connections, by backend.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_connections_total",
        Counter,
        "Proxied connections established, by backend.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_bytes_in_total",
        Counter,
        "Bytes from clients to the backend, by backend.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_bytes_out_total",
        Counter,
        "Bytes from the backend to clients, by backend.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_connect_errors_total",
        Counter,
        "Failed connects to a backend, by backend and reason (retried on another backend; overtaken: still pending when a later connect to another backend succeeded).",
    ),
    MetricDef::dynamic(
        "bulwark_lb_backend_retries_total",
        Counter,
        "Connections that left this backend for another after a failed connect, by backend.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_backend_avoided_total",
        Counter,
        "Times new connections started to avoid this backend after a failed connect to it (one trial connection a second until a connect succeeds), by backend.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_connections_accepted_total",
        Counter,
        "Client connections accepted, by listener.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_accept_errors_total",
        Counter,
        "Failed accepts, by listener and reason (resources: out of descriptors or memory).",
    ),
    MetricDef::dynamic(
        "bulwark_lb_max_connections_reached_total",
        Counter,
        "Client connections refused at proxy.maxConnections, by listener.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_retries_total",
        Counter,
        "Connect retries on another backend, by listener.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_connect_hedges_total",
        Counter,
        "Second connects raced beside one still pending after proxy.connectHedgeAfter, on another backend, by listener.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_first_flight_replays_total",
        Counter,
        "Client first flights replayed to another backend because the backend closed or reset before its first byte, by listener.",
    ),
    MetricDef::dynamic(
        "bulwark_lb_connections_failed_total",
        Counter,
        "Client connections closed because no backend could be connected, by listener and reason.",
    ),
    // Health.
    MetricDef::dynamic(
        "bulwark_lb_backend_verdict",
        Gauge,
        "1 for the backend's committed verdict (up, not_ready, down, unknown), 0 for the others.",
    ),
    MetricDef::single(
        "bulwark_lb_zones_down",
        Gauge,
        "Zones whose every backend is down by committed verdict.",
    ),
    MetricDef::per_label(
        "bulwark_lb_verdict_changes_total",
        Counter,
        "Verdict changes committed by this node as leader, by new verdict.",
        "to",
        VERDICT_LABELS,
    ),
    MetricDef::per_label(
        "bulwark_lb_probe_reports_total",
        Counter,
        "Prober reports received by this node as leader, by kind.",
        "kind",
        &["full", "changes", "heartbeat"],
    ),
    MetricDef::single(
        "bulwark_lb_probers",
        Gauge,
        "Probers reporting to this node as leader.",
    ),
    MetricDef::single(
        "bulwark_lb_probers_isolated",
        Gauge,
        "Probers whose votes are ignored because they see every backend down while others do not.",
    ),
    MetricDef::single(
        "bulwark_lb_probers_stale",
        Gauge,
        "Probers whose last report is too old to count.",
    ),
];

/// Declares the catalogue, the build info and the certificate expiry of
/// the node's identities. Call once at start, before the node runs.
pub fn register(config: &crate::config::LbConfig) {
    catalog::register(DEFS);
    catalog::register_build_info("lb", env!("CARGO_PKG_VERSION"));
    let files: Vec<_> = config.certificates().into_iter().map(|(_, f)| f).collect();
    catalog::register_certificates("lb", &files);
    publish_scheduling();
    static SCHEDULING: std::sync::OnceLock<std::sync::Arc<Scheduling>> = std::sync::OnceLock::new();
    let source = SCHEDULING.get_or_init(|| std::sync::Arc::new(Scheduling));
    let weak = std::sync::Arc::downgrade(source) as std::sync::Weak<dyn Publish>;
    bulwark_common::telemetry::scrape::publish_on_scrape(weak);
}

/// The control threads' policy, which the real-time guard may change at any
/// time: read when `/metrics` is scraped.
struct Scheduling;

impl Publish for Scheduling {
    fn publish(&self) {
        publish_scheduling();
    }
}

fn publish_scheduling() {
    metrics::gauge!("bulwark_lb_realtime_priority")
        .set(f64::from(bulwark_common::sched::applied()));
    metrics::counter!("bulwark_lb_realtime_demotions_total")
        .absolute(bulwark_common::sched::demotions());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the code records is in the catalogue, and nothing
    /// else is: the names come from the source files themselves.
    #[test]
    fn the_catalogue_lists_exactly_the_recorded_metrics() {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        catalog::check_against_sources(DEFS, src.as_ref(), "bulwark_lb_").unwrap();
    }
}
