//! From observations to a verdict: one prober's view of a backend, one
//! zone's view, and the cross-zone decision.
//!
//! The rules, in order (docs/HEALTH.md explains why):
//!
//! 1. A prober's *view* of a backend: **Down** when `/livez` or the TCP
//!    connect fails, or `/readyz` fails without any sign of life (no HTTP
//!    answer and no `/livez`); **NotReady** when `/readyz` fails while the
//!    server is alive (`/livez` passes, or `/readyz` answered with an HTTP
//!    status); **Up** otherwise. etcd observations are not about backends.
//! 2. A zone's view, from its *counted* probers (fresh, not isolated):
//!    Down when more than half see Down, NotReady when more than half see
//!    NotReady or Down, Up otherwise. A zone with no counted prober does
//!    not report.
//! 3. The verdict, with `q` = the zone quorum of the reporting zones:
//!    Down when ≥ q zones are Down and at least `minVotes` counted probers
//!    see Down; else Draining when ≥ q zones are NotReady-or-Down and at
//!    least `minVotes` probers see that; else Healthy when ≥ q zones are
//!    Up; else Unknown (no zone reports, or the zones disagree).
//!
//! Unknown is routable, so every path that lacks agreement keeps traffic
//! flowing; only agreement removes a backend.

use std::collections::BTreeMap;

use bulwark_api::lb::v1::{Observation, ProbeKind, ProbeReason};

use super::config::HealthConfig;
use crate::backends::Verdict;

/// How one prober (or one zone) sees one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum View {
    /// Ready.
    Up,
    /// Alive but `/readyz` failing (shutting down, or not ready yet).
    NotReady,
    /// Unreachable, or not alive.
    Down,
}

/// The probes of one prober on one backend, by kind.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Probes<'a> {
    pub readyz: Option<&'a Observation>,
    pub livez: Option<&'a Observation>,
    pub tcp: Option<&'a Observation>,
}

impl<'a> Probes<'a> {
    pub fn add(&mut self, kind: ProbeKind, o: &'a Observation) {
        match kind {
            ProbeKind::Readyz => self.readyz = Some(o),
            ProbeKind::Livez => self.livez = Some(o),
            ProbeKind::Tcp => self.tcp = Some(o),
            ProbeKind::Etcd | ProbeKind::Unspecified => {}
        }
    }

    /// Rule 1. `None` when this prober has nothing on the backend.
    pub fn view(&self) -> Option<View> {
        if self.readyz.is_none() && self.livez.is_none() && self.tcp.is_none() {
            return None;
        }
        let failed = |o: Option<&Observation>| o.is_some_and(|o| !o.ok);
        if failed(self.livez) || failed(self.tcp) {
            return Some(View::Down);
        }
        match self.readyz {
            Some(r) if !r.ok => {
                let answered =
                    r.http_status.is_some() || r.reason == ProbeReason::HttpStatus as i32;
                if self.livez.is_some() || answered {
                    Some(View::NotReady)
                } else {
                    Some(View::Down)
                }
            }
            _ => Some(View::Up),
        }
    }

    /// The failing observation that best explains `view`, for reasons.
    pub fn culprit(&self) -> Option<&'a Observation> {
        [self.livez, self.tcp, self.readyz]
            .into_iter()
            .flatten()
            .find(|o| !o.ok)
    }
}

/// One zone's counted votes on one backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneTally {
    /// Counted probers seeing Up.
    pub up: u32,
    /// Counted probers seeing NotReady.
    pub not_ready: u32,
    /// Counted probers seeing Down.
    pub down: u32,
    /// Probers of the zone with a view that do not count (stale, isolated).
    pub ignored: u32,
}

impl ZoneTally {
    /// Rule 2. `None` when no counted prober of the zone has a view.
    pub fn view(&self) -> Option<View> {
        let n = self.up + self.not_ready + self.down;
        if n == 0 {
            None
        } else if self.down * 2 > n {
            Some(View::Down)
        } else if (self.down + self.not_ready) * 2 > n {
            Some(View::NotReady)
        } else {
            Some(View::Up)
        }
    }

    pub(super) fn count(&mut self, view: View) {
        match view {
            View::Up => self.up += 1,
            View::NotReady => self.not_ready += 1,
            View::Down => self.down += 1,
        }
    }
}

/// A verdict with its one-line explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The verdict.
    pub verdict: Verdict,
    /// Why, e.g. "down in 2/3 zones (connection refused)".
    pub reason: String,
}

/// Rule 3, over the tallies of every zone. `down_failure` and
/// `bad_failure` name the most common failing observation among the counted
/// Down votes and among all failing votes, for the reason text.
pub(super) fn decide(
    zones: &BTreeMap<String, ZoneTally>,
    config: &HealthConfig,
    down_failure: Option<String>,
    bad_failure: Option<String>,
) -> Decision {
    let mut reporting = 0usize;
    let (mut down_zones, mut bad_zones, mut up_zones) = (0usize, 0usize, 0usize);
    let (mut down_votes, mut bad_votes) = (0u32, 0u32);
    for tally in zones.values() {
        down_votes += tally.down;
        bad_votes += tally.down + tally.not_ready;
        match tally.view() {
            None => continue,
            Some(View::Down) => {
                down_zones += 1;
                bad_zones += 1;
            }
            Some(View::NotReady) => bad_zones += 1,
            Some(View::Up) => up_zones += 1,
        }
        reporting += 1;
    }
    let q = config.zone_quorum.required(reporting);
    let because = |f: Option<String>| f.map(|f| format!(" ({f})")).unwrap_or_default();
    let (verdict, reason) = if reporting == 0 {
        (Verdict::Unknown, "no counted prober observes it".to_owned())
    } else if down_zones >= q && down_votes >= config.min_votes {
        (
            Verdict::Down,
            format!(
                "down in {down_zones}/{reporting} zones{}",
                because(down_failure)
            ),
        )
    } else if bad_zones >= q && bad_votes >= config.min_votes {
        (
            Verdict::Draining,
            format!(
                "readyz failing while alive in {bad_zones}/{reporting} zones{}",
                because(bad_failure)
            ),
        )
    } else if up_zones >= q {
        (
            Verdict::Healthy,
            format!("up in {up_zones}/{reporting} zones"),
        )
    } else {
        (
            Verdict::Unknown,
            format!(
                "no agreement: up in {up_zones}, failing in {bad_zones} of {reporting} zones \
                 (quorum {q}), {bad_votes} failing votes (at least {} needed)",
                config.min_votes
            ),
        )
    };
    Decision { verdict, reason }
}

/// A short human label of a failing observation: "connection refused",
/// "HTTP 500", "timeout".
pub(super) fn failure_label(o: &Observation) -> String {
    match ProbeReason::try_from(o.reason) {
        Ok(ProbeReason::HttpStatus) => match o.http_status {
            Some(code) => format!("HTTP {code}"),
            None => "HTTP error".to_owned(),
        },
        Ok(ProbeReason::Timeout) => "timeout".to_owned(),
        Ok(ProbeReason::TlsError) => "TLS error".to_owned(),
        Ok(ProbeReason::ConnectionRefused) => "connection refused".to_owned(),
        Ok(ProbeReason::ConnectionReset) => "connection reset".to_owned(),
        Ok(ProbeReason::Dns) => "DNS failure".to_owned(),
        Ok(ProbeReason::Ok) => "ok".to_owned(),
        Ok(ProbeReason::Other | ProbeReason::Unspecified) | Err(_) => "probe failed".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(ok: bool, reason: ProbeReason, http: Option<u32>) -> Observation {
        Observation {
            ok,
            reason: reason as i32,
            http_status: http,
            ..Default::default()
        }
    }

    #[test]
    fn prober_views() {
        let up = obs(true, ProbeReason::Ok, Some(200));
        let http500 = obs(false, ProbeReason::HttpStatus, Some(500));
        let refused = obs(false, ProbeReason::ConnectionRefused, None);
        let view = |r: Option<&Observation>, l: Option<&Observation>, t: Option<&Observation>| {
            Probes {
                readyz: r,
                livez: l,
                tcp: t,
            }
            .view()
        };
        assert_eq!(view(None, None, None), None);
        assert_eq!(view(Some(&up), Some(&up), None), Some(View::Up));
        assert_eq!(view(Some(&http500), Some(&up), None), Some(View::NotReady));
        assert_eq!(view(Some(&refused), Some(&up), None), Some(View::NotReady));
        assert_eq!(view(Some(&up), Some(&refused), None), Some(View::Down));
        // Without livez, an HTTP answer still shows the server is alive.
        assert_eq!(view(Some(&http500), None, None), Some(View::NotReady));
        assert_eq!(view(Some(&refused), None, None), Some(View::Down));
        assert_eq!(view(None, None, Some(&refused)), Some(View::Down));
        assert_eq!(view(Some(&up), None, Some(&refused)), Some(View::Down));
    }

    #[test]
    fn zone_views_use_strict_majorities() {
        let t = |up, not_ready, down| ZoneTally {
            up,
            not_ready,
            down,
            ignored: 0,
        };
        assert_eq!(t(0, 0, 0).view(), None);
        assert_eq!(t(1, 0, 1).view(), Some(View::Up));
        assert_eq!(t(0, 1, 1).view(), Some(View::NotReady));
        assert_eq!(t(1, 0, 2).view(), Some(View::Down));
        assert_eq!(t(1, 1, 1).view(), Some(View::NotReady));
    }

    #[test]
    fn decisions_and_reasons() {
        let config = HealthConfig::default();
        let zones = |v: &[(&str, u32, u32, u32)]| {
            v.iter()
                .map(|(z, up, nr, down)| {
                    (
                        (*z).to_owned(),
                        ZoneTally {
                            up: *up,
                            not_ready: *nr,
                            down: *down,
                            ignored: 0,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>()
        };
        let d = decide(
            &zones(&[("a", 0, 0, 1), ("b", 0, 0, 1), ("c", 1, 0, 0)]),
            &config,
            Some("connection refused".into()),
            None,
        );
        assert_eq!(d.verdict, Verdict::Down);
        assert_eq!(d.reason, "down in 2/3 zones (connection refused)");

        let d = decide(
            &zones(&[("a", 0, 1, 0), ("b", 0, 0, 1), ("c", 1, 0, 0)]),
            &config,
            None,
            Some("HTTP 500".into()),
        );
        assert_eq!(d.verdict, Verdict::Draining);
        assert_eq!(
            d.reason,
            "readyz failing while alive in 2/3 zones (HTTP 500)"
        );

        // One zone with one prober: minVotes keeps it from evicting.
        let d = decide(&zones(&[("a", 0, 0, 1)]), &config, None, None);
        assert_eq!(d.verdict, Verdict::Unknown);
        assert!(d.reason.starts_with("no agreement"), "{}", d.reason);

        let d = decide(
            &zones(&[("a", 1, 0, 0), ("b", 0, 0, 1)]),
            &config,
            None,
            None,
        );
        assert_eq!(d.verdict, Verdict::Unknown);

        let d = decide(
            &zones(&[("a", 1, 0, 0), ("b", 1, 0, 0)]),
            &config,
            None,
            None,
        );
        assert_eq!(d.verdict, Verdict::Healthy);
        assert_eq!(d.reason, "up in 2/2 zones");

        assert_eq!(
            decide(&BTreeMap::new(), &config, None, None).verdict,
            Verdict::Unknown
        );
    }
}
