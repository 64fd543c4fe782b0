//! One listener per data-path thread: the caller's listener plus one more
//! socket per extra thread, all bound to the same address in one
//! `SO_REUSEPORT` group. The kernel then queues each new connection on one
//! thread's listener (by a hash of its addresses), and that thread accepts
//! and serves it: no acceptor thread, no cross-thread hand-off (a futex
//! wake-up and a context switch per connection), as in HAProxy or nginx
//! with `reuseport`.
//!
//! The caller's listener was bound without `SO_REUSEPORT`; setting it now
//! lets the new sockets join it (the kernel checks the flag of the sockets
//! already bound when another binds, and makes the group when the second
//! one listens). The new sockets copy what decides where a socket listens
//! and what it may bind to: the address, `IP_FREEBIND` (arp and bgp mode's
//! front, bound before the VIP is on the node), `IPV6_V6ONLY` and the bound
//! device.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, SockRef, Socket, Type};

/// Queue length of each extra listener, as the fronts' own (the kernel
/// caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// `listener` followed by `count - 1` listeners on its address, all in
/// one `SO_REUSEPORT` group, non-blocking. On error `listener` comes back
/// as it was, for one acceptor to serve alone.
pub(super) fn per_thread(
    listener: TcpListener,
    count: usize,
) -> Result<Vec<TcpListener>, (TcpListener, io::Error)> {
    if count <= 1 {
        return Ok(vec![listener]);
    }
    match extra(&listener, count) {
        Ok(more) => {
            let mut all = Vec::with_capacity(count);
            all.push(listener);
            all.extend(more);
            Ok(all)
        }
        Err(e) => {
            // Best effort: nothing else may join a listener served alone.
            let _ = SockRef::from(&listener).set_reuse_port(false);
            Err((listener, e))
        }
    }
}

fn extra(listener: &TcpListener, count: usize) -> io::Result<Vec<TcpListener>> {
    let sock = SockRef::from(listener);
    let addr = listener.local_addr()?;
    let freebind = match addr {
        SocketAddr::V4(_) => sock.freebind_v4()?,
        SocketAddr::V6(_) => sock.freebind_v6()?,
    };
    let v6only = match addr {
        SocketAddr::V4(_) => None,
        SocketAddr::V6(_) => Some(sock.only_v6()?),
    };
    let device = sock.device()?;
    sock.set_reuse_port(true)?;
    (1..count)
        .map(|_| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            if freebind {
                match addr {
                    SocketAddr::V4(_) => s.set_freebind_v4(true)?,
                    SocketAddr::V6(_) => s.set_freebind_v6(true)?,
                }
            }
            if let Some(only) = v6only {
                s.set_only_v6(only)?;
            }
            if device.is_some() {
                s.bind_device(device.as_deref())?;
            }
            s.bind(&addr.into())?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    /// Every listener of the group gets connections, and each connection
    /// reaches exactly one of them.
    #[test]
    fn every_listener_of_the_group_accepts() {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = first.local_addr().unwrap();
        let all = per_thread(first, 3).map_err(|(_, e)| e).unwrap();
        assert_eq!(all.len(), 3);
        for l in &all {
            assert_eq!(l.local_addr().unwrap(), addr);
            l.set_nonblocking(true).unwrap();
        }
        // Each connect comes from a new source port: the kernel's hash
        // spreads 200 of them over the three.
        let clients: Vec<_> = (0..200)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut per_listener = [0usize; 3];
        let mut peers = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while peers.len() < clients.len() && Instant::now() < deadline {
            for (i, l) in all.iter().enumerate() {
                while let Ok((_s, peer)) = l.accept() {
                    assert!(peers.insert(peer), "{peer} accepted twice");
                    per_listener[i] += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(peers.len(), clients.len(), "{per_listener:?}");
        assert!(per_listener.iter().all(|&n| n > 0), "{per_listener:?}");
    }

    /// Closing every listener of the group leaves nothing listening.
    #[test]
    fn dropping_every_listener_closes_the_port() {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = first.local_addr().unwrap();
        let all = per_thread(first, 2).map_err(|(_, e)| e).unwrap();
        assert!(std::net::TcpStream::connect(addr).is_ok());
        drop(all);
        assert!(std::net::TcpStream::connect(addr).is_err());
    }

    /// A front's listener bound with IP_FREEBIND keeps its extra listeners
    /// free to bind too (here to an address the node does not have).
    #[test]
    fn the_group_copies_freebind() {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_freebind_v4(true).unwrap();
        s.set_reuse_address(true).unwrap();
        let absent: SocketAddr = "192.0.2.77:0".parse().unwrap();
        s.bind(&absent.into()).unwrap();
        s.listen(16).unwrap();
        let all = per_thread(s.into(), 2).map_err(|(_, e)| e).unwrap();
        assert_eq!(all.len(), 2);
        let a = all[0].local_addr().unwrap();
        assert_eq!(all[1].local_addr().unwrap(), a);
        assert!(SockRef::from(&all[1]).freebind_v4().unwrap());
    }
}
