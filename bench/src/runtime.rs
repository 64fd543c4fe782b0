//! The tokio runtime the async scenarios (and the suite's load driver) run
//! on.

/// A multi-thread tokio runtime with two worker threads and every driver
/// (I/O, time) enabled.
pub fn two_workers() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
