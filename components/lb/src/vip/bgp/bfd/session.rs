//! The task that runs one peer's BFD [`Machine`]: sends its packets on
//! the jittered schedule (and at once on a state change or an owed
//! Final), feeds it what the listener routes here, fires its detection
//! timer, and publishes every state change ([`BfdStatus`]), which the BGP
//! session of the same peer watches.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::machine::{Change, Machine, Timers};
use super::packet::{Packet, State};
use super::{BfdStatus, REBIND, StateChange, discard, socket};

/// The session's peer.
pub struct Peer {
    /// Its address.
    pub address: IpAddr,
    /// Its BFD port ([`socket::PORT`] outside tests).
    pub port: u16,
    /// Our timers.
    pub timers: Timers,
}

/// Runs the session until `cancel`, then says AdminDown.
pub async fn run(
    peer: Peer,
    mut packets: mpsc::Receiver<Packet>,
    status: watch::Sender<BfdStatus>,
    cancel: CancellationToken,
) {
    let to = SocketAddr::new(peer.address, peer.port);
    let label = peer.address.to_string();
    metrics::gauge!("bulwark_lb_bfd_session_up", "peer" => label.clone()).set(0.0);
    let Some(sock) = sender(&peer, &status, &cancel).await else {
        return;
    };
    let mut m = Machine::new(peer.timers, rand::random::<u32>());
    let mut next_tx = Instant::now();
    loop {
        let mut send_now = false;
        let detect = m.detect_at();
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                let _ = sock.send_to(&m.admin_down().encode(), to).await;
                return;
            }
            // Before the packets: a flood from the peer's address must not
            // starve our own transmissions. A packet that is waiting still
            // goes before the detection timer, so it is not missed.
            () = tokio::time::sleep_until(next_tx) => send_now = true,
            p = packets.recv() => {
                let Some(p) = p else { return };
                match m.receive(&p, Instant::now()) {
                    Ok(change) => {
                        send_now = change.is_some() || m.final_due();
                        publish(&m, change, &status, &label);
                    }
                    Err(e) => discard(peer.address, &e),
                }
            }
            () = sleep_until(detect), if detect.is_some() => {
                let change = m.expire(Instant::now());
                send_now = change.is_some();
                publish(&m, change, &status, &label);
            }
        }
        if send_now {
            if let Err(e) = sock.send_to(&m.packet().encode(), to).await {
                // Unreachable for now (a cut link, an ICMP error): the
                // detection timers decide, not the send.
                tracing::trace!(peer = %to, error = %e, "BFD send failed");
            }
            // The periodic timer restarts from every packet sent.
            let wait = m.next_tx(rand::random::<f64>());
            next_tx = Instant::now() + wait.unwrap_or(Duration::from_secs(3600));
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The sending socket, retried until it binds or `cancel`.
async fn sender(
    peer: &Peer,
    status: &watch::Sender<BfdStatus>,
    cancel: &CancellationToken,
) -> Option<UdpSocket> {
    loop {
        match socket::sender(peer.address.is_ipv6()) {
            Ok(s) => return Some(s),
            Err(e) => {
                let why = format!("cannot open the BFD sending socket: {e}");
                tracing::warn!(peer = %peer.address, error = why, "retrying");
                status.send_modify(|s| s.error = Some(why));
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            () = tokio::time::sleep(REBIND) => {}
        }
    }
}

/// Publishes the machine's state (and a change, if any) to the status,
/// the metrics and the log.
fn publish(m: &Machine, change: Option<Change>, status: &watch::Sender<BfdStatus>, label: &str) {
    let Some(c) = change else {
        // The peer's state and the timing can change without ours.
        status.send_if_modified(|s| {
            let before = (s.remote_state, s.detection_time);
            s.remote_state = m.remote_state();
            s.detection_time = m.detection_time();
            before != (s.remote_state, s.detection_time)
        });
        return;
    };
    let went_down = c.from == State::Up;
    if went_down {
        tracing::warn!(peer = label, diag = c.diag.describe(), "BFD session down");
        metrics::counter!("bulwark_lb_bfd_session_down_total", "peer" => label.to_owned())
            .increment(1);
    } else {
        tracing::info!(
            peer = label,
            from = c.from.as_str(),
            to = c.to.as_str(),
            "BFD session state"
        );
    }
    let up = if c.to == State::Up { 1.0 } else { 0.0 };
    metrics::gauge!("bulwark_lb_bfd_session_up", "peer" => label.to_owned()).set(up);
    status.send_modify(|s| {
        s.state = c.to;
        s.remote_state = m.remote_state();
        s.detection_time = m.detection_time();
        s.downs += u64::from(went_down);
        s.last_change = Some(StateChange {
            at: SystemTime::now(),
            from: c.from,
            to: c.to,
            diag: c.diag,
        });
    });
}

#[cfg(test)]
mod tests {
    use super::super::Hub;
    use super::super::machine::SLOW;
    use super::super::packet::Diag;
    use super::*;

    /// A scripted peer on loopback: it answers from its own sockets (TTL
    /// 255, like a router) and reports what it receives.
    struct FakePeer {
        rx: UdpSocket,
        tx: UdpSocket,
    }

    impl FakePeer {
        async fn next(&self) -> Packet {
            let mut buf = [0u8; 64];
            let (n, _, ttl) =
                tokio::time::timeout(Duration::from_secs(5), socket::recv(&self.rx, &mut buf))
                    .await
                    .expect("a packet within 5s")
                    .unwrap();
            super::super::packet::accept(ttl, &buf[..n]).unwrap()
        }

        async fn send(&self, p: &Packet, port: u16) {
            self.tx
                .send_to(&p.encode(), SocketAddr::from(([127, 0, 0, 1], port)))
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn comes_up_with_a_peer_and_goes_down_when_it_falls_silent() {
        // Our listener's port: found free, then handed to the hub.
        let ours = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let our_port = ours.local_addr().unwrap().port();
        drop(ours);
        let peer = FakePeer {
            rx: socket::listen(false, 0).unwrap(),
            tx: socket::sender(false).unwrap(),
        };
        let peer_port = peer.rx.local_addr().unwrap().port();
        let cancel = CancellationToken::new();
        let mut hub = Hub::new(our_port, peer_port);
        let timers = Timers {
            interval: Duration::from_millis(50),
            multiplier: 3,
        };
        let (mut status, run) = hub.session("127.0.0.1".parse().unwrap(), timers, cancel.clone());
        tokio::spawn(run);
        for l in hub.listeners(&cancel) {
            tokio::spawn(l);
        }

        // We start Down, at the slow rate.
        let first = peer.next().await;
        assert_eq!((first.state, first.your_discriminator), (State::Down, 0));
        assert_eq!(first.desired_min_tx, SLOW);
        assert!((49152..=65535).contains(&peer.tx.local_addr().unwrap().port()));
        let theirs = |state, your| Packet {
            state,
            detect_mult: 3,
            my_discriminator: 0x77,
            your_discriminator: your,
            desired_min_tx: Duration::from_millis(50),
            required_min_rx: Duration::from_millis(50),
            ..Packet::default()
        };
        // A packet naming some other session of ours changes nothing.
        peer.send(&theirs(State::Init, 0x5eed), our_port).await;
        peer.send(&theirs(State::Down, 0), our_port).await;
        let init = peer.next().await;
        assert_eq!(init.state, State::Init, "answered at once on the change");
        assert_eq!(init.your_discriminator, 0x77);
        peer.send(&theirs(State::Up, first.my_discriminator), our_port)
            .await;
        status.wait_for(|s| s.state == State::Up).await.unwrap();
        // Up: the fast rate, announced with a Poll.
        let p = loop {
            let p = peer.next().await;
            if p.state == State::Up {
                break p;
            }
        };
        assert!(p.poll);
        assert_eq!(p.desired_min_tx, Duration::from_millis(50));
        let mut fin = theirs(State::Up, first.my_discriminator);
        fin.final_ = true;
        peer.send(&fin, our_port).await;

        // Silence: 3 × 50 ms later the session is Down, diag 1.
        let s = status
            .wait_for(|s| s.state == State::Down)
            .await
            .unwrap()
            .clone();
        assert_eq!(s.downs, 1);
        let change = s.last_change.unwrap();
        assert_eq!(
            (change.from, change.diag),
            (State::Up, Diag::DETECT_EXPIRED)
        );
        cancel.cancel();
    }
}
