//! PREFLIGHT: before anything is fetched, every node is asked at once
//! (`RestoreAgent.CheckRestore`) for every problem that would stop its part
//! of the restore; an agent that does not answer is a problem too. One
//! refusal lists them all, node by node (FAILED_PRECONDITION: `bulwarkctl`
//! exits 6), so the operator fixes every node in one round instead of
//! learning of node-2's full disk after node-0 and node-1 downloaded the
//! target.

use bulwark_api::backup::v1 as pb;
use tonic::Status;

use super::coordinator::{Coordinator, Failed, Node, Run};
use crate::restore::pitr::Plan;

/// One problem on one node (or at one agent address the coordinator could
/// not reach, which then stands for the node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Problem {
    pub(super) node: String,
    pub(super) what: String,
}

/// The raw size every node must have room for: the base snapshot's, plus
/// its segments' for a point-in-time target (an estimate made before the
/// target is built; prepare checks again with the exact size).
pub(super) fn target_size_estimate(plan: &Plan) -> u64 {
    plan.segments.iter().fold(plan.base.raw_size_bytes, |n, s| {
        n.saturating_add(s.raw_size_bytes)
    })
}

/// The refusal for `problems`, none when there are none: every problem,
/// grouped by node in the order the nodes were asked.
pub(super) fn refusal(problems: &[Problem]) -> Option<Failed> {
    if problems.is_empty() {
        return None;
    }
    let mut nodes: Vec<&str> = Vec::new();
    for p in problems {
        if !nodes.contains(&p.node.as_str()) {
            nodes.push(&p.node);
        }
    }
    let mut error = format!(
        "pre-flight found {} problem(s) on {} node(s) ({}); nothing was fetched or changed:",
        problems.len(),
        nodes.len(),
        nodes.join(", ")
    );
    for n in &nodes {
        for p in problems.iter().filter(|p| p.node == *n) {
            error.push_str(&format!("\n  node {n}: {}", p.what));
        }
    }
    Some(Failed {
        code: Some(tonic::Code::FailedPrecondition),
        phase: pb::RestorePhase::Preflight,
        error,
    })
}

impl Coordinator {
    /// PREFLIGHT: every reachable node's checks at once, added to the
    /// `problems` PLAN already found (agents that did not answer, nodes
    /// held by another restore); any problem refuses the restore.
    pub(super) async fn preflight(
        &self,
        run: &Run<'_>,
        req: &pb::CheckRestoreRequest,
        nodes: &[Node],
        mut problems: Vec<Problem>,
    ) -> std::result::Result<(), Failed> {
        self.set_phase(run, pb::RestorePhase::Preflight);
        let checks = nodes.iter().map(|(info, c)| {
            let mut c = c.clone();
            let req = req.clone();
            async move { (info, c.check_restore(req).await) }
        });
        for (info, answer) in futures::future::join_all(checks).await {
            match answer {
                Ok(r) => problems.extend(r.into_inner().problems.into_iter().map(|what| Problem {
                    node: info.node_name.clone(),
                    what,
                })),
                Err(s) => problems.push(Problem {
                    node: info.node_name.clone(),
                    what: unanswered(&s),
                }),
            }
        }
        match refusal(&problems) {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }
}

/// An agent's failed call as a problem: unreachable, or what it said.
pub(super) fn unanswered(s: &Status) -> String {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            format!("its restore agent is unreachable: {}", s.message())
        }
        _ => format!("its restore agent refused the check: {}", s.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(node: &str, what: &str) -> Problem {
        Problem {
            node: node.into(),
            what: what.into(),
        }
    }

    #[test]
    fn one_refusal_lists_every_problem_by_node() {
        assert!(refusal(&[]).is_none());
        let f = refusal(&[
            p("node-2", "not enough free space on node node-2"),
            p("node-0", "etcd's manifest /m is not in place"),
            p(
                "node-2",
                "the restore tool /bin/etcdutl (etcdutl) does not run here",
            ),
        ])
        .unwrap();
        assert_eq!(f.code, Some(tonic::Code::FailedPrecondition));
        assert_eq!(f.phase, pb::RestorePhase::Preflight);
        let lines: Vec<&str> = f.error.lines().collect();
        assert_eq!(
            lines,
            [
                "pre-flight found 3 problem(s) on 2 node(s) (node-2, node-0); nothing was fetched or changed:",
                "  node node-2: not enough free space on node node-2",
                "  node node-2: the restore tool /bin/etcdutl (etcdutl) does not run here",
                "  node node-0: etcd's manifest /m is not in place",
            ]
        );
    }

    #[test]
    fn an_agent_that_does_not_answer_is_named_unreachable() {
        let s = Status::unavailable("tcp connect error");
        assert_eq!(
            unanswered(&s),
            "its restore agent is unreachable: tcp connect error"
        );
        assert!(unanswered(&Status::permission_denied("x")).contains("refused the check"));
    }
}
