//! The prober's lifecycle, in process: its workers (every check and the
//! reporter) are listed by `/debug/workers` with their state, last success
//! and last error, and a check that panics stops the prober with a log
//! line naming it (the panic is injected through bulwark-common's
//! `faults` feature, which only test builds enable).

#![allow(clippy::unwrap_used)]

mod support;

use std::process::ExitCode;
use std::time::Duration;

use bulwark_common::config::Overrides;
use bulwark_common::shutdown::{EXIT_TASK_FAILED, Shutdown};
use bulwark_common::workers::TaskState;
use bulwark_prober::{Listeners, ProberConfig};
use bulwark_testkit::Pki;
use bulwark_testkit::admin::{CapturedLogs, http_get, worker};
use serde_json::{Value, json};
use support::{eventually, prober_identity};

const WAIT: Duration = Duration::from_secs(15);

/// A prober with one TCP check on `target` and, when `report` is set, a
/// reporter towards an address where no LB listens.
fn config(target: &str, report: Option<(&Pki, &str)>) -> ProberConfig {
    let mut o = Overrides::new();
    o.set("nodeName", "cp-1")
        .set("zone", "zone-a")
        .set(
            "tcp",
            json!([{ "id": "cp-1", "address": target, "zone": "zone-a" }]),
        )
        .set("probing.interval", "100ms")
        .set("probing.fastInterval", "50ms");
    if let Some((pki, lb)) = report {
        o.set("report.endpoints", [lb])
            .set("report.tls", prober_identity(pki, "prober-1"))
            .set("report.initialBackoff", "20ms")
            .set("report.maxBackoff", "200ms");
    }
    bulwark_common::config::from_str_with(None, None, &o).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_workers_lists_the_checks_and_the_reporter() {
    bulwark_common::tls::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Nothing listens here: the reporter keeps failing, and says why.
    let nowhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = nowhere.local_addr().unwrap().to_string();
    drop(nowhere);
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let config = config(&target.local_addr().unwrap().to_string(), Some((&pki, &lb)));
    let listeners = Listeners { admin: Some(admin) };
    bulwark_prober::run(config, listeners, &shutdown)
        .await
        .unwrap();

    let list = eventually(WAIT, "the check up and the reporter failing", || async {
        let (code, body) = http_get(admin_addr, "/debug/workers").await;
        assert_eq!(code, 200, "{body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        let check = worker(&list, "check cp-1/tcp")?;
        let reporter = worker(&list, "reporter")?;
        (check["state"] == "up"
            && check["lastSuccess"].is_string()
            && reporter["lastError"]["message"].is_string())
        .then_some(list)
    })
    .await;
    let check = worker(&list, "check cp-1/tcp").unwrap();
    assert_eq!(check["critical"], true, "{list}");
    assert_eq!(check["task"], "running", "{list}");
    let reporter = worker(&list, "reporter").unwrap();
    assert_eq!(reporter["state"], "connecting", "{list}");
    assert!(reporter["lastSuccess"].is_null(), "{list}");
    let error = reporter["lastError"]["message"].as_str().unwrap();
    assert!(error.contains(&format!("stream to {lb} ended")), "{error}");

    shutdown.trigger();
    let code = tokio::time::timeout(WAIT, shutdown.wait(WAIT))
        .await
        .unwrap();
    assert_eq!(code, ExitCode::SUCCESS);
    drop(target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_check_stops_the_prober() {
    let log = CapturedLogs::install();
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = Shutdown::new();
    let config = config(&target.local_addr().unwrap().to_string(), None);
    bulwark_prober::run(config, Listeners::default(), &shutdown)
        .await
        .unwrap();

    shutdown.workers().inject_panic("check cp-1/tcp");
    let code = tokio::time::timeout(WAIT, shutdown.clone().wait(WAIT))
        .await
        .expect("the prober did not stop");
    assert_eq!(code, ExitCode::from(EXIT_TASK_FAILED));
    let log = log.text();
    assert!(
        log.contains(
            "critical task check cp-1/tcp panicked: fault injected into check cp-1/tcp; shutting down"
        ),
        "{log}"
    );
    let entry = shutdown.workers().get("check cp-1/tcp").unwrap();
    assert_eq!(entry.task, TaskState::Failed);
    drop(target);
}
