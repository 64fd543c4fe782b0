//! TCP MD5 signatures (RFC 2385) for BGP sessions with a password: the
//! kernel signs every segment to the peer with the key set by
//! `setsockopt(TCP_MD5SIG)` before connecting. libc has the option's
//! number but not its argument, so the struct is declared here as
//! linux/tcp.h has it.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

/// The longest key the kernel takes (TCP_MD5SIG_MAXKEYLEN).
pub const MAX_KEY: usize = 80;

/// `struct tcp_md5sig` (linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MAX_KEY],
}

/// Sets `key` for segments to and from `peer` on `socket`.
pub fn set_key(socket: &impl AsRawFd, peer: SocketAddr, key: &[u8]) -> std::io::Result<()> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a TCP MD5 key has 1 to {MAX_KEY} bytes"),
        ));
    }
    // SAFETY: all-zero is a valid value of this plain-old-data struct.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let sockaddr = socket2::SockAddr::from(peer);
    let len = usize::try_from(sockaddr.len()).map_err(std::io::Error::other)?;
    // SAFETY: `sockaddr` holds `len` valid bytes, and `len` fits in a
    // sockaddr_storage (that is what SockAddr stores them in).
    unsafe {
        std::ptr::copy_nonoverlapping(
            sockaddr.as_ptr().cast::<u8>(),
            (&raw mut sig.addr).cast::<u8>(),
            len.min(std::mem::size_of::<libc::sockaddr_storage>()),
        );
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: the pointer and length describe `sig`, alive for the call;
    // the descriptor is open.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&raw const sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("setting the TCP MD5 key (is CONFIG_TCP_MD5SIG in this kernel?): {e}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_takes_the_key_and_bad_keys_are_refused() {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer: SocketAddr = "127.0.0.2:179".parse().unwrap();
        set_key(&socket, peer, b"s3cret").unwrap();
        let socket6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None);
        if let Ok(s6) = socket6 {
            set_key(&s6, "[::1]:179".parse().unwrap(), b"s3cret").unwrap();
        }
        for bad in [&b""[..], &[b'k'; MAX_KEY + 1][..]] {
            let e = set_key(&socket, peer, bad).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        }
    }
}
