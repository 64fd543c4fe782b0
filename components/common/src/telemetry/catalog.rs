//! The metric catalogue each daemon declares once: every metric's name,
//! type and `# HELP` text, and which of its series exist from the start.
//!
//! Why register up front: a series that appears only after its first event
//! makes alerts silent exactly when they matter. `sum(bulwark_backup_leader)
//! != 1` returns nothing (not 0) while no instance has ever led, and
//! `increase(x_total[5m]) > 0` cannot fire on a counter's first increment
//! because there is no earlier sample. So every series whose label values
//! are known at start is created at zero; only series labelled by something
//! known at run time (a backend id, a probe target) appear with their
//! first event, and the catalogue says so.
//!
//! Two cross-cutting metrics carry a `component` label instead of a
//! per-daemon prefix, so one query covers every daemon:
//! `bulwark_build_info{component,version}` and
//! `bulwark_certificate_expiry_timestamp_seconds{component,file,role}`.

use std::path::Path;

use crate::tls::CertFiles;

/// A metric's Prometheus type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (`_total`).
    Counter,
    /// A current value.
    Gauge,
    /// Bucketed durations in seconds ([`super::LATENCY_BUCKETS`]).
    Histogram,
}

impl MetricKind {
    /// The word Prometheus uses in `# TYPE`.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// Which series of a metric exist from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Series {
    /// The one unlabelled series, created at zero.
    Single,
    /// One series per value of one label, each created at zero.
    PerLabel(&'static str, &'static [&'static str]),
    /// Labelled by something known only at run time (a backend id, a probe
    /// target): series appear with their first event. Reserved for metrics
    /// where a zero would be a false statement (a check that is not up).
    Dynamic,
}

/// One metric of a daemon's catalogue.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    /// Full name, with the component prefix.
    pub name: &'static str,
    /// Its type.
    pub kind: MetricKind,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Its series at start.
    pub series: Series,
}

impl MetricDef {
    /// A metric whose one unlabelled series exists from the start.
    pub const fn single(name: &'static str, kind: MetricKind, help: &'static str) -> Self {
        Self {
            name,
            kind,
            help,
            series: Series::Single,
        }
    }

    /// A metric with one series per known value of `label`.
    pub const fn per_label(
        name: &'static str,
        kind: MetricKind,
        help: &'static str,
        label: &'static str,
        values: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            kind,
            help,
            series: Series::PerLabel(label, values),
        }
    }

    /// A metric whose series appear with their first event.
    pub const fn dynamic(name: &'static str, kind: MetricKind, help: &'static str) -> Self {
        Self {
            name,
            kind,
            help,
            series: Series::Dynamic,
        }
    }
}

/// Describes every metric of `defs` (their `# HELP` lines) and creates the
/// series known at start at zero. Creating is `increment(0)` (or a handle
/// for a histogram), so calling it again — several nodes in one test
/// process — never resets a value.
pub fn register(defs: &[MetricDef]) {
    // The recorder must exist before the first series: a series created
    // while none is installed goes to the no-op recorder and is lost (the
    // admin server installs it too, but later).
    let _ = super::metrics_handle();
    for d in defs {
        describe(d);
        match d.series {
            Series::Single => create(d.kind, d.name, &[]),
            Series::PerLabel(label, values) => {
                for value in values {
                    create(d.kind, d.name, &[(label, value)]);
                }
            }
            Series::Dynamic => {}
        }
    }
}

fn describe(d: &MetricDef) {
    match d.kind {
        MetricKind::Counter => metrics::describe_counter!(d.name, d.help),
        MetricKind::Gauge => metrics::describe_gauge!(d.name, d.help),
        MetricKind::Histogram => metrics::describe_histogram!(d.name, d.help),
    }
}

fn create(kind: MetricKind, name: &'static str, labels: &[(&'static str, &'static str)]) {
    let labels: Vec<metrics::Label> = labels
        .iter()
        .map(|(k, v)| metrics::Label::new(*k, *v))
        .collect();
    match kind {
        MetricKind::Counter => metrics::counter!(name, labels).increment(0),
        MetricKind::Gauge => metrics::gauge!(name, labels).increment(0.0),
        MetricKind::Histogram => {
            // Registering the handle is enough: the exporter renders a
            // histogram with no samples as zero counts in every bucket.
            let _ = metrics::histogram!(name, labels);
        }
    }
}

/// `bulwark_build_info{component, version}`: always 1. Joined on
/// `component` and `instance`, it tells which build each daemon runs
/// (a rolling upgrade shows both versions side by side).
pub fn register_build_info(component: &'static str, version: &'static str) {
    let _ = super::metrics_handle();
    metrics::describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels say which component and version this process runs."
    );
    metrics::gauge!(BUILD_INFO, "component" => component, "version" => version).set(1.0);
}

/// Name of the build-info gauge.
pub const BUILD_INFO: &str = "bulwark_build_info";

/// Name of the certificate-expiry gauge.
pub const CERT_EXPIRY: &str = "bulwark_certificate_expiry_timestamp_seconds";

/// Publishes when each certificate of `files` expires, as
/// [`CERT_EXPIRY`]`{component, file, role}` in seconds since the epoch:
/// `role="certificate"` for this side's leaf (the first certificate of
/// `certFile`), `role="ca"` for the CA bundle (its earliest expiry: one
/// expired CA in the bundle is enough to break a chain). A file that
/// cannot be read or parsed is left out with a warning; the daemon's own
/// TLS loading reports it as an error. Pass only the identities the
/// config uses: a warning about a file nothing reads misleads.
pub fn register_certificates(component: &'static str, files: &[CertFiles]) {
    let _ = super::metrics_handle();
    metrics::describe_gauge!(
        CERT_EXPIRY,
        "When the certificate expires (notAfter), in seconds since the Unix epoch; role is certificate (this side's leaf) or ca (earliest in the bundle)."
    );
    for tls in files {
        for (path, role, earliest) in tls.roles() {
            match not_after(path, earliest) {
                Ok(at) => metrics::gauge!(
                    CERT_EXPIRY,
                    "component" => component,
                    "file" => path.display().to_string(),
                    "role" => role,
                )
                .set(at as f64),
                Err(e) => tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "cannot read the certificate's expiry for the metric"
                ),
            }
        }
    }
}

/// The notAfter of the first certificate in `path`, or with `earliest` of
/// every certificate in it, in seconds since the epoch.
pub fn not_after(path: &Path, earliest: bool) -> Result<i64, String> {
    let certs = crate::tls::load_certs(path, "certificate").map_err(|e| e.to_string())?;
    let take = if earliest { certs.len() } else { 1 };
    certs
        .iter()
        .take(take)
        .map(|der| {
            x509_parser::parse_x509_certificate(der.as_ref())
                .map(|(_, c)| c.validity().not_after.timestamp())
                .map_err(|e| format!("{}: not an X.509 certificate: {e}", path.display()))
        })
        .try_fold(i64::MAX, |min, at| at.map(|at| min.min(at)))
}

/// Every metric name with `prefix` that appears as a string literal in the
/// Rust files under `dir`, outside the catalogue itself (the
/// `pub const DEFS: &[MetricDef] = &[ … ];` block): what a catalogue test
/// compares the catalogue with, so a metric added to the code without a
/// `# HELP` line, or one left in the catalogue after the code stopped
/// recording it, fails the tests.
pub fn recorded_names(dir: &Path, prefix: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                names.extend(quoted_names(&without_catalogue(&text), prefix));
            }
        }
    }
    names
}

/// Checks a catalogue against the sources under `dir`: no name declared
/// twice, and the declared names equal [`recorded_names`]. The error lists
/// what differs, for each crate's catalogue test.
pub fn check_against_sources(defs: &[MetricDef], dir: &Path, prefix: &str) -> Result<(), String> {
    let declared: std::collections::BTreeSet<String> =
        defs.iter().map(|d| d.name.to_owned()).collect();
    if declared.len() != defs.len() {
        return Err("a metric is declared twice".into());
    }
    let recorded = recorded_names(dir, prefix);
    if declared == recorded {
        return Ok(());
    }
    let undeclared: Vec<_> = recorded.difference(&declared).collect();
    let unrecorded: Vec<_> = declared.difference(&recorded).collect();
    Err(format!(
        "recorded but not in the catalogue: {undeclared:?}; in the catalogue but never recorded: {unrecorded:?}"
    ))
}

/// `text` less its catalogue block, if it has one.
fn without_catalogue(text: &str) -> String {
    const START: &str = "pub const DEFS: &[MetricDef] = &[";
    match text.find(START) {
        Some(at) => {
            let end = text[at..].find("\n];").map_or(text.len(), |e| at + e);
            format!("{}{}", &text[..at], &text[end..])
        }
        None => text.to_owned(),
    }
}

/// The `"prefix…"` literals of `text` made only of metric-name characters.
fn quoted_names(text: &str, prefix: &str) -> Vec<String> {
    let needle = format!("\"{prefix}");
    text.match_indices(&needle)
        .filter_map(|(at, _)| {
            let rest = &text[at + 1..];
            let name = &rest[..rest.find('"')?];
            (name.len() > prefix.len()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
            .then(|| name.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFS: &[MetricDef] = &[
        MetricDef::single(
            "bulwark_common_catalog_single_total",
            MetricKind::Counter,
            "A test counter.",
        ),
        MetricDef::single(
            "bulwark_common_catalog_gauge",
            MetricKind::Gauge,
            "A test gauge.",
        ),
        MetricDef::single(
            "bulwark_common_catalog_seconds",
            MetricKind::Histogram,
            "A test histogram.",
        ),
        MetricDef::per_label(
            "bulwark_common_catalog_labelled_total",
            MetricKind::Counter,
            "A labelled test counter.",
            "reason",
            &["a", "b"],
        ),
        MetricDef::dynamic(
            "bulwark_common_catalog_dynamic",
            MetricKind::Gauge,
            "A dynamic test gauge.",
        ),
    ];

    #[test]
    fn registered_series_render_at_zero_with_help() {
        let handle = super::super::metrics_handle();
        register(DEFS);
        let text = handle.render();
        for line in [
            "# HELP bulwark_common_catalog_single_total A test counter.",
            "bulwark_common_catalog_single_total 0",
            "# HELP bulwark_common_catalog_gauge A test gauge.",
            "bulwark_common_catalog_gauge 0",
            "bulwark_common_catalog_seconds_count 0",
            "bulwark_common_catalog_labelled_total{reason=\"a\"} 0",
            "bulwark_common_catalog_labelled_total{reason=\"b\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("bulwark_common_catalog_dynamic "), "{text}");
    }

    #[test]
    fn registering_again_keeps_values() {
        let handle = super::super::metrics_handle();
        register(DEFS);
        metrics::gauge!("bulwark_common_catalog_gauge").set(7.0);
        register(DEFS);
        let text = handle.render();
        assert!(
            text.lines().any(|l| l == "bulwark_common_catalog_gauge 7"),
            "{text}"
        );
    }

    #[test]
    fn certificate_expiry_is_the_leaf_and_the_earliest_ca() {
        let pki = crate::test_pki::Pki::new();
        let files = pki.issue(
            "catalog-test",
            "catalog-test",
            &["bulwark:lb"],
            &["127.0.0.1"],
        );
        let leaf = not_after(&files.cert_file, false).unwrap();
        let ca = not_after(&files.ca_file, true).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(leaf > now && ca > now, "leaf {leaf}, ca {ca}, now {now}");

        let handle = super::super::metrics_handle();
        register_certificates("common-test", &[CertFiles::from(&files)]);
        let text = handle.render();
        let file = files.cert_file.display().to_string();
        assert!(
            text.lines().any(|l| l.starts_with(CERT_EXPIRY)
                && l.contains("component=\"common-test\"")
                && l.contains(&format!("file=\"{file}\""))
                && l.contains("role=\"certificate\"")
                && l.ends_with(&format!(" {leaf}"))),
            "{text}"
        );
    }

    #[test]
    fn quoted_metric_names_are_found_and_other_strings_are_not() {
        let text = r#"gauge!("bulwark_x_up").set(1.0); let s = "bulwark_x_up 1"; counter!("bulwark_x_total", "k" => "v")"#;
        assert_eq!(
            quoted_names(text, "bulwark_x_"),
            ["bulwark_x_up", "bulwark_x_total"]
        );
        let with_catalogue = "gauge!(\"bulwark_x_up\");\npub const DEFS: &[MetricDef] = &[\n    single(\"bulwark_x_gone\"),\n];\n";
        assert_eq!(
            quoted_names(&without_catalogue(with_catalogue), "bulwark_x_"),
            ["bulwark_x_up"]
        );
    }

    #[test]
    fn unreadable_certificate_is_an_error_naming_the_file() {
        let e = not_after(Path::new("/nonexistent/x.crt"), false).unwrap_err();
        assert!(e.contains("/nonexistent/x.crt"), "{e}");
    }
}
