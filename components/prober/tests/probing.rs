//! Probes and checks against real processes: the fixture apiserver (a test
//! double of kube-apiserver, run as its own process so it can be SIGKILLed)
//! and real etcd members over TLS.
//!
//! Timings are logged, never asserted beyond generous waits: the figures
//! belong to bench/.

// Helpers outside #[test] functions panic on purpose too: a failed setup
// is a failed test (and prints the harness's process logs).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use bulwark_api::lb::v1::{ProbeKind, ProbeReason};
use bulwark_prober::check::{Check, Probe};
use bulwark_prober::config::{ProbeTls, ProbingConfig};
use bulwark_prober::observations::Observations;
use bulwark_prober::probe::Outcome;
use bulwark_prober::probe::http::{Expect, HttpProbe, client_config};
use bulwark_testkit::fixture::ApiServerProcess;
use bulwark_testkit::{Etcd, Pki};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);
const TIMEOUT: Duration = Duration::from_millis(300);

fn trust(ca: &std::path::Path) -> ProbeTls {
    ProbeTls {
        ca_file: ca.to_owned(),
        cert_file: None,
        key_file: None,
    }
}

fn http_probe(api: &ApiServerProcess, path: &'static str, reuse: bool) -> HttpProbe {
    let tls = client_config(&trust(api.ca_path())).unwrap();
    HttpProbe::new(
        &api.addr().to_string(),
        None,
        path,
        Expect::Success,
        tls,
        reuse,
    )
    .unwrap()
}

async fn start_api(name: &str, pki: &Pki) -> ApiServerProcess {
    bulwark_testkit::install_crypto_provider();
    ApiServerProcess::start(name, pki).await.unwrap()
}

#[tokio::test]
async fn a_ready_apiserver_passes_readyz_and_livez() {
    let pki = Pki::new().unwrap();
    let api = start_api("api-1", &pki).await;
    for path in ["/readyz", "/livez"] {
        let o = http_probe(&api, path, false).run(TIMEOUT).await;
        assert!(o.ok, "{path}: {o:?}");
        assert_eq!((o.reason, o.http_status), (ProbeReason::Ok, Some(200)));
        println!("{path}: {:?}", o.latency);
    }
}

#[tokio::test]
async fn not_ready_fails_readyz_while_livez_passes() {
    let pki = Pki::new().unwrap();
    let api = start_api("api-1", &pki).await;
    api.set_ready(false).await.unwrap();
    let readyz = http_probe(&api, "/readyz", false).run(TIMEOUT).await;
    assert!(!readyz.ok);
    assert_eq!(readyz.reason, ProbeReason::HttpStatus);
    assert_eq!(readyz.http_status, Some(500));
    assert!(
        readyz.detail.contains("[-]etcd-readiness failed"),
        "{}",
        readyz.detail
    );
    let livez = http_probe(&api, "/livez", false).run(TIMEOUT).await;
    assert!(livez.ok, "{livez:?}");
}

#[tokio::test]
async fn a_hung_apiserver_times_out_waiting_for_the_response() {
    let pki = Pki::new().unwrap();
    let api = start_api("api-1", &pki).await;
    api.hang().await.unwrap();
    let o = http_probe(&api, "/livez", false).run(TIMEOUT).await;
    assert!(!o.ok);
    assert_eq!(o.reason, ProbeReason::Timeout, "{o:?}");
    assert!(
        o.detail.contains("waiting for the response"),
        "{}",
        o.detail
    );
    assert!(o.latency >= TIMEOUT);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_a_tls_error() {
    let pki = Pki::new().unwrap();
    let api = start_api("api-1", &pki).await;
    let other = Pki::with_ca_name("not-the-cluster-ca").unwrap();
    let tls = client_config(&trust(other.ca_path())).unwrap();
    let mut probe = HttpProbe::new(
        &api.addr().to_string(),
        None,
        "/readyz",
        Expect::Success,
        tls,
        false,
    )
    .unwrap();
    let o = probe.run(TIMEOUT).await;
    assert_eq!(o.reason, ProbeReason::TlsError, "{o:?}");
    assert!(o.detail.starts_with("TLS handshake:"), "{}", o.detail);

    // The right CA but a name the certificate does not carry.
    let tls = client_config(&trust(api.ca_path())).unwrap();
    let mut probe = HttpProbe::new(
        &api.addr().to_string(),
        Some("someone-else.example"),
        "/readyz",
        Expect::Success,
        tls,
        false,
    )
    .unwrap();
    assert_eq!(probe.run(TIMEOUT).await.reason, ProbeReason::TlsError);
}

#[tokio::test]
async fn kept_connections_still_notice_a_killed_apiserver() {
    let pki = Pki::new().unwrap();
    let mut api = start_api("api-1", &pki).await;
    let mut probe = http_probe(&api, "/livez", true);
    assert!(probe.run(TIMEOUT).await.ok);
    assert!(probe.run(TIMEOUT).await.ok);
    api.kill().unwrap();
    // The kept connection is dead; the retry on a fresh one is refused.
    let o = probe.run(TIMEOUT).await;
    assert_eq!(o.reason, ProbeReason::ConnectionRefused, "{o:?}");
}

/// Runs readyz and livez checks on `api` with the default timing.
fn spawn_checks(
    api: &ApiServerProcess,
    table: &Observations,
    cancel: &CancellationToken,
    reuse: bool,
) {
    for (kind, path) in [(ProbeKind::Readyz, "/readyz"), (ProbeKind::Livez, "/livez")] {
        let check = Check::new(
            api.name(),
            &api.addr().to_string(),
            "zone-a",
            kind,
            Probe::Http(http_probe(api, path, reuse)),
            ProbingConfig::default(),
        );
        tokio::spawn(check.run(table.clone(), cancel.child_token()));
    }
}

/// Waits until the settled observation of (`target`, `kind`) satisfies `f`.
async fn settled(
    table: &Observations,
    target: &str,
    kind: ProbeKind,
    f: impl Fn(&bulwark_api::lb::v1::Observation) -> bool,
) -> bulwark_api::lb::v1::Observation {
    let mut changes = table.subscribe();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(o) = table.get(target, kind).filter(|o| f(o)) {
                return o;
            }
            changes.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{target} {kind:?} did not settle as expected"))
}

async fn sigkill_is_detected(reuse: bool) {
    let pki = Pki::new().unwrap();
    let mut api = start_api("api-1", &pki).await;
    let table = Observations::new();
    let cancel = CancellationToken::new();
    spawn_checks(&api, &table, &cancel, reuse);
    for kind in [ProbeKind::Readyz, ProbeKind::Livez] {
        settled(&table, "api-1", kind, |o| o.ok).await;
    }
    api.kill().unwrap();
    let killed = Instant::now();
    for kind in [ProbeKind::Readyz, ProbeKind::Livez] {
        let o = settled(&table, "api-1", kind, |o| !o.ok).await;
        assert_eq!(
            o.reason,
            ProbeReason::ConnectionRefused as i32,
            "{kind:?}: {o:?}"
        );
        println!(
            "SIGKILL detected by {kind:?} (reuse_connections={reuse}) after {:?}",
            killed.elapsed()
        );
    }
    cancel.cancel();
}

#[tokio::test]
async fn a_killed_apiserver_is_detected_as_refused() {
    sigkill_is_detected(false).await;
}

#[tokio::test]
async fn a_killed_apiserver_is_detected_as_refused_with_kept_connections() {
    sigkill_is_detected(true).await;
}

#[tokio::test]
async fn graceful_shutdown_fails_readyz_first_while_livez_passes() {
    let pki = Pki::new().unwrap();
    bulwark_testkit::install_crypto_provider();
    let api = ApiServerProcess::builder("api-1")
        .shutdown_delay(Duration::from_secs(2))
        .start(&pki)
        .await
        .unwrap();
    let table = Observations::new();
    let cancel = CancellationToken::new();
    spawn_checks(&api, &table, &cancel, false);
    for kind in [ProbeKind::Readyz, ProbeKind::Livez] {
        settled(&table, "api-1", kind, |o| o.ok).await;
    }
    api.terminate().await.unwrap();
    let term = Instant::now();
    let readyz = settled(&table, "api-1", ProbeKind::Readyz, |o| !o.ok).await;
    // At the moment readyz settled down, livez still passes: drain, not
    // down.
    let livez = table.get("api-1", ProbeKind::Livez).unwrap();
    assert!(livez.ok, "livez already down: {livez:?}");
    assert_eq!(readyz.http_status, Some(500));
    assert!(
        readyz.detail.contains("[-]shutdown failed"),
        "{}",
        readyz.detail
    );
    println!("readyz failing after SIGTERM: {:?}", term.elapsed());
    // Then the listener closes: both refused.
    let livez = settled(&table, "api-1", ProbeKind::Livez, |o| !o.ok).await;
    assert_eq!(
        livez.reason,
        ProbeReason::ConnectionRefused as i32,
        "{livez:?}"
    );
    println!("livez refused after SIGTERM: {:?}", term.elapsed());
    cancel.cancel();
}

#[tokio::test]
async fn heavy_etcd_members_are_healthy_until_killed() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let mut etcd = Etcd::builder().members(3).tls(&pki).start().await.unwrap();
    let client = etcd.client_tls().unwrap().clone();
    let tls = client_config(&ProbeTls {
        ca_file: client.ca.clone(),
        cert_file: Some(client.cert.clone()),
        key_file: Some(client.key.clone()),
    })
    .unwrap();
    let table = Observations::new();
    let cancel = CancellationToken::new();
    for m in etcd.members() {
        let address = m.client_url().trim_start_matches("https://").to_owned();
        let probe = HttpProbe::new(
            &address,
            None,
            "/health",
            Expect::EtcdHealth,
            tls.clone(),
            false,
        )
        .unwrap();
        let check = Check::new(
            m.name(),
            &address,
            "",
            ProbeKind::Etcd,
            Probe::Http(probe),
            ProbingConfig::default(),
        );
        tokio::spawn(check.run(table.clone(), cancel.child_token()));
    }
    for m in ["m1", "m2", "m3"] {
        let o = settled(&table, m, ProbeKind::Etcd, |o| o.ok).await;
        assert_eq!(o.http_status, Some(200));
    }
    etcd.member_mut(0).kill().unwrap();
    let killed = Instant::now();
    let o = settled(&table, "m1", ProbeKind::Etcd, |o| !o.ok).await;
    assert_eq!(o.reason, ProbeReason::ConnectionRefused as i32, "{o:?}");
    println!("etcd member SIGKILL detected after {:?}", killed.elapsed());
    // The other two keep (or regain, after an election) their health.
    etcd.wait_healthy(WAIT).await.unwrap();
    for m in ["m2", "m3"] {
        settled(&table, m, ProbeKind::Etcd, |o| o.ok).await;
    }
    cancel.cancel();
}

#[tokio::test]
async fn an_etcd_probe_without_a_client_certificate_fails_the_handshake() {
    bulwark_testkit::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let etcd = Etcd::builder().tls(&pki).start().await.unwrap();
    let address = etcd
        .member(0)
        .client_url()
        .trim_start_matches("https://")
        .to_owned();
    let tls = client_config(&trust(pki.ca_path())).unwrap();
    let mut probe =
        HttpProbe::new(&address, None, "/health", Expect::EtcdHealth, tls, false).unwrap();
    let o: Outcome = probe.run(Duration::from_secs(2)).await;
    assert!(!o.ok);
    // TLS 1.3 reports a missing client certificate after the handshake, so
    // the failure shows as an alert or a reset connection, never as ok.
    assert!(
        matches!(
            o.reason,
            ProbeReason::TlsError | ProbeReason::ConnectionReset
        ),
        "{o:?}"
    );
}
