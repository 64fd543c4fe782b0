//! Ephemeral ports for processes that must be told their port up front.
//!
//! [`free_port`] binds `<ip>:0`, reads the port the kernel chose and closes
//! the socket. Between that close and the child's own bind, anything else on
//! the machine may take the port (another test process, or the kernel giving
//! it to an outgoing connection as its local port). The window is short, but
//! tests run in parallel, so starters that pre-allocate ports wrap the whole
//! "allocate, spawn, wait until ready" sequence in [`retry_on_addr_in_use`],
//! which starts over with fresh ports when the child died of "address already
//! in use". Where a program can bind port 0 itself and report what it got
//! (our fixture apiserver, moto), the harness does that instead and there is
//! no race at all.
//!
//! A test that needs a port where nothing listens takes a [`ClosedPort`]: a
//! released port can be taken again at once by a parallel test's listener,
//! and then the "dead" backend answers.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Mutex, OnceLock};

use anyhow::Context as _;

use crate::process::ExitedEarly;

/// How many times [`retry_on_addr_in_use`] tries in all.
pub const ADDR_IN_USE_ATTEMPTS: usize = 4;

/// A free TCP port on 127.0.0.1.
pub fn loopback_port() -> anyhow::Result<u16> {
    free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// A free TCP port on `ip` (bind `ip:0`, then release).
pub fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    Ok(free_ports(ip, 1)?[0])
}

/// `n` distinct free TCP ports on `ip`.
///
/// All sockets stay bound until every port is chosen, so the ports differ;
/// ports this process handed out before are skipped too, so two harness
/// objects in one test never get the same port (the kernel reuses a freed
/// ephemeral port quickly).
pub fn free_ports(ip: IpAddr, n: usize) -> anyhow::Result<Vec<u16>> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        anyhow::ensure!(
            tries <= 64 * n.max(1),
            "could not find {n} free ports on {ip}"
        );
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding {ip}:0 to find a free port"))?;
        let port = listener.local_addr()?.port();
        let fresh = handed_out
            .lock()
            .map(|mut set| set.insert(port))
            .unwrap_or(true);
        if fresh {
            ports.push(port);
        }
        held.push(listener);
    }
    Ok(ports)
}

/// A loopback port that refuses every connect for as long as this value
/// lives, except while a listener from [`ClosedPort::listen`] is open.
///
/// The socket is bound but never listens, so a SYN gets a reset ("connection
/// refused"). It is bound without `SO_REUSEADDR`, which keeps every other
/// bind and every outgoing connection's local port off the port; it has
/// `SO_REUSEPORT` only so that its own [`ClosedPort::listen`] can share it.
pub struct ClosedPort {
    _socket: socket2::Socket,
    address: SocketAddr,
}

impl ClosedPort {
    /// A closed port on 127.0.0.1.
    pub fn loopback() -> anyhow::Result<Self> {
        let socket = reuseport_socket()?;
        socket
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .context("binding 127.0.0.1:0 to hold a closed port")?;
        let address = socket
            .local_addr()?
            .as_socket()
            .context("a bound TCP socket has an inet address")?;
        Ok(Self {
            _socket: socket,
            address,
        })
    }

    /// Where a connect is refused.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A listener on this port, for a test whose target answers first and
    /// then dies: once the listener is dropped the port refuses again, and
    /// is still held.
    pub fn listen(&self) -> anyhow::Result<std::net::TcpListener> {
        let socket = reuseport_socket()?;
        socket
            .bind(&self.address.into())
            .with_context(|| format!("binding {} beside the closed port", self.address))?;
        socket.listen(128)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    }
}

fn reuseport_socket() -> anyhow::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .context("creating a socket for a closed port")?;
    socket.set_reuse_port(true)?;
    Ok(socket)
}

/// True when `err` is a child that exited because its port was taken.
pub fn is_addr_in_use(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<ExitedEarly>()
            .is_some_and(|e| e.addr_in_use)
            || cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
    })
}

/// Runs `attempt` (allocate ports, start, wait ready) until it succeeds or
/// fails for another reason than a port being taken; see the module docs.
pub async fn retry_on_addr_in_use<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Err(err) if tries < ADDR_IN_USE_ATTEMPTS && is_addr_in_use(&err) => {
                eprintln!(
                    "[bulwark-testkit] {what}: a port was taken between choosing and binding it; \
                     retrying with new ports ({tries}/{ADDR_IN_USE_ATTEMPTS})"
                );
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_refuses_and_cannot_be_taken() {
        let closed = ClosedPort::loopback().unwrap();
        let err = std::net::TcpStream::connect(closed.address()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        // std's listener sets SO_REUSEADDR, like tokio's and most servers'.
        let err = TcpListener::bind(closed.address()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }

    #[test]
    fn a_closed_port_listens_and_then_refuses_again() {
        let closed = ClosedPort::loopback().unwrap();
        let listener = closed.listen().unwrap();
        std::net::TcpStream::connect(closed.address()).unwrap();
        drop(listener);
        let err = std::net::TcpStream::connect(closed.address()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        let err = TcpListener::bind(closed.address()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
