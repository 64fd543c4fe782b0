//! The test PKI issues certificates that a real rustls mTLS handshake
//! accepts, and a client certificate from another CA is refused.

use std::sync::Arc;

use bulwark_testkit::{CertFiles, Pki};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain_and_key(files: &CertFiles) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .expect("test PKI material loads")
        .collect::<Result<Vec<_>, _>>()
        .expect("test PKI material loads");
    let key = PrivateKeyDer::from_pem_file(&files.key).expect("test PKI material loads");
    (chain, key)
}

fn roots(pki: &Pki) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.ca_path()).expect("test PKI material loads"))
        .expect("test PKI material loads");
    Arc::new(roots)
}

/// Runs one mTLS handshake plus an echo over an in-memory pipe; returns
/// the server's error if the handshake failed.
async fn mtls_exchange(
    server_pki: &Pki,
    server: &CertFiles,
    client: &CertFiles,
) -> Result<(), String> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(server_pki), provider())
            .build()
            .expect("client verifier builds");
    let (chain, key) = chain_and_key(server);
    let server_config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server certificate and key match");
    let (chain, key) = chain_and_key(client);
    let client_config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots(server_pki))
        .with_client_auth_cert(chain, key)
        .expect("client certificate and key match");

    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server_task = tokio::spawn(async move {
        let mut tls = TlsAcceptor::from(Arc::new(server_config))
            .accept(server_io)
            .await
            .map_err(|e| e.to_string())?;
        assert!(
            tls.get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty()),
            "a verified client presented its certificate"
        );
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    });
    let client_side = async {
        let mut tls = TlsConnector::from(Arc::new(client_config))
            .connect(
                ServerName::try_from("127.0.0.1").expect("an IP address is a server name"),
                client_io,
            )
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        Ok::<_, String>(())
    };
    let client_result = client_side.await;
    let server_result = server_task.await.expect("the server task does not panic");
    server_result.and(client_result)
}

#[tokio::test]
async fn mtls_handshake_with_issued_certificates() {
    let pki = Pki::new().unwrap();
    let server = pki
        .server("apiserver", &["127.0.0.1", "localhost"])
        .unwrap();
    let lb = pki.client("bulwark-lb-1", &["bulwark:lb"]).unwrap();
    let admin = pki.admin().unwrap();
    let peer = pki.peer("etcd-1", &[], &["127.0.0.1"]).unwrap();

    mtls_exchange(&pki, &server, &lb).await.unwrap();
    mtls_exchange(&pki, &server, &admin).await.unwrap();
    // A peer certificate works on both ends.
    mtls_exchange(&pki, &peer, &peer).await.unwrap();
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new().unwrap();
    let server = pki.server("apiserver", &["127.0.0.1"]).unwrap();
    let rogue_ca = Pki::with_ca_name("someone-else").unwrap();
    let rogue = rogue_ca.admin().unwrap();

    let err = mtls_exchange(&pki, &server, &rogue).await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer")
            || err.contains("unknown issuer")
            || err.contains("BadCertificate"),
        "unexpected error: {err}"
    );
}

#[test]
fn files_are_private_pem_with_the_identity() {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = Pki::new().unwrap();
    let admin = pki.admin().unwrap();
    for path in [&admin.cert, &admin.key, &admin.ca] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
    }
    assert!(admin.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(admin.key_pem().contains("PRIVATE KEY"));
    // CN and O are in the subject (DER strings are readable in the raw bytes).
    let der = CertificateDer::from_pem_file(&admin.cert).unwrap();
    let raw = der.as_ref();
    let contains = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"admin"));
    assert!(contains(b"system:masters"));
    assert!(
        pki.server("ca", &[]).is_err(),
        "\"ca\" would overwrite the CA files"
    );
}

#[test]
fn client_identities_carry_cn_and_every_organization() {
    let pki = Pki::new().expect("test PKI");
    let files = pki
        .client("bulwark-prober-a", &["bulwark:probers", "bulwark:readers"])
        .expect("client certificate");
    let identity = files
        .tls_files()
        .load()
        .expect("bulwark loads the files")
        .identity()
        .expect("identity parses");
    assert_eq!(identity.common_name.as_deref(), Some("bulwark-prober-a"));
    assert_eq!(
        identity.organizations,
        ["bulwark:probers", "bulwark:readers"]
    );
}
