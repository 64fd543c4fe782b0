//! Which snapshots to keep: a pure function of the policy, the time and
//! the list of committed snapshots, so it can be property-tested on
//! synthetic timelines. [`crate::snapshot::catalog`] applies its answer to the store.
//!
//! Rules combine with OR: a snapshot is kept when any configured rule keeps
//! it. Two snapshots are always kept whatever the rules say: the newest one
//! and the newest *valid* one (committed and not failed by its last
//! verification), so a policy can never leave nothing to restore.
//!
//! `exponential` follows Gardener etcd-backup-restore's Exponential policy:
//! everything from the last hour, then the newest snapshot of each of the
//! last 24 hours, of each of the last 7 days and of each of the last 4
//! weeks (calendar buckets in UTC; weeks start on Monday).

use std::collections::BTreeSet;
use std::time::Duration;

use bulwark_common::config::{Validate, Validator, duration};
use chrono::{DateTime, Datelike, TimeDelta, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// The retention rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Keep the newest N snapshots.
    #[serde(default)]
    pub keep_last: Option<u32>,
    /// Keep an exponentially thinning history.
    #[serde(default)]
    pub exponential: Option<Exponential>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            keep_last: None,
            exponential: Some(Exponential::default()),
        }
    }
}

/// Gardener-style exponential retention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Exponential {
    /// Keep every snapshot younger than this.
    #[serde(default = "one_hour", with = "duration")]
    pub keep_all_within: Duration,
    /// Newest snapshot of each of the last N hours.
    #[serde(default = "hours")]
    pub hourly: u32,
    /// Newest snapshot of each of the last N days.
    #[serde(default = "days")]
    pub daily: u32,
    /// Newest snapshot of each of the last N weeks.
    #[serde(default = "weeks")]
    pub weekly: u32,
}

fn one_hour() -> Duration {
    Duration::from_secs(3600)
}
fn hours() -> u32 {
    24
}
fn days() -> u32 {
    7
}
fn weeks() -> u32 {
    4
}

impl Default for Exponential {
    fn default() -> Self {
        Self {
            keep_all_within: one_hour(),
            hourly: hours(),
            daily: days(),
            weekly: weeks(),
        }
    }
}

impl Validate for RetentionPolicy {
    fn validate(&self, v: &mut Validator) {
        if self.keep_last.is_none() && self.exponential.is_none() {
            v.error("set keepLast, exponential or both");
        }
        if self.keep_last == Some(0) {
            v.at("keepLast", |v| v.error("must be at least 1"));
        }
        if let Some(e) = &self.exponential {
            v.at("exponential", |v| {
                v.check(e.hourly <= 24 * 365, "hourly", "must be at most 8760");
                v.check(e.daily <= 3650, "daily", "must be at most 3650");
                v.check(e.weekly <= 520, "weekly", "must be at most 520");
            });
        }
    }
}

/// What the policy needs to know about one committed snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Snapshot id.
    pub id: String,
    /// When it was taken.
    pub time: DateTime<Utc>,
    /// False when its last verification failed.
    pub valid: bool,
}

impl RetentionPolicy {
    /// The ids to keep among `snapshots` at time `now`. Everything else
    /// may be deleted.
    pub fn keep(&self, now: DateTime<Utc>, snapshots: &[Candidate]) -> BTreeSet<String> {
        let mut sorted: Vec<&Candidate> = snapshots.iter().collect();
        // Newest first; ties broken by id so the answer is deterministic.
        sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
        let mut keep = BTreeSet::new();
        if let Some(newest) = sorted.first() {
            keep.insert(newest.id.clone());
        }
        if let Some(valid) = sorted.iter().find(|c| c.valid) {
            keep.insert(valid.id.clone());
        }
        if let Some(n) = self.keep_last {
            keep.extend(sorted.iter().take(n as usize).map(|c| c.id.clone()));
        }
        if let Some(e) = &self.exponential {
            let within = TimeDelta::from_std(e.keep_all_within).unwrap_or(TimeDelta::MAX);
            for c in &sorted {
                // A snapshot from the future (clock skew) counts as recent.
                if now.signed_duration_since(c.time) <= within {
                    keep.insert(c.id.clone());
                }
            }
            let hour = truncate_hour(now);
            let day = truncate_day(now);
            let week = day - TimeDelta::days(i64::from(now.weekday().num_days_from_monday()));
            newest_per_bucket(&sorted, hour, TimeDelta::hours(1), e.hourly, &mut keep);
            newest_per_bucket(&sorted, day, TimeDelta::days(1), e.daily, &mut keep);
            newest_per_bucket(&sorted, week, TimeDelta::weeks(1), e.weekly, &mut keep);
        }
        keep
    }
}

fn truncate_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_minute(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(t)
}

fn truncate_day(t: DateTime<Utc>) -> DateTime<Utc> {
    truncate_hour(t).with_hour(0).unwrap_or(t)
}

/// Keeps the newest snapshot of each of `count` buckets of width `width`,
/// the first starting at `current` (the bucket holding now), going back.
fn newest_per_bucket(
    newest_first: &[&Candidate],
    current: DateTime<Utc>,
    width: TimeDelta,
    count: u32,
    keep: &mut BTreeSet<String>,
) {
    for k in 0..i32::try_from(count).unwrap_or(i32::MAX) {
        let start = current - width * k;
        let end = start + width;
        if let Some(c) = newest_first
            .iter()
            .find(|c| c.time >= start && c.time < end)
        {
            keep.insert(c.id.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 6, 11, 15, 30, 0).unwrap()
    }

    /// A snapshot `mins` minutes before now.
    fn snap(mins: i64, valid: bool) -> Candidate {
        let t = now() - TimeDelta::minutes(mins);
        Candidate {
            id: format!("{}-{mins}", crate::store::layout::format_time(t)),
            time: t,
            valid,
        }
    }

    fn exponential() -> RetentionPolicy {
        RetentionPolicy::default()
    }

    #[test]
    fn exponential_keeps_what_gardener_would() {
        // One snapshot every 15 minutes for 40 days.
        let all: Vec<Candidate> = (0..40 * 24 * 4).map(|i| snap(i * 15, true)).collect();
        let keep = exponential().keep(now(), &all);
        // Last hour: 0, 15, 30, 45, 60 minutes ago (60 is exactly 1h old).
        for m in [0, 15, 30, 45, 60] {
            assert!(keep.contains(&snap(m, true).id), "{m} minutes ago");
        }
        // Not the 2nd snapshot of an hour two hours back (15:30 - 135m = 13:15;
        // that hour's newest is 13:45).
        assert!(!keep.contains(&snap(135, true).id));
        assert!(keep.contains(&snap(105, true).id)); // 13:45
        // Bounded: 5 recent + 24 hourly + 7 daily + 4 weekly at most.
        assert!(keep.len() <= 5 + 24 + 7 + 4, "{}", keep.len());
        // Nothing older than 4 weeks (plus the current partial week).
        let oldest_kept = all
            .iter()
            .filter(|c| keep.contains(&c.id))
            .map(|c| c.time)
            .min()
            .unwrap();
        assert!(now() - oldest_kept <= TimeDelta::weeks(5));
    }

    #[test]
    fn the_newest_valid_snapshot_survives_any_policy() {
        let policy = RetentionPolicy {
            keep_last: Some(1),
            exponential: None,
        };
        // The newest two failed verification; the third is the newest valid.
        let all = vec![snap(0, false), snap(60, false), snap(60 * 24 * 90, true)];
        let keep = policy.keep(now(), &all);
        assert!(keep.contains(&all[0].id));
        assert!(keep.contains(&all[2].id));
        assert!(!keep.contains(&all[1].id));
    }

    #[test]
    fn validation() {
        let none = RetentionPolicy {
            keep_last: None,
            exponential: None,
        };
        let errs = bulwark_common::config::validate_at("retention.policy", &none);
        assert_eq!(
            errs[0].to_string(),
            "retention.policy: set keepLast, exponential or both"
        );
    }

    fn timeline() -> impl Strategy<Value = Vec<Candidate>> {
        // Up to 200 snapshots spread over ~60 days, some failed.
        proptest::collection::vec((0i64..60 * 24 * 60, any::<bool>(), 0u8..10), 0..200).prop_map(
            |v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (mins, valid, _))| {
                        let mut c = snap(mins, valid || i % 3 == 0);
                        c.id = format!("{}-{i}", c.id);
                        c
                    })
                    .collect()
            },
        )
    }

    fn policy() -> impl Strategy<Value = RetentionPolicy> {
        (
            proptest::option::of(1u32..20),
            proptest::option::of((0u64..7200, 0u32..30, 0u32..10, 0u32..6)),
        )
            .prop_map(|(keep_last, exp)| RetentionPolicy {
                keep_last,
                exponential: exp.map(|(s, h, d, w)| Exponential {
                    keep_all_within: Duration::from_secs(s),
                    hourly: h,
                    daily: d,
                    weekly: w,
                }),
            })
    }

    proptest! {
        #[test]
        fn policy_properties(all in timeline(), p in policy()) {
            let keep = p.keep(now(), &all);
            // Only known ids.
            prop_assert!(keep.iter().all(|id| all.iter().any(|c| &c.id == id)));
            let newest_first = {
                let mut v: Vec<&Candidate> = all.iter().collect();
                v.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
                v
            };
            // The newest and the newest valid are always kept.
            if let Some(n) = newest_first.first() {
                prop_assert!(keep.contains(&n.id));
            }
            if let Some(v) = newest_first.iter().find(|c| c.valid) {
                prop_assert!(keep.contains(&v.id));
            }
            // keepLast keeps the N newest.
            if let Some(n) = p.keep_last {
                for c in newest_first.iter().take(n as usize) {
                    prop_assert!(keep.contains(&c.id));
                }
            }
            let mut bound = 2 + p.keep_last.unwrap_or(0) as usize;
            if let Some(e) = &p.exponential {
                let within = TimeDelta::from_std(e.keep_all_within).unwrap();
                let recent = all.iter().filter(|c| now() - c.time <= within).count();
                bound += recent + (e.hourly + e.daily + e.weekly) as usize;
                // Everything recent is kept.
                for c in all.iter().filter(|c| now() - c.time <= within) {
                    prop_assert!(keep.contains(&c.id));
                }
                // Every one of the last `hourly` hours that has a snapshot
                // keeps one of them.
                for k in 0..e.hourly as i64 {
                    let start = truncate_hour(now()) - TimeDelta::hours(k);
                    let in_bucket: Vec<_> = all
                        .iter()
                        .filter(|c| c.time >= start && c.time < start + TimeDelta::hours(1))
                        .collect();
                    if !in_bucket.is_empty() {
                        prop_assert!(in_bucket.iter().any(|c| keep.contains(&c.id)));
                    }
                }
            }
            // Bounded whatever the input size.
            prop_assert!(keep.len() <= bound, "{} > {}", keep.len(), bound);
            // Idempotent: applying it to what it kept deletes nothing more.
            let kept: Vec<Candidate> = all.iter().filter(|c| keep.contains(&c.id)).cloned().collect();
            prop_assert_eq!(p.keep(now(), &kept), keep);
        }

        // Time moving on never resurrects a deletion decision into a keep
        // for hourly buckets that are already complete: a snapshot deleted
        // now (not the newest of its hour) is not kept an hour later either.
        #[test]
        fn decisions_are_stable_over_time(all in timeline()) {
            let p = RetentionPolicy { keep_last: None, exponential: Some(Exponential {
                keep_all_within: Duration::ZERO, hourly: 48, daily: 0, weekly: 0 }) };
            let keep_now = p.keep(now(), &all);
            let later = now() + TimeDelta::hours(1);
            let kept: Vec<Candidate> = all.iter().filter(|c| keep_now.contains(&c.id)).cloned().collect();
            let keep_later = p.keep(later, &all);
            let keep_later_of_kept = p.keep(later, &kept);
            // Applying the policy now and again later keeps the same as
            // applying it only later (minus the always-kept newest ones).
            for id in &keep_later {
                let c = all.iter().find(|c| &c.id == id).unwrap();
                if c.time < truncate_hour(now()) {
                    prop_assert!(keep_later_of_kept.contains(id));
                }
            }
        }
    }
}
