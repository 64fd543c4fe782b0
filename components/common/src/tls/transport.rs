//! The TLS handshakes of bulwark's gRPC servers and channels, done here
//! rather than by tonic so that each new connection takes the material
//! current at that moment (tonic's own TLS settings are fixed when the
//! server or endpoint is built; see reload.rs).

use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use tokio_stream::wrappers::ReceiverStream;

use super::TlsMaterial;

/// Longest a client may take over its handshake before the server drops it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` and yields each once its handshake
/// with the then-current server config completes. Handshakes run
/// concurrently (a slow or silent client holds up no other); failed ones
/// are logged at debug and dropped. When the stream is dropped (the server
/// stops accepting), the listener is closed.
pub fn accept(
    listener: TcpListener,
    tls: TlsMaterial,
) -> ReceiverStream<std::io::Result<server::TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off a little
                    // rather than spin.
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let config = match tls.server_h2() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "no usable server TLS config");
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp))
                    .await
                {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Dials `address` (`host:port`) and handshakes with the then-current
/// client config, verifying the server under `server_name`.
pub async fn connect(
    address: &str,
    server_name: &str,
    tls: &TlsMaterial,
) -> std::io::Result<TokioIo<client::TlsStream<TcpStream>>> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("server name {server_name:?}: {e}"),
        )
    })?;
    let config = tls.client_h2().map_err(std::io::Error::other)?;
    let tcp = match address.parse::<SocketAddr>() {
        Ok(sa) => TcpStream::connect(sa).await?,
        Err(_) => TcpStream::connect(address).await?,
    };
    tcp.set_nodelay(true)?;
    let stream = TlsConnector::from(config).connect(name, tcp).await?;
    Ok(TokioIo::new(stream))
}
