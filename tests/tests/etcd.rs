//! Real etcd: one member, a three-member cluster surviving a SIGKILL and a
//! restart, TLS with client certificates, and Debian's etcd 3.4.

use std::time::{Duration, Instant};

use bulwark_testkit::{Etcd, EtcdVersion, Pki};
use etcd_client::GetOptions;

async fn get(
    client: &mut etcd_client::Client,
    key: &str,
    options: Option<GetOptions>,
) -> Option<String> {
    let response = client.get(key, options).await.expect("etcd get");
    response
        .kvs()
        .first()
        .map(|kv| kv.value_str().expect("UTF-8 value").to_owned())
}

#[tokio::test]
async fn single_member_put_get() {
    let etcd = Etcd::start().await.unwrap();
    assert_eq!(etcd.endpoints().len(), 1);
    assert!(etcd.endpoints()[0].starts_with("http://127.0.0.1:"));
    let mut client = etcd.client().await.unwrap();
    client.put("/bulwark/k", "v1", None).await.unwrap();
    assert_eq!(
        get(&mut client, "/bulwark/k", None).await.as_deref(),
        Some("v1")
    );
    assert!(etcd.member(0).data_dir().join("member").is_dir());

    let output = etcd
        .etcdctl(["get", "/bulwark/k", "--print-value-only"])
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "v1");
}

#[tokio::test]
async fn heavy_etcd_cluster_survives_a_killed_member() {
    let mut etcd = Etcd::cluster(3).await.unwrap();
    let mut client = etcd.client().await.unwrap();
    client.put("before", "1", None).await.unwrap();

    let killed = etcd.member(0).pid().unwrap();
    etcd.member_mut(0).kill().unwrap();
    assert!(!etcd.member(0).is_running());
    // Reaped, not left a zombie.
    assert!(!std::path::Path::new(&format!("/proc/{killed}")).exists());
    let ids: Vec<u64> = etcd.members().iter().map(|m| m.id().unwrap()).collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2]);

    // Two of three still make a quorum, once they elected a new leader if
    // the killed member led.
    etcd.wait_healthy(Duration::from_secs(20)).await.unwrap();
    let mut survivors = etcd.member(1).client().await.unwrap();
    survivors.put("during", "2", None).await.unwrap();
    let mut third = etcd.member(2).client().await.unwrap();
    assert_eq!(get(&mut third, "during", None).await.as_deref(), Some("2"));

    etcd.member_mut(0).restart().await.unwrap();
    assert!(etcd.member(0).is_running());
    let mut restarted = etcd.member(0).client().await.unwrap();
    // A linearizable read through the restarted member...
    assert_eq!(
        get(&mut restarted, "during", None).await.as_deref(),
        Some("2")
    );
    // ...and a serializable one, served from its own store, once it has
    // caught up: the write it missed was replicated to it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let local = get(
            &mut restarted,
            "during",
            Some(GetOptions::new().with_serializable()),
        )
        .await;
        if local.as_deref() == Some("2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted member never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(&mut restarted, "before", None).await.as_deref(),
        Some("1")
    );

    // A graceful stop and restart works too.
    etcd.member_mut(2).stop().await.unwrap();
    etcd.member_mut(2).restart().await.unwrap();
    etcd.wait_healthy(Duration::from_secs(20)).await.unwrap();
    let output = etcd.etcdctl(["endpoint", "health"]).await.unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[tokio::test]
async fn tls_member_with_client_certificates() {
    let pki = Pki::new().unwrap();
    let etcd = Etcd::builder().tls(&pki).start().await.unwrap();
    assert!(etcd.endpoints()[0].starts_with("https://127.0.0.1:"));
    let tls = etcd.client_tls().unwrap();
    assert!(tls.cert.is_file() && tls.key.is_file() && tls.ca.is_file());

    let mut client = etcd.client().await.unwrap();
    client.put("secret", "s3cr3t", None).await.unwrap();
    assert_eq!(
        get(&mut client, "secret", None).await.as_deref(),
        Some("s3cr3t")
    );

    // etcdctl with the same files works; without a client certificate the
    // server refuses.
    let output = etcd
        .etcdctl(["get", "secret", "--print-value-only"])
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "s3cr3t",
        "{output:?}"
    );
    let refused =
        tokio::process::Command::new(bulwark_testkit::tools::etcdctl(EtcdVersion::V3_5).unwrap())
            .arg(format!("--endpoints={}", etcd.endpoints()[0]))
            .arg("--cacert")
            .arg(&tls.ca)
            .args(["--dial-timeout=2s", "--command-timeout=3s", "get", "secret"])
            .output()
            .await
            .unwrap();
    assert!(
        !refused.status.success(),
        "a client without a certificate got in"
    );
}

#[tokio::test]
async fn etcd_3_4_put_get_when_installed() {
    let Some(etcd) = Etcd::builder()
        .version(EtcdVersion::V3_4)
        .start_or_skip()
        .await
        .unwrap()
    else {
        return;
    };
    let mut client = etcd.client().await.unwrap();
    let status = client.status().await.unwrap();
    assert!(status.version().starts_with("3.4."), "{}", status.version());
    client.put("k34", "v34", None).await.unwrap();
    assert_eq!(get(&mut client, "k34", None).await.as_deref(), Some("v34"));
    let output = etcd
        .etcdctl(["get", "k34", "--print-value-only"])
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "v34",
        "{output:?}"
    );
}
