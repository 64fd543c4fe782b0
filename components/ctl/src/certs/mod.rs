//! `bulwarkctl certs`: `issue` and `renew` bulwark's certificates from the
//! cluster CA (issue.rs, signing in ca.rs), and `check` them.
//!
//! `check`: on a node, every certificate the daemons'
//! configs name, checked the way each daemon checks it at start (key
//! match, chain to the CA, usages, SANs against the addresses peers dial,
//! the identity peers admit), with the expiry of each and the days left.
//!
//! It reads the configs the static pods use (`/etc/bulwark/{lb,prober,
//! backup}.yaml` by default) and runs each daemon's own `--check-config`
//! validation, so a certificate this command passes is one the daemon
//! starts with; the expiry figures are the ones the
//! `bulwark_certificate_expiry_timestamp_seconds` metric exports.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bulwark_common::config::{
    ComponentConfig, ConfigError, Overrides, check_offline, load_checked,
};
use bulwark_common::telemetry::catalog::not_after;
use bulwark_common::tls::CertFiles;
use serde::Serialize;

use crate::error::{CliError, Exit};
use crate::output::{self, OutputFormat};

mod ca;
mod issue;

pub use issue::{CaArgs, IssueArgs, Outcome, RenewArgs};

/// `bulwarkctl certs …`
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Check every certificate the daemon configs in DIR name: key match,
    /// chain, usages, SANs, identity and expiry. Exits 7 when a daemon
    /// would refuse one or one expires within --warn-days.
    Check(CheckArgs),
    /// Issue the certificates the daemon configs name from the cluster CA,
    /// with the CN, O, SANs and usages each config needs; or, with
    /// --operator NAME, an operator's (O=bulwark:operators, which grants
    /// nothing in Kubernetes). Keys are 0600; existing files are kept
    /// unless --force.
    Issue(IssueArgs),
    /// Renew existing certificates in place: same subject, SANs, usages
    /// and key (unless --new-key), a new expiry. The daemons pick the new
    /// files up without a restart.
    Renew(RenewArgs),
}

/// `bulwarkctl certs check`'s arguments.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Where the daemon configs are (lb.yaml, prober.yaml, backup.yaml;
    /// the ones present are checked).
    #[arg(long, value_name = "DIR", default_value = "/etc/bulwark")]
    pub dir: PathBuf,
    /// Report a certificate that expires within this many days as a
    /// problem.
    #[arg(long, value_name = "DAYS", default_value_t = 30)]
    pub warn_days: u32,
}

/// One certificate file and its expiry.
#[derive(Debug, Serialize)]
pub struct CertRow {
    pub config: String,
    pub field: String,
    pub role: &'static str,
    pub file: String,
    /// RFC 3339; null when the file cannot be read.
    pub not_after: Option<String>,
    pub days_left: Option<i64>,
}

/// What `check` found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub certificates: Vec<CertRow>,
    /// Every problem, `config: field: message`.
    pub problems: Vec<String>,
}

/// Runs `bulwarkctl certs …`.
pub fn run(cmd: &CertsCommand, format: OutputFormat) -> Result<(), CliError> {
    match cmd {
        CertsCommand::Issue(args) => {
            output::print(format, &issue::issue(args, now())?, issue::render)
        }
        CertsCommand::Renew(args) => {
            output::print(format, &issue::renew(args, now())?, issue::render)
        }
        CertsCommand::Check(args) => {
            let report = check(args, now())?;
            output::print(format, &report, render)?;
            match report.problems.is_empty() {
                true => Ok(()),
                false => Err(CliError::new(
                    Exit::VerifyFailed,
                    format!(
                        "{} problem(s) in the daemon configs and the files they name",
                        report.problems.len()
                    ),
                )),
            }
        }
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Checks the configs present in `args.dir` as of `now` (Unix seconds).
pub fn check(args: &CheckArgs, now: i64) -> Result<Report, CliError> {
    let mut report = Report {
        certificates: Vec::new(),
        problems: Vec::new(),
    };
    let mut found = 0;
    for name in ["lb.yaml", "prober.yaml", "backup.yaml"] {
        let path = args.dir.join(name);
        if !path.exists() {
            continue;
        }
        found += 1;
        let files = match name {
            "lb.yaml" => daemon(
                &path,
                &mut report,
                bulwark_lb::config::LbConfig::certificates,
            ),
            "prober.yaml" => daemon(
                &path,
                &mut report,
                bulwark_prober::ProberConfig::certificates,
            ),
            _ => daemon(
                &path,
                &mut report,
                bulwark_backup::BackupConfig::certificates,
            ),
        };
        for (field, tls) in files {
            expiry(name, field, &tls, now, args.warn_days, &mut report);
        }
    }
    if found == 0 {
        return Err(CliError::new(
            Exit::Usage,
            format!(
                "no lb.yaml, prober.yaml or backup.yaml in {}",
                args.dir.display()
            ),
        )
        .hint("run it on a control-plane node, or pass --dir with the daemon configs"));
    }
    Ok(report)
}

/// Loads one daemon config the way the daemon does at start (preflight
/// included) and records its problems; returns its certificate files.
/// Without a config that parses, the files are unknown (its errors say
/// why).
fn daemon<T: ComponentConfig>(
    path: &Path,
    report: &mut Report,
    files: impl FnOnce(&T) -> Vec<(&'static str, CertFiles)>,
) -> Vec<(&'static str, CertFiles)> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let e = match load_checked::<T>(Some(path), &Overrides::new()) {
        Ok(loaded) => return files(&loaded.config),
        Err(e) => e,
    };
    report.problems.extend(config_problems(&name, &e));
    // A config refused only for files it cannot read still says which
    // certificates it wants: list them (their rows show what is missing).
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| check_offline::<T>(&text).ok())
        .map(|loaded| files(&loaded.config))
        .unwrap_or_default()
}

/// One row per certificate and CA file of `tls`; an expiry within
/// `warn_days` (or past) is a problem.
fn expiry(
    config: &str,
    field: &str,
    tls: &CertFiles,
    now: i64,
    warn_days: u32,
    report: &mut Report,
) {
    for (file, role, earliest) in tls.roles() {
        let at = not_after(file, earliest);
        let days_left = at.as_ref().ok().map(|t| (t - now).div_euclid(86_400));
        if let Some(d) = days_left
            && d < i64::from(warn_days)
        {
            let when = if d < 0 {
                format!("expired {} days ago", -d)
            } else {
                format!("expires in {d} days (--warn-days {warn_days})")
            };
            report.problems.push(format!(
                "{config}: {field}: {} ({role}) {when}: renew it",
                file.display()
            ));
        }
        report.certificates.push(CertRow {
            config: config.to_owned(),
            field: field.to_owned(),
            role,
            file: file.display().to_string(),
            not_after: at.ok().map(rfc3339),
            days_left,
        });
    }
}

/// A certificate file's notAfter, RFC 3339.
fn file_not_after(path: &Path) -> Option<String> {
    not_after(path, false).ok().map(rfc3339)
}

/// A refused config's problems, one a line, each led by the file's name:
/// one per field, or the error itself when no field is to blame.
fn config_problems(name: &str, e: &ConfigError) -> Vec<String> {
    let errors = e.field_errors();
    if errors.is_empty() {
        return vec![format!("{name}: {e}")];
    }
    errors.iter().map(|f| format!("{name}: {f}")).collect()
}

fn output_table(header: &[&str], rows: &[Vec<String>]) -> String {
    output::table(header, rows)
}

fn rfc3339(unix: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn render(r: &Report) -> String {
    let rows: Vec<Vec<String>> = r
        .certificates
        .iter()
        .map(|c| {
            vec![
                c.config.clone(),
                c.field.clone(),
                c.role.to_owned(),
                c.file.clone(),
                c.not_after.clone().unwrap_or_else(|| "-".into()),
                c.days_left.map_or_else(|| "-".into(), |d| d.to_string()),
            ]
        })
        .collect();
    let mut text = output::table(
        &["CONFIG", "FIELD", "ROLE", "FILE", "NOT AFTER", "DAYS LEFT"],
        &rows,
    );
    match r.problems.is_empty() {
        true => text.push_str("\nno problems: every daemon would start with these certificates\n"),
        false => {
            text.push_str("\nPROBLEMS\n");
            for p in &r.problems {
                text.push_str(&format!("  {p}\n"));
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb_config(dir: &Path, cert: &bulwark_testkit::CertFiles) {
        use bulwark_testkit::config as tk;
        let mut c = tk::lb(1);
        c.raft.address = "127.0.0.1:9441".parse().unwrap();
        c.api.address = "127.0.0.1:9442".parse().unwrap();
        c.tls = tk::tls(cert);
        c.access.peers = Some(tk::orgs(&["bulwark:lb"]));
        tk::write(dir.join("lb.yaml"), &c).unwrap();
    }

    #[test]
    fn a_good_certificate_shows_its_expiry_and_no_problem() {
        let pki = bulwark_testkit::Pki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        lb_config(
            dir.path(),
            &pki.peer("lb-1", &["bulwark:lb"], &["127.0.0.1"]).unwrap(),
        );
        let args = CheckArgs {
            dir: dir.path().to_owned(),
            warn_days: 30,
        };
        let r = check(&args, now()).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.certificates.len(), 2, "the leaf and the CA");
        let leaf = &r.certificates[0];
        assert_eq!(
            (leaf.config.as_str(), leaf.field.as_str(), leaf.role),
            ("lb.yaml", "tls", "certificate")
        );
        assert!(leaf.days_left.is_some_and(|d| d > 30), "{leaf:?}");

        // The same certificate, seen from a day after its expiry.
        let later = now() + 86_400 * (leaf.days_left.unwrap() + 2);
        let r = check(&args, later).unwrap();
        assert!(
            r.problems.iter().any(|p| p.starts_with("lb.yaml: tls: ")
                && p.contains("(certificate) expired 2 days ago")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn another_components_certificate_is_named_with_every_reason() {
        let pki = bulwark_testkit::Pki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        lb_config(
            dir.path(),
            &pki.client("prober-1", &["bulwark:probers"]).unwrap(),
        );
        let args = CheckArgs {
            dir: dir.path().to_owned(),
            warn_days: 30,
        };
        let r = check(&args, now()).unwrap();
        let all = r.problems.join("\n");
        assert!(
            all.contains("lb.yaml: tls.certFile: ") && all.contains("lacks the serverAuth"),
            "{all}"
        );
        assert!(all.contains("access.peers"), "{all}");
    }

    #[test]
    fn a_directory_without_configs_is_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = check(
            &CheckArgs {
                dir: dir.path().to_owned(),
                warn_days: 30,
            },
            now(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("no lb.yaml, prober.yaml or backup.yaml"),
            "{e}"
        );
    }
}
