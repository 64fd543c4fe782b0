//! The VIP holder's client connections, and what the next holder does with
//! them: resets them at once after a failover instead of leaving each
//! client to its own timeout.
//!
//! When the holder's link is cut, its clients' connections run through a
//! node nobody can reach any more: no reset can come from it, and the new
//! holder never heard of them, so a silent client (a watch between events)
//! only notices after its own timeout, and then all of them reconnect at
//! once. CTDB's answer after an IP takeover is the "tickle ACK", built
//! here:
//!
//! ```text
//!   holder:     the front registers each accepted connection (ClientTable)
//!               ──▶ share.rs pushes the table to every peer (ShareClients)
//!   peers:      keep the latest holder's table (Received)
//!   new holder: takes the VIP ──▶ tickle.rs sends each of the previous
//!               holder's clients an ACK from VIP:port with a bogus sequence
//!   client:     answers the out-of-window segment with an ACK carrying its
//!               real numbers ──▶ it now reaches the new holder, whose kernel
//!               has no such socket and answers with a RST in the window
//!               ──▶ the client's connection is reset; it reconnects at once
//! ```
//!
//! - [`ClientTable`]: the front's open connections (one insert and one
//!   remove per connection, on a shard of its own, so data-path threads do
//!   not contend), with the wire form of a snapshot.
//! - [`Received`]: the latest table a holder sent this node, bounded.
//! - [`share`]: the holder's push loop.
//! - [`tickle`]: the tickle segments and their paced sending from a raw
//!   socket.

pub mod share;
pub mod tickle;

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bulwark_api::raft::v1 as pb;
use tokio::time::Instant;

/// One client connection through the VIP: who the client is and which
/// address of the front it reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The VIP address and the front's port.
    pub vip: SocketAddr,
}

/// Most connections a holder shares and a peer keeps (and so tickles after
/// a failover). 65,536 IPv4 clients are 393 kB on the wire, IPv6 ones
/// 1.2 MB, both well inside the Raft service's 16 MiB message limit; a
/// front past it shares the first this many and counts the rest
/// (`bulwark_lb_vip_clients_omitted`), whose clients then wait for their
/// own timeouts as they did without tickles.
pub const MAX_SHARED: usize = 65_536;

/// Shards of [`ClientTable`]: enough that the data-path threads (one per
/// core) rarely meet on one lock.
const SHARDS: usize = 16;

#[derive(Default)]
struct Shard {
    flows: HashSet<Flow>,
    /// Bumped on every change, so the sharer can tell a changed table from
    /// an unchanged one without comparing sets.
    changes: u64,
}

/// The open client connections of this node's front. Cheap to clone (one
/// shared table).
#[derive(Clone)]
pub struct ClientTable {
    shards: Arc<[Mutex<Shard>; SHARDS]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for ClientTable {
    fn default() -> Self {
        Self {
            shards: Arc::new(std::array::from_fn(|_| Mutex::default())),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

/// A registration: the flow leaves the table when this is dropped (the
/// connection's task ends, however it ends).
pub struct Registered {
    table: ClientTable,
    flow: Flow,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut shard = self.table.shard(&self.flow);
        if shard.flows.remove(&self.flow) {
            shard.changes += 1;
        }
    }
}

impl ClientTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, flow: &Flow) -> MutexGuard<'_, Shard> {
        let h = self.hasher.hash_one(flow);
        // Nothing panics under the lock; a poisoned shard is consistent.
        self.shards[(h as usize) % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `flow` until the returned guard is dropped.
    pub fn register(&self, flow: Flow) -> Registered {
        let mut shard = self.shard(&flow);
        if shard.flows.insert(flow) {
            shard.changes += 1;
        }
        drop(shard);
        Registered {
            table: self.clone(),
            flow,
        }
    }

    /// Whether `flow` is open on this node's front.
    pub fn contains(&self, flow: &Flow) -> bool {
        self.shard(flow).flows.contains(flow)
    }

    /// A number that changes whenever the table does.
    pub fn version(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).changes)
            .sum()
    }

    /// The table's content, at most `max` flows, sorted (the same table
    /// always encodes the same way), and how many were left out.
    pub fn snapshot(&self, max: usize) -> (Vec<Flow>, usize) {
        let mut all = Vec::new();
        for s in self.shards.iter() {
            all.extend(
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .flows
                    .iter(),
            );
        }
        all.sort_unstable();
        let omitted = all.len().saturating_sub(max);
        all.truncate(max);
        (all, omitted)
    }
}

/// Encodes flows for [`pb::ShareClientsRequest`]: one entry per VIP
/// address, clients packed. A client of the other family than its VIP
/// (impossible on a socket) is skipped.
pub fn encode(flows: &[Flow]) -> Vec<pb::FrontClients> {
    let mut fronts: Vec<pb::FrontClients> = Vec::new();
    for f in flows {
        let vip = ip_bytes(f.vip.ip());
        let client = ip_bytes(f.client.ip());
        if vip.len() != client.len() {
            continue;
        }
        let port = u32::from(f.vip.port());
        let i = match fronts.iter().position(|e| e.vip == vip && e.port == port) {
            Some(i) => i,
            None => {
                fronts.push(pb::FrontClients {
                    vip,
                    port,
                    clients: Vec::new(),
                });
                fronts.len() - 1
            }
        };
        fronts[i].clients.extend_from_slice(&client);
        fronts[i]
            .clients
            .extend_from_slice(&f.client.port().to_be_bytes());
    }
    fronts
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Why a shared table was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// `fronts[].vip` is neither 4 nor 16 bytes.
    #[error("fronts[{0}].vip must be 4 (IPv4) or 16 (IPv6) bytes, not {1}")]
    Vip(usize, usize),
    /// `fronts[].port` is not a port.
    #[error("fronts[{0}].port must be 1-65535, not {1}")]
    Port(usize, u32),
    /// `fronts[].clients` is not a whole number of entries.
    #[error("fronts[{0}].clients must be a multiple of {1} bytes, not {2}")]
    Clients(usize, usize, usize),
    /// More flows than [`MAX_SHARED`].
    #[error("the table holds more than {MAX_SHARED} clients")]
    TooMany,
}

/// Decodes [`encode`]'s output, refusing anything malformed or larger than
/// [`MAX_SHARED`].
pub fn decode(fronts: &[pb::FrontClients]) -> Result<Vec<Flow>, DecodeError> {
    let mut flows = Vec::new();
    for (i, f) in fronts.iter().enumerate() {
        let vip = ip_from(&f.vip).ok_or(DecodeError::Vip(i, f.vip.len()))?;
        let port = u16::try_from(f.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(DecodeError::Port(i, f.port))?;
        let entry = f.vip.len() + 2;
        if f.clients.len() % entry != 0 {
            return Err(DecodeError::Clients(i, entry, f.clients.len()));
        }
        if flows.len() + f.clients.len() / entry > MAX_SHARED {
            return Err(DecodeError::TooMany);
        }
        for c in f.clients.chunks_exact(entry) {
            let (ip, p) = c.split_at(f.vip.len());
            let Some(ip) = ip_from(ip) else { continue };
            flows.push(Flow {
                client: SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]])),
                vip: SocketAddr::new(vip, port),
            });
        }
    }
    Ok(flows)
}

fn ip_from(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b)
            .ok()
            .map(|a| Ipv4Addr::from(a).into()),
        16 => <[u8; 16]>::try_from(b)
            .ok()
            .map(|a| Ipv6Addr::from(a).into()),
        _ => None,
    }
}

/// A table a holder shared with this node.
#[derive(Clone, Debug, PartialEq)]
pub struct Shared {
    /// The holder that sent it.
    pub holder: u64,
    /// The term it held the VIP in.
    pub term: u64,
    /// Its connections.
    pub flows: Vec<Flow>,
    /// When it arrived.
    pub at: Instant,
}

/// The latest table a holder shared with this node (one slot: only the
/// latest holder's connections matter). Cheap to clone.
#[derive(Clone, Default)]
pub struct Received {
    slot: Arc<Mutex<Option<Shared>>>,
}

impl Received {
    /// Nothing received yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Option<Shared>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `table` unless the one kept is from a later term (a deposed
    /// holder's last push must not replace its successor's table).
    /// Returns whether it was kept.
    pub fn offer(&self, table: Shared) -> bool {
        let mut slot = self.lock();
        if slot.as_ref().is_some_and(|s| s.term > table.term) {
            return false;
        }
        *slot = Some(table);
        true
    }

    /// Takes the table for a claim by `node` in `term`: only another
    /// node's, of an earlier term (a table from this node's own holding, or
    /// from the current term, names no connection the claim took over).
    /// Taken, not copied: the tickles go out once, right after the claim.
    pub fn take_for_claim(&self, node: u64, term: u64) -> Option<Shared> {
        let mut slot = self.lock();
        let ok = slot
            .as_ref()
            .is_some_and(|s| s.holder != node && s.term < term);
        if ok { slot.take() } else { None }
    }

    /// How many connections the kept table holds.
    pub fn len(&self) -> usize {
        self.lock().as_ref().map_or(0, |s| s.flows.len())
    }

    /// Whether no table, or an empty one, is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The flows of a previous holder's table that a new holder tickles: only
/// those on one of its own VIP addresses (a tickle's source address; a
/// peer's table cannot make this node send from any other), leaving out
/// the connections its own front has.
pub fn to_tickle(flows: Vec<Flow>, vips: &[IpAddr], own: &ClientTable) -> Vec<Flow> {
    flows
        .into_iter()
        .filter(|f| vips.contains(&f.vip.ip()) && !own.contains(f))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flows_on_this_nodes_vip_and_not_its_own_are_tickled() {
        let own = ClientTable::new();
        let mine = flow("198.18.0.9:40002", "198.18.0.100:6443");
        let _held = own.register(mine);
        let shared = vec![
            flow("198.18.0.9:40000", "198.18.0.100:6443"),
            flow("[2001:db8::9]:40000", "[2001:db8::100]:6443"),
            flow("198.18.0.9:40001", "10.0.0.1:22"),
            mine,
        ];
        let vips: Vec<IpAddr> = vec![
            "198.18.0.100".parse().unwrap(),
            "2001:db8::100".parse().unwrap(),
        ];
        assert_eq!(
            to_tickle(shared, &vips, &own),
            vec![
                flow("198.18.0.9:40000", "198.18.0.100:6443"),
                flow("[2001:db8::9]:40000", "[2001:db8::100]:6443"),
            ]
        );
    }

    fn flow(client: &str, vip: &str) -> Flow {
        Flow {
            client: client.parse().unwrap(),
            vip: vip.parse().unwrap(),
        }
    }

    #[test]
    fn registrations_leave_the_table_when_dropped() {
        let t = ClientTable::new();
        let v0 = t.version();
        let a = t.register(flow("198.18.0.9:40000", "198.18.0.100:6443"));
        let b = t.register(flow("198.18.0.9:40001", "198.18.0.100:6443"));
        assert_ne!(t.version(), v0);
        assert_eq!(t.snapshot(10).0.len(), 2);
        let v1 = t.version();
        drop(a);
        assert_ne!(t.version(), v1);
        let (left, omitted) = t.snapshot(10);
        assert_eq!(
            (left, omitted),
            (vec![flow("198.18.0.9:40001", "198.18.0.100:6443")], 0)
        );
        assert!(t.contains(&flow("198.18.0.9:40001", "198.18.0.100:6443")));
        drop(b);
        assert_eq!(t.snapshot(10), (vec![], 0));
    }

    #[test]
    fn the_snapshot_is_bounded_and_counts_what_it_leaves_out() {
        let t = ClientTable::new();
        let _held: Vec<_> = (0..5)
            .map(|p| t.register(flow(&format!("10.0.0.1:{}", 1000 + p), "10.0.0.100:6443")))
            .collect();
        let (some, omitted) = t.snapshot(3);
        assert_eq!((some.len(), omitted), (3, 2));
    }

    #[test]
    fn tables_round_trip_through_the_wire_form_for_both_families() {
        let flows = vec![
            flow("198.18.0.9:40000", "198.18.0.100:6443"),
            flow("198.18.0.10:40001", "198.18.0.100:6443"),
            flow("[2001:db8::9]:40002", "[2001:db8::100]:6443"),
        ];
        let wire = encode(&flows);
        assert_eq!(wire.len(), 2);
        assert_eq!(wire[0].clients.len(), 2 * 6);
        assert_eq!(wire[1].clients.len(), 18);
        assert_eq!(decode(&wire).unwrap(), flows);
    }

    #[test]
    fn malformed_tables_are_refused_naming_the_field() {
        let good = encode(&[flow("198.18.0.9:40000", "198.18.0.100:6443")]);
        let mut bad = good.clone();
        bad[0].vip = vec![1, 2, 3];
        assert_eq!(decode(&bad), Err(DecodeError::Vip(0, 3)));
        let mut bad = good.clone();
        bad[0].port = 70_000;
        assert!(decode(&bad).unwrap_err().to_string().contains("port"));
        let mut bad = good.clone();
        bad[0].clients.pop();
        assert_eq!(decode(&bad), Err(DecodeError::Clients(0, 6, 5)));
        let mut bad = good;
        bad[0].clients = vec![0; 6 * (MAX_SHARED + 1)];
        assert_eq!(decode(&bad), Err(DecodeError::TooMany));
    }

    #[test]
    fn a_claim_takes_only_an_earlier_holders_table_once() {
        let r = Received::new();
        let table = |holder, term| Shared {
            holder,
            term,
            flows: vec![flow("198.18.0.9:40000", "198.18.0.100:6443")],
            at: Instant::now(),
        };
        assert!(r.offer(table(1, 5)));
        // A deposed holder's late push does not replace its successor's.
        assert!(r.offer(table(2, 6)));
        assert!(!r.offer(table(1, 5)));
        assert_eq!(r.len(), 1);
        // Not for the holder itself, nor within the same term.
        assert_eq!(r.take_for_claim(2, 7), None);
        assert_eq!(r.take_for_claim(3, 6), None);
        assert_eq!(r.take_for_claim(3, 7).map(|s| s.holder), Some(2));
        assert!(r.is_empty());
        assert_eq!(r.take_for_claim(3, 7), None);
    }
}
