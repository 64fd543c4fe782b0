//! A bulwark-lb cluster in arp mode on a network-namespace lab: hosts
//! `h1..hN` run `bulwark-lb`, the last host is the client and runs an echo
//! backend. Also the two independent witnesses of "never two holders":
//! a sampler of `ip addr` on every LB host, and an ARP prober on the
//! client host that records which MACs answer for the VIP.
//!
//! [`Stack`] picks the VIP's families: IPv4 (the default), IPv6 (VIP,
//! Raft, API and backend all on the lab's IPv6 addresses) or dual-stack
//! (an IPv4 and an IPv6 VIP held as one, Raft on IPv4). For IPv6 VIPs the
//! second witness is a neighbour-solicitation prober ([`nd_probe`]).
//!
//! Shared by the netns tests (components/lb/tests/lb_netns.rs,
//! lb_jepsen.rs, lb_bgp_netns.rs) and the failover benchmark
//! (bench/src/failover.rs), so that the benchmark measures exactly what the
//! tests check.

// Test helpers panic rather than return errors: a panic in the calling test
// is what prints the processes' logs (see the crate docs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use bulwark_common::tls::TlsMaterial;
use bulwark_lb::config::VipMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use super::{LbSpec, lb_process_of, serve_echo, test_timers};
use crate::{Host, Lab, Pki, Process, TestDir, config};

/// The VIP's port.
pub const VIP_PORT: u16 = 6443;
/// The backend's port on the client host.
pub const BACKEND_PORT: u16 = 8443;

/// The address families of the VIP (and of the cluster's own addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// An IPv4 VIP; everything on IPv4.
    V4,
    /// An IPv6 VIP; Raft, API and the backend on IPv6 too.
    V6,
    /// An IPv4 VIP and an IPv6 one (`vip.address6`) held together; Raft,
    /// API and the backend on IPv4.
    Dual,
}

impl Stack {
    /// From `BULWARK_LB_STACK` (`v4`, `v6`, `dual`); IPv4 when unset.
    pub fn from_env() -> Self {
        match std::env::var("BULWARK_LB_STACK").as_deref() {
            Ok("v6") => Stack::V6,
            Ok("dual") => Stack::Dual,
            Ok("v4") | Err(_) => Stack::V4,
            Ok(other) => panic!("BULWARK_LB_STACK={other}: expected v4, v6 or dual"),
        }
    }
}

/// The lab and the LB processes.
pub struct LbLab {
    pub lab: Lab,
    pub nodes: Vec<Process>,
    /// The VIP (`vip.address`) and port.
    pub vip: SocketAddr,
    /// Dual-stack: the IPv6 VIP (`vip.address6`) and port.
    pub vip6: Option<SocketAddr>,
    /// The families in use.
    pub stack: Stack,
    pub operator: TlsMaterial,
    // Held for their files: the certificates, configs and data dirs.
    _pki: Pki,
    _dir: TestDir,
    backend: tokio::task::JoinHandle<()>,
}

impl LbLab {
    /// `n` LB hosts plus a client host; `None` when the lab cannot run here
    /// (no root) and the harness says to skip.
    pub async fn start(n: usize) -> Option<Self> {
        Self::start_stack(n, Stack::V4).await
    }

    /// [`LbLab::start`] with the VIP's families given.
    pub async fn start_stack(n: usize, stack: Stack) -> Option<Self> {
        Self::start_binary(n, stack, &crate::tools::bin_path("bulwark-lb").unwrap()).await
    }

    /// [`LbLab::start_stack`] with every node running the `bulwark-lb` at
    /// `binary` (the rolling-upgrade bench starts the previous release).
    pub async fn start_binary(n: usize, stack: Stack, binary: &Path) -> Option<Self> {
        Self::start_with(n, stack, binary, |_| {}).await
    }

    /// [`LbLab::start`] with every node's configuration passed through
    /// `edit` before it is written (a test turning a feature off).
    pub async fn start_edited(
        n: usize,
        edit: impl Fn(&mut bulwark_lb::config::LbConfig),
    ) -> Option<Self> {
        let binary = crate::tools::bin_path("bulwark-lb").unwrap();
        Self::start_with(n, Stack::V4, &binary, edit).await
    }

    async fn start_with(
        n: usize,
        stack: Stack,
        binary: &Path,
        edit: impl Fn(&mut bulwark_lb::config::LbConfig),
    ) -> Option<Self> {
        crate::install_crypto_provider();
        let lab = Lab::start_or_skip(n + 1).unwrap()?;
        let pki = Pki::new().unwrap();
        let dir = TestDir::new("lb-lab").unwrap();
        let operator = config::tls(&pki.admin().unwrap()).load().unwrap();
        let (v4, v6) = (
            IpAddr::V4(lab.spare_addr(0)),
            IpAddr::V6(lab.spare_addr6(0)),
        );
        let vip = SocketAddr::new(if stack == Stack::V6 { v6 } else { v4 }, VIP_PORT);
        let vip6 = (stack == Stack::Dual).then(|| SocketAddr::new(v6, VIP_PORT));
        let client = lab.host(n).clone();
        // The cluster's own addresses: IPv6 in an IPv6 lab.
        let own = |h: &Host| match stack {
            Stack::V6 => IpAddr::V6(h.addr6()),
            _ => IpAddr::V4(h.addr()),
        };
        let backend_addr = SocketAddr::new(own(&client), BACKEND_PORT);
        let listener = client.tcp_listener(backend_addr).unwrap();
        let backend = serve_echo(listener);

        let spec = LbSpec {
            pki: &pki,
            dir: dir.path(),
            members: (0..n)
                .map(|i| {
                    let (a, id) = (own(lab.host(i)), i as u64 + 1);
                    let (raft, api) = (SocketAddr::new(a, 9441), SocketAddr::new(a, 9442));
                    config::lb_member(id, &format!("lb-{id}"), "", raft, api)
                })
                .collect(),
        };
        let mut nodes = Vec::new();
        for i in 0..n {
            let host = lab.host(i);
            let id = i as u64 + 1;
            let sans = [host.addr().to_string(), host.addr6().to_string()];
            let (mut c, _) = spec.node(id, &[&sans[0], &sans[1]]).unwrap();
            c.admin.address = SocketAddr::from(([127, 0, 0, 1], 9440));
            c.vip.mode = VipMode::Arp;
            c.vip.address = Some(vip.ip());
            c.vip.address6 = vip6.map(|v| v.ip());
            c.vip.port = VIP_PORT;
            c.vip.interface = Some(host.interface().to_owned());
            c.backends = vec![config::lb_backend("api-1", backend_addr, "")];
            test_timers(&mut c);
            edit(&mut c);
            let config = spec.write(&c).unwrap();
            let process = host
                .spawn(lb_process_of(binary, &format!("lb-{id}"), &config))
                .unwrap();
            nodes.push(process);
        }
        Some(Self {
            lab,
            nodes,
            vip,
            vip6,
            stack,
            operator,
            _pki: pki,
            _dir: dir,
            backend,
        })
    }

    /// The LB hosts.
    pub fn lb_hosts(&self) -> Vec<Host> {
        self.lab.hosts()[..self.nodes.len()].to_vec()
    }

    /// The client host.
    pub fn client(&self) -> Host {
        self.lab.host(self.nodes.len()).clone()
    }

    /// Indices (0-based) of the LB hosts that have the VIP on eth0 now
    /// (dual-stack: either of its addresses).
    pub fn holders(&self) -> Vec<usize> {
        holders_of_any(&self.lb_hosts(), &self.vip_ips())
    }

    /// The VIP's addresses: one, or both of a dual-stack pair.
    pub fn vip_ips(&self) -> Vec<IpAddr> {
        std::iter::once(self.vip.ip())
            .chain(self.vip6.map(|v| v.ip()))
            .collect()
    }

    /// Every VIP address with the port.
    pub fn vips(&self) -> Vec<SocketAddr> {
        std::iter::once(self.vip).chain(self.vip6).collect()
    }

    /// Waits until exactly one host holds the VIP and the client gets an
    /// echo through it; returns that host's index.
    pub async fn wait_for_holder(&self, not: Option<usize>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.holders();
            let mut answered = h.len() == 1 && Some(h[0]) != not;
            for vip in self.vips() {
                answered = answered && echo(&self.client(), vip, Duration::from_millis(300)).await;
            }
            if answered {
                return h[0];
            }
            assert!(
                Instant::now() < deadline,
                "no single VIP holder within {timeout:?}: {h:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address `host` uses for Raft, the API and the backend: IPv6 in
    /// an IPv6 lab.
    pub fn own_addr(&self, host: &Host) -> IpAddr {
        match self.stack {
            Stack::V6 => IpAddr::V6(host.addr6()),
            _ => IpAddr::V4(host.addr()),
        }
    }

    /// An operator API client to LB host `i`, dialled from the client host.
    pub fn api(&self, i: usize) -> LoadBalancerClient<Channel> {
        let addr = SocketAddr::new(self.own_addr(self.lab.host(i)), 9442);
        api_via(&self.client(), addr, &self.operator)
    }

    /// Node `i`'s status, if it answers within a second.
    pub async fn status(&self, i: usize) -> Option<lb::GetStatusResponse> {
        let addr = SocketAddr::new(self.own_addr(self.lab.host(i)), 9442);
        status_via(&self.client(), addr, &self.operator, Duration::from_secs(1)).await
    }
}

/// The status (with up to 64 failover records) of the LB node whose API
/// is `addr`, dialled from `via` as `tls`, if it answers within `timeout`.
pub async fn status_via(
    via: &Host,
    addr: SocketAddr,
    tls: &TlsMaterial,
    timeout: Duration,
) -> Option<lb::GetStatusResponse> {
    let mut c = api_via(via, addr, tls);
    tokio::time::timeout(
        timeout,
        c.get_status(lb::GetStatusRequest { max_failovers: 64 }),
    )
    .await
    .ok()?
    .ok()
    .map(tonic::Response::into_inner)
}

impl Drop for LbLab {
    fn drop(&mut self) {
        self.backend.abort();
    }
}

/// An API client to `addr` as `tls`, its connections made from `via`'s
/// namespace. The channel is lazy and reconnects by itself.
pub fn api_via(via: &Host, addr: SocketAddr, tls: &TlsMaterial) -> LoadBalancerClient<Channel> {
    let via = via.clone();
    let endpoint = bulwark_common::grpc::endpoint(&addr.to_string(), tls, None).unwrap();
    let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
        let via = via.clone();
        async move {
            via.tcp_connect(addr)
                .await
                .map(hyper_util::rt::TokioIo::new)
                .map_err(std::io::Error::other)
        }
    }));
    LoadBalancerClient::new(channel)
}

/// Which of `hosts` have `vip` on their interface.
pub fn holders_of(hosts: &[Host], vip: IpAddr) -> Vec<usize> {
    holders_of_any(hosts, &[vip])
}

/// Which of `hosts` have any of `vips` on their interface (one `ip addr`
/// per host covers both families, so a dual-stack pair split across two
/// hosts shows as two holders).
pub fn holders_of_any(hosts: &[Host], vips: &[IpAddr]) -> Vec<usize> {
    hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| {
            h.exec_ok("ip", ["-o", "addr", "show", "dev", h.interface()])
                .is_ok_and(|out| vips.iter().any(|v| out.contains(&format!(" {v}/"))))
        })
        .map(|(i, _)| i)
        .collect()
}

/// Which of `vips` host `h` has on its interface now, in `vips`' order.
pub fn held_by(h: &Host, vips: &[IpAddr]) -> Vec<bool> {
    let out = h
        .exec_ok("ip", ["-o", "addr", "show", "dev", h.interface()])
        .unwrap_or_default();
    vips.iter()
        .map(|v| out.contains(&format!(" {v}/")))
        .collect()
}

/// One echo round trip from `host` through `addr` within `timeout`.
pub async fn echo(host: &Host, addr: SocketAddr, timeout: Duration) -> bool {
    let attempt = async {
        let mut s = host.tcp_connect(addr).await.ok()?;
        s.write_all(b"bulwark").await.ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        (&buf == b"bulwark").then_some(())
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// What the witnesses saw.
#[derive(Debug, Default, Clone)]
pub struct Witness {
    /// `ip addr` sweeps over all LB hosts.
    pub addr_samples: u64,
    /// Sweeps that found the VIP on more than one host.
    pub addr_violations: Vec<Vec<usize>>,
    /// Neighbour probe windows (ARP for an IPv4 VIP, neighbour
    /// solicitation for an IPv6 one; a dual-stack VIP has both).
    pub arp_windows: u64,
    /// Windows in which more than one MAC answered for a VIP address.
    pub arp_violations: Vec<BTreeSet<[u8; 6]>>,
    /// Every MAC that ever answered.
    pub macs: BTreeSet<[u8; 6]>,
}

/// Samples VIP ownership until dropped or stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    witness: Arc<Mutex<Witness>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Sampler {
    /// Starts both witnesses.
    pub fn start(lab: &LbLab) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let witness = Arc::new(Mutex::new(Witness::default()));
        let mut threads = Vec::new();
        {
            let (stop, witness, hosts, vips) =
                (stop.clone(), witness.clone(), lab.lb_hosts(), lab.vip_ips());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Either address of a dual-stack pair counts: the pair
                    // on two hosts (split) is as wrong as two holders.
                    let h = holders_of_any(&hosts, &vips);
                    let mut w = witness.lock().unwrap();
                    w.addr_samples += 1;
                    if h.len() > 1 {
                        w.addr_violations.push(h);
                    }
                }
            }));
        }
        // One neighbour prober per VIP address: ARP for IPv4, neighbour
        // solicitation for IPv6; both report into the same windows.
        for vip in lab.vip_ips() {
            let (stop, witness, client) = (stop.clone(), witness.clone(), lab.client());
            threads.push(std::thread::spawn(move || {
                let iface = client.interface().to_owned();
                let (me, me6) = (client.addr(), client.addr6());
                client
                    .in_netns(move || {
                        let on_window = |seen: BTreeSet<[u8; 6]>| {
                            let mut w = witness.lock().unwrap();
                            w.arp_windows += 1;
                            w.macs.extend(seen.iter().copied());
                            if seen.len() > 1 {
                                w.arp_violations.push(seen);
                            }
                        };
                        match vip {
                            IpAddr::V4(vip) => arp_probe(&iface, me, vip, &stop, on_window),
                            IpAddr::V6(vip) => nd_probe(&iface, me6, vip, &stop, on_window),
                        }
                    })
                    .unwrap();
            }));
        }
        Self {
            stop,
            witness,
            threads,
        }
    }

    /// Stops and returns what was seen.
    pub fn finish(mut self) -> Witness {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.witness.lock().unwrap().clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends "who has VIP" every 20 ms until `stop` and hands the set of MACs
/// that answered in each window to `on_window`. Runs inside the namespace
/// of the host it probes from (see [`Host::in_netns`]).
pub fn arp_probe(
    iface: &str,
    me: Ipv4Addr,
    vip: Ipv4Addr,
    stop: &AtomicBool,
    on_window: impl FnMut(BTreeSet<[u8; 6]>),
) {
    const ETH_P_ARP: u16 = 0x0806;
    // SAFETY: plain libc socket calls on descriptors owned by this function;
    // buffers outlive the calls and lengths match them.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ARP.to_be()),
        );
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(iface).unwrap();
        let index = libc::if_nametoindex(name.as_ptr()) as i32;
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(iface.bytes()) {
            *d = s as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr), 0);
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(ifr.ifr_ifru.ifru_hwaddr.sa_data.iter()) {
            *d = *s as u8;
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ARP.to_be();
        sll.sll_ifindex = index;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let mut req = [0u8; 42];
        req[0..6].copy_from_slice(&[0xff; 6]);
        req[6..12].copy_from_slice(&mac);
        req[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        req[14..16].copy_from_slice(&1u16.to_be_bytes());
        req[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
        req[18] = 6;
        req[19] = 4;
        req[20..22].copy_from_slice(&1u16.to_be_bytes());
        req[22..28].copy_from_slice(&mac);
        req[28..32].copy_from_slice(&me.octets());
        req[38..42].copy_from_slice(&vip.octets());
        probe_windows(fd, &req, &sll, stop, on_window, |reply| {
            // An ARP reply whose sender IP is the VIP.
            let answers = reply.len() >= 42
                && reply[12..14] == ETH_P_ARP.to_be_bytes()
                && reply[20..22] == [0, 2]
                && reply[28..32] == vip.octets();
            answers.then(|| reply[22..28].try_into().unwrap())
        });
        libc::close(fd);
    }
}

/// The probers' loop, until `stop`: sends `request` on the raw socket `fd`
/// to `dest` (a `sockaddr_*` of `fd`'s family), reads replies for a 20 ms
/// window (each `recv` waiting at most 5 ms), and hands the set of MACs
/// `answer` finds in them (a reply's MAC, or `None` for a reply that is
/// not an answer) to `on_window`, once per window.
fn probe_windows<A>(
    fd: libc::c_int,
    request: &[u8],
    dest: &A,
    stop: &AtomicBool,
    mut on_window: impl FnMut(BTreeSet<[u8; 6]>),
    answer: impl Fn(&[u8]) -> Option<[u8; 6]>,
) {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 5_000,
    };
    // SAFETY: `tv` outlives the call and the length is its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `request` and `dest` outlive the call and the lengths are
        // their sizes.
        unsafe {
            libc::sendto(
                fd,
                request.as_ptr().cast(),
                request.len(),
                0,
                std::ptr::from_ref(dest).cast(),
                std::mem::size_of::<A>() as libc::socklen_t,
            );
        }
        let window = Instant::now() + Duration::from_millis(20);
        let mut seen = BTreeSet::new();
        while Instant::now() < window {
            // SAFETY: `buf` outlives the call and the length is its size.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if let Ok(n) = usize::try_from(n)
                && let Some(mac) = answer(&buf[..n])
            {
                seen.insert(mac);
            }
        }
        on_window(seen);
    }
}

/// The MAC address of `iface` (in the calling thread's namespace).
pub fn mac_of(iface: &str) -> [u8; 6] {
    // SAFETY: an ioctl on a socket this function owns, with an ifreq that
    // outlives the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(iface.bytes()) {
            *d = s as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr), 0);
        libc::close(fd);
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(ifr.ifr_ifru.ifru_hwaddr.sa_data.iter()) {
            *d = *s as u8;
        }
        mac
    }
}

/// A neighbour solicitation for `target` (ICMPv6 type 135) with our MAC
/// as source link-layer address; the kernel fills in the checksum.
pub fn ns_message(mac: [u8; 6], target: Ipv6Addr) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0] = 135;
    m[8..24].copy_from_slice(&target.octets());
    m[24] = 1; // option: source link-layer address
    m[25] = 1;
    m[26..32].copy_from_slice(&mac);
    m
}

/// The IPv6 twin of [`arp_probe`]: sends a neighbour solicitation for
/// `vip` to its solicited-node multicast group every 20 ms until `stop`
/// and hands the set of MACs (target link-layer addresses) that answered
/// in each window to `on_window`. Runs inside the prober's namespace.
pub fn nd_probe(
    iface: &str,
    me: Ipv6Addr,
    vip: Ipv6Addr,
    stop: &AtomicBool,
    on_window: impl FnMut(BTreeSet<[u8; 6]>),
) {
    let o = vip.octets();
    let group = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    );
    let ns = ns_message(mac_of(iface), vip);
    let sockaddr = |ip: Ipv6Addr| {
        // SAFETY: sockaddr_in6 is plain old data; zeroed is valid.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = ip.octets();
        sa
    };
    let (from, to) = (sockaddr(me), sockaddr(group));
    let name = std::ffi::CString::new(iface).unwrap();
    let int = |v: i32| (v, std::mem::size_of::<i32>() as libc::socklen_t);
    // SAFETY: plain libc socket calls on a descriptor owned by this
    // function; buffers outlive the calls and lengths match them.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6);
        assert!(
            fd >= 0,
            "ICMPv6 socket: {}",
            std::io::Error::last_os_error()
        );
        let index = libc::if_nametoindex(name.as_ptr()) as i32;
        // Neighbour discovery with a hop limit other than 255 is dropped.
        for (opt, value) in [
            (libc::IPV6_MULTICAST_HOPS, 255),
            (libc::IPV6_UNICAST_HOPS, 255),
            (libc::IPV6_MULTICAST_IF, index),
        ] {
            let (v, len) = int(value);
            let rc = libc::setsockopt(fd, libc::IPPROTO_IPV6, opt, (&raw const v).cast(), len);
            assert_eq!(
                rc,
                0,
                "setsockopt {opt}: {}",
                std::io::Error::last_os_error()
            );
        }
        let in6_len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, (&raw const from).cast(), in6_len), 0);
        probe_windows(fd, &ns, &to, stop, on_window, |reply| {
            // A neighbour advertisement for the VIP with a target
            // link-layer address option.
            let answers =
                reply.len() >= 32 && reply[0] == 136 && reply[8..24] == o && reply[24] == 2;
            answers.then(|| reply[26..32].try_into().unwrap())
        });
        libc::close(fd);
    }
}

/// The client-visible gap of a failover: from the last echo through `vip`
/// that succeeded before `cut` ran to the first one that succeeded after.
///
/// The client starts a fresh connection every [`GAP_PROBE_EVERY`] (10 ms),
/// each with a 100 ms limit, and does not wait for one attempt to end
/// before starting the next: an attempt whose SYN went to the old holder's
/// MAC hangs until its limit, and a client that waited for it would only
/// notice the new holder up to 100 ms late, so the gap would come in
/// 100 ms steps. `None` when nothing got through within `limit`.
pub async fn measure_gap(
    client: &Host,
    vip: SocketAddr,
    cut: impl FnOnce(),
    limit: Duration,
) -> Option<Duration> {
    let attempt = Duration::from_millis(100);
    // Make sure it works before the cut.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !echo(client, vip, attempt).await {
        assert!(
            Instant::now() < deadline,
            "VIP not reachable before the cut"
        );
    }
    let mut last_ok = Instant::now();
    cut();
    let cut_at = Instant::now();
    let mut attempts = tokio::task::JoinSet::new();
    let mut every = tokio::time::interval(GAP_PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {
                if cut_at.elapsed() > limit {
                    return None;
                }
                let host = client.clone();
                attempts.spawn(async move {
                    let started = Instant::now();
                    let ok = echo(&host, vip, attempt).await;
                    (started, ok, Instant::now())
                });
            }
            Some(Ok((started, ok, ended))) = attempts.join_next() => {
                if ok && started > cut_at {
                    return Some(ended.saturating_duration_since(last_ok));
                }
                if ok {
                    last_ok = last_ok.max(ended);
                }
            }
        }
    }
}

/// How often [`measure_gap`]'s client starts a new connection.
pub const GAP_PROBE_EVERY: Duration = Duration::from_millis(10);

/// The kubeadm HA guide's `keepalived.conf` for host `id` (1-based): the
/// first is MASTER at priority 101, the others BACKUP at 100, one VRRP
/// instance holding `vip` on `interface`; without the guide's
/// track_script (it curls the local HAProxy every 3 s and needs 10
/// failures: 30 s, longer than any window the tests and benches watch),
/// everything else at keepalived's defaults.
pub fn keepalived_conf(id: usize, interface: &str, vip: IpAddr) -> String {
    let (state, priority) = if id == 1 {
        ("MASTER", 101)
    } else {
        ("BACKUP", 100)
    };
    format!(
        "global_defs {{
    router_id LVS_DEVEL_{id}
}}
vrrp_instance VI_1 {{
    state {state}
    interface {interface}
    virtual_router_id 51
    priority {priority}
    authentication {{
        auth_type PASS
        auth_pass 42
    }}
    virtual_ipaddress {{
        {vip}
    }}
}}
"
    )
}
