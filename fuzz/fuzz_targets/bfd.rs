//! bulwark-lb's BFD decoder on arbitrary datagrams, as anything on the
//! link could send them to UDP 3784: the first byte stands for the TTL
//! the kernel reported, the rest is the datagram. Every input is accepted
//! or refused with an error, never a panic; what is accepted encodes back
//! to the same bytes (the decoder keeps no bit it does not understand)
//! and drives a session's state machine without panicking either.

#![no_main]

use std::time::Duration;

use bulwark_lb::vip::bgp::bfd::machine::{Machine, Timers};
use bulwark_lb::vip::bgp::bfd::packet::accept;
use libfuzzer_sys::fuzz_target;
use tokio::time::Instant;

fuzz_target!(|data: &[u8]| {
    let Some((&ttl, datagram)) = data.split_first() else {
        return;
    };
    let Ok(p) = accept(Some(ttl), datagram) else {
        return;
    };
    assert_eq!(ttl, 255);
    assert_eq!(&p.encode()[..], datagram);
    let mut m = Machine::new(
        Timers {
            interval: Duration::from_millis(100),
            multiplier: 3,
        },
        p.your_discriminator.max(1),
    );
    let now = Instant::now();
    let _ = m.receive(&p, now);
    let _ = m.packet();
    let _ = m.next_tx(0.5);
    let _ = m.expire(now + m.detection_time());
});
