//! The standard `process_*` metrics (the names every Prometheus client
//! library exports), read from `/proc/self` when `/metrics` is scraped.
//!
//! Rendered as text rather than through the `metrics` recorder because
//! `process_cpu_seconds_total` is a fractional counter, which the
//! recorder's integer counters cannot hold, and because a value read at
//! scrape time needs no background task.

use std::fmt::Write;

/// What one scrape reads about this process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size, in bytes.
    pub resident_bytes: u64,
    /// Virtual memory size, in bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors.
    pub max_fds: u64,
    /// OS threads.
    pub threads: u64,
    /// When the process started, in seconds since the epoch.
    pub start_time_seconds: f64,
}

/// Reads this process's figures; `None` off Linux or when `/proc` is not
/// mounted (the metrics are then left out rather than reported as zero).
pub fn read() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot_time = boot_time_seconds(&std::fs::read_to_string("/proc/stat").ok()?)?;
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ticks <= 0 || page <= 0 {
        return None;
    }
    let mut stats = parse_stat(&stat, ticks as f64, page as u64, boot_time)?;
    stats.open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    stats.max_fds = max_fds()?;
    Some(stats)
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `limit`, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur)
}

/// The `btime` line of `/proc/stat`: boot time in seconds since the epoch.
fn boot_time_seconds(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Parses `/proc/self/stat`. The command name (field 2) is in parentheses
/// and may itself hold spaces or parentheses, so fields are counted from
/// the last `)`.
fn parse_stat(stat: &str, ticks: f64, page: u64, boot_time: f64) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is index 0, so field N is N - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let (utime, stime) = (field(14)?, field(15)?);
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: boot_time + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
        open_fds: 0,
        max_fds: 0,
    })
}

/// The Prometheus text for `stats`.
pub fn render(stats: &ProcessStats) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
        );
    };
    metric(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        stats.cpu_seconds.to_string(),
    );
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        stats.resident_bytes.to_string(),
    );
    metric(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        stats.virtual_bytes.to_string(),
    );
    metric(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        stats.open_fds.to_string(),
    );
    metric(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        stats.max_fds.to_string(),
    );
    metric(
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        stats.threads.to_string(),
    );
    metric(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        stats.start_time_seconds.to_string(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_name_has_spaces_and_parentheses() {
        // Fields 3..=24 of a real line, with a hostile command name.
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 50 0 0 20 0 7 0 1000 123456789 300 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line, 100.0, 4096, 1_700_000_000.0).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.resident_bytes, 300 * 4096);
    }

    #[test]
    fn a_truncated_stat_line_is_refused() {
        assert_eq!(parse_stat("1 (x) S 1 2 3", 100.0, 4096, 0.0), None);
        assert_eq!(parse_stat("no parenthesis", 100.0, 4096, 0.0), None);
    }

    #[test]
    fn boot_time_comes_from_btime() {
        let text = "cpu  1 2 3\nbtime 1764900000\nprocesses 5\n";
        assert_eq!(boot_time_seconds(text), Some(1_764_900_000.0));
        assert_eq!(boot_time_seconds("cpu 1\n"), None);
    }

    #[test]
    fn this_process_is_read_and_rendered() {
        let s = read().expect("/proc is mounted on Linux");
        assert!(s.open_fds > 0 && s.max_fds >= s.open_fds, "{s:?}");
        assert!(s.resident_bytes > 0 && s.threads >= 1, "{s:?}");
        let text = render(&s);
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total "),
            "{text}"
        );
        assert!(text.contains("\nprocess_open_fds "), "{text}");
    }
}
