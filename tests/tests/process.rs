//! Process supervision: group kill on drop, early exits reported with
//! their log, the "address in use" retry, restarts, tool errors.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bulwark_testkit::process::ExitedEarly;
use bulwark_testkit::tools::{self, ToolError};
use bulwark_testkit::{ProcessBuilder, ports};

fn alive(pid: u32) -> bool {
    // Zombies count as gone: /proc/<pid>/stat state 'Z'.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

#[tokio::test]
async fn drop_kills_the_whole_process_group() {
    let process = ProcessBuilder::new("sh-group", "/bin/sh")
        .args(["-c", "sleep 1000 & echo $! > child.pid; echo started; wait"])
        .spawn()
        .unwrap();
    process
        .wait_for_log("started", Duration::from_secs(10))
        .await
        .unwrap();
    let child: u32 = std::fs::read_to_string(process.dir().join("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let leader = process.pid().unwrap();
    assert!(alive(leader) && alive(child));
    drop(process);
    // The grandchild was reparented to init (or a subreaper); give its
    // reaping a moment.
    for _ in 0..100 {
        if !alive(child) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!alive(leader), "the leader survived the drop");
    assert!(!alive(child), "a process of the group survived the drop");
}

#[tokio::test]
async fn early_exit_is_reported_with_the_log() {
    let process = ProcessBuilder::new("doomed", "/bin/sh")
        .args(["-c", "echo 'fatal: no config' >&2; exit 3"])
        .spawn()
        .unwrap();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ports::loopback_port().unwrap()));
    let err = process
        .wait_for_port(addr, Duration::from_secs(10))
        .await
        .unwrap_err();
    let exited = err
        .downcast_ref::<ExitedEarly>()
        .expect("an ExitedEarly error");
    assert_eq!(exited.status, "exit status: 3");
    assert!(exited.tail.contains("fatal: no config"), "{}", exited.tail);
    assert!(!exited.addr_in_use);
}

#[tokio::test]
async fn readiness_timeout_says_what_was_awaited() {
    let process = ProcessBuilder::new("sleeper", "/bin/sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let err = process
        .wait_for_log("never printed", Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("never printed"), "{err:#}");
    assert!(process.is_running());
}

#[tokio::test]
async fn stop_restart_and_kill() {
    let mut process = ProcessBuilder::new("counter", "/bin/sh")
        .args(["-c", "echo run >> runs; echo up; exec sleep 1000"])
        .stop_timeout(Duration::from_secs(5))
        .spawn()
        .unwrap();
    process
        .wait_for_log("up", Duration::from_secs(10))
        .await
        .unwrap();
    let first = process.pid().unwrap();

    process.restart().await.unwrap();
    // The current run's log starts after the restart marker, so the first
    // run's "up" cannot satisfy a wait.
    assert!(process.log().contains("start #2"));
    assert!(!process.current_log().contains("start #2"));
    process
        .wait_for_log("up", Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(process.pid().unwrap(), first);
    assert!(!alive(first));
    let runs = std::fs::read_to_string(process.dir().join("runs")).unwrap();
    assert_eq!(runs.lines().count(), 2, "same directory across restarts");

    let status = process.kill().unwrap().unwrap();
    assert_eq!(
        bulwark_testkit::process::describe_status(&status),
        "signal 9"
    );
    assert!(!process.is_running());
    process.start().unwrap();
    assert!(process.is_running());
    let status = process.stop().await.unwrap().unwrap();
    assert_eq!(
        bulwark_testkit::process::describe_status(&status),
        "signal 15"
    );
}

#[tokio::test]
async fn retry_on_addr_in_use_starts_over_with_a_new_port() {
    let pki = bulwark_testkit::Pki::new().unwrap();
    let cert = pki.server("api", &["127.0.0.1"]).unwrap();
    // Bound but not listening: binding it fails, connecting to it is refused.
    let taken = tokio::net::TcpSocket::new_v4().unwrap();
    taken
        .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let mut attempts = 0;
    let process = ports::retry_on_addr_in_use("fixture", || {
        attempts += 1;
        // The first attempt gets a port someone else holds, as in the race.
        let addr = if attempts == 1 {
            taken_addr
        } else {
            SocketAddr::from((Ipv4Addr::LOCALHOST, ports::loopback_port().unwrap()))
        };
        let spec = ProcessBuilder::new(
            "fixture",
            tools::bin_path("bulwark-fixture-apiserver").unwrap(),
        )
        .args(["--listen", &addr.to_string()])
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key);
        async move {
            let process = spec.spawn()?;
            process.wait_for_port(addr, Duration::from_secs(10)).await?;
            Ok(process)
        }
    })
    .await
    .unwrap();
    assert_eq!(attempts, 2);
    assert!(process.is_running());
}

#[test]
fn missing_tools_say_how_to_get_them() {
    let err = tools::tool("no-such-tool").unwrap_err();
    assert!(matches!(err, ToolError::Missing { .. }));
    assert!(err.to_string().contains("cargo xtask setup"), "{err}");

    let err = tools::bin_path("bulwark-no-such-binary").unwrap_err();
    assert!(
        err.to_string()
            .contains("cargo build -p bulwark-no-such-binary"),
        "{err}"
    );

    let fixture = tools::bin_path("bulwark-fixture-apiserver").unwrap();
    assert!(fixture.is_file());
    assert!(
        Path::new(&tools::workspace_root())
            .join("Cargo.toml")
            .is_file()
    );
}

/// Env var that turns [`pdeathsig_helper`] from a no-op into the stand-in
/// for a test runner that gets killed.
const PDEATHSIG_HELPER_ENV: &str = "BULWARK_TESTKIT_PDEATHSIG_PIDFILE";

/// Not a test on its own: run by [`children_die_with_a_killed_test_process`]
/// in a child copy of this binary. Starts a supervised process, reports its
/// pid, then waits to be killed.
#[test]
fn pdeathsig_helper() {
    let Some(pidfile) = std::env::var_os(PDEATHSIG_HELPER_ENV) else {
        return;
    };
    let process = ProcessBuilder::new("orphan-to-be", "/bin/sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    // The pid, and the directory the killed helper cannot delete itself.
    let report = format!("{}\n{}", process.pid().unwrap(), process.dir().display());
    let pidfile = std::path::PathBuf::from(pidfile);
    let tmp = pidfile.with_extension("tmp");
    std::fs::write(&tmp, report).unwrap();
    std::fs::rename(&tmp, &pidfile).unwrap();
    // Handles are never dropped here: only PR_SET_PDEATHSIG can save us.
    std::mem::forget(process);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[tokio::test]
async fn children_die_with_a_killed_test_process() {
    let dir = bulwark_testkit::TestDir::new("pdeathsig").unwrap();
    let pidfile = dir.join("child.pid");
    // A copy of this test binary running only the helper, as a test runner
    // would run a test; it is SIGKILLed below, so no Drop runs in it.
    let mut runner = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "pdeathsig_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PDEATHSIG_HELPER_ENV, &pidfile)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let (child, child_dir): (u32, std::path::PathBuf) = loop {
        if let Ok(text) = std::fs::read_to_string(&pidfile)
            && let Some((pid, dir)) = text.split_once('\n')
        {
            break (pid.parse().unwrap(), dir.into());
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the helper never started its child"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(alive(child));
    runner.kill().unwrap();
    runner.wait().unwrap();
    let killed = std::time::Instant::now();
    while alive(child) {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "pid {child} outlived the killed test process"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::remove_dir_all(&child_dir).unwrap();
}
