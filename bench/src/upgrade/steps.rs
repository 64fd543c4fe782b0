//! The steps of the rolling-upgrade scenario: replacing one node's binary
//! (SIGTERM, the other build on the same data dir and config, wait until
//! the leader lists it as a voter with lag 0), a leadership transfer, and
//! the registry write that must reach every node of a mixed cluster. Each
//! step is measured on the load's record and by the lab's witnesses.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use bulwark_api::lb::v1 as lb;
use bulwark_testkit::Process;
use bulwark_testkit::cluster::lab::{BACKEND_PORT, LbLab, Sampler};
use bulwark_testkit::cluster::lb_process_of;

use super::load::{Load, Window};
use crate::stats::{ms, ms_cell};

/// How long a replaced node may take to be a voter with lag 0 again.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);

/// Load measured after each step's end condition, so connections that
/// fail a little later (a drain, a moved VIP) land in the step.
const SETTLE: Duration = Duration::from_secs(1);

/// How long a registry write may take to show on every node.
const VISIBLE_LIMIT: Duration = Duration::from_secs(10);

/// One step, as measured.
#[derive(Serialize)]
pub struct Step {
    pub trial: usize,
    /// `upgrade` (old -> new) or `rollback` (new -> old).
    pub phase: &'static str,
    /// `follower` or `leader` (a node replaced), or `transfer`.
    pub kind: &'static str,
    /// The node replaced, or the leader that handed over (1-based).
    pub node: usize,
    /// The build each node runs after the step (`old`/`new`, node order).
    pub builds_after: Vec<&'static str>,
    /// What the load saw during the step.
    #[serde(flatten)]
    pub window: Window,
    pub ip_addr_sweeps: u64,
    pub arp_windows: u64,
    /// Witness samples (an `ip addr` sweep or an ARP window) that saw two
    /// holders.
    pub double_holder_samples: usize,
    /// SIGTERM to exit.
    pub stop_ms: Option<f64>,
    /// Start of the other build to: the leader lists it as a voter with
    /// lag 0 and it answers its own API.
    pub caught_up_ms: Option<f64>,
    pub leader_before: u64,
    pub leader_after: u64,
    pub leader_changed: bool,
    pub term_before: u64,
    pub term_after: u64,
    pub duration_ms: f64,
}

/// A registry write through the leader of a mixed cluster.
#[derive(Serialize)]
pub struct MixedCheck {
    pub trial: usize,
    /// Which node runs which build, and which leads.
    pub state: String,
    pub leader_build: &'static str,
    /// The added (drained) backend, then its removal, reached every node.
    pub visible_everywhere: bool,
    pub add_visible_ms: Option<f64>,
    pub remove_visible_ms: Option<f64>,
    /// The rpc error, if the leader refused the write.
    pub error: Option<String>,
}

/// The lab and what was measured on it so far.
pub struct Upgrade {
    lab: LbLab,
    /// The build each node runs now.
    builds: Vec<&'static str>,
    /// Processes of the builds replaced, kept for their logs.
    retired: Vec<Process>,
    pub steps: Vec<Step>,
    pub mixed: Vec<MixedCheck>,
}

/// The `--config` path a node was started with.
fn config_path(p: &Process) -> anyhow::Result<PathBuf> {
    let args = p.args();
    args.iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .with_context(|| format!("{} was started without --config", p.name()))
}

/// What a step starts with: the time, the witnesses, who leads.
struct Begin {
    at: Instant,
    sampler: Sampler,
    leader: u64,
    term: u64,
}

impl Upgrade {
    /// Takes over `lab`, whose nodes all run the old build.
    pub fn new(lab: LbLab) -> Self {
        let builds = vec!["old"; lab.nodes.len()];
        Self {
            lab,
            builds,
            retired: Vec::new(),
            steps: Vec::new(),
            mixed: Vec::new(),
        }
    }

    /// One pass of the procedure: every follower, then a leadership
    /// transfer, then the old leader, each moved to `binary` (`label`),
    /// with a registry write checked at every mixed state.
    pub async fn roll(
        &mut self,
        trial: usize,
        phase: &'static str,
        binary: &Path,
        load: &Load,
    ) -> anyhow::Result<()> {
        let label = if phase == "upgrade" { "new" } else { "old" };
        let (leader, _) = self.leader_term().await?;
        let leader = leader as usize - 1;
        let followers: Vec<usize> = (0..self.lab.nodes.len()).filter(|i| *i != leader).collect();
        for f in followers {
            self.replace((trial, phase, "follower"), f, binary, label, load)
                .await?;
            self.mixed_check(trial).await?;
        }
        self.transfer(trial, phase, leader, load).await?;
        self.mixed_check(trial).await?;
        self.replace((trial, phase, "leader"), leader, binary, label, load)
            .await
    }

    async fn begin(&self) -> anyhow::Result<Begin> {
        let (leader, term) = self.leader_term().await?;
        Ok(Begin {
            at: Instant::now(),
            sampler: Sampler::start(&self.lab),
            leader,
            term,
        })
    }

    /// Closes a step begun with `b` and records it.
    async fn finish(
        &mut self,
        b: Begin,
        (trial, phase, kind, node): (usize, &'static str, &'static str, usize),
        (stop_ms, caught_up_ms): (Option<f64>, Option<f64>),
        load: &Load,
    ) -> anyhow::Result<()> {
        tokio::time::sleep(SETTLE).await;
        let (leader_after, term_after) = self.leader_term().await?;
        let w = b.sampler.finish();
        let end = Instant::now();
        let step = Step {
            trial,
            phase,
            kind,
            node: node + 1,
            builds_after: self.builds.clone(),
            window: load.window(b.at, end),
            ip_addr_sweeps: w.addr_samples,
            arp_windows: w.arp_windows,
            double_holder_samples: w.addr_violations.len() + w.arp_violations.len(),
            stop_ms,
            caught_up_ms,
            leader_before: b.leader,
            leader_after,
            leader_changed: leader_after != b.leader,
            term_before: b.term,
            term_after,
            duration_ms: ms(end - b.at),
        };
        eprintln!(
            "trial {trial} {phase} {kind} h{}: connect gap {:.0} ms, request gap {:.0} ms, failed {}/{} connects, {}/{} requests, caught up {:?} ms, leader {} -> {}, two holders {}",
            step.node,
            step.window.connect_gap_ms,
            step.window.request_gap_ms,
            step.window.failed_connects,
            step.window.connects,
            step.window.failed_requests,
            step.window.requests,
            step.caught_up_ms.map(f64::round),
            step.leader_before,
            step.leader_after,
            step.double_holder_samples
        );
        self.steps.push(step);
        Ok(())
    }

    /// SIGTERM node `i`, start `binary` on its data dir and config, wait
    /// until it is a voter with lag 0.
    async fn replace(
        &mut self,
        (trial, phase, kind): (usize, &'static str, &'static str),
        i: usize,
        binary: &Path,
        label: &'static str,
        load: &Load,
    ) -> anyhow::Result<()> {
        let b = self.begin().await?;
        let config = config_path(&self.lab.nodes[i])?;
        let stop_at = Instant::now();
        self.lab.nodes[i].stop().await?;
        let stop_ms = ms(stop_at.elapsed());
        let name = format!("lb-{}-{label}-t{trial}", i + 1);
        let host = self.lab.lb_hosts()[i].clone();
        let process = host.spawn(lb_process_of(binary, &name, &config))?;
        let spawned = Instant::now();
        self.retired
            .push(std::mem::replace(&mut self.lab.nodes[i], process));
        self.builds[i] = label;
        let caught_up = self.wait_caught_up(i).await;
        let caught_up_ms = caught_up.map(|t| ms(t - spawned));
        self.finish(
            b,
            (trial, phase, kind, i),
            (Some(stop_ms), caught_up_ms),
            load,
        )
        .await?;
        if caught_up.is_none() {
            bail!(
                "node {} on the {label} build was not a voter with lag 0 within {CATCH_UP_LIMIT:?}",
                i + 1
            );
        }
        Ok(())
    }

    /// `TransferLeadership` on leader `leader`, then wait until another
    /// host holds the VIP and answers.
    async fn transfer(
        &mut self,
        trial: usize,
        phase: &'static str,
        leader: usize,
        load: &Load,
    ) -> anyhow::Result<()> {
        let b = self.begin().await?;
        let request = lb::TransferLeadershipRequest { to_node_id: None };
        tokio::time::timeout(
            Duration::from_secs(10),
            self.lab.api(leader).transfer_leadership(request),
        )
        .await
        .context("TransferLeadership did not answer within 10 s")?
        .with_context(|| format!("TransferLeadership on node {}", leader + 1))?;
        self.lab
            .wait_for_holder(Some(leader), Duration::from_secs(15))
            .await;
        self.finish(b, (trial, phase, "transfer", leader), (None, None), load)
            .await
    }

    /// The leader and term as the first node that knows a leader says.
    async fn leader_term(&self) -> anyhow::Result<(u64, u64)> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            for i in 0..self.lab.nodes.len() {
                if let Some(s) = self.lab.status(i).await
                    && let Some(l) = s.leader
                {
                    return Ok((l.id, s.current_term));
                }
            }
            if Instant::now() > deadline {
                bail!("no node knew a leader for 15 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// When node `i` answered its API and the leader listed it as a voter
    /// with lag 0 and a fresh acknowledgement (`bulwarkctl lb members`),
    /// or `None` after [`CATCH_UP_LIMIT`].
    async fn wait_caught_up(&self, i: usize) -> Option<Instant> {
        let deadline = Instant::now() + CATCH_UP_LIMIT;
        while Instant::now() < deadline {
            if self.caught_up(i).await.unwrap_or(false) {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    async fn caught_up(&self, i: usize) -> anyhow::Result<bool> {
        let Some(own) = self.lab.status(i).await else {
            return Ok(false);
        };
        let Some(leader) = own.leader else {
            return Ok(false);
        };
        let members = tokio::time::timeout(
            Duration::from_secs(1),
            self.lab
                .api(leader.id as usize - 1)
                .list_members(lb::ListMembersRequest {}),
        )
        .await??
        .into_inner()
        .members;
        let me = i as u64 + 1;
        Ok(members.iter().any(|m| {
            m.node.as_ref().is_some_and(|n| n.id == me)
                && m.role == lb::MemberRole::Voter as i32
                && m.replication.as_ref().is_some_and(|r| {
                    r.matched_index.is_some()
                        && r.lag_entries == 0
                        && r.last_ack_age
                            .is_some_and(|a| a.seconds == 0 && a.nanos < 500_000_000)
                })
        }))
    }

    /// While the nodes run different builds: add a drained backend through
    /// the leader, wait until every node lists it, remove it, wait until
    /// none does.
    async fn mixed_check(&mut self, trial: usize) -> anyhow::Result<()> {
        if self.builds.iter().all(|b| *b == self.builds[0]) {
            return Ok(());
        }
        let (leader, _) = self.leader_term().await?;
        let l = leader as usize - 1;
        let state = self
            .builds
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let lead = if i == l { " (leader)" } else { "" };
                format!("h{} {b}{lead}", i + 1)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let id = format!("mixed-t{trial}-{}", self.mixed.len() + 1);
        let mut check = MixedCheck {
            trial,
            state,
            leader_build: self.builds[l],
            visible_everywhere: false,
            add_visible_ms: None,
            remove_visible_ms: None,
            error: None,
        };
        let address = SocketAddr::new(self.lab.own_addr(&self.lab.client()), BACKEND_PORT);
        let add = lb::AddBackendRequest {
            id: id.clone(),
            address: address.to_string(),
            zone: String::new(),
            weight: None,
            drained: true,
        };
        match self.lab.api(l).add_backend(add).await {
            Err(e) => check.error = Some(format!("AddBackend: {e}")),
            Ok(_) => {
                let t = Instant::now();
                check.add_visible_ms = self.visible(&id, true).await.then(|| ms(t.elapsed()));
                let remove = lb::RemoveBackendRequest { id: id.clone() };
                match self.lab.api(l).remove_backend(remove).await {
                    Err(e) => check.error = Some(format!("RemoveBackend: {e}")),
                    Ok(_) => {
                        let t = Instant::now();
                        check.remove_visible_ms =
                            self.visible(&id, false).await.then(|| ms(t.elapsed()));
                    }
                }
            }
        }
        check.visible_everywhere =
            check.add_visible_ms.is_some() && check.remove_visible_ms.is_some();
        eprintln!(
            "trial {trial} mixed [{}]: write through the {} leader visible everywhere: {} (add {:?} ms, remove {:?} ms){}",
            check.state,
            check.leader_build,
            check.visible_everywhere,
            check.add_visible_ms.map(f64::round),
            check.remove_visible_ms.map(f64::round),
            check.error.as_deref().unwrap_or_default()
        );
        self.mixed.push(check);
        Ok(())
    }

    /// Whether every node lists backend `id` (`present`) or none does,
    /// within [`VISIBLE_LIMIT`].
    async fn visible(&self, id: &str, present: bool) -> bool {
        let deadline = Instant::now() + VISIBLE_LIMIT;
        while Instant::now() < deadline {
            let mut all = true;
            for i in 0..self.lab.nodes.len() {
                let listed = tokio::time::timeout(
                    Duration::from_secs(1),
                    self.lab
                        .api(i)
                        .list_backends(lb::ListBackendsRequest::default()),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .map(|r| r.into_inner().backends.iter().any(|b| b.id == id));
                all = all && listed == Some(present);
            }
            if all {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Every ERROR line any node (of either build) logged, prefixed with
    /// the process name.
    pub fn error_lines(&self) -> Vec<String> {
        self.retired
            .iter()
            .chain(&self.lab.nodes)
            .flat_map(|p| {
                p.log()
                    .lines()
                    .filter(|l| l.contains(" ERROR ") || l.contains("\"level\":\"ERROR\""))
                    .map(|l| format!("{}: {l}", p.name()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Where every node's log is and how it ended, for a failed run.
    pub fn print_logs(&self) {
        for p in self.retired.iter().chain(&self.lab.nodes) {
            let log = p.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("----- {} ({}):", p.name(), p.log_path().display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Every step, one row each.
pub fn step_table(s: &mut String, steps: &[Step]) {
    let _ = writeln!(
        s,
        "| trial | phase | step | node | builds after | connect gap | request gap | failed connects | failed requests | SIGTERM -> exit | caught up | leader | term | two holders |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for x in steps {
        let _ = writeln!(
            s,
            "| {} | {} | {} | h{} | {} | {:.0} ms | {:.0} ms | {}/{} | {}/{} | {} | {} | {} -> {} | {} -> {} | {} |",
            x.trial,
            x.phase,
            x.kind,
            x.node,
            x.builds_after.join(" "),
            x.window.connect_gap_ms,
            x.window.request_gap_ms,
            x.window.failed_connects,
            x.window.connects,
            x.window.failed_requests,
            x.window.requests,
            ms_cell(x.stop_ms),
            ms_cell(x.caught_up_ms),
            x.leader_before,
            x.leader_after,
            x.term_before,
            x.term_after,
            x.double_holder_samples
        );
    }
}

/// Every mixed-version registry write, one row each.
pub fn mixed_table(s: &mut String, checks: &[MixedCheck]) {
    let _ = writeln!(
        s,
        "\nRegistry writes while mixed (add a drained backend through the leader, then remove it; visible = listed by / gone from every node's `ListBackends`):\n\n| trial | nodes | leader build | visible everywhere | add visible | remove visible | error |\n|---|---|---|---|---|---|---|"
    );
    for c in checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            c.trial,
            c.state,
            c.leader_build,
            if c.visible_everywhere { "yes" } else { "NO" },
            ms_cell(c.add_visible_ms),
            ms_cell(c.remove_visible_ms),
            c.error.as_deref().unwrap_or("-")
        );
    }
}
