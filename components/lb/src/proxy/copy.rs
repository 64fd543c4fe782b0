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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

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
}

/// One direction's state.
#[derive(Default)]
struct Half {
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

/// Copies until both directions have seen EOF and forwarded it.
pub(crate) struct Bidirectional<'a> {
    client: &'a mut TcpStream,
    backend: &'a mut TcpStream,
    stats: &'a BackendStats,
    /// Both directions' buffers in one allocation: `[..half]` carries
    /// client→backend, `[half..]` backend→client.
    buf: Box<[u8]>,
    up: Half,
    down: Half,
    active: bool,
}

impl<'a> Bidirectional<'a> {
    pub(crate) fn new(
        client: &'a mut TcpStream,
        backend: &'a mut TcpStream,
        stats: &'a BackendStats,
        buffer_size: usize,
        splice: bool,
    ) -> Self {
        Self {
            client,
            backend,
            stats,
            buf: vec![0u8; buffer_size * 2].into_boxed_slice(),
            up: Half {
                may_splice: splice,
                ..Half::default()
            },
            down: Half {
                may_splice: splice,
                ..Half::default()
            },
            active: false,
        }
    }

    /// Whether bytes moved since the last call.
    pub(crate) fn take_activity(&mut self) -> bool {
        std::mem::take(&mut self.active)
    }

    /// Resets the side opposite the one that failed: a FIN would look like
    /// a clean end of stream. Best effort: the socket may already be gone.
    pub(crate) fn reset_peer_of(&mut self, failed: &CopyError) {
        let peer = match failed {
            CopyError::Client(_) => &*self.backend,
            CopyError::Backend(_) => &*self.client,
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
/// direction is finished (EOF forwarded as a write shutdown).
fn poll_half(
    cx: &mut Context<'_>,
    h: &mut Half,
    buf: &mut [u8],
    from: &mut TcpStream,
    to: &mut TcpStream,
    active: &mut bool,
    mut count: impl FnMut(u64),
) -> Poll<Result<(), Side>> {
    loop {
        while h.pos < h.cap {
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
            ready!(Pin::new(&mut *to).poll_shutdown(cx)).map_err(Side::To)?;
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
            let mut rb = ReadBuf::new(buf);
            ready!(Pin::new(&mut *from).poll_read(cx, &mut rb)).map_err(Side::From)?;
            let n = rb.filled().len();
            if n == 0 {
                h.eof = true;
            } else {
                h.pos = 0;
                h.cap = n;
                if h.may_splice && n >= SPLICE_AFTER {
                    // Bulk from now on; failing to get a pipe only means
                    // staying buffered.
                    h.pipe = Pipe::new().ok();
                }
            }
        }
    }
}

impl Future for Bidirectional<'_> {
    type Output = Result<(), CopyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let half = this.buf.len() / 2;
        let (up_buf, down_buf) = this.buf.split_at_mut(half);
        let stats = this.stats;

        if !this.up.done
            && let Poll::Ready(Err(side)) = poll_half(
                cx,
                &mut this.up,
                up_buf,
                this.client,
                this.backend,
                &mut this.active,
                |n| stats.add_bytes_in(n),
            )
        {
            return Poll::Ready(Err(match side {
                Side::From(e) => CopyError::Client(e),
                Side::To(e) => CopyError::Backend(e),
            }));
        }
        if !this.down.done
            && let Poll::Ready(Err(side)) = poll_half(
                cx,
                &mut this.down,
                down_buf,
                this.backend,
                this.client,
                &mut this.active,
                |n| stats.add_bytes_out(n),
            )
        {
            return Poll::Ready(Err(match side {
                Side::From(e) => CopyError::Backend(e),
                Side::To(e) => CopyError::Client(e),
            }));
        }
        if this.up.done && this.down.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}
