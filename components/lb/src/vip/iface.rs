//! Which address families a network interface has, for the arp-mode
//! config check: an IPv4 VIP on an interface without IPv4, or an IPv6 VIP
//! on one with IPv6 disabled (no address at all, not even link-local), can
//! never be announced, and is better a config error naming the field
//! (at start and at `--check-config`) than a claim that fails every
//! check interval.

use std::ffi::CStr;

/// The families an interface has an address of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Families {
    /// At least one IPv4 address.
    pub v4: bool,
    /// At least one IPv6 address (link-local counts: it is what neighbour
    /// advertisements are sent from).
    pub v6: bool,
}

/// The families of `interface`'s addresses, or `None` when there is no
/// interface of that name in this network namespace (the check is then
/// left to start-up, which names the missing interface).
pub fn families(interface: &str) -> std::io::Result<Option<Families>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = None;
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, which
        // stays valid until freeifaddrs; names are NUL-terminated.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: as above.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) };
        if name.to_bytes() != interface.as_bytes() {
            continue;
        }
        let f: &mut Families = found.get_or_insert_with(Families::default);
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points to a sockaddr of the family
        // its first field names.
        match i32::from(unsafe { (*entry.ifa_addr).sa_family }) {
            libc::AF_INET => f.v4 = true,
            libc::AF_INET6 => f.v6 = true,
            _ => {}
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_ipv4_and_an_unknown_interface_is_none() {
        let lo = families("lo").unwrap().expect("every namespace has lo");
        assert!(lo.v4, "lo carries 127.0.0.1");
        assert_eq!(families("bwk-no-such-if").unwrap(), None);
    }
}
