//! A test PKI: one CA issuing server, client and peer certificates.
//!
//! Identities follow what bulwark authorizes on: the client certificate's
//! CN is the identity and its O values are the groups, as in Kubernetes
//! (`CN=admin, O=system:masters` is an operator; `CN=bulwark-lb-1,
//! O=bulwark:lb` is a component). Everything is written as PEM files with
//! mode 0600 in the PKI's own directory, because the services under test
//! load their TLS material from files, like they do in production (kubeadm's
//! /etc/kubernetes/pki uses the same `.crt`/`.key` naming).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::TestDir;

/// A test certificate authority and the directory its files go to.
///
/// Cheap to clone (shared); harness objects that need TLS take a `&Pki`
/// and issue their own certificates from it, so everything in a test can
/// trust one CA.
#[derive(Clone)]
pub struct Pki {
    inner: Arc<Inner>,
}

struct Inner {
    dir: TestDir,
    ca_path: PathBuf,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.inner.dir.path())
            .finish_non_exhaustive()
    }
}

/// The files of one issued certificate.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// The CA certificate that issued it (PEM), to trust the other side.
    pub ca: PathBuf,
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
}

impl CertFiles {
    /// The same files as bulwark's config type for TLS material.
    pub fn tls_files(&self) -> bulwark_common::tls::TlsFiles {
        bulwark_common::tls::TlsFiles {
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
            ca_file: self.ca.clone(),
        }
    }

    /// The certificate as PEM text.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key as PEM text.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Usage {
    Server,
    Client,
    Peer,
}

impl Pki {
    /// A new CA (`CN=bulwark-test-ca`) in a fresh temporary directory.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_ca_name("bulwark-test-ca")
    }

    /// A new CA with the given common name, e.g. a second, untrusted CA.
    pub fn with_ca_name(common_name: &str) -> anyhow::Result<Self> {
        let dir = TestDir::new("pki")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        let ca_pem = cert.pem();
        let ca_path = dir.join("ca.crt");
        write_private(&ca_path, &ca_pem)?;
        write_private(&dir.join("ca.key"), &key.serialize_pem())?;
        Ok(Self {
            inner: Arc::new(Inner {
                ca_path,
                ca_pem,
                issuer: Issuer::new(params, key),
                dir,
            }),
        })
    }

    /// The directory holding every file of this PKI.
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// The CA certificate file (`ca.crt`).
    pub fn ca_path(&self) -> &Path {
        &self.inner.ca_path
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem(&self) -> &str {
        &self.inner.ca_pem
    }

    /// A server certificate (`serverAuth`) for `name`, valid for `sans`:
    /// each is an IP address if it parses as one, else a DNS name.
    /// Written to `<name>.crt` / `<name>.key`.
    pub fn server(&self, name: &str, sans: &[&str]) -> anyhow::Result<CertFiles> {
        self.issue(name, name, &[], sans, Usage::Server)
    }

    /// A client certificate (`clientAuth`) with `CN=<common_name>` and one
    /// `O=` per entry of `organizations`, e.g. `client("admin",
    /// &["system:masters"])` or `client("bulwark-lb-1", &["bulwark:lb"])`.
    /// Written to `<common_name>.crt` / `.key`.
    pub fn client(&self, common_name: &str, organizations: &[&str]) -> anyhow::Result<CertFiles> {
        self.issue(common_name, common_name, organizations, &[], Usage::Client)
    }

    /// A certificate usable as both server and client (`serverAuth` and
    /// `clientAuth`), as etcd peers and Raft members need; `CN=<name>`,
    /// optional organizations, SANs as in [`Pki::server`].
    pub fn peer(
        &self,
        name: &str,
        organizations: &[&str],
        sans: &[&str],
    ) -> anyhow::Result<CertFiles> {
        self.issue(name, name, organizations, sans, Usage::Peer)
    }

    /// The operator identity kubeadm gives cluster admins:
    /// `CN=admin, O=system:masters`.
    pub fn admin(&self) -> anyhow::Result<CertFiles> {
        self.client("admin", &["system:masters"])
    }

    fn issue(
        &self,
        file_stem: &str,
        common_name: &str,
        organizations: &[&str],
        sans: &[&str],
        usage: Usage,
    ) -> anyhow::Result<CertFiles> {
        anyhow::ensure!(
            !file_stem.is_empty()
                && file_stem
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c))
                && file_stem != "ca",
            "certificate name {file_stem:?} must be a plain file name other than \"ca\""
        );
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans)
            .with_context(|| format!("SANs of certificate {file_stem}"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        // rcgen keys the DN by attribute type, so a second O would replace
        // the first: later ones go in under the same OID (2.5.4.10) spelled
        // as a custom type, which encodes identically.
        for (i, org) in organizations.iter().enumerate() {
            let ty = if i == 0 {
                DnType::OrganizationName
            } else {
                DnType::CustomDnType(vec![2, 5, 4, 10])
            };
            params.distinguished_name.push(ty, *org);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Peer => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &self.inner.issuer)
            .with_context(|| format!("signing certificate {file_stem}"))?;
        let files = CertFiles {
            cert: self.dir().join(format!("{file_stem}.crt")),
            key: self.dir().join(format!("{file_stem}.key")),
            ca: self.inner.ca_path.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.inner.ca_pem.clone(),
        };
        write_private(&files.cert, &files.cert_pem)?;
        write_private(&files.key, &files.key_pem)?;
        Ok(files)
    }
}

/// Writes `contents` to a new file readable only by its owner (0600), as
/// services expect of key material.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
