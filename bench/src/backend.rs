//! HTTPS backends for the data-path bench: hyper over rustls with a fresh
//! self-signed ECDSA certificate, serving `/small` (a short body) and
//! `/64k` (65 536 bytes) from static memory. They terminate TLS, like an
//! apiserver, so the proxies in front of them only pass bytes through.
//!
//! A stand-in until the testkit's fixture apiserver can take its place.

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
const SMALL: &[u8] = b"{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Success\",\"code\":200,\"message\":\"ok\"}\n";

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
}

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

    let big: &'static [u8] = Box::leak(vec![b'x'; 64 * 1024].into_boxed_slice());
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
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let body = match req.uri().path() {
                                "/64k" => Bytes::from_static(big),
                                _ => Bytes::from_static(SMALL),
                            };
                            async move {
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                    body,
                                )))
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
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
