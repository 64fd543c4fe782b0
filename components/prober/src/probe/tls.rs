//! The client TLS config of a probe group (apiservers, etcd members) that
//! follows its files: kubeadm renews etcd's `healthcheck-client`
//! certificate, and a probe must not start failing a year later for want
//! of a restart. Each new probe connection takes the config current then;
//! kept-alive connections carry on with theirs. The prober spawns
//! [`bulwark_common::tls::reload::follow`] for each source, which looks at
//! the files every few seconds and on SIGHUP and refuses (log line and
//! metric) a change it cannot build a config from.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bulwark_common::tls::TlsError;
use bulwark_common::tls::reload::{Reload, Reloadable};

use super::http::client_config;
use crate::config::ProbeTls;

/// Where a probe takes its client TLS config from at each connection.
#[derive(Clone)]
pub struct ProbeTlsConfig(Arc<ArcSwap<rustls::ClientConfig>>);

impl ProbeTlsConfig {
    /// The config for the next connection.
    pub fn current(&self) -> Arc<rustls::ClientConfig> {
        self.0.load_full()
    }
}

/// A config that never changes (tests, fixed material).
impl From<Arc<rustls::ClientConfig>> for ProbeTlsConfig {
    fn from(config: Arc<rustls::ClientConfig>) -> Self {
        Self(Arc::new(ArcSwap::new(config)))
    }
}

/// A probe group's [`ProbeTls`] files and the config built from them.
pub struct ProbeTlsSource {
    tls: ProbeTls,
    config: ProbeTlsConfig,
    /// The files as last applied.
    contents: Mutex<Vec<Vec<u8>>>,
}

impl ProbeTlsSource {
    /// Reads the files and builds the config; a bad file fails here, at
    /// start.
    pub fn load(tls: &ProbeTls) -> Result<Arc<Self>, TlsError> {
        let config = client_config(tls)?;
        let source = Self {
            tls: tls.clone(),
            config: config.into(),
            contents: Mutex::new(Vec::new()),
        };
        *source.contents.lock().unwrap_or_else(|e| e.into_inner()) =
            read(&source.paths()).unwrap_or_default();
        Ok(Arc::new(source))
    }

    /// The config probes of this group connect with.
    pub fn config(&self) -> ProbeTlsConfig {
        self.config.clone()
    }
}

fn read(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, String> {
    paths
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display())))
        .collect()
}

impl Reloadable for ProbeTlsSource {
    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.tls.ca_file.clone()];
        paths.extend(self.tls.cert_file.iter().cloned());
        paths.extend(self.tls.key_file.iter().cloned());
        paths
    }

    fn reload(&self) -> Reload {
        let mut applied = self.contents.lock().unwrap_or_else(|e| e.into_inner());
        let contents = match read(&self.paths()) {
            Ok(c) => c,
            Err(e) => return Reload::Refused(e),
        };
        if contents == *applied {
            return Reload::Unchanged;
        }
        match client_config(&self.tls) {
            Ok(config) => {
                self.config.0.store(config);
                *applied = contents;
                Reload::Applied
            }
            Err(e) => Reload::Refused(e.to_string()),
        }
    }

    /// The expiry metric follows the renewed files.
    fn applied(&self, component: &'static str) -> String {
        bulwark_common::telemetry::catalog::register_certificates(component, &[(&self.tls).into()]);
        "new probe connections use it".into()
    }

    fn serving(&self) -> String {
        "probes keep the previous files".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewed_client_certificate_is_applied_and_a_broken_one_refused() {
        bulwark_common::tls::install_crypto_provider();
        let pki = bulwark_testkit::Pki::new().unwrap();
        let client = pki.client("healthcheck-client", &[]).unwrap();
        let tls = ProbeTls {
            ca_file: client.ca.clone(),
            cert_file: Some(client.cert.clone()),
            key_file: Some(client.key.clone()),
        };
        let source = ProbeTlsSource::load(&tls).unwrap();
        let config = source.config();
        let first = config.current();
        assert_eq!(source.reload(), Reload::Unchanged);
        assert_eq!(source.paths().len(), 3);

        // Renewed with a new key, as `kubeadm certs renew` does.
        pki.client("healthcheck-client", &[]).unwrap();
        assert_eq!(source.reload(), Reload::Applied);
        let renewed = config.current();
        assert!(!Arc::ptr_eq(&first, &renewed), "probes see the new config");

        // A key that is not the certificate's: refused, the renewed stays.
        let other = pki.client("other", &[]).unwrap();
        std::fs::copy(&other.key, &client.key).unwrap();
        match source.reload() {
            Reload::Refused(reason) => assert!(reason.contains("client certificate"), "{reason}"),
            r => panic!("expected a refusal, got {r:?}"),
        }
        assert!(Arc::ptr_eq(&renewed, &config.current()));
    }
}
