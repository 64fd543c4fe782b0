//! The "cannot run here" outcome, and when it must be a failure instead.

/// A test precondition this machine does not meet (no root for network
/// namespaces, an optional tool not installed).
///
/// Harness constructors return it as a distinct outcome so a test can say
/// clearly that it did not run, instead of passing silently or failing for
/// a reason that has nothing to do with the code under test.
#[derive(Debug, Clone, thiserror::Error)]
#[error("skipped: {reason}")]
pub struct Skipped {
    /// What is missing, e.g. "needs root for network namespaces".
    pub reason: String,
    /// The env var that turns this skip into a failure, e.g.
    /// `BULWARK_REQUIRE_PRIVILEGED`.
    pub require_env: &'static str,
}

impl Skipped {
    pub(crate) fn new(reason: impl Into<String>, require_env: &'static str) -> Self {
        Self {
            reason: reason.into(),
            require_env,
        }
    }
}

/// Reports a skip: prints it and returns `Ok(())`, or, when the skip's
/// `require_env` variable is `1`, returns an error so the test fails.
///
/// CI sets the variables, so a skip there means the environment is broken,
/// not that the test may be ignored.
pub fn skip_or_fail(skipped: &Skipped) -> anyhow::Result<()> {
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("this test")
        .to_owned();
    if crate::env_flag(skipped.require_env) {
        anyhow::bail!(
            "{test} cannot run: {} ({}=1 makes this a failure instead of a skip)",
            skipped.reason,
            skipped.require_env
        );
    }
    eprintln!(
        "SKIPPED {test}: {} (set {}=1 to make this a failure)",
        skipped.reason, skipped.require_env
    );
    Ok(())
}
