//! bind mode: the holder opens the front listener on VIP:port itself and
//! runs the proxy on it; releasing closes it.
//!
//! Closing must be immediate and certain (the fencing budget counts on
//! it), not "when the proxy task next runs": we keep a duplicate of the
//! listening socket and `shutdown(2)` it, which on Linux takes a listening
//! TCP socket out of the LISTEN state at once (new connects are refused)
//! whatever the task holding the other descriptor is doing. Connections
//! already accepted are reset at once ([`proxy::serve_vip`]): their clients
//! reconnect to the new holder instead of waiting for their own timeouts.

use std::net::{Shutdown, SocketAddr, TcpListener as StdListener};
use std::sync::Arc;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backends::Backends;
use crate::proxy::{self, ProxyConfig};

/// The front listener of a bind-mode holder.
pub struct BindVip {
    address: SocketAddr,
    backends: Backends,
    proxy: Arc<ProxyConfig>,
    running: Option<(StdListener, CancellationToken)>,
    /// The proxy task on the front listener while held; the VIP task
    /// watches it ([`BindVip::serving_ended`]).
    serving: Option<JoinHandle<Result<(), proxy::ProxyError>>>,
}

impl BindVip {
    /// Serves `address` while held.
    pub fn new(address: SocketAddr, backends: Backends, proxy: Arc<ProxyConfig>) -> Self {
        Self {
            address,
            backends,
            proxy,
            running: None,
            serving: None,
        }
    }

    /// Binds VIP:port and starts serving.
    pub fn claim(&mut self) -> std::io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let socket = Socket::new(
            Domain::for_address(self.address),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        // TIME_WAIT connections of a previous holding must not block us.
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        // "Address already in use" says who may hold the port (another
        // listener, e.g. an apiserver bound to all addresses, or an
        // outgoing connection), as every other listener of ours does.
        socket.bind(&self.address.into()).map_err(|e| {
            let e = bulwark_common::listen::explained(e, self.address.port());
            std::io::Error::new(e.kind(), format!("binding {}: {e}", self.address))
        })?;
        socket.listen(4096)?;
        let listener: StdListener = socket.into();
        let ours = listener.try_clone()?;
        let tokio_listener = tokio::net::TcpListener::from_std(listener)?;
        let token = CancellationToken::new();
        let (backends, config, t) = (self.backends.clone(), self.proxy.clone(), token.clone());
        self.serving = Some(tokio::spawn(proxy::serve_vip(
            tokio_listener,
            backends,
            config,
            t,
        )));
        self.running = Some((ours, token));
        Ok(())
    }

    /// Ends when the front listener's proxy task ends while the VIP is
    /// held (it fails, panics or returns), saying how; pending while not
    /// held. A holder that no longer serves must not go on holding.
    pub async fn serving_ended(&mut self) -> String {
        let Some(task) = self.serving.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = task.await;
        // Never polled again after it completed.
        self.serving = None;
        let why = match outcome {
            Ok(Ok(())) => "stopped".to_owned(),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(e) if e.is_panic() => "panicked".to_owned(),
            Err(_) => "was cancelled".to_owned(),
        };
        format!("the front listener on {} {why}", self.address)
    }

    /// Stops listening now and resets the accepted connections.
    pub fn release(&mut self) -> std::io::Result<()> {
        let Some((listener, token)) = self.running.take() else {
            return Ok(());
        };
        token.cancel();
        // Ends on the token; no longer watched.
        self.serving = None;
        let result = SockRef::from(&listener).shutdown(Shutdown::Both);
        drop(listener);
        match result {
            // ENOTCONN: already out of LISTEN (the task closed it first).
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
            other => other,
        }
    }

    /// Whether it is serving.
    pub fn held(&self) -> bool {
        self.running.is_some()
    }
}

impl Drop for BindVip {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A "VIP" on a free loopback port, not yet claimed.
    fn loopback_vip() -> (SocketAddr, BindVip) {
        let probe = StdListener::bind("127.0.0.1:0").unwrap();
        let address = probe.local_addr().unwrap();
        drop(probe);
        let vip = BindVip::new(
            address,
            Backends::default(),
            Arc::new(ProxyConfig::default()),
        );
        (address, vip)
    }

    #[tokio::test]
    async fn release_refuses_new_connects_at_once() {
        let (address, mut vip) = loopback_vip();
        vip.claim().unwrap();
        assert!(vip.held());
        tokio::net::TcpStream::connect(address).await.unwrap();
        vip.release().unwrap();
        assert!(!vip.held());
        let err = tokio::net::TcpStream::connect(address).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        // And it can be taken again (by us or, on this host, by another node).
        vip.claim().unwrap();
        tokio::net::TcpStream::connect(address).await.unwrap();
    }

    /// The usual mistake in bind mode: the node's apiserver listens on
    /// every address at the VIP's port. The claim fails (and is retried)
    /// with an error that says what holds the port and how to see it.
    #[tokio::test]
    async fn a_port_held_by_a_wildcard_listener_fails_the_claim_with_the_reason() {
        let apiserver = StdListener::bind("0.0.0.0:0").unwrap();
        let port = apiserver.local_addr().unwrap().port();
        let mut vip = BindVip::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Backends::default(),
            Arc::new(ProxyConfig::default()),
        );
        let err = vip.claim().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("binding 127.0.0.1:{port}: "))
                && text.contains(&format!("ss -ltnp 'sport = :{port}'")),
            "{text}"
        );
        assert!(!vip.held());
    }

    #[tokio::test]
    async fn the_vip_task_learns_when_the_front_listener_stops_while_held() {
        let (address, mut vip) = loopback_vip();
        // Not held: nothing to watch.
        let idle = tokio::time::timeout(Duration::from_millis(50), vip.serving_ended()).await;
        assert!(idle.is_err());
        vip.claim().unwrap();
        // The proxy task ends while the VIP is still held.
        vip.running.as_ref().unwrap().1.cancel();
        let why = tokio::time::timeout(Duration::from_secs(5), vip.serving_ended())
            .await
            .unwrap();
        assert_eq!(why, format!("the front listener on {address} stopped"));
        // Released, it is not watched (nor polled again) any more.
        vip.release().unwrap();
        let idle = tokio::time::timeout(Duration::from_millis(50), vip.serving_ended()).await;
        assert!(idle.is_err());
    }
}
