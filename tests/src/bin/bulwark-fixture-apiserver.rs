//! A TEST DOUBLE for kube-apiserver, run as a real process by
//! `bulwark_testkit::fixture::ApiServerProcess` so tests can SIGTERM and
//! SIGKILL it. See `bulwark_testkit::fixture` for what it imitates.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = bulwark_testkit::fixture::Args::parse();
    // Two workers: plenty for a test double, and tests run many of these on
    // two shared cores.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bulwark_testkit::fixture::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
