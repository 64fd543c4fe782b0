//! `cargo xtask demo` runs to the end: the demo binary, exactly as the
//! xtask runs it, against the binaries this build produced.

use std::time::Duration;

use bulwark_testkit::tools;

#[tokio::test]
async fn heavy_the_demo_runs_to_the_end() {
    let demo = tools::bin_path("bulwark-demo").unwrap();
    let run = tokio::process::Command::new(demo)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the demo did not finish within 10 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // Every step ran and reported what it measured.
    for expected in [
        "[1/7] Starting a control plane",
        "the LB leader commits their agreed verdicts",
        "took over; clients were served again",
        "is down, ",
        "requests sent after the kill:",
        "the cluster is exactly at the backup point",
        "the old data dir is kept beside the new one (1 kept)",
        "[7/7] Tearing down",
    ] {
        assert!(
            stdout.contains(expected),
            "the demo's output lacks {expected:?}:\n{stdout}\n{stderr}"
        );
    }
    // With Debian's prometheus installed (CI fails the demo without it),
    // a real Prometheus scraped every daemon with the shipped rules.
    if tools::system("prometheus").is_ok() {
        let scraped = "Prometheus scrapes all 9 daemons' /metrics (9/9 targets up)";
        assert!(
            stdout.contains(scraped),
            "the demo's output lacks {scraped:?}:\n{stdout}\n{stderr}"
        );
    }
}
