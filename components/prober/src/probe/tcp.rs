//! A plain TCP connect: the fallback for targets without a health
//! endpoint. It proves that something accepts connections, nothing more.

use std::time::{Duration, Instant};

use bulwark_api::lb::v1::ProbeReason;

use super::{Failure, Outcome, Stage, connect, resolve};
use crate::config::split_address;

/// A TCP connect probe of one address.
#[derive(Debug)]
pub struct TcpProbe {
    host: String,
    port: u16,
}

impl TcpProbe {
    /// A probe of `address` (host:port).
    pub fn new(address: &str) -> Result<Self, String> {
        let (host, port) = split_address(address)?;
        Ok(Self { host, port })
    }

    /// Runs one probe within `timeout`.
    pub async fn run(&mut self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let mut stage = Stage::Resolving;
        let attempt = async {
            let addrs = resolve(&self.host, self.port).await?;
            stage = Stage::Connecting;
            // Dropping the stream closes it at once: the connect was the test.
            connect(&addrs).await.map(drop)
        };
        let result = tokio::time::timeout(timeout, attempt).await;
        let latency = start.elapsed();
        match result {
            Ok(Ok(())) => Outcome::passed(None, latency),
            Ok(Err(f)) => Outcome::failed(f, latency),
            Err(_) => Outcome::failed(
                Failure::new(
                    ProbeReason::Timeout,
                    format!("no answer within {} ms ({stage})", timeout.as_millis()),
                ),
                latency,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_pass_and_refusals_fail() {
        // Held after the listener goes, so no other test can take it.
        let port = bulwark_testkit::ports::ClosedPort::loopback().unwrap();
        let listener = port.listen().unwrap();
        let addr = port.address().to_string();
        let mut probe = TcpProbe::new(&addr).unwrap();
        let ok = probe.run(Duration::from_secs(2)).await;
        assert!(ok.ok, "{ok:?}");
        assert_eq!(ok.reason, ProbeReason::Ok);
        drop(listener);
        let refused = probe.run(Duration::from_secs(2)).await;
        assert!(!refused.ok);
        assert_eq!(
            refused.reason,
            ProbeReason::ConnectionRefused,
            "{refused:?}"
        );
        assert!(
            refused.detail.starts_with("connecting:"),
            "{}",
            refused.detail
        );
    }
}
