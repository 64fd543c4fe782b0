//! The jepsen-style schedule shared by the arp-mode checker (lb_jepsen.rs)
//! and the bgp-mode partition trials (lb_bgp_netns.rs): the seeded fault
//! schedule, how a fault is injected into and healed on a lab of three LB
//! nodes, and which nodes count as live for a witness (a SIGKILLed node's
//! leftovers, or a restarted one's, are stale, not a second holder).
//!
//! The schedule (fault kinds, targets by role or index, durations) is a
//! pure function of the seed; which node "the leader" is at the moment of a
//! fault is decided by the cluster, so a replay repeats the schedule, not
//! necessarily every interleaving. Environment:
//! - [`SEED_ENV`]`=S`: replay the trial with seed S;
//! - [`TRIALS_ENV`]`=N`: N trials with fresh random seeds (the long mode;
//!   run with `cargo test`, which has no per-test timeout);
//! - [`STEPS_ENV`]`=K`: faults per trial (default [`DEFAULT_STEPS`]).

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bulwark_testkit::{Host, Lab, Process};

/// Replays one trial.
pub const SEED_ENV: &str = "BULWARK_JEPSEN_SEED";
/// Runs this many trials with random seeds.
pub const TRIALS_ENV: &str = "BULWARK_JEPSEN_TRIALS";
/// Faults per trial.
pub const STEPS_ENV: &str = "BULWARK_JEPSEN_STEPS";
/// Faults per trial unless [`STEPS_ENV`] says otherwise: the first six
/// cover every fault kind.
pub const DEFAULT_STEPS: usize = 7;
/// LB nodes per trial.
pub const NODES: usize = 3;
/// How long a restarted node may keep what its killed run left behind
/// (its address, in bgp mode a route) before a witness counts it as a
/// holder.
pub const RESTART_GRACE: Duration = Duration::from_secs(3);

/// The seeds to run: [`SEED_ENV`]'s, [`TRIALS_ENV`] random ones, or `ci`.
pub fn seeds(ci: &[u64]) -> Vec<u64> {
    if let Some(seed) = env_u64(SEED_ENV) {
        vec![seed]
    } else if let Some(n) = env_u64(TRIALS_ENV) {
        let mut r = Rng::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        );
        (0..n).map(|_| r.next_u64()).collect()
    } else {
        ci.to_vec()
    }
}

/// Faults per trial: [`STEPS_ENV`] or [`DEFAULT_STEPS`].
pub fn steps() -> usize {
    env_u64(STEPS_ENV).map_or(DEFAULT_STEPS, |n| n as usize)
}

pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?}: not a number: {e}")))
}

/// splitmix64: tiny, seedable, good enough to pick faults.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next_u64() % (hi - lo + 1))
    }
}

/// One fault. Nodes are 0-based LB host indices; partitions are between
/// LB hosts only (the client, and in bgp mode the router, still reach
/// every host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The leader (at that moment) partitioned from both peers; the client
    /// (and the router) still reach it — the case where a stale leader
    /// must let go.
    IsolateLeader,
    /// One node partitioned from the other two (both ways).
    Split { alone: usize },
    /// `from`'s packets to `to` dropped, the other direction delivered.
    OneWay { from: usize, to: usize },
    /// A node's link cut and restored `flaps` times.
    FlapLink { node: usize, flaps: usize },
    /// SIGKILL of the leader at that moment.
    KillLeader,
    /// SIGKILL of a node by index (leader or not).
    Kill { node: usize },
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::IsolateLeader => "isolate-leader",
            Fault::Split { .. } => "split-1|2",
            Fault::OneWay { .. } => "one-way",
            Fault::FlapLink { .. } => "flap-link",
            Fault::KillLeader => "kill-leader",
            Fault::Kill { .. } => "kill",
        }
    }
}

/// A step: inject, hold, and heal (or leave it until the end of the trial).
#[derive(Clone, Debug)]
pub struct Step {
    pub fault: Fault,
    pub hold: Duration,
    pub heal: bool,
}

/// The steps of a trial: every fault kind once in a seeded order, then
/// random ones.
pub fn schedule(seed: u64, steps: usize) -> Vec<Step> {
    let mut r = Rng::new(seed);
    let random_fault = |r: &mut Rng, kind: usize| match kind {
        0 => Fault::IsolateLeader,
        1 => Fault::Split {
            alone: r.below(NODES),
        },
        2 => {
            let from = r.below(NODES);
            Fault::OneWay {
                from,
                to: (from + 1 + r.below(NODES - 1)) % NODES,
            }
        }
        3 => Fault::FlapLink {
            node: r.below(NODES),
            flaps: 1 + r.below(4),
        },
        4 => Fault::KillLeader,
        _ => Fault::Kill {
            node: r.below(NODES),
        },
    };
    const KINDS: usize = 6;
    let mut kinds: Vec<usize> = (0..KINDS).collect();
    for i in (1..KINDS).rev() {
        kinds.swap(i, r.below(i + 1));
    }
    (0..steps)
        .map(|i| {
            let kind = if i < KINDS { kinds[i] } else { r.below(KINDS) };
            let fault = random_fault(&mut r, kind);
            Step {
                fault,
                hold: r.millis(300, 2500),
                heal: r.chance(75),
            }
        })
        .collect()
}

/// Whether an LB node's process runs, as far as the witnesses care.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Life {
    /// Running, and since when it counts as such.
    Alive(Instant),
    /// SIGKILLed (or stopped) at this instant: whatever its host still has
    /// or the network still points at is stale.
    Dead(Instant),
    /// Started again at this instant; stale until it drops the leftover
    /// address or [`RESTART_GRACE`] passes.
    Restarting(Instant),
}

/// Which of `with_vip` count as holders: alive nodes, and restarting ones
/// that still have the address after [`RESTART_GRACE`]. A restarting node
/// seen without the address is alive from then on.
pub fn classify(life: &Mutex<Vec<Life>>, with_vip: &[usize]) -> Vec<usize> {
    let mut life = life.lock().unwrap();
    for (i, l) in life.iter_mut().enumerate() {
        if let Life::Restarting(since) = *l
            && (!with_vip.contains(&i) || since.elapsed() > RESTART_GRACE)
        {
            *l = Life::Alive(Instant::now());
        }
    }
    with_vip
        .iter()
        .copied()
        .filter(|&i| matches!(life[i], Life::Alive(_)))
        .collect()
}

/// What the schedule acts on: a lab whose first [`NODES`] hosts run the
/// LB nodes, and the witnesses' view of which of them are alive.
pub struct Target<'a> {
    pub lab: &'a Lab,
    pub nodes: &'a mut [Process],
    /// The LB hosts, in node order.
    pub hosts: &'a [Host],
    pub vips: &'a [IpAddr],
    pub life: &'a Mutex<Vec<Life>>,
    /// Which hosts have the VIP bound (arp mode: on the lab interface; bgp
    /// mode: on `lo`).
    pub holders: fn(&[Host], &[IpAddr]) -> Vec<usize>,
}

/// How to undo a fault.
enum Undo {
    HealAll,
    Restart(usize),
}

impl Target<'_> {
    /// The single host with the VIP among running nodes, if any.
    pub fn holder(&self) -> Option<usize> {
        let h: Vec<usize> = (self.holders)(self.hosts, self.vips)
            .into_iter()
            .filter(|&i| self.nodes[i].is_running())
            .collect();
        (h.len() == 1).then(|| h[0])
    }

    /// Injects step `n`, holds it and heals it if the schedule says so.
    /// Returns the fault's kind, or "no-op" for a fault aimed at the leader
    /// while there was none (an election running) or at a node already
    /// down.
    pub async fn run_step(
        &mut self,
        n: usize,
        step: &Step,
        r: &mut Rng,
        t0: Instant,
    ) -> &'static str {
        let mut leader = self.holder();
        if matches!(step.fault, Fault::IsolateLeader | Fault::KillLeader) {
            // Aim at a leader: give a running election a moment to finish.
            let deadline = Instant::now() + Duration::from_secs(3);
            while leader.is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
                leader = self.holder();
            }
        }
        let applies = match step.fault {
            Fault::IsolateLeader | Fault::KillLeader => leader.is_some(),
            Fault::Kill { node } => self.nodes[node].is_running(),
            _ => true,
        };
        eprintln!(
            "jepsen {:>6.1?}: step {n}: {:?} (leader {}), hold {:?}, heal {}",
            t0.elapsed(),
            step.fault,
            leader.map_or("none".to_owned(), |i| format!("h{}", i + 1)),
            step.hold,
            step.heal
        );
        let (lab, hosts) = (self.lab, self.hosts);
        let isolate = |alone: usize| {
            for (i, h) in hosts.iter().enumerate() {
                if i != alone {
                    lab.partition(&hosts[alone], h).unwrap();
                }
            }
            Undo::HealAll
        };
        let undo: Option<Undo> = match step.fault {
            Fault::IsolateLeader => leader.map(isolate),
            Fault::Split { alone } => Some(isolate(alone)),
            Fault::OneWay { from, to } => {
                lab.partition_one_way(&hosts[from], &hosts[to]).unwrap();
                Some(Undo::HealAll)
            }
            Fault::FlapLink { node, flaps } => {
                let per = step.hold / (2 * flaps as u32);
                for _ in 0..flaps {
                    lab.cut_link(&hosts[node]).unwrap();
                    tokio::time::sleep(per.mul_f64(0.5 + r.below(100) as f64 / 100.0)).await;
                    lab.restore_link(&hosts[node]).unwrap();
                    tokio::time::sleep(per).await;
                }
                None
            }
            Fault::KillLeader => leader.map(|ld| self.kill(ld)),
            Fault::Kill { node } => Some(self.kill(node)),
        };
        if !matches!(step.fault, Fault::FlapLink { .. }) {
            tokio::time::sleep(step.hold).await;
        }
        if step.heal
            && let Some(undo) = undo
        {
            self.undo(undo);
        }
        if applies { step.fault.kind() } else { "no-op" }
    }

    /// Heals every partition and link and starts every node that is down.
    pub fn heal_everything(&mut self) {
        self.lab.heal_all().unwrap();
        for h in self.hosts {
            self.lab.restore_link(h).unwrap();
        }
        for i in 0..self.nodes.len() {
            self.undo(Undo::Restart(i));
        }
    }

    fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::HealAll => self.lab.heal_all().unwrap(),
            Undo::Restart(i) => {
                if !self.nodes[i].is_running() {
                    self.life.lock().unwrap()[i] = Life::Restarting(Instant::now());
                    self.nodes[i].start().unwrap();
                }
            }
        }
    }

    fn kill(&mut self, node: usize) -> Undo {
        if self.nodes[node].is_running() {
            self.nodes[node].kill().unwrap();
            // After the kill: until now it was alive and counted.
            self.life.lock().unwrap()[node] = Life::Dead(Instant::now());
        }
        Undo::Restart(node)
    }
}
