//! Hosts as network namespaces on a private bridge: a lab where links can
//! be cut, pairs partitioned, latency and loss added, and a virtual IP moved
//! with gratuitous ARP.
//!
//! ```text
//!   bwk<pid>-<n>-h1          bwk<pid>-<n>-h2          …
//!   eth0 198.18.0.1/24       eth0 198.18.0.2/24
//!      |  veth                  |  veth
//!   v-h1 ------ br0 (bridge) ------ v-h2               bwk<pid>-<n>-br
//!               nftables bridge-family rules (partitions)
//! ```
//!
//! Nothing is created in the root namespace: the bridge lives in a
//! namespace of its own and every veth is created there with its peer moved
//! straight into the host, so interface names only need to be unique per
//! namespace, and every lab (even several in one test) uses the same
//! 198.18.0.0/24 (from the 198.18.0.0/15 benchmarking range) without
//! collisions. Hosts get `.1`, `.2`, …; [`Lab::spare_addr`] hands out
//! addresses no host has, for a virtual IP.
//!
//! Namespace names carry the test process's pid. Dropping the [`Lab`]
//! kills whatever still runs in its namespaces and deletes them, also when
//! the test panics; a test process killed outright leaves them behind, and
//! the next lab's [`sweep_stale`] deletes every `bwk<pid>-…` namespace whose
//! pid is dead.
//!
//! The test process itself can act from inside a host: [`Host::in_netns`]
//! runs a closure on a thread that entered the namespace, and
//! [`Host::tcp_connect`] / [`Host::tcp_listener`] create sockets there (a
//! socket stays in the namespace it was created in), so a test can drive
//! clients or gRPC calls "from" a host, or run an in-process server on one.
//!
//! Needs root. Without it, or where `ip netns` does not work, [`Lab::start`]
//! returns [`LabError::Skipped`]; with `BULWARK_REQUIRE_PRIVILEGED=1` (CI) a
//! skip is a failure.
//!
//! Hosts accept gratuitous ARP (`net.ipv4.conf.all.arp_accept=1`) so the
//! neighbours update when a VIP moves; `arp_ignore` and `arp_announce` keep
//! their defaults.
//!
//! Every host also has an IPv6 address, `fd00:18::<n>/64` (added without
//! duplicate address detection, so it is usable at once), for IPv6 and
//! dual-stack tests; [`Lab::spare_addr6`] hands out IPv6 virtual IPs.
//! Neighbour discovery keeps its defaults: an unsolicited neighbour
//! advertisement with the override flag updates an existing cache entry.

mod delay;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;

use crate::process::{Process, ProcessBuilder};
use crate::skip::Skipped;
use crate::tools;

/// Env var: a lab that would be skipped (no root, no `ip netns`) fails.
pub const REQUIRE_PRIVILEGED_ENV: &str = "BULWARK_REQUIRE_PRIVILEGED";

/// Every namespace the harness creates starts with this.
pub const NETNS_PREFIX: &str = "bwk";

/// The lab subnet (inside the lab's namespaces only).
pub const SUBNET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);

/// The lab subnet's prefix length.
pub const PREFIX_LEN: u8 = 24;

/// The lab's IPv6 subnet (a unique local /64).
pub const SUBNET6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0);

/// The IPv6 subnet's prefix length.
pub const PREFIX_LEN6: u8 = 64;

/// Most hosts a lab can have (spare addresses start above them).
pub const MAX_HOSTS: usize = 99;

const NETNS_DIR: &str = "/run/netns";
const BRIDGE: &str = "br0";
const HOST_IFACE: &str = "eth0";
const NFT_TABLE: &str = "bulwark";
const NFT_CHAIN: &str = "partitions";

/// Why a lab did not start.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// This machine cannot run labs (no root, `ip netns` not working).
    #[error(transparent)]
    Skipped(#[from] Skipped),
    /// Something went wrong setting it up.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Latency and loss for [`Lab::netem`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Netem {
    /// Added to every packet the host sends.
    pub delay: Duration,
    /// Percentage (0–100) of the host's packets dropped.
    pub loss_percent: f64,
}

/// How [`Lab::netem`] applied the impairment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetemBackend {
    /// `tc qdisc … netem` on the host's interface.
    Tc,
    /// The kernel has no `sch_netem` (some VM kernels are built without
    /// it): a userspace delay line in the test process holds the host's
    /// outgoing IP packets through NFQUEUE (an `iptables` rule in the
    /// host) and releases or drops them. Only IP is affected (ARP is
    /// not), and every packet crosses userspace: right for fault tests,
    /// wrong for throughput figures.
    Userspace,
}

/// One host of a [`Lab`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Host {
    index: usize,
    name: String,
    netns: String,
    addr: Ipv4Addr,
    bridge_port: String,
}

/// A set of hosts on a private bridge; see the [module docs](self).
#[derive(Debug)]
pub struct Lab {
    id: String,
    bridge_netns: String,
    hosts: Vec<Host>,
    // Every namespace created so far, for cleanup even of a half-built lab.
    created: Vec<String>,
    // Dropped pairs: both directions for `(a, b)` with `a < b` from
    // partition(), one direction `(from, to)` from partition_one_way().
    partitions: Mutex<Partitions>,
    delays: Mutex<HashMap<usize, delay::DelayLine>>,
}

impl Lab {
    /// Creates `hosts` hosts (1..=99) on a fresh bridge, after sweeping
    /// namespaces left by dead test processes.
    pub fn start(hosts: usize) -> Result<Lab, LabError> {
        if !(1..=MAX_HOSTS).contains(&hosts) {
            return Err(anyhow::anyhow!("a lab has 1 to {MAX_HOSTS} hosts, not {hosts}").into());
        }
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(Skipped::new(
                format!("needs root for network namespaces (running as uid {euid})"),
                REQUIRE_PRIVILEGED_ENV,
            )
            .into());
        }
        if let Err(missing) = tools::system("ip") {
            return Err(Skipped::new(
                format!("needs `ip` (iproute2) for network namespaces: {missing}"),
                REQUIRE_PRIVILEGED_ENV,
            )
            .into());
        }
        tools::system("nft").map_err(|e| anyhow::anyhow!("{e} (Debian nftables)"))?;
        if let Err(err) = sweep_stale() {
            eprintln!("[bulwark-testkit] sweeping stale namespaces: {err:#}");
        }

        static LABS: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{NETNS_PREFIX}{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            bridge_netns: format!("{id}-br"),
            id,
            hosts: Vec::new(),
            created: Vec::new(),
            partitions: Mutex::new(Partitions::default()),
            delays: Mutex::new(HashMap::new()),
        };
        // The first namespace tells whether namespaces work here at all.
        let bridge_netns = lab.bridge_netns.clone();
        let added = run("ip", ["netns", "add", &bridge_netns]);
        match added {
            Ok(_) => lab.created.push(bridge_netns.clone()),
            Err(err) => {
                let text = format!("{err:#}");
                if text.contains("Operation not permitted") || text.contains("Permission denied") {
                    return Err(Skipped::new(
                        format!("`ip netns add` does not work here: {text}"),
                        REQUIRE_PRIVILEGED_ENV,
                    )
                    .into());
                }
                return Err(err.into());
            }
        }
        lab.build(hosts)?;
        Ok(lab)
    }

    /// [`Lab::start`], reporting a skip (and returning `None`) where labs
    /// cannot run — or failing instead when `BULWARK_REQUIRE_PRIVILEGED=1`:
    ///
    /// ```no_run
    /// # fn t() -> anyhow::Result<()> {
    /// let Some(lab) = bulwark_testkit::Lab::start_or_skip(2)? else { return Ok(()) };
    /// # Ok(()) }
    /// ```
    pub fn start_or_skip(hosts: usize) -> anyhow::Result<Option<Lab>> {
        match Self::start(hosts) {
            Ok(lab) => Ok(Some(lab)),
            Err(LabError::Skipped(skipped)) => {
                crate::skip_or_fail(&skipped)?;
                Ok(None)
            }
            Err(LabError::Failed(err)) => Err(err),
        }
    }

    fn build(&mut self, hosts: usize) -> anyhow::Result<()> {
        let br = self.bridge_netns.clone();
        run("ip", ["-n", &br, "link", "set", "lo", "up"])?;
        run("ip", ["-n", &br, "link", "add", BRIDGE, "type", "bridge"])?;
        run("ip", ["-n", &br, "link", "set", BRIDGE, "up"])?;
        let table = format!(
            "table bridge {NFT_TABLE} {{\n chain {NFT_CHAIN} {{\n  type filter hook forward priority 0; policy accept;\n }}\n}}\n"
        );
        nft(&br, &table)?;
        for index in 0..hosts {
            let n = index + 1;
            let host = Host {
                index,
                name: format!("h{n}"),
                netns: format!("{}-h{n}", self.id),
                addr: Ipv4Addr::new(198, 18, 0, n as u8),
                bridge_port: format!("v-h{n}"),
            };
            run("ip", ["netns", "add", &host.netns])?;
            self.created.push(host.netns.clone());
            run(
                "ip",
                [
                    "-n",
                    &br,
                    "link",
                    "add",
                    &host.bridge_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    HOST_IFACE,
                    "netns",
                    &host.netns,
                ],
            )?;
            run(
                "ip",
                [
                    "-n",
                    &br,
                    "link",
                    "set",
                    &host.bridge_port,
                    "master",
                    BRIDGE,
                    "up",
                ],
            )?;
            let ns = host.netns.as_str();
            run("ip", ["-n", ns, "link", "set", "lo", "up"])?;
            let cidr = format!("{}/{PREFIX_LEN}", host.addr);
            run("ip", ["-n", ns, "addr", "add", &cidr, "dev", HOST_IFACE])?;
            let cidr6 = format!("{}/{PREFIX_LEN6}", host.addr6());
            run(
                "ip",
                ["-n", ns, "addr", "add", &cidr6, "dev", HOST_IFACE, "nodad"],
            )?;
            run("ip", ["-n", ns, "link", "set", HOST_IFACE, "up"])?;
            // /proc/sys/net shows the namespace of the thread that opens it.
            run_in_netns(ns, || {
                std::fs::write("/proc/sys/net/ipv4/conf/all/arp_accept", "1")
            })?
            .with_context(|| format!("setting arp_accept in {ns}"))?;
            self.hosts.push(host);
        }
        Ok(())
    }

    /// The lab's id (`bwk<pid>-<n>`), the prefix of its namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The namespace holding the bridge.
    pub fn bridge_netns(&self) -> &str {
        &self.bridge_netns
    }

    /// All hosts, `h1` first.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i` (0-based: `host(0)` is `h1`).
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// An address in the lab subnet that no host has (`198.18.0.100 + i`),
    /// e.g. for a virtual IP.
    pub fn spare_addr(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 100u8.saturating_add(i))
    }

    /// An IPv6 address in the lab's IPv6 subnet that no host has
    /// (`fd00:18::100 + i`), e.g. for a virtual IP.
    pub fn spare_addr6(&self, i: u8) -> Ipv6Addr {
        let [a, b, c, d, e, f, g, _] = SUBNET6.segments();
        Ipv6Addr::new(a, b, c, d, e, f, g, 0x100 + u16::from(i))
    }

    /// Takes the host's link down at the bridge: the host sees no carrier
    /// and nothing gets in or out, as if its cable were pulled.
    pub fn cut_link(&self, host: &Host) -> anyhow::Result<()> {
        self.set_link(host, "down")
    }

    /// Brings the host's link back up.
    pub fn restore_link(&self, host: &Host) -> anyhow::Result<()> {
        self.set_link(host, "up")
    }

    /// Sets the host's port on the bridge `up` or `down`.
    fn set_link(&self, host: &Host, state: &str) -> anyhow::Result<()> {
        run(
            "ip",
            [
                "-n",
                &self.bridge_netns,
                "link",
                "set",
                &host.bridge_port,
                state,
            ],
        )
        .map(drop)
    }

    /// Silently drops all traffic (ARP included) between `a` and `b`, both
    /// ways; their traffic with other hosts is untouched.
    pub fn partition(&self, a: &Host, b: &Host) -> anyhow::Result<()> {
        let mut p = self.lock_partitions();
        p.both.insert(pair(a, b));
        self.apply_partitions(&p)
    }

    /// Drops the IPv4 packets `from` sends to `to` but lets `to`'s traffic
    /// reach `from`: an asymmetric partition, where `to` can talk but never
    /// hears an answer. ARP still passes both ways (dropping it would make
    /// the partition symmetric as soon as a neighbour entry expires).
    pub fn partition_one_way(&self, from: &Host, to: &Host) -> anyhow::Result<()> {
        let mut p = self.lock_partitions();
        p.one_way.insert((from.index, to.index));
        self.apply_partitions(&p)
    }

    /// Partitions `host` from every other host (its link stays up, unlike
    /// [`Lab::cut_link`]).
    pub fn isolate(&self, host: &Host) -> anyhow::Result<()> {
        let mut p = self.lock_partitions();
        for other in self.hosts.iter().filter(|h| h.index != host.index) {
            p.both.insert(pair(host, other));
        }
        self.apply_partitions(&p)
    }

    /// Undoes [`Lab::partition`] (and [`Lab::partition_one_way`] in either
    /// direction) for one pair.
    pub fn heal(&self, a: &Host, b: &Host) -> anyhow::Result<()> {
        let mut p = self.lock_partitions();
        p.both.remove(&pair(a, b));
        p.one_way.remove(&(a.index, b.index));
        p.one_way.remove(&(b.index, a.index));
        self.apply_partitions(&p)
    }

    /// Undoes every partition.
    pub fn heal_all(&self) -> anyhow::Result<()> {
        let mut p = self.lock_partitions();
        *p = Partitions::default();
        self.apply_partitions(&p)
    }

    /// Adds latency and loss to everything `host` sends (replacing earlier
    /// settings). Uses `tc netem`, or a userspace delay line where the
    /// kernel has no netem; the result says which.
    pub fn netem(&self, host: &Host, netem: Netem) -> anyhow::Result<NetemBackend> {
        anyhow::ensure!(
            (0.0..=100.0).contains(&netem.loss_percent),
            "netem loss must be a percentage 0-100, not {}",
            netem.loss_percent
        );
        self.clear_netem(host)?;
        let tc = tools::system("tc").map_err(|e| anyhow::anyhow!("{e} (Debian iproute2)"))?;
        let output = Command::new(tc)
            .args([
                "-n",
                &host.netns,
                "qdisc",
                "replace",
                "dev",
                HOST_IFACE,
                "root",
                "netem",
            ])
            .arg("delay")
            .arg(format!("{}us", netem.delay.as_micros()))
            .arg("loss")
            .arg(format!("{}%", netem.loss_percent))
            .output()
            .context("running tc")?;
        if output.status.success() {
            return Ok(NetemBackend::Tc);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        anyhow::ensure!(
            stderr.contains("Specified qdisc kind is unknown"),
            "tc qdisc netem on {}: {stderr}",
            host.name
        );
        let line = delay::DelayLine::start(&host.netns, HOST_IFACE, netem)?;
        self.lock_delays().insert(host.index, line);
        Ok(NetemBackend::Userspace)
    }

    /// Removes latency and loss from `host`.
    pub fn clear_netem(&self, host: &Host) -> anyhow::Result<()> {
        if let Some(line) = self.lock_delays().remove(&host.index) {
            line.stop();
        }
        // Fails when there is no netem qdisc, which is fine.
        let _ = Command::new(tools::system("tc")?)
            .args(["-n", &host.netns, "qdisc", "del", "dev", HOST_IFACE, "root"])
            .output();
        Ok(())
    }

    fn apply_partitions(&self, p: &Partitions) -> anyhow::Result<()> {
        // One nft transaction: the rule set changes atomically.
        let mut script = format!("flush chain bridge {NFT_TABLE} {NFT_CHAIN}\n");
        // Both ways: everything, ARP and neighbour discovery included. One
        // way: IPv4, and TCP over IPv6 (ARP and neighbour discovery pass,
        // so the one-way cut is not also a resolution failure).
        let rules = p
            .both
            .iter()
            .flat_map(|&(a, b)| [(a, b, ""), (b, a, "")])
            .chain(
                p.one_way
                    .iter()
                    .flat_map(|&(a, b)| [(a, b, "ether type ip "), (a, b, "ip6 nexthdr tcp ")]),
            );
        for (from, to, what) in rules {
            let (from, to) = (&self.hosts[from].bridge_port, &self.hosts[to].bridge_port);
            script.push_str(&format!(
                "add rule bridge {NFT_TABLE} {NFT_CHAIN} iifname \"{from}\" oifname \"{to}\" {what}drop\n"
            ));
        }
        nft(&self.bridge_netns, &script)
    }

    fn lock_partitions(&self) -> MutexGuard<'_, Partitions> {
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_delays(&self) -> MutexGuard<'_, HashMap<usize, delay::DelayLine>> {
        self.delays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, line) in self.lock_delays().drain() {
            line.stop();
        }
        // Hosts first, the bridge last (it was created first).
        for netns in self.created.iter().rev() {
            if let Err(err) = delete_netns(netns) {
                eprintln!("[bulwark-testkit] cleaning up lab {}: {err:#}", self.id);
            }
        }
    }
}

/// The partitions in force, by host index.
#[derive(Debug, Default)]
struct Partitions {
    both: BTreeSet<(usize, usize)>,
    one_way: BTreeSet<(usize, usize)>,
}

fn pair(a: &Host, b: &Host) -> (usize, usize) {
    (a.index.min(b.index), a.index.max(b.index))
}

impl Host {
    /// `h1`, `h2`, …
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace name (`bwk<pid>-<n>-h1`), for `ip netns exec`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The namespace file (`/run/netns/<name>`).
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// Its address (`198.18.0.<n>`).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Its IPv6 address (`fd00:18::<n>`).
    pub fn addr6(&self) -> Ipv6Addr {
        let [a, b, c, d, e, f, g, _] = SUBNET6.segments();
        Ipv6Addr::new(a, b, c, d, e, f, g, u16::from(self.addr.octets()[3]))
    }

    /// Its interface on the bridge (`eth0`).
    pub fn interface(&self) -> &str {
        HOST_IFACE
    }

    /// Runs a command inside the host and returns its output (whatever the
    /// exit status). Blocks; give commands their own timeouts (`ping -W`).
    pub fn exec<I, S>(&self, program: &str, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Command::new(tools::system("ip")?)
            .args(["netns", "exec", &self.netns, program])
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.name))
    }

    /// Like [`Host::exec`], but a non-zero exit is an error (with its
    /// stderr); returns stdout.
    pub fn exec_ok<I, S>(&self, program: &str, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let output = self.exec(program, args)?;
        anyhow::ensure!(
            output.status.success(),
            "{program} in {} failed ({}): {}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// One ping from this host to `addr` with a 1 s timeout: true if it
    /// was answered.
    pub fn ping(&self, addr: Ipv4Addr) -> anyhow::Result<bool> {
        Ok(self.ping_rtt(addr)?.is_some())
    }

    /// One ping from this host to `addr` (1 s timeout): its round-trip time.
    pub fn ping_rtt(&self, addr: Ipv4Addr) -> anyhow::Result<Option<Duration>> {
        let output = self.exec("ping", ["-n", "-c", "1", "-W", "1", &addr.to_string()])?;
        if !output.status.success() {
            return Ok(None);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let millis = stdout
            .split("time=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|ms| ms.parse::<f64>().ok())
            .with_context(|| format!("no time= in ping output {stdout:?}"))?;
        Ok(Some(Duration::from_secs_f64(millis / 1000.0)))
    }

    /// Spawns a supervised process inside this host (through `ip netns
    /// exec`), e.g. `host.spawn(ProcessBuilder::new("lb-1", bin))`.
    pub fn spawn(&self, builder: ProcessBuilder) -> anyhow::Result<Process> {
        builder.netns(self.netns.clone()).spawn()
    }

    /// Runs `f` on a thread that has entered this host's network namespace
    /// and returns its result; sockets `f` creates belong to the host. A
    /// panic in `f` is re-raised here.
    pub fn in_netns<R, F>(&self, f: F) -> anyhow::Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        run_in_netns(&self.netns, f)
    }

    /// A TCP connection from this host to `addr`: the socket is created in
    /// the host's namespace, then connected on the caller's tokio runtime.
    /// A cut link makes this hang in SYN retries: wrap it in a timeout.
    pub async fn tcp_connect(&self, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
        tcp_connect_in(&self.netns, addr).await
    }

    /// A TCP listener bound inside this host (call within a tokio runtime),
    /// e.g. for an in-process server that should live on this host.
    pub fn tcp_listener(&self, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
        let listener = run_in_netns(&self.netns, || -> std::io::Result<std::net::TcpListener> {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?
        .with_context(|| format!("binding {addr} in {}", self.name))?;
        tokio::net::TcpListener::from_std(listener).context("registering the listener with tokio")
    }
}

/// Runs `f` on a thread inside the named namespace. `setns(CLONE_NEWNET)`
/// affects only the calling thread, and that thread ends with `f`, so no
/// other code ever runs in the wrong namespace.
pub(crate) fn run_in_netns<R, F>(netns: &str, f: F) -> anyhow::Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let path = Path::new(NETNS_DIR).join(netns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || -> std::io::Result<R> {
            // SAFETY: setns on a valid namespace fd; it only changes this
            // thread's network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        });
        match thread.join() {
            Ok(result) => result.with_context(|| format!("entering network namespace {netns}")),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A TCP connection to `addr` from inside the named namespace.
pub(crate) async fn tcp_connect_in(
    netns: &str,
    addr: SocketAddr,
) -> anyhow::Result<tokio::net::TcpStream> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let stream = run_in_netns(netns, || -> std::io::Result<std::net::TcpStream> {
        // SAFETY: socket(2) has no memory preconditions; the fd is checked
        // and owned right away.
        let fd = unsafe {
            libc::socket(
                domain,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket nobody else owns.
        Ok(std::net::TcpStream::from(unsafe {
            OwnedFd::from_raw_fd(fd)
        }))
    })?
    .with_context(|| format!("creating a socket in {netns}"))?;
    let socket = tokio::net::TcpSocket::from_std_stream(stream);
    socket
        .connect(addr)
        .await
        .with_context(|| format!("connecting to {addr} from {netns}"))
}

/// Deletes the network namespaces of test processes that no longer run
/// (`bwk<pid>-…` with a dead pid), killing anything left inside them.
/// Returns the names it deleted. [`Lab::start`] runs it.
pub fn sweep_stale() -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).context(format!("listing {NETNS_DIR}")),
    };
    let own = std::process::id();
    let mut deleted = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid == own || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Another process may be sweeping the same leftovers: losing that
        // race is fine.
        if delete_netns(&name).is_ok() {
            deleted.push(name);
        }
    }
    Ok(deleted)
}

/// The pid in a harness namespace name (`bwk<pid>-…`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

fn delete_netns(netns: &str) -> anyhow::Result<()> {
    // Processes keep a namespace alive after its name is gone; kill them.
    if let Ok(output) = Command::new(tools::system("ip")?)
        .args(["netns", "pids", netns])
        .output()
    {
        for pid in String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<libc::pid_t>().ok())
        {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    run("ip", ["netns", "del", netns]).map(drop)
}

fn run<const N: usize>(program: &str, args: [&str; N]) -> anyhow::Result<String> {
    let output = Command::new(tools::system(program)?)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(
        output.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn nft(netns: &str, script: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new(tools::system("ip")?)
        .args(["netns", "exec", netns])
        .arg(tools::system("nft")?)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())
        .context("writing the nft script")?;
    let output = child.wait_with_output().context("waiting for nft")?;
    anyhow::ensure!(
        output.status.success(),
        "nft in {netns} failed: {}\nscript:\n{script}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_reads_only_harness_names() {
        assert_eq!(owner_pid("bwk1234-0-h1"), Some(1234));
        assert_eq!(owner_pid("bwk99-7-br"), Some(99));
        assert_eq!(owner_pid("bwkx-0-h1"), None);
        assert_eq!(owner_pid("cni-1234"), None);
        assert_eq!(owner_pid("bwk1234"), None);
    }
}
