//! The BFD control packet (RFC 5880 §4.1) and its strict decoder, with the
//! reception checks of §6.8.6 that need nothing but the packet itself.
//!
//! bulwark-lb uses no BFD authentication, so a packet with the A bit is
//! refused (§6.8.6: "if the A bit is set and no authentication is in use,
//! the packet MUST be discarded"); the decoder never trusts the length
//! field and never panics (fuzzed: fuzz/fuzz_targets/bfd.rs).

use std::time::Duration;

/// The length of a control packet without an authentication section.
pub const LEN: usize = 24;
/// The only version there is.
pub const VERSION: u8 = 1;

/// A session state as the packet carries it (§4.1, "Sta").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum State {
    /// Held down by its operator.
    AdminDown,
    /// Down (the initial state).
    #[default]
    Down,
    /// The remote end was heard, which has not yet heard us.
    Init,
    /// Both ends hear each other.
    Up,
}

impl State {
    fn from_bits(bits: u8) -> Self {
        match bits & 0b11 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }

    fn bits(self) -> u8 {
        match self {
            State::AdminDown => 0,
            State::Down => 1,
            State::Init => 2,
            State::Up => 3,
        }
    }

    /// RFC 5880's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::AdminDown => "AdminDown",
            State::Down => "Down",
            State::Init => "Init",
            State::Up => "Up",
        }
    }
}

/// The diagnostic code (§4.1, "Diag"): why the sender's session last went
/// down. Values 9–31 are unassigned; they are carried as they came.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Diag(pub u8);

impl Diag {
    /// No diagnostic.
    pub const NONE: Diag = Diag(0);
    /// Control Detection Time Expired.
    pub const DETECT_EXPIRED: Diag = Diag(1);
    /// Neighbor Signaled Session Down.
    pub const NEIGHBOR_DOWN: Diag = Diag(3);
    /// Administratively Down.
    pub const ADMIN_DOWN: Diag = Diag(7);

    /// RFC 5880's wording.
    pub fn describe(self) -> &'static str {
        match self.0 {
            0 => "no diagnostic",
            1 => "control detection time expired",
            2 => "echo function failed",
            3 => "neighbor signaled session down",
            4 => "forwarding plane reset",
            5 => "path down",
            6 => "concatenated path down",
            7 => "administratively down",
            8 => "reverse concatenated path down",
            _ => "unassigned diagnostic",
        }
    }
}

/// One control packet, without an authentication section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    /// Why the sender last went down.
    pub diag: Diag,
    /// The sender's state.
    pub state: State,
    /// P: the sender asks for a Final (a parameter change).
    pub poll: bool,
    /// F: the answer to a Poll.
    pub final_: bool,
    /// C: the sender's BFD does not share fate with its control plane.
    pub control_plane_independent: bool,
    /// D: the sender wants demand mode (never asked for by us).
    pub demand: bool,
    /// The sender's detection time multiplier.
    pub detect_mult: u8,
    /// The sender's discriminator for this session (non-zero).
    pub my_discriminator: u32,
    /// The receiver's discriminator as the sender knows it (zero: not yet).
    pub your_discriminator: u32,
    /// The fastest the sender wants to transmit.
    pub desired_min_tx: Duration,
    /// The fastest the sender can receive (zero: send nothing).
    pub required_min_rx: Duration,
    /// The fastest the sender can receive echo packets (zero: none).
    pub required_min_echo_rx: Duration,
}

/// Why a received packet was discarded (RFC 5880 §6.8.6, RFC 5881 §5).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Shorter than a control packet.
    #[error("{0} bytes is shorter than a BFD control packet (24)")]
    Short(usize),
    /// Not version 1.
    #[error("BFD version {0}, only 1 exists")]
    Version(u8),
    /// The length field disagrees with the datagram.
    #[error("length field {field} does not match the {got}-byte datagram")]
    Length {
        /// What the packet says.
        field: u8,
        /// What arrived.
        got: usize,
    },
    /// The A bit: authentication, which bulwark does not configure.
    #[error("authenticated BFD packet, but no authentication is configured")]
    Authenticated,
    /// The M bit (reserved for multipoint).
    #[error("multipoint bit set")]
    Multipoint,
    /// A detection multiplier of zero.
    #[error("detect multiplier 0")]
    ZeroMultiplier,
    /// A zero My Discriminator.
    #[error("My Discriminator is 0")]
    ZeroDiscriminator,
    /// Your Discriminator zero outside Down and AdminDown.
    #[error("Your Discriminator is 0 in state {0}")]
    NoYourDiscriminator(&'static str),
    /// Both Poll and Final.
    #[error("both Poll and Final set")]
    PollAndFinal,
    /// Not sent with TTL (hop limit) 255: off-link (RFC 5881 §5, GTSM).
    #[error("TTL/hop limit {0}, not 255: not from a directly connected peer")]
    Ttl(u8),
    /// The kernel gave no TTL for the datagram.
    #[error("no TTL/hop limit came with the datagram")]
    NoTtl,
    /// Your Discriminator names another session (§6.8.6).
    #[error("Your Discriminator {got:#x} is not this session's ({ours:#x})")]
    Discriminator {
        /// What the packet says.
        got: u32,
        /// Ours.
        ours: u32,
    },
    /// From an address no session is configured for.
    #[error("from {0}, which is no configured BFD peer")]
    UnknownPeer(std::net::IpAddr),
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn from_micros(b: &[u8]) -> Duration {
    // Callers pass 4 bytes sliced from a length-checked buffer.
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[..4]);
    Duration::from_micros(u64::from(u32::from_be_bytes(v)))
}

fn word(b: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[..4]);
    u32::from_be_bytes(v)
}

impl Packet {
    /// The 24 bytes on the wire.
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = (VERSION << 5) | (self.diag.0 & 0x1f);
        b[1] = (self.state.bits() << 6)
            | (u8::from(self.poll) << 5)
            | (u8::from(self.final_) << 4)
            | (u8::from(self.control_plane_independent) << 3)
            | (u8::from(self.demand) << 1);
        b[2] = self.detect_mult;
        b[3] = LEN as u8;
        b[4..8].copy_from_slice(&self.my_discriminator.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_discriminator.to_be_bytes());
        b[12..16].copy_from_slice(&micros(self.desired_min_tx).to_be_bytes());
        b[16..20].copy_from_slice(&micros(self.required_min_rx).to_be_bytes());
        b[20..24].copy_from_slice(&micros(self.required_min_echo_rx).to_be_bytes());
        b
    }

    /// Decodes one datagram, with every packet-level check of §6.8.6.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        if b.len() < LEN {
            return Err(Error::Short(b.len()));
        }
        let version = b[0] >> 5;
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let flags = b[1];
        if flags & 0b100 != 0 {
            return Err(Error::Authenticated);
        }
        // Without authentication the packet is exactly 24 bytes; a length
        // field that says otherwise is a broken (or smuggling) sender.
        if usize::from(b[3]) != LEN || b.len() != LEN {
            return Err(Error::Length {
                field: b[3],
                got: b.len(),
            });
        }
        if flags & 1 != 0 {
            return Err(Error::Multipoint);
        }
        let p = Packet {
            diag: Diag(b[0] & 0x1f),
            state: State::from_bits(flags >> 6),
            poll: flags & 0x20 != 0,
            final_: flags & 0x10 != 0,
            control_plane_independent: flags & 0x08 != 0,
            demand: flags & 0x02 != 0,
            detect_mult: b[2],
            my_discriminator: word(&b[4..8]),
            your_discriminator: word(&b[8..12]),
            desired_min_tx: from_micros(&b[12..16]),
            required_min_rx: from_micros(&b[16..20]),
            required_min_echo_rx: from_micros(&b[20..24]),
        };
        if p.detect_mult == 0 {
            return Err(Error::ZeroMultiplier);
        }
        if p.my_discriminator == 0 {
            return Err(Error::ZeroDiscriminator);
        }
        if p.your_discriminator == 0 && !matches!(p.state, State::Down | State::AdminDown) {
            return Err(Error::NoYourDiscriminator(p.state.as_str()));
        }
        if p.poll && p.final_ {
            return Err(Error::PollAndFinal);
        }
        Ok(p)
    }
}

/// RFC 5881 §5 (GTSM): a single-hop session takes only packets that left
/// their sender with TTL (or hop limit) 255, so nothing off-link can
/// inject state; then the packet itself is decoded.
pub fn accept(ttl: Option<u8>, b: &[u8]) -> Result<Packet, Error> {
    match ttl {
        Some(255) => Packet::decode(b),
        Some(t) => Err(Error::Ttl(t)),
        None => Err(Error::NoTtl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up() -> Packet {
        Packet {
            diag: Diag::NONE,
            state: State::Up,
            poll: false,
            final_: false,
            control_plane_independent: false,
            demand: false,
            detect_mult: 3,
            my_discriminator: 0x1122_3344,
            your_discriminator: 0x5566_7788,
            desired_min_tx: Duration::from_millis(100),
            required_min_rx: Duration::from_millis(100),
            required_min_echo_rx: Duration::ZERO,
        }
    }

    #[test]
    fn round_trips_and_matches_the_rfc_layout() {
        let mut p = up();
        p.poll = true;
        p.diag = Diag::DETECT_EXPIRED;
        let b = p.encode();
        assert_eq!(b[0], 0x21, "version 1, diag 1");
        assert_eq!(b[1], 0xe0, "state Up (3), Poll");
        assert_eq!(b[2], 3);
        assert_eq!(b[3], 24);
        assert_eq!(&b[4..8], &[0x11, 0x22, 0x33, 0x44]);
        assert_eq!(&b[12..16], &100_000u32.to_be_bytes());
        assert_eq!(Packet::decode(&b), Ok(p));
        for state in [State::AdminDown, State::Down, State::Init, State::Up] {
            let q = Packet { state, ..up() };
            assert_eq!(Packet::decode(&q.encode()).map(|d| d.state), Ok(state));
        }
    }

    #[test]
    fn malformed_packets_are_refused_with_the_reason() {
        let good = up().encode();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.to_vec();
            f(&mut b);
            Packet::decode(&b)
        };
        assert_eq!(Packet::decode(&good[..23]), Err(Error::Short(23)));
        assert_eq!(Packet::decode(&[]), Err(Error::Short(0)));
        assert_eq!(with(&|b| b[0] = 0x40), Err(Error::Version(2)));
        assert_eq!(with(&|b| b[1] |= 0b100), Err(Error::Authenticated));
        assert_eq!(with(&|b| b[1] |= 1), Err(Error::Multipoint));
        assert_eq!(
            with(&|b| b[3] = 48),
            Err(Error::Length { field: 48, got: 24 })
        );
        assert_eq!(
            with(&|b| b.push(0)),
            Err(Error::Length { field: 24, got: 25 })
        );
        assert_eq!(with(&|b| b[2] = 0), Err(Error::ZeroMultiplier));
        assert_eq!(with(&|b| b[4..8].fill(0)), Err(Error::ZeroDiscriminator));
        assert_eq!(
            with(&|b| b[8..12].fill(0)),
            Err(Error::NoYourDiscriminator("Up"))
        );
        assert_eq!(with(&|b| b[1] |= 0x30), Err(Error::PollAndFinal));
        // Down with no Your Discriminator is how every session starts.
        let first = Packet {
            state: State::Down,
            your_discriminator: 0,
            ..up()
        };
        assert_eq!(Packet::decode(&first.encode()), Ok(first));
    }

    #[test]
    fn only_ttl_255_is_accepted() {
        let b = up().encode();
        assert_eq!(accept(Some(255), &b), Ok(up()));
        assert_eq!(accept(Some(254), &b), Err(Error::Ttl(254)));
        assert_eq!(accept(Some(1), &b), Err(Error::Ttl(1)));
        assert_eq!(accept(None, &b), Err(Error::NoTtl));
        // The TTL is checked first: a forged off-link packet is not even
        // parsed.
        assert_eq!(accept(Some(64), &b[..3]), Err(Error::Ttl(64)));
    }

    #[test]
    fn intervals_saturate_rather_than_wrap() {
        let p = Packet {
            desired_min_tx: Duration::from_secs(10_000),
            ..up()
        };
        let d = Packet::decode(&p.encode()).unwrap();
        assert_eq!(d.desired_min_tx, Duration::from_micros(u64::from(u32::MAX)));
    }
}
