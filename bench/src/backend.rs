//! HTTPS backends for the benches: hyper over rustls with a fresh
//! self-signed ECDSA certificate, serving `/small` (a short body), `/64k`
//! (65 536 bytes) and `/87k` (87 KiB, the size of the outside run's
//! responses) from static memory. They terminate TLS, like an apiserver,
//! so the proxies in front of them only pass bytes through; `--plain`
//! serves the same over plain HTTP.
//!
//! `bulwark-bench datapath` uses nginx by default and this server with
//! `--backend builtin`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Body of `/small`: about the size of a small apiserver answer.
pub(crate) const SMALL: &[u8] = b"{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Success\",\"code\":200,\"message\":\"ok\"}\n";

/// Flags of the internal `backend` subcommand.
#[derive(clap::Args)]
pub struct Args {
    /// Addresses to listen on (repeat); all share one runtime.
    #[arg(long = "listen", required = true)]
    listen: Vec<SocketAddr>,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Serve this certificate chain (PEM) instead of a fresh self-signed
    /// one, so a client that verifies (the prober) can trust its CA.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Key of `--cert` (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long, conflicts_with_all = ["cert", "key"])]
    plain: bool,
}

/// Body size of `/87k`.
pub(crate) const BODY_87K: usize = 87 * 1024;

pub fn run(args: &Args) -> anyhow::Result<()> {
    bulwark_common::tls::install_crypto_provider();
    let (chain, pkey) = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => (
            bulwark_common::tls::load_certs(cert, "certificate")?,
            bulwark_common::tls::load_key(key)?,
        ),
        _ => {
            let key =
                rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                    .context("generating the certificate")?;
            let cert = CertificateDer::from(key.cert.der().to_vec());
            let pkey =
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
            (vec![cert], pkey)
        }
    };
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, pkey)
        .context("building the TLS config")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let acceptor = (!args.plain).then_some(acceptor);
    let big: &'static [u8] = Box::leak(vec![b'x'; BODY_87K].into_boxed_slice());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .context("building the runtime")?;
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for addr in &args.listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let acceptor = acceptor.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let body = match req.uri().path() {
                                "/64k" => Bytes::from_static(&big[..64 * 1024]),
                                "/87k" => Bytes::from_static(big),
                                _ => Bytes::from_static(SMALL),
                            };
                            async move {
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                    body,
                                )))
                            }
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        let _ = match acceptor {
                            Some(acceptor) => {
                                let Ok(tls) = acceptor.accept(tcp).await else {
                                    return;
                                };
                                http.serve_connection(TokioIo::new(tls), svc).await
                            }
                            None => http.serve_connection(TokioIo::new(tcp), svc).await,
                        };
                    });
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}
