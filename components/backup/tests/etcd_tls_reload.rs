//! bulwark-backup's etcd client follows its certificate files, so the
//! `apiserver-etcd-client` certificate that `kubeadm certs renew` replaces
//! is used without a pod restart: against a real TLS etcd, the client
//! certificate is renewed in place with a new key, the connector's
//! material reloads it and its next connection (with the new pair) works;
//! a replacement from another CA is refused and the connector keeps
//! working with the certificate it had.

#![allow(clippy::unwrap_used)]

mod common;

use bulwark_common::tls::reload::Reload;
use bulwark_testkit::{Etcd, Pki};

async fn get(connector: &bulwark_backup::etcd::EtcdConnector) {
    let mut client = connector.client().await.unwrap();
    client.get("bulwark-reload-test", None).await.unwrap();
}

#[tokio::test]
async fn heavy_the_etcd_client_certificate_is_renewed_without_a_restart() {
    bulwark_common::tls::install_crypto_provider();
    let pki = Pki::new().unwrap();
    let etcd = Etcd::builder().members(1).tls(&pki).start().await.unwrap();
    let connector = common::connector(&etcd);
    get(&connector).await;
    let tls = connector.tls().unwrap();

    // Renewed in place with a new key (the same paths: `root.crt/.key`).
    let old = etcd.client_tls().unwrap();
    let new = pki.client("root", &[]).unwrap();
    assert_eq!(old.cert, new.cert);
    assert_ne!(old.key_pem(), new.key_pem());
    assert_eq!(tls.reload(), Reload::Applied);
    assert_eq!(tls.pem()[0], new.cert_pem().as_bytes());
    get(&connector).await;

    // From another CA: etcd would refuse it, so the reload does.
    let other = Pki::new().unwrap();
    let stranger = other.client("root", &[]).unwrap();
    std::fs::copy(&stranger.cert, &new.cert).unwrap();
    std::fs::copy(&stranger.key, &new.key).unwrap();
    assert!(matches!(tls.reload(), Reload::Refused(_)));
    assert_eq!(tls.pem()[0], new.cert_pem().as_bytes());
    get(&connector).await;
}
