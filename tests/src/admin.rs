//! The daemons' admin endpoints as tests read them: a plain `GET`, the
//! `/debug/workers` list, and the log lines a daemon in this process
//! writes. Helpers for test bodies: they panic on failure, which fails
//! the test with the message.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bulwark_common::telemetry::LoggingConfig;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on a plain-HTTP address: (status, body). Panics on I/O
/// errors (a test helper).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// The entry named `name` in a `/debug/workers` answer.
pub fn worker<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["workers"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == name)
}

/// Log lines written while it is installed: the process-wide subscriber,
/// in the daemons' own format (nextest runs each test in its own process).
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// Installs the capture as the global subscriber. Panics if one is
    /// installed already.
    pub fn install() -> Self {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = bulwark_common::telemetry::subscriber(
            &LoggingConfig::default(),
            move || writer.clone(),
            false,
        )
        .unwrap();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        captured
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
