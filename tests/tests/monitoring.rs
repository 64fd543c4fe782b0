//! `deploy/monitoring/` works as shipped, checked with the real Prometheus
//! tools (Debian's `prometheus` package, installed by `cargo xtask setup`):
//!
//! - `promtool check rules` accepts the rules, and `promtool test rules`
//!   passes the unit tests in `deploy/monitoring/tests/`, where every
//!   alert fires on series that should fire it and resolves afterwards
//!   (checked here: each alert has both kinds of case);
//! - the PrometheusRule holds exactly the rules file's groups;
//! - every metric the rules and the Grafana dashboard query is one the
//!   daemons record (the names are read from their sources);
//! - docs/OPERATIONS.md's alert table lists exactly the shipped alerts;
//! - the PodMonitor scrapes the port name the static pods declare.

// Test code: a failed expectation panics with the file and field in the message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use bulwark_common::telemetry::catalog::{BUILD_INFO, CERT_EXPIRY, recorded_names};
use bulwark_common::telemetry::process;
use bulwark_common::tls::reload::RELOADS;
use bulwark_testkit::tools;
use serde_yaml_ng::Value;

fn dir() -> PathBuf {
    tools::workspace_root().join("deploy/monitoring")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn promtool(args: &[&str]) {
    let promtool = tools::system("promtool").unwrap();
    let out = Command::new(promtool)
        .current_dir(dir())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rules() -> Vec<Value> {
    let file = yaml(&dir().join("bulwark.rules.yaml"));
    file["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().clone())
        .collect()
}

fn alert_names() -> BTreeSet<String> {
    rules()
        .iter()
        .map(|r| r["alert"].as_str().unwrap().to_owned())
        .collect()
}

fn test_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir().join("tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    promtool(&["check", "rules", "bulwark.rules.yaml"]);
    let files: Vec<String> = test_files()
        .iter()
        .map(|p| format!("tests/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    assert!(
        !files.is_empty(),
        "no rule unit tests in deploy/monitoring/tests"
    );
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    promtool(&args);
}

#[test]
fn every_alert_is_tested_firing_and_quiet() {
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for file in test_files() {
        for test in yaml(&file)["tests"].as_sequence().unwrap() {
            for case in test["alert_rule_test"].as_sequence().unwrap() {
                let name = case["alertname"].as_str().unwrap().to_owned();
                let expected = case["exp_alerts"].as_sequence().unwrap();
                if expected.is_empty() {
                    quiet.insert(name);
                } else {
                    fires.insert(name);
                }
            }
        }
    }
    let alerts = alert_names();
    let untested: Vec<_> = alerts.difference(&fires).collect();
    assert!(
        untested.is_empty(),
        "alerts never tested firing: {untested:?}"
    );
    let unresolved: Vec<_> = alerts.difference(&quiet).collect();
    assert!(
        unresolved.is_empty(),
        "alerts never tested quiet (before firing or after resolving): {unresolved:?}"
    );
}

#[test]
fn the_prometheus_rule_holds_the_same_groups() {
    let plain = yaml(&dir().join("bulwark.rules.yaml"));
    let cr = yaml(&dir().join("prometheusrule.yaml"));
    assert_eq!(cr["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(
        cr["spec"]["groups"], plain["groups"],
        "prometheusrule.yaml's spec.groups differ from bulwark.rules.yaml's groups"
    );
}

/// The `bulwark_…` and `process_…` names an expression mentions.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if word_start && (expr[i..].starts_with("bulwark_") || expr[i..].starts_with("process_")) {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |e| i + e);
            names.insert(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// Every metric name the daemons can expose: what their sources record,
/// histogram series suffixes, the shared metrics and the process metrics.
fn exposed_names() -> BTreeSet<String> {
    let components = tools::workspace_root().join("components");
    let mut names = BTreeSet::new();
    for (krate, prefix) in [
        ("lb", "bulwark_lb_"),
        ("prober", "bulwark_prober_"),
        ("backup", "bulwark_backup_"),
    ] {
        for name in recorded_names(&components.join(krate).join("src"), prefix) {
            for suffix in ["_bucket", "_count", "_sum"] {
                names.insert(format!("{name}{suffix}"));
            }
            names.insert(name);
        }
    }
    names.extend([CERT_EXPIRY, BUILD_INFO, RELOADS].map(str::to_owned));
    names.extend(process::METRICS.iter().map(|(name, ..)| (*name).to_owned()));
    names
}

#[test]
fn rules_and_dashboard_query_only_metrics_the_daemons_expose() {
    let exposed = exposed_names();
    let mut queried = BTreeSet::new();
    for rule in rules() {
        queried.extend(metric_names(rule["expr"].as_str().unwrap()));
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&dir().join("grafana-dashboard.json"))).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    let unknown: Vec<_> = queried.difference(&exposed).collect();
    assert!(unknown.is_empty(), "queried but never exposed: {unknown:?}");
}

#[test]
fn the_operations_alert_table_lists_the_shipped_alerts() {
    let ops = read(&tools::workspace_root().join("docs/OPERATIONS.md"));
    let section = ops
        .split("\n## Alerts")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/OPERATIONS.md has an Alerts section");
    let documented: BTreeSet<String> = section
        .lines()
        .filter(|l| l.starts_with("| Bulwark"))
        .map(|l| {
            l.trim_start_matches("| ")
                .split(' ')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(documented, alert_names());
}

#[test]
fn the_pod_monitor_scrapes_the_port_every_static_pod_names() {
    let pm = yaml(&dir().join("podmonitor.yaml"));
    assert_eq!(pm["kind"].as_str(), Some("PodMonitor"));
    let port = pm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let selected: BTreeSet<&str> = pm["spec"]["selector"]["matchExpressions"][0]["values"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for daemon in ["bulwark-lb", "bulwark-prober", "bulwark-backup"] {
        let pod = yaml(
            &tools::workspace_root()
                .join("deploy/manifests")
                .join(format!("{daemon}.yaml")),
        );
        assert!(selected.contains(pod["metadata"]["labels"]["component"].as_str().unwrap()));
        let container = &pod["spec"]["containers"][0];
        let ports = container["ports"].as_sequence().unwrap();
        let named = ports.iter().find(|p| p["name"].as_str() == Some(port));
        let named = named.unwrap_or_else(|| panic!("{daemon} has no port named {port}"));
        let probe_port = container["livenessProbe"]["httpGet"]["port"].as_u64();
        assert_eq!(
            named["containerPort"].as_u64(),
            probe_port,
            "{daemon}: the metrics port is not the admin port the kubelet probes"
        );
    }
}

#[test]
fn metric_names_are_read_from_expressions() {
    let names = metric_names(
        "sum by (le) (rate(bulwark_lb_x_bucket[5m])) / on() my_bulwark_y + process_open_fds",
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "bulwark_lb_x_bucket".to_owned(),
            "process_open_fds".to_owned()
        ])
    );
}
