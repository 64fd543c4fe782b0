//! The two UDP sockets of RFC 5881 single-hop BFD: a listener on port
//! 3784 that learns each datagram's TTL (hop limit) so GTSM can be
//! enforced, and a per-session sender bound to a source port in
//! 49152–65535 that sends with TTL 255.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The destination port of single-hop control packets.
pub const PORT: u16 = 3784;
/// Where a sender's source port comes from (RFC 5881 §4).
pub const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// What GTSM asks for: sent with 255, received with 255.
pub const TTL: u32 = 255;

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the pointer and length describe `value`, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unspecified(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

/// The listener for one family on `port` (3784; tests pass their own),
/// telling the kernel to attach each datagram's TTL or hop limit.
pub fn listen(v6: bool, port: u16) -> io::Result<UdpSocket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        // The IPv4 listener takes IPv4: no mapped addresses here.
        s.set_only_v6(true)?;
        set_int(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVHOPLIMIT,
            1,
        )?;
    } else {
        set_int(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVTTL, 1)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::new(unspecified(v6), port).into())?;
    UdpSocket::from_std(s.into())
}

/// A sender for a session with a peer of `v6`'s family: TTL 255, bound to
/// a free port from [`SOURCE_PORTS`] (tried from a random start).
pub fn sender(v6: bool) -> io::Result<UdpSocket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        s.set_unicast_hops_v6(TTL)?;
    } else {
        s.set_ttl_v4(TTL)?;
    }
    s.set_nonblocking(true)?;
    let (lo, hi) = (*SOURCE_PORTS.start(), *SOURCE_PORTS.end());
    let span = u32::from(hi - lo) + 1;
    let start = rand::random_range(0..span);
    let mut last = None;
    // A bounded walk: a host with every port of the range taken gets an
    // error, not a spin.
    for k in 0..span.min(512) {
        let port = lo + ((start + k) % span) as u16;
        match s.bind(&SocketAddr::new(unspecified(v6), port).into()) {
            Ok(()) => return UdpSocket::from_std(s.into()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free BFD source port")))
}

/// One datagram with its sender and the TTL (hop limit) it arrived with.
pub async fn recv(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<u8>)> {
    let fd = sock.as_raw_fd();
    sock.async_io(Interest::READABLE, || recvmsg(fd, buf)).await
}

fn recvmsg(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<u8>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64s: a control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    let mut ttl = None;
    let mut got = 0usize;
    // SAFETY: `try_init` hands a storage and its length for the source
    // address; recvmsg writes at most that many bytes there and updates
    // the length, as try_init requires.
    let ((), from) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            // SAFETY: all-zero is a valid msghdr.
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = storage.cast();
            msg.msg_namelen = *len;
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: every pointer in `msg` is valid for the call.
            let n = libc::recvmsg(fd, &raw mut msg, libc::MSG_DONTWAIT);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            got = n as usize;
            *len = msg.msg_namelen;
            // SAFETY: the kernel filled `msg_controllen` bytes of control
            // messages; the CMSG macros walk them within that bound.
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                let h = &*c;
                let wanted = (h.cmsg_level == libc::IPPROTO_IP && h.cmsg_type == libc::IP_TTL)
                    || (h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_HOPLIMIT);
                if wanted {
                    let v: libc::c_int = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    ttl = u8::try_from(v).ok();
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
            Ok(())
        })?
    };
    let from = from
        .as_socket()
        .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
    // An IPv4 peer seen through an IPv6 socket would be mapped; the IPv6
    // listener is v6-only, so this only tidies the address for lookups.
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    Ok((got.min(buf.len()), from, ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_sees_the_ttl_a_sender_used() {
        let listener = listen(false, 0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let gtsm = sender(false).unwrap();
        assert!(SOURCE_PORTS.contains(&gtsm.local_addr().unwrap().port()));
        gtsm.send_to(b"bfd", to).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, from, ttl) = recv(&listener, &mut buf).await.unwrap();
        assert_eq!((&buf[..n], ttl), (&b"bfd"[..], Some(255)));
        assert_eq!(
            from,
            gtsm.local_addr()
                .map(|a| SocketAddr::new(to.ip(), a.port()))
                .unwrap()
        );

        let plain = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        plain.set_ttl(64).unwrap();
        plain.send_to(b"x", to).await.unwrap();
        let (_, _, ttl) = recv(&listener, &mut buf).await.unwrap();
        assert_eq!(ttl, Some(64));
    }

    #[tokio::test]
    async fn ipv6_hop_limit_too() {
        let listener = listen(true, 0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let gtsm = sender(true).unwrap();
        gtsm.send_to(b"bfd", SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let (_, _, ttl) = recv(&listener, &mut buf).await.unwrap();
        assert_eq!(ttl, Some(255));
    }
}
