//! Conversions between std time types and `google.protobuf.Duration` /
//! `google.protobuf.Timestamp`.
//!
//! prost-types has `From`/`TryFrom` impls, but they accept values outside the
//! ranges the protobuf spec allows (Duration within ±10 000 years, Timestamp in
//! years 1–9999). Other implementations reject such values, so grpcurl or a
//! JSON gateway would fail on a message we sent. These helpers enforce the
//! spec both ways and return an error instead of panicking or clamping, so a
//! bad field in a request becomes INVALID_ARGUMENT naming the field
//! ([`TimeError::into_status`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest `seconds` a `google.protobuf.Duration` may hold (10 000 years).
pub const MAX_DURATION_SECONDS: i64 = 315_576_000_000;
/// Earliest `seconds` of a `google.protobuf.Timestamp`: 0001-01-01T00:00:00Z.
pub const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
/// Latest `seconds` of a `google.protobuf.Timestamp`: 9999-12-31T23:59:59Z.
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

const NANOS_PER_SECOND: i32 = 1_000_000_000;

/// A time value that cannot be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// A protobuf Duration is negative where only non-negative spans make
    /// sense (std's Duration cannot hold it).
    #[error("duration must not be negative (got {seconds}s {nanos}ns)")]
    NegativeDuration {
        /// The `seconds` field received.
        seconds: i64,
        /// The `nanos` field received.
        nanos: i32,
    },
    /// A duration beyond ±10 000 years, the protobuf limit.
    #[error("duration exceeds the protobuf limit of {MAX_DURATION_SECONDS} seconds")]
    DurationOutOfRange,
    /// `nanos` outside ±999 999 999, or (for a Duration) of the other sign
    /// than `seconds`, or (for a Timestamp) negative.
    #[error("nanos {nanos} is out of range or has the wrong sign")]
    InvalidNanos {
        /// The `nanos` field received.
        nanos: i32,
    },
    /// A timestamp outside years 1–9999, the protobuf limit (or outside what
    /// the platform's SystemTime can hold).
    #[error("timestamp is outside 0001-01-01T00:00:00Z..=9999-12-31T23:59:59.999999999Z")]
    TimestampOutOfRange,
}

impl TimeError {
    /// An INVALID_ARGUMENT status naming the offending request field, e.g.
    /// `err.into_status("max_drain_duration")`.
    pub fn into_status(self, field: &str) -> tonic::Status {
        tonic::Status::invalid_argument(format!("field `{field}`: {self}"))
    }
}

/// std `Duration` to protobuf. Fails for spans over 10 000 years.
pub fn duration_to_proto(d: Duration) -> Result<prost_types::Duration, TimeError> {
    let seconds = i64::try_from(d.as_secs()).map_err(|_| TimeError::DurationOutOfRange)?;
    if seconds > MAX_DURATION_SECONDS {
        return Err(TimeError::DurationOutOfRange);
    }
    Ok(prost_types::Duration {
        seconds,
        // subsec_nanos() < 1e9, which always fits an i32.
        nanos: d.subsec_nanos() as i32,
    })
}

/// Protobuf Duration to std. Fails for negative or malformed values; every
/// duration in bulwark's API (timeouts, ages, latencies) is non-negative.
pub fn duration_from_proto(d: &prost_types::Duration) -> Result<Duration, TimeError> {
    let prost_types::Duration { seconds, nanos } = *d;
    if !(-NANOS_PER_SECOND < nanos && nanos < NANOS_PER_SECOND)
        || (seconds > 0 && nanos < 0)
        || (seconds < 0 && nanos > 0)
    {
        return Err(TimeError::InvalidNanos { nanos });
    }
    if seconds < 0 || nanos < 0 {
        return Err(TimeError::NegativeDuration { seconds, nanos });
    }
    if seconds > MAX_DURATION_SECONDS {
        return Err(TimeError::DurationOutOfRange);
    }
    // Both checked non-negative above.
    Ok(Duration::new(seconds as u64, nanos as u32))
}

/// `SystemTime` to protobuf Timestamp. Fails outside years 1–9999.
pub fn timestamp_to_proto(t: SystemTime) -> Result<prost_types::Timestamp, TimeError> {
    let (seconds, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => {
            let seconds =
                i64::try_from(after.as_secs()).map_err(|_| TimeError::TimestampOutOfRange)?;
            (seconds, after.subsec_nanos() as i32)
        }
        Err(before) => {
            // Before the epoch: Timestamp keeps nanos non-negative, so a
            // fractional second borrows one from `seconds`.
            let before = before.duration();
            let whole =
                i64::try_from(before.as_secs()).map_err(|_| TimeError::TimestampOutOfRange)?;
            match before.subsec_nanos() {
                0 => (-whole, 0),
                n => (-whole - 1, NANOS_PER_SECOND - n as i32),
            }
        }
    };
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&seconds) {
        return Err(TimeError::TimestampOutOfRange);
    }
    Ok(prost_types::Timestamp { seconds, nanos })
}

/// Protobuf Timestamp to `SystemTime`. Fails for malformed nanos or a time
/// outside years 1–9999.
pub fn timestamp_from_proto(t: &prost_types::Timestamp) -> Result<SystemTime, TimeError> {
    let prost_types::Timestamp { seconds, nanos } = *t;
    if !(0..NANOS_PER_SECOND).contains(&nanos) {
        return Err(TimeError::InvalidNanos { nanos });
    }
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&seconds) {
        return Err(TimeError::TimestampOutOfRange);
    }
    // nanos is in 0..1e9 here.
    let nanos = Duration::from_nanos(nanos as u64);
    let moved = if seconds >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(seconds.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(seconds.unsigned_abs()))
    };
    moved
        .and_then(|t| t.checked_add(nanos))
        .ok_or(TimeError::TimestampOutOfRange)
}
