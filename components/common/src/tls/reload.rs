//! Certificate hot reload: a [`TlsMaterial`] follows its three files.
//!
//! A daemon spawns [`TlsMaterial::follow`] for each material it holds. It
//! looks at the files every few seconds and at once on SIGHUP; changed
//! files are parsed and vetted before they replace the current state, so
//! the next handshake of every server and channel built from the material
//! uses them while open connections and their streams carry on untouched.
//!
//! A replacement is refused, with a warning naming the reason and
//! `bulwark_certificate_reloads_total{result="refused"}`, while the old
//! material keeps serving, when it cannot be parsed, when the key is not
//! the certificate's, when the certificate is not valid now, when its
//! identity (CN, O) differs from the one peers admit today, or when it no
//! longer chains to the CA bundle while the old one did. Files are often
//! rewritten one after the other (certificate, then key), so a change that
//! fails is retried at the next look and refused only if it is still the
//! same one then; SIGHUP is an operator asking, and gets an answer at once.

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Parsed, TlsMaterial, provider};

/// `bulwark_certificate_reloads_total{component, file, result}`: changed
/// certificate files applied (`result="applied"`) or refused
/// (`result="refused"`, the old material kept serving).
pub const RELOADS: &str = "bulwark_certificate_reloads_total";

/// How often [`TlsMaterial::follow`] looks at the files in the daemons.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// What one look at the files found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files are what is in use.
    Unchanged,
    /// The files changed and are now in use.
    Applied,
    /// The files changed and cannot be used; the reason.
    Refused(String),
}

impl TlsMaterial {
    /// Reads the files now: unchanged, or vetted and swapped in, or refused
    /// (the current material stays). Logs and counts nothing; see
    /// [`TlsMaterial::follow`].
    pub fn reload(&self) -> Reload {
        let old = self.current.load();
        let contents = match read_all(&self.paths()) {
            Ok(c) => c,
            Err(e) => return Reload::Refused(e),
        };
        if contents[..] == old.contents[..] {
            return Reload::Unchanged;
        }
        let new = match self.files.parse() {
            Ok(p) => p,
            Err(e) => return Reload::Refused(e.to_string()),
        };
        // parse() read the files again; what it read is what is vetted.
        if let Err(e) = vet(&new, &old) {
            return Reload::Refused(e);
        }
        self.current.store(std::sync::Arc::new(new));
        Reload::Applied
    }

    /// Follows the files until `shutdown`, looking every `interval` and on
    /// SIGHUP; logs and counts each change applied or refused, and keeps
    /// the certificate-expiry metric current.
    pub async fn follow(
        self,
        component: &'static str,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        follow(self, component, interval, shutdown).await;
    }

    /// The current leaf's notAfter, RFC 3339 (for log lines).
    fn not_after(&self) -> String {
        let current = self.current.load();
        current
            .chain
            .first()
            .and_then(|der| X509Certificate::from_der(der).ok())
            .map(|(_, c)| c.validity().not_after.to_string())
            .unwrap_or_default()
    }
}

/// TLS material that follows files: what [`follow`] drives.
pub trait Reloadable {
    /// The files it reads; the first names it in logs and metrics.
    fn paths(&self) -> Vec<PathBuf>;
    /// Looks at the files now: unchanged, applied or refused.
    fn reload(&self) -> Reload;
    /// After an applied change: updates what depends on it (the expiry
    /// metric) and describes the new material for the log line.
    fn applied(&self, component: &'static str) -> String;
    /// Describes the material that keeps serving, for a refusal's log line.
    fn serving(&self) -> String;
}

impl<R: Reloadable> Reloadable for std::sync::Arc<R> {
    fn paths(&self) -> Vec<PathBuf> {
        (**self).paths()
    }
    fn reload(&self) -> Reload {
        (**self).reload()
    }
    fn applied(&self, component: &'static str) -> String {
        (**self).applied(component)
    }
    fn serving(&self) -> String {
        (**self).serving()
    }
}

impl Reloadable for TlsMaterial {
    fn paths(&self) -> Vec<PathBuf> {
        let f = &self.files;
        vec![f.cert_file.clone(), f.key_file.clone(), f.ca_file.clone()]
    }

    fn reload(&self) -> Reload {
        TlsMaterial::reload(self)
    }

    fn applied(&self, component: &'static str) -> String {
        crate::telemetry::catalog::register_certificates(component, &[(&self.files).into()]);
        format!("valid until {}", self.not_after())
    }

    fn serving(&self) -> String {
        format!("valid until {}", self.not_after())
    }
}

/// Follows `what`'s files (every [`RELOAD_INTERVAL`] and on SIGHUP) as the
/// task `certificate reload` of `shutdown`: what a daemon does with each
/// certificate it holds.
pub fn spawn_follow<R: Reloadable + Send + 'static>(
    what: R,
    component: &'static str,
    shutdown: &crate::shutdown::Shutdown,
) {
    let follow = follow(what, component, RELOAD_INTERVAL, shutdown.token());
    shutdown.spawn("certificate reload", async move {
        follow.await;
        Ok(())
    });
}

/// Follows `what`'s files until `shutdown`, looking every `interval` and
/// on SIGHUP; logs and counts each change applied or refused.
pub async fn follow<R: Reloadable>(
    what: R,
    component: &'static str,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let paths = what.paths();
    let file = paths
        .first()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let _ = crate::telemetry::metrics_handle();
    metrics::describe_counter!(
        RELOADS,
        "Changed certificate files applied (result=applied) or refused (result=refused: the previous certificate keeps serving)."
    );
    for result in ["applied", "refused"] {
        metrics::counter!(RELOADS, "component" => component, "file" => file.clone(), "result" => result)
            .increment(0);
    }
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; certificate files are still looked at every {interval:?}");
            None
        }
    };
    // A failing change seen once (retried), and one refused already (not
    // reported again until the files change once more); a file that
    // cannot be read counts as its error.
    let mut failing: Option<Contents> = None;
    let mut refused: Option<Contents> = None;
    loop {
        let asked = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => false,
            Some(()) = next_hangup(&mut hangup) => true,
        };
        let seen = read_all(&paths);
        if !asked && refused.as_ref() == Some(&seen) {
            continue;
        }
        match what.reload() {
            Reload::Unchanged => {
                failing = None;
                if asked {
                    tracing::info!(cert = %file, "SIGHUP: certificate files unchanged");
                }
            }
            Reload::Applied => {
                (failing, refused) = (None, None);
                let detail = what.applied(component);
                tracing::info!(cert = %file, %detail, "certificate reloaded: new handshakes use it");
                metrics::counter!(RELOADS, "component" => component, "file" => file.clone(), "result" => "applied").increment(1);
            }
            Reload::Refused(reason) => {
                if !asked && failing.as_ref() != Some(&seen) {
                    // Maybe caught between two writes: look again first.
                    failing = Some(seen);
                    continue;
                }
                tracing::warn!(cert = %file, reason = %reason, serving = %what.serving(), "certificate replacement refused: the previous certificate keeps serving");
                metrics::counter!(RELOADS, "component" => component, "file" => file.clone(), "result" => "refused").increment(1);
                (failing, refused) = (None, Some(seen));
            }
        }
    }
}

async fn next_hangup(hangup: &mut Option<Signal>) -> Option<()> {
    match hangup {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// The files' bytes, or why one cannot be read.
type Contents = Result<Vec<Vec<u8>>, String>;

fn read_all(paths: &[PathBuf]) -> Contents {
    paths
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display())))
        .collect()
}

/// Why `new` must not replace `old`, if it must not. Builds the HTTP/2
/// configs on the way, so the first handshake after the swap finds them.
fn vet(new: &Parsed, old: &Parsed) -> Result<(), String> {
    let ca = new.ca_path.display();
    if let Err(e) =
        rustls::sign::CertifiedKey::from_der(new.chain.clone(), new.key.clone_key(), &provider())
    {
        return Err(match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key is not the certificate's (their public keys differ)".to_owned()
            }
            e => format!("the key cannot be used: {e}"),
        });
    }
    let (_, leaf) = X509Certificate::from_der(&new.chain[0])
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let validity = leaf.validity();
    if !validity.is_valid() {
        return Err(format!(
            "the certificate is not valid now (valid from {} to {})",
            validity.not_before, validity.not_after
        ));
    }
    let (was, is) = (old.identity(), new.identity());
    if let (Ok(was), Ok(is)) = (&was, &is)
        && (was.common_name != is.common_name || was.organizations != is.organizations)
    {
        return Err(format!(
            "the certificate is {is}, the one in use {was}: peers admit by identity, so a \
             new identity needs a restart (is it another component's certificate?)"
        ));
    }
    if old.verify_against_own_ca().is_ok()
        && let Err(e) = new.verify_against_own_ca()
    {
        return Err(format!(
            "the certificate is not issued by a CA in {ca}: {e}"
        ));
    }
    let server = new.server_config(super::H2).map_err(|e| e.to_string())?;
    let client = new.client_config(super::H2).map_err(|e| e.to_string())?;
    let _ = new.server_h2.set(std::sync::Arc::new(server));
    let _ = new.client_h2.set(std::sync::Arc::new(client));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::Pki;

    fn reloads(component: &str, result: &str) -> u64 {
        let text = crate::telemetry::metrics_handle().render();
        let (component, result) = (
            format!("component=\"{component}\""),
            format!("result=\"{result}\""),
        );
        text.lines()
            .find(|l| l.starts_with(RELOADS) && l.contains(&component) && l.contains(&result))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn a_good_replacement_is_applied_and_bad_ones_are_refused() {
        let pki = Pki::new();
        let files = pki.issue("srv", "lb-1", &["bulwark:lb"], &["127.0.0.1"]);
        let tls = files.load().unwrap();
        assert_eq!(tls.reload(), Reload::Unchanged);
        let first_key = std::fs::read(&files.key_file).unwrap();

        // Same identity, new key and certificate: applied.
        pki.issue("srv", "lb-1", &["bulwark:lb"], &["127.0.0.1", "10.0.0.1"]);
        assert_eq!(tls.reload(), Reload::Applied);
        assert!(tls.server_h2().is_ok() && tls.client_h2().is_ok());
        let good = [
            std::fs::read(&files.cert_file).unwrap(),
            std::fs::read(&files.key_file).unwrap(),
        ];

        let refused = |tls: &TlsMaterial| match tls.reload() {
            Reload::Refused(reason) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        };
        // Corrupt.
        std::fs::write(&files.cert_file, "-----BEGIN CERTIFICATE-----\nxx\n").unwrap();
        let reason = refused(&tls);
        assert!(reason.contains("srv.crt"), "{reason}");
        // Key of another certificate.
        std::fs::write(&files.cert_file, &good[0]).unwrap();
        std::fs::write(&files.key_file, &first_key).unwrap();
        assert!(refused(&tls).contains("the key is not the certificate's"));
        // Another component's certificate, with its own key.
        let other = pki.issue("other", "prober-1", &["bulwark:probers"], &[]);
        std::fs::copy(&other.cert_file, &files.cert_file).unwrap();
        std::fs::copy(&other.key_file, &files.key_file).unwrap();
        assert!(refused(&tls).contains("peers admit by identity"));
        // From another CA.
        let other_ca = Pki::new();
        let stranger = other_ca.issue("x", "lb-1", &["bulwark:lb"], &["127.0.0.1"]);
        std::fs::copy(&stranger.cert_file, &files.cert_file).unwrap();
        std::fs::copy(&stranger.key_file, &files.key_file).unwrap();
        assert!(refused(&tls).contains("is not issued by a CA in"));

        // Through all of it the applied material stayed.
        std::fs::write(&files.cert_file, &good[0]).unwrap();
        std::fs::write(&files.key_file, &good[1]).unwrap();
        assert_eq!(tls.reload(), Reload::Unchanged);
        assert_eq!(tls.identity().unwrap().ip_addresses.len(), 2);
    }

    /// A log writer the test reads back.
    #[derive(Clone, Default)]
    struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Log {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    // Current-thread runtime: the follower logs to this thread's subscriber.
    #[tokio::test]
    async fn follow_waits_out_a_half_written_change_refuses_a_lasting_one_and_answers_sighup() {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = crate::telemetry::subscriber(
            &crate::telemetry::LoggingConfig::default(),
            move || writer.clone(),
            false,
        )
        .unwrap();
        let _guard = tracing::subscriber::set_default(subscriber);
        let pki = Pki::new();
        let files = pki.issue("srv", "lb-1", &["bulwark:lb"], &["127.0.0.1"]);
        let tls = files.load().unwrap();
        let component = "reload-test";
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tls.clone().follow(
            component,
            Duration::from_millis(300),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(reloads(component, "applied"), 0, "registered at zero");

        // The certificate first, the key a moment later (renew --new-key):
        // the follower may see the mismatch once, and applies the pair.
        let next = pki.issue("next", "lb-1", &["bulwark:lb"], &["127.0.0.1"]);
        std::fs::copy(&next.cert_file, &files.cert_file).unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        std::fs::copy(&next.key_file, &files.key_file).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while reloads(component, "applied") < 1 {
            assert!(tokio::time::Instant::now() < deadline, "not applied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(reloads(component, "refused"), 0);

        // A corrupt file that stays: refused once, however long it stays.
        std::fs::write(&files.cert_file, "garbage").unwrap();
        while reloads(component, "refused") < 1 {
            assert!(tokio::time::Instant::now() < deadline, "not refused");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(reloads(component, "refused"), 1);
        let text = log.text();
        assert_eq!(text.matches("certificate reloaded").count(), 1, "{text}");
        assert_eq!(
            text.matches("certificate replacement refused").count(),
            1,
            "{text}"
        );
        assert!(text.contains("srv.crt holds no PEM certificate"), "{text}");

        // SIGHUP: looked at now, not at the next tick.
        shutdown.cancel();
        task.await.unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tls.clone().follow(
            component,
            Duration::from_secs(3600),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A new pair at the same paths (replacing the corrupt file).
        pki.issue("srv", "lb-1", &["bulwark:lb"], &["127.0.0.1"]);
        // SAFETY: kill(2) on our own pid with a signal we handle.
        let rc = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
        assert_eq!(rc, 0);
        while reloads(component, "applied") < 2 {
            assert!(tokio::time::Instant::now() < deadline, "SIGHUP ignored");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        task.await.unwrap();
    }
}
