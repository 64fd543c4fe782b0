//! How long each part of a restore took: the coordinator's phases (plan,
//! download with its checks and the build, prepare, restore
//! members, start members, check) and every node's steps (fetch, stop,
//! wait stopped, set aside, restore, start, healthy) as their events pass
//! through the coordinator. Each is logged when it ends, exported as a
//! gauge, and listed in the summary.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bulwark_api::backup::v1 as pb;

/// The clock of one restore.
#[derive(Debug, Default)]
pub(super) struct Timings {
    current: Option<(String, Instant)>,
    steps: HashMap<(String, i32), Instant>,
    done: Vec<pb::PhaseTiming>,
}

fn proto(d: Duration) -> Option<prost_types::Duration> {
    bulwark_api::time::duration_to_proto(d).ok()
}

/// `RESTORE_PHASE_DOWNLOAD` → `download`.
pub(super) fn phase_label(p: pb::RestorePhase) -> String {
    p.as_str_name()
        .trim_start_matches("RESTORE_PHASE_")
        .to_lowercase()
}

fn step_label(step: i32) -> String {
    pb::NodeStep::try_from(step)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("NODE_STEP_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| format!("step_{step}"))
}

impl Timings {
    /// A clock whose finished phases and steps begin with `earlier` (a
    /// restore finished by another run of the coordinator).
    pub(super) fn resumed(earlier: &[crate::restore::record::TimingRecord]) -> Self {
        Self {
            done: earlier
                .iter()
                .map(|t| pb::PhaseTiming {
                    name: t.name.clone(),
                    node_name: t.node.clone(),
                    took: proto(Duration::try_from_secs_f64(t.seconds).unwrap_or_default()),
                })
                .collect(),
            ..Self::default()
        }
    }

    /// Ends the running phase (if any) and starts `name`.
    pub(super) fn enter(&mut self, restore_id: &str, name: &str) {
        self.close(restore_id);
        self.current = Some((name.to_owned(), Instant::now()));
    }

    /// Ends the running phase; the timings so far, in order.
    pub(super) fn finish(&mut self, restore_id: &str) -> Vec<pb::PhaseTiming> {
        self.close(restore_id);
        self.done.clone()
    }

    /// The finished phases and steps, in order.
    pub(super) fn so_far(&self) -> Vec<pb::PhaseTiming> {
        self.done.clone()
    }

    fn close(&mut self, restore_id: &str) {
        let Some((phase, started)) = self.current.take() else {
            return;
        };
        let took = started.elapsed();
        tracing::info!(restore_id, %phase, took = ?took, "restore phase finished");
        metrics::gauge!("bulwark_backup_restore_phase_seconds", "phase" => phase.clone())
            .set(took.as_secs_f64());
        self.done.push(pb::PhaseTiming {
            name: phase,
            node_name: String::new(),
            took: proto(took),
        });
    }

    /// A node's step event: started ones start its clock, done or failed
    /// ones stop it.
    pub(super) fn node_event(&mut self, restore_id: &str, ev: &pb::NodeRestoreProgress) {
        let key = (ev.node_name.clone(), ev.step);
        match ev.status() {
            pb::StepStatus::Started => {
                self.steps.insert(key, Instant::now());
            }
            pb::StepStatus::Done | pb::StepStatus::Failed => {
                let Some(started) = self.steps.remove(&key) else {
                    return;
                };
                let took = started.elapsed();
                let step = step_label(ev.step);
                tracing::info!(restore_id, node = %ev.node_name, %step, took = ?took, "restore step finished");
                metrics::gauge!(
                    "bulwark_backup_restore_step_seconds",
                    "node" => ev.node_name.clone(),
                    "step" => step.clone()
                )
                .set(took.as_secs_f64());
                self.done.push(pb::PhaseTiming {
                    name: step,
                    node_name: ev.node_name.clone(),
                    took: proto(took),
                });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(node: &str, step: pb::NodeStep, status: pb::StepStatus) -> pb::NodeRestoreProgress {
        pb::NodeRestoreProgress {
            node_name: node.into(),
            step: step as i32,
            status: status as i32,
            ..Default::default()
        }
    }

    #[test]
    fn phases_and_node_steps_are_timed_in_order() {
        let mut t = Timings::default();
        t.enter("r", &phase_label(pb::RestorePhase::Plan));
        assert!(t.so_far().is_empty(), "plan still runs");
        t.enter("r", &phase_label(pb::RestorePhase::Prepare));
        assert_eq!(t.so_far()[0].name, "plan");
        t.node_event(
            "r",
            &ev("n1", pb::NodeStep::FetchSnapshot, pb::StepStatus::Started),
        );
        t.node_event(
            "r",
            &ev("n1", pb::NodeStep::FetchSnapshot, pb::StepStatus::Running),
        );
        std::thread::sleep(Duration::from_millis(20));
        t.node_event(
            "r",
            &ev("n1", pb::NodeStep::FetchSnapshot, pb::StepStatus::Done),
        );
        // A step that never said it started is not timed.
        t.node_event(
            "r",
            &ev("n2", pb::NodeStep::WaitHealthy, pb::StepStatus::Done),
        );
        t.enter("r", "check");
        let done = t.finish("r");
        let names: Vec<(&str, &str)> = done
            .iter()
            .map(|p| (p.name.as_str(), p.node_name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("plan", ""),
                ("fetch_snapshot", "n1"),
                ("prepare", ""),
                ("check", "")
            ]
        );
        let fetch = done[1].took.unwrap();
        assert!(fetch.nanos >= 20_000_000 || fetch.seconds > 0, "{fetch:?}");
        // Finishing again adds nothing.
        assert_eq!(t.finish("r").len(), 4);
    }
}
