//! `bulwark-demo`: the whole of bulwark on loopback in one command (`cargo
//! xtask demo`), narrated for someone seeing it for the first time.
//!
//! It starts a 3-member etcd, three stand-in apiservers in zones a/b/c,
//! three bulwark-lb nodes sharing a bind-mode VIP on 127.0.10.1, a
//! bulwark-prober per zone and a bulwark-backup per node, then shows what
//! the product does: `bulwarkctl status`, traffic through the VIP, the LB
//! leader killed and the measured failover, an apiserver killed and taken
//! out with no failed request, a backup, more writes, and a restore of the
//! whole etcd cluster to the backup point with the data checked. Everything
//! stays on 127.0.0.0/8, needs no root, and is torn down at the end (or
//! left running with `--keep`).

mod cluster;
mod ctl;
mod prometheus;
mod traffic;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

/// The whole of bulwark on loopback, narrated.
#[derive(Parser)]
#[command(name = "bulwark-demo")]
struct Args {
    /// Leave everything running at the end, print how to explore it with
    /// bulwarkctl, and tear down on Ctrl-C.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulwark-demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo::run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nbulwark-demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Narration helpers: numbered steps, checks, and durations in ms.
mod say {
    use std::time::Duration;

    pub fn step(n: usize, of: usize, what: &str) {
        println!("\n[{n}/{of}] {what}");
    }

    pub fn ok(what: impl AsRef<str>) {
        println!("  ✓ {}", what.as_ref());
    }

    /// A result that is not what it should be, shown as such.
    pub fn short(what: impl AsRef<str>) {
        println!("  ! {}", what.as_ref());
    }

    pub fn note(what: impl AsRef<str>) {
        println!("    {}", what.as_ref());
    }

    pub fn ms(d: Duration) -> String {
        format!("{} ms", d.as_millis())
    }
}

mod demo {
    use super::*;
    use crate::cluster::ControlPlane;
    use crate::ctl::Ctl;
    use crate::say;
    use crate::traffic::{self, Tally, Traffic, longest_gap};
    use anyhow::{Context as _, bail};
    use bulwark_testkit::fixture::HttpsClient;

    const STEPS: usize = 7;

    pub async fn run(args: &Args) -> anyhow::Result<()> {
        println!("bulwark demo: the whole kit on loopback (no root; nothing leaves 127.0.0.0/8)");
        let (mut cp, ctl, holder) = start_control_plane().await?;

        say::step(2, STEPS, "The control plane at a glance");
        ctl.show(&["status"]).await?;
        let prometheus = scrape_everything(&cp).await?;

        let traffic = traffic_through_the_vip(&cp).await?;
        kill_the_lb_leader(&mut cp, &ctl, &traffic, holder).await?;
        kill_an_apiserver(&mut cp, &ctl, &traffic).await?;
        drop(traffic);
        backup_and_restore(&cp, &ctl).await?;

        if args.keep {
            if let Some(p) = &prometheus {
                println!("\nPrometheus (the shipped rules loaded): {}", p.url);
            }
            keep(&cp).await?;
        }
        say::step(STEPS, STEPS, "Tearing down");
        drop(cp);
        say::ok("every process stopped and its directory removed");
        Ok(())
    }

    /// Step 1: etcd, apiservers, LBs, backups and probers, each waited for;
    /// returns the control plane, the CLI and the VIP holder's index.
    async fn start_control_plane() -> anyhow::Result<(ControlPlane, Ctl, usize)> {
        say::step(
            1,
            STEPS,
            "Starting a control plane: etcd, apiservers, bulwark",
        );
        let mut cp = ControlPlane::new()?;
        let t0 = Instant::now();
        cp.start_etcd().await?;
        say::ok(format!(
            "etcd: 3 members ({}), each run by a kubelet stand-in from its static pod manifest",
            cp.etcd
                .iter()
                .map(|e| e.client_url.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        cp.start_apiservers().await?;
        for (server, zone) in cp.apiservers.iter().zip(cluster::ZONES) {
            say::ok(format!(
                "apiserver-{zone}: a kube-apiserver stand-in (HTTPS, /readyz, /livez, watches) on {}",
                server.addr()
            ));
        }
        cp.start_lbs().await?;
        cp.start_backups().await?;
        let backup_endpoints: Vec<_> = cp.backups.iter().map(|b| b.grpc).collect();
        cp.write_ctl_config(&backup_endpoints)?;
        let ctl = Ctl::new(&cp.ctl_config)?;
        let holder = wait_for_holder(&cp, &ctl, None).await?;
        say::ok(format!(
            "bulwark-lb: {} elected {} by Raft; it holds the VIP {} ({} after start)",
            cp.lbs
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            cp.lbs[holder].name,
            cp.vip,
            say::ms(t0.elapsed())
        ));
        cp.start_probers().await?;
        let verdicts = wait_for_verdicts(&ctl, |v| v.values().all(|v| v == "up")).await?;
        say::ok(format!(
            "bulwark-prober: one per zone (a, b, c) probing /readyz and /livez of every apiserver; \
             the LB leader commits their agreed verdicts: {verdicts:?}"
        ));

        let first = wait_for_first_backup(&ctl).await?;
        say::ok(format!(
            "bulwark-backup: one per node; the elected one took snapshot {first} into {} \
             and now records every change as deltas",
            cp.dir.join("backups").display()
        ));

        Ok((cp, ctl, holder))
    }

    /// Step 3: clients through the VIP, a new TLS connection per request;
    /// fails unless some succeed.
    async fn traffic_through_the_vip(cp: &ControlPlane) -> anyhow::Result<Traffic> {
        say::step(3, STEPS, "Traffic through the VIP");
        let client = HttpsClient::new(cp.pki.ca_pem())?.timeout(Duration::from_secs(2));
        let traffic = Traffic::start(client, cp.vip, 8, Duration::from_millis(20));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let warmup = traffic.since(traffic.started());
        let tally = Tally::of(&warmup);
        let mut spread: std::collections::BTreeMap<String, usize> = Default::default();
        for o in warmup.iter().filter(|o| o.ok) {
            *spread
                .entry(o.backend.clone().unwrap_or_default())
                .or_default() += 1;
        }
        say::ok(format!(
            "8 clients, a new TLS connection per request: {} ok, {} failed in 3 s",
            tally.ok, tally.failed
        ));
        say::note(format!(
            "answered by: {spread:?} (the VIP balances over the apiservers of every zone)"
        ));
        for (error, n) in traffic::error_kinds(&warmup) {
            say::note(format!("  {n} × {error}"));
        }
        if tally.ok == 0 {
            bail!("no request through the VIP succeeded");
        }
        if tally.failed > 0 {
            say::note(
                "failures before any fault mean this machine is too busy for the default \
                 timers (a leader that cannot reach a quorum in time gives the VIP up rather \
                 than risk two holders): see docs/FAILOVER.md on tuning",
            );
        }

        Ok(traffic)
    }

    /// Step 4: SIGKILL of the VIP holder under traffic; the gap clients saw.
    async fn kill_the_lb_leader(
        cp: &mut ControlPlane,
        ctl: &Ctl,
        traffic: &Traffic,
        holder: usize,
    ) -> anyhow::Result<()> {
        say::step(4, STEPS, "Killing the LB leader (SIGKILL) under traffic");
        let old = holder;
        let killed_at = Instant::now();
        cp.lbs[old].process.kill()?;
        say::note(format!("killed {} (it held the VIP)", cp.lbs[old].name));
        let recovered = traffic
            .first_success_after(killed_at, Duration::from_secs(30))
            .await
            .context("no request succeeded within 30 s of the kill")?;
        let new = wait_for_holder(cp, ctl, Some(old)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let window = traffic.since(killed_at - Duration::from_secs(1));
        let gap = longest_gap(&window, killed_at - Duration::from_secs(1));
        let during = Tally::of(&traffic.since(killed_at));
        say::ok(format!(
            "{} took over; clients were served again {} after the kill (longest gap between successes {})",
            cp.lbs[new].name,
            say::ms(recovered - killed_at),
            say::ms(gap),
        ));
        say::note(format!(
            "requests since the kill: {} ok, {} failed (connections open to the dead node, and connects while no one held the VIP)",
            during.ok, during.failed
        ));
        for (error, n) in traffic::error_kinds(&traffic.since(killed_at)) {
            say::note(format!("  {n} × {error}"));
        }
        ctl.show(&["lb", "status"]).await?;
        cp.lbs[old].process.start()?;
        say::ok(format!(
            "{} restarted: it rejoins as a follower",
            cp.lbs[old].name
        ));

        Ok(())
    }

    /// Step 5: SIGKILL of an apiserver under traffic; the probers' verdict
    /// and the requests that failed.
    async fn kill_an_apiserver(
        cp: &mut ControlPlane,
        ctl: &Ctl,
        traffic: &Traffic,
    ) -> anyhow::Result<()> {
        say::step(5, STEPS, "Killing an apiserver (SIGKILL) under traffic");
        let victim = 1;
        let victim_id = format!("apiserver-{}", cluster::ZONES[victim]);
        let killed_at = Instant::now();
        cp.apiservers[victim].kill()?;
        say::note(format!("killed {victim_id}"));
        wait_for_verdicts(ctl, |v| v.get(&victim_id).is_some_and(|v| v == "down")).await?;
        say::ok(format!(
            "probers in a quorum of zones agreed: {victim_id} is down, {} after the kill; \
             the LB stopped sending it connections",
            say::ms(killed_at.elapsed())
        ));
        ctl.show(&["health", "--backend", &victim_id]).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let since = traffic.since(killed_at);
        let (in_flight, after): (Vec<_>, Vec<_>) =
            since.into_iter().partition(|o| o.started < killed_at);
        let in_flight = Tally::of(&in_flight);
        let after_outcomes = after;
        let after = Tally::of(&after_outcomes);
        let line = format!(
            "requests sent after the kill: {} ok, {} failed (a refused connect is retried on another apiserver inside the LB)",
            after.ok, after.failed
        );
        if after.failed == 0 {
            say::ok(line);
        } else {
            say::short(line);
        }
        for (error, n) in traffic::error_kinds(&after_outcomes) {
            say::note(format!("  {n} × {error}"));
        }
        say::note(format!(
            "requests already in flight on the killed apiserver: {} (a TCP front cannot save a connection whose server died)",
            in_flight.failed
        ));
        cp.apiservers[victim].restart().await?;
        let back_at = Instant::now();
        wait_for_verdicts(ctl, |v| v.get(&victim_id).is_some_and(|v| v == "up")).await?;
        say::ok(format!(
            "{victim_id} restarted: verdict up again {} later, and it takes traffic",
            say::ms(back_at.elapsed())
        ));

        Ok(())
    }

    /// Step 6: a backup, writes after it, and a whole-cluster restore that
    /// must land exactly on the backup point with the old data dirs kept.
    async fn backup_and_restore(cp: &ControlPlane, ctl: &Ctl) -> anyhow::Result<()> {
        say::step(
            6,
            STEPS,
            "A backup, more writes, and a whole-cluster restore to the backup point",
        );
        let mut etcd = cp.etcd_client().await?;
        for i in 0..100 {
            etcd.put(
                format!("demo/before/{i:03}"),
                format!("written before the backup #{i}"),
                None,
            )
            .await?;
        }
        say::ok("wrote 100 keys demo/before/… to etcd");
        println!("  $ {}", ctl.shown(&["backup", "create", "--note", "demo"]));
        let snapshot = ctl.json(&["backup", "create", "--note", "demo"]).await?;
        let id = snapshot["id"]
            .as_str()
            .context("backup create: no id")?
            .to_owned();
        say::ok(format!(
            "snapshot {id}: etcd revision {}, {} bytes raw, {} stored (zstd), etcd's SHA-256 checked while streaming",
            snapshot["revision"], snapshot["raw_bytes"], snapshot["stored_bytes"]
        ));
        for i in 0..100 {
            etcd.put(
                format!("demo/after/{i:03}"),
                format!("written after the backup #{i}"),
                None,
            )
            .await?;
        }
        say::ok("wrote 100 more keys demo/after/… (they are not in the backup)");
        let restore = [
            "restore",
            "--snapshot",
            id.as_str(),
            "--snapshot-only",
            "--yes",
        ];
        let started = Instant::now();
        ctl.show(&restore).await?;
        say::ok(format!(
            "every member restored from the same snapshot and restarted by its kubelet in {}",
            say::ms(started.elapsed())
        ));
        let (before, after) = count_demo_keys(cp).await?;
        say::ok(format!(
            "after the restore: {before}/100 keys demo/before/…, {after}/100 keys demo/after/…: \
             the cluster is exactly at the backup point"
        ));
        if before != 100 || after != 0 {
            bail!(
                "the restored cluster is not at the backup point ({before} before, {after} after)"
            );
        }
        for e in &cp.etcd {
            let kept = std::fs::read_dir(e.data_dir.parent().context("data dir parent")?)?
                .flatten()
                .filter(|d| {
                    d.file_name()
                        .to_string_lossy()
                        .starts_with("etcd-data.bulwark-")
                })
                .count();
            say::note(format!(
                "{}: the old data dir is kept beside the new one ({kept} kept), never deleted",
                e.name
            ));
        }
        ctl.show(&["status"]).await?;

        Ok(())
    }

    /// A real Prometheus scrapes all nine daemons with the shipped rules;
    /// fails the demo unless every target is up, every rule evaluates and
    /// each daemon reports its build. `None` without a `prometheus` binary.
    async fn scrape_everything(
        cp: &ControlPlane,
    ) -> anyhow::Result<Option<crate::prometheus::Prometheus>> {
        let Some(p) = crate::prometheus::Prometheus::start(cp.dir.path(), &cp.scrape).await? else {
            return Ok(None);
        };
        let seen = p.first_round(cp.scrape.len()).await?;
        let built: u64 = seen.build_info.iter().map(|(_, n)| n).sum();
        if seen.targets != cp.scrape.len()
            || seen.up != seen.targets
            || seen.rules_ok != seen.rules
            || built != seen.targets as u64
        {
            bail!(
                "Prometheus at {}: {}/{} targets up, {}/{} rules evaluate, build_info by job {:?}",
                p.url,
                seen.up,
                seen.targets,
                seen.rules_ok,
                seen.rules,
                seen.build_info
            );
        }
        say::ok(format!(
            "Prometheus scrapes all {} daemons' /metrics ({}/{} targets up) and evaluates the \
             {} shipped rules without an error",
            seen.targets, seen.up, seen.targets, seen.rules
        ));
        say::note(match seen.alerts.is_empty() {
            true => "alerts pending or firing: none".to_owned(),
            false => format!("alerts pending or firing: {}", seen.alerts.join(", ")),
        });
        Ok(Some(p))
    }

    /// Waits until one LB node holds the VIP (other than `not`); returns
    /// its index.
    async fn wait_for_holder(
        cp: &ControlPlane,
        ctl: &Ctl,
        not: Option<usize>,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = ctl.json(&["lb", "status"]).await;
            if let Ok(status) = &status
                && let Some(id) = status["vip_holder"].as_u64()
                && let Some(i) = cp.lbs.iter().position(|l| l.id == id)
                && Some(i) != not
                && cp.lbs[i].process.is_running()
                && tokio::net::TcpStream::connect(cp.vip).await.is_ok()
            {
                return Ok(i);
            }
            if Instant::now() > deadline {
                match status {
                    Err(e) => bail!("no LB node holds the VIP after 60 s: {e:#}"),
                    Ok(s) => bail!("no LB node holds the VIP after 60 s; last status: {s}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the committed verdicts (backend id → verdict, from
    /// `bulwarkctl health`) satisfy `done`; returns them.
    async fn wait_for_verdicts(
        ctl: &Ctl,
        done: impl Fn(&std::collections::BTreeMap<String, String>) -> bool,
    ) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let health = ctl.json(&["health"]).await;
            let verdicts: std::collections::BTreeMap<String, String> = health
                .as_ref()
                .ok()
                .and_then(|h| h["backends"].as_array())
                .map(|bs| {
                    bs.iter()
                        .map(|b| {
                            (
                                b["id"].as_str().unwrap_or_default().to_owned(),
                                b["verdict"].as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            if !verdicts.is_empty() && done(&verdicts) {
                return Ok(verdicts);
            }
            if Instant::now() > deadline {
                match health {
                    Err(e) => bail!("health verdicts not as expected after 60 s: {e:#}"),
                    Ok(_) => bail!("health verdicts not as expected after 60 s: {verdicts:?}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the elected backup service's first scheduled snapshot;
    /// returns its id.
    async fn wait_for_first_backup(ctl: &Ctl) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let list = ctl.json(&["backup", "list"]).await;
            if let Ok(list) = &list
                && let Some(id) = list
                    .as_array()
                    .and_then(|l| l.first())
                    .and_then(|s| s["id"].as_str())
            {
                return Ok(id.to_owned());
            }
            if Instant::now() > deadline {
                bail!("no scheduled snapshot after 90 s: {list:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// How many `demo/before/` and `demo/after/` keys the restored etcd
    /// has (retrying while the members come back).
    async fn count_demo_keys(cp: &ControlPlane) -> anyhow::Result<(usize, usize)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let counted = async {
                let mut etcd = cp.etcd_client().await?;
                let opts = || {
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_count_only()
                };
                let before = etcd.get("demo/before/", Some(opts())).await?.count() as usize;
                let after = etcd.get("demo/after/", Some(opts())).await?.count() as usize;
                anyhow::Ok((before, after))
            }
            .await;
            match counted {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("reading the restored etcd"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// `--keep`: show how to explore, wait for Ctrl-C.
    async fn keep(cp: &ControlPlane) -> anyhow::Result<()> {
        println!("\nEverything is still running. Explore it with bulwarkctl:");
        let bin = bulwark_testkit::tools::bin_path("bulwarkctl")?;
        println!("  export BULWARKCTL_CONFIG={}", cp.ctl_config.display());
        println!("  alias bulwarkctl={}", bin.display());
        println!(
            "  bulwarkctl status; bulwarkctl health; bulwarkctl lb members; bulwarkctl backup list"
        );
        println!(
            "  curl --cacert {} https://{}/version",
            cp.pki.ca_path().display(),
            cp.vip
        );
        println!("Press Ctrl-C to tear everything down.");
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}
