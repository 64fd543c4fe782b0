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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::backends::BackendStats;

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
    pos: usize,
    cap: usize,
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
    ) -> Self {
        Self {
            client,
            backend,
            stats,
            buf: vec![0u8; buffer_size * 2].into_boxed_slice(),
            up: Half::default(),
            down: Half::default(),
            active: false,
        }
    }

    /// Whether bytes moved since the last call.
    pub(crate) fn take_activity(&mut self) -> bool {
        std::mem::take(&mut self.active)
    }

    /// Resets the side opposite the one that failed.
    pub(crate) fn reset_peer_of(&mut self, failed: &CopyError) {
        reset_peer_of(self.client, self.backend, failed);
    }
}

/// A broken side's peer gets a reset rather than a FIN: a FIN would look
/// like a clean end of stream. Best effort: the socket may already be gone.
pub(crate) fn reset_peer_of(client: &TcpStream, backend: &TcpStream, failed: &CopyError) {
    let peer = match failed {
        CopyError::Client(_) => backend,
        CopyError::Backend(_) => client,
    };
    let _ = peer.set_zero_linger();
}

/// Moves bytes one way until `from` is exhausted or `to` would block.
/// Errors are tagged with the side they came from by the caller's closures.
fn poll_half(
    cx: &mut Context<'_>,
    h: &mut Half,
    buf: &mut [u8],
    from: &mut TcpStream,
    to: &mut TcpStream,
    active: &mut bool,
    mut count: impl FnMut(u64),
) -> Poll<Result<(), (bool, io::Error)>> {
    // `(true, e)`: the error came from reading `from`; `(false, e)`: from
    // writing `to`.
    loop {
        if h.pos == h.cap && !h.eof {
            let mut rb = ReadBuf::new(buf);
            ready!(Pin::new(&mut *from).poll_read(cx, &mut rb)).map_err(|e| (true, e))?;
            let n = rb.filled().len();
            if n == 0 {
                h.eof = true;
            } else {
                h.pos = 0;
                h.cap = n;
            }
        }
        while h.pos < h.cap {
            let n = ready!(Pin::new(&mut *to).poll_write(cx, &buf[h.pos..h.cap]))
                .map_err(|e| (false, e))?;
            if n == 0 {
                return Poll::Ready(Err((false, io::ErrorKind::WriteZero.into())));
            }
            h.pos += n;
            *active = true;
            count(n as u64);
        }
        if h.eof {
            ready!(Pin::new(&mut *to).poll_shutdown(cx)).map_err(|e| (false, e))?;
            h.done = true;
            return Poll::Ready(Ok(()));
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

        let up = if this.up.done {
            Poll::Ready(Ok(()))
        } else {
            poll_half(
                cx,
                &mut this.up,
                up_buf,
                this.client,
                this.backend,
                &mut this.active,
                |n| stats.add_bytes_in(n),
            )
        };
        if let Poll::Ready(Err((read, e))) = up {
            return Poll::Ready(Err(if read {
                CopyError::Client(e)
            } else {
                CopyError::Backend(e)
            }));
        }
        let down = if this.down.done {
            Poll::Ready(Ok(()))
        } else {
            poll_half(
                cx,
                &mut this.down,
                down_buf,
                this.backend,
                this.client,
                &mut this.active,
                |n| stats.add_bytes_out(n),
            )
        };
        if let Poll::Ready(Err((read, e))) = down {
            return Poll::Ready(Err(if read {
                CopyError::Backend(e)
            } else {
                CopyError::Client(e)
            }));
        }
        if this.up.done && this.down.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}
