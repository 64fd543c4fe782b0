//! Child processes that die with the daemon.
//!
//! `kill_on_drop` only helps when the daemon lives to drop the handle. A
//! SIGKILLed bulwark-backup would leave its scratch etcd (a drill, a
//! point-in-time build) running on its ports and work dir, or an
//! `etcdutl snapshot restore` still writing into the output the restarted
//! agent is about to roll back. [`spawn`] asks the kernel to SIGKILL the
//! child when its parent goes (`PR_SET_PDEATHSIG`).
//!
//! The kernel sends that signal when the *thread* that forked the child
//! ends, not the process, and tokio's blocking-pool threads end after a
//! while idle; so every tied child is forked on one thread kept for the
//! process's life, with the caller's runtime entered there so the child
//! is reaped by that runtime as usual.

use std::io;
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A fork to run on the spawner thread.
type Job = Box<dyn FnOnce() + Send>;

/// Starts `cmd` as a child that gets SIGKILL when this process dies. Call
/// it from within a tokio runtime.
pub async fn spawn(mut cmd: Command) -> io::Result<Child> {
    tie_to_parent(cmd.as_std_mut());
    let handle = Handle::current();
    let (tx, rx) = oneshot::channel();
    on_spawner_thread(Box::new(move || {
        let _runtime = handle.enter();
        let _ = tx.send(cmd.spawn());
    }))?;
    rx.await
        .map_err(|_| io::Error::other("the child spawner thread dropped the fork"))?
}

/// As [`Command::output`], the child tied to this process: runs `cmd` to
/// its end with stdout and stderr captured.
pub async fn output(mut cmd: Command) -> io::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    spawn(cmd).await?.wait_with_output().await
}

/// As [`spawn`] for a `std` command, waiting for the fork (the test
/// harness's processes, which live outside any runtime).
pub fn spawn_std(mut cmd: std::process::Command) -> io::Result<std::process::Child> {
    tie_to_parent(&mut cmd);
    let (tx, rx) = mpsc::sync_channel(1);
    on_spawner_thread(Box::new(move || {
        let _ = tx.send(cmd.spawn());
    }))?;
    rx.recv()
        .map_err(|_| io::Error::other("the child spawner thread dropped the fork"))?
}

fn tie_to_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent died between fork and prctl: no signal will ever
            // come, so the child must not start at all.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Runs `job` on the process-long spawner thread (started on first use).
fn on_spawner_thread(job: Job) -> io::Result<()> {
    static JOBS: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let jobs = match JOBS.get() {
        Some(jobs) => jobs,
        None => {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("bulwark-child-spawner".into())
                .spawn(move || rx.into_iter().for_each(|job| job()))?;
            JOBS.get_or_init(|| Mutex::new(tx))
        }
    };
    jobs.lock()
        .map_err(|_| io::Error::other("the child spawner's queue is poisoned"))?
        .send(job)
        .map_err(|_| io::Error::other("the child spawner thread is gone"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Env var: run as the parent that spawns a tied `sleep` and waits.
    const AS_PARENT: &str = "BULWARK_CHILD_TEST_PARENT";

    fn alive(pid: i32) -> bool {
        // A zombie still answers kill(0); its state says it is gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }

    /// The parent's part, when this test runs as the parent (see below):
    /// spawn a tied `sleep`, say its pid, wait to be killed.
    fn be_the_parent() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut sleep = Command::new("sleep");
            sleep.arg("60");
            let child = spawn(sleep).await.unwrap();
            println!("child pid {}", child.id().unwrap());
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        });
    }

    /// A child spawned with [`spawn`] is gone as soon as its parent is
    /// SIGKILLed (a plain one would outlive it). The parent is this test
    /// run again in a process of its own.
    #[test]
    fn a_tied_child_dies_with_its_parent() {
        if std::env::var_os(AS_PARENT).is_some() {
            return be_the_parent();
        }
        let mut parent = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child::tests::a_tied_child_dies_with_its_parent",
                "--nocapture",
            ])
            .env(AS_PARENT, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(parent.stdout.take().unwrap());
        let mut line = String::new();
        let pid: i32 = loop {
            line.clear();
            let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert!(n > 0, "the parent ended before starting its child");
            if let Some(pid) = line.trim().strip_prefix("child pid ") {
                break pid.parse().unwrap();
            }
        };
        assert!(alive(pid), "the tied child runs while its parent does");
        parent.kill().unwrap();
        parent.wait().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "child {pid} outlived its SIGKILLed parent"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn output_captures_like_command_output() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = output(cmd).await.unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
    }
}
