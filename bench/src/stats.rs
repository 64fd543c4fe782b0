//! The one definition of every statistic the bench publishes, and of the
//! machine and load description every report carries.
//!
//! - [`median`]: the middle value of the samples, the mean of the two middle
//!   ones for an even count, NaN (written `null` in JSON) for none;
//! - [`percentile`]: nearest rank (the smallest sample with at least p % of
//!   the samples at or below it), NaN for none;
//! - [`machine`], [`report_machine`], [`machine_summary`], [`loadavg`],
//!   [`load_1m`]: what ran the benchmark and how busy it was (other work on
//!   the machine is the largest source of noise, so every report says);
//! - [`cpu_seconds`]: CPU time a process has used, for CPU-per-request and
//!   CPU-per-GiB figures.
//!
//! bench/README.md says which definitions the committed results used.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, bail};

/// The median of `values` (in any order): the middle value, the mean of the
/// two middle values for an even count, NaN when there are none.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile `p` (0-100) of `sorted` (ascending); NaN when
/// empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The machine: CPU model, cores, memory and kernel (each report adds the
/// versions of the tools it compared).
pub fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("cpu".into(), cpu_model());
    m.insert("cores".into(), cores().to_string());
    m.insert("memory".into(), format!("{} GiB", memory_gib()));
    m.insert("kernel".into(), kernel());
    m
}

/// The machine as a scenario's report describes it: [`machine`], the
/// version of each tool in `tools` (a program and the flag that makes it
/// print its version, keyed by the program), and the load averages before
/// the run (`load_before`, from [`loadavg`]) and now, after it.
pub fn report_machine(tools: &[(&str, &str)], load_before: String) -> BTreeMap<String, String> {
    let mut m = machine();
    for &(prog, arg) in tools {
        m.insert(prog.into(), tool_version(prog, arg));
    }
    m.insert("loadavg_before".into(), load_before);
    m.insert("loadavg_after".into(), loadavg());
    m
}

/// The machine in one line: `<cpu>, <n> CPUs, <m> GiB`.
pub fn machine_summary() -> String {
    format!("{}, {} CPUs, {} GiB", cpu_model(), cores(), memory_gib())
}

/// The running kernel's release.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn memory_gib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024 / 1024)
}

/// The first line `prog arg` prints (on stdout, else stderr): a tool's
/// version for the report; `?` when it does not run.
pub fn tool_version(prog: &str, arg: &str) -> String {
    Command::new(prog)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_else(|| "?".into())
}

/// A duration in milliseconds, the unit every report gives times in.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// An optional time in milliseconds as reports and progress lines show
/// it: rounded to whole milliseconds (`12 ms`), `-` when there is none.
pub fn ms_cell(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.0} ms"))
}

/// Serializes a duration as [`ms`] (`#[serde(serialize_with = ...)]`).
pub fn serialize_ms<S: serde::Serializer>(
    d: &std::time::Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_f64(ms(*d))
}

/// The 1/5/15-minute load averages, as /proc/loadavg writes them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The one-minute load average (0 when unreadable).
pub fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(0.0)
}

/// CPU seconds (user + system, all threads) a process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    cpu_seconds_of(&stat, hz as f64)
}

/// utime + stime of a /proc/<pid>/stat line, in seconds at `hz` ticks/s.
fn cpu_seconds_of(stat: &str, hz: f64) -> anyhow::Result<f64> {
    // The command name is in parentheses and may contain spaces: fields
    // are counted after the last ')'. utime and stime are fields 14 and
    // 15, i.e. the 12th and 13th after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .context("short /proc stat")?
            .parse::<f64>()
            .context("parsing /proc stat")
    };
    Ok((ticks(11)? + ticks(12)?) / hz)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn durations_are_reported_in_milliseconds_with_their_fraction() {
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
        let json = serde_json::to_string(&{
            #[derive(serde::Serialize)]
            struct T {
                #[serde(serialize_with = "serialize_ms")]
                d: Duration,
            }
            T {
                d: Duration::from_millis(40),
            }
        })
        .unwrap();
        assert_eq!(json, r#"{"d":40.0}"#);
    }

    #[test]
    fn median_of_an_odd_count_is_the_middle_value() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([5.0, 1.0, 4.0, 2.0, 3.0]), 3.0);
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_two_middle_values() {
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median([10.0, 20.0]), 15.0);
    }

    #[test]
    fn median_of_one_sample_is_that_sample() {
        assert_eq!(median([7.5]), 7.5);
    }

    #[test]
    fn median_of_nothing_is_nan() {
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        // Even count: p50 is the lower middle value, not the median.
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), 2.0);
        assert_eq!(percentile(&[7.5], 99.0), 7.5);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn machine_names_its_cores() {
        let m = machine();
        assert!(m["cores"].parse::<usize>().unwrap() >= 1);
        assert!(machine_summary().contains(" CPUs, "));
    }

    #[test]
    fn counts_the_cpu_time_it_burns() {
        let before = cpu_seconds(std::process::id()).unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = cpu_seconds(std::process::id()).unwrap();
        assert!(after > before, "{before} -> {after}");
    }

    #[test]
    fn reads_cpu_time_after_the_command_name() {
        // A command name with spaces and parentheses must not shift fields.
        let stat = "4242 (bulwark (lb) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0";
        assert_eq!(cpu_seconds_of(stat, 100.0).unwrap(), 3.0);
        assert!(cpu_seconds_of("4242 (x) S 1", 100.0).is_err());
        let own = cpu_seconds(std::process::id()).unwrap();
        assert!(own >= 0.0);
    }
}
