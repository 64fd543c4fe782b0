//! Logs and metrics: `tracing` as text or JSON, and a Prometheus recorder
//! for the `metrics` facade whose output the admin server's `/metrics` serves.
//!
//! - [`catalog`]: each daemon's declared metrics (`# HELP`, series created
//!   at zero), build info and certificate expiry;
//! - [`process`]: the standard `process_*` metrics, read at scrape time;
//! - [`scrape`]: counters the data path keeps itself, published into the
//!   recorder at scrape time.

pub mod catalog;
pub mod process;
pub mod scrape;

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{Validate, Validator};

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal or `kubectl logs`.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The `logging:` section every daemon's config has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoggingConfig {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter: a level (`info`) or directives
    /// (`info,bulwark_lb::raft=debug`).
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".into()
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

impl Validate for LoggingConfig {
    fn validate(&self, v: &mut Validator) {
        if let Err(e) = EnvFilter::try_new(&self.level) {
            v.at("level", |v| {
                v.error(format!(
                    "invalid filter {:?} ({e}): expected a level such as \"info\" or directives such as \"info,bulwark_lb=debug\"",
                    self.level
                ));
            });
        }
    }
}

/// Installs the global `tracing` subscriber on stderr. Call once, early in
/// `main`. Colour codes are written only when stderr is a terminal: under
/// the kubelet or redirected to a file they would be noise in every line.
pub fn init_logging(config: &LoggingConfig) -> anyhow::Result<()> {
    let ansi = std::io::stderr().is_terminal();
    subscriber(config, std::io::stderr, ansi)?.try_init()?;
    Ok(())
}

/// The subscriber [`init_logging`] installs, writing to `writer`, with
/// colour only when `ansi` is set (text format; JSON never has any).
pub fn subscriber<W>(
    config: &LoggingConfig,
    writer: W,
    ansi: bool,
) -> anyhow::Result<impl tracing::Subscriber + Send + Sync + 'static>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(effective_filter(&config.level))?;
    let layer: Box<dyn Layer<Registry> + Send + Sync> = match config.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
    };
    Ok(tracing_subscriber::registry().with(layer).with(filter))
}

/// Crates whose info level is too chatty for an operator's log: openraft
/// logs its whole state at info on every start and election. They log at
/// warn unless the operator's filter names them.
const QUIET_BY_DEFAULT: &[&str] = &["openraft"];

/// The operator's filter with [`QUIET_BY_DEFAULT`] crates at `warn`
/// unless it says otherwise about them.
pub fn effective_filter(level: &str) -> String {
    let mut directives: Vec<String> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect();
    for krate in QUIET_BY_DEFAULT {
        let named = directives.iter().any(|d| {
            d.split(['=', '[', ':'])
                .next()
                .is_some_and(|target| target == *krate)
        });
        if !named {
            directives.push(format!("{krate}=warn"));
        }
    }
    directives.join(",")
}

/// Bucket bounds, in seconds, of every histogram bulwark records.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder, installed on first use. Several
/// nodes in one test process share it, which is why this is not an
/// install-or-fail call.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Without buckets the exporter renders histograms as summaries,
            // which cannot be aggregated across nodes. Every bulwark
            // histogram is a duration in seconds (probe latency, failover
            // time, snapshot duration), so one set of bounds fits them all.
            let recorder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness);
            // ours then only renders what it was given, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_level_is_rejected_with_the_field() {
        let cfg = LoggingConfig {
            level: "info,[".into(),
            ..Default::default()
        };
        let errs = crate::config::validate_at("logging", &cfg);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0]
                .to_string()
                .starts_with("logging.level: invalid filter"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn openraft_is_quiet_unless_the_filter_names_it() {
        assert_eq!(effective_filter("info"), "info,openraft=warn");
        assert_eq!(
            effective_filter("debug, bulwark_lb=trace"),
            "debug,bulwark_lb=trace,openraft=warn"
        );
        assert_eq!(effective_filter("info,openraft=info"), "info,openraft=info");
        assert_eq!(
            effective_filter("info,openraft::engine=debug"),
            "info,openraft::engine=debug"
        );
        // A crate whose name only starts with it is another crate.
        assert_eq!(
            effective_filter("openraft_extra=debug"),
            "openraft_extra=debug,openraft=warn"
        );
    }

    /// A file, as the kubelet's log capture or `2> file` is: never a
    /// terminal, so no colour, and openraft's info lines are filtered out
    /// while bulwark's come through.
    #[test]
    fn text_logs_to_a_file_have_no_colour_codes_and_no_openraft_info() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let writer = file.reopen().unwrap();
        assert!(!writer.is_terminal());
        let ansi = writer.is_terminal();
        let writer = std::sync::Mutex::new(writer);
        let subscriber = subscriber(&LoggingConfig::default(), writer, ansi).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("check", target = "t1");
            let _in = span.enter();
            tracing::warn!(target: "bulwark_prober::check", reason = "refused", "check down");
            tracing::info!(target: "openraft::engine", "a page of raft state");
            tracing::warn!(target: "openraft::engine", "a raft warning");
        });
        let text = std::fs::read_to_string(file.path()).unwrap();
        assert!(!text.contains('\u{1b}'), "colour codes in a file: {text:?}");
        assert!(text.contains("check down"), "{text}");
        assert!(text.contains("check{target=\"t1\"}"), "{text}");
        assert!(!text.contains("a page of raft state"), "{text}");
        assert!(text.contains("a raft warning"), "{text}");
    }

    #[test]
    fn histograms_render_with_buckets() {
        let handle = metrics_handle();
        metrics::histogram!("bulwark_common_test_seconds").record(0.003);
        let text = handle.render();
        assert!(
            text.contains("bulwark_common_test_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn metrics_render_in_prometheus_format() {
        let handle = metrics_handle();
        metrics::counter!("bulwark_common_test_total", "kind" => "x").increment(2);
        let text = handle.render();
        assert!(
            text.contains("bulwark_common_test_total{kind=\"x\"} 2"),
            "{text}"
        );
    }
}
