//! Silence the kernel's connection refusals on the VIP after a crash.
//!
//! A holder that is SIGKILLed (the OOM killer, `kill -9`, a container
//! runtime) cannot release: its address stays on the interface until its
//! kernel lifetime runs out (1-2 s), and the clients' neighbour caches
//! still point at it until the new holder's gratuitous ARP or neighbour
//! advertisement (about 0.3 s after the fault). Every SYN that reaches the
//! dead holder in between meets no listener, and its kernel answers with a
//! reset: the client fails with "connection refused" although the VIP is
//! about to work again (520 failed connects in the suite's sigkill
//! scenario).
//!
//! This module installs one nftables rule per VIP address, in a table of
//! its own, on the output hook: drop TCP segments from VIP:port whose flags
//! are exactly RST+ACK and whose sequence number is 0. That is the form of
//! the kernel's answer to a SYN that found no listener (RFC 793: a reset to
//! a segment without ACK carries sequence 0), and nothing else: a reset
//! that ends an established connection carries that connection's sequence
//! number, so the holder's deliberate resets (tickles, the front's reset
//! on release) pass. Without the refusal the client's SYN goes unanswered
//! and its kernel sends it again after its retransmission timeout (1 s on
//! Linux), by when the new holder has announced the VIP: the client waits
//! about a second instead of failing.
//!
//! The table lives in the kernel, not in this process, which is the point:
//! it outlives a SIGKILL. Start-up replaces it (one atomic batch: add,
//! delete, add), and a clean stop removes it. Bind mode does not use it:
//! there the released VIP must refuse at once.
//!
//! The rule is sent over `NETLINK_NETFILTER` as one nf_tables batch (the
//! messages the `nft` tool sends), so the image needs no nft binary; it
//! needs CAP_NET_ADMIN, which arp and bgp mode have anyway.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The nftables table this module owns (family `inet`).
pub const TABLE: &str = "bulwark_lb";
const CHAIN: &str = "refusals";

// linux/netfilter/nfnetlink.h and nf_tables.h.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
/// TCP header byte 13: RST (0x04) and ACK (0x10), nothing else.
const RST_ACK: u8 = 0x14;

/// The installed rule; [`Filter::remove`] takes it out on a clean stop.
#[derive(Debug)]
pub struct Filter {
    _installed: (),
}

impl Filter {
    /// Installs (or replaces) the rule for `addresses` on TCP `port`.
    pub fn install(addresses: &[IpAddr], port: u16) -> io::Result<Filter> {
        send(&install_batch(addresses, port))?;
        Ok(Filter { _installed: () })
    }

    /// Removes the table. A failure is logged: the rule then stays, and
    /// matches nothing once the VIP's address is gone.
    pub fn remove(self) {
        if let Err(e) = send(&remove_batch()) {
            tracing::warn!(error = %e, table = TABLE, "could not remove the nftables table that drops the VIP's connection refusals");
        }
    }
}

/// Removes the table an earlier run may have left (it was killed, so it
/// could not remove it), for a run that installs none. Quiet: most runs
/// find none, and a node without CAP_NET_ADMIN (bind mode needs no
/// capability) cannot have made one.
pub fn remove_leftover() {
    if let Err(e) = send(&remove_batch()) {
        tracing::debug!(error = %e, table = TABLE, "no leftover nftables table removed");
    }
}

/// The batch that replaces the table with one holding the rules.
fn install_batch(addresses: &[IpAddr], port: u16) -> Batch {
    let mut b = Batch::new();
    // Add first so that the delete cannot fail on a missing table; the
    // kernel applies the whole batch or none of it.
    b.table(NFT_MSG_NEWTABLE);
    b.table(NFT_MSG_DELTABLE);
    b.table(NFT_MSG_NEWTABLE);
    b.message(NFT_MSG_NEWCHAIN, NLM_F_CREATE, |m| {
        m.string(NFTA_CHAIN_TABLE, TABLE);
        m.string(NFTA_CHAIN_NAME, CHAIN);
        m.nested(NFTA_CHAIN_HOOK, |h| {
            h.u32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT);
            h.u32(NFTA_HOOK_PRIORITY, 0);
        });
        m.u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        m.string(NFTA_CHAIN_TYPE, "filter");
    });
    for address in addresses {
        b.message(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |m| {
            m.string(NFTA_RULE_TABLE, TABLE);
            m.string(NFTA_RULE_CHAIN, CHAIN);
            m.nested(NFTA_RULE_EXPRESSIONS, |list| {
                refusal_from(list, *address, port);
            });
        });
    }
    b.end()
}

/// The batch that removes the table (added first, so that a missing table
/// is no error).
fn remove_batch() -> Batch {
    let mut b = Batch::new();
    b.table(NFT_MSG_NEWTABLE);
    b.table(NFT_MSG_DELTABLE);
    b.end()
}

/// The expressions of one rule: `meta nfproto <family> meta l4proto tcp
/// <ip|ip6> saddr <address> tcp sport <port> tcp flags == rst|ack tcp
/// sequence 0 drop`.
fn refusal_from(list: &mut Attrs, address: IpAddr, port: u16) {
    let (family, offset, bytes) = match address {
        IpAddr::V4(a) => (NFPROTO_IPV4, 12, a.octets().to_vec()),
        IpAddr::V6(a) => (NFPROTO_IPV6, 8, a.octets().to_vec()),
    };
    meta_equals(list, NFT_META_NFPROTO, &[family]);
    meta_equals(list, NFT_META_L4PROTO, &[libc::IPPROTO_TCP as u8]);
    payload_equals(list, NFT_PAYLOAD_NETWORK_HEADER, offset, &bytes);
    payload_equals(list, NFT_PAYLOAD_TRANSPORT_HEADER, 0, &port.to_be_bytes());
    payload_equals(list, NFT_PAYLOAD_TRANSPORT_HEADER, 13, &[RST_ACK]);
    payload_equals(list, NFT_PAYLOAD_TRANSPORT_HEADER, 4, &[0; 4]);
    expression(list, "counter", |_| {});
    expression(list, "immediate", |d| {
        d.u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        d.nested(NFTA_IMMEDIATE_DATA, |data| {
            data.nested(NFTA_DATA_VERDICT, |v| v.u32(NFTA_VERDICT_CODE, NF_DROP));
        });
    });
}

fn meta_equals(list: &mut Attrs, key: u32, value: &[u8]) {
    expression(list, "meta", |d| {
        d.u32(NFTA_META_DREG, NFT_REG_1);
        d.u32(NFTA_META_KEY, key);
    });
    equals(list, value);
}

fn payload_equals(list: &mut Attrs, base: u32, offset: u32, value: &[u8]) {
    expression(list, "payload", |d| {
        d.u32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        d.u32(NFTA_PAYLOAD_BASE, base);
        d.u32(NFTA_PAYLOAD_OFFSET, offset);
        d.u32(NFTA_PAYLOAD_LEN, value.len() as u32);
    });
    equals(list, value);
}

/// `cmp eq` of register 1 against `value`: the rule stops here unless the
/// loaded bytes are exactly these.
fn equals(list: &mut Attrs, value: &[u8]) {
    expression(list, "cmp", |d| {
        d.u32(NFTA_CMP_SREG, NFT_REG_1);
        d.u32(NFTA_CMP_OP, NFT_CMP_EQ);
        d.nested(NFTA_CMP_DATA, |data| data.bytes(NFTA_DATA_VALUE, value));
    });
}

fn expression(list: &mut Attrs, name: &str, data: impl FnOnce(&mut Attrs)) {
    list.nested(NFTA_LIST_ELEM, |e| {
        e.string(NFTA_EXPR_NAME, name);
        e.nested(NFTA_EXPR_DATA, data);
    });
}

/// Netlink attributes being written into a message.
struct Attrs<'a> {
    buf: &'a mut Vec<u8>,
}

impl Attrs<'_> {
    fn raw(&mut self, kind: u16, value: &[u8]) {
        let len = u16::try_from(4 + value.len()).expect("attribute under 64 KiB");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        pad(self.buf);
    }

    fn bytes(&mut self, kind: u16, value: &[u8]) {
        self.raw(kind, value);
    }

    /// A NUL-terminated string.
    fn string(&mut self, kind: u16, value: &str) {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.raw(kind, &v);
    }

    /// nf_tables takes its 32-bit attributes in network order.
    fn u32(&mut self, kind: u16, value: u32) {
        self.raw(kind, &value.to_be_bytes());
    }

    fn nested(&mut self, kind: u16, inner: impl FnOnce(&mut Attrs)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        inner(&mut Attrs { buf: self.buf });
        let len = u16::try_from(self.buf.len() - start).expect("attribute under 64 KiB");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// One nf_tables transaction: batch begin, the messages, batch end.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// Messages that asked for an acknowledgement.
    acked: u32,
}

impl Batch {
    fn new() -> Self {
        let mut b = Batch {
            buf: Vec::new(),
            seq: 0,
            acked: 0,
        };
        b.header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, |_| {});
        b
    }

    fn end(mut self) -> Self {
        self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, |_| {});
        self
    }

    /// A table message (add or delete) for [`TABLE`].
    fn table(&mut self, kind: u16) {
        let flags = if kind == NFT_MSG_NEWTABLE {
            NLM_F_CREATE
        } else {
            0
        };
        self.message(kind, flags, |m| m.string(NFTA_TABLE_NAME, TABLE));
    }

    /// An nf_tables message of the `inet` family, acknowledged.
    fn message(&mut self, kind: u16, flags: u16, attrs: impl FnOnce(&mut Attrs)) {
        self.acked += 1;
        self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            NFPROTO_INET,
            attrs,
        );
    }

    /// nlmsghdr + nfgenmsg + attributes. The batch messages carry the
    /// subsystem in the nfgenmsg's resource id; the others carry 0.
    fn header(&mut self, kind: u16, flags: u16, family: u8, attrs: impl FnOnce(&mut Attrs)) {
        let start = self.buf.len();
        self.seq += 1;
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        let res_id = if kind == NFNL_MSG_BATCH_BEGIN || kind == NFNL_MSG_BATCH_END {
            NFNL_SUBSYS_NFTABLES
        } else {
            0
        };
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        attrs(&mut Attrs { buf: &mut self.buf });
        let len = u32::try_from(self.buf.len() - start).expect("message under 4 GiB");
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// Sends `batch` to the kernel and reads one answer per acknowledged
/// message; the first error fails (the kernel then applied nothing).
fn send(batch: &Batch) -> io::Result<()> {
    // SAFETY: socket(2) has no memory preconditions; the fd is checked and
    // owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: a valid fd and a timeval of the size passed.
    let set = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero sockaddr_nl addresses the kernel (pid 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: the buffer and the address are valid for the lengths passed.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            batch.buf.as_ptr().cast(),
            batch.buf.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    read_acks(&sock, batch.acked)
}

/// Reads netlink answers until `expected` acknowledgements came, or an
/// error.
fn read_acks(sock: &OwnedFd, expected: u32) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut acked = 0;
    while acked < expected {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        for answer in answers(&buf[..n]) {
            answer?;
            acked += 1;
        }
    }
    Ok(())
}

/// The NLMSG_ERROR answers in one datagram: `Ok` for an acknowledgement,
/// the errno otherwise. Other messages are skipped.
fn answers(mut data: &[u8]) -> Vec<io::Result<()>> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < 16 || len > data.len() {
            break;
        }
        if kind == libc::NLMSG_ERROR as u16 && len >= 20 {
            let errno = i32::from_ne_bytes([data[16], data[17], data[18], data[19]]);
            out.push(if errno == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-errno))
            });
        }
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks a batch's netlink messages: (type, flags, nfgenmsg family,
    /// attribute bytes).
    fn messages(buf: &[u8]) -> Vec<(u16, u16, u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut data = buf;
        while !data.is_empty() {
            let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
            let flags = u16::from_ne_bytes(data[6..8].try_into().unwrap());
            assert!(len.is_multiple_of(4), "messages are 4-byte aligned");
            out.push((kind, flags, data[16], data[20..len].to_vec()));
            data = &data[len..];
        }
        out
    }

    #[test]
    fn install_replaces_the_table_in_one_batch() {
        let b = install_batch(
            &[
                "192.0.2.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ],
            6443,
        );
        let kinds: Vec<u16> = messages(&b.buf).iter().map(|m| m.0).collect();
        let nft = |k: u16| (NFNL_SUBSYS_NFTABLES << 8) | k;
        assert_eq!(
            kinds,
            [
                NFNL_MSG_BATCH_BEGIN,
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_DELTABLE),
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_NEWCHAIN),
                nft(NFT_MSG_NEWRULE),
                nft(NFT_MSG_NEWRULE),
                NFNL_MSG_BATCH_END,
            ]
        );
        // Every nf_tables message is acknowledged, so an error names its
        // message; the batch markers are not.
        assert_eq!(b.acked, 6);
        for (kind, flags, family, _) in messages(&b.buf) {
            let inner = kind >> 8 == NFNL_SUBSYS_NFTABLES;
            assert_eq!(flags & NLM_F_ACK != 0, inner);
            assert_eq!(family, if inner { NFPROTO_INET } else { 0 });
        }
    }

    #[test]
    fn a_rule_matches_the_address_port_and_the_refusal_form() {
        let b = install_batch(&["192.0.2.10".parse().unwrap()], 6443);
        let rule = &messages(&b.buf)[5].3;
        let has = |needle: &[u8]| rule.windows(needle.len()).any(|w| w == needle);
        assert!(has(&[192, 0, 2, 10]), "the VIP address");
        assert!(has(&6443u16.to_be_bytes()), "the port");
        assert!(has(b"payload\0") && has(b"cmp\0") && has(b"immediate\0"));
        // cmp data: the flags byte, then the zero sequence number.
        assert!(has(&[5, 0, NFTA_DATA_VALUE as u8, 0, RST_ACK]));
        assert!(has(&[8, 0, NFTA_DATA_VALUE as u8, 0, 0, 0, 0, 0]));
        assert!(has(&NF_DROP.to_be_bytes()));
    }

    #[test]
    fn answers_are_acks_or_errors() {
        let answer = |errno: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(&errno.to_ne_bytes());
            m.extend_from_slice(&[0; 16]);
            m
        };
        let mut data = answer(0);
        data.extend(answer(-libc::EPERM));
        let got = answers(&data);
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        assert_eq!(
            got[1].as_ref().unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        assert!(
            answers(&[1, 2, 3]).is_empty(),
            "a short datagram is no answer"
        );
    }
}
