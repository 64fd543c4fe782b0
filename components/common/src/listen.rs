//! Binding a daemon's listeners, with an error that says why a port is
//! taken.
//!
//! "Address already in use" has two causes on a control-plane node. The
//! usual one is another listener (a second copy of the daemon, a leftover
//! static pod). The other is an outgoing connection of the host that took
//! the port as its source port: that happens only when the port lies inside
//! `net.ipv4.ip_local_port_range`, and a host tuned for many connections
//! often widens that range down to 1024, below bulwark's ports (9441, 9442,
//! 6443). The daemon then fails to start now and then, after a restart,
//! with nothing listening on the port. The error says which case the port
//! is in and what to do; the kernel's ranges are read from `/proc` at the
//! moment of the failure (those of the daemon's network namespace).

use std::io;
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use anyhow::Context;
use tokio::net::TcpListener;

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Binds `addr` for the listener called `what` (e.g. "API"); on failure the
/// error names both, and for a port in use, why it may be ([`explained`]).
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| explained(e, addr.port()))
        .with_context(|| format!("binding the {what} listener on {addr}"))
}

/// A failed bind of `port`: for "address already in use", the kernel's
/// message followed by the likely cause and the fix (the error's kind
/// kept); any other error as it is.
pub fn explained(error: io::Error, port: u16) -> io::Error {
    match in_use_hint(port, &error) {
        Some(hint) => io::Error::new(error.kind(), format!("{error}{hint}")),
        None => error,
    }
}

/// For an `AddrInUse` error on `port`, the likely cause and the fix, as a
/// clause to append to the error; `None` for other errors, or when the
/// kernel's range cannot be read.
fn in_use_hint(port: u16, error: &io::Error) -> Option<String> {
    if error.kind() != io::ErrorKind::AddrInUse {
        return None;
    }
    let range = parse_range(&std::fs::read_to_string(PORT_RANGE).ok()?)?;
    let reserved = std::fs::read_to_string(RESERVED_PORTS).unwrap_or_default();
    Some(hint(port, &range, &reserved))
}

/// The clause for `port` given the host's ephemeral `range` and its
/// reserved ports (the `/proc` file's text).
fn hint(port: u16, range: &RangeInclusive<u16>, reserved: &str) -> String {
    let (lo, hi) = (range.start(), range.end());
    if range.contains(&port) && !is_reserved(port, reserved) {
        format!(
            ": another listener may hold it (`ss -ltnp 'sport = :{port}'`), or an outgoing \
             connection of this host took it as its source port, since {port} lies inside \
             net.ipv4.ip_local_port_range ({lo}-{hi}); reserve it \
             (net.ipv4.ip_local_reserved_ports={port}) or raise the range's start above it"
        )
    } else {
        format!(
            ": another listener holds it (`ss -ltnp 'sport = :{port}'`: a second copy of this \
             daemon, or another static pod)"
        )
    }
}

/// `ip_local_port_range`'s two numbers, "low high".
fn parse_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut n = text.split_whitespace().map(str::parse::<u16>);
    match (n.next(), n.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Some(lo..=hi),
        _ => None,
    }
}

/// Whether `ip_local_reserved_ports` (comma-separated ports and
/// `low-high` ranges) holds `port`.
fn is_reserved(port: u16, reserved: &str) -> bool {
    reserved.trim().split(',').any(|item| {
        let mut ends = item.trim().splitn(2, '-').map(str::parse::<u16>);
        match (ends.next(), ends.next()) {
            (Some(Ok(only)), None) => only == port,
            (Some(Ok(lo)), Some(Ok(hi))) => (lo..=hi).contains(&port),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_formats_parse() {
        assert_eq!(parse_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_range("1024 65535"), Some(1024..=65535));
        assert_eq!(parse_range("garbage"), None);
        assert_eq!(parse_range("1024"), None);
        assert!(is_reserved(9442, "6443,9441-9442\n"));
        assert!(is_reserved(6443, "6443,9441-9442"));
        assert!(!is_reserved(9443, "6443,9441-9442"));
        assert!(!is_reserved(9442, "\n"));
        assert!(!is_reserved(9442, ""));
    }

    /// A port inside the ephemeral range and not reserved may be an
    /// outgoing connection's: the hint says so and how to reserve it.
    /// Outside the range, or reserved, only a listener can hold it.
    #[test]
    fn the_hint_names_the_ephemeral_range_only_where_it_applies() {
        let wide = 1024..=65535;
        let h = hint(9442, &wide, "");
        assert!(
            h.contains("inside net.ipv4.ip_local_port_range (1024-65535)"),
            "{h}"
        );
        assert!(h.contains("net.ipv4.ip_local_reserved_ports=9442"), "{h}");
        let default = 32768..=60999;
        let h = hint(9442, &default, "");
        assert!(!h.contains("ip_local_port_range"), "{h}");
        assert!(h.contains("another listener holds it"), "{h}");
        let h = hint(9442, &wide, "9441-9442");
        assert!(!h.contains("ip_local_port_range"), "{h}");
    }

    /// The real case: an outgoing connection holds a port (the kernel
    /// chose it from the ephemeral range), and binding a listener there
    /// fails with an error that says why.
    #[tokio::test]
    async fn a_port_taken_by_an_outgoing_connection_is_explained() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(server.local_addr().unwrap())
            .await
            .unwrap();
        let taken = client.local_addr().unwrap();
        let err = bind(taken, "API").await.unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.starts_with(&format!(
                "binding the API listener on {taken}: Address already in use (os error 98): "
            )),
            "{text}"
        );
        // Unless the host reserved that very port, which the kernel would
        // not have chosen then.
        assert!(
            text.contains("ip_local_port_range"),
            "an ephemeral port's error names the range: {text}"
        );
    }

    #[tokio::test]
    async fn other_errors_get_no_hint() {
        let e = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(in_use_hint(80, &e), None);
        let ok = bind("127.0.0.1:0".parse().unwrap(), "admin").await;
        assert!(ok.is_ok());
    }
}
