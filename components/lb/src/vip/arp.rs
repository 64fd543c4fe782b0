//! arp mode: the holder adds VIP/prefix to an interface over netlink and
//! announces it: gratuitous ARP requests for IPv4 (sent on a raw AF_PACKET
//! socket, so CAP_NET_RAW), unsolicited neighbour advertisements for IPv6.
//! Releasing deletes the address.
//!
//! A dual-stack VIP is one IPv4 and one IPv6 address on the same
//! interface, managed as one: claimed together (if adding either fails,
//! whatever was added is deleted again and the claim fails), renewed
//! together, announced together and released together, so the two
//! families never sit on different nodes.
//!
//! At start-up a node deletes the VIP if a crashed previous run of it left
//! it on the interface: it is not the leader yet, so it must not hold it.
//! A permanent entry (no lifetime) is not ours and is left alone: that is
//! keepalived's while bulwark adopts its VIP, and a claim takes it over.
//!
//! The address is added with a finite lifetime (IFA_CACHEINFO valid and
//! preferred lifetime, whole seconds) and renewed while the holder passes
//! its fence, so the kernel itself removes the address of a holder that
//! was SIGKILLed or froze (SIGSTOP, a stalled VM) about one lifetime after
//! its last renewal; docs/FAILOVER.md gives the kernel's timing.
//!
//! The front listener is not opened and closed here: every node binds
//! VIP:port once, at start, with IP_FREEBIND ([`bind_front`]), so the
//! kernel accepts the bind before the address exists; only the node that
//! has the address receives traffic for it. Its connections are gated
//! ([`FrontGate`]): the gate opens before the addresses are added, and
//! every release closes it, resetting the clients of the holding, before
//! the addresses are deleted (afterwards the kernel could not send the
//! resets from the VIP, and the clients would wait for their own timeouts).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::AddressMessageBuilder;
use rtnetlink::constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, CacheInfo,
};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::sys::AsyncSocket;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::watchdog::Watchdog;
use crate::proxy::FrontGate;

/// One address of the VIP and the prefix length it is added with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipAddress {
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
}

/// What a renewal did.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Every address was there and got a fresh lifetime.
    Renewed,
    /// At least one address had vanished and was added and announced again.
    Readded,
    /// An address had vanished and could not be added again: the others
    /// were deleted too (one family alone must not stay held), so the VIP
    /// is no longer held. Carries why.
    Dropped(String),
}

/// The interface and addresses (one, or a dual-stack pair) the holder
/// manages.
pub struct ArpVip {
    interface: String,
    addresses: Vec<VipAddress>,
    announcements: u32,
    interval: Duration,
    /// Valid and preferred lifetime of the address, in seconds.
    lifetime: u32,
    handle: rtnetlink::Handle,
    /// The netlink connection's task, which `handle` talks through; the
    /// VIP task watches it ([`ArpVip::connection_ended`]).
    connection: Option<tokio::task::JoinHandle<()>>,
    /// Announcements still being sent for the current claim.
    announcing: Option<tokio::task::JoinHandle<()>>,
    /// Until when the holder's lease is known to be fresh, kept by the
    /// lease watchdog, which deletes the addresses itself if the VIP task
    /// has not released one check interval after it ([`super::watchdog`]).
    /// Announcements go out only before it: a holder frozen in the middle
    /// of its announcements must not send the rest when it wakes up: its
    /// lease is gone, another node holds the VIP, and a late gratuitous
    /// ARP would point clients at an address it no longer has.
    watchdog: Watchdog,
    /// The front listeners' gate, and how long a release waits for the
    /// resets before it deletes the addresses anyway.
    gate: Option<(FrontGate, Duration)>,
    /// Woken when the kernel reports one of the addresses deleted.
    vanished: Arc<Notify>,
    /// The netlink connection and reader behind `vanished`.
    watching: Vec<tokio::task::JoinHandle<()>>,
}

/// What could go wrong talking to the kernel.
fn nl_err(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

impl ArpVip {
    /// Opens a netlink connection (its task runs on the current runtime)
    /// and starts the lease watchdog, which releases `grace`
    /// (`vip.checkInterval`) after the lease if the VIP task has not. The
    /// addresses are added with `lifetime`, rounded up to whole seconds
    /// (the kernel's unit), at least one.
    pub fn new(
        interface: String,
        addresses: Vec<VipAddress>,
        announcements: u32,
        interval: Duration,
        lifetime: Duration,
        grace: Duration,
    ) -> std::io::Result<Self> {
        let watchdog = Watchdog::start(addresses.clone(), grace)?;
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let connection = Some(tokio::spawn(connection));
        let vanished = Arc::new(Notify::new());
        let ips = addresses.iter().map(|a| a.ip).collect();
        let watching = watch_deletions(ips, vanished.clone()).unwrap_or_else(|e| {
            // The periodic renewal still puts a deleted address back.
            tracing::warn!(error = %e, "cannot watch the VIP's addresses for deletion; a deleted VIP comes back at the next renewal only");
            Vec::new()
        });
        Ok(Self {
            interface,
            addresses,
            announcements,
            interval,
            lifetime: lifetime_seconds(lifetime),
            handle,
            connection,
            announcing: None,
            watchdog,
            gate: None,
            vanished,
            watching,
        })
    }

    /// Notified when one of the VIP's addresses is deleted from the host,
    /// by whoever: a holder renews (adds it back) at once instead of at
    /// its next renewal. keepalived stopping while bulwark adopts its VIP
    /// deletes it this way (deploy/GUIDE.md).
    pub fn vanished(&self) -> Arc<Notify> {
        self.vanished.clone()
    }

    /// Gates the front listeners on holding: `gate` opens before every
    /// claim and closes (resetting the holding's clients) before the
    /// addresses are deleted. A release waits at most half of
    /// `release_budget` (`vip.releaseBudget`) for the resets, leaving the
    /// other half for the delete: the fencing counts the whole release.
    pub fn gate_front(&mut self, gate: FrontGate, release_budget: Duration) {
        self.watchdog.gate(gate.clone());
        self.gate = Some((gate, release_budget / 2));
    }

    /// Closes the front gate: resets the clients of the holding while the
    /// addresses are still there to send the resets from.
    pub async fn reset_clients(&self) {
        let Some((gate, within)) = &self.gate else {
            return;
        };
        let started = Instant::now();
        let closed = gate.close(*within).await;
        let vip = self.addresses.first().map(|a| a.ip);
        if closed.left > 0 {
            tracing::warn!(vip = ?vip, reset = closed.reset, left = closed.left, within = ?within, "not every client connection was reset in time; deleting the VIP anyway");
        } else if closed.reset > 0 {
            tracing::info!(vip = ?vip, reset = closed.reset, took = ?started.elapsed(), "VIP released: reset its client connections before deleting the address");
        }
    }

    async fn link(&self) -> std::io::Result<(u32, [u8; 6])> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(self.interface.clone())
            .execute();
        let link = links
            .try_next()
            .await
            .map_err(|e| nl_err(&format!("looking up interface {}", self.interface), e))?
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("interface {} does not exist", self.interface),
                )
            })?;
        let mac = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(m) if m.len() == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(m);
                    Some(mac)
                }
                _ => None,
            })
            .unwrap_or_default();
        Ok((link.header.index, mac))
    }

    /// The kernel's entries for `address` on interface `index` (none when
    /// it is not there).
    async fn present(&self, index: u32, address: IpAddr) -> std::io::Result<Vec<AddressMessage>> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(address)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err(&format!("listing addresses ({address})"), e))
    }

    /// How often the holder renews the address: a quarter of its
    /// lifetime, so three renewals in a row can be late or fail before the
    /// kernel removes it.
    pub fn renew_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.lifetime)) / 4
    }

    /// Adds `a` (or renews its lifetime: NLM_F_REPLACE).
    async fn add(&self, index: u32, a: VipAddress) -> std::io::Result<()> {
        let mut add = self.handle.address().add(index, a.ip, a.prefix).replace();
        *add.message_mut() = address_message(index, a.ip, a.prefix, self.lifetime);
        add.execute()
            .await
            .map_err(|e| nl_err(&format!("adding the VIP {}", a.ip), e))
    }

    /// Deletes `address` from interface `index` if it is there (gone in
    /// the meantime, deleted by the lease watchdog, is fine too).
    async fn delete(&self, index: u32, address: IpAddr) -> std::io::Result<()> {
        for msg in self.present(index, address).await? {
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if already_gone(e.raw_code()) => {}
                Err(e) => return Err(nl_err(&format!("deleting the VIP {address}"), e)),
            }
        }
        Ok(())
    }

    /// Deletes every address of the VIP, trying each even when one fails;
    /// the first failure is returned.
    async fn delete_all(&self, index: u32) -> std::io::Result<()> {
        let mut first = Ok(());
        for a in &self.addresses {
            if let Err(e) = self.delete(index, a.ip).await {
                tracing::error!(vip = %a.ip, error = %e, "deleting a VIP address failed");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    fn announce(&mut self, index: u32, mac: [u8; 6]) {
        if let Some(task) = self.announcing.take() {
            task.abort();
        }
        let (addresses, count, interval) =
            (self.addresses.clone(), self.announcements, self.interval);
        let lease = self.watchdog.lease();
        self.announcing = Some(tokio::spawn(async move {
            for i in 0..count {
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                if !lease.fresh() {
                    return;
                }
                // Every family in the same round: both move at once.
                for a in &addresses {
                    if let Err(e) = announce(index, mac, a.ip) {
                        tracing::warn!(vip = %a.ip, error = %e, "announcing the VIP failed");
                    }
                }
            }
        }));
    }

    /// Ends when the netlink connection's task ends (it should live as
    /// long as this actuator: without it the VIP can be neither renewed
    /// nor released), saying how; pending otherwise.
    pub async fn connection_ended(&mut self) -> String {
        let Some(task) = self.connection.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = task.await;
        // Never polled again after it completed.
        self.connection = None;
        match outcome {
            Err(e) if e.is_panic() => "the netlink connection task panicked".to_owned(),
            _ => "the netlink connection ended".to_owned(),
        }
    }

    /// Records that the holder's lease is fresh until `until`
    /// (announcements stop after it). When `fenced`, the lease watchdog
    /// releases one check interval after it unless this moves it on first;
    /// a sole voter is not fenced by time (nothing else can lead while it
    /// does), so a stall does not cost it its VIP.
    pub fn hold_until(&self, until: Instant, fenced: bool) {
        self.watchdog.hold_until(until, fenced);
    }

    /// How many times the lease watchdog released the VIP because the VIP
    /// task had not.
    pub fn watchdog_releases(&self) -> u64 {
        self.watchdog.fired()
    }

    /// Opens the front gate (a no-op while it is open): before any address
    /// is added, by a claim and by every renewal, which may follow a lease
    /// watchdog's release that closed it.
    fn open_front(&self) {
        if let Some((gate, _)) = &self.gate {
            gate.open();
        }
    }

    /// Adds every address and starts announcing them. If one cannot be
    /// added, those already added are deleted again and the error names
    /// the address: a dual-stack VIP is held whole or not at all.
    pub async fn claim(&mut self) -> std::io::Result<()> {
        let (index, mac) = self.link().await?;
        self.open_front();
        self.watchdog.arm(index);
        for a in &self.addresses {
            if let Err(e) = self.add(index, *a).await {
                self.watchdog.disarm();
                self.reset_clients().await;
                if let Err(d) = self.delete_all(index).await {
                    return Err(nl_err(
                        &format!("{e}; and removing the addresses already added"),
                        d,
                    ));
                }
                return Err(e);
            }
        }
        self.announce(index, mac);
        Ok(())
    }

    /// Renews the addresses' lifetime, provided it is still before
    /// `valid_until` (the holder's lease) right before the requests go
    /// out: a process frozen in the middle of a renewal must not extend,
    /// or bring back, an address after its lease ran out. An address that
    /// had vanished (the kernel expired it while this process was stalled
    /// for most of a lifetime, or someone deleted it) is added again and
    /// everything is announced afresh. If a vanished address cannot be
    /// added again, the others are deleted too ([`Renewal::Dropped`]): one
    /// family of a dual-stack VIP must not stay held alone. A failure to
    /// renew an address that is still there is an error (retried: it keeps
    /// its old lifetime meanwhile).
    pub async fn renew(&mut self, valid_until: Instant) -> std::io::Result<Renewal> {
        let (index, mac) = self.link().await?;
        let mut vanished = Vec::with_capacity(self.addresses.len());
        for a in &self.addresses {
            vanished.push(self.present(index, a.ip).await?.is_empty());
        }
        if Instant::now() >= valid_until {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the lease ran out before the renewal could be sent",
            ));
        }
        // Armed again: a renewal after the watchdog released adds the
        // addresses back (the lease is fresh again), and opens the front
        // gate the watchdog closed, before the addresses take traffic.
        self.watchdog.arm(index);
        self.open_front();
        for (a, gone) in self.addresses.iter().zip(&vanished) {
            match self.add(index, *a).await {
                Ok(()) => {}
                Err(e) if *gone => {
                    self.stop_announcing();
                    self.reset_clients().await;
                    self.delete_all(index).await?;
                    return Ok(Renewal::Dropped(e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        if vanished.contains(&true) {
            self.announce(index, mac);
            return Ok(Renewal::Readded);
        }
        Ok(Renewal::Renewed)
    }

    fn stop_announcing(&mut self) {
        self.watchdog.disarm();
        if let Some(task) = self.announcing.take() {
            task.abort();
        }
    }

    /// Stops announcing, resets the holding's clients, and deletes every
    /// address (each is tried even if another fails).
    pub async fn release(&mut self) -> std::io::Result<()> {
        self.stop_announcing();
        self.reset_clients().await;
        let (index, _) = self.link().await?;
        self.delete_all(index).await
    }

    /// Deletes a VIP (any of its addresses) that a previous run of this
    /// node left behind. Returns whether there was one.
    ///
    /// Only addresses with a finite lifetime are ours: every claim adds
    /// one. A permanent entry was put there by someone else, in practice
    /// keepalived while bulwark adopts its VIP (deploy/GUIDE.md): it is
    /// left in place (logged), and a claim on this node takes it over
    /// (the add replaces it with a lifetime) without the address ever
    /// leaving the interface.
    pub async fn remove_stale(&mut self) -> std::io::Result<bool> {
        let (index, _) = self.link().await?;
        let mut stale = Vec::new();
        for a in &self.addresses {
            for m in self.present(index, a.ip).await? {
                if is_permanent(&m) {
                    tracing::warn!(
                        vip = %a.ip,
                        interface = %self.interface,
                        "the VIP is on the interface without a lifetime, so no run of bulwark added it (keepalived, while bulwark adopts its VIP?); leaving it, a claim here takes it over"
                    );
                } else {
                    stale.push((a.ip, m));
                }
            }
        }
        let found = !stale.is_empty();
        for (ip, m) in stale {
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(|e| nl_err(&format!("deleting the stale VIP {ip}"), e))?;
        }
        Ok(found)
    }
}

impl Drop for ArpVip {
    fn drop(&mut self) {
        for task in &self.watching {
            task.abort();
        }
    }
}

/// Listens for the kernel's address deletions (RTM_DELADDR, IPv4 and
/// IPv6) and wakes `vanished` when one of `ips` goes. Returns the tasks.
fn watch_deletions(
    ips: Vec<IpAddr>,
    vanished: Arc<Notify>,
) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
    let (mut connection, _, mut messages) = rtnetlink::new_connection()?;
    let groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&rtnetlink::sys::SocketAddr::new(0, groups))?;
    let connection = tokio::spawn(connection);
    let reader = tokio::spawn(async move {
        while let Some((m, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(a)) = m.payload
                && a.attributes.iter().any(|x| {
                    matches!(x, AddressAttribute::Address(ip) | AddressAttribute::Local(ip) if ips.contains(ip))
                })
            {
                vanished.notify_one();
            }
        }
    });
    Ok(vec![connection, reader])
}

/// Binds the front listener to VIP:port before the address exists
/// (IP_FREEBIND), so every node keeps one and only the holder receives
/// traffic.
///
/// With SO_REUSEPORT, so that it can start beside a front that holds the
/// same port on every address, as the kubeadm guide's HAProxy does
/// (`bind *:8443`, SO_REUSEPORT by default, started as root like
/// bulwark-lb: the kernel shares a port only between sockets of one user).
/// The kernel gives a connection to the listener bound to its exact
/// address before a wildcard one, so from the moment this is bound the
/// VIP's new connections on this host come here and HAProxy keeps only
/// the ones it has: what adopting a keepalived + HAProxy VIP relies on
/// (deploy/GUIDE.md).
pub fn bind_front(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    match address {
        SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
        SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Whether netlink's answer `code` (a negative errno) to deleting an
/// address means it is not there (any more): deleted meanwhile, by the
/// VIP task or the lease watchdog, or its interface gone.
pub(super) fn already_gone(code: i32) -> bool {
    code == -libc::EADDRNOTAVAIL || code == -libc::ENODEV
}

/// Whether the kernel's entry for an address has no lifetime (valid
/// lifetime 0xFFFFFFFF, "forever").
fn is_permanent(m: &AddressMessage) -> bool {
    m.attributes
        .iter()
        .any(|a| matches!(a, AddressAttribute::CacheInfo(c) if c.ifa_valid == u32::MAX))
}

/// `lifetime` in the kernel's unit: whole seconds, rounded up, at least
/// one, below 0xFFFFFFFF (which means forever).
fn lifetime_seconds(lifetime: Duration) -> u32 {
    let secs = lifetime
        .as_secs()
        .saturating_add(u64::from(lifetime.subsec_nanos() > 0));
    u32::try_from(secs.max(1))
        .unwrap_or(u32::MAX - 1)
        .min(u32::MAX - 1)
}

/// The RTM_NEWADDR body that adds the VIP to interface `index`, or renews
/// it when sent with NLM_F_REPLACE: valid and preferred lifetime both
/// `lifetime` seconds (the kernel removes the address once the valid one
/// runs out; equal lifetimes leave no "deprecated" phase), and for IPv6 no
/// duplicate address detection (it would keep the address tentative,
/// unusable, for a second; fencing is our DAD).
pub fn address_message(index: u32, address: IpAddr, prefix: u8, lifetime: u32) -> AddressMessage {
    let mut message = match address {
        IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(a, prefix)
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(a, prefix)
            .build(),
    };
    if address.is_ipv6() {
        message.header.flags |= AddressHeaderFlags::Nodad;
    }
    let mut cache = CacheInfo::default();
    cache.ifa_valid = lifetime;
    cache.ifa_preferred = lifetime;
    message.attributes.push(AddressAttribute::CacheInfo(cache));
    message
}

fn announce(index: u32, mac: [u8; 6], address: IpAddr) -> std::io::Result<()> {
    match address {
        IpAddr::V4(ip) => send_garp(index, mac, ip),
        IpAddr::V6(ip) => send_unsolicited_na(index, mac, ip),
    }
}

/// A gratuitous ARP request: "who has VIP? tell VIP (at my MAC)",
/// broadcast, so every neighbour updates its cache to our MAC.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address stays zero; target IP is the VIP itself.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

fn send_garp(index: u32, mac: [u8; 6], ip: Ipv4Addr) -> std::io::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    let socket = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(i32::from(ETH_P_ARP.to_be()))),
    )?;
    let frame = garp_frame(mac, ip);
    // SAFETY: sockaddr_ll is plain old data; zeroed is a valid value and we
    // fill the fields the kernel reads for a send.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = i32::try_from(index).map_err(std::io::Error::other)?;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: the buffer and address are valid for the lengths given; the
    // descriptor is open for the duration of the call.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An unsolicited neighbour advertisement (ICMPv6 type 136, override
/// flag) to all nodes, with our MAC as target link-layer address. The
/// kernel fills in the checksum of raw ICMPv6 sockets.
pub fn na_message(mac: [u8; 6], ip: Ipv6Addr) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0] = 136;
    m[4] = 0x20; // override
    m[8..24].copy_from_slice(&ip.octets());
    m[24] = 2; // option: target link-layer address
    m[25] = 1; // length in 8-octet units
    m[26..32].copy_from_slice(&mac);
    m
}

fn send_unsolicited_na(index: u32, mac: [u8; 6], ip: Ipv6Addr) -> std::io::Result<()> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    // Receivers drop neighbour discovery with a hop limit other than 255.
    socket.set_multicast_hops_v6(255)?;
    socket.set_multicast_if_v6(index)?;
    let all_nodes = SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)), 0);
    socket.send_to(&na_message(mac, ip), &all_nodes.into())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_core::{Emitable, Parseable};

    use super::*;

    #[test]
    fn address_message_carries_the_lifetime() {
        for (ip, prefix) in [("198.18.0.100", 32), ("2001:db8::10", 128)] {
            let ip: IpAddr = ip.parse().unwrap();
            let m = address_message(7, ip, prefix, 3);
            // What the kernel reads: the emitted bytes, parsed back.
            let mut buf = vec![0; m.buffer_len()];
            m.emit(&mut buf);
            let back = AddressMessage::parse(&buf[..]).unwrap();
            assert_eq!(back.header.index, 7);
            assert_eq!(back.header.prefix_len, prefix);
            assert!(back.attributes.contains(&AddressAttribute::Address(ip)));
            let cache = back
                .attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::CacheInfo(c) => Some(*c),
                    _ => None,
                })
                .expect("IFA_CACHEINFO present");
            assert_eq!((cache.ifa_valid, cache.ifa_preferred), (3, 3), "{ip}");
            assert_eq!(
                back.header.flags.contains(AddressHeaderFlags::Nodad),
                ip.is_ipv6(),
                "no DAD for IPv6 only: {ip}"
            );
        }
    }

    #[test]
    fn only_an_address_without_a_lifetime_is_permanent() {
        let ip: IpAddr = "198.18.0.100".parse().unwrap();
        let ours = address_message(7, ip, 32, 1);
        assert!(!is_permanent(&ours));
        let mut foreign = address_message(7, ip, 32, 1);
        for a in &mut foreign.attributes {
            if let AddressAttribute::CacheInfo(c) = a {
                c.ifa_valid = u32::MAX;
                c.ifa_preferred = u32::MAX;
            }
        }
        assert!(is_permanent(&foreign));
        // Our longest lifetime is still finite.
        assert!(!is_permanent(&address_message(
            7,
            ip,
            32,
            lifetime_seconds(Duration::MAX)
        )));
    }

    #[test]
    fn lifetime_is_whole_seconds_rounded_up_and_finite() {
        let ms = Duration::from_millis;
        assert_eq!(lifetime_seconds(Duration::ZERO), 1);
        assert_eq!(lifetime_seconds(ms(180)), 1);
        assert_eq!(lifetime_seconds(ms(1000)), 1);
        assert_eq!(lifetime_seconds(ms(1001)), 2);
        assert_eq!(
            lifetime_seconds(Duration::from_secs(u64::MAX)),
            u32::MAX - 1
        );
    }

    #[test]
    fn garp_frame_layout() {
        let mac = [2, 0, 0, 0, 0, 1];
        let f = garp_frame(mac, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[22..28], &mac, "sender MAC");
        assert_eq!(&f[28..32], &[198, 18, 0, 100], "sender IP");
        assert_eq!(&f[38..42], &[198, 18, 0, 100], "target IP = sender IP");
    }

    #[test]
    fn na_layout() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let m = na_message(mac, ip);
        assert_eq!(m[0], 136, "ICMPv6 neighbour advertisement");
        assert_eq!(m[1], 0, "code 0 (receivers drop any other)");
        assert_eq!(m[2..4], [0, 0], "checksum left to the kernel");
        // Flags: router 0x80, solicited 0x40, override 0x20. Unsolicited,
        // to a multicast group: S must be clear or receivers drop it; O
        // set so caches that point at the old holder are overwritten.
        assert_eq!(m[4], 0x20, "override only");
        assert_eq!(m[5..8], [0, 0, 0], "reserved");
        assert_eq!(m[8..24], ip.octets(), "target = the VIP");
        assert_eq!(m[24..26], [2, 1], "target link-layer address, 8 octets");
        assert_eq!(m[26..32], mac);
        assert_eq!(m.len() % 8, 0, "options end on an 8-octet boundary");
    }
}
