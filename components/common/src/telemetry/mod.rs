//! Logs and metrics: `tracing` as text or JSON, and a Prometheus recorder
//! for the `metrics` facade whose output the admin server's `/metrics` serves.
//!
//! - [`catalog`]: each daemon's declared metrics (`# HELP`, series created
//!   at zero), build info and certificate expiry;
//! - [`process`]: the standard `process_*` metrics, read at scrape time.

pub mod catalog;
pub mod process;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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

/// Installs the global `tracing` subscriber. Call once, early in `main`.
pub fn init_logging(config: &LoggingConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.level)?;
    let registry = tracing_subscriber::registry().with(filter);
    match config.format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()?,
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
    }
    Ok(())
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
