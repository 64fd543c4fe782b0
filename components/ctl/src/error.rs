//! Errors that tell the operator what happened and what to do next, and the
//! documented exit codes scripts can rely on.

use std::fmt;
use std::path::Path;

/// `bulwarkctl`'s exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Ok,
    /// 1: the call failed for another reason (internal error, aborted).
    Failure,
    /// 2: bad arguments, config file or input.
    Usage,
    /// 3: the service could not be reached or is not ready (retry later).
    Unavailable,
    /// 4: a certificate was refused in the TLS handshake (ours by the
    /// service, or the service's by our CA bundle), or ours lacks the
    /// needed identity.
    Denied,
    /// 5: the named object (backend, member, snapshot) does not exist.
    NotFound,
    /// 6: the service refused because of the current state (e.g. removing
    /// the last voter, a restore already running, no confirmation).
    Refused,
    /// 7: a verification found a problem (corrupt or mismatched backup).
    VerifyFailed,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::Unavailable => 3,
            Exit::Denied => 4,
            Exit::NotFound => 5,
            Exit::Refused => 6,
            Exit::VerifyFailed => 7,
        }
    }
}

/// The table in `bulwarkctl --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  failed (internal error, aborted)
  2  bad arguments, config file or input (no context file and no flags,
     a key that is not the certificate's)
  3  service unreachable or not ready (retry later); `status` printed a
     partial report
  4  a certificate refused in the TLS handshake (ours by the service, or
     the service's by --ca), or a call not allowed (use an operator
     certificate)
  5  not found (backend, member, snapshot)
  6  refused in the current state (last voter, restore running, not confirmed)
  7  verification found a problem";

/// An error with its exit code and, when we know one, the next step.
#[derive(Debug)]
pub struct CliError {
    exit: Exit,
    message: String,
    hint: Option<String>,
}

impl CliError {
    /// An error with an exit code.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
            hint: None,
        }
    }

    /// Adds what the operator can do about it.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The exit code.
    pub fn exit(&self) -> Exit {
        self.exit
    }

    /// The hint, if any.
    pub fn hint_text(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// Maps a gRPC status from `service` at `endpoint` to an error with a
    /// next step.
    pub fn from_status(status: &tonic::Status, service: &str, endpoint: &str) -> Self {
        Self::from_call(status, service, endpoint, None)
    }

    /// [`CliError::from_status`] for a call made trusting the CA bundle
    /// `ca`, which a refused server certificate names.
    pub fn from_call(
        status: &tonic::Status,
        service: &str,
        endpoint: &str,
        ca: Option<&Path>,
    ) -> Self {
        if let Some(refusal) = tls_refusal(status) {
            return refusal.error(service, endpoint, ca);
        }
        use tonic::Code;
        let msg = status.message();
        let (exit, hint) = match status.code() {
            Code::Unavailable | Code::DeadlineExceeded => (
                Exit::Unavailable,
                Some(format!(
                    "check that {service} runs and {endpoint} is right (--{service_flag}-endpoint or the context), \
                     and its admin /readyz; then retry",
                    service_flag = service.trim_start_matches("bulwark-")
                )),
            ),
            Code::Unauthenticated => (
                Exit::Denied,
                Some("pass a client certificate issued by the cluster CA (--cert/--key or the context)".into()),
            ),
            Code::PermissionDenied => (
                Exit::Denied,
                Some(format!(
                    "use an operator certificate, or add its CN/O to `access.operators` in {service}'s config"
                )),
            ),
            Code::NotFound => (Exit::NotFound, None),
            Code::InvalidArgument | Code::OutOfRange => (Exit::Usage, None),
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => (Exit::Refused, None),
            Code::DataLoss => (Exit::VerifyFailed, None),
            _ => (Exit::Failure, None),
        };
        let detail = if msg.is_empty() {
            format!("{:?}", status.code())
        } else if msg == "transport error" {
            // tonic's word for every connection failure; the cause is in
            // the chain.
            cause_chain(status)
        } else {
            msg.to_owned()
        };
        Self {
            exit,
            message: format!("{service} at {endpoint}: {detail}"),
            hint,
        }
    }
}

/// A TLS handshake that failed over a certificate, and whose.
#[derive(Debug)]
pub(crate) enum TlsRefusal {
    /// The service refused our client certificate (the alert it sent).
    Ours(rustls::AlertDescription),
    /// We refused the service's certificate (why, by our CA bundle).
    Theirs(rustls::CertificateError),
}

impl TlsRefusal {
    /// The refusal `e` reports, if it is one.
    pub(crate) fn of(e: &rustls::Error) -> Option<Self> {
        match e {
            rustls::Error::AlertReceived(alert) if refuses_client_certificate(*alert) => {
                Some(TlsRefusal::Ours(*alert))
            }
            rustls::Error::InvalidCertificate(why) => Some(TlsRefusal::Theirs(why.clone())),
            _ => None,
        }
    }

    /// The rustls error inside `e` (rustls' I/O errors wrap it; an
    /// io::Error's `source()` skips what it wraps, hence `get_ref`).
    pub(crate) fn in_error(e: &(dyn std::error::Error + 'static)) -> Option<Self> {
        e.downcast_ref::<rustls::Error>()
            .or_else(|| {
                e.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::get_ref)
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            })
            .and_then(Self::of)
    }

    /// The error the operator sees.
    pub(crate) fn error(self, service: &str, endpoint: &str, ca: Option<&Path>) -> CliError {
        match self {
            TlsRefusal::Ours(alert) => CliError::new(
                Exit::Denied,
                format!(
                    "{service} at {endpoint} refused this client certificate (TLS alert {alert:?}): \
                     it is not issued by a CA the service trusts, or it has expired"
                ),
            )
            .hint(format!(
                "use a client certificate issued by the CA in {service}'s `tls.caFile` \
                 (kubeadm's cluster CA by default): --cert/--key or the context's cert/key"
            )),
            TlsRefusal::Theirs(why) => {
                let bundle = ca.map_or_else(
                    || "the CA bundle given".to_owned(),
                    |p| format!("the CA bundle {}", p.display()),
                );
                let name_hint = matches!(
                    why,
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                )
                .then_some("; when the endpoints are addresses outside its SANs, pass --server-name")
                .unwrap_or_default();
                CliError::new(
                    Exit::Denied,
                    format!(
                        "{service} at {endpoint}: its server certificate was refused by {bundle}: {why}"
                    ),
                )
                .hint(format!(
                    "--ca (or the context's ca) must name the CA that issued {service}'s serving \
                     certificate (kubeadm's /etc/kubernetes/pki/ca.crt by default){name_hint}"
                ))
            }
        }
    }
}

/// Alerts a server sends when it refuses a client certificate.
fn refuses_client_certificate(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
            | A::DecryptError
    )
}

/// The refusal under a failed call, if its source chain has one. tonic
/// reports connection failures as "transport error" and keeps the cause in
/// the chain.
pub(crate) fn tls_refusal(status: &tonic::Status) -> Option<TlsRefusal> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = next {
        if let Some(r) = TlsRefusal::in_error(e) {
            return Some(r);
        }
        next = e.source();
    }
    None
}

/// Whether the call failed before any connection was made: refused, or
/// not made within the channel's connect timeout (its connector's
/// `TimedOut`). No certificate was shown then.
pub(crate) fn never_connected(status: &tonic::Status) -> bool {
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
            )
        }) {
            return true;
        }
        next = e.source();
    }
    false
}

/// Every distinct message in `status`'s source chain, outermost first.
pub(crate) fn cause_chain(status: &tonic::Status) -> String {
    let mut parts = vec![status.message().to_owned()];
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

impl From<bulwark_common::tls::TlsError> for CliError {
    fn from(e: bulwark_common::tls::TlsError) -> Self {
        CliError::new(Exit::Usage, e.to_string())
            .hint("check --ca/--cert/--key (or the context's ca/cert/key)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_documented_codes_with_hints() {
        let e = CliError::from_status(
            &tonic::Status::permission_denied("CN=viewer may not call …"),
            "bulwark-lb",
            "10.0.0.1:9440",
        );
        assert_eq!(e.exit().code(), 4);
        assert!(
            e.to_string()
                .starts_with("bulwark-lb at 10.0.0.1:9440: CN=viewer")
        );
        assert!(e.hint_text().unwrap().contains("access.operators"));

        let e = CliError::from_status(&tonic::Status::unavailable(""), "bulwark-backup", "h:1");
        assert_eq!(e.exit().code(), 3);
        assert!(
            e.hint_text().unwrap().contains("--backup-endpoint"),
            "{:?}",
            e.hint_text()
        );

        for (code, exit) in [
            (tonic::Code::NotFound, 5),
            (tonic::Code::FailedPrecondition, 6),
            (tonic::Code::InvalidArgument, 2),
            (tonic::Code::DataLoss, 7),
            (tonic::Code::Internal, 1),
        ] {
            let e = CliError::from_status(&tonic::Status::new(code, "x"), "s", "e");
            assert_eq!(e.exit().code(), exit, "{code:?}");
        }
    }
}
