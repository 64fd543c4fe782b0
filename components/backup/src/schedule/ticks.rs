//! When scheduled snapshots are due: a fixed interval or a cron expression.
//!
//! Interval ticks are aligned to the Unix epoch (every hour on the hour for
//! `1h`), not to when a process started: every instance computes the same
//! tick times, so a new leader continues the old leader's grid, and "one
//! snapshot per tick" is something the manifests can show (each scheduled
//! manifest records its tick).

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// A parsed schedule.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// Every `Duration`, aligned to the epoch.
    Interval(Duration),
    /// A cron expression (as written), evaluated in UTC.
    Cron(String, Box<croner::Cron>),
}

impl Schedule {
    /// An interval schedule; at least one second, whole milliseconds.
    pub fn interval(d: Duration) -> Result<Self, String> {
        if d < Duration::from_secs(1) {
            return Err(format!(
                "interval {} is too short: expected at least 1s",
                humantime::format_duration(d)
            ));
        }
        Ok(Schedule::Interval(d))
    }

    /// A cron schedule from five fields (minute hour day-of-month month
    /// day-of-week), or six with seconds first.
    pub fn cron(expr: &str) -> Result<Self, String> {
        croner::Cron::new(expr)
            .with_seconds_optional()
            .parse()
            .map(|c| Schedule::Cron(expr.to_owned(), Box::new(c)))
            .map_err(|e| format!("invalid cron expression {expr:?}: {e}"))
    }

    /// A human description for status output.
    pub fn describe(&self) -> String {
        match self {
            Schedule::Interval(d) => format!("every {}", humantime::format_duration(*d)),
            Schedule::Cron(expr, _) => format!("cron {expr:?} (UTC)"),
        }
    }

    /// The interval, for schedules that have one.
    pub fn interval_duration(&self) -> Option<Duration> {
        match self {
            Schedule::Interval(d) => Some(*d),
            Schedule::Cron(..) => None,
        }
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Interval(d) => {
                let step = i64::try_from(d.as_millis()).ok()?;
                let ms = t.timestamp_millis();
                let next = (ms.div_euclid(step) + 1).checked_mul(step)?;
                DateTime::from_timestamp_millis(next)
            }
            Schedule::Cron(_, c) => c.find_next_occurrence(&t, false).ok(),
        }
    }

    /// The last tick at or before `t`.
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Interval(d) => {
                let step = i64::try_from(d.as_millis()).ok()?;
                let ms = t.timestamp_millis();
                DateTime::from_timestamp_millis(ms.div_euclid(step).checked_mul(step)?)
            }
            Schedule::Cron(_, c) => {
                // croner only searches forwards: look back in growing
                // windows, then walk forward to the last tick <= t.
                let mut window = TimeDelta::minutes(1);
                while window <= TimeDelta::days(400) {
                    if let Ok(mut tick) = c.find_next_occurrence(&(t - window), true)
                        && tick <= t
                    {
                        while let Ok(next) = c.find_next_occurrence(&tick, false) {
                            if next > t {
                                break;
                            }
                            tick = next;
                        }
                        return Some(tick);
                    }
                    window = window * 2;
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 4, h, m, s).unwrap()
    }

    #[test]
    fn interval_ticks_are_aligned_to_the_epoch() {
        let s = Schedule::interval(Duration::from_secs(3600)).unwrap();
        assert_eq!(s.next_after(at(10, 20, 0)), Some(at(11, 0, 0)));
        assert_eq!(s.next_after(at(11, 0, 0)), Some(at(12, 0, 0)));
        assert_eq!(s.last_at_or_before(at(11, 0, 0)), Some(at(11, 0, 0)));
        assert_eq!(s.last_at_or_before(at(11, 59, 59)), Some(at(11, 0, 0)));
        assert!(Schedule::interval(Duration::from_millis(10)).is_err());
    }

    #[test]
    fn cron_ticks() {
        let s = Schedule::cron("30 */6 * * *").unwrap();
        assert_eq!(s.next_after(at(0, 30, 0)), Some(at(6, 30, 0)));
        assert_eq!(s.last_at_or_before(at(13, 0, 0)), Some(at(12, 30, 0)));
        assert_eq!(s.last_at_or_before(at(12, 30, 0)), Some(at(12, 30, 0)));
        let e = Schedule::cron("every tuesday").unwrap_err();
        assert!(e.contains("invalid cron expression"), "{e}");
    }

    proptest! {
        // last_at_or_before(t) <= t < next_after(t), and nothing lies between.
        #[test]
        fn ticks_bracket_any_time(secs in 0i64..4_000_000_000, every in 1u64..100_000) {
            let t = DateTime::from_timestamp(secs, 0).unwrap();
            let s = Schedule::interval(Duration::from_secs(every)).unwrap();
            let prev = s.last_at_or_before(t).unwrap();
            let next = s.next_after(t).unwrap();
            prop_assert!(prev <= t && t < next);
            prop_assert_eq!(s.next_after(prev).unwrap(), prev + TimeDelta::seconds(every as i64));
            prop_assert!(next - prev <= TimeDelta::seconds(every as i64));
        }
    }
}
