//! `LoadBalancerConfiguration`: everything one bulwark-lb node needs, read
//! from YAML plus flags (see `bulwark_common::config` for precedence).
//!
//! ```yaml
//! apiVersion: bulwark.dev/v1alpha1
//! kind: LoadBalancerConfiguration
//! nodeId: 1
//! name: cp-1
//! zone: zone-a
//! dataDir: /var/lib/bulwark-lb
//! raft:
//!   address: 10.0.0.11:9441
//! api:
//!   address: 10.0.0.11:9442
//! initialMembers:
//!   - {id: 1, name: cp-1, raftAddress: 10.0.0.11:9441, apiAddress: 10.0.0.11:9442}
//!   - {id: 2, name: cp-2, raftAddress: 10.0.0.12:9441, apiAddress: 10.0.0.12:9442}
//!   - {id: 3, name: cp-3, raftAddress: 10.0.0.13:9441, apiAddress: 10.0.0.13:9442}
//! vip:
//!   mode: arp
//!   address: 10.0.0.10
//!   port: 6443
//!   interface: eth0
//!   # address6: fd00::10   # dual-stack: an IPv6 VIP held with the IPv4 one
//! backends:
//!   - {id: cp-1, address: 10.0.0.11:6443, zone: zone-a}
//! health:
//!   zoneQuorum: majority
//!   minVotes: 2
//! ```
//!
//! The timing defaults (heartbeat, election timeout, VIP lease) are chosen
//! together; docs/FAILOVER.md gives the argument and [`VipConfig::timing`]
//! checks the inequality that keeps two holders apart.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use bulwark_common::admin::AdminConfig;
use bulwark_common::authz::{AccessPolicy, IdentityRule};
use bulwark_common::config::{ComponentConfig, Validate, Validator, duration};
use bulwark_common::telemetry::LoggingConfig;
use bulwark_common::tls::{CertFiles, CertUse, TlsFiles};
use serde::{Deserialize, Serialize};

use crate::backends::{RoutingMode, RoutingPolicy};
use crate::health::HealthConfig;
use crate::proxy::ProxyConfig;
use crate::vip::arp::VipAddress;
use crate::vip::fence::FenceTiming;
use crate::vip::iface;

/// The whole configuration of one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LbConfig {
    /// Raft node id of this node: nonzero, unique in the cluster, never
    /// reused for another machine.
    pub node_id: u64,
    /// Human name (normally the host name). Default: `node-<nodeId>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Failure-domain zone of this node; listeners in `zonePreferred` mode
    /// prefer backends in it (see `routing`). Empty: no zone preference.
    #[serde(default)]
    pub zone: String,
    /// Where the Raft log, vote and state machine live (one redb file).
    #[serde(default = "d_data_dir")]
    pub data_dir: PathBuf,
    /// The Raft transport and its timers.
    #[serde(default)]
    pub raft: RaftConfig,
    /// The operator API (`bulwark.lb.v1`).
    #[serde(default = "d_api")]
    pub api: ListenConfig,
    /// mTLS material shared by the Raft transport and the API (server and
    /// client side). Default: kubeadm's layout, `bulwark-lb.{crt,key}`.
    #[serde(default = "d_tls")]
    pub tls: TlsFiles,
    /// Who may call what. `peers` (who may speak Raft) defaults to the
    /// `bulwark:lb` organization.
    #[serde(default = "d_access")]
    pub access: AccessPolicy,
    /// The members the cluster is formed from the first time. Only used
    /// while this node's data dir is empty; see docs/FAILOVER.md
    /// "Bootstrap".
    #[serde(default)]
    pub initial_members: Vec<MemberConfig>,
    /// The virtual IP.
    #[serde(default)]
    pub vip: VipConfig,
    /// Node-local listener every node runs (KubePrism-style), e.g.
    /// `127.0.0.1:7445`. Absent: none.
    #[serde(default)]
    pub local_listener: Option<SocketAddr>,
    /// The data path's settings.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// How each listener chooses a backend; the local zone is `zone` above.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// How probers' reports become verdicts (docs/HEALTH.md).
    #[serde(default)]
    pub health: HealthConfig,
    /// Backends proposed once, by the first leader, when the registry is
    /// empty. Afterwards the registry is what Raft says.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// `/livez`, `/readyz`, `/metrics`, `/debug/workers`.
    #[serde(default = "d_admin")]
    pub admin: AdminConfig,
    /// Logs.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// How long SIGTERM may take before the process exits anyway.
    #[serde(default = "d_shutdown_grace", with = "duration")]
    pub shutdown_grace: Duration,
    /// `SCHED_RR` priority (1-99) of the threads that run Raft, the VIP,
    /// health and the API, so their timers fire on time while the node's
    /// CPUs are busy; the data path's threads stay ordinary. Needs the
    /// `SYS_NICE` capability; without it the node logs a warning and runs
    /// with ordinary threads. Should they use more than half a core for two
    /// seconds, they run as ordinary threads until they have used less for
    /// a minute. Default 0 (ordinary threads): see docs/FAILOVER.md "Timers
    /// on a busy node" before turning it on.
    #[serde(default = "d_realtime_priority")]
    pub realtime_priority: u8,
}

impl ComponentConfig for LbConfig {
    const KIND: &'static str = "LoadBalancerConfiguration";

    /// The one certificate serves Raft and the API and dials peers, so it
    /// needs both usages, both advertised hosts in its SANs, an identity
    /// the peers' `access.peers` rule admits (the same on every node), and
    /// the CA every node trusts as its issuer.
    fn preflight(&self, v: &mut Validator) {
        let raft = bulwark_common::grpc::host_of(&self.raft.advertised());
        let api = bulwark_common::grpc::host_of(&self.api.advertised());
        let mut hosts = vec![("raft.advertiseAddress", raft.clone())];
        if api != raft {
            hosts.push(("api.advertiseAddress", api));
        }
        let want = CertUse {
            server: true,
            client: true,
            hosts,
            identity: self.access.peers.as_ref().map(|p| ("access.peers", p)),
            same_ca: true,
        };
        v.at("tls", |v| self.tls.check(&want, v));
    }
}

impl LbConfig {
    /// When backends are seeded with zones and this node's zone is none of
    /// them, a warning to log (a typo would silently route across zones;
    /// not an error: a node may stand in a zone without an apiserver, and
    /// the registry is what Raft says after the seeding).
    pub fn zone_warning(&self) -> Option<String> {
        let zones: BTreeSet<&str> = self
            .backends
            .iter()
            .map(|b| b.zone.as_str())
            .filter(|z| !z.is_empty())
            .collect();
        (!zones.is_empty() && !self.zone.is_empty() && !zones.contains(self.zone.as_str())).then(
            || {
                let list = zones.iter().copied().collect::<Vec<_>>().join(", ");
                format!(
                    "zone {:?} is not the zone of any configured backend (their zones: {list}); \
                     this node will prefer no backend as local",
                    self.zone
                )
            },
        )
    }

    /// Zone preference on the VIP listener concentrates the whole cluster's
    /// clients in one zone: a warning, not an error (a cluster with several
    /// apiservers per zone and clients in one zone may want it).
    pub fn routing_warning(&self) -> Option<String> {
        let has_vip = self.vip.mode != VipMode::Disabled;
        let concentrates = self.routing.vip == RoutingMode::ZonePreferred && !self.zone.is_empty();
        (has_vip && concentrates).then(|| {
            format!(
                "zonePreferred sends every client that comes through the VIP to the \
                 apiservers of the VIP holder's zone ({:?} while this node holds it), whichever \
                 zone the client is in; with one apiserver per zone, one apiserver carries the \
                 whole cluster while the others idle. Use balanced for the VIP and keep \
                 zonePreferred for the node-local listener (routing.local)",
                self.zone
            )
        })
    }

    /// Every TLS identity this node uses, with the field naming it: what
    /// the expiry metric and `bulwarkctl certs check` read.
    pub fn certificates(&self) -> Vec<(&'static str, CertFiles)> {
        vec![("tls", (&self.tls).into())]
    }

    /// This node's name.
    pub fn node_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("node-{}", self.node_id))
    }

    /// The routing policy for the data path.
    pub fn routing_policy(&self) -> RoutingPolicy {
        RoutingPolicy {
            local_zone: (!self.zone.is_empty()).then(|| self.zone.clone()),
            min_local_healthy_share: self.routing.min_local_healthy_share,
        }
    }

    /// The node that initializes the cluster: the lowest id among the
    /// initial members (every node computes the same one).
    pub fn bootstrapper(&self) -> Option<u64> {
        self.initial_members.iter().map(|m| m.id).min()
    }
}

fn d_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/bulwark-lb")
}
fn d_api() -> ListenConfig {
    ListenConfig {
        address: SocketAddr::from(([0, 0, 0, 0], 9442)),
        advertise_address: None,
    }
}
fn d_tls() -> TlsFiles {
    TlsFiles::kubeadm_default("bulwark-lb")
}
fn d_access() -> AccessPolicy {
    AccessPolicy {
        peers: Some(IdentityRule {
            common_names: Vec::new(),
            organizations: vec!["bulwark:lb".into()],
        }),
        ..AccessPolicy::default()
    }
}
fn d_admin() -> AdminConfig {
    AdminConfig::on_all_addresses(9440)
}
fn d_shutdown_grace() -> Duration {
    Duration::from_secs(15)
}
fn d_realtime_priority() -> u8 {
    0
}

/// A listening gRPC endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenConfig {
    /// Where to listen.
    pub address: SocketAddr,
    /// What peers and clients dial (host:port). Default: `address`, which
    /// then must not be 0.0.0.0 or `::`.
    #[serde(default)]
    pub advertise_address: Option<String>,
}

impl ListenConfig {
    /// The address others use.
    pub fn advertised(&self) -> String {
        self.advertise_address
            .clone()
            .unwrap_or_else(|| self.address.to_string())
    }
}

impl Validate for ListenConfig {
    fn validate(&self, v: &mut Validator) {
        match &self.advertise_address {
            None => v.check(
                !self.address.ip().is_unspecified(),
                "advertiseAddress",
                format!(
                    "required when address is {} (others cannot dial an unspecified address)",
                    self.address
                ),
            ),
            Some(a) => v.check(
                valid_host_port(a),
                "advertiseAddress",
                format!("{a:?} is not host:port"),
            ),
        }
    }
}

/// Whether `s` looks like `host:port` with a nonzero port.
pub fn valid_host_port(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return true;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            // A colon left in the host is an IPv6 address without
            // brackets ("fd00::1:9441"): ambiguous, and no URL can carry it.
            !host.is_empty()
                && !host.contains([':', '[', ']', ' ', '/'])
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

/// The Raft transport and timers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RaftConfig {
    /// Where the Raft service listens. (Spelled out rather than a flattened
    /// [`ListenConfig`]: serde cannot list the valid fields of a struct
    /// with a flattened part, and an operator's typo deserves the list.)
    #[serde(default = "d_raft_address")]
    pub address: SocketAddr,
    /// What peers dial; default `address`.
    #[serde(default)]
    pub advertise_address: Option<String>,
    /// How often the leader sends heartbeats.
    #[serde(default = "d_heartbeat", with = "duration")]
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout.
    #[serde(default = "d_election_min", with = "duration")]
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout. openraft also uses
    /// it as the followers' leader lease: a follower grants no vote for
    /// this long after hearing from the leader.
    #[serde(default = "d_election_max", with = "duration")]
    pub election_timeout_max: Duration,
    /// Build a snapshot (and purge the log before it) every this many
    /// applied entries.
    #[serde(default = "d_snapshot_every")]
    pub snapshot_every_entries: u64,
}

impl RaftConfig {
    fn as_listen(&self) -> ListenConfig {
        ListenConfig {
            address: self.address,
            advertise_address: self.advertise_address.clone(),
        }
    }

    /// The address peers use.
    pub fn advertised(&self) -> String {
        self.as_listen().advertised()
    }
}

fn d_raft_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9441))
}
fn d_heartbeat() -> Duration {
    Duration::from_millis(40)
}
fn d_election_min() -> Duration {
    Duration::from_millis(150)
}
fn d_election_max() -> Duration {
    Duration::from_millis(220)
}
fn d_snapshot_every() -> u64 {
    1000
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            address: d_raft_address(),
            advertise_address: None,
            heartbeat_interval: d_heartbeat(),
            election_timeout_min: d_election_min(),
            election_timeout_max: d_election_max(),
            snapshot_every_entries: d_snapshot_every(),
        }
    }
}

impl Validate for RaftConfig {
    fn validate(&self, v: &mut Validator) {
        self.as_listen().validate(v);
        let ms = Duration::from_millis;
        v.duration_in(
            "heartbeatInterval",
            self.heartbeat_interval,
            ms(10),
            ms(5000),
        );
        v.duration_in(
            "electionTimeoutMin",
            self.election_timeout_min,
            ms(20),
            ms(60_000),
        );
        v.duration_in(
            "electionTimeoutMax",
            self.election_timeout_max,
            ms(20),
            ms(60_000),
        );
        v.check(
            self.election_timeout_min > self.heartbeat_interval * 2,
            "electionTimeoutMin",
            format!(
                "must exceed twice heartbeatInterval ({}), or one late heartbeat starts an election",
                humantime::format_duration(self.heartbeat_interval)
            ),
        );
        v.check(
            self.election_timeout_max > self.election_timeout_min,
            "electionTimeoutMax",
            "must be greater than electionTimeoutMin",
        );
        v.check(
            (10..=10_000_000).contains(&self.snapshot_every_entries),
            "snapshotEveryEntries",
            format!(
                "{} is out of range: expected between 10 and 10000000",
                self.snapshot_every_entries
            ),
        );
    }
}

/// One initial member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemberConfig {
    /// Raft node id.
    pub id: u64,
    /// Host name. Default: `node-<id>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Raft address, host:port.
    pub raft_address: String,
    /// API address, host:port.
    pub api_address: String,
    /// Node-local proxy address; empty when none.
    #[serde(default)]
    pub proxy_address: String,
    /// Zone.
    #[serde(default)]
    pub zone: String,
}

impl Validate for MemberConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(self.id != 0, "id", "must be greater than 0");
        v.check(
            valid_host_port(&self.raft_address),
            "raftAddress",
            format!("{:?} is not host:port", self.raft_address),
        );
        v.check(
            valid_host_port(&self.api_address),
            "apiAddress",
            format!("{:?} is not host:port", self.api_address),
        );
        if !self.proxy_address.is_empty() {
            v.check(
                valid_host_port(&self.proxy_address),
                "proxyAddress",
                format!("{:?} is not host:port", self.proxy_address),
            );
        }
    }
}

/// How the VIP is announced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VipMode {
    /// No VIP: clients use node addresses or the node-local listener.
    #[default]
    Disabled,
    /// The leader opens the front listener on the VIP itself. Needs no
    /// privileges on 127.0.0.0/8; for demos, tests and hosts that route
    /// the VIP some other way.
    Bind,
    /// The leader adds the VIP to `interface` (netlink) and announces it
    /// with gratuitous ARP / unsolicited neighbour advertisements. Every
    /// node keeps a front listener bound to VIP:port with IP_FREEBIND.
    /// Needs CAP_NET_ADMIN and CAP_NET_RAW.
    Arp,
    /// The leader adds the VIP to `interface` (default `lo`) like arp
    /// mode and announces it as a host route to the BGP peers of `bgp`;
    /// every node keeps its sessions up. For routed networks without a
    /// shared L2 segment. Needs CAP_NET_ADMIN.
    Bgp,
}

/// The virtual IP and its fencing timers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VipConfig {
    /// How the VIP is announced.
    #[serde(default)]
    pub mode: VipMode,
    /// The VIP (no port, no prefix), IPv4 or IPv6. Required unless
    /// disabled.
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// arp mode, dual-stack: the IPv6 VIP held together with an IPv4
    /// `address` (claimed, renewed, announced and released as one).
    #[serde(default)]
    pub address6: Option<IpAddr>,
    /// Port of the front listener on the VIP.
    #[serde(default = "d_vip_port")]
    pub port: u16,
    /// arp mode: prefix length `address` is added with (default 32 or
    /// 128, which keeps it off the routing decisions of the subnet).
    #[serde(default)]
    pub prefix_length: Option<u8>,
    /// arp mode: prefix length `address6` is added with (default 128).
    #[serde(default)]
    pub prefix_length6: Option<u8>,
    /// arp mode: the interface that carries the VIP. bgp mode: where the
    /// holder binds it (default `lo`).
    #[serde(default)]
    pub interface: Option<String>,
    /// bgp mode: the speaker and its peers.
    #[serde(default)]
    pub bgp: Option<BgpConfig>,
    /// The holder keeps the VIP only while the last heartbeat a quorum
    /// acknowledged was sent less than this long ago.
    #[serde(default = "d_lease", with = "duration")]
    pub lease: Duration,
    /// How often the holder checks its lease. Much shorter than the lease:
    /// openraft reports no change while a partitioned leader waits.
    #[serde(default = "d_check", with = "duration")]
    pub check_interval: Duration,
    /// Bound on how fast one node's clock may run against another's, as a
    /// fraction (0.01 = 1%). Monotonic clocks under NTP slew by at most
    /// 0.05%; the default leaves a wide margin.
    #[serde(default = "d_drift")]
    pub clock_drift: f64,
    /// Time allowed from deciding to release to the address being gone
    /// (netlink round trip, closing a listener; in bgp mode also the
    /// withdrawals written to the sessions, which a release waits for at
    /// most this long).
    #[serde(default = "d_release_budget", with = "duration")]
    pub release_budget: Duration,
    /// arp mode: gratuitous ARPs (or neighbour advertisements) sent per
    /// claim.
    #[serde(default = "d_garp_count")]
    pub garp_count: u32,
    /// arp mode: pause between them.
    #[serde(default = "d_garp_interval", with = "duration")]
    pub garp_interval: Duration,
    /// arp and bgp mode: the kernel lifetime the VIP is added with (whole seconds,
    /// at least `lease`); the holder renews it every quarter of it while
    /// its lease is fresh, so a holder killed or frozen without releasing
    /// loses the address about one lifetime later. Default: `lease`
    /// rounded up to whole seconds (1s with the default lease).
    #[serde(default, with = "duration::option")]
    pub address_lifetime: Option<Duration>,
    /// arp and bgp mode: right after taking the VIP over, send each client
    /// of the previous holder's front a tickle ACK, so that a connection
    /// through a holder that vanished (a cut link) is reset at once instead
    /// of at the client's own timeout (docs/FAILOVER.md). The holder shares
    /// its client table with its peers for it. Needs CAP_NET_RAW.
    #[serde(default = "d_true")]
    pub tickle_clients: bool,
    /// arp and bgp mode: drop the kernel's connection refusals (a reset
    /// answering a SYN) sent from the VIP's port, with an nftables rule
    /// that outlives this process. A holder killed without releasing
    /// leaves its address behind for a moment; its clients' SYNs then go
    /// unanswered and are sent again a second later, by when the new
    /// holder has the VIP, instead of failing with "connection refused"
    /// (docs/FAILOVER.md). Removed on a clean stop. Needs CAP_NET_ADMIN.
    #[serde(default = "d_true")]
    pub drop_refusals: bool,
}

fn d_true() -> bool {
    true
}

fn d_vip_port() -> u16 {
    6443
}

/// bgp mode: the speaker's identity and its peers (docs/FAILOVER.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpConfig {
    /// Our AS number (2- or 4-octet).
    pub local_asn: u32,
    /// Our BGP identifier. Default: the Raft address (advertised, else
    /// listening), which must then be IPv4.
    #[serde(default)]
    pub router_id: Option<Ipv4Addr>,
    /// The routers to announce the VIP to. Each session carries the VIP
    /// family of its own address (an IPv4 peer the IPv4 VIP, an IPv6 peer
    /// the IPv6 one).
    pub peers: Vec<BgpPeerConfig>,
}

/// One BGP peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpPeerConfig {
    /// The router's address.
    pub address: IpAddr,
    /// Its AS (equal to `localAsn`: iBGP).
    pub asn: u32,
    /// The hold time proposed (whole seconds; 0 or at least 3s). The
    /// router drops the routes of a holder that died without withdrawing
    /// after the negotiated hold time.
    #[serde(default = "d_bgp_hold", with = "duration")]
    pub hold_time: Duration,
    /// The router's BGP port.
    #[serde(default = "d_bgp_port")]
    pub port: u16,
    /// TCP MD5 signature key (RFC 2385), up to 80 bytes.
    #[serde(default)]
    pub password: Option<String>,
    /// BFD (RFC 5880/5881, single hop) beside the session; the router
    /// must run BFD for this peer too (docs/FAILOVER.md, deploy/GUIDE.md).
    #[serde(default)]
    pub bfd: BfdConfig,
}

/// BFD for one BGP peer: with it, a router that runs BFD drops a dead
/// holder's route within `interval` × the multiplier instead of the hold
/// time. Each field defaults on its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BfdConfig {
    /// Run a BFD session with the peer (UDP 3784). Off by default: the
    /// router has to be configured for it as well.
    #[serde(default)]
    pub enabled: bool,
    /// Our desired min TX and required min RX interval (10ms to 60s); the
    /// agreed interval is the slower of ours and the router's.
    #[serde(default = "d_bfd_interval", with = "duration")]
    pub interval: Duration,
    /// Our detect multiplier (1 to 255): the router declares us down after
    /// this many intervals without a packet.
    #[serde(default = "d_bfd_multiplier")]
    pub multiplier: u32,
}

fn d_bfd_interval() -> Duration {
    Duration::from_millis(100)
}
fn d_bfd_multiplier() -> u32 {
    3
}

impl Default for BfdConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: d_bfd_interval(),
            multiplier: d_bfd_multiplier(),
        }
    }
}

impl BfdConfig {
    /// The session timers, when enabled.
    pub fn timers(&self) -> Option<crate::vip::bgp::bfd::Timers> {
        self.enabled.then(|| crate::vip::bgp::bfd::Timers {
            interval: self.interval,
            multiplier: u8::try_from(self.multiplier).unwrap_or(u8::MAX),
        })
    }
}

impl Validate for BfdConfig {
    fn validate(&self, v: &mut Validator) {
        let i = self.interval;
        v.check(
            (Duration::from_millis(10)..=Duration::from_secs(60)).contains(&i),
            "interval",
            format!(
                "{} is out of range: 10ms to 60s",
                humantime::format_duration(i)
            ),
        );
        v.check(
            (1..=255).contains(&self.multiplier),
            "multiplier",
            format!("{} is out of range: 1 to 255", self.multiplier),
        );
    }
}

fn d_bgp_hold() -> Duration {
    Duration::from_secs(3)
}
fn d_bgp_port() -> u16 {
    179
}

impl BgpConfig {
    /// The BGP identifier: configured, or the Raft address when IPv4.
    pub fn router_id(&self, raft: &RaftConfig) -> Option<Ipv4Addr> {
        if self.router_id.is_some() {
            return self.router_id;
        }
        let advertised = raft
            .advertise_address
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.ip());
        match advertised.unwrap_or(raft.address.ip()) {
            IpAddr::V4(a) if !a.is_unspecified() => Some(a),
            _ => None,
        }
    }

    /// The session settings of every peer.
    pub fn peer_configs(&self) -> Vec<crate::vip::bgp::session::PeerConfig> {
        self.peers
            .iter()
            .map(|p| crate::vip::bgp::session::PeerConfig {
                address: p.address,
                port: p.port,
                asn: p.asn,
                hold_time: p.hold_time,
                password: p.password.clone(),
                bfd: p.bfd.timers(),
            })
            .collect()
    }

    fn validate_with(&self, raft: &RaftConfig, vip: &[IpAddr], v: &mut Validator) {
        let asn_ok = |a: u32| a != 0 && a != 23456 && a != u32::MAX;
        v.check(
            asn_ok(self.local_asn),
            "localAsn",
            format!(
                "{} is not a usable AS number (0, 23456 and 4294967295 are reserved)",
                self.local_asn
            ),
        );
        match self.router_id(raft) {
            Some(id) => v.check(
                !id.is_unspecified() && !id.is_broadcast(),
                "routerId",
                format!("{id} cannot be a BGP identifier"),
            ),
            None => v.at("routerId", |v| {
                v.error("required: raft.address is not an IPv4 address to take it from")
            }),
        }
        v.check(
            !self.peers.is_empty(),
            "peers",
            "at least one peer is needed to announce the VIP to",
        );
        let mut seen = BTreeSet::new();
        let mut bfd = BTreeSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            // BFD sessions are told apart by the peer's address alone.
            v.check(
                !p.bfd.enabled || bfd.insert(p.address),
                format!("peers[{i}].bfd.enabled"),
                format!("{} already has a BFD session (one per address)", p.address),
            );
            v.at(format!("peers[{i}]"), |v| p.validate(v));
            v.check(
                asn_ok(p.asn),
                format!("peers[{i}].asn"),
                format!(
                    "{} is not a usable AS number (0, 23456 and 4294967295 are reserved)",
                    p.asn
                ),
            );
            v.check(
                seen.insert((p.address, p.port)),
                format!("peers[{i}].address"),
                format!("{} port {} is listed twice", p.address, p.port),
            );
        }
        for ip in vip {
            let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
            v.check(
                self.peers.iter().any(|p| p.address.is_ipv4() == ip.is_ipv4()),
                "peers",
                format!(
                    "no {family} peer to announce the {family} VIP {ip} to (a session carries the routes of its own family)"
                ),
            );
        }
    }
}

impl Validate for BgpPeerConfig {
    fn validate(&self, v: &mut Validator) {
        let a = self.address;
        v.check(
            !a.is_unspecified() && !a.is_multicast() && !a.is_loopback(),
            "address",
            format!("{a} cannot be a BGP peer"),
        );
        v.check(self.port != 0, "port", "must be between 1 and 65535");
        let h = self.hold_time;
        v.check(
            h.subsec_nanos() == 0 && (h.is_zero() || (3..=65535).contains(&h.as_secs())),
            "holdTime",
            format!(
                "{} is out of range: 0 (no keepalives) or whole seconds from 3s to 65535s",
                humantime::format_duration(h)
            ),
        );
        v.at("bfd", |v| self.bfd.validate(v));
        if let Some(pw) = &self.password {
            v.check(
                (1..=crate::vip::bgp::md5::MAX_KEY).contains(&pw.len()),
                "password",
                format!(
                    "a TCP MD5 key has 1 to {} bytes, this one {}",
                    crate::vip::bgp::md5::MAX_KEY,
                    pw.len()
                ),
            );
        }
    }
}
fn d_lease() -> Duration {
    Duration::from_millis(150)
}
fn d_check() -> Duration {
    Duration::from_millis(10)
}
fn d_drift() -> f64 {
    0.01
}
fn d_release_budget() -> Duration {
    Duration::from_millis(25)
}
fn d_garp_count() -> u32 {
    3
}
fn d_garp_interval() -> Duration {
    Duration::from_millis(100)
}

impl Default for VipConfig {
    fn default() -> Self {
        Self {
            mode: VipMode::Disabled,
            address: None,
            address6: None,
            port: d_vip_port(),
            prefix_length: None,
            prefix_length6: None,
            interface: None,
            bgp: None,
            lease: d_lease(),
            check_interval: d_check(),
            clock_drift: d_drift(),
            release_budget: d_release_budget(),
            garp_count: d_garp_count(),
            garp_interval: d_garp_interval(),
            address_lifetime: None,
            tickle_clients: true,
            drop_refusals: true,
        }
    }
}

impl VipConfig {
    /// The fencing timers derived from this section and the Raft timers.
    pub fn timing(&self, raft: &RaftConfig) -> FenceTiming {
        FenceTiming {
            lease: self.lease,
            check_interval: self.check_interval,
            clock_drift: self.clock_drift,
            release_budget: self.release_budget,
            follower_lease: raft.election_timeout_max,
        }
    }

    /// arp mode: the address lifetime, configured or derived from the
    /// lease (rounded up to whole seconds, the kernel's unit).
    pub fn address_lifetime(&self) -> Duration {
        self.address_lifetime.unwrap_or_else(|| {
            let secs = self.lease.as_secs() + u64::from(self.lease.subsec_nanos() > 0);
            Duration::from_secs(secs.max(1))
        })
    }

    /// The VIP with its port, when enabled (the first address of a
    /// dual-stack pair).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.socket_addrs().into_iter().next()
    }

    /// Every VIP address with the port, when enabled: one, or two for a
    /// dual-stack pair (arp mode binds a front listener on each).
    pub fn socket_addrs(&self) -> Vec<SocketAddr> {
        match self.mode {
            VipMode::Disabled => Vec::new(),
            _ => self
                .addresses()
                .into_iter()
                .map(|a| SocketAddr::new(a.ip, self.port))
                .collect(),
        }
    }

    /// The prefix length `address` is added with in arp mode.
    pub fn prefix(&self) -> u8 {
        self.prefix_length.unwrap_or(match self.address {
            Some(IpAddr::V6(_)) => 128,
            _ => 32,
        })
    }

    /// The addresses the arp-mode holder adds, with their prefix lengths:
    /// `address`, then `address6` if set.
    pub fn addresses(&self) -> Vec<VipAddress> {
        let first = self.address.map(|ip| VipAddress {
            ip,
            prefix: self.prefix(),
        });
        let second = self.address6.map(|ip| VipAddress {
            ip,
            prefix: self.prefix_length6.unwrap_or(128),
        });
        first.into_iter().chain(second).collect()
    }

    /// The dual-stack fields: `address6` is IPv6, `address` IPv4, arp mode
    /// only; prefix lengths of the family they apply to.
    fn validate_families(&self, v: &mut Validator) {
        if let Some(a6) = self.address6 {
            v.check(
                matches!(self.mode, VipMode::Arp | VipMode::Bgp),
                "address6",
                "a dual-stack VIP needs mode arp or bgp",
            );
            v.check(
                a6.is_ipv6(),
                "address6",
                format!("{a6} is IPv4: the second VIP of a dual-stack pair must be IPv6"),
            );
            v.check(
                !a6.is_unspecified() && !a6.is_multicast() && !a6.is_loopback(),
                "address6",
                format!("{a6} cannot be a virtual IP"),
            );
            if let Some(a) = self.address
                && a.is_ipv6()
                && a6.is_ipv6()
            {
                v.at("address", |v| {
                    v.error(format!(
                        "{a} is IPv6 like address6 ({a6}): a dual-stack pair needs an IPv4 address here"
                    ))
                });
            }
        }
        let prefix_check = |v: &mut Validator, field: &str, p: u8, ip: Option<IpAddr>| {
            let (max, family) = match ip {
                Some(IpAddr::V6(_)) => (128, "IPv6"),
                _ => (32, "IPv4"),
            };
            let of = ip
                .map(|ip| format!(" for the {family} VIP {ip}"))
                .unwrap_or_default();
            v.check(
                (1..=max).contains(&p),
                field,
                format!("{p} is out of range{of}: expected between 1 and {max}"),
            );
        };
        if let Some(p) = self.prefix_length {
            prefix_check(v, "prefixLength", p, self.address);
        }
        if let Some(p) = self.prefix_length6 {
            match self.address6 {
                None => v.at("prefixLength6", |v| {
                    v.error("set without address6 (prefixLength applies to address)")
                }),
                Some(a6) => prefix_check(v, "prefixLength6", p, Some(a6)),
            }
        }
    }

    /// arp mode: every VIP family must exist on the interface (an IPv6 VIP
    /// on an interface with IPv6 disabled could never be announced).
    /// Checked where the interface exists, i.e. on the node itself; an
    /// interface missing here is reported at start.
    fn validate_interface_families(&self, interface: &str, v: &mut Validator) {
        if let Ok(Some(have)) = iface::families(interface) {
            self.check_families(interface, have, v);
        }
    }

    /// The VIP's families against those `interface` has.
    fn check_families(&self, interface: &str, have: iface::Families, v: &mut Validator) {
        for (field, ip) in [("address", self.address), ("address6", self.address6)] {
            let Some(ip) = ip else { continue };
            let (ok, family) = match ip {
                IpAddr::V4(_) => (have.v4, "IPv4"),
                IpAddr::V6(_) => (have.v6, "IPv6"),
            };
            v.check(
                ok,
                field,
                format!(
                    "{ip} is {family} but interface {interface} has no {family} address{}",
                    if ip.is_ipv6() {
                        " (is IPv6 disabled on it? net.ipv6.conf.<if>.disable_ipv6)"
                    } else {
                        ""
                    }
                ),
            );
        }
    }

    /// bgp mode: the speaker section, and the local interface (`lo`
    /// unless set).
    fn validate_bgp(&self, raft: &RaftConfig, v: &mut Validator) {
        if self.mode != VipMode::Bgp {
            if self.bgp.is_some() {
                v.at("bgp", |v| v.error("set, but mode is not bgp"));
            }
            return;
        }
        match &self.bgp {
            None => v.at("bgp", |v| v.error("required when mode is bgp")),
            Some(b) => {
                let vips: Vec<IpAddr> = self.address.into_iter().chain(self.address6).collect();
                v.at("bgp", |v| b.validate_with(raft, &vips, v));
            }
        }
        let interface = self.bgp_interface();
        if !interface.is_empty() && interface.len() < 16 && !interface.contains(['/', ' ']) {
            self.validate_interface_families(interface, v);
        } else {
            v.at("interface", |v| {
                v.error(format!("{interface:?} is not a network interface name"))
            });
        }
        if let Some(a) = self.address {
            v.check(
                !a.is_loopback(),
                "address",
                "a loopback address cannot be announced over BGP; use mode bind",
            );
        }
        // A shorter prefix on lo would make the whole range local to the
        // holder; what is announced is the host route anyway.
        for (field, set) in [
            ("prefixLength", self.prefix_length),
            ("prefixLength6", self.prefix_length6),
        ] {
            if set.is_some() {
                v.at(field, |v| {
                    v.error("bgp mode binds and announces host routes (/32, /128); leave it unset")
                });
            }
        }
    }

    /// bgp mode: the interface the holder binds the VIP to.
    pub fn bgp_interface(&self) -> &str {
        self.interface.as_deref().unwrap_or("lo")
    }

    fn validate_with(&self, raft: &RaftConfig, v: &mut Validator) {
        if self.mode != VipMode::Disabled {
            v.check(
                self.address.is_some(),
                "address",
                "required when mode is bind, arp or bgp",
            );
            if let Some(a) = self.address {
                v.check(
                    !a.is_unspecified() && !a.is_multicast(),
                    "address",
                    format!("{a} cannot be a virtual IP"),
                );
            }
            v.check(self.port != 0, "port", "must be between 1 and 65535");
        }
        if self.mode == VipMode::Arp {
            match &self.interface {
                None => v.at("interface", |v| v.error("required when mode is arp")),
                Some(i) if !i.is_empty() && i.len() < 16 && !i.contains(['/', ' ']) => {
                    self.validate_interface_families(i, v);
                }
                Some(i) => v.at("interface", |v| {
                    v.error(format!("{i:?} is not a network interface name"))
                }),
            }
            if let Some(a) = self.address {
                v.check(
                    !a.is_loopback(),
                    "address",
                    "a loopback address cannot be announced with ARP; use mode bind",
                );
            }
        }
        self.validate_bgp(raft, v);
        self.validate_families(v);
        let ms = Duration::from_millis;
        v.duration_in("lease", self.lease, ms(20), ms(60_000));
        v.duration_in("checkInterval", self.check_interval, ms(1), ms(1000));
        v.check(
            self.check_interval * 4 <= self.lease,
            "checkInterval",
            "must be at most a quarter of lease",
        );
        v.check(
            self.clock_drift.is_finite() && (0.0..0.5).contains(&self.clock_drift),
            "clockDrift",
            format!(
                "{} is out of range: expected a fraction in [0, 0.5)",
                self.clock_drift
            ),
        );
        v.duration_in("releaseBudget", self.release_budget, ms(1), ms(10_000));
        v.check(
            (1..=100).contains(&self.garp_count),
            "garpCount",
            format!(
                "{} is out of range: expected between 1 and 100",
                self.garp_count
            ),
        );
        v.duration_in("garpInterval", self.garp_interval, ms(1), ms(10_000));
        if let Some(l) = self.address_lifetime {
            v.duration_in("addressLifetime", l, ms(1000), ms(3_600_000));
            v.check(
                l.subsec_nanos() == 0,
                "addressLifetime",
                format!(
                    "{} is not a whole number of seconds (the kernel's unit)",
                    humantime::format_duration(l)
                ),
            );
            // Renewals come every quarter lifetime, from a check that runs
            // every checkInterval (at most a quarter of lease).
            v.check(
                l >= self.lease,
                "addressLifetime",
                format!(
                    "must be at least lease ({})",
                    humantime::format_duration(self.lease)
                ),
            );
        }
        // The lease must expire well before a follower may vote again,
        // or every failover pays the difference as claim delay.
        v.check(
            self.lease > raft.heartbeat_interval * 2,
            "lease",
            format!(
                "must exceed twice raft.heartbeatInterval ({}), or the holder drops the VIP on every late heartbeat",
                humantime::format_duration(raft.heartbeat_interval)
            ),
        );
    }
}

/// How each listener chooses a backend (docs/HEALTH.md "Routing").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingConfig {
    /// The VIP listener (arp front or bind mode): `balanced` by default,
    /// since its clients are the whole cluster.
    #[serde(default)]
    pub vip: RoutingMode,
    /// The node-local listener (`localListener`): `zonePreferred` by
    /// default, since its clients are this node's own.
    #[serde(default = "d_local_mode")]
    pub local: RoutingMode,
    /// Share of the local zone's backends that must be routable before
    /// zone-preferred connections stay in the zone (see `RoutingPolicy`).
    #[serde(default = "d_min_share")]
    pub min_local_healthy_share: f64,
}

fn d_local_mode() -> RoutingMode {
    RoutingMode::ZonePreferred
}

fn d_min_share() -> f64 {
    RoutingPolicy::default().min_local_healthy_share
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            vip: RoutingMode::Balanced,
            local: d_local_mode(),
            min_local_healthy_share: d_min_share(),
        }
    }
}

/// One initial backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    /// Backend id (a lowercase DNS name, e.g. the node name).
    pub id: String,
    /// host:port of the apiserver.
    pub address: SocketAddr,
    /// Zone.
    #[serde(default)]
    pub zone: String,
    /// Relative weight, 1-10000.
    #[serde(default = "d_weight")]
    pub weight: u32,
}

fn d_weight() -> u32 {
    100
}

/// Whether `id` is a valid backend id: a lowercase DNS name (RFC 1123),
/// as a Kubernetes node name is, so the node's name can be its apiserver's
/// id also where nodes are named by their FQDN (`ip-10-0-0-11.ec2.internal`).
pub fn valid_backend_id(id: &str) -> bool {
    id.len() <= 253 && id.split('.').all(valid_dns_label)
}

/// What [`valid_backend_id`] expects, for error messages.
pub const BACKEND_ID_FORMAT: &str = "expected a lowercase DNS name like a node name: labels of \
     1-63 letters, digits or '-' (not starting or ending with '-') joined by '.', at most 253 \
     characters";

fn valid_dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 10_000;

/// Whether a backend address can be dialled: neither its IP nor its port
/// is 0.
pub fn connectable(address: SocketAddr) -> bool {
    address.port() != 0 && !address.ip().is_unspecified()
}

impl Validate for BackendConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            valid_backend_id(&self.id),
            "id",
            format!("{:?} is not a valid id: {BACKEND_ID_FORMAT}", self.id),
        );
        v.check(
            connectable(self.address),
            "address",
            format!("{} cannot be connected to", self.address),
        );
        v.check(
            (1..=MAX_WEIGHT).contains(&self.weight),
            "weight",
            format!(
                "{} is out of range: expected between 1 and {MAX_WEIGHT}",
                self.weight
            ),
        );
    }
}

impl Validate for LbConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(self.node_id != 0, "nodeId", "must be greater than 0");
        if let Some(n) = &self.name {
            v.check(!n.trim().is_empty(), "name", "must not be empty");
        }
        v.check(
            !self.data_dir.as_os_str().is_empty(),
            "dataDir",
            "must not be empty",
        );
        v.nested("raft", &self.raft);
        v.nested("api", &self.api);
        v.nested("tls", &self.tls);
        v.nested("access", &self.access);
        v.check(
            self.access.peers.is_some(),
            "access.peers",
            "must be set: nobody could speak Raft to this node",
        );

        let mut ids = BTreeSet::new();
        for (i, m) in self.initial_members.iter().enumerate() {
            v.nested(format!("initialMembers[{i}]"), m);
            if !ids.insert(m.id) {
                v.at(format!("initialMembers[{i}].id"), |v| {
                    v.error(format!("duplicate member id {}", m.id))
                });
            }
        }
        if !self.initial_members.is_empty() {
            v.check(
                ids.contains(&self.node_id),
                "initialMembers",
                format!("must include this node (nodeId {}) when set", self.node_id),
            );
        }

        v.at("vip", |v| self.vip.validate_with(&self.raft, v));
        v.nested("proxy", &self.proxy);
        v.at("routing", |v| {
            let s = self.routing.min_local_healthy_share;
            v.check(
                s.is_finite() && (0.0..=1.0).contains(&s),
                "minLocalHealthyShare",
                format!("{s} is out of range: expected a fraction between 0.0 and 1.0"),
            );
        });
        v.nested("health", &self.health);
        let mut backend_ids = BTreeSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            v.nested(format!("backends[{i}]"), b);
            if !backend_ids.insert(b.id.as_str()) {
                v.at(format!("backends[{i}].id"), |v| {
                    v.error(format!("duplicate backend id {:?}", b.id))
                });
            }
        }
        v.nested("logging", &self.logging);
        v.duration_in(
            "shutdownGrace",
            self.shutdown_grace,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        );
        let (priority, max) = (self.realtime_priority, bulwark_common::sched::MAX_PRIORITY);
        if priority > max {
            v.at("realtimePriority", |v| {
                v.error(format!(
                    "{priority} is out of range: expected 0 (ordinary threads) to {max}"
                ))
            });
        }
        self.check_listeners(v);
        self.warn_vip_lease(v);
        if let Some(w) = self.zone_warning() {
            v.at("zone", |v| v.warn(w));
        }
        if let Some(w) = self.routing_warning() {
            v.at("routing.vip", |v| v.warn(w));
        }
    }
}

impl LbConfig {
    /// Every socket this node binds, each once: a second bind of the same
    /// port fails at start, after Raft has opened its log.
    fn check_listeners(&self, v: &mut Validator) {
        let mut listeners = vec![
            ("raft.address", self.raft.address),
            ("api.address", self.api.address),
            ("admin.address", self.admin.address),
        ];
        if let Some(a) = self.local_listener {
            listeners.push(("localListener", a));
        }
        if let Some(a) = self.vip.socket_addr() {
            listeners.push(("vip.port", a));
        }
        v.distinct_listeners(&listeners);
    }

    /// A lease longer than the followers' leader lease is legal but makes
    /// every failover wait the difference before the new leader claims
    /// the VIP (see `FenceTiming::claim_delay`).
    fn warn_vip_lease(&self, v: &mut Validator) {
        let (lease, election) = (self.vip.lease, self.raft.election_timeout_max);
        if self.vip.mode != VipMode::Disabled && lease > election {
            v.at("vip.lease", |v| {
                v.warn(format!(
                    "{} is longer than raft.electionTimeoutMax ({}): after a failover the new \
                     leader waits about the difference ({}) before it claims the VIP",
                    humantime::format_duration(lease),
                    humantime::format_duration(election),
                    humantime::format_duration(lease - election)
                ))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use bulwark_common::config::{Overrides, from_str_with};

    use super::*;

    fn tls_files(dir: &std::path::Path) -> String {
        for f in ["lb.crt", "lb.key", "ca.crt"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        format!(
            "tls:\n  certFile: {0}/lb.crt\n  keyFile: {0}/lb.key\n  caFile: {0}/ca.crt\n",
            dir.display()
        )
    }

    fn parse(body: &str) -> Result<LbConfig, bulwark_common::config::ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: LoadBalancerConfiguration\n{}{body}",
            tls_files(dir.path())
        );
        from_str_with::<LbConfig>(Some(&text), None, &Overrides::new())
    }

    /// The warnings validation records for `body`, as `path: message`.
    fn warnings(body: &str) -> Vec<String> {
        let c = parse(body).unwrap();
        let mut v = Validator::default();
        c.validate(&mut v);
        v.warnings().iter().map(ToString::to_string).collect()
    }

    fn errors(body: &str) -> Vec<String> {
        parse(body).unwrap_err().messages()
    }

    const MINIMAL: &str =
        "nodeId: 1\nraft:\n  address: 127.0.0.1:9441\napi:\n  address: 127.0.0.1:9442\n";

    /// Kubernetes node names are DNS names; ids take them as they are.
    #[test]
    fn backend_ids_are_lowercase_dns_names() {
        for ok in [
            "cp-1",
            "a",
            "ip-10-0-0-11.eu-west-1.compute.internal",
            "0.a-b.c",
        ] {
            assert!(valid_backend_id(ok), "{ok}");
        }
        let long_label = "a".repeat(64);
        let too_long = vec!["abcdefghi"; 26].join(".");
        assert_eq!(too_long.len(), 259);
        for bad in [
            "",
            "Bad_Id",
            "CP-1",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a.-b",
            "a b",
            &long_label,
            &too_long,
        ] {
            assert!(!valid_backend_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn realtime_priority_is_off_by_default_and_stays_in_the_kernels_range() {
        assert_eq!(parse(MINIMAL).unwrap().realtime_priority, 0);
        let on = parse(&format!("{MINIMAL}realtimePriority: 10\n")).unwrap();
        assert_eq!(on.realtime_priority, 10);
        assert_eq!(
            errors(&format!("{MINIMAL}realtimePriority: 100\n")),
            ["realtimePriority: 100 is out of range: expected 0 (ordinary threads) to 99"]
        );
        let e = errors(&format!("{MINIMAL}realtimePriority: -1\n"));
        assert!(
            e.iter().any(|m| m.starts_with("realtimePriority:")),
            "{e:?}"
        );
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.node_name(), "node-1");
        assert_eq!(c.raft.heartbeat_interval, Duration::from_millis(40));
        assert_eq!(c.raft.election_timeout_min, Duration::from_millis(150));
        assert_eq!(c.raft.election_timeout_max, Duration::from_millis(220));
        assert_eq!(c.vip.mode, VipMode::Disabled);
        assert_eq!(c.vip.lease, Duration::from_millis(150));
        assert_eq!(
            c.access.peers.as_ref().unwrap().organizations,
            ["bulwark:lb"]
        );
        assert_eq!(c.raft.advertised(), "127.0.0.1:9441");
        assert!(c.routing_policy().local_zone.is_none());
        // The address lifetime follows the lease, in whole seconds.
        assert_eq!(c.vip.address_lifetime(), Duration::from_secs(1));
        // The defaults satisfy the fencing inequality without a claim delay.
        let t = c.vip.timing(&c.raft);
        assert_eq!(t.claim_delay(false, t.own()), Duration::ZERO);
    }

    #[test]
    fn errors_name_the_field() {
        let e = errors(
            "nodeId: 0\nraft:\n  address: 0.0.0.0:9441\n  electionTimeoutMin: 300ms\n  electionTimeoutMax: 200ms\napi:\n  address: 127.0.0.1:9442\n",
        );
        assert!(
            e.contains(&"nodeId: must be greater than 0".to_owned()),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m
                    .starts_with("raft.advertiseAddress: required when address is 0.0.0.0:9441")),
            "{e:?}"
        );
        assert!(
            e.contains(
                &"raft.electionTimeoutMax: must be greater than electionTimeoutMin".to_owned()
            ),
            "{e:?}"
        );

        let e = errors(&format!(
            "{MINIMAL}vip:\n  mode: arp\n  address: 127.0.0.10\nbackends:\n- id: Bad_Id\n  address: 10.0.0.1:6443\n  weight: 0\n"
        ));
        assert!(
            e.contains(&"vip.interface: required when mode is arp".to_owned()),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("vip.address: a loopback address")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("backends[0].id: \"Bad_Id\" is not a valid id")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("backends[0].weight: 0 is out of range")),
            "{e:?}"
        );

        let e = errors(&format!(
            "{MINIMAL}initialMembers:\n- {{id: 2, raftAddress: 'nope', apiAddress: 'b:1'}}\n- {{id: 2, raftAddress: 'a:1', apiAddress: 'b:1'}}\n"
        ));
        assert!(
            e.contains(&"initialMembers[0].raftAddress: \"nope\" is not host:port".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(&"initialMembers[1].id: duplicate member id 2".to_owned()),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("initialMembers: must include this node")),
            "{e:?}"
        );

        let e = errors(&format!("{MINIMAL}vip:\n  mode: bind\n  adress: 1.2.3.4\n"));
        assert!(
            e[0].starts_with("vip.adress: unknown field `adress`"),
            "{e:?}"
        );
    }

    #[test]
    fn address_lifetime_follows_the_lease_or_is_whole_seconds() {
        let c = parse(&format!("{MINIMAL}vip:\n  lease: 1500ms\n")).unwrap();
        assert_eq!(c.vip.address_lifetime(), Duration::from_secs(2));
        let c = parse(&format!("{MINIMAL}vip:\n  addressLifetime: 3s\n")).unwrap();
        assert_eq!(c.vip.address_lifetime(), Duration::from_secs(3));
        for (value, expected) in [
            (
                "1500ms",
                "vip.addressLifetime: 1s 500ms is not a whole number of seconds",
            ),
            ("0s", "vip.addressLifetime: 0s is out of range"),
            ("2h", "vip.addressLifetime: 2h is out of range"),
        ] {
            let e = errors(&format!("{MINIMAL}vip:\n  addressLifetime: {value}\n"));
            assert!(e.iter().any(|m| m.starts_with(expected)), "{value}: {e:?}");
        }
        let e = errors(&format!(
            "{MINIMAL}vip:\n  lease: 1200ms\n  addressLifetime: 1s\n"
        ));
        assert!(
            e.iter()
                .any(|m| m.starts_with("vip.addressLifetime: must be at least lease (1s 200ms)")),
            "{e:?}"
        );
    }

    #[test]
    fn health_section_and_zones_are_checked() {
        let c = parse(&format!(
            "{MINIMAL}zone: a\nbackends:\n- {{id: cp-1, address: 10.0.0.1:6443, zone: a}}\nhealth:\n  zoneQuorum: 2\n  minVotes: 3\n  staleAfter: 5s\n"
        ))
        .unwrap();
        assert_eq!(c.health.zone_quorum, crate::health::ZoneQuorum::Zones(2));
        assert_eq!(c.health.min_votes, 3);
        assert_eq!(c.health.stale_after, Duration::from_secs(5));
        assert_eq!(parse(MINIMAL).unwrap().health, HealthConfig::default());

        let odd = parse(&format!(
            "{MINIMAL}zone: zone-x\nbackends:\n- {{id: cp-1, address: 10.0.0.1:6443, zone: a}}\n- {{id: cp-2, address: 10.0.0.2:6443, zone: b}}\n"
        ))
        .unwrap();
        assert!(
            odd.zone_warning().is_some_and(|w| w.starts_with(
                "zone \"zone-x\" is not the zone of any configured backend (their zones: a, b)"
            )),
            "{:?}",
            odd.zone_warning()
        );
        assert_eq!(c.zone_warning(), None);
        let e = errors(&format!(
            "{MINIMAL}health:\n  minVotes: 0\n  heartbeatInterval: 2s\n  staleAfter: 3s\n"
        ));
        assert!(
            e.iter()
                .any(|m| m.starts_with("health.minVotes: must be at least 1")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("health.staleAfter: 3000ms is too short")),
            "{e:?}"
        );
        let e = errors(&format!("{MINIMAL}health:\n  zoneQuorum: most\n"));
        assert!(
            e.iter()
                .any(|m| m.contains("\"majority\" or a number of zones")),
            "{e:?}"
        );
    }

    #[test]
    fn routing_defaults_old_and_new_shapes() {
        let d = parse(MINIMAL).unwrap().routing;
        assert_eq!(d.vip, RoutingMode::Balanced);
        assert_eq!(d.local, RoutingMode::ZonePreferred);
        assert_eq!(d.min_local_healthy_share, 0.5);
        assert_eq!(d, RoutingConfig::default());

        // The shape before per-listener modes still parses.
        let old = parse(&format!("{MINIMAL}routing:\n  minLocalHealthyShare: 0.7\n")).unwrap();
        assert_eq!(old.routing.vip, RoutingMode::Balanced);
        assert_eq!(old.routing.local, RoutingMode::ZonePreferred);
        assert_eq!(old.routing.min_local_healthy_share, 0.7);

        let new = parse(&format!(
            "{MINIMAL}zone: a\nrouting: {{vip: zonePreferred, local: balanced, minLocalHealthyShare: 0.6}}\n"
        ))
        .unwrap();
        assert_eq!(new.routing.vip, RoutingMode::ZonePreferred);
        assert_eq!(new.routing.local, RoutingMode::Balanced);
        let policy = new.routing_policy();
        assert_eq!(policy.local_zone.as_deref(), Some("a"));
        assert_eq!(policy.min_local_healthy_share, 0.6);

        let e = errors(&format!("{MINIMAL}routing:\n  vip: nearest\n"));
        assert!(
            e.iter()
                .any(|m| m.starts_with("routing.vip: unknown variant `nearest`")),
            "{e:?}"
        );
        let e = errors(&format!("{MINIMAL}routing:\n  minLocalHealthyShare: 2\n"));
        assert!(
            e.iter()
                .any(|m| m.starts_with("routing.minLocalHealthyShare: 2 is out of range")),
            "{e:?}"
        );
    }

    #[test]
    fn zone_preference_on_the_vip_is_warned_about() {
        let vip = "zone: a\nvip:\n  mode: bind\n  address: 10.0.0.10\n";
        let w = warnings(&format!("{MINIMAL}{vip}routing:\n  vip: zonePreferred\n"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("routing.vip: zonePreferred sends every client")
                && w[0].contains("(\"a\" while this node holds it)")
                && w[0].contains("Use balanced for the VIP"),
            "{w:?}"
        );
        // The defaults, zone preference on the local listener only, and
        // zone preference without a VIP or without a zone are fine.
        for body in [
            format!("{MINIMAL}{vip}"),
            format!("{MINIMAL}{vip}routing:\n  local: zonePreferred\n"),
            format!("{MINIMAL}zone: a\nrouting:\n  vip: zonePreferred\n"),
            format!(
                "{MINIMAL}vip:\n  mode: bind\n  address: 10.0.0.10\nrouting:\n  vip: zonePreferred\n"
            ),
        ] {
            assert_eq!(warnings(&body), Vec::<String>::new(), "{body}");
        }
    }

    #[test]
    fn missing_tls_files_are_named() {
        let text = format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: LoadBalancerConfiguration\n{MINIMAL}tls:\n  certFile: /nonexistent/lb.crt\n  keyFile: /nonexistent/lb.key\n  caFile: /nonexistent/ca.crt\n"
        );
        let err = from_str_with::<LbConfig>(Some(&text), None, &Overrides::new()).unwrap_err();
        let e = err.messages();
        assert!(
            e.iter()
                .any(|m| m.starts_with("tls.certFile: cannot read /nonexistent/lb.crt")),
            "{e:?}"
        );
    }

    /// A config with `vip` as its `vip:` section (arp mode on an interface
    /// that does not exist here, so the interface check is left to start).
    fn arp(vip: &str) -> String {
        format!("{MINIMAL}vip:\n  mode: arp\n  interface: bwk-none0\n{vip}")
    }

    #[test]
    fn dual_stack_vip_parses_and_single_address_configs_still_do() {
        let c = parse(&arp("  address: 198.18.0.10\n  address6: 'fd00::10'\n")).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            c.vip.addresses(),
            vec![
                VipAddress {
                    ip: ip("198.18.0.10"),
                    prefix: 32
                },
                VipAddress {
                    ip: ip("fd00::10"),
                    prefix: 128
                }
            ]
        );
        let fronts: Vec<String> = c.vip.socket_addrs().iter().map(|a| a.to_string()).collect();
        assert_eq!(fronts, ["198.18.0.10:6443", "[fd00::10]:6443"]);

        let c = parse(&arp(
            "  address: 198.18.0.10\n  prefixLength: 24\n  address6: 'fd00::10'\n  prefixLength6: 64\n",
        ))
        .unwrap();
        let prefixes: Vec<u8> = c.vip.addresses().iter().map(|a| a.prefix).collect();
        assert_eq!(prefixes, [24, 64]);

        // The single-address forms, IPv4 and IPv6, are unchanged.
        let c = parse(&arp("  address: 'fd00::10'\n")).unwrap();
        assert_eq!(
            c.vip.addresses(),
            vec![VipAddress {
                ip: ip("fd00::10"),
                prefix: 128
            }]
        );
        let c = parse(&arp("  address: 198.18.0.10\n")).unwrap();
        assert_eq!(c.vip.socket_addrs().len(), 1);
    }

    #[test]
    fn bad_vip_families_name_the_field() {
        let cases = [
            (
                arp("  address: 198.18.0.10\n  address6: 198.18.0.11\n"),
                "vip.address6: 198.18.0.11 is IPv4: the second VIP of a dual-stack pair must be IPv6",
            ),
            (
                arp("  address: 'fd00::1'\n  address6: 'fd00::10'\n"),
                "vip.address: fd00::1 is IPv6 like address6 (fd00::10): a dual-stack pair needs an IPv4 address here",
            ),
            (
                format!("{MINIMAL}vip:\n  mode: bind\n  address: 127.0.0.10\n  address6: '::1'\n"),
                "vip.address6: a dual-stack VIP needs mode arp or bgp",
            ),
            (
                arp("  address: 198.18.0.10\n  prefixLength: 64\n"),
                "vip.prefixLength: 64 is out of range for the IPv4 VIP 198.18.0.10: expected between 1 and 32",
            ),
            (
                arp("  address: 198.18.0.10\n  address6: 'fd00::10'\n  prefixLength6: 129\n"),
                "vip.prefixLength6: 129 is out of range for the IPv6 VIP fd00::10: expected between 1 and 128",
            ),
            (
                arp("  address: 'fd00::10'\n  prefixLength6: 64\n"),
                "vip.prefixLength6: set without address6 (prefixLength applies to address)",
            ),
        ];
        for (config, want) in cases {
            let e = errors(&config);
            assert!(e.iter().any(|m| m == want), "want {want:?} in {e:?}");
        }
    }

    #[test]
    fn a_vip_family_the_interface_lacks_names_the_field() {
        let c = parse(&arp("  address: 198.18.0.10\n  address6: 'fd00::10'\n")).unwrap();
        let only_v4 = iface::Families {
            v4: true,
            v6: false,
        };
        let mut v = Validator::default();
        c.vip.check_families("eth0", only_v4, &mut v);
        let e: Vec<String> = v.into_errors().iter().map(ToString::to_string).collect();
        assert_eq!(
            e,
            [
                "address6: fd00::10 is IPv6 but interface eth0 has no IPv6 address (is IPv6 disabled on it? net.ipv6.conf.<if>.disable_ipv6)"
            ]
        );
        let mut v = Validator::default();
        let only_v6 = iface::Families {
            v4: false,
            v6: true,
        };
        c.vip.check_families("eth0", only_v6, &mut v);
        let e: Vec<String> = v.into_errors().iter().map(ToString::to_string).collect();
        assert_eq!(
            e,
            ["address: 198.18.0.10 is IPv4 but interface eth0 has no IPv4 address"]
        );
        // Checked through the config too, on an interface every namespace
        // has: lo carries IPv4, so an IPv4 VIP on it is valid.
        let c = parse(&format!(
            "{MINIMAL}vip:\n  mode: arp\n  interface: lo\n  address: 198.18.0.10\n"
        ));
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn ipv6_raft_api_and_backend_addresses_parse() {
        let c = parse(
            "nodeId: 1\nraft:\n  address: '[fd00::1]:9441'\napi:\n  address: '[fd00::1]:9442'\ninitialMembers:\n- {id: 1, raftAddress: '[fd00::1]:9441', apiAddress: '[fd00::1]:9442'}\nbackends:\n- {id: cp-1, address: '[fd00::11]:6443'}\n",
        )
        .unwrap();
        assert_eq!(c.raft.advertised(), "[fd00::1]:9441");
        assert_eq!(c.api.advertised(), "[fd00::1]:9442");
        assert_eq!(c.backends[0].address.to_string(), "[fd00::11]:6443");
        let e = errors(
            "nodeId: 1\nraft:\n  address: '[fd00::1]:9441'\napi:\n  address: '[fd00::1]:9442'\ninitialMembers:\n- {id: 1, raftAddress: 'fd00::1:9441', apiAddress: '[fd00::1]:9442'}\n",
        );
        assert!(
            e.iter().any(|m| m
                .starts_with("initialMembers[0].raftAddress: \"fd00::1:9441\" is not host:port")),
            "{e:?}"
        );
    }

    #[test]
    fn host_port_check() {
        assert!(valid_host_port("10.0.0.1:9441"));
        assert!(valid_host_port("[::1]:9441"));
        assert!(valid_host_port("lb-1.example:9441"));
        assert!(!valid_host_port("lb-1.example"));
        assert!(!valid_host_port("10.0.0.1:0"));
        assert!(!valid_host_port(":80"));
        assert!(valid_host_port("[fd00::1]:9442"));
        assert!(
            !valid_host_port("fd00::1:9442"),
            "IPv6 needs brackets: no URL holds https://fd00::1:9442"
        );
    }

    #[test]
    fn an_unknown_raft_field_gets_the_valid_ones() {
        let e =
            errors("nodeId: 1\nraft:\n  adress: 127.0.0.1:9441\napi:\n  address: 127.0.0.1:9442\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(
                "raft.adress: unknown field `adress`, expected one of `address`, `advertiseAddress`"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn two_listeners_on_one_port_are_refused() {
        let e = errors(
            "nodeId: 1\nraft:\n  address: 127.0.0.1:9441\napi:\n  address: 127.0.0.1:9441\nlocalListener: 0.0.0.0:9440\n",
        );
        assert_eq!(
            e,
            vec![
                "api.address: 127.0.0.1:9441 clashes with raft.address (127.0.0.1:9441): both would listen on port 9441; give each listener its own port",
                "localListener: 0.0.0.0:9440 clashes with admin.address (0.0.0.0:9440): both would listen on port 9440; give each listener its own port",
            ]
        );
    }

    /// A bgp-mode config with `bgp` as its `vip.bgp:` section.
    fn bgp(bgp: &str) -> String {
        format!("{MINIMAL}vip:\n  mode: bgp\n  address: 198.18.0.10\n  bgp:\n{bgp}")
    }

    #[test]
    fn a_bgp_config_parses_with_its_defaults() {
        let c = parse(&bgp(
            "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 65000}\n",
        ))
        .unwrap();
        assert_eq!(c.vip.mode, VipMode::Bgp);
        assert_eq!(c.vip.bgp_interface(), "lo");
        let b = c.vip.bgp.as_ref().unwrap();
        assert_eq!(
            b.router_id(&c.raft),
            Some(Ipv4Addr::new(127, 0, 0, 1)),
            "from raft.address"
        );
        let p = &b.peer_configs()[0];
        assert_eq!(
            (p.port, p.hold_time, p.asn),
            (179, Duration::from_secs(3), 65000)
        );
        assert_eq!(p.password, None);
        assert_eq!(
            c.vip.socket_addrs().len(),
            1,
            "a front listener, as in arp mode"
        );
        // Dual-stack with a peer of each family, a 4-octet AS, a password.
        let c = parse(&format!(
            "{MINIMAL}vip:\n  mode: bgp\n  address: 198.18.0.10\n  address6: fd00::10\n  interface: dummy0\n  bgp:\n    localAsn: 4200000001\n    routerId: 10.0.0.11\n    peers:\n    - {{address: 10.0.0.1, asn: 65000, holdTime: 9s, password: s3cret}}\n    - {{address: 'fd00::1', asn: 4200000001, port: 1179, holdTime: 0s}}\n"
        ))
        .unwrap();
        assert_eq!(c.vip.addresses().len(), 2);
        assert_eq!(c.vip.bgp_interface(), "dummy0");
        assert_eq!(p.bfd, None, "BFD is off unless enabled");
    }

    #[test]
    fn bfd_fields_default_one_by_one() {
        let c = parse(&bgp(
            "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 65000, bfd: {enabled: true}}\n    - {address: 10.0.0.2, asn: 65000, bfd: {enabled: true, multiplier: 5}}\n    - {address: 10.0.0.3, asn: 65000, bfd: {interval: 300ms}}\n",
        ))
        .unwrap();
        let peers = c.vip.bgp.as_ref().unwrap().peer_configs();
        let timers = |interval, multiplier| {
            Some(crate::vip::bgp::bfd::Timers {
                interval: Duration::from_millis(interval),
                multiplier,
            })
        };
        assert_eq!(peers[0].bfd, timers(100, 3));
        assert_eq!(peers[1].bfd, timers(100, 5));
        assert_eq!(peers[2].bfd, None, "an interval alone does not enable it");
    }

    #[test]
    fn bad_bgp_fields_name_the_field() {
        let peer = "    peers:\n    - {address: 10.0.0.1, asn: 65000}\n";
        for (section, want) in [
            (
                format!("    localAsn: 0\n{peer}"),
                "vip.bgp.localAsn: 0 is not a usable AS number",
            ),
            (
                "    localAsn: 65010\n    peers: []\n".to_owned(),
                "vip.bgp.peers: at least one peer is needed",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 65000, holdTime: 2s}\n".to_owned(),
                "vip.bgp.peers[0].holdTime: 2s is out of range",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 65000, holdTime: 3500ms}\n".to_owned(),
                "vip.bgp.peers[0].holdTime: 3s 500ms is out of range",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 0.0.0.0, asn: 65000, port: 0}\n".to_owned(),
                "vip.bgp.peers[0].address: 0.0.0.0 cannot be a BGP peer",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 65000, port: 0}\n".to_owned(),
                "vip.bgp.peers[0].port: must be between 1 and 65535",
            ),
            (
                format!("    localAsn: 65010\n    peers:\n    - {{address: 10.0.0.1, asn: 23456, password: {}}}\n", "k".repeat(81)),
                "vip.bgp.peers[0].password: a TCP MD5 key has 1 to 80 bytes, this one 81",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 23456}\n".to_owned(),
                "vip.bgp.peers[0].asn: 23456 is not a usable AS number",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 1}\n    - {address: 10.0.0.1, asn: 1}\n".to_owned(),
                "vip.bgp.peers[1].address: 10.0.0.1 port 179 is listed twice",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 'fd00::1', asn: 1}\n".to_owned(),
                "vip.bgp.peers: no IPv4 peer to announce the IPv4 VIP 198.18.0.10 to",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 1, holdtime: 3s}\n".to_owned(),
                "vip.bgp.peers[0].holdtime: unknown field `holdtime`",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 1, bfd: {enabled: true, interval: 5ms}}\n".to_owned(),
                "vip.bgp.peers[0].bfd.interval: 5ms is out of range: 10ms to 60s",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 1, bfd: {interval: 2m}}\n".to_owned(),
                "vip.bgp.peers[0].bfd.interval: 2m is out of range",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 1, bfd: {multiplier: 0}}\n".to_owned(),
                "vip.bgp.peers[0].bfd.multiplier: 0 is out of range: 1 to 255",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 1, bfd: {multiplier: 256}}\n".to_owned(),
                "vip.bgp.peers[0].bfd.multiplier: 256 is out of range",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 1, bfd: {enabled: true}}\n    - {address: 10.0.0.1, asn: 1, port: 1179, bfd: {enabled: true}}\n".to_owned(),
                "vip.bgp.peers[1].bfd.enabled: 10.0.0.1 already has a BFD session",
            ),
            (
                "    localAsn: 65010\n    peers:\n    - {address: 10.0.0.1, asn: 1, bfd: {enable: true}}\n".to_owned(),
                "vip.bgp.peers[0].bfd.enable: unknown field `enable`",
            ),
        ] {
            let e = errors(&bgp(&section));
            assert!(e.iter().any(|m| m.starts_with(want)), "want {want:?} in {e:?}");
        }
        let cases = [
            (
                format!("{MINIMAL}vip:\n  mode: bgp\n  address: 198.18.0.10\n"),
                "vip.bgp: required when mode is bgp",
            ),
            (
                format!("{MINIMAL}vip:\n  mode: bgp\n  address: 198.18.0.10\n  prefixLength: 24\n  bgp:\n    localAsn: 1\n    peers:\n    - {{address: 10.0.0.1, asn: 2}}\n"),
                "vip.prefixLength: bgp mode binds and announces host routes",
            ),
            (
                format!("{MINIMAL}vip:\n  mode: arp\n  interface: lo\n  address: 198.18.0.10\n  bgp:\n    localAsn: 1\n    peers: []\n"),
                "vip.bgp: set, but mode is not bgp",
            ),
            (
                format!("{MINIMAL}vip:\n  mode: bgp\n  address: 127.0.0.10\n  bgp:\n    localAsn: 1\n    peers:\n    - {{address: 10.0.0.1, asn: 2}}\n"),
                "vip.address: a loopback address cannot be announced over BGP",
            ),
            (
                "nodeId: 1\nraft:\n  address: '[::1]:9441'\napi:\n  address: 127.0.0.1:9442\nvip:\n  mode: bgp\n  address: 198.18.0.10\n  bgp:\n    localAsn: 1\n    peers:\n    - {address: 10.0.0.1, asn: 2}\n".to_owned(),
                "vip.bgp.routerId: required: raft.address is not an IPv4 address",
            ),
        ];
        for (text, want) in cases {
            let e = errors(&text);
            assert!(
                e.iter().any(|m| m.starts_with(want)),
                "want {want:?} in {e:?}"
            );
        }
    }

    #[test]
    fn a_vip_lease_above_the_election_timeout_warns() {
        assert_eq!(
            warnings(&format!(
                "{MINIMAL}vip:\n  mode: bind\n  address: 127.0.0.10\n"
            )),
            Vec::<String>::new()
        );
        let w = warnings(&format!(
            "{MINIMAL}vip:\n  mode: bind\n  address: 127.0.0.10\n  lease: 400ms\n  checkInterval: 50ms\n"
        ));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("vip.lease: 400ms is longer than raft.electionTimeoutMax (220ms)")
                && w[0].contains("(180ms)"),
            "{w:?}"
        );
    }

    /// The preflight checks read the certificate: an LB given a prober's
    /// certificate, for another address, is refused before it starts.
    #[test]
    fn preflight_refuses_another_components_certificate() {
        let pki = bulwark_testkit::Pki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lb.yaml");
        let write = |cert: &bulwark_testkit::CertFiles| {
            let t = cert.tls_files();
            std::fs::write(
                &file,
                format!(
                    "apiVersion: bulwark.dev/v1alpha1\nkind: LoadBalancerConfiguration\n{MINIMAL}tls:\n  certFile: {}\n  keyFile: {}\n  caFile: {}\n",
                    t.cert_file.display(),
                    t.key_file.display(),
                    t.ca_file.display()
                ),
            )
            .unwrap();
        };
        let good = pki.peer("lb-1", &["bulwark:lb"], &["127.0.0.1"]).unwrap();
        write(&good);
        let loaded =
            bulwark_common::config::load_checked::<LbConfig>(Some(&file), &Overrides::new());
        assert!(loaded.is_ok(), "{:?}", loaded.err());

        let prober = pki.client("prober-1", &["bulwark:probers"]).unwrap();
        write(&prober);
        let err = bulwark_common::config::load_checked::<LbConfig>(Some(&file), &Overrides::new())
            .unwrap_err();
        let e = err.messages();
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(
            e[0].starts_with("tls.certFile: ") && e[0].contains("lacks the serverAuth"),
            "{e:#?}"
        );
        assert!(
            e[1].contains("does not cover 127.0.0.1 (raft.advertiseAddress)"),
            "{e:#?}"
        );
        assert!(
            e[2].contains("CN=prober-1,O=bulwark:probers") && e[2].contains("access.peers"),
            "{e:#?}"
        );
    }

    /// `api`, `tls` and the list entries have required fields (an error
    /// names them); every other section has a default for each field.
    #[test]
    fn every_section_merges_with_its_defaults() {
        bulwark_common::assert_sections_merge!(
            "raft" => RaftConfig,
            "access" => AccessPolicy,
            "vip" => VipConfig,
            "proxy" => ProxyConfig,
            "proxy.tcpKeepalive" => crate::proxy::KeepaliveConfig,
            "routing" => RoutingConfig,
            "health" => HealthConfig,
            "logging" => LoggingConfig,
        );
    }
}
