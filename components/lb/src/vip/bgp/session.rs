//! One BGP session per configured peer: a task that connects, exchanges
//! OPENs, keeps the session alive and announces or withdraws the VIP's
//! host routes as the holder asks ([`Desired`]).
//!
//! The FSM is RFC 4271's, trimmed to an active speaker that imports
//! nothing: Idle → Connect → OpenSent → OpenConfirm → Established, back to
//! Idle on any error (with a NOTIFICATION when the error is the peer's
//! message), then a connect retry after [`CONNECT_RETRY`]. Every node runs
//! its sessions all the time, holder or not, so a new holder only has to
//! send one UPDATE: no TCP or OPEN round trips on the failover path.
//!
//! An announcement goes out only while the holder's lease is known fresh
//! ([`ValidUntil`]): a process frozen between "claim" and the
//! write must not announce after its lease ran out.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::bfd::BfdStatus;
use super::codec::{
    AFI_IPV4, AFI_IPV6, AS_TRANS, Capability, Message, Open, Prefix, SAFI_UNICAST, Speaker, notify,
};

/// How soon an announcement held back by a stale-looking lease is tried
/// again (the VIP task's default check interval).
const RECHECK: Duration = Duration::from_millis(10);

/// The NOTIFICATION Cease subcode for "BFD Down" (RFC 9384).
const CEASE_BFD_DOWN: u8 = 10;

/// Pause between a session going down and the next connect.
pub const CONNECT_RETRY: Duration = Duration::from_secs(1);

/// One peer as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's address.
    pub address: IpAddr,
    /// Its TCP port.
    pub port: u16,
    /// Its AS.
    pub asn: u32,
    /// The hold time we propose (whole seconds; zero: no keepalives).
    pub hold_time: Duration,
    /// TCP MD5 signature key (RFC 2385), if any.
    pub password: Option<String>,
    /// BFD beside the session, if enabled.
    pub bfd: Option<super::bfd::Timers>,
}

/// What every session of this node shares.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// Our AS.
    pub asn: u32,
    /// Our BGP identifier.
    pub router_id: std::net::Ipv4Addr,
    /// The VIP's host routes (one per family).
    pub prefixes: Vec<Prefix>,
}

/// RFC 4271's session states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionState {
    /// Not connected; waiting to retry.
    #[default]
    Idle,
    /// TCP connect in progress.
    Connect,
    /// Our OPEN sent, waiting for the peer's.
    OpenSent,
    /// OPENs exchanged, waiting for the peer's KEEPALIVE.
    OpenConfirm,
    /// Up: routes can be exchanged.
    Established,
}

impl SessionState {
    /// The name RFC 4271 gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Idle => "Idle",
            SessionState::Connect => "Connect",
            SessionState::OpenSent => "OpenSent",
            SessionState::OpenConfirm => "OpenConfirm",
            SessionState::Established => "Established",
        }
    }
}

/// One session's state as the status RPC shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    /// Where the FSM is.
    pub state: SessionState,
    /// Prefixes announced to this peer and not withdrawn.
    pub announced: Vec<Prefix>,
    /// Why the session last went down, if it did.
    pub last_error: Option<String>,
    /// Since when it is established.
    pub established_since: Option<SystemTime>,
    /// The [`Desired::generation`] last put on the wire (or found
    /// matching), so a release can wait for its withdrawal to be sent.
    pub applied: u64,
    /// The peer's BFD session, when enabled (filled in by the status
    /// reader, [`super::StatusSource::get`]).
    pub bfd: Option<super::bfd::BfdStatus>,
}

/// What the holder wants announced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Bumped on every change.
    pub generation: u64,
    /// Announce the VIP (holder) or not (everyone else).
    pub announce: bool,
}

/// Until when the holder's lease is known fresh: no announcement after.
pub type ValidUntil = Arc<Mutex<Option<Instant>>>;

/// How a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Codec(#[from] super::codec::Error),
    #[error("peer sent NOTIFICATION {code}/{subcode}")]
    Notified { code: u8, subcode: u8 },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    BfdDown(String),
}

/// Runs the session with `peer` until `cancel` (which sends a Cease).
/// With `bfd` (the peer's BFD session), an established session that sees
/// BFD leave Up is taken down and set up again like after any error.
pub async fn run(
    peer: PeerConfig,
    local: LocalConfig,
    mut desired: watch::Receiver<Desired>,
    valid_until: ValidUntil,
    status: watch::Sender<PeerStatus>,
    mut bfd: Option<watch::Receiver<BfdStatus>>,
    cancel: CancellationToken,
) {
    let name = SocketAddr::new(peer.address, peer.port);
    // The peer's series exist at zero from the start.
    metrics::gauge!("bulwark_lb_bgp_session_established", "peer" => name.to_string()).set(0.0);
    metrics::gauge!("bulwark_lb_bgp_announced_prefixes", "peer" => name.to_string()).set(0.0);
    loop {
        status.send_modify(|s| s.state = SessionState::Connect);
        // Cancelled while setting up: just drop the connection. Once
        // established the session handles cancellation itself (a Cease).
        let ended = match tokio::select! {
            () = cancel.cancelled() => return,
            r = setup(&peer, &local, &status) => r,
        } {
            Ok(established) => {
                established
                    .run(&mut desired, &valid_until, &status, &mut bfd, &cancel)
                    .await
            }
            Err(e) => Err(e),
        };
        let error = match ended {
            Ok(()) => return,
            Err(e) => e.to_string(),
        };
        let was_up = status.borrow().state == SessionState::Established;
        status.send_modify(|s| {
            s.state = SessionState::Idle;
            s.announced.clear();
            s.established_since = None;
            s.last_error = Some(error.clone());
        });
        let label = name.to_string();
        metrics::gauge!("bulwark_lb_bgp_session_established", "peer" => label.clone()).set(0.0);
        metrics::gauge!("bulwark_lb_bgp_announced_prefixes", "peer" => label).set(0.0);
        if was_up {
            tracing::warn!(peer = %name, error, "BGP session down; reconnecting");
        } else {
            tracing::debug!(peer = %name, error, "BGP session could not be set up; retrying");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(CONNECT_RETRY) => {}
        }
    }
}

/// The read half with what has been read of the next message.
struct Wire {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
}

impl Wire {
    /// The next message. Cancel-safe: a partial read stays in `buf`.
    async fn next(&mut self) -> Result<Message, SessionError> {
        loop {
            if let Some((m, used)) = Message::decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(m);
            }
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err(SessionError::Refused(
                    "the peer closed the connection".into(),
                ));
            }
        }
    }
}

async fn send(wr: &mut OwnedWriteHalf, m: &Message) -> Result<(), SessionError> {
    wr.write_all(&m.encode()).await?;
    Ok(())
}

/// Sends the NOTIFICATION a decoding error calls for; the session ends
/// with the error either way.
async fn notify_and_fail(wr: &mut OwnedWriteHalf, e: SessionError) -> SessionError {
    let (code, subcode) = match &e {
        SessionError::Codec(c) => (c.code, c.subcode),
        SessionError::Refused(_) => (notify::OPEN, 0),
        _ => return e,
    };
    let _ = send(
        wr,
        &Message::Notification {
            code,
            subcode,
            data: Vec::new(),
        },
    )
    .await;
    e
}

/// The family `prefixes` on a session to `peer` may use: the peer's own
/// (an IPv4 session carries IPv4 routes with an IPv4 next hop, an IPv6
/// one IPv6 routes with an IPv6 next hop).
fn afi_of(peer: IpAddr) -> u16 {
    if peer.is_ipv4() { AFI_IPV4 } else { AFI_IPV6 }
}

/// Our OPEN to `peer`.
fn our_open(peer: &PeerConfig, local: &LocalConfig) -> Open {
    Open {
        asn: u16::try_from(local.asn).unwrap_or(AS_TRANS),
        hold_time: u16::try_from(peer.hold_time.as_secs()).unwrap_or(u16::MAX),
        router_id: local.router_id,
        capabilities: vec![
            Capability::Multiprotocol {
                afi: afi_of(peer.address),
                safi: SAFI_UNICAST,
            },
            Capability::FourOctetAs(local.asn),
        ],
    }
}

/// Checks the peer's OPEN; returns the negotiated hold time.
fn check_open(peer: &PeerConfig, theirs: &Open) -> Result<Duration, super::codec::Error> {
    let bad = |subcode, what: String| super::codec::Error {
        code: notify::OPEN,
        subcode,
        what,
    };
    if theirs.asn() != peer.asn {
        return Err(bad(
            2,
            format!("peer AS is {}, configured {}", theirs.asn(), peer.asn),
        ));
    }
    let afi = afi_of(peer.address);
    if !theirs.offers(afi, SAFI_UNICAST) {
        let family = if afi == AFI_IPV4 { "IPv4" } else { "IPv6" };
        return Err(bad(7, format!("peer does not offer {family} unicast")));
    }
    let ours = peer.hold_time.as_secs();
    Ok(Duration::from_secs(ours.min(u64::from(theirs.hold_time))))
}

/// Connects (with the MD5 key, if any) within `limit`.
async fn connect(peer: &PeerConfig, limit: Duration) -> std::io::Result<TcpStream> {
    let address = SocketAddr::new(peer.address, peer.port);
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(key) = &peer.password {
        super::md5::set_key(&socket, address, key.as_bytes())?;
    }
    let stream = tokio::time::timeout(limit, socket.connect(address))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One session from connect to established.
async fn setup(
    peer: &PeerConfig,
    local: &LocalConfig,
    status: &watch::Sender<PeerStatus>,
) -> Result<Established, SessionError> {
    // Before OPENs are exchanged no hold time is agreed; RFC 4271
    // suggests minutes, a failover speaker wants to notice a dead peer in
    // seconds.
    let setup = peer.hold_time.max(Duration::from_secs(3)) * 3;
    let stream = connect(peer, setup).await?;
    let next_hop = stream.local_addr()?.ip();
    let (rd, mut wr) = stream.into_split();
    let mut wire = Wire {
        rd,
        buf: Vec::with_capacity(4096),
    };
    send(&mut wr, &Message::Open(our_open(peer, local))).await?;
    status.send_modify(|s| s.state = SessionState::OpenSent);
    let theirs = match tokio::time::timeout(setup, wire.next()).await {
        Err(_) => return Err(SessionError::Refused("no OPEN from the peer".into())),
        Ok(Ok(Message::Open(o))) => o,
        Ok(Ok(Message::Notification { code, subcode, .. })) => {
            return Err(SessionError::Notified { code, subcode });
        }
        Ok(Ok(_)) => {
            let e = super::codec::Error {
                code: notify::FSM,
                subcode: 1,
                what: "expected OPEN".into(),
            };
            return Err(notify_and_fail(&mut wr, e.into()).await);
        }
        Ok(Err(e)) => return Err(notify_and_fail(&mut wr, e).await),
    };
    let hold = match check_open(peer, &theirs) {
        Ok(h) => h,
        Err(e) => return Err(notify_and_fail(&mut wr, e.into()).await),
    };
    send(&mut wr, &Message::Keepalive).await?;
    status.send_modify(|s| s.state = SessionState::OpenConfirm);
    match tokio::time::timeout(setup, wire.next()).await {
        Err(_) => return Err(SessionError::Refused("no KEEPALIVE after OPEN".into())),
        Ok(Ok(Message::Keepalive)) => {}
        Ok(Ok(Message::Notification { code, subcode, .. })) => {
            return Err(SessionError::Notified { code, subcode });
        }
        Ok(Ok(_)) => return Err(SessionError::Refused("expected KEEPALIVE".into())),
        Ok(Err(e)) => return Err(notify_and_fail(&mut wr, e).await),
    }
    let speaker = Speaker {
        local_asn: local.asn,
        internal: peer.asn == local.asn,
        four_octet: theirs.four_octet(),
        next_hop,
    };
    let prefixes: Vec<Prefix> = local
        .prefixes
        .iter()
        .copied()
        .filter(|p| afi_of(p.addr) == afi_of(peer.address))
        .collect();
    Ok(Established {
        wire,
        wr,
        hold,
        speaker,
        prefixes,
        name: SocketAddr::new(peer.address, peer.port).to_string(),
        peer_id: theirs.router_id,
    })
}

/// Resolves once the peer's BFD session has gone down more than `since`
/// times (never without BFD), saying why.
async fn bfd_down(bfd: &mut Option<watch::Receiver<BfdStatus>>, since: u64) -> String {
    let Some(rx) = bfd else {
        return std::future::pending().await;
    };
    let why = match rx.wait_for(|s| s.downs > since).await {
        Ok(s) => {
            let diag = s
                .last_change
                .as_ref()
                .map_or("unknown", |c| c.diag.describe());
            Some(format!("BFD session down ({diag})"))
        }
        Err(_) => None,
    };
    match why {
        Some(why) => why,
        // The BFD task ended (shutdown): nothing more to watch.
        None => std::future::pending().await,
    }
}

/// An established session.
struct Established {
    wire: Wire,
    wr: OwnedWriteHalf,
    /// Negotiated hold time (zero: none).
    hold: Duration,
    speaker: Speaker,
    /// The VIP's routes of this session's family.
    prefixes: Vec<Prefix>,
    /// The peer, for logs and metric labels.
    name: String,
    /// The peer's BGP identifier.
    peer_id: std::net::Ipv4Addr,
}

impl Established {
    async fn run(
        mut self,
        desired: &mut watch::Receiver<Desired>,
        valid_until: &ValidUntil,
        status: &watch::Sender<PeerStatus>,
        bfd: &mut Option<watch::Receiver<BfdStatus>>,
        cancel: &CancellationToken,
    ) -> Result<(), SessionError> {
        // Only a BFD failure after this point ends this session: one that
        // happened before it was set up is history.
        let bfd_downs = bfd.as_ref().map_or(0, |b| b.borrow().downs);
        tracing::info!(peer = %self.name, peer_id = %self.peer_id, hold = ?self.hold, "BGP session established");
        status.send_modify(|s| {
            s.state = SessionState::Established;
            s.established_since = Some(SystemTime::now());
            s.last_error = None;
        });
        metrics::gauge!("bulwark_lb_bgp_session_established", "peer" => self.name.clone()).set(1.0);
        // A hold time of zero means neither side sends keepalives.
        let far = Duration::from_secs(86_400 * 365);
        let (hold, keepalive) = if self.hold.is_zero() {
            (far, far)
        } else {
            (self.hold, self.hold / 3)
        };
        let mut hold_deadline = Instant::now() + hold;
        let mut keepalive_at = Instant::now() + keepalive;
        let mut announced = false;
        loop {
            let d = *desired.borrow_and_update();
            let fresh = valid_until
                .lock()
                .ok()
                .and_then(|v| *v)
                .is_some_and(|v| Instant::now() < v);
            let want = d.announce && fresh && !self.prefixes.is_empty();
            if want != announced {
                self.apply(want).await?;
                announced = want;
                keepalive_at = Instant::now() + keepalive;
            }
            status.send_modify(|s| {
                s.applied = d.generation;
                s.announced = if announced {
                    self.prefixes.clone()
                } else {
                    Vec::new()
                };
            });
            // Asked to announce while the lease did not look fresh (this task
            // ran late, after the holder's last lease extension): the holder
            // extends it every check without waking us, so look again soon.
            let recheck = d.announce && !announced && !self.prefixes.is_empty();
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    let cease = Message::Notification { code: notify::CEASE, subcode: 2, data: Vec::new() };
                    let _ = send(&mut self.wr, &cease).await;
                    return Ok(());
                }
                r = desired.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                }
                m = self.wire.next() => {
                    match m {
                        Ok(Message::Keepalive | Message::Update(_)) => hold_deadline = Instant::now() + hold,
                        Ok(Message::Notification { code, subcode, .. }) => {
                            return Err(SessionError::Notified { code, subcode });
                        }
                        Ok(Message::Open(_)) => {
                            let e = super::codec::Error { code: notify::FSM, subcode: 3, what: "OPEN on an established session".into() };
                            return Err(notify_and_fail(&mut self.wr, e.into()).await);
                        }
                        Err(e) => return Err(notify_and_fail(&mut self.wr, e).await),
                    }
                }
                () = tokio::time::sleep_until(hold_deadline) => {
                    let e = super::codec::Error { code: notify::HOLD_TIMER, subcode: 0, what: "hold timer expired".into() };
                    return Err(notify_and_fail(&mut self.wr, e.into()).await);
                }
                why = bfd_down(bfd, bfd_downs) => {
                    let cease = Message::Notification { code: notify::CEASE, subcode: CEASE_BFD_DOWN, data: Vec::new() };
                    // The path is likely gone: do not wait on a full send
                    // buffer to say so.
                    let _ = tokio::time::timeout(Duration::from_millis(50), send(&mut self.wr, &cease)).await;
                    return Err(SessionError::BfdDown(why));
                }
                () = tokio::time::sleep(RECHECK), if recheck => {}
                () = tokio::time::sleep_until(keepalive_at) => {
                    send(&mut self.wr, &Message::Keepalive).await?;
                    keepalive_at = Instant::now() + keepalive;
                }
            }
        }
    }

    /// Announces (`true`) or withdraws the VIP's routes.
    async fn apply(&mut self, announce: bool) -> Result<(), SessionError> {
        let update = if announce {
            self.speaker.announce(&self.prefixes)
        } else {
            Speaker::withdraw(&self.prefixes)
        };
        send(&mut self.wr, &Message::Update(update)).await?;
        let n = if announce { self.prefixes.len() } else { 0 };
        metrics::gauge!("bulwark_lb_bgp_announced_prefixes", "peer" => self.name.clone())
            .set(n as f64);
        tracing::info!(
            peer = %self.name,
            prefixes = ?self.prefixes,
            "{} the VIP",
            if announce { "announced" } else { "withdrew" }
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::net::TcpListener;

    use super::*;
    use crate::vip::bgp::codec::{Update, attr};

    fn local(prefixes: &[&str]) -> LocalConfig {
        LocalConfig {
            asn: 65010,
            router_id: Ipv4Addr::new(10, 0, 0, 11),
            prefixes: prefixes
                .iter()
                .map(|a| Prefix::host(a.parse().unwrap()))
                .collect(),
        }
    }

    /// A scripted peer on loopback: accepts one session, answers the OPEN
    /// with `asn`, and hands the decoded messages it receives to the test.
    struct FakePeer {
        wire: Wire,
        wr: OwnedWriteHalf,
    }

    impl FakePeer {
        async fn accept(listener: &TcpListener, asn: u32) -> (Self, Open) {
            let (stream, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = stream.into_split();
            let mut wire = Wire {
                rd,
                buf: Vec::new(),
            };
            let Message::Open(theirs) = wire.next().await.unwrap() else {
                panic!("expected OPEN");
            };
            let open = Open {
                asn: u16::try_from(asn).unwrap_or(AS_TRANS),
                hold_time: 3,
                router_id: Ipv4Addr::new(10, 0, 0, 1),
                capabilities: vec![
                    Capability::Multiprotocol {
                        afi: AFI_IPV4,
                        safi: SAFI_UNICAST,
                    },
                    Capability::FourOctetAs(asn),
                ],
            };
            send(&mut wr, &Message::Open(open)).await.unwrap();
            send(&mut wr, &Message::Keepalive).await.unwrap();
            (Self { wire, wr }, theirs)
        }

        /// The next UPDATE (keepalives skipped).
        async fn update(&mut self) -> Update {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), self.wire.next())
                    .await
                    .expect("an UPDATE within 5s")
                    .unwrap()
                {
                    Message::Update(u) => return u,
                    Message::Keepalive => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    fn spawn(
        port: u16,
        peer_asn: u32,
        prefixes: &[&str],
    ) -> (
        watch::Sender<Desired>,
        ValidUntil,
        watch::Receiver<PeerStatus>,
        CancellationToken,
    ) {
        spawn_with_bfd(port, peer_asn, prefixes, None)
    }

    fn spawn_with_bfd(
        port: u16,
        peer_asn: u32,
        prefixes: &[&str],
        bfd: Option<watch::Receiver<BfdStatus>>,
    ) -> (
        watch::Sender<Desired>,
        ValidUntil,
        watch::Receiver<PeerStatus>,
        CancellationToken,
    ) {
        let (desired, desired_rx) = watch::channel(Desired::default());
        let (status, status_rx) = watch::channel(PeerStatus::default());
        let valid: ValidUntil = Arc::default();
        let cancel = CancellationToken::new();
        let peer = PeerConfig {
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            asn: peer_asn,
            hold_time: Duration::from_secs(3),
            password: None,
            bfd: None,
        };
        tokio::spawn(run(
            peer,
            local(prefixes),
            desired_rx,
            valid.clone(),
            status,
            bfd,
            cancel.clone(),
        ));
        (desired, valid, status_rx, cancel)
    }

    /// Where a [`FakePeer`] accepts: a loopback listener and its port.
    async fn fake_peer_listener() -> (TcpListener, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener, port)
    }

    /// Waits until the session is up.
    async fn established(status: &mut watch::Receiver<PeerStatus>) {
        status
            .wait_for(|s| s.state == SessionState::Established)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn announces_only_while_fresh_and_withdraws_on_release() {
        let (listener, port) = fake_peer_listener().await;
        let (desired, valid, mut status, cancel) = spawn(port, 65001, &["198.18.0.10", "fd00::10"]);
        let (mut peer, open) = FakePeer::accept(&listener, 65001).await;
        assert_eq!(open.asn(), 65010);
        assert!(open.offers(AFI_IPV4, SAFI_UNICAST));
        established(&mut status).await;

        // Asked to announce with a stale lease: nothing goes out.
        *valid.lock().unwrap() = Some(Instant::now());
        desired.send_modify(|d| {
            d.generation = 1;
            d.announce = true;
        });
        status.wait_for(|s| s.applied == 1).await.unwrap();
        assert!(status.borrow().announced.is_empty(), "stale lease");

        // The lease is extended (the holder does that every check, without
        // a new generation): the announcement follows by itself. Only the
        // IPv4 host route (an IPv4 session).
        *valid.lock().unwrap() = Some(Instant::now() + Duration::from_secs(60));
        let u = peer.update().await;
        assert_eq!(u.nlri, vec![Prefix::host("198.18.0.10".parse().unwrap())]);
        let nh = u
            .attributes
            .iter()
            .find(|a| a.code == attr::NEXT_HOP)
            .unwrap();
        assert_eq!(nh.value, vec![127, 0, 0, 1]);
        status.wait_for(|s| s.announced.len() == 1).await.unwrap();

        desired.send_modify(|d| {
            d.generation = 2;
            d.announce = false;
        });
        let u = peer.update().await;
        assert_eq!(
            u.withdrawn,
            vec![Prefix::host("198.18.0.10".parse().unwrap())]
        );
        assert!(
            u.attributes.is_empty(),
            "an IPv4 withdrawal carries no attributes"
        );
        status.wait_for(|s| s.applied == 2).await.unwrap();
        assert!(status.borrow().announced.is_empty());

        cancel.cancel();
        let m = peer.wire.next().await.unwrap();
        assert!(
            matches!(
                m,
                Message::Notification {
                    code: notify::CEASE,
                    ..
                }
            ),
            "{m:?}"
        );
    }

    #[tokio::test]
    async fn a_wrong_peer_as_is_refused_and_retried() {
        let (listener, port) = fake_peer_listener().await;
        let (_desired, _valid, mut status, cancel) = spawn(port, 65001, &["198.18.0.10"]);
        let (mut peer, _) = FakePeer::accept(&listener, 65999).await;
        // Our KEEPALIVE never comes: a NOTIFICATION "bad peer AS" does.
        let m = peer.wire.next().await.unwrap();
        assert_eq!(
            m,
            Message::Notification {
                code: notify::OPEN,
                subcode: 2,
                data: vec![]
            }
        );
        status
            .wait_for(|s| {
                s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("peer AS is 65999, configured 65001"))
            })
            .await
            .unwrap();
        // And it connects again.
        let (_again, _) = FakePeer::accept(&listener, 65001).await;
        established(&mut status).await;
        cancel.cancel();
        drop(peer.wr);
    }

    #[tokio::test]
    async fn a_silent_peer_trips_the_hold_timer() {
        let (listener, port) = fake_peer_listener().await;
        let (_desired, _valid, mut status, cancel) = spawn(port, 65001, &["198.18.0.10"]);
        let (mut peer, _) = FakePeer::accept(&listener, 65001).await;
        established(&mut status).await;
        // The peer never sends another KEEPALIVE: 3s later we give up.
        loop {
            match peer.wire.next().await.unwrap() {
                Message::Keepalive => {}
                Message::Notification { code, .. } => {
                    assert_eq!(code, notify::HOLD_TIMER);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        status
            .wait_for(|s| s.state != SessionState::Established)
            .await
            .unwrap();
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_bfd_down_takes_the_established_session_down_and_it_comes_back() {
        use crate::vip::bgp::bfd::StateChange;
        use crate::vip::bgp::bfd::packet::{Diag, State};

        let (listener, port) = fake_peer_listener().await;
        let (bfd, bfd_rx) = watch::channel(BfdStatus {
            state: State::Up,
            ..BfdStatus::default()
        });
        let (_desired, _valid, mut status, cancel) =
            spawn_with_bfd(port, 65001, &["198.18.0.10"], Some(bfd_rx));
        let (mut peer, _) = FakePeer::accept(&listener, 65001).await;
        established(&mut status).await;
        bfd.send_modify(|s| {
            s.state = State::Down;
            s.downs = 1;
            s.last_change = Some(StateChange {
                at: SystemTime::now(),
                from: State::Up,
                to: State::Down,
                diag: Diag::DETECT_EXPIRED,
            });
        });
        // A Cease with RFC 9384's "BFD Down" subcode, then the session
        // ends with the reason.
        loop {
            match peer.wire.next().await.unwrap() {
                Message::Keepalive => {}
                m => {
                    assert_eq!(
                        m,
                        Message::Notification {
                            code: notify::CEASE,
                            subcode: CEASE_BFD_DOWN,
                            data: vec![]
                        }
                    );
                    break;
                }
            }
        }
        status
            .wait_for(|s| {
                s.state != SessionState::Established
                    && s.last_error.as_deref()
                        == Some("BFD session down (control detection time expired)")
            })
            .await
            .unwrap();
        // It connects again, and that earlier BFD Down does not end the
        // new session.
        let (_again, _) = FakePeer::accept(&listener, 65001).await;
        established(&mut status).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(status.borrow().state, SessionState::Established);
        cancel.cancel();
    }

    #[test]
    fn open_checks() {
        let peer = PeerConfig {
            address: "fd00::1".parse().unwrap(),
            port: 179,
            asn: 4_200_000_001,
            hold_time: Duration::from_secs(9),
            password: None,
            bfd: None,
        };
        let mut big = local(&["fd00::10"]);
        big.asn = 4_200_000_002;
        let ours = our_open(&peer, &big);
        assert_eq!(ours.asn, AS_TRANS, "a 4-octet AS goes in the capability");
        assert_eq!(ours.asn(), 4_200_000_002);
        assert!(ours.offers(AFI_IPV6, SAFI_UNICAST));
        let mut theirs = Open {
            asn: AS_TRANS,
            hold_time: 3,
            router_id: Ipv4Addr::new(10, 0, 0, 1),
            capabilities: vec![
                Capability::FourOctetAs(4_200_000_001),
                Capability::Multiprotocol {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                },
            ],
        };
        assert_eq!(check_open(&peer, &theirs), Ok(Duration::from_secs(3)));
        theirs.capabilities.pop();
        let e = check_open(&peer, &theirs).unwrap_err();
        assert_eq!((e.code, e.subcode), (notify::OPEN, 7));
        assert!(e.what.contains("IPv6 unicast"), "{e}");
    }
}
