//! The two fronts the suite compares, on the same three LB hosts:
//!
//! - bulwark: three `bulwark-lb` processes, arp-mode VIP, zone-aware, the
//!   three apiservers as backends, and a `bulwark-prober` per zone (on the
//!   LB host of that zone, default probing) whose verdicts the LB commits;
//! - bulwark in bgp mode: the same, but the VIP (the testkit's
//!   `cluster::bgp::VIP`, outside the bridge's subnet) is bound on `lo` and
//!   announced to a BIRD router on its own host (the testkit's
//!   `cluster::bgp::Bird`, the lab `lb_bgp_netns.rs` tests) which the client
//!   reaches it through;
//! - the baseline, as the kubeadm HA guide sets it up: keepalived (VRRP,
//!   defaults: advert_int 1 s, preemption; one MASTER at priority 101, two
//!   BACKUPs at 100) moving the VIP, and HAProxy in `mode tcp` on every LB
//!   host with the guide's health check (`option httpchk GET /healthz`,
//!   `http-check expect status 200`, `check check-ssl verify none`, HAProxy's
//!   default `inter 2s fall 3 rise 2`) and its `defaults` (redispatch,
//!   `retries 1`, `timeout connect 5s`, client/server 35 s).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bulwark_api::lb::v1 as lb;
use bulwark_common::tls::TlsMaterial;
use bulwark_lb::config::VipMode;
use bulwark_testkit::cluster::bgp::{self, Bird};
use bulwark_testkit::cluster::lab::status_via;
use bulwark_testkit::cluster::{LbSpec, lb_process, prober_config, prober_process, write_named};
use bulwark_testkit::{Host, Process, ProcessBuilder, TestDir, config};

use super::{Contender, Topology, VIP_PORT};

/// bulwark-lb's operator API port on every LB host.
const API_PORT: u16 = 9442;

/// Log lines that mean "this node is taking the VIP" (keepalived) and "a
/// backend was declared down" (HAProxy's health check).
pub const KEEPALIVED_MASTER: &str = "Entering MASTER STATE";
pub const HAPROXY_DOWN: &str = " is DOWN";
/// bulwark-lb's leader committing a health verdict change.
pub const BULWARK_VERDICT: &str = "verdict committed";

/// One LB host's processes.
pub struct Node {
    pub procs: Vec<Process>,
}

/// A running front.
pub struct Stack {
    pub nodes: Vec<Node>,
    /// bulwark-prober per zone (bulwark only).
    pub probers: Vec<Process>,
    /// The router the bgp-mode nodes announce the VIP to (bulwark in bgp
    /// mode only).
    pub router: Option<Bird>,
    operator: Option<TlsMaterial>,
    _dir: TestDir,
}

impl Stack {
    /// Starts `contender` on the topology's LB hosts.
    pub fn start(t: &Topology, contender: Contender) -> anyhow::Result<Self> {
        let dir = TestDir::new(&format!("suite-{}", contender.key()))?;
        let mut nodes = Vec::new();
        let mut operator = None;
        let mut probers = Vec::new();
        let mut router = None;
        match contender {
            Contender::Bulwark | Contender::BulwarkBgp => {
                let bgp = contender == Contender::BulwarkBgp;
                if bgp {
                    router = Some(Bird::start(
                        t.router(),
                        t.lb_hosts(),
                        dir.path(),
                        false,
                        t.bgp_bfd,
                    )?);
                }
                operator = Some(config::tls(&t.pki.admin()?).load()?);
                for i in 0..t.lb_hosts().len() {
                    nodes.push(Node {
                        procs: vec![bulwark_node(t, &dir, i, bgp)?],
                    });
                }
                for i in 0..t.lb_hosts().len() {
                    probers.push(prober(t, &dir, i)?);
                }
            }
            Contender::Baseline => {
                for i in 0..t.lb_hosts().len() {
                    nodes.push(Node {
                        procs: baseline_node(t, &dir, i)?,
                    });
                }
            }
        }
        Ok(Self {
            nodes,
            probers,
            router,
            operator,
            _dir: dir,
        })
    }

    /// bgp mode: waits until the router has exactly one route for the VIP,
    /// via LB host `holder`. Other fronts: nothing to wait for.
    pub async fn wait_routed(
        &self,
        hosts: &[Host],
        holder: usize,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let Some(bird) = &self.router else {
            return Ok(());
        };
        let vip = [IpAddr::V4(bgp::VIP)];
        let deadline = std::time::Instant::now() + limit;
        loop {
            let rib = bird.rib(vip[0]).unwrap_or_default();
            if bgp::single_route(hosts, std::slice::from_ref(&rib), &vip) == Some(holder) {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the router has no single route via lb-{} within {limit:?} (next hops: {rib:?})\nbird:\n{}",
                holder + 1,
                bird.protocols()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL every process of node `i` (what a crash of the front looks
    /// like: for the baseline that is keepalived and HAProxy).
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        for p in &mut self.nodes[i].procs {
            p.kill()?;
        }
        Ok(())
    }

    /// SIGTERM node `i`'s processes and waits for them to exit.
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        for p in &mut self.nodes[i].procs {
            p.stop().await?;
        }
        Ok(())
    }

    /// Starts node `i`'s processes again (same data dir and config).
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        for p in &mut self.nodes[i].procs {
            p.start()?;
        }
        Ok(())
    }

    /// Stops everything (graceful, so the VIP is released).
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.stop(i).await?;
        }
        Ok(())
    }

    /// Log files of node `i` (to watch for detection lines).
    pub fn logs(&self, i: usize) -> Vec<PathBuf> {
        self.nodes[i]
            .procs
            .iter()
            .map(|p| p.log_path().to_owned())
            .collect()
    }

    /// bulwark's failover records, from every node that answers (deduplicated
    /// by term), newest first.
    pub async fn failovers(&self, t: &Topology) -> Vec<lb::Failover> {
        let Some(operator) = &self.operator else {
            return Vec::new();
        };
        let mut all: Vec<lb::Failover> = Vec::new();
        for host in t.lb_hosts() {
            if let Some(s) = status(t, host, operator).await {
                for f in s.recent_failovers {
                    if !all.iter().any(|g| g.term == f.term) {
                        all.push(f);
                    }
                }
            }
        }
        all.sort_by_key(|f| std::cmp::Reverse(f.term));
        all
    }
}

/// Node `i`'s status over the operator API, dialled from the client host.
async fn status(
    t: &Topology,
    host: &Host,
    operator: &TlsMaterial,
) -> Option<lb::GetStatusResponse> {
    let addr = SocketAddr::new(IpAddr::V4(host.addr()), API_PORT);
    status_via(t.client(), addr, operator, Duration::from_secs(2)).await
}

/// LB node `i`: arp mode on its bridge interface, or (`bgp`) bgp mode
/// announcing the routed VIP to the topology's router with the daemon's
/// default timers (hold time 3 s).
fn bulwark_node(t: &Topology, dir: &TestDir, i: usize, bgp: bool) -> anyhow::Result<Process> {
    let hosts = t.lb_hosts();
    let host = &hosts[i];
    let id = i as u64 + 1;
    let own = |h: &Host, port: u16| SocketAddr::new(IpAddr::V4(h.addr()), port);
    let spec = LbSpec {
        pki: &t.pki,
        dir: dir.path(),
        members: hosts
            .iter()
            .enumerate()
            .map(|(j, h)| {
                let n = j as u64 + 1;
                config::lb_member(n, &format!("lb-{n}"), "", own(h, 9441), own(h, API_PORT))
            })
            .collect(),
    };
    let (mut c, _) = spec.node(id, &[&host.addr().to_string()])?;
    c.zone = format!("zone-{}", super::ZONES[i]);
    c.admin.address = SocketAddr::from(([127, 0, 0, 1], 9440));
    c.access.probers = Some(config::orgs(&["bulwark:probers"]));
    if bgp {
        bgp::bgp_vip(&mut c, t.router(), VIP_PORT, false, t.bgp_bfd);
    } else {
        c.vip.mode = VipMode::Arp;
        c.vip.address = Some(IpAddr::V4(t.vip));
        c.vip.port = VIP_PORT;
        c.vip.interface = Some(host.interface().to_owned());
    }
    c.backends = t
        .apis
        .iter()
        .zip(super::ZONES)
        .map(|(api, zone)| {
            config::lb_backend(&format!("api-{zone}"), api.addr(), &format!("zone-{zone}"))
        })
        .collect();
    let config = spec.write(&c)?;
    host.spawn(
        lb_process(&format!("lb-{id}"), &config)?
            // SIGTERM drains open connections for up to the proxy's default
            // shutdown grace (10 s): let it finish rather than SIGKILL it.
            .stop_timeout(Duration::from_secs(20)),
    )
}

/// The prober of zone `i`, on that zone's LB host, reporting to every LB
/// node (it finds the leader).
fn prober(t: &Topology, dir: &TestDir, i: usize) -> anyhow::Result<Process> {
    let host = &t.lb_hosts()[i];
    let zone = super::ZONES[i];
    let name = format!("prober-{zone}");
    let targets = t
        .apis
        .iter()
        .zip(super::ZONES)
        .map(|(api, z)| {
            config::apiserver_target(&format!("api-{z}"), api.addr(), &format!("zone-{z}"))
        })
        .collect();
    let endpoints = t
        .lb_hosts()
        .iter()
        .map(|h| format!("{}:{API_PORT}", h.addr()))
        .collect();
    let mut c = prober_config(&t.pki, &name, &format!("zone-{zone}"), targets, endpoints)?;
    c.admin.address = SocketAddr::from(([127, 0, 0, 1], 9450));
    let config = write_named(dir.path(), &name, &c)?;
    host.spawn(prober_process(&name, &config)?)
}

fn baseline_node(t: &Topology, dir: &TestDir, i: usize) -> anyhow::Result<Vec<Process>> {
    let host = &t.lb_hosts()[i];
    let id = i + 1;
    let servers: String = t
        .apis
        .iter()
        .zip(super::ZONES)
        .map(|(api, zone)| {
            format!(
                "    server api-{zone} {} check check-ssl verify none\n",
                api.addr()
            )
        })
        .collect();
    let haproxy_cfg = dir.join(format!("haproxy-{id}.cfg"));
    // HAProxy wants 2 descriptors per connection plus some, and refuses to
    // start when `maxconn` needs more than it may open.
    let maxconn = ((super::nofile_soft()?.saturating_sub(100)) / 2).min(20_000);
    // The kubeadm HA guide's haproxy.cfg (ha-considerations.md), in the
    // foreground (-db) rather than as a daemon. One addition: `maxconn`
    // (global and per frontend) as high as the descriptor limit allows, at
    // most 20000; the guide leaves it to HAProxy's default, derived from
    // the limit of whoever starts it, and the reconnect storm's 5,000
    // streams need it stated.
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global
    log stdout format raw local0
    maxconn {maxconn}

defaults
    maxconn                 {maxconn}
    mode                    http
    log                     global
    option                  httplog
    option                  dontlognull
    option http-server-close
    option forwardfor       except 127.0.0.0/8
    option                  redispatch
    retries                 1
    timeout http-request    10s
    timeout queue           20s
    timeout connect         5s
    timeout client          35s
    timeout server          35s
    timeout http-keep-alive 10s
    timeout check           10s

frontend apiserver
    bind *:{VIP_PORT}
    mode tcp
    option tcplog
    default_backend apiserverbackend

backend apiserverbackend
    option httpchk GET /healthz
    http-check expect status 200
    mode tcp
    balance roundrobin
    default-server inter 2s fall 3 rise 2
{servers}"
        ),
    )?;
    let keepalived_cfg = dir.join(format!("keepalived-{id}.conf"));
    std::fs::write(
        &keepalived_cfg,
        bulwark_testkit::cluster::lab::keepalived_conf(id, host.interface(), t.vip.into()),
    )?;
    let haproxy = host.spawn(
        ProcessBuilder::new(format!("haproxy-{id}"), "/usr/sbin/haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&haproxy_cfg),
    )?;
    let run = dir.join(format!("keepalived-{id}"));
    std::fs::create_dir_all(&run)?;
    let keepalived = host.spawn(
        ProcessBuilder::new(format!("keepalived-{id}"), "/usr/sbin/keepalived")
            .args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
            .arg("--use-file")
            .arg(&keepalived_cfg)
            .arg("--pid")
            .arg(run.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(run.join("vrrp.pid"))
            .arg("--checkers_pid")
            .arg(run.join("checkers.pid")),
    )?;
    Ok(vec![haproxy, keepalived])
}

/// A front's VIP and where its holder binds it: on the LB host's bridge
/// interface (arp mode, keepalived) or on `lo` (bgp mode).
#[derive(Clone, Copy, Debug)]
pub struct Vip {
    pub addr: Ipv4Addr,
    pub on_lo: bool,
}

impl Vip {
    /// The device of `h` the VIP is bound on.
    fn dev(self, h: &Host) -> &str {
        if self.on_lo { "lo" } else { h.interface() }
    }
}

/// Removes the VIP from every LB host (what a killed process leaves
/// behind) so the next run starts clean.
pub fn clear_vip(hosts: &[Host], vip: Vip) {
    for h in hosts {
        let Ok(out) = h.exec_ok("ip", ["-o", "addr", "show", "dev", vip.dev(h)]) else {
            continue;
        };
        for word in out.split_whitespace() {
            if word.starts_with(&format!("{}/", vip.addr)) {
                let _ = h.exec("ip", ["addr", "del", word, "dev", vip.dev(h)]);
            }
        }
    }
}

/// Which of `hosts` hold `vip` now.
pub fn holders(hosts: &[Host], vip: Vip) -> Vec<usize> {
    let needle = format!(" {}/", vip.addr);
    hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| {
            h.exec_ok("ip", ["-o", "addr", "show", "dev", vip.dev(h)])
                .is_ok_and(|out| out.contains(&needle))
        })
        .map(|(i, _)| i)
        .collect()
}

/// Waits until exactly one host holds the VIP.
pub async fn wait_single_holder(
    hosts: &[Host],
    vip: Vip,
    limit: Duration,
) -> anyhow::Result<usize> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let h = holders(hosts, vip);
        if h.len() == 1 {
            return Ok(h[0]);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no single VIP holder within {limit:?} (holders: {h:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Follows log files from their current ends: each [`LogTail::seen`]
/// reads only what was appended since the last call (HAProxy logs every
/// connection, and the storm has thousands), so polling stays cheap.
pub struct LogTail {
    files: Vec<(PathBuf, u64)>,
    /// The end of what was read last, per file, so a needle split across
    /// two reads is still found.
    carry: Vec<Vec<u8>>,
}

impl LogTail {
    /// Starts at the files' current ends (a missing file starts at 0).
    pub fn at_end(paths: Vec<PathBuf>) -> Self {
        let files: Vec<(PathBuf, u64)> = paths
            .into_iter()
            .map(|p| {
                let len = std::fs::metadata(&p).map_or(0, |m| m.len());
                (p, len)
            })
            .collect();
        let carry = vec![Vec::new(); files.len()];
        Self { files, carry }
    }

    /// Whether `needle` appeared in what was appended since the last call.
    pub fn seen(&mut self, needle: &str) -> bool {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let needle = needle.as_bytes();
        let mut found = false;
        for ((path, offset), carry) in self.files.iter_mut().zip(&mut self.carry) {
            let Ok(mut f) = std::fs::File::open(&*path) else {
                continue;
            };
            // A process restarted with a fresh log: start from its top.
            if f.metadata().is_ok_and(|m| m.len() < *offset) {
                *offset = 0;
                carry.clear();
            }
            let mut new = Vec::new();
            if f.seek(SeekFrom::Start(*offset)).is_err() || f.read_to_end(&mut new).is_err() {
                continue;
            }
            *offset += new.len() as u64;
            carry.extend_from_slice(&new);
            found |= carry.windows(needle.len()).any(|w| w == needle);
            let keep = needle.len().saturating_sub(1).min(carry.len());
            carry.drain(..carry.len() - keep);
        }
        found
    }
}

/// Errors out with the process log when a process died at start.
pub fn check_running(stack: &Stack) -> anyhow::Result<()> {
    let router = stack.router.as_ref().map(Bird::process);
    for n in &stack.nodes {
        for p in n.procs.iter().chain(&stack.probers).chain(router) {
            if !p.is_running() {
                return Err(anyhow::anyhow!("{} exited:\n{}", p.name(), p.log()))
                    .context("starting the front");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn log_tail_sees_only_appended_lines_even_split_across_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, "old: Entering MASTER STATE\n").expect("write");
        let mut tail = LogTail::at_end(vec![path.clone(), dir.path().join("missing")]);
        assert!(
            !tail.seen(KEEPALIVED_MASTER),
            "what was there before is not news"
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(b"new: Entering MAS").expect("append");
        assert!(!tail.seen(KEEPALIVED_MASTER));
        f.write_all(b"TER STATE\n").expect("append");
        assert!(tail.seen(KEEPALIVED_MASTER), "a needle split across reads");
        assert!(!tail.seen(KEEPALIVED_MASTER), "and only once");
    }

    #[test]
    fn log_tail_restarts_from_the_top_of_a_truncated_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, "a long first life of the process\n").expect("write");
        let mut tail = LogTail::at_end(vec![path.clone()]);
        std::fs::write(&path, "x is DOWN\n").expect("rewrite");
        assert!(tail.seen(HAPROXY_DOWN));
    }
}
