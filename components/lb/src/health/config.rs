//! The `health:` section of the LB configuration: how many zones must agree,
//! how many probers at least, and when a silent prober stops counting.

use std::fmt;
use std::time::Duration;

use bulwark_common::config::{Validate, Validator};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// How many reporting zones must agree before a verdict other than
/// `Unknown` is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZoneQuorum {
    /// More than half of the zones that report on the backend
    /// (`zoneQuorum: majority`). With one zone reporting that zone decides,
    /// which is what a single-zone cluster needs.
    #[default]
    Majority,
    /// At least this many zones (`zoneQuorum: 2`). When fewer zones report,
    /// no verdict is reached and the backend stays routable (`Unknown`).
    Zones(u32),
}

impl ZoneQuorum {
    /// Zones that must agree when `reporting` zones have counted probers.
    pub fn required(self, reporting: usize) -> usize {
        match self {
            ZoneQuorum::Majority => reporting / 2 + 1,
            ZoneQuorum::Zones(n) => n as usize,
        }
    }
}

impl fmt::Display for ZoneQuorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ZoneQuorum::Majority => f.write_str("majority"),
            ZoneQuorum::Zones(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for ZoneQuorum {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ZoneQuorum::Majority => s.serialize_str("majority"),
            ZoneQuorum::Zones(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for ZoneQuorum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ZoneQuorum;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"majority\" or a number of zones (1 or more)")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ZoneQuorum, E> {
                match s {
                    "majority" => Ok(ZoneQuorum::Majority),
                    _ => s
                        .parse::<u32>()
                        .map_err(|_| E::invalid_value(de::Unexpected::Str(s), &self))
                        .and_then(|n| self.visit_u64(u64::from(n))),
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ZoneQuorum, E> {
                match u32::try_from(n) {
                    Ok(n) if n >= 1 => Ok(ZoneQuorum::Zones(n)),
                    _ => Err(E::invalid_value(de::Unexpected::Unsigned(n), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ZoneQuorum, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Signed(n), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Aggregation rules (see docs/HEALTH.md for the reasoning behind the
/// defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthConfig {
    /// Zones that must agree on Down/Draining/Healthy.
    #[serde(default)]
    pub zone_quorum: ZoneQuorum,
    /// Counted probers that must see a backend failing before it is Down or
    /// Draining, whatever the zones say: one prober alone never evicts.
    /// Set it to 1 only for a cluster with a single prober.
    #[serde(default = "default_min_votes")]
    pub min_votes: u32,
    /// Interval at which probers are asked to send heartbeats when nothing
    /// changes (sent to them in every ack).
    #[serde(
        default = "default_heartbeat_interval",
        with = "bulwark_common::config::duration"
    )]
    pub heartbeat_interval: Duration,
    /// A prober silent for this long is stale: its votes stop counting
    /// until it reports again. About three heartbeats.
    #[serde(
        default = "default_stale_after",
        with = "bulwark_common::config::duration"
    )]
    pub stale_after: Duration,
}

fn default_min_votes() -> u32 {
    2
}

fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_stale_after() -> Duration {
    Duration::from_secs(3)
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            zone_quorum: ZoneQuorum::default(),
            min_votes: default_min_votes(),
            heartbeat_interval: default_heartbeat_interval(),
            stale_after: default_stale_after(),
        }
    }
}

impl Validate for HealthConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            self.min_votes >= 1,
            "minVotes",
            "must be at least 1 (2 or more keeps one prober from evicting alone)",
        );
        v.duration_in(
            "heartbeatInterval",
            self.heartbeat_interval,
            Duration::from_millis(100),
            Duration::from_secs(60),
        );
        v.check(
            self.stale_after >= self.heartbeat_interval * 2,
            "staleAfter",
            format!(
                "{} is too short: expected at least two heartbeat intervals ({})",
                ms(self.stale_after),
                ms(self.heartbeat_interval * 2)
            ),
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Wrap {
        q: ZoneQuorum,
    }

    fn q(yaml: &str) -> Result<ZoneQuorum, String> {
        serde_yaml_ng::from_str::<Wrap>(&format!("q: {yaml}"))
            .map(|w| w.q)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn zone_quorum_reads_majority_or_a_count() {
        assert_eq!(q("majority"), Ok(ZoneQuorum::Majority));
        assert_eq!(q("2"), Ok(ZoneQuorum::Zones(2)));
        assert_eq!(q("\"3\""), Ok(ZoneQuorum::Zones(3)));
        for bad in ["0", "-1", "most", "1.5"] {
            let e = q(bad).unwrap_err();
            assert!(
                e.contains("\"majority\" or a number of zones"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn quorum_sizes() {
        assert_eq!(ZoneQuorum::Majority.required(1), 1);
        assert_eq!(ZoneQuorum::Majority.required(2), 2);
        assert_eq!(ZoneQuorum::Majority.required(3), 2);
        assert_eq!(ZoneQuorum::Majority.required(4), 3);
        assert_eq!(ZoneQuorum::Zones(2).required(1), 2);
    }

    #[test]
    fn validation_names_fields() {
        let c = HealthConfig {
            min_votes: 0,
            stale_after: Duration::from_millis(1500),
            ..Default::default()
        };
        let errs: Vec<String> = bulwark_common::config::validate_at("health", &c)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("health.minVotes:"), "{errs:?}");
        assert!(errs[1].starts_with("health.staleAfter: 1500ms"), "{errs:?}");
        assert!(bulwark_common::config::validate_at("", &HealthConfig::default()).is_empty());
    }
}
