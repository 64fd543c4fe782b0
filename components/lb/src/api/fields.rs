//! The checks of the operator API's request fields, shared by the API and
//! by bulwarkctl's flags, so a bad value gets the same words whichever
//! refuses it: the API answers INVALID_ARGUMENT naming the field
//! ([`invalid`]), bulwarkctl refuses the flag before it connects.
//!
//! Each check returns what follows the value in the message: "`x` is
//! *not a valid backend id: …*".

use std::fmt::Display;
use std::net::SocketAddr;

use tonic::Status;

use crate::config::{
    BACKEND_ID_FORMAT, MAX_WEIGHT, connectable, valid_backend_id, valid_host_port,
};

/// A backend id: a lowercase DNS name, as a node name is.
pub fn backend_id(id: &str) -> Result<String, String> {
    if valid_backend_id(id) {
        Ok(id.to_owned())
    } else {
        Err(format!("not a valid backend id: {BACKEND_ID_FORMAT}"))
    }
}

/// A backend address: IP:port, neither of them 0.
pub fn backend_address(address: &str) -> Result<SocketAddr, String> {
    match address.parse::<SocketAddr>() {
        Ok(a) if connectable(a) => Ok(a),
        _ => Err("not an IP:port an apiserver listens on (e.g. 10.0.0.11:6443)".to_owned()),
    }
}

/// A backend weight: 1..=MAX_WEIGHT.
pub fn weight(w: u32) -> Result<u32, String> {
    if (1..=MAX_WEIGHT).contains(&w) {
        Ok(w)
    } else {
        Err(format!("out of range: expected between 1 and {MAX_WEIGHT}"))
    }
}

/// A zone: at most 63 printable ASCII characters (empty: no zone).
pub fn zone(zone: &str) -> Result<String, String> {
    if zone.len() <= 63 && zone.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(zone.to_owned())
    } else {
        Err("not a zone: at most 63 printable ASCII characters".to_owned())
    }
}

/// A member's Raft, API or proxy address: host:port.
pub fn host_port(address: &str) -> Result<String, String> {
    if valid_host_port(address) {
        Ok(address.to_owned())
    } else {
        Err("not host:port".to_owned())
    }
}

/// A member's Raft id: greater than 0.
pub fn node_id(id: u64) -> Result<u64, String> {
    if id == 0 {
        Err("not a node id: it must be greater than 0".to_owned())
    } else {
        Ok(id)
    }
}

/// The API's answer to a field a check refused: "field `f`: `value` is
/// `why`". Pass a client's string through [`super::clip`].
pub fn invalid(field: &str, value: impl Display, why: &str) -> Status {
    Status::invalid_argument(format!("field `{field}`: {value} is {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_says_what_the_value_is_not() {
        assert_eq!(backend_id("cp-1.example").unwrap(), "cp-1.example");
        assert!(
            backend_id("CP_1")
                .unwrap_err()
                .starts_with("not a valid backend id: expected")
        );
        assert!(backend_address("10.0.0.11:6443").is_ok());
        for bad in ["10.0.0.11", "0.0.0.0:6443", "10.0.0.11:0", "cp-1:6443"] {
            assert!(
                backend_address(bad)
                    .unwrap_err()
                    .starts_with("not an IP:port"),
                "{bad}"
            );
        }
        assert_eq!(weight(1), Ok(1));
        assert_eq!(
            weight(0).unwrap_err(),
            format!("out of range: expected between 1 and {MAX_WEIGHT}")
        );
        assert!(weight(MAX_WEIGHT + 1).is_err());
        assert_eq!(zone("").unwrap(), "");
        assert!(zone("zone a").is_err());
        assert!(zone(&"z".repeat(64)).is_err());
        assert_eq!(host_port("lb-1.example:9441").unwrap(), "lb-1.example:9441");
        assert_eq!(host_port("lb-1").unwrap_err(), "not host:port");
        assert_eq!(node_id(3), Ok(3));
        assert!(node_id(0).is_err());
        assert_eq!(
            invalid("weight", 0, &weight(0).unwrap_err()).message(),
            format!("field `weight`: 0 is out of range: expected between 1 and {MAX_WEIGHT}")
        );
    }
}
