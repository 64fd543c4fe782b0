//! Copying bytes both ways between the client and the backend, with
//! half-close: when one side sends FIN, the other side's write half is shut
//! down and the opposite direction keeps flowing until it ends too (a client
//! that half-closes after its request still gets the whole response).
//!
//! One future drives both directions (as `tokio::io::copy_bidirectional`
//! does) so a connection is one task; unlike it, bytes are counted into the
//! backend's live counters after every write (the API shows the bytes of a
//! watch that has been open for an hour, not only of finished connections)
//! and the future reports activity for the idle timer.
//!
//! With `proxy.splice` on, a direction that carries bulk data (a read of at
//! least [`SPLICE_AFTER`] bytes) switches to `splice(2)` through a pipe for
//! the rest of the connection: payload then never enters user space. Small
//! exchanges stay on plain read/write, which costs fewer syscalls per
//! message than socket → pipe → socket, and short connections never pay
//! for creating pipes. If a pipe cannot be created (descriptor limit) the
//! direction simply stays buffered.
//!
//! A direction holds a copy buffer only while it has bytes to write
//! ([`super::buffers`]): an idle connection holds none.
//!
//! Until the backend's first byte, the client's bytes are kept (appended in
//! the client→backend buffer, at most `bufferSize` of them) instead of
//! being overwritten: if the backend closes or resets before answering (a
//! dying apiserver's listener accepts, then resets mid-handshake), the copy
//! ends with [`CopyError::BeforeFirstByte`] and the caller can replay that
//! first flight to another backend ([`Bidirectional::replay_to`]). Nothing
//! reached an application then: a TLS client sends only its ClientHello
//! before the server's first byte. The window closes on the backend's
//! first byte, when the buffer is full, or at the replay deadline; after
//! it the copy is exactly the plain one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::buffers::Buffer;
use super::splice::Pipe;
use crate::backends::BackendStats;

/// A read at least this large marks a direction as bulk: one full TLS
/// record (16 KiB of plaintext plus overhead) or more was waiting.
pub(crate) const SPLICE_AFTER: usize = 16 * 1024;

/// Which side ended the copy with an error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CopyError {
    /// Reading from or writing to the client failed.
    #[error("client side: {0}")]
    Client(io::Error),
    /// Reading from or writing to the backend failed.
    #[error("backend side: {0}")]
    Backend(io::Error),
    /// The backend closed or reset before its first byte, while the
    /// client's first flight is still held and the replay deadline has not
    /// passed: the client has seen nothing and the flight can go to another
    /// backend.
    #[error("backend closed before its first byte: {0}")]
    BeforeFirstByte(io::Error),
}

/// The replay window: open from the start until the backend's first byte,
/// a full client→backend buffer, or the deadline.
struct FirstFlight {
    open: bool,
    until: Instant,
}

impl FirstFlight {
    /// Whether a backend failure now may be replayed. Read only when the
    /// backend failed, so the clock is not read on the data path.
    fn replayable(&self) -> bool {
        self.open && Instant::now() < self.until
    }
}

/// One direction's state.
#[derive(Default)]
struct Half {
    /// Lent while bytes `buf[pos..cap]` wait to be written, or while the
    /// first flight is kept in it.
    buf: Option<Buffer>,
    /// Bytes `buf[pos..cap]` read but not yet written.
    pos: usize,
    cap: usize,
    /// Bytes sitting in `pipe`, not yet written.
    in_pipe: usize,
    /// Present once this direction went zero-copy.
    pipe: Option<Pipe>,
    /// Whether this direction may go zero-copy (`proxy.splice`).
    may_splice: bool,
    eof: bool,
    done: bool,
}

impl Half {
    /// Gives the buffer back once everything in it is written, unless it
    /// is the client→backend one keeping the first flight.
    fn release_unless_kept<const UP: bool>(&mut self, first_flight: &FirstFlight) {
        if self.pos == self.cap && !(UP && first_flight.open) {
            self.buf = None;
            self.pos = 0;
            self.cap = 0;
        }
    }
}

/// Copies until both directions have seen EOF and forwarded it.
pub(crate) struct Bidirectional<'a> {
    client: &'a mut TcpStream,
    backend: TcpStream,
    stats: Arc<BackendStats>,
    /// Each direction's buffer size (`proxy.bufferSize`).
    buffer_size: usize,
    up: Half,
    down: Half,
    active: bool,
    first_flight: FirstFlight,
}

impl<'a> Bidirectional<'a> {
    /// A copy whose first flight may be replayed until `replay_until`.
    pub(crate) fn new(
        client: &'a mut TcpStream,
        backend: TcpStream,
        stats: Arc<BackendStats>,
        buffer_size: usize,
        splice: bool,
        replay_until: Instant,
    ) -> Self {
        Self {
            client,
            backend,
            stats,
            buffer_size,
            up: Half {
                may_splice: splice,
                ..Half::default()
            },
            down: Half {
                may_splice: splice,
                ..Half::default()
            },
            active: false,
            first_flight: FirstFlight {
                open: true,
                until: replay_until,
            },
        }
    }

    /// After [`CopyError::BeforeFirstByte`]: drops the failed backend and
    /// sends the kept first flight (and the client's FIN, if it came) to
    /// `backend` from the start. Nothing was read from the failed backend,
    /// so the other direction has nothing to undo.
    pub(crate) fn replay_to(&mut self, backend: TcpStream, stats: Arc<BackendStats>) {
        self.backend = backend;
        self.stats = stats;
        self.up.pos = 0;
        self.up.done = false;
    }

    /// Whether bytes moved since the last call.
    pub(crate) fn take_activity(&mut self) -> bool {
        std::mem::take(&mut self.active)
    }

    /// Makes the client's connection end with a reset when it is closed.
    /// Best effort: the socket may already be gone.
    pub(crate) fn reset_client(&self) {
        let _ = self.client.set_zero_linger();
    }

    /// Resets the side opposite the one that failed: a FIN would look like
    /// a clean end of stream. Best effort: the socket may already be gone.
    pub(crate) fn reset_peer_of(&mut self, failed: &CopyError) {
        let peer = match failed {
            CopyError::Client(_) => &self.backend,
            CopyError::Backend(_) | CopyError::BeforeFirstByte(_) => &*self.client,
        };
        let _ = peer.set_zero_linger();
    }
}

/// Where an error came from, before it is named client or backend.
enum Side {
    From(io::Error),
    To(io::Error),
}

/// Moves bytes one way until `from` would block, `to` would block, or the
/// direction is finished (EOF forwarded as a write shutdown, or left to the
/// close when the other direction is over, `peer_done`). `UP` is the
/// client→backend direction, which keeps the first flight; the other one
/// closes the window on the backend's first byte.
#[allow(clippy::too_many_arguments)] // one call per direction, all state borrowed
fn poll_half<const UP: bool>(
    cx: &mut Context<'_>,
    h: &mut Half,
    peer_done: bool,
    first_flight: &mut FirstFlight,
    size: usize,
    from: &mut TcpStream,
    to: &mut TcpStream,
    active: &mut bool,
    mut count: impl FnMut(u64),
) -> Poll<Result<(), Side>> {
    loop {
        while let Some(buf) = h.buf.as_deref().filter(|_| h.pos < h.cap) {
            let n =
                ready!(Pin::new(&mut *to).poll_write(cx, &buf[h.pos..h.cap])).map_err(Side::To)?;
            if n == 0 {
                return Poll::Ready(Err(Side::To(io::ErrorKind::WriteZero.into())));
            }
            h.pos += n;
            *active = true;
            count(n as u64);
        }
        if let Some(pipe) = &h.pipe {
            while h.in_pipe > 0 {
                ready!(to.poll_write_ready(cx)).map_err(Side::To)?;
                match to.try_io(Interest::WRITABLE, || pipe.drain_into(&*to, h.in_pipe)) {
                    Ok(0) => return Poll::Ready(Err(Side::To(io::ErrorKind::WriteZero.into()))),
                    Ok(n) => {
                        h.in_pipe -= n;
                        *active = true;
                        count(n as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(Side::To(e))),
                }
            }
        }
        if h.eof {
            // When the other direction is already over, this EOF ends the
            // connection: both sockets are closed next, and the close
            // sends `to` its FIN (nothing is left unread on it, its peer
            // sent FIN). A shutdown first would be one more syscall per
            // connection for the same packets.
            if !peer_done {
                ready!(Pin::new(&mut *to).poll_shutdown(cx)).map_err(Side::To)?;
            }
            h.done = true;
            return Poll::Ready(Ok(()));
        }
        // Everything read so far is written: read more.
        if let Some(pipe) = &h.pipe {
            // The pipe is empty here, so EAGAIN can only mean the socket
            // has nothing, and clearing its read readiness is correct.
            ready!(from.poll_read_ready(cx)).map_err(Side::From)?;
            match from.try_io(Interest::READABLE, || pipe.fill_from(&*from)) {
                Ok(0) => h.eof = true,
                Ok(n) => h.in_pipe = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(Side::From(e))),
            }
        } else {
            // While the window is open the client's bytes are appended
            // after the ones already sent, so all of them can be sent again.
            // A full buffer closes the window (beyond it, no replay), but
            // only once the client has more to send: a first flight of
            // exactly `bufferSize` bytes is still kept whole.
            if h.buf.is_none() {
                // Borrow a buffer only once the socket says it has
                // something: a direction that waits takes none.
                ready!(from.poll_read_ready(cx)).map_err(Side::From)?;
            }
            let buf = h.buf.get_or_insert_with(|| Buffer::take(size));
            let start = if UP && first_flight.open {
                if h.cap < buf.len() {
                    h.cap
                } else {
                    // Peek, not readiness: readiness stays set after a
                    // read that filled the buffer, with nothing behind it.
                    let mut one = [0u8; 1];
                    ready!(from.poll_peek(cx, &mut ReadBuf::new(&mut one))).map_err(Side::From)?;
                    first_flight.open = false;
                    0
                }
            } else {
                0
            };
            let mut rb = ReadBuf::new(&mut buf[start..]);
            ready!(Pin::new(&mut *from).poll_read(cx, &mut rb)).map_err(Side::From)?;
            let n = rb.filled().len();
            if n == 0 {
                if !UP && first_flight.replayable() {
                    return Poll::Ready(Err(Side::From(io::ErrorKind::UnexpectedEof.into())));
                }
                h.eof = true;
            } else {
                if !UP {
                    // The backend answered: replaying is no longer safe.
                    first_flight.open = false;
                }
                h.pos = start;
                h.cap = start + n;
                // A kept first flight stays in the buffer: a pipe would
                // carry the next bytes past it.
                if h.may_splice && n >= SPLICE_AFTER && !(UP && first_flight.open) {
                    // Bulk from now on; failing to get a pipe only means
                    // staying buffered.
                    h.pipe = Pipe::new().ok();
                }
            }
        }
    }
}

/// A backend error is replayable while the first flight is still held.
fn backend_failed(first_flight: &FirstFlight, e: io::Error) -> CopyError {
    if first_flight.replayable() {
        CopyError::BeforeFirstByte(e)
    } else {
        CopyError::Backend(e)
    }
}

impl Future for Bidirectional<'_> {
    type Output = Result<(), CopyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let stats = &*this.stats;
        let ff = &mut this.first_flight;

        if !this.up.done
            && let Poll::Ready(Err(side)) = poll_half::<true>(
                cx,
                &mut this.up,
                this.down.done,
                ff,
                this.buffer_size,
                this.client,
                &mut this.backend,
                &mut this.active,
                |n| stats.add_bytes_in(n),
            )
        {
            return Poll::Ready(Err(match side {
                Side::From(e) => CopyError::Client(e),
                Side::To(e) => backend_failed(ff, e),
            }));
        }
        if !this.down.done
            && let Poll::Ready(Err(side)) = poll_half::<false>(
                cx,
                &mut this.down,
                this.up.done,
                ff,
                this.buffer_size,
                &mut this.backend,
                this.client,
                &mut this.active,
                |n| stats.add_bytes_out(n),
            )
        {
            return Poll::Ready(Err(match side {
                Side::From(e) => backend_failed(ff, e),
                Side::To(e) => CopyError::Client(e),
            }));
        }
        if this.up.done && this.down.done {
            Poll::Ready(Ok(()))
        } else {
            // Waiting: a direction with nothing left to write gives its
            // buffer back to the thread, unless it keeps the first flight
            // (checked after both directions ran: the backend's first byte
            // closes the window for the client→backend buffer too).
            this.up.release_unless_kept::<true>(ff);
            this.down.release_unless_kept::<false>(ff);
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::super::buffers::pooled;
    use super::*;

    /// Two connected sockets: (the end we drive, the end the copy gets).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = listener.accept().await.unwrap();
        (ours, theirs)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_connection_gives_its_buffers_back_and_borrows_them_again() {
        let (mut client, mut proxied_client) = pair().await;
        let (mut backend, proxied_backend) = pair().await;
        let stats = BackendStats::shared("b");
        // The replay window closes on the backend's first byte, so the
        // client→backend buffer is given back after the first exchange.
        let until = Instant::now() + Duration::from_secs(5);
        let mut copy = Bidirectional::new(
            &mut proxied_client,
            proxied_backend,
            stats,
            1024,
            false,
            until,
        );
        let exchanges = async {
            let mut free_while_idle = Vec::new();
            for round in 0..3u8 {
                let mut got = [0u8; 4];
                client.write_all(&[b'q', round, 0, 0]).await.unwrap();
                backend.read_exact(&mut got).await.unwrap();
                assert_eq!(got, [b'q', round, 0, 0]);
                backend.write_all(&[b'a', round, 0, 0]).await.unwrap();
                client.read_exact(&mut got).await.unwrap();
                assert_eq!(got, [b'a', round, 0, 0]);
                // The copy ran to its next (blocked) read before the answer
                // reached the client: nothing is held while both wait.
                free_while_idle.push(pooled());
            }
            free_while_idle
        };
        tokio::select! {
            r = &mut copy => panic!("the copy ended: {r:?}"),
            free = exchanges => assert_eq!(free, [2, 2, 2], "both buffers are back in the pool between exchanges"),
        }
    }
}
