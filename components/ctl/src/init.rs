//! `bulwarkctl init` and `bulwarkctl manifest`: every node's configs and
//! static pod manifests from a short cluster description (nodes,
//! addresses, zones, VIP, store URL), instead of three hand-edited files
//! per node.
//!
//! The files are the shipped examples' shape (deploy/config/cp-*/ are this
//! generator's output for deploy/config/cluster.yaml, and a test keeps it
//! so), each checked with the daemon's own validation before anything is
//! written. Checks that read the files a config names (certificates, keys,
//! the restore tools) run on the node, with `--check-config`, where those
//! files exist.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use bulwark_common::config::{ComponentConfig, check_offline};
use serde::Deserialize;

use crate::error::{CliError, Exit};

/// The static pod manifests, shipped in the image and identical on every
/// node (each reads its node's files under /etc/bulwark).
pub const MANIFESTS: [(&str, &str); 3] = [
    (
        "bulwark-lb.yaml",
        include_str!("../../../deploy/manifests/bulwark-lb.yaml"),
    ),
    (
        "bulwark-prober.yaml",
        include_str!("../../../deploy/manifests/bulwark-prober.yaml"),
    ),
    (
        "bulwark-backup.yaml",
        include_str!("../../../deploy/manifests/bulwark-backup.yaml"),
    ),
];

/// `bulwarkctl init`'s arguments.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The cluster description (kind: ClusterDescription; the examples are
    /// deploy/config/cluster.yaml, and cluster-routed.yaml for bgp mode).
    #[arg(long = "from", value_name = "FILE")]
    pub from: PathBuf,
    /// Where to write `<node>/{lb,prober,backup}.yaml`, `kubeadm-config.yaml`,
    /// `bulwarkctl.yaml` and `manifests/`. Existing files are not
    /// overwritten without --force.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Overwrite files that exist.
    #[arg(long)]
    pub force: bool,
}

/// `bulwarkctl manifest`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ManifestArgs {
    /// Which daemon's static pod manifest to print.
    #[arg(value_parser = ["lb", "prober", "backup"])]
    pub daemon: String,
}

/// A cluster as the operator describes it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterDescription {
    /// `apiVersion: bulwark.dev/v1alpha1`.
    pub api_version: String,
    /// `kind: ClusterDescription`.
    pub kind: String,
    /// The Kubernetes cluster's name (kubeadm's clusterName, the backup
    /// prefix, the bulwarkctl context).
    pub name: String,
    /// The virtual IP clients use.
    pub vip: VipDescription,
    /// Where backups go.
    pub store: StoreDescription,
    /// The control-plane nodes, the first forms the LB cluster.
    pub nodes: Vec<NodeDescription>,
    /// The operator's client certificate, for bulwarkctl.yaml.
    pub operator: CertPair,
    /// A read-only certificate (no operator organization), for a second
    /// context `<name>-readonly`, e.g. for monitoring scripts.
    #[serde(default)]
    pub readonly: Option<CertPair>,
}

/// The VIP.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VipDescription {
    pub address: IpAddr,
    /// Dual-stack: the IPv6 VIP, held together with an IPv4 `address`.
    #[serde(default)]
    pub address6: Option<IpAddr>,
    #[serde(default = "default_vip_port")]
    pub port: u16,
    /// arp mode: the interface on the nodes' shared segment (default
    /// eth0). bgp mode: where the holder binds the VIP (default lo).
    #[serde(default)]
    pub interface: Option<String>,
    /// A routed network: the leader announces the VIP over BGP (the LB's
    /// bgp mode) to the routers each node names in `nodes[].bgp`.
    #[serde(default)]
    pub bgp: Option<BgpDescription>,
}

/// bgp mode, cluster-wide.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpDescription {
    /// The LB nodes' AS number, the same on every node.
    pub local_asn: u32,
}

/// bgp mode, one node: its routers (usually its top-of-rack pair).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeBgpDescription {
    pub peers: Vec<PeerDescription>,
    /// The BGP identifier. Default: the node's address, which must then
    /// be IPv4.
    #[serde(default)]
    pub router_id: Option<std::net::Ipv4Addr>,
}

/// One router a node announces the VIP to.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerDescription {
    pub address: IpAddr,
    pub asn: u32,
    /// TCP MD5 signature key (RFC 2385).
    #[serde(default)]
    pub password: Option<String>,
    /// Run BFD with this router (it must run BFD for this node too).
    #[serde(default)]
    pub bfd: bool,
}

/// The backup store.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoreDescription {
    pub url: String,
    /// object_store options (e.g. `aws_region`), written as given.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

/// One control-plane node.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeDescription {
    pub name: String,
    pub address: IpAddr,
    pub zone: String,
    /// bgp mode (`vip.bgp`): this node's routers.
    #[serde(default)]
    pub bgp: Option<NodeBgpDescription>,
}

/// A certificate and its key.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_vip_port() -> u16 {
    8443
}

/// arp mode's interface when the description names none.
const DEFAULT_ARP_INTERFACE: &str = "eth0";

/// Ports every node uses (deploy/GUIDE.md's table).
const RAFT_PORT: u16 = 9441;
const API_PORT: u16 = 9442;
const LB_ADMIN_PORT: u16 = 9440;
const PROBER_ADMIN_PORT: u16 = 9443;
const BACKUP_GRPC_PORT: u16 = 9445;
const BACKUP_ADMIN_PORT: u16 = 9446;
const APISERVER_PORT: u16 = 6443;
const ETCD_CLIENT_PORT: u16 = 2379;
const LOCAL_LISTENER: &str = "127.0.0.1:7445";

/// Ports something on every control-plane node listens on at all of the
/// node's addresses, the VIP's included: a front on VIP:port could not
/// bind there. (Raft, the LB API, the backup API and etcd listen on the
/// node's own address only.)
const WILDCARD_PORTS: [(u16, &str); 6] = [
    (
        APISERVER_PORT,
        "the apiserver's port: kube-apiserver listens on it at every address of the node (kubeadm's default bind address, 0.0.0.0)",
    ),
    (
        10250,
        "the kubelet's port: it listens on every address of the node",
    ),
    (
        10256,
        "kube-proxy's health check port: it listens on every address of the node",
    ),
    (
        LB_ADMIN_PORT,
        "bulwark-lb's admin port (its generated admin.address listens on 0.0.0.0)",
    ),
    (
        PROBER_ADMIN_PORT,
        "bulwark-prober's admin port (its generated admin.address listens on 0.0.0.0)",
    ),
    (
        BACKUP_ADMIN_PORT,
        "bulwark-backup's admin port (its generated admin.address listens on 0.0.0.0)",
    ),
];

/// One generated file: where it goes under `--out`, and its text.
#[derive(Debug, PartialEq)]
pub struct File {
    pub path: PathBuf,
    pub text: String,
}

/// Runs `bulwarkctl init`.
pub fn run_init(args: &InitArgs) -> Result<(), CliError> {
    let text = std::fs::read_to_string(&args.from).map_err(|e| {
        CliError::new(
            Exit::Usage,
            format!("cannot read {}: {e}", args.from.display()),
        )
    })?;
    let cluster = parse(&text)
        .map_err(|e| CliError::new(Exit::Usage, format!("{}: {e}", args.from.display())))?;
    let files = generate(&cluster)
        .map_err(|e| CliError::new(Exit::Usage, format!("{}: {e}", args.from.display())))?;
    check_all(&files)?;
    write_all(&args.out, &files, args.force)?;
    print_next_steps(&args.out, &cluster)?;
    let warnings = [
        fault_tolerance_warning(cluster.nodes.len()),
        zone_majority_warning(&cluster.nodes),
    ];
    for w in warnings.into_iter().flatten() {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// Runs `bulwarkctl manifest DAEMON`.
pub fn run_manifest(args: &ManifestArgs) -> Result<(), CliError> {
    let name = format!("bulwark-{}.yaml", args.daemon);
    let (_, text) = MANIFESTS
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| CliError::new(Exit::Usage, format!("no manifest for {}", args.daemon)))?;
    crate::output::emit(text.as_bytes())
}

/// Reads a description and checks what serde cannot.
pub fn parse(text: &str) -> Result<ClusterDescription, String> {
    let c: ClusterDescription = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    if c.api_version != bulwark_common::config::API_VERSION {
        problems.push(format!(
            "apiVersion: {:?}, expected {:?}",
            c.api_version,
            bulwark_common::config::API_VERSION
        ));
    }
    if c.kind != "ClusterDescription" {
        problems.push(format!(
            "kind: {:?}, expected \"ClusterDescription\"",
            c.kind
        ));
    }
    if c.nodes.is_empty() {
        problems.push("nodes: at least one node is needed".into());
    }
    for i in 0..c.nodes.len() {
        problems.extend(node_problems(&c, i));
    }
    problems.extend(vip_port_problem(c.vip.port));
    problems.extend(address6_problem(&c.vip));
    match problems.is_empty() {
        true => Ok(c),
        false => Err(problems.join("; ")),
    }
}

/// What is wrong with the description's node `i`.
fn node_problems(c: &ClusterDescription, i: usize) -> Vec<String> {
    let n = &c.nodes[i];
    let mut problems = Vec::new();
    if n.name.is_empty() || n.zone.is_empty() {
        problems.push(format!("nodes[{i}]: name and zone must not be empty"));
    }
    let earlier = &c.nodes[..i];
    if earlier
        .iter()
        .any(|m| m.name == n.name || m.address == n.address)
    {
        problems.push(format!(
            "nodes[{i}]: {} ({}) repeats another node's name or address",
            n.name, n.address
        ));
    }
    if n.address == c.vip.address || Some(n.address) == c.vip.address6 {
        problems.push(format!(
            "nodes[{i}].address: {} is the VIP; the VIP must be an address no node owns",
            n.address
        ));
    }
    match (&c.vip.bgp, &n.bgp) {
        (Some(_), None) => problems.push(format!(
            "nodes[{i}].bgp: vip.bgp is set (bgp mode), so each node names its routers \
             (bgp: {{peers: [{{address: …, asn: …}}]}})"
        )),
        (Some(_), Some(b)) if b.peers.is_empty() => problems.push(format!(
            "nodes[{i}].bgp.peers: at least one router is needed"
        )),
        (None, Some(_)) => problems.push(format!(
            "nodes[{i}].bgp: routers are for bgp mode; set vip.bgp (localAsn) too, or remove this"
        )),
        _ => {}
    }
    if let Some(id) = router_id(n)
        && let Some(other) = earlier.iter().find(|m| router_id(m) == Some(id))
    {
        problems.push(format!(
            "nodes[{i}].bgp.routerId: {id} is {}'s BGP identifier too; each node needs its own",
            other.name
        ));
    }
    problems
}

/// The BGP identifier node `n`'s lb.yaml ends up with: the one given, else
/// its IPv4 address (the LB takes it from the Raft address).
fn router_id(n: &NodeDescription) -> Option<std::net::Ipv4Addr> {
    let bgp = n.bgp.as_ref()?;
    bgp.router_id.or(match n.address {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    })
}

/// A dual-stack VIP is an IPv4 `address` with an IPv6 `address6`.
fn address6_problem(vip: &VipDescription) -> Option<String> {
    let v6 = vip.address6?;
    (!v6.is_ipv6() || !vip.address.is_ipv4()).then(|| {
        format!(
            "vip.address6: {v6} with vip.address {}: a dual-stack VIP is an IPv4 address \
             with an IPv6 address6",
            vip.address
        )
    })
}

/// A VIP port another listener on every node already holds at all of its
/// addresses: each node's front would fail to bind it at start.
fn vip_port_problem(port: u16) -> Option<String> {
    let (_, owner) = WILDCARD_PORTS.iter().find(|(p, _)| *p == port)?;
    Some(format!(
        "vip.port: {port} is {owner}, so no node's front could listen on VIP:{port}; \
         leave vip.port out for the default, {}",
        default_vip_port()
    ))
}

/// What a cluster of fewer than three nodes cannot survive. The LB's Raft
/// group and kubeadm's stacked etcd each need a majority of the nodes.
fn fault_tolerance_warning(nodes: usize) -> Option<String> {
    let majority = nodes / 2 + 1;
    if nodes < 3 {
        return Some(format!(
            "{nodes} control-plane node{s}: the LB's Raft group and etcd each need a majority \
             ({majority} of {nodes}), so losing any one node stops the VIP and etcd; \
             three nodes survive the loss of one",
            s = if nodes == 1 { "" } else { "s" },
        ));
    }
    nodes.is_multiple_of(2).then(|| {
        format!(
            "{nodes} control-plane nodes: the LB's Raft group and etcd each need a majority \
             ({majority} of {nodes}), so they survive the loss of {lost}, as {odd} nodes do; \
             {next} nodes would survive the loss of {more}",
            lost = nodes - majority,
            odd = nodes - 1,
            next = nodes + 1,
            more = nodes - majority + 1,
        )
    })
}

/// A zone that holds a majority of the nodes takes the LB's Raft group
/// and etcd down with it; only said when the nodes are spread over zones
/// at all.
fn zone_majority_warning(nodes: &[NodeDescription]) -> Option<String> {
    let mut per_zone = std::collections::BTreeMap::<&str, usize>::new();
    for n in nodes {
        *per_zone.entry(n.zone.as_str()).or_default() += 1;
    }
    let majority = nodes.len() / 2 + 1;
    if per_zone.len() < 2 {
        return None;
    }
    let (zone, count) = per_zone.into_iter().find(|&(_, c)| c >= majority)?;
    Some(format!(
        "zone {zone} holds {count} of the {n} control-plane nodes, a majority: losing that \
         zone stops the VIP and etcd; spread the nodes so that no zone holds a majority (one \
         per zone over three zones)",
        n = nodes.len(),
    ))
}

/// Every file `init` writes, in order.
pub fn generate(c: &ClusterDescription) -> Result<Vec<File>, std::fmt::Error> {
    let mut files = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let dir = PathBuf::from(&node.name);
        files.push(File {
            path: dir.join("lb.yaml"),
            text: lb_config(c, i)?,
        });
        files.push(File {
            path: dir.join("prober.yaml"),
            text: prober_config(c, node)?,
        });
        files.push(File {
            path: dir.join("backup.yaml"),
            text: backup_config(c, node)?,
        });
    }
    files.push(File {
        path: "kubeadm-config.yaml".into(),
        text: kubeadm_config(c),
    });
    files.push(File {
        path: "bulwarkctl.yaml".into(),
        text: ctl_config(c),
    });
    for (name, text) in MANIFESTS {
        files.push(File {
            path: Path::new("manifests").join(name),
            text: text.to_owned(),
        });
    }
    Ok(files)
}

fn addr(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// `['a', 'b']` of each node's `ip:port`.
fn endpoints(c: &ClusterDescription, port: u16) -> String {
    let list: Vec<String> = c
        .nodes
        .iter()
        .map(|n| format!("'{}'", addr(n.address, port)))
        .collect();
    format!("[{}]", list.join(", "))
}

fn lb_config(c: &ClusterDescription, i: usize) -> Result<String, std::fmt::Error> {
    let n = &c.nodes[i];
    let (id, ip) = (i + 1, n.address);
    let mut s = String::new();
    writeln!(
        s,
        "# bulwark-lb on {name} ({ip}, {zone}): /etc/bulwark/lb.yaml.
# Check it with: bulwark-lb --config /etc/bulwark/lb.yaml --check-config
apiVersion: bulwark.dev/v1alpha1
kind: LoadBalancerConfiguration
nodeId: {id}
name: {name}
zone: {zone}
# The VIP spreads the cluster's clients over every apiserver; the node-local
# listener ({LOCAL_LISTENER}) keeps this node's own clients in its zone.
routing: {{vip: balanced, local: zonePreferred, minLocalHealthyShare: 0.5}}
dataDir: /var/lib/bulwark-lb
raft:
  address: '{raft}'
api:
  address: '{api}'
# /livez, /readyz, /metrics on every address of the node, so an in-cluster
# Prometheus can scrape it (docs/OPERATIONS.md, \"Monitoring\": no
# authentication; '127.0.0.1:{LB_ADMIN_PORT}' keeps it to the node).
admin:
  address: '0.0.0.0:{LB_ADMIN_PORT}'
logging:
  format: json
  level: info
# One certificate for the Raft transport and the API, both sides:
# CN=bulwark-lb-{name}, O=bulwark:lb, serverAuth+clientAuth, SAN {ip}.
tls:
  certFile: /etc/kubernetes/pki/bulwark/bulwark-lb.crt
  keyFile: /etc/kubernetes/pki/bulwark/bulwark-lb.key
  caFile: /etc/kubernetes/pki/ca.crt
access:
  operators: {{organizations: ['bulwark:operators', 'kubeadm:cluster-admins', 'system:masters']}}
  probers: {{organizations: ['bulwark:probers']}}
  peers: {{organizations: ['bulwark:lb']}}",
        name = n.name,
        zone = n.zone,
        raft = addr(ip, RAFT_PORT),
        api = addr(ip, API_PORT),
    )?;
    if i == 0 {
        writeln!(
            s,
            "# The cluster is formed once, by this node, from this list. Only {name}
# lists it: {others} start with an empty data dir and no initial
# members, and wait until `bulwarkctl lb add-member` admits them (GUIDE.md,
# \"Add the LB members\").
initialMembers:
- {{id: 1, name: {name}, zone: {zone}, raftAddress: '{raft}', apiAddress: '{api}', proxyAddress: '{LOCAL_LISTENER}'}}",
            name = n.name,
            zone = n.zone,
            others = others_than_first(c),
            raft = addr(ip, RAFT_PORT),
            api = addr(ip, API_PORT),
        )?;
    } else {
        writeln!(
            s,
            "# No initialMembers: this node waits, with an empty data dir, until the
# leader admits it (`bulwarkctl lb add-member --id {id} ...`, GUIDE.md)."
        )?;
    }
    vip_section(&mut s, c, n)?;
    writeln!(
        s,
        "# KubePrism-style listener: this node's kubelet and controllers may use
# https://{LOCAL_LISTENER} and keep working while the VIP moves.
localListener: '{LOCAL_LISTENER}'"
    )?;
    if i == 0 {
        writeln!(
            s,
            "# Seeded once, by the first leader, into an empty registry; afterwards
# the registry is what Raft says (`bulwarkctl lb add-backend` adds
# {others} once their apiservers have joined), and editing this
# list changes nothing: bulwark-lb logs where it and the registry part.
backends:
- {{id: {name}, address: '{api}', zone: {zone}}}",
            others = others_than_first(c),
            name = n.name,
            zone = n.zone,
            api = addr(ip, APISERVER_PORT),
        )?;
    }
    Ok(s)
}

/// lb.yaml's `vip:` section: arp mode, or bgp mode with node `n`'s routers.
fn vip_section(s: &mut String, c: &ClusterDescription, n: &NodeDescription) -> std::fmt::Result {
    let vip = &c.vip;
    writeln!(
        s,
        "# The VIP clients use (kubeadm's controlPlaneEndpoint, {endpoint}).
# Port {port}, not {APISERVER_PORT}: the apiserver on this host already listens on
# 0.0.0.0:{APISERVER_PORT}, and every node keeps a front listener on VIP:port.",
        endpoint = addr(vip.address, vip.port),
        port = vip.port,
    )?;
    let (Some(bgp), Some(node_bgp)) = (&vip.bgp, &n.bgp) else {
        writeln!(s, "vip:\n  mode: arp\n  address: {}", vip.address)?;
        address6_and_port(s, vip)?;
        let iface = vip.interface.as_deref().unwrap_or(DEFAULT_ARP_INTERFACE);
        return writeln!(s, "  interface: {iface}");
    };
    writeln!(
        s,
        "# A routed network (GUIDE.md, \"A routed network: bgp mode\"): the holder
# binds the VIP on {iface} and announces it to this node's routers.
vip:
  mode: bgp
  address: {address}",
        iface = vip.interface.as_deref().unwrap_or("lo"),
        address = vip.address,
    )?;
    address6_and_port(s, vip)?;
    if let Some(iface) = &vip.interface {
        writeln!(s, "  interface: {iface}")?;
    }
    writeln!(s, "  bgp:\n    localAsn: {}", bgp.local_asn)?;
    if let Some(id) = node_bgp.router_id {
        writeln!(s, "    routerId: {id}")?;
    }
    writeln!(s, "    peers:")?;
    for p in &node_bgp.peers {
        write!(s, "    - {{address: '{}', asn: {}", p.address, p.asn)?;
        if let Some(password) = &p.password {
            write!(s, ", password: '{}'", password.replace('\'', "''"))?;
        }
        if p.bfd {
            write!(s, ", bfd: {{enabled: true}}")?;
        }
        writeln!(s, "}}")?;
    }
    Ok(())
}

fn address6_and_port(s: &mut String, vip: &VipDescription) -> std::fmt::Result {
    if let Some(v6) = vip.address6 {
        writeln!(s, "  address6: '{v6}'")?;
    }
    writeln!(s, "  port: {}", vip.port)
}

/// The nodes that join the first one's LB cluster, for its comments.
fn others_than_first(c: &ClusterDescription) -> String {
    match &c.nodes[1..] {
        [] => "later nodes".to_owned(),
        rest => rest
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(" and "),
    }
}

fn prober_config(c: &ClusterDescription, n: &NodeDescription) -> Result<String, std::fmt::Error> {
    let mut targets = String::new();
    let mut members = String::new();
    for m in &c.nodes {
        writeln!(
            targets,
            "  - {{id: {}, address: '{}', zone: {}}}",
            m.name,
            addr(m.address, APISERVER_PORT),
            m.zone
        )?;
        writeln!(
            members,
            "  - {{name: {}, address: '{}'}}",
            m.name,
            addr(m.address, ETCD_CLIENT_PORT)
        )?;
    }
    let mut s = String::new();
    write!(
        s,
        "# bulwark-prober on {name} ({zone}): /etc/bulwark/prober.yaml.
# Check it with: bulwark-prober --config /etc/bulwark/prober.yaml --check-config
apiVersion: bulwark.dev/v1alpha1
kind: ProberConfiguration
nodeName: {name}
zone: {zone}
# /livez, /readyz, /metrics on every address of the node, so an in-cluster
# Prometheus can scrape it (docs/OPERATIONS.md, \"Monitoring\": no
# authentication; '127.0.0.1:{PROBER_ADMIN_PORT}' keeps it to the node).
admin:
  address: '0.0.0.0:{PROBER_ADMIN_PORT}'
logging:
  format: json
  level: info
# Every apiserver, from this zone. Ids are the LB backend ids the
# observations vote on. /readyz and /livez are open to anonymous clients
# (kubeadm's default), so only the cluster CA is needed.
apiservers:
  tls:
    caFile: /etc/kubernetes/pki/ca.crt
  targets:
{targets}# etcd /health with kubeadm's healthcheck-client certificate (made for
# exactly this).
etcd:
  tls:
    caFile: /etc/kubernetes/pki/etcd/ca.crt
    certFile: /etc/kubernetes/pki/etcd/healthcheck-client.crt
    keyFile: /etc/kubernetes/pki/etcd/healthcheck-client.key
  members:
{members}# The LB API on every node; the prober finds the leader and follows it.
# Its identity: CN=bulwark-prober-{name}, O=bulwark:probers, clientAuth.
report:
  endpoints: {lb}
  tls:
    certFile: /etc/kubernetes/pki/bulwark/prober.crt
    keyFile: /etc/kubernetes/pki/bulwark/prober.key
    caFile: /etc/kubernetes/pki/ca.crt
",
        name = n.name,
        zone = n.zone,
        lb = endpoints(c, API_PORT),
    )?;
    Ok(s)
}

fn backup_config(c: &ClusterDescription, n: &NodeDescription) -> Result<String, std::fmt::Error> {
    let etcd: Vec<String> = c
        .nodes
        .iter()
        .map(|m| format!("'https://{}'", addr(m.address, ETCD_CLIENT_PORT)))
        .collect();
    let mut options = String::new();
    if !c.store.options.is_empty() {
        options.push_str("  options:\n");
        for (k, v) in &c.store.options {
            writeln!(options, "    {k}: {v}")?;
        }
    }
    let mut s = String::new();
    write!(
        s,
        "# bulwark-backup on {name}: /etc/bulwark/backup.yaml. The nodes'
# files differ only in nodeName and grpc.address; one instance (elected
# through etcd) runs the schedule, any of them answers bulwarkctl.
# Check it with: bulwark-backup --config /etc/bulwark/backup.yaml --check-config
apiVersion: bulwark.dev/v1alpha1
kind: BackupConfiguration
nodeName: {name}
clusterName: {cluster}
# /livez, /readyz, /metrics on every address of the node, so an in-cluster
# Prometheus can scrape it (docs/OPERATIONS.md, \"Monitoring\": no
# authentication; '127.0.0.1:{BACKUP_ADMIN_PORT}' keeps it to the node).
admin:
  address: '0.0.0.0:{BACKUP_ADMIN_PORT}'
logging:
  format: json
  level: info
# Serving and peer certificate (the restore coordinator calls the other
# nodes' agents with it): CN=bulwark-backup-{name}, O=bulwark:backup,
# serverAuth+clientAuth, SAN {ip}.
grpc:
  address: '{grpc}'
  tls:
    certFile: /etc/kubernetes/pki/bulwark/backup.crt
    keyFile: /etc/kubernetes/pki/bulwark/backup.key
    caFile: /etc/kubernetes/pki/ca.crt
  access:
    operators: {{organizations: ['bulwark:operators', 'kubeadm:cluster-admins', 'system:masters']}}
    peers: {{organizations: ['bulwark:backup']}}
# kubeadm's apiserver-etcd-client identity: the one etcd client that may
# read every key.
etcd:
  endpoints: [{etcd}]
  tls:
    certFile: /etc/kubernetes/pki/apiserver-etcd-client.crt
    keyFile: /etc/kubernetes/pki/apiserver-etcd-client.key
    caFile: /etc/kubernetes/pki/etcd/ca.crt
  snapshotFrom: highestRevision
# Off the control-plane hosts: a backup on the disk it protects is no
# backup. Credentials come from the node's instance role (or put
# aws_access_key_id / aws_secret_access_key here; this file is 0600).
store:
  url: {url}
{options}# etcd holds every Secret: encrypt before upload. The recipient (public)
# key encrypts; the identity decrypts for verify, drills and restore.
encryption:
  recipientFile: /etc/bulwark/backup-age.pub
  identityFiles: [/etc/bulwark/backup-age.key]
schedule:
  interval: 1h
retention:
  policy: {{exponential: {{keepAllWithin: 1h, hourly: 24, daily: 7, weekly: 4}}}}
# A daily restore drill of the newest snapshot into a throwaway etcd on
# loopback; the tools ship in the image.
drill:
  interval: 24h
  etcdutl: /usr/local/bin/etcdutl
  etcd: /usr/local/bin/etcd
  workDir: /var/lib/bulwark/drill
# Deltas are on by default: after each snapshot the elected instance records
# every change (flushed every 500 ms) so a restore can reach any revision.
# This node's restore agent: `bulwarkctl restore` stops etcd by moving its
# manifest out of the kubelet's dir, keeps the old data dir beside the new
# one, and puts the manifest back. Member name, data dir and URLs are read
# from etcd's manifest; `peers` is every node's agent, this one included.
restore:
  etcdManifest: /etc/kubernetes/manifests/etcd.yaml
  stateDir: /var/lib/bulwark/restore
  peers: {peers}
",
        name = n.name,
        cluster = c.name,
        ip = n.address,
        grpc = addr(n.address, BACKUP_GRPC_PORT),
        etcd = etcd.join(", "),
        url = c.store.url,
        peers = endpoints(c, BACKUP_GRPC_PORT),
    )?;
    Ok(s)
}

fn kubeadm_config(c: &ClusterDescription) -> String {
    let first = &c.nodes[0];
    format!(
        "# kubeadm init --config kubeadm-config.yaml on {first_name} (GUIDE.md). The
# apiservers keep their port {APISERVER_PORT}; clients reach them through the VIP that
# bulwark-lb holds, on {port}.
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
localAPIEndpoint:
  advertiseAddress: {first_ip}
  bindPort: {APISERVER_PORT}
nodeRegistration:
  name: {first_name}
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
clusterName: {cluster}
controlPlaneEndpoint: {endpoint}
apiServer:
  # Every address the front serves the apiservers under must be in the
  # serving certificate's SANs (clients verify the apiserver's certificate
  # through the TCP passthrough): the VIP, and 127.0.0.1 for each node's
  # node-local listener ({LOCAL_LISTENER}, the kubelet's server; GUIDE.md).
  certSANs: [{sans}, 127.0.0.1]
  extraArgs:
    # Now and then (0.1 % of requests) tell an HTTP/2 client to reconnect,
    # so clients that piled onto the survivors while an apiserver was down
    # spread out again once it is back (GUIDE.md, step 1).
    - name: goaway-chance
      value: \"0.001\"
etcd:
  local:
    dataDir: /var/lib/etcd
",
        first_name = first.name,
        first_ip = first.address,
        port = c.vip.port,
        cluster = c.name,
        endpoint = addr(c.vip.address, c.vip.port),
        sans = match c.vip.address6 {
            Some(v6) => format!("{}, '{v6}'", c.vip.address),
            None => c.vip.address.to_string(),
        },
    )
}

fn ctl_config(c: &ClusterDescription) -> String {
    let mut text = format!(
        "# bulwarkctl contexts: ~/.config/bulwark/bulwarkctl.yaml (or --config FILE,
# or $BULWARKCTL_CONFIG). Flags and BULWARKCTL_* variables override a
# context field by field.
apiVersion: bulwark.dev/v1alpha1
kind: BulwarkctlConfiguration
currentContext: {name}
contexts:
# An operator: may drain, change membership, take, delete and restore
# backups. The certificate carries O=bulwark:operators, which grants
# nothing in Kubernetes (`bulwarkctl certs issue --operator NAME`, GUIDE.md
# \"Certificates\").
",
        name = c.name,
    );
    text.push_str(&ctl_context(c, &c.name, &c.operator));
    if let Some(r) = &c.readonly {
        text.push_str(
            "# Read-only (status, lists, health): any certificate from the cluster CA
# without an operator O, e.g. for monitoring scripts.
",
        );
        text.push_str(&ctl_context(c, &format!("{}-readonly", c.name), r));
    }
    text
}

/// One bulwarkctl context: the cluster's endpoints, with `files` as the
/// client identity.
fn ctl_context(c: &ClusterDescription, name: &str, files: &CertPair) -> String {
    format!(
        "- name: {name}
  ca: /etc/kubernetes/pki/ca.crt
  cert: {cert}
  key: {key}
  lb:
    endpoints: {lb}
  backup:
    endpoints: {backup}
",
        cert = files.cert.display(),
        key = files.key.display(),
        lb = endpoints(c, API_PORT),
        backup = endpoints(c, BACKUP_GRPC_PORT),
    )
}

/// Each daemon config through its daemon's validation (all but the file
/// reads); one error lists every problem of every file.
fn check_all(files: &[File]) -> Result<(), CliError> {
    let mut problems = Vec::new();
    for f in files {
        let checked = match f.path.file_name().and_then(|n| n.to_str()) {
            Some("lb.yaml") => check::<bulwark_lb::config::LbConfig>(&f.text),
            Some("prober.yaml") => check::<bulwark_prober::ProberConfig>(&f.text),
            Some("backup.yaml") => check::<bulwark_backup::BackupConfig>(&f.text),
            _ => Ok(()),
        };
        if let Err(e) = checked {
            problems.push(format!("{}: {e}", f.path.display()));
        }
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(CliError::new(
            Exit::Usage,
            format!(
                "the generated configs do not validate (nothing was written):\n  {}",
                problems.join("\n  ")
            ),
        )),
    }
}

fn check<T: ComponentConfig>(text: &str) -> Result<(), String> {
    check_offline::<T>(text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Writes every file under `out`; refuses (writing nothing) when one
/// exists and `force` is off. Configs are 0600 (they name key files and
/// may hold store credentials).
fn write_all(out: &Path, files: &[File], force: bool) -> Result<(), CliError> {
    let fail = |what: String| CliError::new(Exit::Failure, what);
    if !force {
        let existing: Vec<String> = files
            .iter()
            .map(|f| out.join(&f.path))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            return Err(CliError::new(
                Exit::Usage,
                format!("would overwrite {}", existing.join(", ")),
            )
            .hint("pass --force to replace them, or choose another --out"));
        }
    }
    for f in files {
        let path = out.join(&f.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
        }
        write_private(&path, &f.text)
            .map_err(|e| fail(format!("writing {}: {e}", path.display())))?;
    }
    Ok(())
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn print_next_steps(out: &Path, c: &ClusterDescription) -> Result<(), CliError> {
    crate::output::emit(next_steps(out, c).as_bytes())
}

/// What to do with the files, node by node.
fn next_steps(out: &Path, c: &ClusterDescription) -> String {
    let mut text = format!(
        "wrote the configs of {} nodes under {}\nnext (deploy/GUIDE.md walks each step):\n",
        c.nodes.len(),
        out.display()
    );
    for n in &c.nodes {
        text.push_str(&format!(
            "  {}: install {}/{}/*.yaml as /etc/bulwark/, `bulwarkctl certs issue` (root, with kubeadm's CA key), manifests/ into /etc/kubernetes/manifests/, then bulwark-<daemon> --config /etc/bulwark/<daemon>.yaml --check-config\n",
            n.name,
            out.display(),
            n.name
        ));
    }
    text.push_str(&format!(
        "  {}: kubeadm init --config {}/kubeadm-config.yaml --upload-certs\n",
        c.nodes[0].name,
        out.display()
    ));
    // The advertise address is also the one kubeadm's etcd member listens
    // on: the probers and backups dial each node's etcd there.
    for n in &c.nodes[1..] {
        text.push_str(&format!(
            "  {}: kubeadm join {} --control-plane --apiserver-advertise-address {} \
             (plus the token, CA hash and certificate key kubeadm init printed)\n",
            n.name,
            addr(c.vip.address, c.vip.port),
            n.address
        ));
    }
    text.push_str(&router_steps(c));
    text
}

/// bgp mode: what each node's routers need (GUIDE.md has a BIRD example).
fn router_steps(c: &ClusterDescription) -> String {
    let Some(bgp) = &c.vip.bgp else {
        return String::new();
    };
    let routes = match c.vip.address6 {
        Some(v6) => format!("{}/32 and {v6}/128", c.vip.address),
        None => format!("{}/{}", c.vip.address, host_prefix(c.vip.address)),
    };
    let mut text = format!(
        "routers (GUIDE.md, \"A routed network: bgp mode\"): each peers with its node, \
         AS {}, and accepts only {routes} from it:\n",
        bgp.local_asn
    );
    for n in &c.nodes {
        for p in n.bgp.iter().flat_map(|b| &b.peers) {
            let bfd = if p.bfd { ", with BFD" } else { "" };
            // A session runs over the peer's family: the description knows
            // one address of each node.
            let neighbor = match p.address.is_ipv4() == n.address.is_ipv4() {
                true => format!("{} ({})", n.address, n.name),
                false => format!(
                    "{}'s IPv{} address",
                    n.name,
                    if p.address.is_ipv4() { 4 } else { 6 }
                ),
            };
            text.push_str(&format!(
                "  {} (AS {}): neighbor {neighbor}{bfd}\n",
                p.address, p.asn
            ));
        }
    }
    text
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/config/cluster.yaml"
        ))
        .unwrap()
    }

    /// deploy/config/ is this generator's output for the example
    /// description: the shipped files and `init` never drift apart.
    #[test]
    fn the_shipped_configs_are_the_example_descriptions_output() {
        let files = generate(&parse(&example()).unwrap()).unwrap();
        check_all(&files).unwrap();
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"));
        for f in &files {
            let shipped = match f.path.starts_with("manifests") {
                true => root.join(&f.path),
                false => root.join("config").join(&f.path),
            };
            let text = std::fs::read_to_string(&shipped)
                .unwrap_or_else(|e| panic!("{}: {e}", shipped.display()));
            assert_eq!(
                text,
                f.text,
                "{} differs from `bulwarkctl init --from deploy/config/cluster.yaml`'s {}",
                shipped.display(),
                f.path.display()
            );
        }
    }

    #[test]
    fn bad_descriptions_get_every_problem() {
        let text = example()
            .replace("address: 10.0.0.12", "address: 10.0.0.11")
            .replace("kind: ClusterDescription", "kind: Cluster");
        let e = parse(&text).unwrap_err();
        assert!(e.contains("kind: \"Cluster\""), "{e}");
        assert!(e.contains("nodes[1]: cp-2 (10.0.0.11) repeats"), "{e}");
        let e = parse(&example().replace("zone: zone-a", "zone: zone-a, rack: 3")).unwrap_err();
        assert!(e.contains("unknown field `rack`"), "{e}");
    }

    #[test]
    fn a_vip_port_a_node_already_listens_on_everywhere_is_refused() {
        for (port, owner) in [(6443, "the apiserver's port"), (9443, "bulwark-prober's")] {
            let e = parse(&example().replace("port: 8443", &format!("port: {port}"))).unwrap_err();
            assert!(e.contains(&format!("vip.port: {port} is {owner}")), "{e}");
            assert!(e.contains("the default, 8443"), "{e}");
        }
        // The LB's own admin port is in the table too, so it gets the same
        // message before the generated lb.yaml's check would refuse it.
        let e = parse(&example().replace("port: 8443", "port: 9440")).unwrap_err();
        assert!(e.contains("bulwark-lb's admin port"), "{e}");
        // Ports bound to the node's own address only are no clash.
        assert!(parse(&example().replace("port: 8443", "port: 9441")).is_ok());
    }

    fn shipped(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/config")
            .join(name);
        std::fs::read_to_string(path).unwrap()
    }

    fn text_of<'a>(files: &'a [File], path: &str) -> &'a str {
        &files
            .iter()
            .find(|f| f.path == Path::new(path))
            .unwrap()
            .text
    }

    fn lb_of(files: &[File], node: &str) -> bulwark_lb::config::LbConfig {
        let text = text_of(files, &format!("{node}/lb.yaml"));
        check_offline::<bulwark_lb::config::LbConfig>(text)
            .unwrap()
            .config
    }

    /// The routed example: every node announces the VIP to its own
    /// routers, and the daemons accept what init writes.
    #[test]
    fn a_routed_description_gives_each_node_its_own_routers() {
        use bulwark_lb::config::VipMode;
        let files = generate(&parse(&shipped("cluster-routed.yaml")).unwrap()).unwrap();
        check_all(&files).unwrap();
        for (node, rack) in [("cp-1", 1u8), ("cp-2", 2), ("cp-3", 3)] {
            let vip = lb_of(&files, node).vip;
            assert_eq!(vip.mode, VipMode::Bgp, "{node}");
            assert_eq!(vip.address, Some("10.255.0.10".parse().unwrap()));
            assert_eq!(
                vip.interface, None,
                "{node}: bgp mode binds on lo by default"
            );
            let bgp = vip.bgp.unwrap();
            assert_eq!(bgp.local_asn, 65010);
            let peers: Vec<_> = bgp
                .peers
                .iter()
                .map(|p| (p.address, p.asn, p.bfd.enabled))
                .collect();
            assert_eq!(
                peers,
                [1, 2].map(|r| (
                    IpAddr::from([10, 1, rack, r]),
                    65000 + u32::from(rack),
                    true
                )),
                "{node}"
            );
        }
        let steps = router_steps(&parse(&shipped("cluster-routed.yaml")).unwrap());
        let lines: Vec<&str> = steps.lines().collect();
        assert_eq!(lines.len(), 7, "{steps}");
        assert!(
            lines[0].contains("AS 65010, and accepts only 10.255.0.10/32"),
            "{steps}"
        );
        assert_eq!(
            lines[3],
            "  10.1.2.1 (AS 65002): neighbor 10.1.2.11 (cp-2), with BFD"
        );
        assert_eq!(router_steps(&parse(&example()).unwrap()), "");
        let dual = shipped("cluster-routed.yaml").replace(
            "    - {address: 10.1.1.2, asn: 65001, bfd: true}",
            "    - {address: 'fd01:1::1', asn: 65001}",
        );
        let steps = router_steps(&parse(&dual).unwrap());
        assert!(
            steps.contains("  fd01:1::1 (AS 65001): neighbor cp-1's IPv6 address\n"),
            "{steps}"
        );
        let kubeadm = text_of(&files, "kubeadm-config.yaml");
        assert!(
            kubeadm.contains("controlPlaneEndpoint: 10.255.0.10:8443"),
            "{kubeadm}"
        );
    }

    #[test]
    fn a_dual_stack_vip_is_held_and_served_under_both_addresses() {
        let text = example().replace(
            "address: 10.0.0.10,",
            "address: 10.0.0.10, address6: 'fd00::10',",
        );
        let files = generate(&parse(&text).unwrap()).unwrap();
        check_all(&files).unwrap();
        let vip = lb_of(&files, "cp-2").vip;
        assert_eq!(vip.address6, Some("fd00::10".parse().unwrap()));
        assert_eq!(vip.interface.as_deref(), Some("eth0"));
        let kubeadm = text_of(&files, "kubeadm-config.yaml");
        assert!(
            kubeadm.contains("certSANs: [10.0.0.10, 'fd00::10', 127.0.0.1]"),
            "{kubeadm}"
        );
        // The IPv6 VIP is no node's address either, and is IPv6.
        let e = parse(&text.replace("address: 10.0.0.13", "address: 'fd00::10'")).unwrap_err();
        assert!(e.contains("nodes[2].address: fd00::10 is the VIP"), "{e}");
        let e = parse(&text.replace("address6: 'fd00::10'", "address6: 10.0.0.9")).unwrap_err();
        assert!(
            e.contains("vip.address6: 10.0.0.9 with vip.address 10.0.0.10"),
            "{e}"
        );
    }

    #[test]
    fn routers_and_bgp_mode_come_together() {
        let routed = shipped("cluster-routed.yaml");
        let e = parse(&routed.replace("  bgp: {localAsn: 65010}\n", "")).unwrap_err();
        assert!(
            e.contains("nodes[0].bgp: routers are for bgp mode; set vip.bgp"),
            "{e}"
        );
        let node0 = "  bgp:\n    peers:\n    - {address: 10.1.1.1, asn: 65001, bfd: true}\n    - {address: 10.1.1.2, asn: 65001, bfd: true}\n";
        assert!(routed.contains(node0));
        let e = parse(&routed.replacen(node0, "", 1)).unwrap_err();
        assert!(
            e.contains("nodes[0].bgp: vip.bgp is set (bgp mode), so each node names its routers"),
            "{e}"
        );
        assert!(!e.contains("nodes[1]"), "{e}");
        let e = parse(&routed.replacen(node0, "  bgp: {peers: []}\n", 1)).unwrap_err();
        assert_eq!(e, "nodes[0].bgp.peers: at least one router is needed");
        // cp-2 given cp-1's address as its identifier.
        let e = parse(&routed.replacen(
            "    peers:\n    - {address: 10.1.2.1",
            "    routerId: 10.1.1.11\n    peers:\n    - {address: 10.1.2.1",
            1,
        ))
        .unwrap_err();
        assert_eq!(
            e,
            "nodes[1].bgp.routerId: 10.1.1.11 is cp-1's BGP identifier too; each node needs its own"
        );
    }

    /// Each joining node advertises the address its configs name (kubeadm
    /// would pick the default route's on a node with several).
    #[test]
    fn the_next_steps_join_each_node_under_its_own_address() {
        let steps = next_steps(Path::new("out"), &parse(&example()).unwrap());
        let joins: Vec<&str> = steps
            .lines()
            .filter(|l| l.contains("kubeadm join"))
            .collect();
        assert_eq!(joins.len(), 2, "{steps}");
        assert!(
            joins[1].starts_with(
                "  cp-3: kubeadm join 10.0.0.10:8443 --control-plane --apiserver-advertise-address 10.0.0.13 "
            ),
            "{steps}"
        );
    }

    /// Clouds name nodes by their FQDN; such a name is the node's backend
    /// id as it is.
    #[test]
    fn nodes_named_by_their_fqdn_keep_their_names() {
        let fqdn = "ip-10-0-0-11.eu-west-1.compute.internal";
        let text = example().replace("name: cp-1,", &format!("name: {fqdn},"));
        let files = generate(&parse(&text).unwrap()).unwrap();
        check_all(&files).unwrap();
        let lb = lb_of(&files, fqdn);
        assert_eq!(lb.backends[0].id, fqdn);
        assert_eq!(lb.name.as_deref(), Some(fqdn));
    }

    #[test]
    fn fewer_than_three_nodes_are_warned_of() {
        assert_eq!(fault_tolerance_warning(3), None);
        assert_eq!(fault_tolerance_warning(5), None);
        let two = fault_tolerance_warning(2).unwrap();
        assert!(two.starts_with("2 control-plane nodes:"), "{two}");
        assert!(two.contains("(2 of 2)"), "{two}");
        let one = fault_tolerance_warning(1).unwrap();
        assert!(one.starts_with("1 control-plane node:"), "{one}");
        assert!(one.contains("(1 of 1)"), "{one}");
    }

    #[test]
    fn an_even_count_and_a_zone_with_a_majority_are_warned_of() {
        let four = fault_tolerance_warning(4).unwrap();
        assert!(
            four.contains(
                "(3 of 4), so they survive the loss of 1, as 3 nodes do; 5 nodes would survive \
                 the loss of 2"
            ),
            "{four}"
        );
        assert!(
            fault_tolerance_warning(6)
                .unwrap()
                .contains("loss of 2, as 5 nodes do")
        );

        let c = parse(&example()).unwrap();
        assert_eq!(zone_majority_warning(&c.nodes), None, "one node per zone");
        let two_in_a = parse(&example().replace("zone: zone-b", "zone: zone-a")).unwrap();
        let w = zone_majority_warning(&two_in_a.nodes).unwrap();
        assert!(
            w.starts_with("zone zone-a holds 2 of the 3 control-plane nodes, a majority"),
            "{w}"
        );
        let one_zone = parse(
            &example()
                .replace("zone: zone-b", "zone: zone-a")
                .replace("zone: zone-c", "zone: zone-a"),
        )
        .unwrap();
        assert_eq!(
            zone_majority_warning(&one_zone.nodes),
            None,
            "no zones to spread over"
        );
    }

    #[test]
    fn a_description_the_daemons_refuse_writes_nothing() {
        // A store bulwark-backup cannot write to, and a VIP port of 0.
        let text = example()
            .replace("s3://example-etcd-backups", "ftp://example-etcd-backups")
            .replace("port: 8443", "port: 0");
        let files = generate(&parse(&text).unwrap()).unwrap();
        let e = check_all(&files).unwrap_err().to_string();
        for file in ["cp-1/lb.yaml", "cp-1/backup.yaml", "cp-3/backup.yaml"] {
            assert!(e.contains(file), "{file}: {e}");
        }
        assert!(e.contains("unsupported store URL scheme \"ftp\""), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("cluster.yaml");
        std::fs::write(&from, text).unwrap();
        let out = dir.path().join("out");
        let args = InitArgs {
            from,
            out: out.clone(),
            force: false,
        };
        assert!(run_init(&args).is_err());
        assert!(!out.exists(), "nothing is written");
    }

    #[test]
    fn init_writes_private_files_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("cluster.yaml");
        std::fs::write(&from, example()).unwrap();
        let args = InitArgs {
            from,
            out: dir.path().join("out"),
            force: false,
        };
        run_init(&args).unwrap();
        let lb = args.out.join("cp-2/lb.yaml");
        let mode = std::fs::metadata(&lb).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = run_init(&args).unwrap_err();
        assert!(e.to_string().contains("would overwrite"), "{e}");
        run_init(&InitArgs {
            force: true,
            ..args
        })
        .unwrap();
    }
}
