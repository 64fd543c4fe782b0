//! Running `bulwarkctl` the way an operator would, against the demo's
//! context file, and showing its output.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context as _, bail};
use bulwark_testkit::tools;

/// `bulwarkctl --config <file>`.
pub struct Ctl {
    binary: PathBuf,
    config: PathBuf,
}

impl Ctl {
    pub fn new(config: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            binary: tools::bin_path("bulwarkctl")?,
            config: config.to_owned(),
        })
    }

    /// The command line an operator would type (for the narration).
    pub fn shown(&self, args: &[&str]) -> String {
        format!("bulwarkctl {}", args.join(" "))
    }

    async fn output(&self, args: &[&str]) -> anyhow::Result<Output> {
        tokio::process::Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .await
            .with_context(|| format!("running {}", self.shown(args)))
    }

    /// Runs it; its stdout, or an error with its stderr.
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.output(args).await?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                self.shown(args),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs it with `-o json` and parses the output.
    pub async fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.run(&all).await?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}: {text}", self.shown(&all)))
    }

    /// Runs it and prints the command and its output, indented.
    pub async fn show(&self, args: &[&str]) -> anyhow::Result<String> {
        println!("  $ {}", self.shown(args));
        let text = self.run(args).await?;
        for line in text.lines() {
            println!("    {line}");
        }
        Ok(text)
    }
}
