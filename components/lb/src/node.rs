//! One bulwark-lb node, wired together: `run(config, listeners, shutdown)`,
//! and [`Lb`], the daemon the shared `main` (`bulwark_common::daemon::main`)
//! runs.
//!
//! The caller binds every listener ([`Listeners::bind`] in `main`, port 0
//! in tests), so several nodes can run in one process. What runs:
//!
//! - the Raft node over the redb store, its gRPC service (LB peers only),
//!   and the bootstrap protocol;
//! - the publisher: every applied state becomes a new backend snapshot for
//!   the data path (versioned by the applied log index);
//! - the seeder: a leader proposes the configured backends once; and the
//!   drift watch, which logs where this node's lb.yaml and the registry
//!   part (both in `raft::seed`);
//! - the VIP task (bind or arp mode) and, in arp mode, the front listener
//!   on VIP:port that every node keeps;
//! - the node-local proxy listener, when configured;
//! - health aggregation ([`HealthService`]: on the leader, probers'
//!   reports become committed verdict changes);
//! - the operator API, `ProbeReports`, and the admin server (`/readyz`:
//!   store open and a leader known).
//!
//! Shutdown (the first SIGTERM): the VIP is released first, then a leader
//! hands leadership to the most up-to-date voter and waits briefly for it,
//! then Raft stops, and only then the gRPC servers (the transfer needs
//! them).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulwark_api::lb::v1::backend_watch_server::BackendWatchServer;
use bulwark_api::lb::v1::load_balancer_server::LoadBalancerServer;
use bulwark_api::lb::v1::probe_reports_server::ProbeReportsServer;
use bulwark_api::raft::v1::raft_server::RaftServer;
use bulwark_common::admin::Health;
use bulwark_common::daemon::Daemon;
use bulwark_common::grpc::GrpcServer;
use bulwark_common::listen;
use bulwark_common::shutdown::{Shutdown, next_change};
use bulwark_common::telemetry::LoggingConfig;
use bulwark_common::telemetry::scrape::Publish;
use bulwark_common::tls::TlsMaterial;
use bulwark_common::tls::reload::spawn_follow;
use openraft::async_runtime::WatchReceiver;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::backends::Backends;
use crate::config::{LbConfig, VipMode};
use crate::health::HealthService;
use crate::raft::Raft;
use crate::raft::membership::{self, Bootstrap};
use crate::raft::network::{ClusterId, Network};
use crate::raft::seed;
use crate::raft::server::{RaftService, Signals};
use crate::raft::store::{StateMachineStore, Store};
use crate::raft::timers::PeerTimers;
use crate::raft::types::LbNode;
use crate::vip::arp::{ArpVip, bind_front};
use crate::vip::bgp::BgpVip;
use crate::vip::bind::BindVip;
use crate::vip::{Actuator, VipHandle, VipTask};

/// The listeners a node serves, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The Raft service.
    pub raft: TcpListener,
    /// The operator API.
    pub api: TcpListener,
    /// `/livez`, `/readyz`, `/metrics`, `/debug/workers`.
    pub admin: Option<TcpListener>,
    /// The node-local proxy listener.
    pub local: Option<TcpListener>,
    /// arp and bgp mode: the front listener on VIP:port (bound with IP_FREEBIND),
    /// one per address of a dual-stack VIP.
    pub front: Vec<TcpListener>,
}

impl Listeners {
    /// Binds everything the configuration names.
    pub async fn bind(config: &LbConfig) -> anyhow::Result<Self> {
        let mut front = Vec::new();
        if matches!(config.vip.mode, VipMode::Arp | VipMode::Bgp) {
            for addr in config.vip.socket_addrs() {
                let std = bind_front(addr)
                    .map_err(|e| listen::explained(e, addr.port()))
                    .with_context(|| {
                        format!("binding the front listener on {addr} (IP_FREEBIND)")
                    })?;
                front.push(TcpListener::from_std(std)?);
            }
        }
        Ok(Self {
            raft: listen::bind(config.raft.address, "Raft").await?,
            api: listen::bind(config.api.address, "API").await?,
            admin: Some(listen::bind(config.admin.address, "admin").await?),
            local: match config.local_listener {
                Some(a) => Some(listen::bind(a, "node-local proxy").await?),
                None => None,
            },
            front,
        })
    }
}

/// Handles to a running node (tests use them in-process).
#[derive(Clone)]
pub struct Node {
    /// The Raft handle.
    pub raft: Raft,
    /// The applied state.
    pub state: StateMachineStore,
    /// The data path's backend set.
    pub backends: Backends,
    /// The VIP task.
    pub vip: VipHandle,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("state", &self.state).finish()
    }
}

fn openraft_config(config: &LbConfig) -> anyhow::Result<openraft::Config> {
    let ms = |d: Duration| d.as_millis() as u64;
    let c = openraft::Config {
        cluster_name: "bulwark-lb".into(),
        heartbeat_interval: ms(config.raft.heartbeat_interval),
        election_timeout_min: ms(config.raft.election_timeout_min),
        election_timeout_max: ms(config.raft.election_timeout_max),
        // A node cut off while the others carried on must not depose the
        // leader with an inflated term when it comes back.
        enable_pre_vote: Some(true),
        // A restarted leader runs an election like anyone else: resuming
        // leadership from disk would skip the voters' lease wait that VIP
        // fencing relies on.
        enable_leader_restore: Some(false),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
            config.raft.snapshot_every_entries,
        ),
        // A follower a little behind catches up from the log; one further
        // behind (or a new member) gets the snapshot.
        max_in_snapshot_log_to_keep: config.raft.snapshot_every_entries.min(100),
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    c.validate().context("Raft timers")
}

/// Starts a node. Tasks run under `shutdown`; the returned handles stay
/// valid until it completes.
pub async fn run(
    config: LbConfig,
    listeners: Listeners,
    shutdown: &Shutdown,
) -> anyhow::Result<Node> {
    bulwark_common::tls::install_crypto_provider();
    let node_id = config.node_id;
    let tls = Arc::new(config.tls.load().context("loading TLS material")?);
    spawn_follow(TlsMaterial::clone(&tls), "lb", shutdown);
    let health = Health::new();
    health.set_ready("raft", Err("no leader known yet".into()));

    let gate = front_gate(&config);
    let stale_checked = remove_stale_vip(&config, &gate).await?;

    let store = Store::open(&config.data_dir)?;
    let cluster = ClusterId::new(store.cluster_id().await?);
    let sm = store.state_machine().await?;
    tracing::info!(node = node_id, store = %store.path().display(), cluster = ?cluster.get(), applied = sm.current().applied_index(), "store open");

    let signals = Arc::new(Signals::new(peer_timers(&config)));
    let (vip, inbox) = crate::vip::channel();
    let raft = start_raft(&config, &tls, (&cluster, &signals), &vip, &store, &sm).await?;

    // The servers stop last: a leader's shutdown hands over through them.
    let servers = CancellationToken::new();

    // Client tables the VIP holder shares, for this node's tickles after
    // it takes the VIP over.
    let received = crate::clients::Received::new();
    let service = RaftService::new(&config, &raft, &store, &cluster, &signals)
        .with_received_clients(received.clone());
    spawn_raft_server(shutdown, service, listeners.raft, &tls, &config, &servers);
    spawn_elector(shutdown, &config, &raft, &signals);

    let backends = Backends::new(config.routing_policy());
    shutdown.spawn_critical(
        "publisher",
        publish(sm.clone(), backends.clone(), shutdown.token()),
    );

    let proxy = Arc::new(config.proxy.clone());
    let this = local_member(&config);

    // The VIP.
    if let Some(actuator) = vip_actuator(&config, &backends, &proxy, stale_checked) {
        let tickles = spawn_sharer(
            shutdown,
            &config,
            (&raft, &vip),
            &gate,
            received,
            (&tls, &cluster),
        );
        spawn_vip(shutdown, actuator, inbox, &config, &raft, &signals, tickles);
    }
    spawn_proxies(
        shutdown,
        &config,
        (listeners.front, listeners.local),
        &backends,
        &proxy,
        &gate,
    );

    // Health aggregation (active while this node leads).
    let health_service = spawn_health(shutdown, &config, &raft, &sm);

    // The API.
    let api = Api::new(
        &config,
        this,
        &raft,
        &sm,
        &backends,
        &vip,
        &tls,
        (&cluster, signals.timers()),
        health_service,
    );
    spawn_api_server(shutdown, api, listeners.api, &tls, &config, &servers);

    if let Some(admin) = listeners.admin {
        spawn_admin(shutdown, admin, &health, &servers);
    }

    // Critical: a /readyz nobody updates any more would lie.
    shutdown.spawn_critical(
        "readiness",
        readiness(raft.clone(), node_id, health, shutdown.token()),
    );
    shutdown.spawn(
        "seeder",
        seed::seed(raft.clone(), sm.clone(), config.clone(), shutdown.token()),
    );
    shutdown.spawn(
        "backend-drift",
        seed::watch_drift(sm.clone(), config.backends.clone(), shutdown.token()),
    );
    spawn_bootstrap(shutdown, &config, &raft, &store, &cluster, &tls);
    shutdown.spawn_critical(
        "lifecycle",
        lifecycle(
            raft.clone(),
            node_id,
            shutdown.token(),
            servers,
            config.raft.election_timeout_max,
        ),
    );

    Ok(Node {
        raft,
        state: sm,
        backends,
        vip,
    })
}

/// The front listeners' gate. arp and bgp mode: they accept only while
/// the VIP task holds the VIP, and it resets their clients before it lets
/// go; with tickles they also keep their client table.
fn front_gate(config: &LbConfig) -> crate::proxy::FrontGate {
    let tickling =
        matches!(config.vip.mode, VipMode::Arp | VipMode::Bgp) && config.vip.tickle_clients;
    if tickling {
        crate::proxy::FrontGate::tracking_clients()
    } else {
        crate::proxy::FrontGate::new()
    }
}

/// The data path: one front listener per VIP address (two for a
/// dual-stack VIP), accepting while the gate is open, and the node-local
/// listener.
fn spawn_proxies(
    shutdown: &Shutdown,
    config: &LbConfig,
    (fronts, local): (Vec<TcpListener>, Option<TcpListener>),
    backends: &Backends,
    proxy: &Arc<crate::proxy::ProxyConfig>,
    gate: &crate::proxy::FrontGate,
) {
    for front in fronts {
        let (b, p, t, g) = (
            backends.with_mode(config.routing.vip),
            proxy.clone(),
            shutdown.token(),
            gate.clone(),
        );
        shutdown.spawn_critical("front-proxy", async move {
            crate::proxy::serve_front(front, b, p, t, g)
                .await
                .context("front listener")
        });
    }
    if let Some(local) = local {
        let (b, p, t) = (
            backends.with_mode(config.routing.local),
            proxy.clone(),
            shutdown.token(),
        );
        shutdown.spawn_critical("local-proxy", async move {
            crate::proxy::serve(local, b, p, t)
                .await
                .context("node-local listener")
        });
    }
}

/// The table of the peers' fence timers, published on every scrape.
fn peer_timers(config: &LbConfig) -> Arc<PeerTimers> {
    let timers = Arc::new(PeerTimers::new(
        config.node_id,
        &config.vip.timing(&config.raft),
    ));
    let weak = Arc::downgrade(&timers) as std::sync::Weak<dyn Publish>;
    bulwark_common::telemetry::scrape::publish_on_scrape(weak);
    timers
}

/// Starts the Raft node over the open store.
async fn start_raft(
    config: &LbConfig,
    tls: &Arc<bulwark_common::tls::TlsMaterial>,
    (cluster, signals): (&ClusterId, &Arc<Signals>),
    vip: &VipHandle,
    store: &Store,
    sm: &StateMachineStore,
) -> anyhow::Result<Raft> {
    let network = Network::new(
        tls.clone(),
        cluster.clone(),
        Arc::new(vip.clone()),
        signals.timers().clone(),
    );
    Raft::new(
        config.node_id,
        Arc::new(openraft_config(config)?),
        network,
        store.log_store(),
        sm.clone(),
    )
    .await
    .context("starting Raft")
}

/// A run of this node killed while holding the VIP left the address on
/// the interface, and the front listener (bound before `run`) accepts on
/// it: remove it before anything else, this node leads nothing yet.
/// Returns the actuator of arp and bgp mode, checked and ready (bgp
/// mode's sessions start here: followers keep theirs up too).
async fn remove_stale_vip(
    config: &LbConfig,
    gate: &crate::proxy::FrontGate,
) -> anyhow::Result<Option<Actuator>> {
    let (mode, Some(addr)) = (config.vip.mode, config.vip.socket_addr()) else {
        return Ok(None);
    };
    let (interface, announcements) = match mode {
        VipMode::Arp => (
            config
                .vip
                .interface
                .clone()
                .context("vip.interface is required in arp mode")?,
            config.vip.garp_count,
        ),
        // BGP announces; the address is only bound locally.
        VipMode::Bgp => (config.vip.bgp_interface().to_owned(), 0),
        VipMode::Disabled | VipMode::Bind => return Ok(None),
    };
    let mut arp = ArpVip::new(
        interface,
        config.vip.addresses(),
        announcements,
        config.vip.garp_interval,
        config.vip.address_lifetime(),
        config.vip.check_interval,
    )?;
    arp.gate_front(gate.clone(), config.vip.release_budget);
    if arp.remove_stale().await.context("removing a stale VIP")? {
        tracing::warn!(vip = %addr.ip(), "removed the VIP a previous run left on the interface");
    }
    if mode == VipMode::Arp {
        return Ok(Some(Actuator::Arp(arp)));
    }
    let bgp = config
        .vip
        .bgp
        .as_ref()
        .context("vip.bgp is required in bgp mode")?;
    let speaker = crate::vip::bgp::session::LocalConfig {
        asn: bgp.local_asn,
        router_id: bgp
            .router_id(&config.raft)
            .context("vip.bgp.routerId is required: raft.address is not IPv4")?,
        prefixes: config
            .vip
            .addresses()
            .iter()
            .map(|a| crate::vip::bgp::codec::Prefix::host(a.ip))
            .collect(),
    };
    Ok(Some(Actuator::Bgp(BgpVip::new(
        arp,
        speaker,
        bgp.peer_configs(),
        config.vip.release_budget,
    ))))
}

/// How this node describes itself to the cluster (its member entry).
fn local_member(config: &LbConfig) -> LbNode {
    LbNode {
        name: config.node_name(),
        raft_address: config.raft.advertised(),
        api_address: config.api.advertised(),
        proxy_address: config
            .local_listener
            .map(|a| a.to_string())
            .unwrap_or_default(),
        zone: config.zone.clone(),
    }
}

/// The VIP actuator the configuration asks for: bind mode builds one, arp
/// and bgp mode use the one [`remove_stale_vip`] checked; none without a
/// VIP.
fn vip_actuator(
    config: &LbConfig,
    backends: &Backends,
    proxy: &Arc<crate::proxy::ProxyConfig>,
    stale_checked: Option<Actuator>,
) -> Option<Actuator> {
    match (config.vip.mode, config.vip.socket_addr()) {
        (VipMode::Bind, Some(addr)) => Some(Actuator::Bind(BindVip::new(
            addr,
            backends.with_mode(config.routing.vip),
            proxy.clone(),
        ))),
        (VipMode::Arp | VipMode::Bgp, Some(_)) => stale_checked,
        _ => None,
    }
}

/// Serves the Raft service (LB peers only) until `servers` is cancelled.
fn spawn_raft_server(
    shutdown: &Shutdown,
    raft_service: RaftService,
    listener: TcpListener,
    tls: &Arc<bulwark_common::tls::TlsMaterial>,
    config: &LbConfig,
    servers: &CancellationToken,
) {
    let (tls, access, token) = (tls.clone(), config.access.clone(), servers.clone());
    let server = GrpcServer::new().add_service(
        RaftServer::new(raft_service)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024),
    );
    shutdown.spawn_critical("raft-grpc", async move {
        server
            .serve(listener, &tls, access, token)
            .await
            .context("Raft gRPC server")
    });
}

/// A follower's campaign as soon as the silent leader's lease runs out
/// (`raft/elector.rs`); followers take turns one heartbeat apart.
fn spawn_elector(shutdown: &Shutdown, config: &LbConfig, raft: &Raft, signals: &Arc<Signals>) {
    shutdown.spawn(
        "elector",
        crate::raft::elector::run(
            raft.clone(),
            config.node_id,
            signals.clone(),
            config.raft.election_timeout_max,
            config.raft.heartbeat_interval,
            shutdown.token(),
        ),
    );
}

/// When the gate keeps a client table (arp and bgp mode with
/// `vip.tickleClients`): shares it with the peers while this node holds
/// the VIP (a task that may fail without stopping the node: tickles are a
/// hint), and returns what the VIP task needs to tickle the previous
/// holder's clients after a claim.
fn spawn_sharer(
    shutdown: &Shutdown,
    config: &LbConfig,
    (raft, vip): (&Raft, &VipHandle),
    gate: &crate::proxy::FrontGate,
    received: crate::clients::Received,
    (tls, cluster): (&Arc<TlsMaterial>, &ClusterId),
) -> Option<crate::vip::Tickles> {
    let table = gate.clients()?;
    let sharer = crate::clients::share::Sharer {
        node_id: config.node_id,
        raft: raft.clone(),
        vip: vip.clone(),
        table: table.clone(),
        tls: tls.clone(),
        cluster: cluster.clone(),
    };
    shutdown.spawn("vip-clients", sharer.run(shutdown.token()));
    Some(crate::vip::Tickles {
        received,
        own: table.clone(),
        vips: config.vip.addresses().iter().map(|a| a.ip).collect(),
    })
}

/// Runs the VIP task: it holds the VIP while this node leads.
fn spawn_vip(
    shutdown: &Shutdown,
    actuator: Actuator,
    inbox: crate::vip::VipInbox,
    config: &LbConfig,
    raft: &Raft,
    signals: &Arc<Signals>,
    tickles: Option<crate::vip::Tickles>,
) {
    let mut task = VipTask::new(
        inbox,
        config.node_id,
        raft.clone(),
        config.vip.timing(&config.raft),
        actuator,
        signals.clone(),
    )
    .with_worker(shutdown.worker(crate::vip::WORKER));
    if let Some(t) = tickles {
        task = task.with_tickles(t);
    }
    let token = shutdown.token();
    let filter = refusal_filter(config);
    shutdown.spawn_critical(crate::vip::WORKER, async move {
        let ended = task.run(token).await;
        // After the release: refusals while the front closes are dropped
        // too, and its clients retry onto the next holder.
        if let Some(f) = filter {
            f.remove();
        }
        ended
    });
}

/// arp and bgp mode with `vip.dropRefusals`: the nftables rule that keeps
/// a killed holder's lingering address from refusing connects
/// ([`crate::vip::refusals`]). Without it (no nf_tables, no CAP_NET_ADMIN)
/// the node runs on, and says what clients will see.
fn refusal_filter(config: &LbConfig) -> Option<crate::vip::refusals::Filter> {
    let wanted = match (config.vip.mode, config.vip.socket_addr()) {
        (VipMode::Arp | VipMode::Bgp, Some(addr)) if config.vip.drop_refusals => Some(addr),
        _ => None,
    };
    let Some(addr) = wanted else {
        // A table an earlier run left behind (killed in arp or bgp mode)
        // would keep dropping the refusals that bind mode's release relies
        // on, or that the operator turned back on.
        crate::vip::refusals::remove_leftover();
        return None;
    };
    let ips: Vec<_> = config.vip.addresses().iter().map(|a| a.ip).collect();
    let installed = crate::vip::refusals::Filter::install(&ips, addr.port());
    metrics::gauge!("bulwark_lb_vip_refusal_filter_installed")
        .set(f64::from(u8::from(installed.is_ok())));
    match installed {
        Ok(f) => {
            tracing::info!(
                table = crate::vip::refusals::TABLE,
                port = addr.port(),
                "the VIP's connection refusals are dropped (nftables), so a killed holder's clients retry instead of failing"
            );
            Some(f)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the nftables rule that drops the VIP's connection refusals: after a SIGKILL of the holder, clients get \"connection refused\" until the new holder announces the VIP (vip.dropRefusals)");
            None
        }
    }
}

/// The health aggregator's name as a worker (`/debug/workers`).
pub const HEALTH_WORKER: &str = "health";

/// Runs health aggregation (active while this node leads) and returns
/// the service the API reports from.
fn spawn_health(
    shutdown: &Shutdown,
    config: &LbConfig,
    raft: &Raft,
    sm: &StateMachineStore,
) -> HealthService {
    let health_service = HealthService::new(config.health.clone());
    let worker = shutdown.worker(HEALTH_WORKER);
    shutdown.spawn_critical(
        HEALTH_WORKER,
        health_service.clone().run(
            raft.clone(),
            sm.clone(),
            config.node_id,
            shutdown.token(),
            worker,
        ),
    );
    health_service
}

/// Serves the operator API, `ProbeReports` and `BackendWatch` until
/// `servers` is cancelled.
fn spawn_api_server(
    shutdown: &Shutdown,
    api: Api,
    listener: TcpListener,
    tls: &Arc<bulwark_common::tls::TlsMaterial>,
    config: &LbConfig,
    servers: &CancellationToken,
) {
    let server = GrpcServer::new()
        .add_service(LoadBalancerServer::new(api.clone()))
        .add_service(ProbeReportsServer::new(api.clone()))
        .add_service(BackendWatchServer::new(api));
    let (tls, access, token) = (tls.clone(), config.access.clone(), servers.clone());
    shutdown.spawn_critical("api-grpc", async move {
        server
            .serve(listener, &tls, access, token)
            .await
            .context("API gRPC server")
    });
}

/// Serves `/livez`, `/readyz` and `/metrics` until `servers` is cancelled.
fn spawn_admin(
    shutdown: &Shutdown,
    admin: TcpListener,
    health: &Health,
    servers: &CancellationToken,
) {
    let (h, token) = (health.clone(), servers.clone());
    let metrics = bulwark_common::telemetry::metrics_handle();
    let workers = shutdown.workers().clone();
    shutdown.spawn_critical("admin", async move {
        bulwark_common::admin::serve(admin, h, Some(metrics), workers, token)
            .await
            .context("admin server")
    });
}

/// Joins or creates the cluster (the bootstrap protocol) in the background.
fn spawn_bootstrap(
    shutdown: &Shutdown,
    config: &LbConfig,
    raft: &Raft,
    store: &Store,
    cluster: &ClusterId,
    tls: &Arc<bulwark_common::tls::TlsMaterial>,
) {
    let (config, raft, store, cluster, tls, token) = (
        config.clone(),
        raft.clone(),
        store.clone(),
        cluster.clone(),
        tls.clone(),
        shutdown.token(),
    );
    shutdown.spawn("bootstrap", async move {
        match membership::bootstrap(&config, &raft, &store, &cluster, &tls, &token).await? {
            Bootstrap::Refused => tracing::error!(
                "not creating a cluster: it already exists without this node's data; add this node with bulwarkctl lb add-member"
            ),
            outcome => tracing::debug!(?outcome, "bootstrap"),
        }
        Ok(())
    });
}

/// Publishes every applied state to the data path.
async fn publish(
    sm: StateMachineStore,
    backends: Backends,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut rx = sm.subscribe();
    loop {
        let state = rx.borrow_and_update().clone();
        if let Err(e) = backends.publish(state.backend_specs(), state.applied_index()) {
            tracing::error!(version = state.applied_index(), error = %e, "backend set refused by the data path");
        }
        crate::health::export_committed(&state);
        if !next_change(&token, rx.changed()).await {
            return Ok(());
        }
    }
}

/// Ready while a leader is known; also exports the Raft role metrics.
/// Follows openraft's server metrics (role, leader, vote), which change
/// only when one of them does, not its full metrics, which are sent
/// again after every heartbeat handled.
async fn readiness(
    raft: Raft,
    node_id: u64,
    health: Health,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut rx = raft.server_metrics();
    let mut last_term = None;
    loop {
        let (leader, term, leading) = {
            let m = rx.borrow_watched();
            let leading = crate::raft::server_leads(&m, node_id);
            (m.current_leader, m.vote.leader_id.term, leading)
        };
        if last_term != Some(term) {
            if last_term.is_some() {
                metrics::counter!("bulwark_lb_elections_total").increment(1);
            }
            last_term = Some(term);
            metrics::gauge!("bulwark_lb_term").set(term as f64);
        }
        metrics::gauge!("bulwark_lb_is_leader").set(f64::from(u8::from(leading)));
        health.set_ready(
            "raft",
            match leader {
                Some(_) => Ok(()),
                None => Err("no leader known".into()),
            },
        );
        if !next_change(&token, rx.changed()).await {
            return Ok(());
        }
    }
}

/// Graceful shutdown in order: VIP (the VIP task releases on the same
/// token), leadership, Raft, servers.
async fn lifecycle(
    raft: Raft,
    node_id: u64,
    token: CancellationToken,
    servers: CancellationToken,
    election_timeout_max: Duration,
) -> anyhow::Result<()> {
    token.cancelled().await;
    let m = raft.metrics().borrow_watched().clone();
    if crate::raft::leads(&m, node_id) {
        let target = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != node_id)
            .max_by_key(|v| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(v).cloned().flatten())
                    .map_or(0, |l| l.index)
            });
        if let Some(to) = target {
            tracing::info!(to, "shutting down: handing leadership over");
            if raft.trigger().transfer_leader(to).await.is_ok() {
                let mut rx = raft.metrics();
                let _ = tokio::time::timeout(election_timeout_max * 4, async {
                    loop {
                        if rx.borrow_watched().current_leader != Some(node_id) {
                            return;
                        }
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                })
                .await;
            }
        }
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "Raft did not stop cleanly");
    }
    servers.cancel();
    Ok(())
}

/// `bulwark-lb` as the shared daemon `main` runs it.
#[derive(Debug)]
pub enum Lb {}

impl Daemon for Lb {
    const NAME: &'static str = "bulwark-lb";
    type Config = LbConfig;
    type Listeners = Listeners;

    fn logging(config: &LbConfig) -> &LoggingConfig {
        &config.logging
    }

    fn grace(config: &LbConfig) -> Duration {
        config.shutdown_grace
    }

    fn register_metrics(config: &LbConfig) {
        crate::metrics::register(config);
    }

    fn realtime_priority(config: &LbConfig) -> u8 {
        config.realtime_priority
    }

    fn span(config: &LbConfig) -> tracing::Span {
        tracing::info_span!("lb", node = config.node_id)
    }

    async fn bind(config: &LbConfig) -> anyhow::Result<Listeners> {
        Listeners::bind(config).await
    }

    async fn run(
        config: LbConfig,
        listeners: Listeners,
        shutdown: &Shutdown,
    ) -> anyhow::Result<()> {
        run(config, listeners, shutdown).await.map(drop)
    }
}
