//! A throwaway CA for this crate's unit tests. (Other crates use
//! bulwark-testkit's PKI; this crate sits below it.)

use crate::tls::TlsFiles;

pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test-ca");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), cert.pem()).unwrap();
        Pki {
            dir,
            ca: rcgen::Issuer::new(params, key),
        }
    }

    pub fn issue(&self, name: &str, cn: &str, orgs: &[&str], sans: &[&str]) -> TlsFiles {
        self.issue_for(
            name,
            cn,
            orgs,
            sans,
            vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// [`Pki::issue`] with the given extended key usages.
    pub fn issue_for(
        &self,
        name: &str,
        cn: &str,
        orgs: &[&str],
        sans: &[&str],
        usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
    ) -> TlsFiles {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        // rcgen keys its DN by attribute type, so a second O goes in
        // under the same OID spelled as a custom type.
        for (i, o) in orgs.iter().enumerate() {
            let ty = if i == 0 {
                rcgen::DnType::OrganizationName
            } else {
                rcgen::DnType::CustomDnType(vec![2, 5, 4, 10])
            };
            params.distinguished_name.push(ty, *o);
        }
        params.extended_key_usages = usages;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let files = TlsFiles {
            cert_file: self.dir.path().join(format!("{name}.crt")),
            key_file: self.dir.path().join(format!("{name}.key")),
            ca_file: self.dir.path().join("ca.crt"),
        };
        std::fs::write(&files.cert_file, cert.pem()).unwrap();
        std::fs::write(&files.key_file, key.serialize_pem()).unwrap();
        files
    }
}
