//! bgp mode on a network-namespace lab: a BIRD 2 router (Debian's `bird2`,
//! installed by `cargo xtask setup`) peering with the LB hosts, and a
//! client whose only way to the VIP is through that router.
//!
//! ```text
//!   LB hosts: bulwark-lb, bgp mode, AS 65010, VIP 10.255.0.10 bound on lo
//!      |  eBGP to the router's bridge address (hold time 3s)
//!   the lab's bridge
//!      |
//!   router: bird (AS 65000), forwards; exports what it learns to its kernel
//!      |  veth 10.99.0.0/30
//!   client: its route to the VIP goes via the router
//! ```
//!
//! The VIP is outside every link's subnet, so nothing reaches it by ARP:
//! only the route the holder announces brings the client's connections to
//! it. With BFD, bird runs a `protocol bfd` and `bfd on` on every BGP
//! session, and the nodes enable BFD on theirs. Dual-stack adds an IPv6 VIP (`fd00:255::10`, a /128 over IPv6
//! sessions) and a TCP MD5 password on the IPv4 sessions.
//!
//! The pieces ([`wire_client_behind_router`], [`Bird`], [`bgp_vip`], the
//! `lo` and RIB readers) are shared by the netns tests
//! (components/lb/tests/lb_bgp_netns.rs, through [`BgpLab`]: three LB
//! nodes with an echo backend) and the bench suite's bgp runs
//! (bench/src/suite/: the suite's own LB nodes, probers and apiservers),
//! so the benchmark measures the lab the tests check.

// Test helpers panic rather than return errors where the caller is a test
// (see the crate docs); what the bench calls returns errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bulwark_api::lb::v1 as lb;
use bulwark_common::tls::TlsMaterial;
use bulwark_lb::config::{BgpConfig, LbConfig, VipMode};

use super::lab::{BACKEND_PORT, VIP_PORT, echo, status_via};
use super::{LbSpec, lb_process, serve_echo, test_timers};
use crate::{Host, Lab, Pki, Process, ProcessBuilder, TestDir, config, tools};

/// The routed VIP: outside every link's subnet.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 10);
/// The dual-stack lab's IPv6 VIP.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, 0x10);
/// The LB nodes' AS.
pub const LB_ASN: u32 = 65010;
/// The router's AS.
pub const ROUTER_ASN: u32 = 65000;
/// The router's side of the client link.
pub const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The client's side of it.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The dual-stack lab's IPv4 sessions are TCP-MD5 signed with this key
/// (both sides), its IPv6 ones are not.
pub const PASSWORD: &str = "bulwark-md5";

/// A veth from `router` to `client`; the client's route to the VIP (and
/// to nothing else off its own links) goes through the router, and the LB
/// hosts route the client's link back through it too. Dual-stack: the
/// same in IPv6 (`fd00:99::/64`). The client keeps whatever other links
/// it has (the bench's client also reaches an arp-mode VIP on the bridge).
pub fn wire_client_behind_router(
    lb_hosts: &[Host],
    router: &Host,
    client: &Host,
    dual: bool,
) -> anyhow::Result<()> {
    let ip = |h: &Host, args: &[&str]| {
        h.exec_ok("ip", args)
            .with_context(|| format!("ip {} on {}", args.join(" "), h.name()))
            .map(drop)
    };
    let client_ns = client.netns();
    let router_side = format!("{ROUTER_CLIENT_SIDE}/30");
    let client_side = format!("{CLIENT_ADDR}/30");
    let vip_route = format!("{VIP}/32");
    let via = ROUTER_CLIENT_SIDE.to_string();
    ip(
        router,
        &[
            "link", "add", "rt0", "type", "veth", "peer", "name", "cl0", "netns", client_ns,
        ],
    )?;
    ip(router, &["addr", "add", &router_side, "dev", "rt0"])?;
    ip(router, &["link", "set", "rt0", "up"])?;
    router.exec_ok("sysctl", ["-qw", "net.ipv4.ip_forward=1"])?;
    ip(client, &["addr", "add", &client_side, "dev", "cl0"])?;
    ip(client, &["link", "set", "cl0", "up"])?;
    ip(client, &["route", "add", &vip_route, "via", &via])?;
    let router4 = router.addr().to_string();
    for h in lb_hosts {
        ip(h, &["route", "add", "10.99.0.0/30", "via", &router4])?;
    }
    if !dual {
        return Ok(());
    }
    router.exec_ok("sysctl", ["-qw", "net.ipv6.conf.all.forwarding=1"])?;
    ip(
        router,
        &["addr", "add", "fd00:99::1/64", "dev", "rt0", "nodad"],
    )?;
    ip(
        client,
        &["addr", "add", "fd00:99::2/64", "dev", "cl0", "nodad"],
    )?;
    let vip6_route = format!("{VIP6}/128");
    ip(
        client,
        &["-6", "route", "add", &vip6_route, "via", "fd00:99::1"],
    )?;
    let router6 = router.addr6().to_string();
    for h in lb_hosts {
        ip(h, &["-6", "route", "add", "fd00:99::/64", "via", &router6])?;
    }
    Ok(())
}

/// bird in the router's namespace, peering with the LB hosts.
pub struct Bird {
    router: Host,
    socket: PathBuf,
    process: Process,
}

impl Bird {
    /// Starts bird on `router` with its config, log and control socket in
    /// `dir`: eBGP with each of `peers`, everything learned exported to the
    /// kernel (so the router forwards to the holder). Short timers: the
    /// LB side proposes a 3s hold time; after an error bird would wait a
    /// minute before talking to that peer again. Dual-stack: a second
    /// session per host over IPv6, with an IPv6 channel, and the IPv4
    /// sessions signed with [`PASSWORD`]. With `bfd`, a BFD session beside
    /// every BGP session ([`BFD_INTERVAL`] × [`BFD_MULTIPLIER`]). Waits
    /// until bird answers.
    pub fn start(
        router: &Host,
        peers: &[Host],
        dir: &Path,
        dual: bool,
        bfd: bool,
    ) -> anyhow::Result<Self> {
        let bird = tools::system("bird").context("bird (Debian bird2; cargo xtask setup)")?;
        let socket = dir.join("bird.ctl");
        let config = dir.join("bird.conf");
        std::fs::write(
            &config,
            bird_conf(router, peers, &dir.join("bird.log"), dual, bfd),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let process = router.spawn(
            ProcessBuilder::new("bird", bird)
                .arg("-f")
                .arg("-c")
                .arg(&config)
                .arg("-s")
                .arg(&socket),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while rib(router, &socket, IpAddr::V4(VIP)).is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "bird did not come up: {}",
                process.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            router: router.clone(),
            socket,
            process,
        })
    }

    /// The next hop of every route the router has for `vip`, best first,
    /// or `None` if bird did not answer.
    pub fn rib(&self, vip: IpAddr) -> Option<Vec<IpAddr>> {
        rib(&self.router, &self.socket, vip)
    }

    /// A reader of this router's RIB that a sampler thread can own.
    pub fn reader(&self) -> RibReader {
        RibReader {
            router: self.router.clone(),
            socket: self.socket.clone(),
        }
    }

    /// `birdc show protocols all`, for a failure message.
    pub fn protocols(&self) -> String {
        self.router
            .exec(
                "birdc",
                [
                    "-s",
                    &self.socket.display().to_string(),
                    "show",
                    "protocols",
                    "all",
                ],
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The bird process.
    pub fn process(&self) -> &Process {
        &self.process
    }
}

/// The router's host and bird's control socket: what reading the RIB
/// takes.
#[derive(Clone, Debug)]
pub struct RibReader {
    router: Host,
    socket: PathBuf,
}

impl RibReader {
    /// See [`Bird::rib`].
    pub fn rib(&self, vip: IpAddr) -> Option<Vec<IpAddr>> {
        rib(&self.router, &self.socket, vip)
    }
}

/// The lab's BFD interval, both sides (the daemon's default).
pub const BFD_INTERVAL: Duration = Duration::from_millis(100);
/// The lab's BFD multiplier, both sides (the daemon's default).
pub const BFD_MULTIPLIER: u32 = 3;

/// bird's configuration (see [`Bird::start`]).
fn bird_conf(router: &Host, peers: &[Host], log: &Path, dual: bool, bfd: bool) -> String {
    // bird's BFD: one session per BGP neighbour (`bfd on`), sent from the
    // session's local address; a BFD Down takes that BGP session down and
    // withdraws its routes at once.
    let (bfd_on, bfd_protocol) = if bfd {
        let ms = BFD_INTERVAL.as_millis();
        (
            "\n  bfd on;",
            format!(
                "protocol bfd {{ interface \"*\" {{ min rx interval {ms} ms; min tx interval {ms} ms; multiplier {BFD_MULTIPLIER}; }}; }}\n"
            ),
        )
    } else {
        ("", String::new())
    };
    let mut sessions: String = peers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            format!(
                "protocol bgp lb{n} from lb {{ neighbor {addr} as {LB_ASN};{pw} }}\n",
                pw = if dual {
                    format!(" password \"{PASSWORD}\";")
                } else {
                    String::new()
                },
                n = i + 1,
                addr = h.addr()
            )
        })
        .collect();
    if dual {
        sessions.push_str("protocol kernel { ipv6 { import none; export all; }; }\n");
        sessions.push_str(&session_template("lb6", router.addr6(), "ipv6", bfd_on));
        for (i, h) in peers.iter().enumerate() {
            sessions.push_str(&format!(
                "protocol bgp lb{n}v6 from lb6 {{ neighbor {addr} as {LB_ASN}; }}\n",
                n = i + 1,
                addr = h.addr6()
            ));
        }
    }
    format!(
        "router id {rid};
log \"{log}\" all;
protocol device {{ scan time 1; }}
protocol kernel {{ ipv4 {{ import none; export all; }}; }}
{template}{bfd_protocol}{sessions}",
        rid = router.addr(),
        log = log.display(),
        template = session_template("lb", router.addr(), "ipv4", bfd_on),
    )
}

/// bird's template `name` for the sessions with the LB nodes over one
/// address family (`channel`: `ipv4` or `ipv6`): the router's `local`
/// address and AS, short timers, `bfd_on`, and routes imported, none
/// exported.
fn session_template(name: &str, local: impl Display, channel: &str, bfd_on: &str) -> String {
    format!(
        "template bgp {name} {{
  local {local} as {ROUTER_ASN};
  hold time 3;
  keepalive time 1;
  connect retry time 1;
  error wait time 1, 2;{bfd_on}
  {channel} {{ import all; export none; }};
}}
"
    )
}

/// `birdc show route for <vip>` in `router`'s namespace: the next hop of
/// every route, best first; `None` if bird did not answer.
pub fn rib(router: &Host, socket: &Path, vip: IpAddr) -> Option<Vec<IpAddr>> {
    let out = router
        .exec(
            "birdc",
            [
                "-s",
                &socket.display().to_string(),
                "show",
                "route",
                "for",
                &vip.to_string(),
            ],
        )
        .ok()?;
    // birdc exits 1 for "Network not found" (no route): only a missing
    // greeting means bird did not answer.
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains(" ready.") {
        return None;
    }
    Some(
        text.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect(),
    )
}

/// Sets `c`'s VIP to bgp mode: [`VIP`] (and [`VIP6`] when `dual`) on port
/// `port`, announced from AS [`LB_ASN`] to `router` (AS [`ROUTER_ASN`]),
/// with an IPv6 session too and [`PASSWORD`] on the IPv4 one when `dual`.
/// With `bfd`, BFD on every session at the daemon's default timers (which
/// are [`BFD_INTERVAL`] × [`BFD_MULTIPLIER`], bird's in this lab).
/// Everything else (hold time, router id) is the daemon's default.
pub fn bgp_vip(c: &mut LbConfig, router: &Host, port: u16, dual: bool, bfd: bool) {
    c.vip.mode = VipMode::Bgp;
    c.vip.address = Some(IpAddr::V4(VIP));
    c.vip.address6 = dual.then_some(IpAddr::V6(VIP6));
    c.vip.port = port;
    let mut peer4 = config::bgp_peer(IpAddr::V4(router.addr()), ROUTER_ASN);
    peer4.password = dual.then(|| PASSWORD.to_owned());
    let mut peers = vec![peer4];
    if dual {
        peers.push(config::bgp_peer(IpAddr::V6(router.addr6()), ROUTER_ASN));
    }
    for p in &mut peers {
        p.bfd.enabled = bfd;
    }
    c.vip.bgp = Some(BgpConfig {
        local_asn: LB_ASN,
        router_id: None,
        peers,
    });
}

/// Which of `hosts` has `hop` as its bridge address (either family).
pub fn host_of(hosts: &[Host], hop: IpAddr) -> Option<usize> {
    hosts
        .iter()
        .position(|h| IpAddr::V4(h.addr()) == hop || IpAddr::V6(h.addr6()) == hop)
}

/// Whether `host` has any of `vips` on `lo` (bound by a bgp-mode holder).
pub fn holds(host: &Host, vips: &[IpAddr]) -> bool {
    host.exec_ok("ip", ["-o", "addr", "show", "dev", "lo"])
        .is_ok_and(|out| vips.iter().any(|v| out.contains(&format!(" {v}/"))))
}

/// Which of `hosts` have any of `vips` on `lo` (the bgp holders).
pub fn holders_on_lo(hosts: &[Host], vips: &[IpAddr]) -> Vec<usize> {
    (0..hosts.len())
        .filter(|&i| holds(&hosts[i], vips))
        .collect()
}

/// Three LB hosts (h1..h3), the router (h4) and the client (h5), with bird
/// and the LB nodes running; the backend is an echo server on the client
/// host's bridge address (the LB hosts reach it directly).
pub struct BgpLab {
    pub lab: Lab,
    pub nodes: Vec<Process>,
    pub bird: Bird,
    /// The VIP's addresses: IPv4, and IPv6 when dual-stack.
    pub vips: Vec<IpAddr>,
    pub operator: TlsMaterial,
    /// The certificates the nodes read at start (its directory must
    /// outlive them).
    _pki: Pki,
    _dir: TestDir,
    backend: tokio::task::JoinHandle<()>,
}

impl Drop for BgpLab {
    fn drop(&mut self) {
        self.backend.abort();
    }
}

/// How many LB nodes a [`BgpLab`] runs.
pub const LB_NODES: usize = 3;

impl BgpLab {
    /// Starts the lab (dual-stack with `dual`, BFD on every session, ours
    /// and bird's, with `bfd`); `None` when it cannot run here (no root)
    /// and the harness says to skip. Each node's config passes
    /// `--check-config` cleanly on its host (the interface check runs
    /// there) before it starts.
    pub async fn start(dual: bool, bfd: bool) -> Option<Self> {
        crate::install_crypto_provider();
        let lab = Lab::start_or_skip(LB_NODES + 2).unwrap()?;
        let dir = TestDir::new("lb-bgp").unwrap();
        let pki = Pki::new().unwrap();
        let operator = config::tls(&pki.admin().unwrap()).load().unwrap();
        let lb_hosts = lab.hosts()[..LB_NODES].to_vec();
        let (router, client) = (lab.host(LB_NODES).clone(), lab.host(LB_NODES + 1).clone());
        wire_client_behind_router(&lb_hosts, &router, &client, dual).unwrap();

        let backend_addr = SocketAddr::new(IpAddr::V4(client.addr()), BACKEND_PORT);
        let backend = serve_echo(client.tcp_listener(backend_addr).unwrap());
        let bird = Bird::start(&router, &lb_hosts, dir.path(), dual, bfd).unwrap();
        let nodes = (0..LB_NODES)
            .map(|i| start_lb(&lab, i, &pki, &dir, backend_addr, &router, (dual, bfd)))
            .collect();
        let mut vips = vec![IpAddr::V4(VIP)];
        if dual {
            vips.push(IpAddr::V6(VIP6));
        }
        Some(Self {
            lab,
            nodes,
            bird,
            vips,
            operator,
            _pki: pki,
            _dir: dir,
            backend,
        })
    }

    /// The LB hosts, in node order.
    pub fn lb_hosts(&self) -> Vec<Host> {
        self.lab.hosts()[..LB_NODES].to_vec()
    }

    /// The router's host.
    pub fn router(&self) -> &Host {
        self.lab.host(LB_NODES)
    }

    /// The client's host.
    pub fn client(&self) -> &Host {
        self.lab.host(LB_NODES + 1)
    }

    /// The next hops the router's RIB has for each VIP address (every
    /// route, best first), or `None` if birdc did not answer.
    pub fn ribs(&self) -> Option<Vec<Vec<IpAddr>>> {
        self.vips.iter().map(|v| self.bird.rib(*v)).collect()
    }

    /// Waits until the router has exactly one route for each VIP address,
    /// all via one host other than `not` that has the VIP on `lo`, and the
    /// client gets an echo through every VIP address. Returns that host.
    pub async fn wait_for_route(&self, not: Option<usize>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let hosts = self.lb_hosts();
        loop {
            let ribs = self.ribs().unwrap_or_default();
            if let Some(h) = single_route(&hosts, &ribs, &self.vips)
                .filter(|h| Some(*h) != not && holds(&hosts[*h], &self.vips))
            {
                let mut answered = true;
                for v in &self.vips {
                    let vip = SocketAddr::new(*v, VIP_PORT);
                    answered &= echo(self.client(), vip, Duration::from_millis(500)).await;
                }
                if answered {
                    return h;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no single route to a holder within {timeout:?}: RIBs {ribs:?}\nbird:\n{}",
                self.bird.protocols()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the router's RIB has no route via host `old` for any
    /// VIP address (its sessions went down, or it withdrew): how long that
    /// took. Other routes may or may not be there yet.
    pub async fn wait_for_withdrawal(&self, old: usize, timeout: Duration) -> Duration {
        let started = Instant::now();
        let hosts = self.lb_hosts();
        loop {
            let ribs = self.ribs().unwrap_or_default();
            let via_old = ribs
                .iter()
                .flatten()
                .any(|hop| host_of(&hosts, *hop) == Some(old));
            if ribs.len() == self.vips.len() && !via_old {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "the route via host {old} still there after {timeout:?}: RIBs {ribs:?}\nbird:\n{}",
                self.bird.protocols()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Node `i`'s status over the API, from the client host.
    pub async fn status(&self, i: usize) -> Option<lb::GetStatusResponse> {
        let addr = SocketAddr::new(IpAddr::V4(self.lab.host(i).addr()), 9442);
        status_via(self.client(), addr, &self.operator, Duration::from_secs(2)).await
    }
}

/// The one host every VIP address's single route goes via, if the RIBs
/// (one per address, in `vips`' order) say so.
pub fn single_route(hosts: &[Host], ribs: &[Vec<IpAddr>], vips: &[IpAddr]) -> Option<usize> {
    if ribs.len() != vips.len() {
        return None;
    }
    let mut hops = ribs.iter().map(|r| match r.as_slice() {
        [hop] => host_of(hosts, *hop),
        _ => None,
    });
    let first = hops.next()??;
    hops.all(|h| h == Some(first)).then_some(first)
}

/// Node `i` of a [`BgpLab`], after its config passed `--check-config`.
fn start_lb(
    lab: &Lab,
    i: usize,
    pki: &Pki,
    dir: &TestDir,
    backend: SocketAddr,
    router: &Host,
    (dual, bfd): (bool, bool),
) -> Process {
    let host = lab.host(i);
    let id = i + 1;
    let spec = LbSpec {
        pki,
        dir: dir.path(),
        members: (0..LB_NODES)
            .map(|j| {
                let (a, n) = (IpAddr::V4(lab.host(j).addr()), j as u64 + 1);
                let (raft, api) = (SocketAddr::new(a, 9441), SocketAddr::new(a, 9442));
                config::lb_member(n, &format!("lb-{n}"), "", raft, api)
            })
            .collect(),
    };
    let sans = [host.addr().to_string(), host.addr6().to_string()];
    let (mut c, _) = spec.node(id as u64, &[&sans[0], &sans[1]]).unwrap();
    c.admin.address = SocketAddr::from(([127, 0, 0, 1], 9440));
    bgp_vip(&mut c, router, VIP_PORT, dual, bfd);
    c.backends = vec![config::lb_backend("api-1", backend, "")];
    test_timers(&mut c);
    let config = spec.write(&c).unwrap();
    let said = check_config(host, &config).unwrap();
    assert!(said.is_empty(), "--check-config: {said}");
    host.spawn(lb_process(&format!("lb-{id}"), &config).unwrap())
        .unwrap()
}

/// Runs `bulwark-lb --check-config` on `host`; returns what it said when
/// it failed or warned, empty when the config passed cleanly.
pub fn check_config(host: &Host, config: &Path) -> anyhow::Result<String> {
    let bin = tools::bin_path("bulwark-lb")?;
    let check = host.exec(
        &bin.display().to_string(),
        ["--check-config", "--config", &config.display().to_string()],
    )?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(if check.status.success() && !said.contains("warning") {
        String::new()
    } else {
        said
    })
}
