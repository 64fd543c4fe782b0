//! TLS material and mutual-TLS configuration for every bulwark endpoint.
//!
//! All of bulwark's gRPC traffic is mTLS: servers demand a client
//! certificate from the configured CA, and the verified certificate's
//! subject (CN, O) and SANs become the caller's [`PeerIdentity`], which
//! [`crate::authz`] turns into authorization decisions.
//!
//! Paths default to kubeadm's `/etc/kubernetes/pki` layout where a file
//! already exists there for the same purpose (the cluster CA, etcd's CA and
//! the apiserver's etcd client certificate); bulwark's own serving
//! certificates live under `/etc/kubernetes/pki/bulwark/`.
//!
//! A [`TlsMaterial`] is the current state of its three files, shared by
//! every server and channel built from it; [`reload`] swaps in renewed
//! files (or refuses broken ones) while the daemon runs, and [`transport`]
//! does the handshakes so each new connection takes the current state.
//!
//! One crypto provider (ring) is used by the whole process:
//! [`install_crypto_provider`] makes it the process default, which the
//! object-store HTTP client relies on, and every config built here names it
//! explicitly.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authz::IdentityRule;
use crate::config::{Validate, Validator};

pub mod reload;
pub mod transport;

/// kubeadm's PKI directory.
pub const KUBEADM_PKI_DIR: &str = "/etc/kubernetes/pki";
/// The cluster CA kubeadm creates; bulwark trusts it for its own gRPC by default.
pub const KUBEADM_CA_CERT: &str = "/etc/kubernetes/pki/ca.crt";
/// etcd's CA in kubeadm's layout.
pub const KUBEADM_ETCD_CA_CERT: &str = "/etc/kubernetes/pki/etcd/ca.crt";
/// The client certificate kubeadm gives the apiserver for etcd; the backup
/// service uses the same kind of identity.
pub const KUBEADM_APISERVER_ETCD_CLIENT_CERT: &str =
    "/etc/kubernetes/pki/apiserver-etcd-client.crt";
/// Key of [`KUBEADM_APISERVER_ETCD_CLIENT_CERT`].
pub const KUBEADM_APISERVER_ETCD_CLIENT_KEY: &str = "/etc/kubernetes/pki/apiserver-etcd-client.key";
/// bulwark's own certificates (serving and client) on a kubeadm node.
pub const BULWARK_PKI_DIR: &str = "/etc/kubernetes/pki/bulwark";

/// Errors loading or using TLS material. Each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file was read but holds no usable PEM item of the expected kind.
    #[error("{what} {path} holds no {expected}: {detail}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
        detail: String,
    },
    /// rustls refused the material (e.g. key does not match certificate).
    #[error("invalid TLS configuration ({context}): {source}")]
    Rustls {
        context: &'static str,
        source: rustls::Error,
    },
    /// The client verifier could not be built from the CA bundle.
    #[error("invalid client CA bundle {path}: {detail}")]
    ClientVerifier { path: PathBuf, detail: String },
}

impl TlsError {
    /// A rustls failure while doing `context`, for `map_err`.
    pub fn rustls(context: &'static str) -> impl FnOnce(rustls::Error) -> Self {
        move |source| Self::Rustls { context, source }
    }
}

/// Where one endpoint's TLS material lives: its certificate chain and key,
/// and the CA bundle it trusts for the other side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain presented by this side (leaf first).
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `cert_file`.
    pub key_file: PathBuf,
    /// PEM bundle of CAs trusted to have issued the other side's certificate.
    pub ca_file: PathBuf,
}

/// Field validation: each of the three files can be read (what they hold
/// is the preflight's [`TlsFiles::check`]).
impl Validate for TlsFiles {
    fn validate(&self, v: &mut Validator) {
        v.file_exists("certFile", &self.cert_file);
        v.file_exists("keyFile", &self.key_file);
        v.file_exists("caFile", &self.ca_file);
    }
}

/// The files of one TLS identity whose expiry an operator watches: the
/// certificate this side presents, when it presents one, and the CA
/// bundle it trusts. What the expiry metric
/// (`bulwark_certificate_expiry_timestamp_seconds`) and `bulwarkctl certs
/// check` read, for every identity a daemon's config actually uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// This side's certificate (leaf first), if it presents one.
    pub cert: Option<PathBuf>,
    /// The CA bundle it trusts for the other side.
    pub ca: PathBuf,
}

impl CertFiles {
    /// Each file with its role (`certificate`, `ca`) and whether its expiry
    /// is the earliest in the file (a CA bundle: one expired CA breaks a
    /// chain) rather than the first certificate's (this side's leaf).
    pub fn roles(&self) -> impl Iterator<Item = (&Path, &'static str, bool)> {
        let cert = self
            .cert
            .iter()
            .map(|c| (c.as_path(), "certificate", false));
        cert.chain(std::iter::once((self.ca.as_path(), "ca", true)))
    }
}

impl From<&TlsFiles> for CertFiles {
    fn from(files: &TlsFiles) -> Self {
        Self {
            cert: Some(files.cert_file.clone()),
            ca: files.ca_file.clone(),
        }
    }
}

impl TlsFiles {
    /// The defaults for a bulwark component on a kubeadm node:
    /// `/etc/kubernetes/pki/bulwark/<component>.{crt,key}` trusting the cluster CA.
    pub fn kubeadm_default(component: &str) -> Self {
        let dir = Path::new(BULWARK_PKI_DIR);
        Self {
            cert_file: dir.join(format!("{component}.crt")),
            key_file: dir.join(format!("{component}.key")),
            ca_file: PathBuf::from(KUBEADM_CA_CERT),
        }
    }

    /// Reads and checks all three files, so a daemon fails at start (and
    /// `--check-config` reports it) rather than on its first connection.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        Ok(TlsMaterial::new(self.clone(), self.parse()?))
    }

    /// Reads and parses the three files as they are now.
    fn parse(&self) -> Result<Parsed, TlsError> {
        let chain_pem = read(&self.cert_file, "certificate")?;
        let key_pem = read(&self.key_file, "private key")?;
        let ca_pem = read(&self.ca_file, "CA bundle")?;
        Ok(Parsed {
            chain: parse_certs(&chain_pem, &self.cert_file, "certificate")?,
            key: Arc::new(parse_key(&key_pem, &self.key_file)?),
            ca: parse_certs(&ca_pem, &self.ca_file, "CA bundle")?,
            ca_path: self.ca_file.clone(),
            contents: [chain_pem, key_pem, ca_pem],
            server_h2: OnceLock::new(),
            client_h2: OnceLock::new(),
        })
    }
}

/// What a daemon does with one certificate, for [`TlsFiles::check`]:
/// the properties that, when missing, make it fail only at its first
/// handshake (or crashloop) rather than at `--check-config`.
#[derive(Debug, Default)]
pub struct CertUse<'a> {
    /// It serves TLS with it: the certificate needs the serverAuth usage.
    pub server: bool,
    /// It dials with it: the certificate needs the clientAuth usage.
    pub client: bool,
    /// Hosts peers dial it by, with the field each comes from
    /// (`raft.advertiseAddress`); each must be one of its SANs.
    pub hosts: Vec<(&'a str, String)>,
    /// The access rule (and its path) its identity must match because
    /// peers check it (the LB's `access.peers`).
    pub identity: Option<(&'a str, &'a IdentityRule)>,
    /// Its peers trust the same `caFile`, so the certificate must chain to
    /// a CA in it.
    pub same_ca: bool,
}

impl TlsFiles {
    /// Reads the three files and records, at `certFile`/`keyFile`/`caFile`
    /// relative to the validator's position, every reason the daemon would
    /// fail with them: unreadable or malformed files, a key that is not the
    /// certificate's, an expired certificate, a missing usage, a SAN that
    /// does not cover an address peers dial, an identity the access policy
    /// refuses, a certificate not issued by the CA bundle.
    pub fn check(&self, want: &CertUse<'_>, v: &mut Validator) {
        let material = match self.parse() {
            Ok(m) => m,
            Err(e) => {
                let field = match &e {
                    TlsError::Read { path, .. } | TlsError::Pem { path, .. }
                        if *path == self.key_file =>
                    {
                        "keyFile"
                    }
                    TlsError::Read { path, .. } | TlsError::Pem { path, .. }
                        if *path == self.ca_file =>
                    {
                        "caFile"
                    }
                    _ => "certFile",
                };
                v.at(field, |v| v.error(e.to_string()));
                return;
            }
        };
        let provider = provider();
        match rustls::sign::CertifiedKey::from_der(
            material.chain.clone(),
            material.key.clone_key(),
            &provider,
        ) {
            Ok(_) => {}
            Err(rustls::Error::InconsistentKeys(_)) => v.at("keyFile", |v| {
                v.error(format!(
                    "{} is not the key of the certificate {} (their public keys differ): \
                     give the key the certificate was issued for",
                    self.key_file.display(),
                    self.cert_file.display()
                ))
            }),
            Err(e) => v.at("keyFile", |v| {
                v.error(format!("{} cannot be used: {e}", self.key_file.display()))
            }),
        }
        v.at("certFile", |v| self.check_leaf(&material, want, v));
    }

    fn check_leaf(&self, material: &Parsed, want: &CertUse<'_>, v: &mut Validator) {
        let file = self.cert_file.display();
        let leaf = &material.chain[0];
        let cert = match X509Certificate::from_der(leaf) {
            Ok((_, cert)) => cert,
            Err(e) => return v.error(format!("{file}: the certificate cannot be parsed: {e}")),
        };
        let validity = cert.validity();
        if !validity.is_valid() {
            v.error(format!(
                "{file} is not valid now: valid from {} to {}",
                validity.not_before, validity.not_after
            ));
        }
        if let Ok(Some(eku)) = cert.extended_key_usage() {
            let eku = eku.value;
            for (needed, has, what) in [
                (want.server, eku.server_auth, "serverAuth (it serves TLS)"),
                (want.client, eku.client_auth, "clientAuth (it dials peers)"),
            ] {
                if needed && !has && !eku.any {
                    v.error(format!(
                        "{file} lacks the {what} extended key usage: reissue it with \
                         extendedKeyUsage = serverAuth, clientAuth"
                    ));
                }
            }
        }
        let id = match PeerIdentity::from_der(leaf) {
            Ok(id) => id,
            Err(e) => return v.error(format!("{file}: {e}")),
        };
        for (field, host) in &want.hosts {
            if !covers(&id, host) {
                v.error(format!(
                    "{file} does not cover {host} ({field}), which peers dial and verify: \
                     its SANs are [{}]; reissue it with {host} in subjectAltName",
                    sans(&id)
                ));
            }
        }
        if let Some((rule_path, rule)) = want.identity
            && !rule.matches(&id)
        {
            v.error(format!(
                "{file} is {id}, which {rule_path} (commonNames {:?}, organizations {:?}) does \
                 not match, so peers would refuse it: is it another component's certificate?",
                rule.common_names, rule.organizations
            ));
        }
        if want.same_ca
            && let Err(e) = material.verify_against_own_ca()
        {
            v.error(format!(
                "{file} is not issued by a CA in {}: {e}",
                material.ca_path.display()
            ));
        }
    }
}

/// Whether the certificate of `id` is valid for `host` (an IP or DNS name,
/// DNS wildcards in the leftmost label).
fn covers(id: &PeerIdentity, host: &str) -> bool {
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return id.ip_addresses.contains(&ip);
    }
    let host = host.to_ascii_lowercase();
    id.dns_names.iter().any(|d| {
        let d = d.to_ascii_lowercase();
        match d.strip_prefix("*.") {
            Some(suffix) => host.split_once('.').is_some_and(|(_, rest)| rest == suffix),
            None => d == host,
        }
    })
}

fn sans(id: &PeerIdentity) -> String {
    id.dns_names
        .iter()
        .map(|d| format!("DNS:{d}"))
        .chain(id.ip_addresses.iter().map(|ip| format!("IP:{ip}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// TLS material, ready to build rustls or tonic configurations, that
/// follows its files: clones share one current state, which
/// [`TlsMaterial::follow`] (reload.rs) replaces when the files change, so
/// every server and channel built from it uses the new material for its
/// next handshake while open connections keep theirs.
#[derive(Clone)]
pub struct TlsMaterial {
    files: TlsFiles,
    current: Arc<ArcSwap<Parsed>>,
}

/// The three files as parsed at one moment.
///
/// The PEM text is kept beside the parsed form because tonic takes PEM, and
/// to tell a changed file from an unchanged one.
struct Parsed {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    ca: Vec<CertificateDer<'static>>,
    ca_path: PathBuf,
    /// certFile, keyFile, caFile as read.
    contents: [Vec<u8>; 3],
    /// The HTTP/2 configs every gRPC connection uses, built on first use.
    server_h2: OnceLock<Arc<rustls::ServerConfig>>,
    client_h2: OnceLock<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for TlsMaterial {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current.load();
        f.debug_struct("TlsMaterial")
            .field("cert_file", &self.files.cert_file)
            .field("chain_len", &current.chain.len())
            .field("ca_len", &current.ca.len())
            .field("ca_path", &current.ca_path)
            .finish_non_exhaustive()
    }
}

/// gRPC's ALPN protocol.
const H2: &[&[u8]] = &[b"h2"];

impl TlsMaterial {
    fn new(files: TlsFiles, parsed: Parsed) -> Self {
        Self {
            files,
            current: Arc::new(ArcSwap::from_pointee(parsed)),
        }
    }

    /// The files this material comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The leaf certificate's identity (what peers will see of us).
    pub fn identity(&self) -> Result<PeerIdentity, IdentityError> {
        self.current.load().identity()
    }

    /// A rustls server config that requires a client certificate issued by
    /// our CA (mutual TLS), advertising the given ALPN protocols.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        self.current.load().server_config(alpn)
    }

    /// A rustls client config presenting our certificate and trusting only
    /// our CA bundle.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TlsError> {
        self.current.load().client_config(alpn)
    }

    /// The current HTTP/2 server config (what a gRPC server accepts the
    /// next connection with).
    pub fn server_h2(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let current = self.current.load();
        built_once(&current.server_h2, || current.server_config(H2))
    }

    /// The current HTTP/2 client config (what a gRPC channel dials its next
    /// connection with).
    pub fn client_h2(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let current = self.current.load();
        built_once(&current.client_h2, || current.client_config(H2))
    }

    /// The current certificate chain, key and CA bundle as PEM, for a
    /// client library that takes PEM and connects anew with it
    /// (etcd-client).
    pub fn pem(&self) -> [Vec<u8>; 3] {
        self.current.load().contents.clone()
    }

    /// tonic's client TLS from the current material: our identity, the
    /// server verified against our CA bundle under `server_name` (which
    /// must be in the server's SANs). Fixed for the life of what it
    /// configures; [`crate::grpc::channel`] follows reloads instead.
    pub fn tonic_client(&self, server_name: &str) -> tonic::transport::ClientTlsConfig {
        let current = self.current.load();
        let [chain_pem, key_pem, ca_pem] = &current.contents;
        tonic::transport::ClientTlsConfig::new()
            .domain_name(server_name)
            .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
            .identity(tonic::transport::Identity::from_pem(chain_pem, key_pem))
    }
}

impl Parsed {
    fn identity(&self) -> Result<PeerIdentity, IdentityError> {
        let leaf = self.chain.first().ok_or(IdentityError::NoCertificate)?;
        PeerIdentity::from_der(leaf)
    }

    /// Verifies our own certificate chain against our CA bundle, as a
    /// peer trusting the same bundle would (usages and names are checked
    /// separately, with clearer words).
    fn verify_against_own_ca(&self) -> Result<(), String> {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots().map_err(|e| e.to_string())?),
            provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        match verifier.verify_client_cert(
            &self.chain[0],
            &self.chain[1..],
            rustls_pki_types::UnixTime::now(),
        ) {
            Ok(_) => Ok(()),
            // A missing clientAuth usage is reported on its own.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose
                | rustls::CertificateError::InvalidPurposeContext { .. },
            )) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.ca {
            roots
                .add(ca.clone())
                .map_err(TlsError::rustls("adding CA certificate"))?;
        }
        Ok(roots)
    }

    fn server_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                .build()
                .map_err(|e| TlsError::ClientVerifier {
                    path: self.ca_path.clone(),
                    detail: e.to_string(),
                })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::rustls("protocol versions"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(TlsError::rustls("server certificate and key"))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::rustls("protocol versions"))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(TlsError::rustls("client certificate and key"))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

/// The config in `slot`, built the first time this material is asked for
/// it. Two first callers may both build; one config is kept and both get it.
fn built_once<T>(
    slot: &OnceLock<Arc<T>>,
    build: impl FnOnce() -> Result<T, TlsError>,
) -> Result<Arc<T>, TlsError> {
    if let Some(c) = slot.get() {
        return Ok(c.clone());
    }
    let config = Arc::new(build()?);
    Ok(slot.get_or_init(|| config).clone())
}

/// ring, the one crypto provider of every bulwark process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default rustls provider. Libraries that build
/// their own rustls configs without naming a provider (the object-store HTTP
/// client) need one. Idempotent; call it first thing in `main`.
pub fn install_crypto_provider() {
    // An Err means a default is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Loads every certificate of a PEM file; an empty result is an error.
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(&read(path, what)?, path, what)
}

fn parse_certs(
    bytes: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            expected: "PEM certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            expected: "PEM certificate",
            detail: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Loads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_key(&read(path, "private key")?, path)
}

fn parse_key(bytes: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        expected: "PEM private key (PKCS#8, PKCS#1 or SEC1)",
        detail: e.to_string(),
    })
}

/// Errors deriving a peer identity from a certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The connection carried no client certificate (not mTLS, or a plain-text
    /// connection in a test).
    #[error("no client certificate was presented")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("client certificate cannot be parsed: {0}")]
    Parse(String),
}

/// Who is on the other end of a verified TLS connection, in Kubernetes terms:
/// the CN is the user name and each O is a group (as kube-apiserver reads
/// client certificates).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeerIdentity {
    /// Subject common name (the user).
    pub common_name: Option<String>,
    /// Subject organizations (the groups).
    pub organizations: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// URI subject alternative names (e.g. SPIFFE IDs).
    pub uris: Vec<String>,
}

impl PeerIdentity {
    /// Reads the identity out of a DER certificate. The certificate must
    /// already have been verified by the TLS layer.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
        let subject = cert.subject();
        let common_name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let organizations = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .map(str::to_owned)
            .collect();
        let mut id = PeerIdentity {
            common_name,
            organizations,
            ..Default::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => id.dns_names.push((*d).to_owned()),
                    GeneralName::URI(u) => id.uris.push((*u).to_owned()),
                    GeneralName::IPAddress(bytes) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                            id.ip_addresses.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                            id.ip_addresses.push(IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(id)
    }

    /// The identity of the client of a tonic request served over mTLS.
    pub fn of_request<T>(request: &tonic::Request<T>) -> Result<Self, IdentityError> {
        let certs = request.peer_certs().ok_or(IdentityError::NoCertificate)?;
        let leaf = certs.first().ok_or(IdentityError::NoCertificate)?;
        Self::from_der(leaf.as_ref())
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CN={}", self.common_name.as_deref().unwrap_or("<none>"))?;
        for o in &self.organizations {
            write!(f, ",O={o}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::Pki;

    #[test]
    fn identity_reads_cn_orgs_and_sans() {
        let pki = Pki::new();
        let files = pki.issue(
            "admin",
            "admin",
            &["system:masters", "bulwark:operators"],
            &["admin.example", "127.0.0.1"],
        );
        let id = files.load().unwrap().identity().unwrap();
        assert_eq!(id.common_name.as_deref(), Some("admin"));
        assert_eq!(
            id.organizations,
            vec!["system:masters", "bulwark:operators"]
        );
        assert_eq!(id.dns_names, vec!["admin.example"]);
        assert_eq!(
            id.ip_addresses,
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            id.to_string(),
            "CN=admin,O=system:masters,O=bulwark:operators"
        );
    }

    #[test]
    fn missing_and_malformed_files_name_the_file() {
        let pki = Pki::new();
        let mut files = pki.issue("a", "a", &[], &["localhost"]);
        files.key_file = pki.dir.path().join("nope.key");
        let err = files.load().unwrap_err().to_string();
        assert!(err.contains("nope.key"), "{err}");
        assert!(err.contains("private key"), "{err}");

        let garbage = pki.dir.path().join("garbage.crt");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let err = load_certs(&garbage, "certificate").unwrap_err().to_string();
        assert!(
            err.contains("garbage.crt") && err.contains("no CERTIFICATE"),
            "{err}"
        );
    }

    /// What checking `files` as an LB node's finds: it serves and dials,
    /// peers reach it by `hosts`, `access.peers` admits organization
    /// `bulwark:lb`, and peers trust the same CA.
    fn lb_peer_errors(files: &TlsFiles, hosts: &[(&str, &str)]) -> Vec<String> {
        let rule = IdentityRule {
            common_names: vec![],
            organizations: vec!["bulwark:lb".into()],
        };
        let want = CertUse {
            server: true,
            client: true,
            hosts: hosts.iter().map(|&(f, h)| (f, h.to_owned())).collect(),
            identity: Some(("access.peers", &rule)),
            same_ca: true,
        };
        crate::config::validate_at("", &Checked(files, &want))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    struct Checked<'a>(&'a TlsFiles, &'a CertUse<'a>);

    impl crate::config::Validate for Checked<'_> {
        fn validate(&self, v: &mut Validator) {
            v.at("tls", |v| self.0.check(self.1, v));
        }
    }

    #[test]
    fn check_passes_a_good_certificate() {
        let pki = Pki::new();
        let files = pki.issue(
            "lb",
            "lb-1",
            &["bulwark:lb"],
            &["10.0.0.11", "*.cp.example"],
        );
        let hosts = [
            ("raft.address", "10.0.0.11"),
            ("api.advertiseAddress", "lb-1.cp.example"),
        ];
        assert_eq!(lb_peer_errors(&files, &hosts), Vec::<String>::new());
    }

    #[test]
    fn check_reports_every_problem_with_its_file() {
        let pki = Pki::new();
        // A prober's certificate, client usage only, for the wrong address,
        // with another certificate's key, from another CA.
        let mut files = pki.issue_for(
            "prober",
            "prober",
            &["bulwark:probers"],
            &["10.0.0.99"],
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
        );
        let other = Pki::new();
        let stranger = other.issue("stranger", "stranger", &["bulwark:lb"], &["10.0.0.11"]);
        files.key_file = pki.issue("x", "x", &[], &[]).key_file;
        let hosts = [("raft.advertiseAddress", "10.0.0.11")];
        let errs = lb_peer_errors(&files, &hosts);
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(
            errs[0].starts_with("tls.keyFile: ")
                && errs[0].contains("is not the key of the certificate"),
            "{errs:#?}"
        );
        assert!(
            errs[1].starts_with("tls.certFile: ") && errs[1].contains("lacks the serverAuth"),
            "{errs:#?}"
        );
        assert!(
            errs[2].contains("does not cover 10.0.0.11 (raft.advertiseAddress)")
                && errs[2].contains("IP:10.0.0.99"),
            "{errs:#?}"
        );
        assert!(
            errs[3].contains("CN=prober,O=bulwark:probers")
                && errs[3].contains("access.peers")
                && errs[3].contains("another component's certificate"),
            "{errs:#?}"
        );

        // Another CA's certificate, otherwise fine.
        let mut foreign = stranger.clone();
        foreign.ca_file = pki.dir.path().join("ca.crt");
        let errs = lb_peer_errors(&foreign, &hosts);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].contains("is not issued by a CA in"), "{errs:#?}");

        // An unreadable file stops the checks of that certificate, at its field.
        let mut missing = stranger;
        missing.ca_file = pki.dir.path().join("nope.crt");
        let errs = lb_peer_errors(&missing, &hosts);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with("tls.caFile: cannot read CA bundle"),
            "{errs:#?}"
        );
    }

    #[tokio::test]
    async fn mtls_handshake_accepts_our_ca_and_rejects_others() {
        install_crypto_provider();
        let pki = Pki::new();
        let server = pki.issue("server", "server", &[], &["localhost"]);
        let client = pki.issue("client", "client", &["bulwark:operators"], &[]);
        let other = Pki::new();
        let stranger = other.issue("stranger", "stranger", &[], &[]);

        let server_cfg = Arc::new(server.load().unwrap().server_config(&[b"h2"]).unwrap());
        let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        let certs = tls.get_ref().1.peer_certificates().unwrap();
                        seen.push(Some(PeerIdentity::from_der(&certs[0]).unwrap()));
                    }
                    Err(_) => seen.push(None),
                }
            }
            seen
        });

        for files in [&client, &stranger] {
            // The client trusts our CA so that only the server side decides.
            let mut f = files.clone();
            f.ca_file = pki.dir.path().join("ca.crt");
            let cfg = Arc::new(f.load().unwrap().client_config(&[b"h2"]).unwrap());
            let connector = tokio_rustls::TlsConnector::from(cfg);
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            // TLS 1.3 client auth failures surface on first read; either way
            // the server side records the outcome.
            if let Ok(mut tls) = connector.connect(name, tcp).await {
                use tokio::io::AsyncReadExt;
                let mut b = [0u8; 1];
                let _ = tls.read(&mut b).await;
            }
        }
        let seen = srv.await.unwrap();
        assert_eq!(
            seen[0]
                .as_ref()
                .and_then(|i| i.common_name.clone())
                .as_deref(),
            Some("client")
        );
        assert!(
            seen[1].is_none(),
            "a certificate from another CA must be refused"
        );
    }
}
