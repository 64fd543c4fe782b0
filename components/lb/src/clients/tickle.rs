//! Tickle ACKs: the segments the new VIP holder sends the previous
//! holder's clients right after it takes the VIP over, and their paced
//! sending from a raw socket.
//!
//! Each is a bare TCP ACK from VIP:port to the client with sequence and
//! acknowledgement numbers 0, which no live connection has in its window.
//! The client's kernel answers an out-of-window segment with an ACK
//! carrying its real numbers (RFC 793 §3.9; Linux rate-limits that answer
//! per connection, `net.ipv4.tcp_invalid_ratelimit`, 500 ms). That answer
//! goes to the VIP, which is now here; this kernel has no socket for it and
//! answers with a RST whose sequence number is the client's own
//! acknowledgement number, which the client accepts: its connection is
//! reset at once and it reconnects, to this node.
//!
//! The IP header is ours too (`IPPROTO_RAW`, header included): the source
//! must be the VIP whatever address the kernel would pick, and one builder
//! serves IPv4 and IPv6. Needs CAP_NET_RAW.
//!
//! Pacing: [`BATCH`] segments every [`PACE`], 50,000 a second, so 5,000
//! clients are tickled within 100 ms without overrunning the interface's
//! queue, and their reconnects spread over that time rather than arriving
//! in one burst. A second round follows [`SECOND_ROUND`] after the first,
//! past the clients' rate limit: a client whose first answer was lost (it
//! left before the gratuitous ARP or the BGP route reached its side, or a
//! packet was dropped) answers again. A client already reset answers a
//! second tickle with a RST to the VIP, which is harmless.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::time::Instant;

use super::Flow;

/// Segments sent per pause.
pub const BATCH: usize = 250;
/// Pause between batches.
pub const PACE: Duration = Duration::from_millis(5);
/// From the start of the first round to the start of the second.
pub const SECOND_ROUND: Duration = Duration::from_millis(600);

const TCP_HEADER: usize = 20;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_ACK: u8 = 0x10;
/// The window the tickle advertises (any value does; CTDB's).
const WINDOW: u16 = 1234;
const TTL: u8 = 64;

/// The whole IP packet of a tickle from `flow.vip` to `flow.client`;
/// `None` when the two are of different families.
pub fn segment(flow: &Flow) -> Option<Vec<u8>> {
    let tcp = |src: &[u8], dst: &[u8]| {
        let mut t = [0u8; TCP_HEADER];
        t[0..2].copy_from_slice(&flow.vip.port().to_be_bytes());
        t[2..4].copy_from_slice(&flow.client.port().to_be_bytes());
        // Sequence and acknowledgement numbers 0 (bytes 4..12).
        t[12] = ((TCP_HEADER / 4) as u8) << 4;
        t[13] = TCP_ACK;
        t[14..16].copy_from_slice(&WINDOW.to_be_bytes());
        let sum = tcp_checksum(src, dst, &t);
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        t
    };
    match (flow.vip.ip(), flow.client.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let (src, dst) = (src.octets(), dst.octets());
            let mut p = Vec::with_capacity(IPV4_HEADER + TCP_HEADER);
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&((IPV4_HEADER + TCP_HEADER) as u16).to_be_bytes());
            // Id 0, don't fragment.
            p.extend_from_slice(&[0, 0, 0x40, 0, TTL, libc::IPPROTO_TCP as u8, 0, 0]);
            p.extend_from_slice(&src);
            p.extend_from_slice(&dst);
            let sum = fold(sum16(0, &p));
            p[10..12].copy_from_slice(&sum.to_be_bytes());
            p.extend_from_slice(&tcp(&src, &dst));
            Some(p)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let (src, dst) = (src.octets(), dst.octets());
            let mut p = Vec::with_capacity(IPV6_HEADER + TCP_HEADER);
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(TCP_HEADER as u16).to_be_bytes());
            p.extend_from_slice(&[libc::IPPROTO_TCP as u8, TTL]);
            p.extend_from_slice(&src);
            p.extend_from_slice(&dst);
            p.extend_from_slice(&tcp(&src, &dst));
            Some(p)
        }
        _ => None,
    }
}

/// The one's-complement sum of `data` as 16-bit big-endian words, added
/// to `acc` (unfolded).
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The TCP checksum over the pseudo-header of either family (RFC 793,
/// RFC 8200 §8.1) and `segment` (whose checksum field is zero).
fn tcp_checksum(src: &[u8], dst: &[u8], segment: &[u8]) -> u16 {
    let mut acc = sum16(0, src);
    acc = sum16(acc, dst);
    acc += libc::IPPROTO_TCP as u32;
    acc += segment.len() as u32;
    fold(sum16(acc, segment))
}

/// What sending did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Segments the kernel took.
    pub sent: usize,
    /// Segments that could not be sent (no raw socket, an error).
    pub failed: usize,
    /// How long the first round took, from its first segment to its last.
    pub first_round: Duration,
}

/// The raw sockets, one per family, opened on first use.
#[derive(Default)]
struct Sockets {
    v4: Option<Socket>,
    v6: Option<Socket>,
}

impl Sockets {
    fn get(&mut self, v6: bool) -> std::io::Result<&Socket> {
        let slot = if v6 { &mut self.v6 } else { &mut self.v4 };
        if slot.is_none() {
            let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
            let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
            if v6 {
                // Implied by IPPROTO_RAW on Linux; said explicitly, since a
                // kernel that did not would prepend a second header.
                s.set_header_included_v6(true)?;
            }
            *slot = Some(s);
        }
        slot.as_ref()
            .ok_or_else(|| std::io::Error::other("raw socket missing"))
    }
}

/// Sends one tickle per flow, [`BATCH`] every [`PACE`], in two rounds
/// [`SECOND_ROUND`] apart. Errors are counted, never fatal: a tickle is a
/// hint, and a client that misses it falls back to its own timeout.
pub async fn send_all(flows: &[Flow]) -> Sent {
    let packets: Vec<(SockAddr, Vec<u8>)> = flows
        .iter()
        .filter_map(|f| {
            let to = SockAddr::from(SocketAddr::new(f.client.ip(), 0));
            segment(f).map(|p| (to, p))
        })
        .collect();
    let mut sockets = Sockets::default();
    let mut total = Sent {
        failed: flows.len() - packets.len(),
        ..Sent::default()
    };
    let first = Instant::now();
    for round in 0..2 {
        if round == 1 {
            tokio::time::sleep_until(first + SECOND_ROUND).await;
        }
        let r = send_round(&mut sockets, &packets).await;
        total.sent += r.sent;
        total.failed += r.failed;
        if round == 0 {
            total.first_round = first.elapsed();
        }
    }
    total
}

async fn send_round(sockets: &mut Sockets, packets: &[(SockAddr, Vec<u8>)]) -> Sent {
    let mut done = Sent::default();
    let mut first_error = None;
    let start = Instant::now();
    for (i, batch) in packets.chunks(BATCH).enumerate() {
        // On a schedule from the round's start, not a pause after each
        // batch: a runtime that wakes us late (a loaded machine, the
        // reconnects arriving meanwhile) catches up instead of stretching
        // the round.
        tokio::time::sleep_until(start + PACE * i as u32).await;
        for (to, p) in batch {
            let sent = sockets
                .get(to.is_ipv6())
                .and_then(|s| s.send_to(p, to).map(|_| ()));
            match sent {
                Ok(()) => done.sent += 1,
                Err(e) => {
                    done.failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    if let Some(e) = first_error {
        tracing::warn!(failed = done.failed, error = %e, "some tickle ACKs could not be sent");
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(client: &str, vip: &str) -> Flow {
        Flow {
            client: client.parse().unwrap(),
            vip: vip.parse().unwrap(),
        }
    }

    /// A correct checksum makes the sum over the covered bytes, checksum
    /// included, fold to zero.
    fn verifies(acc: u32) -> bool {
        fold(acc) == 0
    }

    #[test]
    fn ipv4_tickles_carry_valid_checksums_and_a_bare_ack() {
        let p = segment(&flow("198.18.0.9:40000", "198.18.0.100:6443")).unwrap();
        assert_eq!(p.len(), 40);
        let (ip, tcp) = p.split_at(20);
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 40);
        assert_eq!(ip[9], 6);
        assert_eq!(&ip[12..16], &[198, 18, 0, 100]);
        assert_eq!(&ip[16..20], &[198, 18, 0, 9]);
        assert!(verifies(sum16(0, ip)), "IPv4 header checksum");
        let pseudo = sum16(sum16(0, &ip[12..16]), &ip[16..20]) + 6 + 20;
        assert!(verifies(sum16(pseudo, tcp)), "TCP checksum");
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 6443);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
        assert_eq!(&tcp[4..12], &[0; 8], "sequence and ack numbers 0");
        assert_eq!(tcp[12] >> 4, 5, "data offset");
        assert_eq!(tcp[13], TCP_ACK, "ACK alone");
        // A known value, computed by hand once: catches a swapped field
        // that still sums to zero.
        assert_eq!(u16::from_be_bytes([ip[10], ip[11]]), 0xae3e);
    }

    #[test]
    fn ipv6_tickles_carry_a_valid_checksum() {
        let p = segment(&flow("[2001:db8::9]:40000", "[2001:db8::100]:6443")).unwrap();
        assert_eq!(p.len(), 60);
        let (ip, tcp) = p.split_at(40);
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 20);
        assert_eq!(ip[6], 6, "next header TCP");
        let src: std::net::Ipv6Addr = "2001:db8::100".parse().unwrap();
        assert_eq!(&ip[8..24], &src.octets());
        let pseudo = sum16(sum16(0, &ip[8..24]), &ip[24..40]) + 6 + 20;
        assert!(verifies(sum16(pseudo, tcp)), "TCP checksum");
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
        assert_eq!(tcp[13], TCP_ACK);
    }

    #[test]
    fn mixed_families_build_nothing() {
        assert_eq!(
            segment(&flow("[2001:db8::9]:40000", "198.18.0.100:6443")),
            None
        );
    }

    #[test]
    fn odd_lengths_are_padded_and_carries_fold() {
        assert_eq!(sum16(0, &[0x01]), 0x0100);
        assert_eq!(fold(0x1_fffe), !0xffffu16);
        assert_eq!(fold(0), 0xffff);
    }
}
