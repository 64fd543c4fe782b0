//! bulwark-lb's BGP decoder on arbitrary bytes, as a router (or anything
//! that answers on its port) could send them: every message decodes to a
//! message, "need more bytes" or an error, never a panic, and never
//! claims more bytes than it was given; the attributes an UPDATE carries
//! go through the multiprotocol decoders too.

#![no_main]

use bulwark_lb::vip::bgp::codec::{Message, MpReach, MpUnreach};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // A stream of messages, as the session reads them.
    while let Ok(Some((m, used))) = Message::decode(rest) {
        assert!(used <= rest.len() && used > 0);
        if let Message::Update(u) = &m {
            for a in &u.attributes {
                let _ = MpReach::decode(&a.value);
                let _ = MpUnreach::decode(&a.value);
            }
            // What decodes encodes again and decodes to the same message.
            let again = Message::decode(&m.encode()).ok().flatten().map(|(m, _)| m);
            assert_eq!(again.as_ref(), Some(&m));
        }
        rest = &rest[used..];
    }
});
