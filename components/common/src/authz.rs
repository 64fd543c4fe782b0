//! Who may call what: identity rules over verified client certificates.
//!
//! Every bulwark gRPC server requires a client certificate from its CA, so
//! any caller that reaches a handler is authenticated. Reading calls are open
//! to all of them; destructive calls (restore, delete, membership, drain) are
//! allowed only to identities listed as operators, and the Raft port only to
//! LB peers. Rules match the certificate the way kube-apiserver reads it: the
//! CN is the user, each O a group.

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

impl IdentityRule {
    /// kubeadm's administrators: the `kubeadm:cluster-admins` group of
    /// admin.conf (Kubernetes 1.29+) and `system:masters` (older clusters,
    /// super-admin.conf).
    pub fn kubeadm_admins() -> Self {
        Self {
            common_names: Vec::new(),
            organizations: vec!["kubeadm:cluster-admins".into(), "system:masters".into()],
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

/// Authorizes gRPC requests against an [`IdentityRule`].
#[derive(Clone, Debug)]
pub struct Authorizer {
    operators: IdentityRule,
}

impl Authorizer {
    /// An authorizer whose operators are `operators`.
    pub fn new(operators: IdentityRule) -> Self {
        Self { operators }
    }

    /// The caller's identity, or UNAUTHENTICATED when the connection carried
    /// no usable client certificate.
    pub fn caller<T>(request: &tonic::Request<T>) -> Result<PeerIdentity, tonic::Status> {
        PeerIdentity::of_request(request).map_err(|e| {
            tonic::Status::unauthenticated(format!("client certificate required: {e}"))
        })
    }

    /// Allows the call only for an operator identity; `action` names what was
    /// refused so the message tells the caller what they may not do.
    pub fn require_operator<T>(
        &self,
        request: &tonic::Request<T>,
        action: &str,
    ) -> Result<PeerIdentity, tonic::Status> {
        require(&self.operators, request, action, "operator")
    }
}

/// Allows the call only when the caller matches `rule`; `role` names the
/// role in the refusal (e.g. "LB peer").
pub fn require<T>(
    rule: &IdentityRule,
    request: &tonic::Request<T>,
    action: &str,
    role: &str,
) -> Result<PeerIdentity, tonic::Status> {
    let id = Authorizer::caller(request)?;
    if rule.matches(&id) {
        Ok(id)
    } else {
        tracing::warn!(caller = %id, action, role, "permission denied");
        Err(tonic::Status::permission_denied(format!(
            "{id} may not {action}: only {role} identities may (certificate CN in {:?} or O in {:?})",
            rule.common_names, rule.organizations
        )))
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
    fn request_without_certificate_is_unauthenticated() {
        let auth = Authorizer::new(IdentityRule::kubeadm_admins());
        let err = auth
            .require_operator(&tonic::Request::new(()), "restore etcd")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
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
}
