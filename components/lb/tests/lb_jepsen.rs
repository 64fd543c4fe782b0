//! Jepsen-style checker for the LB cluster on a network-namespace lab (root
//! only; skipped without it, failed instead with
//! BULWARK_REQUIRE_PRIVILEGED=1).
//!
//! A trial starts three `bulwark-lb` nodes (arp mode) and a client host,
//! then runs a seeded schedule of faults — the leader partitioned from its
//! peers, a 1|2 split, an asymmetric (one-way) partition, link flaps,
//! SIGKILL of the leader or of any node, later restarts — while an operator
//! client keeps writing to the backend registry. Two witnesses run all the
//! time and fail the trial on any instant with two holders of the VIP:
//! `ip addr` on every LB host, and which MACs answer ARP for the VIP as
//! seen from the client host. After the faults are healed and every node
//! is running again, the committed state must be identical on all nodes
//! (applied and commit index, backends, members, the recorded VIP holder),
//! must hold every write that was acknowledged, and the recorded holder must
//! be the host that really has the VIP.
//!
//! A SIGKILLed node cannot delete its VIP address: the kernel of a dead
//! holder's host keeps the address (and answers ARP for it) until its
//! lifetime runs out (1 s with the default lease, renewed every 250 ms;
//! the kernel removes it 1-2 s after the last renewal) or the node starts
//! again and removes it. The witnesses count those answers as *stale*, not
//! as a second holder, for up to [`DEAD_GRACE`] after the kill and up to
//! [`jepsen::RESTART_GRACE`] after a restart; they are reported in the figures
//! (docs/RELIABILITY.md discusses them). A dead node's address still there
//! after [`DEAD_GRACE`] fails the trial: its lifetime did not end it.
//!
//! Modes (environment):
//! - none: CI's short mode, [`CI_SEEDS`] (every fault kind in each trial);
//! - `BULWARK_JEPSEN_SEED=S`: replay the trial with seed S;
//! - `BULWARK_JEPSEN_TRIALS=N`: N trials with fresh random seeds (the long
//!   mode; run with `cargo test`, which has no per-test timeout); stops at
//!   the first failing trial and prints its seed;
//! - `BULWARK_JEPSEN_STEPS=K`: faults per trial (default 7);
//! - `BULWARK_JEPSEN_BUDGET_SECS=T`: start no new trial after T seconds
//!   (the figures then say how many ran);
//! - `BULWARK_LB_STACK=v6|dual`: the trials of the modes above run with an
//!   IPv6 VIP (Raft, API, backend on IPv6 too) or a dual-stack VIP (its
//!   two addresses must never be on two hosts: one `ip addr` sweep covers
//!   both). For an IPv6 address the neighbour witness sends neighbour
//!   solicitations instead of ARP requests.
//!
//! CI also runs one short trial each with an IPv6 and a dual-stack VIP
//! ([`STACK_SEED`], [`DEFAULT_STEPS`] faults).
//!
//! The schedule (tests/jepsen/mod.rs, shared with the bgp-mode partition
//! trials in lb_bgp_netns.rs) and the writes are a pure function of the
//! seed; which node "the leader" is at the moment of a fault is decided by
//! the cluster, so a replay repeats the schedule, not necessarily every
//! interleaving.

// Test code: a failure should fail loudly.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_api::lb::v1 as lb;
use bulwark_api::lb::v1::load_balancer_client::LoadBalancerClient;
use bulwark_testkit::Host;
use bulwark_testkit::cluster::lab::{
    BACKEND_PORT, LbLab, Stack, api_via, arp_probe, echo, holders_of_any, nd_probe,
};
use jepsen::{
    DEFAULT_STEPS, Life, NODES, Rng, SEED_ENV, STEPS_ENV, Target, classify, env_u64, schedule,
};
use tonic::transport::Channel;

mod jepsen;

/// Wall-clock budget for starting trials.
const BUDGET_ENV: &str = "BULWARK_JEPSEN_BUDGET_SECS";
/// CI's seeds: two trials, each covering every fault kind.
const CI_SEEDS: &[u64] = &[0x6a65_7073_656e_0001, 0x6a65_7073_656e_0002];
/// CI's IPv6 and dual-stack trials: the first CI seed (every fault kind).
const STACK_SEED: u64 = CI_SEEDS[0];
/// How long a killed node's host may keep the address before the
/// witnesses count it as a holder (and the `ip addr` witness as a
/// violation): the kernel removes it at most lifetime (1 s) + 1 s after
/// the last renewal, which came at most 250 ms before the kill; the rest
/// is margin for a loaded machine.
const DEAD_GRACE: Duration = Duration::from_secs(5);
/// How long the cluster has to converge after healing.
const SETTLE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_jepsen_partitions_kills_and_flaps_never_split_the_vip() {
    let steps = jepsen::steps();
    let stack = Stack::from_env();
    let seeds = jepsen::seeds(CI_SEEDS);

    run_trials(&seeds, steps, stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_jepsen_ipv6_and_dual_stack_vips_never_split() {
    for stack in [Stack::V6, Stack::Dual] {
        run_trials(&[STACK_SEED], DEFAULT_STEPS, stack).await;
    }
}

/// Runs a trial per seed with `stack`; panics on the first failure.
async fn run_trials(seeds: &[u64], steps: usize, stack: Stack) {
    let budget = env_u64(BUDGET_ENV).map(Duration::from_secs);
    let started = Instant::now();
    let mut total = Figures::default();
    for (n, &seed) in seeds.iter().enumerate() {
        if budget.is_some_and(|b| started.elapsed() > b) {
            eprintln!("jepsen: {BUDGET_ENV} spent after {n} trials");
            break;
        }
        eprintln!(
            "jepsen: {stack:?} trial {}/{} seed {seed:#x} ({steps} faults)",
            n + 1,
            seeds.len()
        );
        let Some(result) = trial(seed, steps, stack).await else {
            return; // skipped: no root
        };
        match result {
            Ok(f) => {
                eprintln!("jepsen: trial {} ok: {f}", n + 1);
                total.add(&f);
            }
            Err(failure) => panic!(
                "jepsen {stack:?} trial {} FAILED (replay: {SEED_ENV}={seed} {STEPS_ENV}={steps} BULWARK_LB_STACK={}): {failure}\n\
                 after {} passing trials: {total}",
                n + 1,
                match stack {
                    Stack::V4 => "v4",
                    Stack::V6 => "v6",
                    Stack::Dual => "dual",
                },
                total.trials
            ),
        }
    }
    eprintln!(
        "jepsen: {stack:?}: {} trials passed in {:?}: {total}",
        total.trials,
        started.elapsed()
    );
    assert!(total.trials > 0);
    // The witnesses really watched: a trial lasts seconds, both sample
    // every few tens of milliseconds.
    assert!(total.addr_sweeps > 50 * total.trials, "{total}");
    assert!(total.arp_windows > 50 * total.trials, "{total}");
}

// ---------------------------------------------------------------------------
// The witnesses
// ---------------------------------------------------------------------------

/// What the witnesses saw.
#[derive(Debug, Default)]
struct Seen {
    addr_sweeps: u64,
    arp_windows: u64,
    /// Sweeps that found the VIP on a host whose node was dead.
    stale_addr_sweeps: u64,
    /// ARP windows with an answer from a dead node's host.
    stale_arp_windows: u64,
    /// Violations: what was seen, when (since the trial started).
    violations: Vec<String>,
    /// Hosts seen holding (alive), for the figures.
    holders: BTreeSet<usize>,
}

struct Witnesses {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    life: Arc<Mutex<Vec<Life>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Witnesses {
    fn start(l: &LbLab, t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let life = Arc::new(Mutex::new(vec![Life::Alive(t0); NODES]));
        let hosts = l.lb_hosts();
        let macs: BTreeMap<[u8; 6], usize> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (mac_of(h), i))
            .collect();
        let mut threads = Vec::new();
        {
            let (stop, seen, life, vips) = (stop.clone(), seen.clone(), life.clone(), l.vip_ips());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Either address of a dual-stack VIP: the pair split
                    // over two hosts is two holders.
                    let with_vip = holders_of_any(&hosts, &vips);
                    let live = classify(&life, &with_vip);
                    let outlived = outlived_their_node(&life, &with_vip);
                    let mut s = seen.lock().unwrap();
                    s.addr_sweeps += 1;
                    if live.len() < with_vip.len() {
                        s.stale_addr_sweeps += 1;
                    }
                    for (h, dead_for) in outlived {
                        s.violations.push(format!(
                            "{:?}: VIP still on the interface of h{} {dead_for:?} after its node was killed (ip addr)",
                            t0.elapsed(),
                            h + 1
                        ));
                    }
                    s.holders.extend(live.iter().copied());
                    if live.len() > 1 {
                        s.violations.push(format!(
                            "{:?}: VIP on the interfaces of h{:?} (ip addr)",
                            t0.elapsed(),
                            live.iter().map(|i| i + 1).collect::<Vec<_>>()
                        ));
                    }
                }
            }));
        }
        // One neighbour witness per VIP address: ARP for IPv4, neighbour
        // solicitation for IPv6.
        for vip in l.vip_ips() {
            let (stop, seen, life, client) = (stop.clone(), seen.clone(), life.clone(), l.client());
            let macs = macs.clone();
            threads.push(std::thread::spawn(move || {
                let (me, me6) = (client.addr(), client.addr6());
                let iface = client.interface().to_owned();
                client
                    .in_netns(move || {
                        let on_window = |answered: BTreeSet<[u8; 6]>| {
                            // A MAC that is no LB host's counts as a holder.
                            let hosts: Vec<usize> = answered
                                .iter()
                                .map(|m| macs.get(m).copied().unwrap_or(usize::MAX))
                                .collect();
                            let live: Vec<usize> = hosts
                                .iter()
                                .copied()
                                .filter(|&h| h == usize::MAX || alive_for_window(&life, h))
                                .collect();
                            let mut s = seen.lock().unwrap();
                            s.arp_windows += 1;
                            if live.len() < hosts.len() {
                                s.stale_arp_windows += 1;
                            }
                            if live.len() > 1 {
                                s.violations.push(format!(
                                    "{:?}: {} MACs answered ARP/ND for the VIP {vip}: {answered:02x?}",
                                    t0.elapsed(),
                                    live.len()
                                ));
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
            seen,
            life,
            threads,
        }
    }

    fn violations(&self) -> Vec<String> {
        self.seen.lock().unwrap().violations.clone()
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Witnesses {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Hosts in `with_vip` whose node was killed more than [`DEAD_GRACE`] ago,
/// and how long ago: the address's lifetime should have removed it.
fn outlived_their_node(life: &Mutex<Vec<Life>>, with_vip: &[usize]) -> Vec<(usize, Duration)> {
    let life = life.lock().unwrap();
    with_vip
        .iter()
        .filter_map(|&i| match life[i] {
            Life::Dead(since) if since.elapsed() > DEAD_GRACE => Some((i, since.elapsed())),
            _ => None,
        })
        .collect()
}

/// Whether node `h` counts as a holder for an ARP window that just ended:
/// alive since before the window began. An answer from a restarting node's
/// leftover address can arrive moments before the node removes it, in the
/// same window in which the `ip addr` witness then sees it gone.
fn alive_for_window(life: &Mutex<Vec<Life>>, h: usize) -> bool {
    // The window is 20 ms; the margin covers the classification delay.
    let window = Duration::from_millis(50);
    match life.lock().unwrap()[h] {
        Life::Alive(since) => since.elapsed() > window,
        // Its host answering after its address should have expired.
        Life::Dead(since) => since.elapsed() > DEAD_GRACE + window,
        Life::Restarting(_) => false,
    }
}

/// The MAC of the host's lab interface.
fn mac_of(h: &Host) -> [u8; 6] {
    let out = h
        .exec_ok("ip", ["-o", "link", "show", "dev", h.interface()])
        .unwrap();
    let hex = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {out:?}"));
    let mut mac = [0u8; 6];
    for (d, part) in mac.iter_mut().zip(hex.split(':')) {
        *d = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

// ---------------------------------------------------------------------------
// The writer: an operator changing the backend registry throughout
// ---------------------------------------------------------------------------

/// What the writer learned. Only acknowledged writes are promised;
/// timed-out ones may or may not have been committed.
#[derive(Debug, Default)]
struct Writes {
    acked: u64,
    indeterminate: u64,
    refused: u64,
    /// Backends whose AddBackend was acknowledged.
    added: BTreeSet<String>,
    /// Per backend: every weight ever sent, and the highest acknowledged.
    weights_sent: BTreeMap<String, BTreeSet<u32>>,
    weight_acked: BTreeMap<String, u32>,
}

async fn writer(
    seed: u64,
    mut clients: Vec<LoadBalancerClient<Channel>>,
    backend_addr: String,
    stop: Arc<AtomicBool>,
) -> Writes {
    let mut r = Rng::new(seed ^ 0x5772_6974_6572);
    let mut w = Writes::default();
    let mut target = 0usize;
    let mut next_id = 0u32;
    // Weights only grow, so "the final weight is at least the highest
    // acknowledged one" is a real check.
    let mut next_weight = 1u32;
    let timeout = Duration::from_millis(1500);
    while !stop.load(Ordering::Relaxed) {
        let known: Vec<String> = w.added.iter().cloned().collect();
        let c = &mut clients[target];
        let outcome = if known.is_empty() || r.chance(35) {
            let id = format!("j-{next_id}");
            next_id += 1;
            let res = tokio::time::timeout(
                timeout,
                c.add_backend(lb::AddBackendRequest {
                    id: id.clone(),
                    address: backend_addr.clone(),
                    zone: String::new(),
                    weight: Some(1),
                    drained: false,
                }),
            )
            .await;
            let ok = matches!(res, Ok(Ok(_)));
            if ok {
                w.added.insert(id.clone());
            }
            // A retried id whose first attempt did commit.
            if let Ok(Err(e)) = &res
                && e.code() == tonic::Code::AlreadyExists
            {
                w.added.insert(id);
            }
            res.map(|r| r.map(drop))
        } else {
            let id = known[r.below(known.len())].clone();
            if r.chance(70) {
                next_weight += 1;
                let weight = next_weight;
                w.weights_sent.entry(id.clone()).or_default().insert(weight);
                let res = tokio::time::timeout(
                    timeout,
                    c.update_backend(lb::UpdateBackendRequest {
                        id: id.clone(),
                        weight: Some(weight),
                        zone: None,
                    }),
                )
                .await;
                if matches!(res, Ok(Ok(_))) {
                    let best = w.weight_acked.entry(id).or_default();
                    *best = (*best).max(weight);
                }
                res.map(|r| r.map(drop))
            } else if r.chance(50) {
                tokio::time::timeout(
                    timeout,
                    c.drain_backend(lb::DrainBackendRequest {
                        id,
                        max_drain_duration: None,
                    }),
                )
                .await
                .map(|r| r.map(drop))
            } else {
                tokio::time::timeout(timeout, c.undrain_backend(lb::UndrainBackendRequest { id }))
                    .await
                    .map(|r| r.map(drop))
            }
        };
        match outcome {
            Ok(Ok(())) => w.acked += 1,
            Ok(Err(e)) => {
                match e.code() {
                    // Definitely not applied: a follower or a node without
                    // a leader refused it.
                    tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => w.refused += 1,
                    _ => w.indeterminate += 1,
                }
                target = match bulwark_api::leader_hint::from_status(&e) {
                    Some(h) if (1..=NODES as u64).contains(&h.node_id) => h.node_id as usize - 1,
                    _ => (target + 1) % NODES,
                };
            }
            Err(_) => {
                w.indeterminate += 1;
                target = (target + 1) % NODES;
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    w
}

// ---------------------------------------------------------------------------
// A trial
// ---------------------------------------------------------------------------

/// Figures of one or more trials.
#[derive(Debug, Default)]
struct Figures {
    trials: u64,
    faults: BTreeMap<&'static str, u64>,
    addr_sweeps: u64,
    arp_windows: u64,
    stale_addr_sweeps: u64,
    stale_arp_windows: u64,
    writes_acked: u64,
    writes_indeterminate: u64,
    writes_refused: u64,
    distinct_holders: u64,
    violations: u64,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.trials += o.trials;
        for (k, v) in &o.faults {
            *self.faults.entry(k).or_default() += v;
        }
        self.addr_sweeps += o.addr_sweeps;
        self.arp_windows += o.arp_windows;
        self.stale_addr_sweeps += o.stale_addr_sweeps;
        self.stale_arp_windows += o.stale_arp_windows;
        self.writes_acked += o.writes_acked;
        self.writes_indeterminate += o.writes_indeterminate;
        self.writes_refused += o.writes_refused;
        self.distinct_holders += o.distinct_holders;
        self.violations += o.violations;
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults: u64 = self
            .faults
            .iter()
            .filter(|(k, _)| **k != "no-op")
            .map(|(_, v)| v)
            .sum();
        write!(
            f,
            "{} trials, {faults} faults {:?}, {} ip-addr sweeps ({} with a dead node's stale address), \
             {} ARP windows ({} with a stale answer), writes {} acked / {} indeterminate / {} refused, \
             {} VIP holders over the trials, {} violations",
            self.trials,
            self.faults,
            self.addr_sweeps,
            self.stale_addr_sweeps,
            self.arp_windows,
            self.stale_arp_windows,
            self.writes_acked,
            self.writes_indeterminate,
            self.writes_refused,
            self.distinct_holders,
            self.violations
        )
    }
}

/// One trial; `None` when the lab cannot run here.
async fn trial(seed: u64, steps: usize, stack: Stack) -> Option<Result<Figures, String>> {
    let mut l = LbLab::start_stack(NODES, stack).await?;
    let t0 = Instant::now();
    let result = run_trial(&mut l, seed, steps, t0).await;
    Some(result.map_err(|e| {
        let logs: String = l
            .nodes
            .iter()
            .map(|p| {
                let log = p.log();
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                format!(
                    "\n----- {} (last lines) -----\n{}",
                    p.name(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect();
        format!("{e}{logs}")
    }))
}

async fn run_trial(l: &mut LbLab, seed: u64, steps: usize, t0: Instant) -> Result<Figures, String> {
    let witnesses = Witnesses::start(l, t0);
    l.wait_for_holder(None, Duration::from_secs(30)).await;
    let hosts = l.lb_hosts();
    let client = l.client();
    let backend_addr = std::net::SocketAddr::new(l.own_addr(&client), BACKEND_PORT).to_string();
    let clients = |l: &LbLab| -> Vec<LoadBalancerClient<Channel>> {
        (0..NODES)
            .map(|i| {
                let addr = std::net::SocketAddr::new(l.own_addr(&hosts[i]), 9442);
                api_via(&client, addr, &l.operator)
            })
            .collect()
    };
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writes = tokio::spawn(writer(
        seed,
        clients(l),
        backend_addr.clone(),
        stop_writer.clone(),
    ));

    let mut figures = Figures {
        trials: 1,
        ..Figures::default()
    };
    let mut r = Rng::new(seed ^ 0x466c_6170);
    let vips = l.vip_ips();
    let mut target = Target {
        lab: &l.lab,
        nodes: &mut l.nodes,
        hosts: &hosts,
        vips: &vips,
        life: &witnesses.life,
        holders: holders_of_any,
    };
    for (n, step) in schedule(seed, steps).iter().enumerate() {
        let kind = target.run_step(n, step, &mut r, t0).await;
        *figures.faults.entry(kind).or_default() += 1;
        let v = witnesses.violations();
        if !v.is_empty() {
            return Err(format!("two VIP holders during step {n}: {v:#?}"));
        }
    }

    // Heal everything and let the cluster settle with every node running.
    eprintln!("jepsen {:>6.1?}: healing", t0.elapsed());
    target.heal_everything();
    wait_for_live_holder(l, Duration::from_secs(30)).await?;
    // A few more writes on the healed cluster, then stop writing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_writer.store(true, Ordering::Relaxed);
    let writes = writes.await.unwrap();
    figures.writes_acked = writes.acked;
    figures.writes_indeterminate = writes.indeterminate;
    figures.writes_refused = writes.refused;

    let settled = converge(l, &clients(l), &writes).await;
    let seen = witnesses.finish();
    figures.addr_sweeps = seen.addr_sweeps;
    figures.arp_windows = seen.arp_windows;
    figures.stale_addr_sweeps = seen.stale_addr_sweeps;
    figures.stale_arp_windows = seen.stale_arp_windows;
    figures.distinct_holders = seen.holders.len() as u64;
    figures.violations = seen.violations.len() as u64;
    if !seen.violations.is_empty() {
        return Err(format!("two VIP holders: {:#?}", seen.violations));
    }
    settled?;
    eprintln!("jepsen {:>6.1?}: converged", t0.elapsed());
    Ok(figures)
}

async fn wait_for_live_holder(l: &LbLab, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let h = l.holders();
        let mut answered = h.len() == 1;
        for vip in l.vips() {
            answered = answered && echo(&l.client(), vip, Duration::from_millis(500)).await;
        }
        if answered {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after healing, no single VIP holder within {timeout:?}: {h:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One node's committed state, with what is local to the node (traffic
/// counters, replication progress, who answered) left out.
#[derive(Debug, PartialEq)]
struct Committed {
    applied_index: u64,
    commit_index: u64,
    leader: Option<u64>,
    vip_holder: Option<u64>,
    backends: Vec<lb::Backend>,
    members: Vec<lb::Member>,
    membership_log_index: u64,
    membership_changing: bool,
}

async fn committed(c: &mut LoadBalancerClient<Channel>) -> Result<Committed, String> {
    let t = Duration::from_secs(2);
    let call = async {
        let status = c
            .get_status(lb::GetStatusRequest { max_failovers: 1 })
            .await?
            .into_inner();
        let backends = c
            .list_backends(lb::ListBackendsRequest::default())
            .await?
            .into_inner();
        let members = c
            .list_members(lb::ListMembersRequest {})
            .await?
            .into_inner();
        Ok::<_, tonic::Status>((status, backends, members))
    };
    let (status, backends, members) = tokio::time::timeout(t, call)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut bs = backends.backends;
    for b in &mut bs {
        b.traffic = None;
    }
    let mut ms = members.members;
    for m in &mut ms {
        m.replication = None;
    }
    Ok(Committed {
        // ListBackends reflects the same state as GetStatus when nothing is
        // being written; take the later of the two.
        applied_index: status.applied_index.max(backends.applied_index),
        commit_index: status.commit_index,
        leader: status.leader.map(|n| n.id),
        vip_holder: status.vip.and_then(|v| v.holder_node_id),
        backends: bs,
        members: ms,
        membership_log_index: members.membership_log_index,
        membership_changing: members.membership_changing,
    })
}

/// Waits until every node reports the same committed state, the recorded
/// VIP holder is the one host that has the VIP, and every acknowledged
/// write is in it.
async fn converge(
    l: &LbLab,
    clients: &[LoadBalancerClient<Channel>],
    writes: &Writes,
) -> Result<(), String> {
    let deadline = Instant::now() + SETTLE;
    let mut last;
    loop {
        // Who really has it now (a restarted node may still be dropping
        // the address its killed run left behind).
        let before = l.holders();
        let mut states = Vec::new();
        for c in clients {
            states.push(committed(&mut c.clone()).await);
        }
        let after = l.holders();
        match (before.as_slice(), after == before) {
            ([holder], true) => match check_states(&states, *holder, writes) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            },
            _ => last = format!("VIP holders {before:?} then {after:?}"),
        }
        if Instant::now() > deadline {
            return Err(format!("not converged within {SETTLE:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn check_states(
    states: &[Result<Committed, String>],
    holder: usize,
    writes: &Writes,
) -> Result<(), String> {
    let mut ok = Vec::new();
    for (i, s) in states.iter().enumerate() {
        match s {
            Ok(s) => ok.push(s),
            Err(e) => return Err(format!("h{} does not answer: {e}", i + 1)),
        }
    }
    let first = ok[0];
    for (i, s) in ok.iter().enumerate().skip(1) {
        if *s != first {
            return Err(format!(
                "h1 and h{} differ:\n h1: {first:?}\n h{}: {s:?}",
                i + 1,
                i + 1
            ));
        }
    }
    let want = Some(holder as u64 + 1);
    if first.vip_holder != want || first.leader != want {
        return Err(format!(
            "h{} has the VIP but the log says holder {:?}, leader {:?}",
            holder + 1,
            first.vip_holder,
            first.leader
        ));
    }
    if first.membership_changing || first.members.len() != NODES {
        return Err(format!("membership: {:?}", first.members));
    }
    let ids: BTreeMap<&str, &lb::Backend> =
        first.backends.iter().map(|b| (b.id.as_str(), b)).collect();
    if !ids.contains_key("api-1") {
        return Err("the configured backend api-1 is gone".to_owned());
    }
    for id in &writes.added {
        if !ids.contains_key(id.as_str()) {
            return Err(format!("acknowledged AddBackend {id:?} was lost"));
        }
    }
    for (id, &acked) in &writes.weight_acked {
        let b = ids[id.as_str()];
        let sent = &writes.weights_sent[id];
        if b.weight < acked || !(b.weight == 1 || sent.contains(&b.weight)) {
            return Err(format!(
                "backend {id:?} has weight {} but {acked} was acknowledged (sent {sent:?})",
                b.weight
            ));
        }
    }
    Ok(())
}
