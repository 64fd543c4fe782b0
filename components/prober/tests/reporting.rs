//! The report stream against a scripted `ProbeReports` double (see
//! `support`): leader finding, resync, dropped streams, sequences,
//! coalescing under a stalled stream, and `run` end to end with the admin
//! server.

// Helpers outside #[test] functions panic on purpose too: a failed setup
// is a failed test (and prints the harness's process logs).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bulwark_api::lb::v1::{Observation, ProbeKind, ProbeReason, ReportKind};
use bulwark_common::shutdown::Shutdown;
use bulwark_prober::config::{ProberConfig, ReportConfig, TcpTarget};
use bulwark_prober::observations::Observations;
use bulwark_prober::report::{self, Reporter};
use bulwark_testkit::admin::http_get;
use bulwark_testkit::ports::ClosedPort;
use bulwark_testkit::{Pki, config};
use support::{LbDouble, Mode, eventually, next_report, prober_identity};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

fn obs(target: &str, kind: ProbeKind, ok: bool) -> Observation {
    Observation {
        target_id: target.into(),
        target_address: "127.0.0.1:6443".into(),
        kind: kind as i32,
        ok,
        reason: if ok {
            ProbeReason::Ok
        } else {
            ProbeReason::ConnectionRefused
        } as i32,
        ..Default::default()
    }
}

fn report_config(pki: &Pki, endpoints: Vec<String>) -> ReportConfig {
    ReportConfig {
        endpoints,
        tls: prober_identity(pki, "prober-1"),
        server_name: None,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    }
}

fn kind(r: &bulwark_api::lb::v1::ProbeReport) -> ReportKind {
    ReportKind::try_from(r.kind).unwrap()
}

#[tokio::test]
async fn follows_the_leader_resyncs_and_keeps_sequences_across_streams() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (la, lb) = (LbDouble::bind().await, LbDouble::bind().await);
    let b_addr = lb.local_addr().unwrap().to_string();
    let hint_b = bulwark_api::lb::v1::LeaderHint {
        node_id: 2,
        address: b_addr.clone(),
    };
    // A is a follower that hints at B on its acks; B leads.
    let a = LbDouble::serve("a", la, &pki, Mode::FollowerAck(hint_b), tx.clone());
    let b = LbDouble::serve(
        "b",
        lb,
        &pki,
        Mode::Leader {
            heartbeat: Some(Duration::from_millis(200)),
        },
        tx.clone(),
    );

    let table = Observations::new();
    table.update(obs("cp-1", ProbeKind::Readyz, true));
    table.update(obs("cp-1", ProbeKind::Livez, true));
    let identity = report::identity("node-1", "zone-a");
    let reporter = Reporter::new(
        identity.clone(),
        &report_config(&pki, vec![a.address().to_owned()]),
        table.clone(),
    )
    .unwrap();
    let mut leader = reporter.leader();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(reporter.run(cancel.clone()));

    let mut all = Vec::new();
    // A gets the opening FULL and points at B, which gets a FULL too.
    let (from, r) = next_report(&mut rx, WAIT).await;
    assert_eq!((from, kind(&r)), ("a", ReportKind::Full));
    assert_eq!(r.prober.as_ref(), Some(&identity));
    assert_eq!(r.observations.len(), 2);
    all.push(r);
    let (from, r) = next_report(&mut rx, WAIT).await;
    assert_eq!((from, kind(&r)), ("b", ReportKind::Full));
    assert_eq!(r.observations.len(), 2);
    all.push(r);
    leader
        .wait_for(|l| l.as_deref() == Some(&b_addr))
        .await
        .unwrap();

    // A change: CHANGES with that observation only.
    table.update(obs("cp-1", ProbeKind::Readyz, false));
    let (from, r) = next_report(&mut rx, WAIT).await;
    assert_eq!((from, kind(&r)), ("b", ReportKind::Changes));
    assert_eq!(r.observations, vec![obs("cp-1", ProbeKind::Readyz, false)]);
    all.push(r);

    // Idle: heartbeats at the interval B asked for.
    let (from, r) = next_report(&mut rx, WAIT).await;
    assert_eq!((from, kind(&r)), ("b", ReportKind::Heartbeat));
    assert!(r.observations.is_empty());
    all.push(r);

    // B lost state: its next ack asks for a resync, answered with FULL.
    b.resync_next();
    let r = loop {
        let (_, r) = next_report(&mut rx, WAIT).await;
        let k = kind(&r);
        all.push(r.clone());
        if k == ReportKind::Full {
            break r;
        }
    };
    assert_eq!(r.observations.len(), 2);

    // B drops the stream: the prober comes back (through A's hint) with a
    // FULL on the new stream.
    b.drop_streams();
    let r = loop {
        let (from, r) = next_report(&mut rx, WAIT).await;
        all.push(r.clone());
        if from == "b" && kind(&r) == ReportKind::Full {
            break r;
        }
    };
    assert_eq!(r.observations.len(), 2);

    // Leadership moves to A; B now refuses with a status hint.
    a.set_mode(Mode::Leader { heartbeat: None });
    b.set_mode(Mode::FollowerStatus(a.hint(1)));
    b.drop_streams();
    loop {
        let (from, r) = next_report(&mut rx, WAIT).await;
        all.push(r.clone());
        if from == "a" && kind(&r) == ReportKind::Full {
            break;
        }
    }
    let a_addr = a.address().to_owned();
    leader
        .wait_for(|l| l.as_deref() == Some(&a_addr))
        .await
        .unwrap();

    // One instance, one sequence: +1 per report, across every stream and
    // server.
    let seqs: Vec<u64> = all.iter().map(|r| r.sequence).collect();
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "sequences {seqs:?}");
    }
    assert!(all.iter().all(|r| r.prober.as_ref() == Some(&identity)));

    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn no_leader_backs_off_and_tries_the_next_endpoint() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = LbDouble::serve(
        "a",
        LbDouble::bind().await,
        &pki,
        Mode::NoLeader,
        tx.clone(),
    );
    // An endpoint where nothing listens, then a leader.
    let closed = ClosedPort::loopback().unwrap();
    let dead = closed.address().to_string();
    let c = LbDouble::serve(
        "c",
        LbDouble::bind().await,
        &pki,
        Mode::Leader { heartbeat: None },
        tx,
    );
    let table = Observations::new();
    table.update(obs("cp-1", ProbeKind::Tcp, true));
    let reporter = Reporter::new(
        report::identity("node-1", ""),
        &report_config(
            &pki,
            vec![a.address().to_owned(), dead, c.address().to_owned()],
        ),
        table,
    )
    .unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(reporter.run(cancel.clone()));
    let (from, r) = next_report(&mut rx, WAIT).await;
    assert_eq!((from, kind(&r)), ("c", ReportKind::Full));
    // Reports built for the refused attempts were never delivered; the LB
    // only needs sequence numbers to grow, not to be dense.
    assert!(r.sequence >= 1);
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_stalled_stream_never_blocks_probing_and_only_the_latest_state_is_sent() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let b = LbDouble::serve(
        "b",
        LbDouble::bind().await,
        &pki,
        Mode::Leader { heartbeat: None },
        tx,
    );
    let table = Observations::new();
    table.update(obs("cp-1", ProbeKind::Readyz, true));
    let reporter = Reporter::new(
        report::identity("node-1", ""),
        &report_config(&pki, vec![b.address().to_owned()]),
        table.clone(),
    )
    .unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(reporter.run(cancel.clone()));
    let (_, full) = next_report(&mut rx, WAIT).await;
    assert_eq!(kind(&full), ReportKind::Full);

    // The LB stops reading. Checks keep writing: each update returns at
    // once whatever the stream does.
    b.pause(true);
    let flips = 2000;
    for i in 0..flips {
        table.update(obs("cp-1", ProbeKind::Readyz, i % 2 == 1));
        table.update(obs(&format!("t{}", i % 10), ProbeKind::Tcp, i % 3 == 0));
        tokio::task::yield_now().await;
    }
    let last_readyz = obs("cp-1", ProbeKind::Readyz, (flips - 1) % 2 == 1);
    b.pause(false);

    // Whatever was queued arrives, and the stream converges on the table:
    // the last report's view of every check is the table's.
    // What the LB knows: the FULL, patched by every report since.
    let mut seen: std::collections::BTreeMap<_, _> = full
        .observations
        .into_iter()
        .map(|o| ((o.target_id.clone(), o.kind), o))
        .collect();
    let mut reports = 0;
    let final_table = table.snapshot();
    loop {
        let (_, r) = next_report(&mut rx, WAIT).await;
        reports += 1;
        for o in r.observations {
            seen.insert((o.target_id.clone(), o.kind), o);
        }
        let converged = final_table
            .iter()
            .all(|o| seen.get(&(o.target_id.clone(), o.kind)) == Some(o));
        if converged {
            break;
        }
    }
    assert_eq!(
        seen.get(&("cp-1".to_owned(), ProbeKind::Readyz as i32)),
        Some(&last_readyz)
    );
    // Coalesced: far fewer reports than the 4000 updates.
    assert!(reports < 2 * flips, "{reports} reports for {flips} flips");
    println!(
        "{} updates while stalled arrived as {reports} reports",
        2 * flips
    );
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn run_is_ready_while_a_leader_acknowledges_and_stops_on_cancel() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let lb = LbDouble::serve(
        "lb",
        LbDouble::bind().await,
        &pki,
        Mode::Leader { heartbeat: None },
        tx,
    );
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let identity = prober_identity(&pki, "prober-1");
    let mut c = config::prober();
    c.node_name = "node-1".into();
    c.zone = "zone-a".into();
    c.tcp = vec![TcpTarget {
        id: "cp-1".into(),
        address: target.local_addr().unwrap().to_string(),
        zone: "zone-a".into(),
    }];
    c.report.endpoints = vec![lb.address().to_string()];
    c.report.tls = identity;
    c.report.initial_backoff = Duration::from_millis(20);
    c.report.max_backoff = Duration::from_millis(200);
    let config: ProberConfig = config::validated(&c).unwrap();
    let shutdown = Shutdown::new();
    let listeners = bulwark_prober::Listeners { admin: Some(admin) };
    bulwark_prober::run(config, listeners, &shutdown)
        .await
        .unwrap();

    // The TCP check settles up and reaches the leader.
    let r = loop {
        let (_, r) = next_report(&mut rx, WAIT).await;
        if r.observations.iter().any(|o| o.target_id == "cp-1" && o.ok) {
            break r;
        }
    };
    assert_eq!(r.prober.unwrap().zone, "zone-a");
    eventually(WAIT, "/readyz to pass", || async {
        (http_get(admin_addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let (_, metrics) = http_get(admin_addr, "/metrics").await;
    for needle in [
        "bulwark_prober_reports_sent_total{kind=\"full\"}",
        "bulwark_prober_probes_total{target=\"cp-1\",kind=\"tcp\",reason=\"ok\"}",
        "bulwark_prober_check_up{target=\"cp-1\",kind=\"tcp\"} 1",
        "bulwark_prober_report_connected",
        "bulwark_prober_probe_duration_seconds",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }

    // The leader goes away: not ready any more, probing goes on.
    drop(lb);
    let (code, body) = eventually(WAIT, "/readyz to fail", || async {
        let (code, body) = http_get(admin_addr, "/readyz").await;
        (code == 503).then_some((code, body))
    })
    .await;
    assert_eq!(code, 503);
    assert!(body.contains("[-]lb-leader failed"), "{body}");

    shutdown.trigger();
    let code = tokio::time::timeout(WAIT, shutdown.wait(WAIT))
        .await
        .expect("run did not stop");
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    drop(target);
}

/// A listener whose connections are accepted and never answered: an LB
/// node whose host hangs. Its address and the task holding them.
async fn hung_listener() -> (String, tokio::task::JoinHandle<()>) {
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = hung.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = hung.accept().await {
            held.push(conn);
        }
    });
    (address, held)
}

#[tokio::test]
async fn a_hung_endpoint_is_overtaken_and_a_silent_leader_left_after_the_ack_wait() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (hung, held) = hung_listener().await;
    let heartbeat = Duration::from_secs(2);
    let b = LbDouble::serve(
        "b",
        LbDouble::bind().await,
        &pki,
        Mode::Leader {
            heartbeat: Some(heartbeat),
        },
        tx,
    );
    let table = Observations::new();
    table.update(obs("cp-1", ProbeKind::Readyz, true));
    let reporter = Reporter::new(
        report::identity("node-1", ""),
        &report_config(&pki, vec![hung, b.address().to_owned()]),
        table.clone(),
    )
    .unwrap();
    let mut leader = reporter.leader();
    let cancel = CancellationToken::new();
    let started = tokio::time::Instant::now();
    let task = tokio::spawn(reporter.run(cancel.clone()));

    // The first endpoint never answers; the second is dialled 300 ms
    // later and wins, long before the first's 3 s connect timeout.
    let (from, r) = next_report(&mut rx, WAIT).await;
    assert_eq!((from, kind(&r)), ("b", ReportKind::Full));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited for the hung endpoint: {:?}",
        started.elapsed()
    );
    leader.wait_for(Option::is_some).await.unwrap();

    // The leader goes silent (its host went dark): a check changes, its
    // report is not acknowledged, and the stream ends after one heartbeat
    // (2 s), not after three heartbeats of silence (6 s from the last ack).
    // (The double still reads the one report it already waits for.)
    b.pause(true);
    table.update(obs("cp-1", ProbeKind::Readyz, false));
    let (_, r) = next_report(&mut rx, WAIT).await;
    assert_eq!(kind(&r), ReportKind::Changes);
    let changed = tokio::time::Instant::now();
    table.update(obs("cp-1", ProbeKind::Livez, false));
    tokio::time::timeout(WAIT, leader.wait_for(Option::is_none))
        .await
        .unwrap()
        .unwrap();
    let waited = changed.elapsed();
    assert!(
        waited < Duration::from_secs(4),
        "left the silent leader after {waited:?}"
    );

    // Back: the prober finds it again and starts over with a FULL.
    b.pause(false);
    let full = loop {
        let (from, r) = next_report(&mut rx, WAIT).await;
        if from == "b" && kind(&r) == ReportKind::Full && r.sequence > 2 {
            break r;
        }
    };
    assert_eq!(full.observations.len(), 2, "{full:?}");
    assert!(full.observations.iter().all(|o| !o.ok), "{full:?}");
    cancel.cancel();
    task.await.unwrap();
    held.abort();
}
