//! The real `bulwarkctl` binary against one bulwark-backup instance, as the
//! backup, restore and disaster-recovery tests drive it.

use std::process::Output;

use crate::pki::CertFiles;
use crate::tools::bin_path;

/// `bulwarkctl ARGS` against the backup instance at `addr`, as the
/// identity `cert`, with no context file (HOME is the temp dir) and no
/// terminal on stdin.
pub async fn backup(args: &[&str], addr: &str, cert: &CertFiles) -> Output {
    let mut cmd = tokio::process::Command::new(bin_path("bulwarkctl").expect("bulwarkctl built"));
    cmd.env("HOME", std::env::temp_dir())
        .arg("--backup-endpoint")
        .arg(addr)
        .arg("--ca")
        .arg(&cert.ca)
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        .args(args)
        .stdin(std::process::Stdio::null());
    cmd.output().await.expect("running bulwarkctl")
}

/// An exit status and both streams, for an assertion's message.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
