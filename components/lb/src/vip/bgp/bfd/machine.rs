//! One BFD session's state machine (RFC 5880 §6.2, §6.8), asynchronous
//! mode, without echo, demand mode or authentication: pure, driven by the
//! session task ([`super::session`]) with received packets, the clock and
//! a random number for the jitter, so every transition is unit-tested.
//!
//! ```text
//!            Down/AdminDown ┌──────┐ Down          Init/Up ┌────┐
//!   (start) ───────────────▶│ Down │──────▶ Init ───────▶│ Up │
//!                           └──────┘  ▲        │         └────┘
//!                  detection time,    │ Init/Up│              │ Down, AdminDown,
//!                  Down, AdminDown    └────────┼──────────────┘ detection time
//!                                              ▼
//!                                          Up (from Init)
//! ```
//!
//! Timing (§6.8.2–§6.8.4): we transmit every max(our desired min TX,
//! their required min RX), less 0–25% jitter (10–25% with a multiplier of
//! 1); while not Up our desired min TX is at least one second. The remote
//! is declared down after its detect multiplier × max(our required min
//! RX, its desired min TX) without a valid packet. Becoming Up lowers our
//! TX interval, which a Poll announces until the peer's Final.

use std::time::Duration;

use tokio::time::Instant;

use super::packet::{Diag, Error, Packet, State};

/// The slowest-start rule of §6.8.3: at most one packet a second while
/// the session is not Up.
pub const SLOW: Duration = Duration::from_secs(1);

/// What an operator configures for a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    /// Our desired min TX and required min RX interval.
    pub interval: Duration,
    /// Our detect multiplier (what the peer multiplies by).
    pub multiplier: u8,
}

/// A state change, with the diagnostic that explains it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// From.
    pub from: State,
    /// To.
    pub to: State,
    /// Why (our bfd.LocalDiag after the change).
    pub diag: Diag,
}

/// One session (RFC 5880's `bfd.*` variables).
#[derive(Clone, Debug)]
pub struct Machine {
    timers: Timers,
    local_discr: u32,
    remote_discr: u32,
    state: State,
    remote_state: State,
    diag: Diag,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_mult: u8,
    /// A Poll sequence is in progress (P on every packet until a Final).
    poll: bool,
    /// The peer polled: the next packet carries F, sent at once.
    final_due: bool,
    /// When the peer is declared down without another valid packet.
    detect_at: Option<Instant>,
}

impl Machine {
    /// A session in Down with our discriminator `local_discr` (non-zero,
    /// unique among our sessions).
    pub fn new(timers: Timers, local_discr: u32) -> Self {
        Self {
            timers,
            local_discr: local_discr.max(1),
            remote_discr: 0,
            state: State::Down,
            remote_state: State::Down,
            diag: Diag::NONE,
            // §6.8.1: initialised to 1 µs, so the first packets go out.
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: Duration::ZERO,
            remote_mult: 0,
            poll: false,
            final_due: false,
            detect_at: None,
        }
    }

    /// Our state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The peer's state as it last said.
    pub fn remote_state(&self) -> State {
        self.remote_state
    }

    /// Our discriminator.
    pub fn local_discriminator(&self) -> u32 {
        self.local_discr
    }

    /// The desired min TX we advertise: at least [`SLOW`] unless Up.
    fn desired_tx(&self) -> Duration {
        if self.state == State::Up {
            self.timers.interval
        } else {
            self.timers.interval.max(SLOW)
        }
    }

    /// The agreed TX interval, before jitter; `None` while the peer asks
    /// for no packets (required min RX zero).
    pub fn tx_interval(&self) -> Option<Duration> {
        (!self.remote_min_rx.is_zero()).then(|| self.desired_tx().max(self.remote_min_rx))
    }

    /// The wait before the next periodic packet; `r` is uniform in [0, 1).
    pub fn next_tx(&self, r: f64) -> Option<Duration> {
        let r = r.clamp(0.0, 1.0);
        let i = self.tx_interval()?;
        // §6.8.7: 75–100% of the interval; 75–90% with a multiplier of 1.
        let f = if self.timers.multiplier == 1 {
            0.9 - 0.15 * r
        } else {
            1.0 - 0.25 * r
        };
        Some(i.mul_f64(f))
    }

    /// How long the peer may be silent (§6.8.4); zero until it was heard.
    pub fn detection_time(&self) -> Duration {
        self.timers.interval.max(self.remote_desired_tx) * u32::from(self.remote_mult)
    }

    /// When the detection timer fires, if it runs.
    pub fn detect_at(&self) -> Option<Instant> {
        self.detect_at
    }

    /// Whether a packet should go out now, ahead of the periodic timer
    /// (a Final owed to the peer).
    pub fn final_due(&self) -> bool {
        self.final_due
    }

    /// The next packet to send; sending it pays any Final owed.
    pub fn packet(&mut self) -> Packet {
        let final_ = std::mem::take(&mut self.final_due);
        Packet {
            diag: self.diag,
            state: self.state,
            // A packet never carries both (§6.8.7).
            poll: self.poll && !final_,
            final_,
            control_plane_independent: false,
            demand: false,
            detect_mult: self.timers.multiplier,
            my_discriminator: self.local_discr,
            your_discriminator: self.remote_discr,
            desired_min_tx: self.desired_tx(),
            required_min_rx: self.timers.interval,
            required_min_echo_rx: Duration::ZERO,
        }
    }

    /// What a shutting-down speaker sends last: AdminDown, so the peer
    /// knows the silence that follows is deliberate (§6.8.16).
    pub fn admin_down(&mut self) -> Packet {
        self.state = State::AdminDown;
        self.diag = Diag::ADMIN_DOWN;
        self.poll = false;
        self.packet()
    }

    fn go(&mut self, to: State, diag: Diag) -> Option<Change> {
        if to == self.state {
            return None;
        }
        let from = self.state;
        self.state = to;
        self.diag = diag;
        if to == State::Up {
            // Our desired TX drops from the slow rate: tell the peer.
            self.poll = self.timers.interval != self.timers.interval.max(SLOW);
        } else {
            self.poll = false;
        }
        Some(Change { from, to, diag })
    }

    /// A valid packet from the peer (§6.8.6, after the packet checks of
    /// [`Packet::decode`]); `Err` when it names another session.
    pub fn receive(&mut self, p: &Packet, now: Instant) -> Result<Option<Change>, Error> {
        if p.your_discriminator != 0 && p.your_discriminator != self.local_discr {
            return Err(Error::Discriminator {
                got: p.your_discriminator,
                ours: self.local_discr,
            });
        }
        self.remote_discr = p.my_discriminator;
        self.remote_state = p.state;
        self.remote_min_rx = p.required_min_rx;
        self.remote_desired_tx = p.desired_min_tx;
        self.remote_mult = p.detect_mult;
        if p.final_ {
            self.poll = false;
        }
        if p.poll {
            self.final_due = true;
        }
        self.detect_at = Some(now + self.detection_time());
        if self.state == State::AdminDown {
            return Ok(None);
        }
        let change = match (self.state, p.state) {
            (State::Down, _) | (State::Init, _) | (State::Up, _) if p.state == State::AdminDown => {
                self.go(State::Down, Diag::NEIGHBOR_DOWN)
            }
            (State::Down, State::Down) => self.go(State::Init, Diag::NONE),
            (State::Down, State::Init) => self.go(State::Up, Diag::NONE),
            (State::Init, State::Init | State::Up) => self.go(State::Up, Diag::NONE),
            (State::Up, State::Down) => self.go(State::Down, Diag::NEIGHBOR_DOWN),
            _ => None,
        };
        Ok(change)
    }

    /// The detection timer at `now`: past it in Init or Up, the session
    /// goes Down (diag 1) and the peer is forgotten (§6.8.1, §6.8.4).
    pub fn expire(&mut self, now: Instant) -> Option<Change> {
        if self.detect_at.is_none_or(|at| now < at) {
            return None;
        }
        self.detect_at = None;
        self.remote_discr = 0;
        self.remote_state = State::Down;
        self.remote_min_rx = Duration::from_micros(1);
        self.remote_desired_tx = Duration::ZERO;
        self.remote_mult = 0;
        self.final_due = false;
        match self.state {
            State::Init | State::Up => self.go(State::Down, Diag::DETECT_EXPIRED),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timers = Timers {
        interval: Duration::from_millis(100),
        multiplier: 3,
    };

    /// The peer's packet: its discriminator 0xb1, ours as it knows it.
    fn from_peer(state: State, your: u32) -> Packet {
        Packet {
            state,
            detect_mult: 5,
            my_discriminator: 0xb1,
            your_discriminator: your,
            desired_min_tx: Duration::from_millis(20),
            required_min_rx: Duration::from_millis(10),
            ..Packet::default()
        }
    }

    /// Down → Init → Up the way two speakers do it (three-way handshake).
    fn up(now: Instant) -> Machine {
        let mut m = Machine::new(T, 0xa1);
        let c = m.receive(&from_peer(State::Down, 0), now).unwrap();
        assert_eq!(
            c,
            Some(Change {
                from: State::Down,
                to: State::Init,
                diag: Diag::NONE
            })
        );
        let c = m.receive(&from_peer(State::Init, 0xa1), now).unwrap();
        assert_eq!(c.map(|c| c.to), Some(State::Up));
        m
    }

    #[test]
    fn three_way_handshake_and_both_ways_to_up() {
        let now = Instant::now();
        let m = up(now);
        assert_eq!(m.state(), State::Up);
        // Down hearing Init goes straight to Up.
        let mut m = Machine::new(T, 0xa1);
        let c = m.receive(&from_peer(State::Init, 0xa1), now).unwrap();
        assert_eq!(c.map(|c| (c.from, c.to)), Some((State::Down, State::Up)));
        // Init hearing Up goes Up; Up hearing Up or Init stays.
        let mut m = Machine::new(T, 0xa1);
        m.receive(&from_peer(State::Down, 0), now).unwrap();
        assert_eq!(
            m.receive(&from_peer(State::Up, 0xa1), now)
                .unwrap()
                .map(|c| c.to),
            Some(State::Up)
        );
        assert_eq!(m.receive(&from_peer(State::Up, 0xa1), now), Ok(None));
        assert_eq!(m.receive(&from_peer(State::Init, 0xa1), now), Ok(None));
        // Down hearing Up (a stale peer) stays Down.
        let mut m = Machine::new(T, 0xa1);
        assert_eq!(m.receive(&from_peer(State::Up, 0xa1), now), Ok(None));
        assert_eq!(m.state(), State::Down);
    }

    #[test]
    fn the_peer_going_down_or_admin_down_takes_us_down() {
        let now = Instant::now();
        let mut m = up(now);
        let c = m.receive(&from_peer(State::Down, 0xa1), now).unwrap();
        assert_eq!(
            c,
            Some(Change {
                from: State::Up,
                to: State::Down,
                diag: Diag::NEIGHBOR_DOWN
            })
        );
        assert_eq!(m.packet().diag, Diag::NEIGHBOR_DOWN);
        let mut m = up(now);
        let c = m.receive(&from_peer(State::AdminDown, 0xa1), now).unwrap();
        assert_eq!(
            c.map(|c| (c.to, c.diag)),
            Some((State::Down, Diag::NEIGHBOR_DOWN))
        );
        // Our own AdminDown ignores everything after it.
        let mut m = up(now);
        let p = m.admin_down();
        assert_eq!((p.state, p.diag), (State::AdminDown, Diag::ADMIN_DOWN));
        assert_eq!(m.receive(&from_peer(State::Down, 0xa1), now), Ok(None));
        assert_eq!(m.state(), State::AdminDown);
    }

    #[test]
    fn a_packet_for_another_session_is_refused_and_changes_nothing() {
        let now = Instant::now();
        let mut m = up(now);
        let e = m.receive(&from_peer(State::Down, 0xdead), now).unwrap_err();
        assert_eq!(
            e,
            Error::Discriminator {
                got: 0xdead,
                ours: 0xa1
            }
        );
        assert_eq!(m.state(), State::Up);
    }

    #[test]
    fn intervals_are_negotiated_and_detection_uses_their_multiplier() {
        let now = Instant::now();
        let mut m = Machine::new(T, 0xa1);
        // Not up: at most one packet a second, whatever the peer allows.
        assert_eq!(m.packet().desired_min_tx, SLOW);
        assert_eq!(m.tx_interval(), Some(SLOW));
        let mut m = up(now);
        // Up: max(our 100ms desired TX, their 10ms required RX).
        assert_eq!(m.tx_interval(), Some(Duration::from_millis(100)));
        // Their 5 × max(our 100ms required RX, their 20ms desired TX).
        assert_eq!(m.detection_time(), Duration::from_millis(500));
        assert_eq!(m.detect_at(), Some(now + Duration::from_millis(500)));
        // A slower peer slows us down and lengthens detection.
        let mut slow = from_peer(State::Up, 0xa1);
        slow.required_min_rx = Duration::from_millis(300);
        slow.desired_min_tx = Duration::from_millis(250);
        slow.detect_mult = 3;
        m.receive(&slow, now).unwrap();
        assert_eq!(m.tx_interval(), Some(Duration::from_millis(300)));
        assert_eq!(m.detection_time(), Duration::from_millis(750));
        // A peer that wants no packets gets none (but still its Finals).
        slow.required_min_rx = Duration::ZERO;
        m.receive(&slow, now).unwrap();
        assert_eq!(m.tx_interval(), None);
        assert_eq!(m.next_tx(0.5), None);
    }

    #[test]
    fn jitter_stays_in_the_rfc_bounds() {
        let m = up(Instant::now());
        let i = Duration::from_millis(100);
        assert_eq!(m.next_tx(0.0), Some(i));
        assert_eq!(m.next_tx(1.0), Some(i.mul_f64(0.75)));
        for k in 0..100 {
            let d = m.next_tx(f64::from(k) / 100.0).unwrap();
            assert!(d <= i && d >= i.mul_f64(0.75), "{d:?}");
        }
        let mut one = Machine::new(Timers { multiplier: 1, ..T }, 7);
        one.receive(&from_peer(State::Init, 7), Instant::now())
            .unwrap();
        for k in 0..=100 {
            let d = one.next_tx(f64::from(k) / 100.0).unwrap();
            assert!(d <= i.mul_f64(0.9) && d >= i.mul_f64(0.75), "{d:?}");
        }
    }

    #[test]
    fn detection_time_expiry_goes_down_only_from_init_or_up() {
        let now = Instant::now();
        let mut m = up(now);
        let at = m.detect_at().unwrap();
        assert_eq!(m.expire(at - Duration::from_millis(1)), None);
        assert_eq!(
            m.expire(at),
            Some(Change {
                from: State::Up,
                to: State::Down,
                diag: Diag::DETECT_EXPIRED
            })
        );
        // The peer is forgotten: the next packets say so.
        let p = m.packet();
        assert_eq!((p.your_discriminator, p.state), (0, State::Down));
        assert_eq!(m.detect_at(), None);
        assert_eq!(m.expire(at + Duration::from_secs(9)), None);
        // A Down session whose peer fell silent forgets it, silently.
        let mut m = Machine::new(T, 0xa1);
        m.receive(&from_peer(State::AdminDown, 0), now).unwrap();
        assert_eq!(m.expire(now + Duration::from_secs(9)), None);
        assert_eq!(m.packet().your_discriminator, 0);
    }

    #[test]
    fn poll_and_final() {
        let now = Instant::now();
        let mut m = up(now);
        // Becoming Up lowered our TX interval: a Poll until the Final.
        assert!(m.packet().poll);
        assert!(m.packet().poll);
        let mut f = from_peer(State::Up, 0xa1);
        f.final_ = true;
        m.receive(&f, now).unwrap();
        assert!(!m.packet().poll, "the Final ends the Poll sequence");
        // The peer polls: the next packet (and only it) carries F, not P.
        let mut p = from_peer(State::Up, 0xa1);
        p.poll = true;
        m.receive(&p, now).unwrap();
        assert!(m.final_due());
        let answer = m.packet();
        assert!(answer.final_ && !answer.poll);
        assert!(!m.final_due());
        assert!(!m.packet().final_);
        // No Poll when the interval is already the slow one.
        let mut slow = Machine::new(
            Timers {
                interval: Duration::from_secs(2),
                multiplier: 3,
            },
            9,
        );
        slow.receive(&from_peer(State::Init, 9), now).unwrap();
        assert_eq!(slow.state(), State::Up);
        assert!(!slow.packet().poll);
    }
}
