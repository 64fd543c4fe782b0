//! A scenario's report: its head (when, by which command, on what machine,
//! with which settings), and how it is printed and written beside the
//! others as `<out>/<day>-<scenario>.md` and `.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::stats::{kernel, machine_summary};

/// Prints a scenario's report (markdown) and, unless `no_write`, writes it
/// as `<out>/<day>-<scenario>.md` and `.json`, `<day>` being the date of
/// its `head`.
pub(crate) fn publish(
    out: &Path,
    no_write: bool,
    head: &ReportHead,
    scenario: &str,
    md: &str,
    report: &impl Serialize,
) -> anyhow::Result<()> {
    println!("{md}");
    if no_write {
        return Ok(());
    }
    let (md_path, json_path) = write_report(out, &head.date, scenario, md, report)?;
    eprintln!("wrote {} and {}", md_path.display(), json_path.display());
    Ok(())
}

/// Writes a report made at `date` (RFC 3339), its markdown `md` and
/// `report` as JSON, to `<out>/<day>-<scenario>.md` and `.json`; returns
/// the two paths.
pub(crate) fn write_report(
    out: &Path,
    date: &str,
    scenario: &str,
    md: &str,
    report: &impl Serialize,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out)?;
    let stem = format!("{}-{scenario}", &date[..10]);
    let md_path = out.join(format!("{stem}.md"));
    let json_path = out.join(format!("{stem}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(report)?)?;
    std::fs::write(&md_path, md)?;
    Ok((md_path, json_path))
}

/// The head of a scenario's report: when, by which command and on what
/// machine it ran, with which settings.
#[derive(Serialize)]
pub(crate) struct ReportHead {
    date: String,
    command: String,
    machine: BTreeMap<String, String>,
    settings: BTreeMap<String, String>,
}

impl ReportHead {
    /// The head of a report made now by this process's command line.
    pub(crate) fn new(
        machine: BTreeMap<String, String>,
        settings: BTreeMap<String, String>,
    ) -> Self {
        Self {
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine,
            settings,
        }
    }

    /// The value of setting `key`, `?` when there is none.
    pub(crate) fn setting(&self, key: &str) -> &str {
        self.settings.get(key).map(String::as_str).unwrap_or("?")
    }

    /// The report's first lines in markdown: title and date, command,
    /// machine, settings.
    pub(crate) fn markdown(&self, scenario: &str) -> String {
        format!(
            "# {scenario} — {}\n\nCommand: `{}`\n\nMachine: {}\n\nSettings: {}\n\n",
            self.date,
            self.command,
            kv(&self.machine),
            kv(&self.settings)
        )
    }
}

/// `m` as `key=value, …`, leaving out empty values.
pub(crate) fn kv(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The head of a lab scenario's report: which scenario, by which command,
/// on what machine (in one line) and kernel, and when.
#[derive(Serialize)]
pub(crate) struct LabReportHead {
    pub(crate) scenario: &'static str,
    pub(crate) command: String,
    pub(crate) machine: String,
    pub(crate) kernel: String,
    pub(crate) date: String,
}

impl LabReportHead {
    /// The head of `scenario`'s report, made now by this process's command
    /// line.
    pub(crate) fn new(scenario: &'static str) -> Self {
        Self {
            scenario,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: machine_summary(),
            kernel: kernel(),
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }
    }

    /// Writes the report it heads, `report` and its markdown `md`, as
    /// `<out_dir>/<day>-<scenario>.json` and `.md`, and prints `md`.
    pub(crate) fn write(
        &self,
        out_dir: &Path,
        md: &str,
        report: &impl Serialize,
    ) -> anyhow::Result<()> {
        write_report(out_dir, &self.date, self.scenario, md, report)?;
        println!("{md}");
        Ok(())
    }
}
