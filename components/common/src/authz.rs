//! Who may call what: identity rules over verified client certificates.
//!
//! Every bulwark gRPC server requires a client certificate from its CA, so
//! any caller that reaches a handler is authenticated. Each rpc declares an
//! access level in the protos: reading calls are open to every authenticated
//! client; destructive calls (restore, delete, membership, drain) only to
//! identities listed as operators; report streams only to probers; the Raft
//! and restore-agent services only to peers. Rules match the certificate the
//! way kube-apiserver reads it: the CN is the user, each O a group.
//! [`crate::grpc::AccessLayer`] applies an [`AccessPolicy`] to every call.

use bulwark_api::Access;
use serde::{Deserialize, Serialize};

use crate::config::{Validate, Validator};
use crate::tls::PeerIdentity;

/// A set of identities: a certificate matches when its CN is one of
/// `commonNames` or any of its O values is one of `organizations`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityRule {
    /// Certificate common names (users) that match.
    #[serde(default)]
    pub common_names: Vec<String>,
    /// Certificate organizations (groups) that match.
    #[serde(default)]
    pub organizations: Vec<String>,
}

/// The group of bulwark operators' certificates (`bulwarkctl certs issue
/// --operator`). No Kubernetes role binding names it, so such a
/// certificate, although issued by the cluster CA, grants nothing in
/// Kubernetes beyond what any authenticated user has.
pub const BULWARK_OPERATORS: &str = "bulwark:operators";

impl IdentityRule {
    /// The default operators: [`BULWARK_OPERATORS`], and kubeadm's
    /// administrators, the `kubeadm:cluster-admins` group of admin.conf
    /// (Kubernetes 1.29+) and `system:masters` (older clusters,
    /// super-admin.conf), who hold the whole cluster anyway.
    pub fn default_operators() -> Self {
        Self {
            common_names: Vec::new(),
            organizations: vec![
                BULWARK_OPERATORS.into(),
                "kubeadm:cluster-admins".into(),
                "system:masters".into(),
            ],
        }
    }

    /// Whether `id` matches this rule.
    pub fn matches(&self, id: &PeerIdentity) -> bool {
        id.common_name
            .as_ref()
            .is_some_and(|cn| self.common_names.iter().any(|c| c == cn))
            || id
                .organizations
                .iter()
                .any(|o| self.organizations.iter().any(|r| r == o))
    }

    /// True when nothing can match.
    pub fn is_empty(&self) -> bool {
        self.common_names.is_empty() && self.organizations.is_empty()
    }
}

impl Validate for IdentityRule {
    fn validate(&self, v: &mut Validator) {
        if self.is_empty() {
            v.error("must list at least one commonName or organization");
        }
        for (i, cn) in self.common_names.iter().enumerate() {
            if cn.trim().is_empty() {
                v.at(format!("commonNames[{i}]"), |v| {
                    v.error("must not be empty")
                });
            }
        }
        for (i, o) in self.organizations.iter().enumerate() {
            if o.trim().is_empty() {
                v.at(format!("organizations[{i}]"), |v| {
                    v.error("must not be empty")
                });
            }
        }
    }
}

/// Which certificate identities may call which access level. READ needs only
/// a certificate from the trusted CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessPolicy {
    /// Operators: destructive and state-changing calls.
    #[serde(default = "IdentityRule::default_operators")]
    pub operators: IdentityRule,
    /// bulwark-prober instances (report streams). Absent: nobody.
    #[serde(default)]
    pub probers: Option<IdentityRule>,
    /// Peers of the same service (LB nodes on the Raft port, backup
    /// instances for restore agents). Absent: nobody.
    #[serde(default)]
    pub peers: Option<IdentityRule>,
}

impl Default for AccessPolicy {
    fn default() -> Self {
        Self {
            operators: IdentityRule::default_operators(),
            probers: None,
            peers: None,
        }
    }
}

impl Validate for AccessPolicy {
    fn validate(&self, v: &mut Validator) {
        v.nested("operators", &self.operators);
        if let Some(p) = &self.probers {
            v.nested("probers", p);
        }
        if let Some(p) = &self.peers {
            v.nested("peers", p);
        }
    }
}

impl AccessPolicy {
    /// Decides one call. `Ok` carries the caller's identity.
    pub fn check(
        &self,
        path: &str,
        identity: Option<PeerIdentity>,
    ) -> Result<PeerIdentity, tonic::Status> {
        let Some(id) = identity else {
            return Err(tonic::Status::unauthenticated(
                "a client certificate issued by the cluster CA is required",
            ));
        };
        // Paths outside bulwark's protos (health, reflection) are read-only.
        let access = bulwark_api::method_access(path).unwrap_or(Access::Read);
        let (rule, role) = match access {
            Access::Read => return Ok(id),
            Access::Operator => (Some(&self.operators), "operator"),
            Access::Prober => (self.probers.as_ref(), "prober"),
            Access::Peer => (self.peers.as_ref(), "peer"),
            Access::Unspecified => (None, "unspecified"),
        };
        match rule {
            Some(rule) if rule.matches(&id) => Ok(id),
            _ => {
                tracing::warn!(caller = %id, method = path, role, "permission denied");
                let allowed = rule
                    .map(|r| {
                        format!(
                            " (certificate CN in {:?} or O in {:?})",
                            r.common_names, r.organizations
                        )
                    })
                    .unwrap_or_else(|| " (none are configured)".into());
                Err(tonic::Status::permission_denied(format!(
                    "{id} may not call {path}: it requires {role} identities{allowed}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cn: &str, orgs: &[&str]) -> PeerIdentity {
        PeerIdentity {
            common_name: Some(cn.into()),
            organizations: orgs.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn matches_by_cn_or_any_org() {
        let rule = IdentityRule {
            common_names: vec!["alice".into()],
            organizations: vec!["bulwark:operators".into()],
        };
        assert!(rule.matches(&id("alice", &[])));
        assert!(rule.matches(&id("bob", &["x", "bulwark:operators"])));
        assert!(!rule.matches(&id("bob", &["system:nodes"])));
        assert!(!rule.matches(&PeerIdentity::default()));
    }

    #[test]
    fn empty_rule_is_invalid() {
        let errs = crate::config::validate_at("spec.operators", &IdentityRule::default());
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].to_string().starts_with("spec.operators:"),
            "{}",
            errs[0]
        );
    }

    fn some_id(cn: &str, orgs: &[&str]) -> Option<PeerIdentity> {
        Some(PeerIdentity {
            common_name: Some(cn.into()),
            organizations: orgs.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        })
    }

    fn policy() -> AccessPolicy {
        AccessPolicy {
            operators: IdentityRule {
                common_names: vec!["admin".into()],
                organizations: vec![],
            },
            probers: Some(IdentityRule {
                common_names: vec![],
                organizations: vec!["bulwark:probers".into()],
            }),
            peers: None,
        }
    }

    #[test]
    fn access_levels_follow_the_protos() {
        let p = policy();
        let restore = "/bulwark.backup.v1.Backup/Restore";
        let list = "/bulwark.backup.v1.Backup/ListSnapshots";
        let report = "/bulwark.lb.v1.ProbeReports/Report";
        let raft = "/bulwark.raft.v1.Raft/Vote";

        assert!(p.check(list, some_id("viewer", &[])).is_ok());
        assert!(p.check(restore, some_id("admin", &[])).is_ok());
        let denied = p
            .check(restore, some_id("viewer", &["system:nodes"]))
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("requires operator identities"),
            "{}",
            denied.message()
        );

        assert!(
            p.check(report, some_id("prober-a", &["bulwark:probers"]))
                .is_ok()
        );
        assert!(p.check(report, some_id("admin", &[])).is_err());
        // No peers configured: nobody may call the Raft service.
        let e = p.check(raft, some_id("admin", &[])).unwrap_err();
        assert!(
            e.message().contains("none are configured"),
            "{}",
            e.message()
        );
        // Health and reflection are read-only.
        assert!(
            p.check("/grpc.health.v1.Health/Check", some_id("x", &[]))
                .is_ok()
        );
        // No certificate, no call.
        assert_eq!(
            p.check(list, None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
