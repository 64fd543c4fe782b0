//! A userspace delay line for kernels without `sch_netem`.
//!
//! An `iptables` rule in the host sends its outgoing IP packets on one
//! interface to NFQUEUE 0 (queues are per network namespace, so every host
//! can use 0). A thread of the test process, inside the host's namespace,
//! reads the queue over netlink (metadata only, no payload copies) and gives
//! each packet its verdict later: accept once the delay has passed, or drop
//! with the configured probability. A constant delay keeps packets in order.
//!
//! The rule has `--queue-bypass` and the queue is fail-open, so if the
//! thread is gone or the queue is full, packets pass undelayed rather than
//! being lost: the test sees less impairment, never a dead link it did not
//! ask for.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::Netem;
use crate::tools;

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_META: u8 = 1;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NETLINK_NO_ENOBUFS: libc::c_int = 5;
const QUEUE: u16 = 0;
const QUEUE_MAXLEN: u32 = 16384;
const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;

/// A running delay line for one host; [`DelayLine::stop`] removes it.
#[derive(Debug)]
pub(super) struct DelayLine {
    netns: String,
    rule: Vec<String>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayLine {
    /// Starts the queue reader inside `netns`, then adds the rule that
    /// feeds it packets leaving through `iface`.
    pub(super) fn start(netns: &str, iface: &str, netem: Netem) -> anyhow::Result<Self> {
        let iptables = tools::system("iptables").map_err(|e| {
            anyhow::anyhow!(
                "{e}: this kernel has no sch_netem, and the userspace fallback needs \
                 iptables (Debian iptables); run `cargo xtask setup`"
            )
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let path = std::path::Path::new(super::NETNS_DIR).join(netns);
        let ns_file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("netem-{netns}"))
                .spawn(move || {
                    // SAFETY: setns on a valid namespace fd; affects only
                    // this thread, which is dedicated to the delay line.
                    if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        let _ = ready_tx.send(Err(std::io::Error::last_os_error().into()));
                        return;
                    }
                    match Queue::open() {
                        Ok(queue) => {
                            let _ = ready_tx.send(Ok(()));
                            queue.run(netem, &stop);
                        }
                        Err(err) => {
                            let _ = ready_tx.send(Err(err));
                        }
                    }
                })
                .context("starting the delay line thread")?
        };
        ready_rx
            .recv()
            .context("the delay line thread died")?
            .with_context(|| format!("binding NFQUEUE {QUEUE} in {netns}"))?;
        let rule: Vec<String> = [
            "-t",
            "mangle",
            "POSTROUTING",
            "-o",
            iface,
            "-j",
            "NFQUEUE",
            "--queue-num",
            "0",
            "--queue-bypass",
        ]
        .map(String::from)
        .to_vec();
        let line = Self {
            netns: netns.to_owned(),
            rule,
            stop,
            thread: Some(thread),
        };
        line.iptables(&iptables, "-A")?;
        Ok(line)
    }

    /// Removes the rule, releases held packets and ends the thread.
    pub(super) fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Already stopped (stop() then Drop).
        if self.thread.is_none() {
            return;
        }
        if let Ok(iptables) = tools::system("iptables") {
            // Fails when the namespace is already gone; nothing to undo then.
            let _ = self.iptables(&iptables, "-D");
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn iptables(&self, iptables: &std::path::Path, action: &str) -> anyhow::Result<()> {
        // "-t mangle <action> POSTROUTING …"; -w waits for the xtables lock,
        // which parallel tests share.
        let mut args: Vec<&str> = vec!["-w", "-t", "mangle", action];
        args.extend(self.rule[2..].iter().map(String::as_str));
        let output = Command::new(tools::system("ip")?)
            .args(["netns", "exec", &self.netns])
            .arg(iptables)
            .args(&args)
            .output()
            .context("running iptables")?;
        anyhow::ensure!(
            output.status.success(),
            "iptables {} in {}: {}",
            args.join(" "),
            self.netns,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A bound NFQUEUE netlink socket.
struct Queue {
    fd: OwnedFd,
    seq: u32,
}

impl Queue {
    fn open() -> anyhow::Result<Self> {
        // SAFETY: socket(2) has no memory preconditions; the fd is checked
        // and owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("netlink socket");
        }
        // SAFETY: fd is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid; we fill the family.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl of the size we pass.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("binding the netlink socket");
        }
        // A burst larger than the socket buffer would otherwise surface as
        // ENOBUFS; fail-open covers what cannot be queued.
        set_int_opt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            8 << 20,
        );
        set_int_opt(fd.as_raw_fd(), libc::SOL_NETLINK, NETLINK_NO_ENOBUFS, 1);
        let mut queue = Self { fd, seq: 0 };
        queue.config(&attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]))?;
        let mut params = 0u32.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_META);
        queue.config(&attr(NFQA_CFG_PARAMS, &params))?;
        queue.config(&attr(NFQA_CFG_QUEUE_MAXLEN, &QUEUE_MAXLEN.to_be_bytes()))?;
        let mut flags = attr(NFQA_CFG_FLAGS, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes());
        flags.extend(attr(NFQA_CFG_MASK, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes()));
        queue.config(&flags)?;
        Ok(queue)
    }

    /// Sends a config message and waits for its ack.
    fn config(&mut self, attrs: &[u8]) -> anyhow::Result<()> {
        let msg = self.message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, attrs);
        self.send(&msg)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.recv(&mut buf, 0)?;
            for (kind, payload) in messages(&buf[..n]) {
                if kind == NLMSG_ERROR && payload.len() >= 4 {
                    let errno =
                        i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if errno == 0 {
                        return Ok(());
                    }
                    return Err(std::io::Error::from_raw_os_error(-errno))
                        .context("NFQUEUE config");
                }
            }
        }
    }

    fn run(mut self, netem: Netem, stop: &AtomicBool) {
        let mut held: VecDeque<(u32, Instant)> = VecDeque::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut rng = Rng::seeded();
        let drop_below = (netem.loss_percent / 100.0 * u32::MAX as f64) as u64;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            while held.front().is_some_and(|(_, due)| *due <= now) {
                if let Some((id, _)) = held.pop_front() {
                    self.verdict(id, NF_ACCEPT);
                }
            }
            // Wake for the next due packet, and at least every 20 ms to
            // notice a stop.
            let wait = held
                .front()
                .map(|(_, due)| due.saturating_duration_since(now))
                .unwrap_or(Duration::from_millis(20))
                .min(Duration::from_millis(20));
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Round up so a sub-millisecond wait does not busy-loop.
            let timeout_ms = wait.as_micros().div_ceil(1000) as libc::c_int;
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if ready <= 0 {
                continue;
            }
            while let Ok(n) = self.recv(&mut buf, libc::MSG_DONTWAIT) {
                let arrived = Instant::now();
                let ids: Vec<u32> = messages(&buf[..n])
                    .filter(|(kind, _)| *kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET)
                    .filter_map(|(_, payload)| packet_id(payload))
                    .collect();
                for id in ids {
                    if (rng.next() as u64) < drop_below {
                        self.verdict(id, NF_DROP);
                    } else {
                        held.push_back((id, arrived + netem.delay));
                    }
                }
            }
        }
        for (id, _) in held {
            self.verdict(id, NF_ACCEPT);
        }
        let _ = self.config(&attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_UNBIND, 0, 0, 0]));
    }

    fn verdict(&mut self, id: u32, verdict: u32) {
        let mut body = verdict.to_be_bytes().to_vec();
        body.extend(id.to_be_bytes());
        let msg = self.message(
            NFQNL_MSG_VERDICT,
            NLM_F_REQUEST,
            &attr(NFQA_VERDICT_HDR, &body),
        );
        // A lost verdict leaves the packet queued until the queue goes away
        // (then it is dropped); nothing better to do with the error here.
        let _ = self.send(&msg);
    }

    fn message(&mut self, kind: u16, flags: u16, attrs: &[u8]) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let len = (NLMSG_HDRLEN + NFGEN_HDRLEN + attrs.len()) as u32;
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend(len.to_ne_bytes());
        msg.extend(((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
        msg.extend(flags.to_ne_bytes());
        msg.extend(self.seq.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes());
        // nfgenmsg: family AF_UNSPEC, version 0, queue number big-endian.
        msg.extend([libc::AF_UNSPEC as u8, 0]);
        msg.extend(QUEUE.to_be_bytes());
        msg.extend(attrs);
        msg
    }

    fn send(&self, msg: &[u8]) -> std::io::Result<()> {
        // SAFETY: msg is a valid buffer of msg.len() bytes; the socket is
        // bound, so the kernel (pid 0) is the default destination.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8], flags: libc::c_int) -> std::io::Result<usize> {
        // SAFETY: buf is valid for buf.len() writable bytes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: value is a valid c_int of the size we pass. Best effort.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// One netlink attribute, padded to 4 bytes.
fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend((len as u16).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(payload);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// The netlink messages in a datagram: (type, payload after nlmsghdr).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let payload = &rest[NLMSG_HDRLEN..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((kind, payload))
    })
}

/// The packet id of an NFQNL_MSG_PACKET payload (nfgenmsg, then attributes).
fn packet_id(payload: &[u8]) -> Option<u32> {
    let mut attrs = payload.get(NFGEN_HDRLEN..)?;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR && len >= 8 {
            return Some(u32::from_be_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]));
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

/// xorshift32: loss decisions need no statistical quality, and no crate.
struct Rng(u32);

impl Rng {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Self((nanos ^ std::process::id()) | 1)
    }

    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_parsed_back() {
        let a = attr(NFQA_PACKET_HDR, &[0, 0, 0, 42, 8, 0, 3]);
        assert_eq!(a.len(), 12);
        let mut payload = vec![0u8; NFGEN_HDRLEN];
        payload.extend(attr(9, &[1, 2, 3]));
        payload.extend(a);
        assert_eq!(packet_id(&payload), Some(42));
    }
}
