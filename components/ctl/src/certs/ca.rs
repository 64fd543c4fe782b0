//! The CA that `certs issue` and `certs renew` sign with (kubeadm's cluster
//! CA, `/etc/kubernetes/pki/ca.{crt,key}`, by default) and the one place
//! leaf certificates are built.
//!
//! kubeadm writes its CA key as PKCS#1 (`RSA PRIVATE KEY`) or, with
//! `encryptionAlgorithm: ECDSA-*`, as SEC1 (`EC PRIVATE KEY`); ring signs
//! only from PKCS#8, so such a key is rewrapped in memory here (the key
//! itself is unchanged and never written).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{CliError, Exit};

/// What a leaf certificate says: the identity peers authorize (CN the user,
/// each O a group), the names it is valid for, and what it may do.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LeafSpec {
    /// Subject CN.
    pub common_name: String,
    /// Subject O values, in order.
    pub organizations: Vec<String>,
    /// subjectAltName entries: an IP address where one parses, else a DNS name.
    pub sans: Vec<String>,
    /// serverAuth: it serves TLS.
    pub server: bool,
    /// clientAuth: it dials with it.
    pub client: bool,
}

impl LeafSpec {
    /// The usages as `serverAuth,clientAuth`.
    pub fn usages(&self) -> String {
        [(self.server, "serverAuth"), (self.client, "clientAuth")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, u)| *u)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A loaded signing CA.
pub struct ClusterCa {
    cert_path: PathBuf,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    not_after: i64,
}

impl ClusterCa {
    /// Reads the CA certificate and key, and checks that they belong
    /// together, that the certificate is a CA, and that it is valid now.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CliError> {
        let usage = |msg: String| {
            CliError::new(Exit::Usage, msg).hint(
                "run it as root on a control-plane node that has kubeadm's CA key, or pass \
                 --ca-cert and --ca-key",
            )
        };
        let cert_pem = std::fs::read(cert).map_err(|e| {
            usage(format!(
                "cannot read the CA certificate {}: {e}",
                cert.display()
            ))
        })?;
        let key_pem = std::fs::read(key)
            .map_err(|e| usage(format!("cannot read the CA key {}: {e}", key.display())))?;
        let cert_der = CertificateDer::from_pem_slice(&cert_pem)
            .map_err(|e| usage(format!("{} holds no PEM certificate: {e}", cert.display())))?;
        let (_, x509) = X509Certificate::from_der(&cert_der)
            .map_err(|e| usage(format!("{}: not an X.509 certificate: {e}", cert.display())))?;
        if !x509.is_ca() {
            return Err(usage(format!(
                "{} is not a CA certificate (no basicConstraints CA:TRUE)",
                cert.display()
            )));
        }
        if !x509.validity().is_valid() {
            return Err(usage(format!(
                "the CA {} is not valid now (valid until {})",
                cert.display(),
                x509.validity().not_after
            )));
        }
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| usage(format!("{} holds no PEM private key: {e}", key.display())))?;
        let key_pair = signing_key(&key_der)
            .map_err(|e| usage(format!("{} cannot sign: {e}", key.display())))?;
        if key_pair.der_bytes() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(usage(format!(
                "{} is not the key of the CA certificate {} (their public keys differ)",
                key.display(),
                cert.display()
            )));
        }
        let not_after = x509.validity().not_after.timestamp();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key_pair)
            .map_err(|e| usage(format!("{}: {e}", cert.display())))?;
        Ok(Self {
            cert_path: cert.to_owned(),
            cert_der,
            issuer,
            not_after,
        })
    }

    /// The CA certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Whether the PEM bundle at `path` holds this CA (so a daemon trusting
    /// it accepts what this CA signs).
    pub fn is_in_bundle(&self, path: &Path) -> Result<bool, String> {
        let certs =
            bulwark_common::tls::load_certs(path, "CA bundle").map_err(|e| e.to_string())?;
        Ok(certs.contains(&self.cert_der))
    }

    /// Signs `spec` over `public_key`, valid from five minutes ago (clock
    /// skew between nodes) for `days` days, but never past the CA's own
    /// expiry. Returns the PEM certificate.
    pub fn sign(
        &self,
        spec: &LeafSpec,
        public_key: &impl PublicKeyData,
        days: u32,
        now: i64,
    ) -> Result<String, CliError> {
        let failed = |e: rcgen::Error| {
            CliError::new(
                Exit::Usage,
                format!("cannot sign CN={}: {e}", spec.common_name),
            )
        };
        let mut params = CertificateParams::new(spec.sans.clone()).map_err(failed)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
        // rcgen keys the DN by attribute type, so a second O would replace
        // the first: later ones go in under the same OID (2.5.4.10) spelled
        // as a custom type, which encodes identically.
        for (i, org) in spec.organizations.iter().enumerate() {
            let ty = match i {
                0 => DnType::OrganizationName,
                _ => DnType::CustomDnType(vec![2, 5, 4, 10]),
            };
            params.distinguished_name.push(ty, org.as_str());
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = [
            (spec.server, ExtendedKeyUsagePurpose::ServerAuth),
            (spec.client, ExtendedKeyUsagePurpose::ClientAuth),
        ]
        .into_iter()
        .filter_map(|(on, u)| on.then_some(u))
        .collect();
        params.use_authority_key_identifier_extension = true;
        params.serial_number =
            Some(serial().map_err(|e| {
                CliError::new(Exit::Failure, format!("cannot read /dev/urandom: {e}"))
            })?);
        // rcgen does not re-export its time type; adding to its epoch
        // keeps the type unnamed.
        let at = |unix: i64| {
            rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(unix.max(0).unsigned_abs())
        };
        let until = (now + i64::from(days) * 86_400).min(self.not_after);
        params.not_before = at(now - 300);
        params.not_after = at(until);
        let cert = params.signed_by(public_key, &self.issuer).map_err(failed)?;
        Ok(cert.pem())
    }
}

/// A random positive 16-byte serial: two certificates over the same key
/// and subject (a renewal) must still differ in serial.
fn serial() -> std::io::Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A key ring can sign with: PKCS#8 as it is, PKCS#1 (RSA) and SEC1 (EC)
/// wrapped into PKCS#8.
pub fn signing_key(key: &PrivateKeyDer<'_>) -> Result<KeyPair, String> {
    let err = |e: rcgen::Error| format!("unsupported key: {e}");
    match key {
        PrivateKeyDer::Pkcs8(k) => KeyPair::try_from(k.secret_pkcs8_der()).map_err(err),
        PrivateKeyDer::Pkcs1(k) => {
            KeyPair::try_from(pkcs8(RSA_ALGORITHM, k.secret_pkcs1_der())).map_err(err)
        }
        PrivateKeyDer::Sec1(k) => {
            // SEC1 names its curve only optionally; ring checks the one
            // PKCS#8 names against the key, so try the curves it signs with.
            let der = k.secret_sec1_der();
            [EC_P256_ALGORITHM, EC_P384_ALGORITHM]
                .iter()
                .find_map(|alg| KeyPair::try_from(pkcs8(alg, der)).ok())
                .ok_or_else(|| "unsupported EC key (P-256 and P-384 are)".to_owned())
        }
        _ => Err("unsupported private key format".into()),
    }
}

/// AlgorithmIdentifier rsaEncryption, NULL parameters.
const RSA_ALGORITHM: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// AlgorithmIdentifier id-ecPublicKey, prime256v1.
const EC_P256_ALGORITHM: &[u8] = &[
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d,
    0x03, 0x01, 0x07,
];
/// AlgorithmIdentifier id-ecPublicKey, secp384r1.
const EC_P384_ALGORITHM: &[u8] = &[
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22,
];

/// PKCS#8 PrivateKeyInfo (RFC 5208): version 0, the algorithm, the
/// algorithm-specific key as an OCTET STRING.
fn pkcs8(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let body = [
        &[0x02, 0x01, 0x00][..],
        &tlv(0x30, algorithm),
        &tlv(0x04, key),
    ]
    .concat();
    tlv(0x30, &body)
}

/// One DER tag-length-value.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}
