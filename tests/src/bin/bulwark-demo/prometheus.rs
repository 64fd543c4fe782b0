//! A real Prometheus (Debian's `prometheus`, installed by `cargo xtask
//! setup`) scraping every daemon of the demo with the shipped rules
//! (deploy/monitoring/bulwark.rules.yaml), as an operator's would: the
//! proof that the admin endpoints, the metric names the rules query and the
//! rules themselves work together on a running control plane.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bulwark_testkit::{Process, ProcessBuilder, ports, tools};
use serde_json::Value;

/// One scrape target: the job (the daemon) and its admin address.
pub struct Target {
    pub job: &'static str,
    pub admin: SocketAddr,
}

/// A running Prometheus.
pub struct Prometheus {
    _process: Process,
    pub url: String,
    http: reqwest::Client,
}

/// What the first complete round of scrapes and rule evaluations showed.
pub struct Seen {
    /// Targets whose last scrape succeeded, of all.
    pub up: usize,
    pub targets: usize,
    /// Rules that evaluated without an error, of all.
    pub rules_ok: usize,
    pub rules: usize,
    /// `count by (job) (bulwark_build_info)`.
    pub build_info: Vec<(String, u64)>,
    /// Alerts pending or firing, `name (state)`.
    pub alerts: Vec<String>,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `targets` and
    /// evaluating the shipped rules every second; `None` (after saying so)
    /// where the `prometheus` binary is not installed.
    pub async fn start(dir: &Path, targets: &[Target]) -> anyhow::Result<Option<Self>> {
        let Some(binary) = tools::system_or_skip("prometheus")? else {
            return Ok(None);
        };
        let listen = SocketAddr::from(([127, 0, 0, 1], ports::loopback_port()?));
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, config_text(targets)?)?;
        let process = ProcessBuilder::new("prometheus", binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .spawn()?;
        let prometheus = Self {
            _process: process,
            url: format!("http://{listen}"),
            http: reqwest::Client::new(),
        };
        prometheus.wait_ready().await?;
        Ok(Some(prometheus))
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.http.get(format!("{}/-/ready", self.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Prometheus at {} not ready after 30 s", self.url);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until all `targets` have been discovered and scraped and
    /// every rule evaluated once (at most 60 s), then reports what
    /// Prometheus saw.
    pub async fn first_round(&self, targets: usize) -> anyhow::Result<Seen> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = self.seen().await;
            if let Ok(s) = &seen
                && s.targets == targets
                && s.up == s.targets
                && s.rules_ok == s.rules
                && s.rules > 0
                && s.build_info.iter().map(|(_, n)| *n as usize).sum::<usize>() == targets
            {
                // Alert states come from the last evaluation, which may
                // predate the first scrape: two more evaluations see it.
                tokio::time::sleep(Duration::from_secs(2)).await;
                return self.seen().await;
            }
            if Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn seen(&self) -> anyhow::Result<Seen> {
        let targets = self.api("targets").await?;
        let active = targets["activeTargets"]
            .as_array()
            .context("no activeTargets")?;
        let up = active.iter().filter(|t| t["health"] == "up").count();

        let groups = self.api("rules").await?;
        let rules: Vec<&Value> = groups["groups"]
            .as_array()
            .context("no rule groups")?
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let rules_ok = rules.iter().filter(|r| r["health"] == "ok").count();
        let alerts = rules
            .iter()
            .filter(|r| r["type"] == "alerting" && r["state"] != "inactive")
            .map(|r| format!("{} ({})", r["name"].as_str().unwrap_or("?"), r["state"]))
            .collect();

        let built = self
            .api("query?query=count%20by%20%28job%29%20%28bulwark_build_info%29")
            .await?;
        let build_info = built["result"]
            .as_array()
            .context("no query result")?
            .iter()
            .map(|s| {
                let job = s["metric"]["job"].as_str().unwrap_or("?").to_owned();
                let n = s["value"][1].as_str().and_then(|v| v.parse().ok());
                (job, n.unwrap_or(0))
            })
            .collect();
        Ok(Seen {
            up,
            targets: active.len(),
            rules_ok,
            rules: rules.len(),
            build_info,
            alerts,
        })
    }

    /// `GET /api/v1/<path>`'s `data`.
    async fn api(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1/{path}", self.url);
        let body: Value = serde_json::from_str(&self.http.get(&url).send().await?.text().await?)
            .with_context(|| format!("GET {url}"))?;
        if body["status"] != "success" {
            bail!("GET {url}: {body}");
        }
        Ok(body["data"].clone())
    }
}

/// prometheus.yml: one job per daemon, the shipped rules, 1 s intervals
/// (the shipped rules' `for:` clauses keep alerts pending, not firing, in
/// a run this short).
fn config_text(targets: &[Target]) -> anyhow::Result<String> {
    let rules = tools::workspace_root().join("deploy/monitoring/bulwark.rules.yaml");
    let mut text = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\nscrape_configs:\n",
        rules.display()
    );
    let mut jobs: Vec<&str> = targets.iter().map(|t| t.job).collect();
    jobs.dedup();
    for job in jobs {
        let addrs: Vec<String> = targets
            .iter()
            .filter(|t| t.job == job)
            .map(|t| format!("'{}'", t.admin))
            .collect();
        writeln!(
            text,
            "- job_name: {job}\n  static_configs: [{{targets: [{}]}}]",
            addrs.join(", ")
        )?;
    }
    Ok(text)
}
