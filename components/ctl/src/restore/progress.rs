//! `bulwarkctl restore`'s progress on stderr. On a terminal: a spinner
//! with the phase (bytes downloaded, revision replayed), one bar per node
//! while it fetches the snapshot (bytes of the stored object, rate), and
//! every step as a line above them. Without one (logs, scripts): the same
//! as plain lines, a running transfer or replay at most every
//! [`PLAIN_EVERY`] per node or phase.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{node_line, phase_message};

/// Without a terminal, how often a running transfer or replay is printed.
pub(super) const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The progress display of one restore.
pub(super) struct Progress {
    multi: MultiProgress,
    spinner: ProgressBar,
    /// Each fetching node's bar (terminal only).
    bars: HashMap<String, ProgressBar>,
    tty: bool,
    /// When each running transfer or replay was last printed (plain only).
    printed: HashMap<String, Instant>,
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub(super) fn new() -> Self {
        Self::drawn(std::io::stderr().is_terminal())
    }

    fn drawn(tty: bool) -> Self {
        let target = if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let spinner = multi.add(ProgressBar::new_spinner());
        spinner.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        if tty {
            spinner.enable_steady_tick(Duration::from_millis(200));
        }
        Self {
            multi,
            spinner,
            bars: HashMap::new(),
            tty,
            printed: HashMap::new(),
        }
    }

    /// A line above the bars, or on stderr.
    pub(super) fn say(&self, line: String) {
        if self.tty {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    /// Whether `key`'s running line is due (plain output only).
    fn due(&mut self, key: &str) -> bool {
        let now = Instant::now();
        match self.printed.get(key) {
            Some(at) if now.duration_since(*at) < PLAIN_EVERY => false,
            _ => {
                self.printed.insert(key.to_owned(), now);
                true
            }
        }
    }

    /// A coordinator phase's progress: the spinner's message; without a
    /// terminal, a line now and then while bytes move or deltas replay.
    pub(super) fn phase(&mut self, p: &pb::RestorePhaseProgress) {
        let message = phase_message(p);
        let running = p.transfer.is_some() || p.revision.is_some();
        if !self.tty && running && self.due("phase") {
            self.say(format!("  {message}"));
        }
        self.spinner.set_message(message);
    }

    /// A node's step: a fetch's bytes move its bar (a line now and then
    /// without a terminal); every other event is a line.
    pub(super) fn node(&mut self, n: &pb::NodeRestoreProgress) {
        let transfer = n
            .transfer
            .as_ref()
            .filter(|_| n.status == pb::StepStatus::Running as i32);
        if let Some(t) = transfer {
            if self.tty {
                self.bar(&n.node_name, t);
            } else if self.due(&n.node_name) {
                self.say(node_line(n));
            }
            return;
        }
        if let Some(bar) = self.bars.remove(&n.node_name) {
            bar.finish_and_clear();
        }
        self.printed.remove(&n.node_name);
        self.say(node_line(n));
    }

    fn bar(&mut self, node: &str, t: &pb::TransferProgress) {
        let bar = self.bars.entry(node.to_owned()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "  {prefix} fetch [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(node.to_owned());
            bar
        });
        bar.set_length(t.bytes_total.unwrap_or(t.bytes_done));
        bar.set_position(t.bytes_done);
    }

    /// Clears the spinner and any bar left.
    pub(super) fn finish(&mut self) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
        }
        self.spinner.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetch(node: &str, status: pb::StepStatus, done: u64) -> pb::NodeRestoreProgress {
        pb::NodeRestoreProgress {
            node_name: node.into(),
            step: pb::NodeStep::FetchSnapshot as i32,
            status: status as i32,
            transfer: Some(pb::TransferProgress {
                bytes_done: done,
                bytes_total: Some(1000),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// On a terminal each fetching node has a bar that follows its bytes
    /// and goes when the fetch ends; plain output prints a running fetch
    /// at most every few seconds per node.
    #[test]
    fn a_fetch_moves_its_node_bar_and_plain_lines_are_spaced() {
        let mut p = Progress::drawn(true);
        p.node(&fetch("n0", pb::StepStatus::Running, 100));
        p.node(&fetch("n1", pb::StepStatus::Running, 300));
        p.node(&fetch("n0", pb::StepStatus::Running, 400));
        assert_eq!(p.bars.len(), 2);
        assert_eq!(p.bars["n0"].position(), 400);
        assert_eq!(p.bars["n0"].length(), Some(1000));
        p.node(&fetch("n0", pb::StepStatus::Done, 1000));
        assert!(!p.bars.contains_key("n0") && p.bars.contains_key("n1"));
        p.finish();
        assert!(p.bars.is_empty());

        let mut plain = Progress::drawn(false);
        assert!(plain.due("n0"), "the first running line is printed");
        assert!(!plain.due("n0"), "the next one waits");
        assert!(plain.due("n1"), "per node");
        plain.node(&fetch("n0", pb::StepStatus::Done, 1000));
        assert!(plain.due("n0"), "a finished step starts the spacing again");
        assert!(plain.bars.is_empty(), "no bars without a terminal");
    }
}
