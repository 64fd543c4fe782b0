//! The BGP-4 wire format (RFC 4271) as far as a speaker that announces one
//! or two host routes needs it: OPEN with the capabilities for 4-octet AS
//! numbers (RFC 6793) and multiprotocol IPv4/IPv6 unicast (RFC 4760),
//! KEEPALIVE, UPDATE (IPv4 NLRI and withdrawals, MP_REACH_NLRI /
//! MP_UNREACH_NLRI for IPv6) and NOTIFICATION.
//!
//! Decoding never trusts a length field: every read is bounds-checked and
//! a malformed message is an [`Error`] carrying the NOTIFICATION code and
//! subcode RFC 4271 §6 says to answer it with.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The marker every message starts with.
const MARKER: [u8; 16] = [0xff; 16];
/// Header: marker, length, type.
pub const HEADER_LEN: usize = 19;
/// The largest message RFC 4271 allows (without RFC 8654).
pub const MAX_LEN: usize = 4096;

const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;

/// Address family identifiers (IANA).
pub const AFI_IPV4: u16 = 1;
/// IPv6.
pub const AFI_IPV6: u16 = 2;
/// Unicast SAFI.
pub const SAFI_UNICAST: u8 = 1;

/// The 2-octet AS field's stand-in for a 4-octet AS number (RFC 6793).
pub const AS_TRANS: u16 = 23456;

/// Path attribute type codes used here.
pub mod attr {
    /// ORIGIN.
    pub const ORIGIN: u8 = 1;
    /// AS_PATH.
    pub const AS_PATH: u8 = 2;
    /// NEXT_HOP.
    pub const NEXT_HOP: u8 = 3;
    /// LOCAL_PREF.
    pub const LOCAL_PREF: u8 = 5;
    /// MP_REACH_NLRI.
    pub const MP_REACH_NLRI: u8 = 14;
    /// MP_UNREACH_NLRI.
    pub const MP_UNREACH_NLRI: u8 = 15;
    /// Flag: optional.
    pub const OPTIONAL: u8 = 0x80;
    /// Flag: transitive.
    pub const TRANSITIVE: u8 = 0x40;
    /// Flag: two-octet length.
    pub const EXTENDED: u8 = 0x10;
}

/// NOTIFICATION error codes (RFC 4271 §4.5) used here.
pub mod notify {
    /// Message header error.
    pub const HEADER: u8 = 1;
    /// OPEN message error.
    pub const OPEN: u8 = 2;
    /// UPDATE message error.
    pub const UPDATE: u8 = 3;
    /// Hold timer expired.
    pub const HOLD_TIMER: u8 = 4;
    /// Finite state machine error.
    pub const FSM: u8 = 5;
    /// Cease.
    pub const CEASE: u8 = 6;
}

/// A malformed message, with the NOTIFICATION that answers it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} (NOTIFICATION {code}/{subcode})")]
pub struct Error {
    /// NOTIFICATION error code.
    pub code: u8,
    /// NOTIFICATION error subcode.
    pub subcode: u8,
    /// What was wrong.
    pub what: String,
}

fn err(code: u8, subcode: u8, what: impl Into<String>) -> Error {
    Error {
        code,
        subcode,
        what: what.into(),
    }
}

/// A route prefix: an address and how many of its leading bits count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    /// The address (bits past `len` are zero after decoding).
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Prefix {
    /// The host route for `addr`: /32 or /128.
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One capability of an OPEN (RFC 5492).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capability {
    /// Multiprotocol extensions: this AFI/SAFI may be exchanged.
    Multiprotocol {
        /// Address family.
        afi: u16,
        /// Subsequent address family.
        safi: u8,
    },
    /// 4-octet AS numbers, carrying the speaker's AS.
    FourOctetAs(u32),
    /// Anything else, kept so it can be logged.
    Other {
        /// Capability code.
        code: u8,
        /// Its value.
        value: Vec<u8>,
    },
}

/// An OPEN message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// The 2-octet "My Autonomous System" field (AS_TRANS for a 4-octet AS).
    pub asn: u16,
    /// Proposed hold time in seconds (0, or at least 3).
    pub hold_time: u16,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Capabilities, in order.
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// The sender's AS: the 4-octet capability's when present.
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(a) => Some(*a),
                _ => None,
            })
            .unwrap_or(u32::from(self.asn))
    }

    /// Whether the sender supports 4-octet AS numbers.
    pub fn four_octet(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
    }

    /// Whether the sender offers `afi`/`safi` (a speaker without any
    /// multiprotocol capability speaks IPv4 unicast only).
    pub fn offers(&self, afi: u16, safi: u8) -> bool {
        let mp: Vec<_> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::Multiprotocol { afi, safi } => Some((*afi, *safi)),
                _ => None,
            })
            .collect();
        if mp.is_empty() {
            return (afi, safi) == (AFI_IPV4, SAFI_UNICAST);
        }
        mp.contains(&(afi, safi))
    }
}

/// A path attribute, value undecoded (the attributes this speaker reads
/// have their own decoders: [`MpReach::decode`], [`MpUnreach::decode`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribute {
    /// Flags (optional, transitive, partial, extended length).
    pub flags: u8,
    /// Type code.
    pub code: u8,
    /// The value.
    pub value: Vec<u8>,
}

/// An UPDATE message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// IPv4 prefixes withdrawn.
    pub withdrawn: Vec<Prefix>,
    /// Path attributes.
    pub attributes: Vec<Attribute>,
    /// IPv4 prefixes announced.
    pub nlri: Vec<Prefix>,
}

/// A decoded MP_REACH_NLRI value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpReach {
    /// Address family.
    pub afi: u16,
    /// Subsequent address family.
    pub safi: u8,
    /// Next hop (raw: 4, 16 or 32 octets).
    pub next_hop: Vec<u8>,
    /// Prefixes announced.
    pub nlri: Vec<Prefix>,
}

/// A decoded MP_UNREACH_NLRI value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpUnreach {
    /// Address family.
    pub afi: u16,
    /// Subsequent address family.
    pub safi: u8,
    /// Prefixes withdrawn.
    pub withdrawn: Vec<Prefix>,
}

/// One BGP message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// OPEN.
    Open(Open),
    /// UPDATE.
    Update(Update),
    /// NOTIFICATION.
    Notification {
        /// Error code.
        code: u8,
        /// Error subcode.
        subcode: u8,
        /// Diagnostic data.
        data: Vec<u8>,
    },
    /// KEEPALIVE.
    Keepalive,
}

/// A bounds-checked reader over a message body.
struct Reader<'a> {
    buf: &'a [u8],
    /// The error a short read becomes.
    code: (u8, u8),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], code: u8, subcode: u8) -> Self {
        Self {
            buf,
            code: (code, subcode),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(err(
                self.code.0,
                self.code.1,
                format!("{what}: needs {n} bytes, {} left", self.buf.len()),
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, Error> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

impl Message {
    /// The wire form, header included.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body) = match self {
            Message::Open(o) => (OPEN, encode_open(o)),
            Message::Update(u) => (UPDATE, encode_update(u)),
            Message::Notification {
                code,
                subcode,
                data,
            } => {
                let mut b = vec![*code, *subcode];
                b.extend_from_slice(data);
                (NOTIFICATION, b)
            }
            Message::Keepalive => (KEEPALIVE, Vec::new()),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MARKER);
        // Messages built here are far below MAX_LEN (a few prefixes).
        let len = u16::try_from(HEADER_LEN + body.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&body);
        out
    }

    /// Decodes the first message in `buf`: `Ok(None)` when `buf` holds
    /// only part of one (read more), otherwise the message and the bytes
    /// it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, Error> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if buf[..16] != MARKER {
            return Err(err(notify::HEADER, 1, "connection not synchronized"));
        }
        let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
        let kind = buf[18];
        if !(HEADER_LEN..=MAX_LEN).contains(&len) {
            return Err(err(notify::HEADER, 2, format!("bad message length {len}")));
        }
        if buf.len() < len {
            return Ok(None);
        }
        let body = &buf[HEADER_LEN..len];
        let message = match kind {
            OPEN => Message::Open(decode_open(body)?),
            UPDATE => Message::Update(decode_update(body)?),
            NOTIFICATION => {
                let mut r = Reader::new(body, notify::HEADER, 2);
                Message::Notification {
                    code: r.u8("NOTIFICATION code")?,
                    subcode: r.u8("NOTIFICATION subcode")?,
                    data: r.buf.to_vec(),
                }
            }
            KEEPALIVE if body.is_empty() => Message::Keepalive,
            KEEPALIVE => {
                return Err(err(notify::HEADER, 2, "KEEPALIVE with a body"));
            }
            other => {
                return Err(err(notify::HEADER, 3, format!("bad message type {other}")));
            }
        };
        Ok(Some((message, len)))
    }
}

fn encode_open(o: &Open) -> Vec<u8> {
    let mut caps = Vec::new();
    for c in &o.capabilities {
        let (code, value) = match c {
            Capability::Multiprotocol { afi, safi } => {
                let a = afi.to_be_bytes();
                (1, vec![a[0], a[1], 0, *safi])
            }
            Capability::FourOctetAs(asn) => (65, asn.to_be_bytes().to_vec()),
            Capability::Other { code, value } => (*code, value.clone()),
        };
        caps.push(code);
        caps.push(u8::try_from(value.len()).unwrap_or(u8::MAX));
        caps.extend_from_slice(&value);
    }
    let mut b = vec![4];
    b.extend_from_slice(&o.asn.to_be_bytes());
    b.extend_from_slice(&o.hold_time.to_be_bytes());
    b.extend_from_slice(&o.router_id.octets());
    if caps.is_empty() {
        b.push(0);
    } else {
        // One optional parameter of type 2 (capabilities) holding them all.
        b.push(u8::try_from(caps.len() + 2).unwrap_or(u8::MAX));
        b.push(2);
        b.push(u8::try_from(caps.len()).unwrap_or(u8::MAX));
        b.extend_from_slice(&caps);
    }
    b
}

fn decode_open(body: &[u8]) -> Result<Open, Error> {
    let mut r = Reader::new(body, notify::HEADER, 2);
    let version = r.u8("OPEN version")?;
    if version != 4 {
        return Err(err(
            notify::OPEN,
            1,
            format!("unsupported version {version}"),
        ));
    }
    let asn = r.u16("OPEN AS")?;
    let hold_time = r.u16("OPEN hold time")?;
    if hold_time == 1 || hold_time == 2 {
        return Err(err(
            notify::OPEN,
            6,
            format!("unacceptable hold time {hold_time}"),
        ));
    }
    let router_id = Ipv4Addr::from(r.u32("OPEN BGP identifier")?);
    let params_len = usize::from(r.u8("OPEN parameters length")?);
    let mut params = Reader::new(r.take(params_len, "OPEN parameters")?, notify::OPEN, 0);
    if !r.is_empty() {
        return Err(err(notify::OPEN, 0, "bytes after the OPEN parameters"));
    }
    let mut capabilities = Vec::new();
    while !params.is_empty() {
        let kind = params.u8("parameter type")?;
        let len = usize::from(params.u8("parameter length")?);
        let value = params.take(len, "parameter value")?;
        if kind != 2 {
            return Err(err(
                notify::OPEN,
                4,
                format!("unsupported optional parameter {kind}"),
            ));
        }
        let mut caps = Reader::new(value, notify::OPEN, 0);
        while !caps.is_empty() {
            let code = caps.u8("capability code")?;
            let len = usize::from(caps.u8("capability length")?);
            let value = caps.take(len, "capability value")?;
            capabilities.push(decode_capability(code, value)?);
        }
    }
    Ok(Open {
        asn,
        hold_time,
        router_id,
        capabilities,
    })
}

fn decode_capability(code: u8, value: &[u8]) -> Result<Capability, Error> {
    let mut v = Reader::new(value, notify::OPEN, 0);
    let cap = match (code, value.len()) {
        (1, 4) => {
            let afi = v.u16("multiprotocol AFI")?;
            v.u8("multiprotocol reserved")?;
            Capability::Multiprotocol {
                afi,
                safi: v.u8("multiprotocol SAFI")?,
            }
        }
        (65, 4) => Capability::FourOctetAs(v.u32("4-octet AS")?),
        (1 | 65, n) => {
            return Err(err(
                notify::OPEN,
                0,
                format!("capability {code} has length {n}, expected 4"),
            ));
        }
        _ => Capability::Other {
            code,
            value: value.to_vec(),
        },
    };
    Ok(cap)
}

/// Appends `p` in NLRI form: length in bits, then the significant octets.
fn encode_prefix(out: &mut Vec<u8>, p: &Prefix) {
    out.push(p.len);
    let n = usize::from(p.len).div_ceil(8);
    match p.addr {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..n.min(4)]),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..n.min(16)]),
    }
}

/// Decodes a run of prefixes of family `afi`.
fn decode_prefixes(buf: &[u8], afi: u16, what: &str) -> Result<Vec<Prefix>, Error> {
    let mut r = Reader::new(buf, notify::UPDATE, 10);
    let max = if afi == AFI_IPV6 { 128 } else { 32 };
    let mut out = Vec::new();
    while !r.is_empty() {
        let len = r.u8(what)?;
        if len > max {
            return Err(err(
                notify::UPDATE,
                10,
                format!("{what}: prefix length {len} exceeds {max}"),
            ));
        }
        let bytes = r.take(usize::from(len).div_ceil(8), what)?;
        let addr = if afi == AFI_IPV6 {
            let mut o = [0u8; 16];
            o[..bytes.len()].copy_from_slice(bytes);
            IpAddr::V6(Ipv6Addr::from(mask(o, len)))
        } else {
            let mut o = [0u8; 4];
            o[..bytes.len()].copy_from_slice(bytes);
            IpAddr::V4(Ipv4Addr::from(mask(o, len)))
        };
        out.push(Prefix { addr, len });
    }
    Ok(out)
}

/// Zeroes the bits of `o` past the first `len`.
fn mask<const N: usize>(mut o: [u8; N], len: u8) -> [u8; N] {
    for (i, b) in o.iter_mut().enumerate() {
        let keep = usize::from(len).saturating_sub(i * 8).min(8);
        *b &= !(0xffu16 >> keep) as u8;
    }
    o
}

fn encode_update(u: &Update) -> Vec<u8> {
    let mut withdrawn = Vec::new();
    for p in &u.withdrawn {
        encode_prefix(&mut withdrawn, p);
    }
    let mut attrs = Vec::new();
    for a in &u.attributes {
        let extended = a.value.len() > 255;
        let flags = if extended {
            a.flags | attr::EXTENDED
        } else {
            a.flags & !attr::EXTENDED
        };
        attrs.push(flags);
        attrs.push(a.code);
        if extended {
            let len = u16::try_from(a.value.len()).unwrap_or(u16::MAX);
            attrs.extend_from_slice(&len.to_be_bytes());
        } else {
            attrs.push(a.value.len() as u8);
        }
        attrs.extend_from_slice(&a.value);
    }
    let mut b = Vec::new();
    b.extend_from_slice(&u16::try_from(withdrawn.len()).unwrap_or(0).to_be_bytes());
    b.extend_from_slice(&withdrawn);
    b.extend_from_slice(&u16::try_from(attrs.len()).unwrap_or(0).to_be_bytes());
    b.extend_from_slice(&attrs);
    for p in &u.nlri {
        encode_prefix(&mut b, p);
    }
    b
}

fn decode_update(body: &[u8]) -> Result<Update, Error> {
    let mut r = Reader::new(body, notify::UPDATE, 1);
    let wlen = usize::from(r.u16("withdrawn routes length")?);
    let withdrawn = decode_prefixes(r.take(wlen, "withdrawn routes")?, AFI_IPV4, "withdrawn")?;
    let alen = usize::from(r.u16("path attributes length")?);
    let mut ar = Reader::new(r.take(alen, "path attributes")?, notify::UPDATE, 1);
    let mut attributes = Vec::new();
    while !ar.is_empty() {
        let flags = ar.u8("attribute flags")?;
        let code = ar.u8("attribute type")?;
        let len = if flags & attr::EXTENDED != 0 {
            usize::from(ar.u16("attribute length")?)
        } else {
            usize::from(ar.u8("attribute length")?)
        };
        let value = ar.take(len, "attribute value")?.to_vec();
        // The extended-length bit is the encoder's choice (by length),
        // not part of the attribute.
        attributes.push(Attribute {
            flags: flags & !attr::EXTENDED,
            code,
            value,
        });
    }
    let nlri = decode_prefixes(r.buf, AFI_IPV4, "NLRI")?;
    Ok(Update {
        withdrawn,
        attributes,
        nlri,
    })
}

impl MpReach {
    /// The attribute carrying it.
    pub fn attribute(&self) -> Attribute {
        let mut v = self.afi.to_be_bytes().to_vec();
        v.push(self.safi);
        v.push(u8::try_from(self.next_hop.len()).unwrap_or(u8::MAX));
        v.extend_from_slice(&self.next_hop);
        v.push(0); // reserved (SNPA count)
        for p in &self.nlri {
            encode_prefix(&mut v, p);
        }
        Attribute {
            flags: attr::OPTIONAL,
            code: attr::MP_REACH_NLRI,
            value: v,
        }
    }

    /// Decodes an MP_REACH_NLRI value.
    pub fn decode(value: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(value, notify::UPDATE, 9);
        let afi = r.u16("MP_REACH AFI")?;
        let safi = r.u8("MP_REACH SAFI")?;
        let nh_len = usize::from(r.u8("MP_REACH next hop length")?);
        let next_hop = r.take(nh_len, "MP_REACH next hop")?.to_vec();
        r.u8("MP_REACH reserved")?;
        Ok(Self {
            afi,
            safi,
            next_hop,
            nlri: decode_prefixes(r.buf, afi, "MP_REACH NLRI")?,
        })
    }
}

impl MpUnreach {
    /// The attribute carrying it.
    pub fn attribute(&self) -> Attribute {
        let mut v = self.afi.to_be_bytes().to_vec();
        v.push(self.safi);
        for p in &self.withdrawn {
            encode_prefix(&mut v, p);
        }
        Attribute {
            flags: attr::OPTIONAL,
            code: attr::MP_UNREACH_NLRI,
            value: v,
        }
    }

    /// Decodes an MP_UNREACH_NLRI value.
    pub fn decode(value: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(value, notify::UPDATE, 9);
        let afi = r.u16("MP_UNREACH AFI")?;
        let safi = r.u8("MP_UNREACH SAFI")?;
        Ok(Self {
            afi,
            safi,
            withdrawn: decode_prefixes(r.buf, afi, "MP_UNREACH NLRI")?,
        })
    }
}

/// What one speaker says about its routes: its AS, whether the session is
/// iBGP, whether AS numbers are 4 octets on it, and its next hop.
#[derive(Clone, Copy, Debug)]
pub struct Speaker {
    /// Our AS.
    pub local_asn: u32,
    /// The session is iBGP (peer AS = ours): empty AS_PATH, LOCAL_PREF.
    pub internal: bool,
    /// Both sides sent the 4-octet AS capability.
    pub four_octet: bool,
    /// Our end of the session: the next hop of what we announce.
    pub next_hop: IpAddr,
}

impl Speaker {
    /// The UPDATE that announces `prefixes` (all of the session's family):
    /// IPv4 in the classic NLRI field with NEXT_HOP, IPv6 in MP_REACH_NLRI.
    pub fn announce(&self, prefixes: &[Prefix]) -> Update {
        let mut attributes = vec![Attribute {
            flags: attr::TRANSITIVE,
            code: attr::ORIGIN,
            value: vec![0], // IGP
        }];
        let mut path = Vec::new();
        if !self.internal {
            // One AS_SEQUENCE segment holding our AS.
            path.extend_from_slice(&[2, 1]);
            if self.four_octet {
                path.extend_from_slice(&self.local_asn.to_be_bytes());
            } else {
                let two = u16::try_from(self.local_asn).unwrap_or(AS_TRANS);
                path.extend_from_slice(&two.to_be_bytes());
            }
        }
        attributes.push(Attribute {
            flags: attr::TRANSITIVE,
            code: attr::AS_PATH,
            value: path,
        });
        let (v4, v6): (Vec<Prefix>, Vec<Prefix>) = prefixes.iter().partition(|p| p.addr.is_ipv4());
        if let (IpAddr::V4(nh), false) = (self.next_hop, v4.is_empty()) {
            attributes.push(Attribute {
                flags: attr::TRANSITIVE,
                code: attr::NEXT_HOP,
                value: nh.octets().to_vec(),
            });
        }
        if self.internal {
            attributes.push(Attribute {
                flags: attr::TRANSITIVE,
                code: attr::LOCAL_PREF,
                value: 100u32.to_be_bytes().to_vec(),
            });
        }
        if let (IpAddr::V6(nh), false) = (self.next_hop, v6.is_empty()) {
            attributes.push(
                MpReach {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                    next_hop: nh.octets().to_vec(),
                    nlri: v6,
                }
                .attribute(),
            );
        }
        Update {
            withdrawn: Vec::new(),
            attributes,
            nlri: v4,
        }
    }

    /// The UPDATE that withdraws `prefixes`.
    pub fn withdraw(prefixes: &[Prefix]) -> Update {
        let (v4, v6): (Vec<Prefix>, Vec<Prefix>) = prefixes.iter().partition(|p| p.addr.is_ipv4());
        let attributes = if v6.is_empty() {
            Vec::new()
        } else {
            vec![
                MpUnreach {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                    withdrawn: v6,
                }
                .attribute(),
            ]
        };
        Update {
            withdrawn: v4,
            attributes,
            nlri: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn p(s: &str) -> Prefix {
        let (a, l) = s.split_once('/').unwrap();
        Prefix {
            addr: a.parse().unwrap(),
            len: l.parse().unwrap(),
        }
    }

    fn round_trip(m: &Message) -> Message {
        let wire = m.encode();
        let (back, used) = Message::decode(&wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        back
    }

    #[test]
    fn open_round_trips_with_capabilities() {
        let open = Open {
            asn: AS_TRANS,
            hold_time: 3,
            router_id: Ipv4Addr::new(10, 0, 0, 11),
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::Multiprotocol {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                },
                Capability::FourOctetAs(4_200_000_001),
                Capability::Other {
                    code: 2,
                    value: vec![],
                },
            ],
        };
        let back = round_trip(&Message::Open(open.clone()));
        assert_eq!(back, Message::Open(open.clone()));
        assert_eq!(open.asn(), 4_200_000_001, "the 4-octet capability wins");
        assert!(open.four_octet());
        assert!(open.offers(AFI_IPV6, SAFI_UNICAST));
        let plain = Open {
            asn: 65001,
            capabilities: vec![],
            ..open
        };
        assert_eq!(plain.asn(), 65001);
        assert!(plain.offers(AFI_IPV4, SAFI_UNICAST), "implicit IPv4");
        assert!(!plain.offers(AFI_IPV6, SAFI_UNICAST));
    }

    #[test]
    fn keepalive_and_notification_round_trip() {
        let k = Message::Keepalive;
        assert_eq!(k.encode().len(), HEADER_LEN);
        assert_eq!(round_trip(&k), k);
        let n = Message::Notification {
            code: notify::CEASE,
            subcode: 2,
            data: b"bye".to_vec(),
        };
        assert_eq!(round_trip(&n), n);
    }

    #[test]
    fn ebgp_ipv4_announce_and_withdraw() {
        let s = Speaker {
            local_asn: 65010,
            internal: false,
            four_octet: true,
            next_hop: "10.0.0.11".parse().unwrap(),
        };
        let u = s.announce(&[p("10.0.0.10/32")]);
        let Message::Update(back) = round_trip(&Message::Update(u.clone())) else {
            panic!("not an update");
        };
        assert_eq!(back, u);
        assert_eq!(back.nlri, vec![p("10.0.0.10/32")]);
        let get = |code| back.attributes.iter().find(|a| a.code == code).unwrap();
        assert_eq!(get(attr::ORIGIN).value, vec![0]);
        assert_eq!(get(attr::AS_PATH).value, vec![2, 1, 0, 0, 0xfd, 0xf2]);
        assert_eq!(get(attr::NEXT_HOP).value, vec![10, 0, 0, 11]);
        assert!(back.attributes.iter().all(|a| a.code != attr::LOCAL_PREF));
        let w = Speaker::withdraw(&[p("10.0.0.10/32")]);
        assert_eq!(w.withdrawn, vec![p("10.0.0.10/32")]);
        assert!(w.attributes.is_empty() && w.nlri.is_empty());
        assert_eq!(round_trip(&Message::Update(w.clone())), Message::Update(w));
    }

    #[test]
    fn ibgp_ipv6_uses_mp_reach_and_local_pref() {
        let s = Speaker {
            local_asn: 4_200_000_001,
            internal: true,
            four_octet: true,
            next_hop: "fd00::11".parse().unwrap(),
        };
        let u = s.announce(&[p("fd00::10/128")]);
        assert!(u.nlri.is_empty(), "IPv6 goes in MP_REACH_NLRI");
        let get = |code| u.attributes.iter().find(|a| a.code == code).unwrap();
        assert!(get(attr::AS_PATH).value.is_empty(), "iBGP: empty AS_PATH");
        assert_eq!(get(attr::LOCAL_PREF).value, 100u32.to_be_bytes());
        let reach = MpReach::decode(&get(attr::MP_REACH_NLRI).value).unwrap();
        assert_eq!(reach.afi, AFI_IPV6);
        assert_eq!(reach.nlri, vec![p("fd00::10/128")]);
        assert_eq!(reach.next_hop.len(), 16);
        let w = Speaker::withdraw(&[p("fd00::10/128")]);
        let un = MpUnreach::decode(&w.attributes[0].value).unwrap();
        assert_eq!(un.withdrawn, vec![p("fd00::10/128")]);
        assert_eq!(round_trip(&Message::Update(w.clone())), Message::Update(w));
    }

    #[test]
    fn two_octet_peers_get_as_trans_for_a_large_asn() {
        let s = Speaker {
            local_asn: 4_200_000_001,
            internal: false,
            four_octet: false,
            next_hop: "10.0.0.11".parse().unwrap(),
        };
        let u = s.announce(&[p("10.0.0.10/32")]);
        let path = &u
            .attributes
            .iter()
            .find(|a| a.code == attr::AS_PATH)
            .unwrap();
        assert_eq!(
            path.value,
            [&[2u8, 1][..], &AS_TRANS.to_be_bytes()].concat()
        );
    }

    #[test]
    fn partial_input_asks_for_more() {
        let wire = Message::Keepalive.encode();
        for n in 0..wire.len() {
            assert_eq!(Message::decode(&wire[..n]), Ok(None), "{n} bytes");
        }
    }

    #[test]
    fn malformed_input_gets_the_right_notification() {
        let mut bad_marker = Message::Keepalive.encode();
        bad_marker[0] = 0;
        let mut bad_len = Message::Keepalive.encode();
        bad_len[17] = 5;
        let mut bad_type = Message::Keepalive.encode();
        bad_type[18] = 9;
        let mut bad_version = Message::Open(Open {
            asn: 1,
            hold_time: 3,
            router_id: Ipv4Addr::LOCALHOST,
            capabilities: vec![],
        })
        .encode();
        bad_version[19] = 3;
        // An UPDATE whose only NLRI claims 33 bits.
        let mut long_prefix = Message::Update(Update {
            nlri: vec![p("10.0.0.0/8")],
            ..Update::default()
        })
        .encode();
        let last = long_prefix.len() - 2;
        long_prefix[last] = 33;
        for (wire, code, subcode) in [
            (bad_marker, notify::HEADER, 1),
            (bad_len, notify::HEADER, 2),
            (bad_type, notify::HEADER, 3),
            (bad_version, notify::OPEN, 1),
            (long_prefix, notify::UPDATE, 10),
        ] {
            let e = Message::decode(&wire).unwrap_err();
            assert_eq!((e.code, e.subcode), (code, subcode), "{e}");
        }
    }

    #[test]
    fn decoded_prefixes_have_no_stray_host_bits() {
        // 10.1.2.3/16 on the wire carries two octets: 10.1.
        let u = Update {
            nlri: vec![p("10.1.2.3/16"), p("fd00:1:2::/33")],
            ..Update::default()
        };
        let mut wire = Vec::new();
        encode_prefix(&mut wire, &u.nlri[0]);
        assert_eq!(wire, vec![16, 10, 1]);
        let back = decode_prefixes(&wire, AFI_IPV4, "t").unwrap();
        assert_eq!(back, vec![p("10.1.0.0/16")]);
        let mut wire6 = Vec::new();
        encode_prefix(&mut wire6, &u.nlri[1]);
        let back6 = decode_prefixes(&wire6, AFI_IPV6, "t").unwrap();
        assert_eq!(back6, vec![p("fd00:1::/33")]);
    }

    fn arb_prefix() -> impl Strategy<Value = Prefix> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, len)| Prefix {
                addr: IpAddr::V4(Ipv4Addr::from(mask(a.to_be_bytes(), len))),
                len,
            }),
            (any::<u128>(), 0u8..=128).prop_map(|(a, len)| Prefix {
                addr: IpAddr::V6(Ipv6Addr::from(mask(a.to_be_bytes(), len))),
                len,
            }),
        ]
    }

    proptest! {
        /// Whatever arrives, decoding returns a message, "need more" or an
        /// error; it never panics, and never claims more bytes than given.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..600), kind in 1u8..=5, valid_header in any::<bool>()) {
            if valid_header && bytes.len() >= HEADER_LEN {
                // Most random bytes fail the marker check; give half the
                // cases a good header so the bodies' decoders run.
                bytes[..16].copy_from_slice(&MARKER);
                let len = u16::try_from(bytes.len()).unwrap();
                bytes[16..18].copy_from_slice(&len.to_be_bytes());
                bytes[18] = kind;
            }
            if let Ok(Some((m, used))) = Message::decode(&bytes) {
                prop_assert!(used <= bytes.len());
                if let Message::Update(u) = &m {
                    for a in &u.attributes {
                        let _ = MpReach::decode(&a.value);
                        let _ = MpUnreach::decode(&a.value);
                    }
                    // What decodes encodes again to the same message.
                    prop_assert_eq!(&round_trip(&m), &m);
                }
            }
        }

        /// Announcements and withdrawals of any prefixes survive the wire.
        #[test]
        fn updates_round_trip(prefixes in proptest::collection::vec(arb_prefix(), 1..8), internal in any::<bool>(), asn in any::<u32>()) {
            let v4: Vec<Prefix> = prefixes.iter().copied().filter(|p| p.addr.is_ipv4()).collect();
            let v6: Vec<Prefix> = prefixes.iter().copied().filter(|p| p.addr.is_ipv6()).collect();
            for (family, nh) in [(v4, "10.0.0.1"), (v6, "fd00::1")] {
                if family.is_empty() {
                    continue;
                }
                let s = Speaker { local_asn: asn, internal, four_octet: true, next_hop: nh.parse().unwrap() };
                for u in [s.announce(&family), Speaker::withdraw(&family)] {
                    let m = Message::Update(u);
                    prop_assert_eq!(round_trip(&m), m);
                }
            }
        }
    }
}
