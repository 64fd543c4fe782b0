//! Zero-copy forwarding on Linux: `splice(2)` from one socket into a pipe
//! and from the pipe into the other socket, so payload bytes never enter
//! user space. Same contract as the buffered copy (half-close, counting,
//! activity); chosen with `proxy.splice: true`.
//!
//! Each direction owns a pipe. Data goes into the pipe only when it is
//! empty, so an `EAGAIN` from the socket-to-pipe splice always means "the
//! socket has nothing" (never "the pipe is full") and clearing the socket's
//! read readiness is correct.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::conn::Forward;
use super::copy::{CopyError, reset_peer_of};
use crate::backends::BackendStats;

/// Bytes one splice may move: the default pipe capacity (16 pages).
const PIPE_CHUNK: usize = 64 * 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two descriptors for the kernel
        // to fill; on success both are open and owned by nobody else.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are fresh and ours.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Self { read, write })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (the
    // caller borrows their owners); null offsets are valid for sockets and
    // pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[derive(Default)]
struct Half {
    in_pipe: usize,
    eof: bool,
    done: bool,
}

/// Spliced bidirectional forwarding.
pub(super) struct Splice<'a> {
    client: &'a mut TcpStream,
    backend: &'a mut TcpStream,
    stats: &'a BackendStats,
    up_pipe: Pipe,
    down_pipe: Pipe,
    up: Half,
    down: Half,
    active: bool,
}

impl<'a> Splice<'a> {
    pub(super) fn new(
        client: &'a mut TcpStream,
        backend: &'a mut TcpStream,
        stats: &'a BackendStats,
    ) -> io::Result<Self> {
        Ok(Self {
            client,
            backend,
            stats,
            up_pipe: Pipe::new()?,
            down_pipe: Pipe::new()?,
            up: Half::default(),
            down: Half::default(),
            active: false,
        })
    }
}

/// Moves one direction forward; `Err((true, _))` is a read-side error.
fn poll_half(
    cx: &mut Context<'_>,
    h: &mut Half,
    pipe: &Pipe,
    from: &TcpStream,
    to: &TcpStream,
    active: &mut bool,
    mut count: impl FnMut(u64),
) -> Poll<Result<(), (bool, io::Error)>> {
    loop {
        if h.in_pipe == 0 && !h.eof {
            ready!(from.poll_read_ready(cx)).map_err(|e| (true, e))?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_CHUNK)
            }) {
                Ok(0) => h.eof = true,
                Ok(n) => h.in_pipe = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err((true, e))),
            }
        }
        while h.in_pipe > 0 {
            ready!(to.poll_write_ready(cx)).map_err(|e| (false, e))?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), h.in_pipe)
            }) {
                Ok(0) => return Poll::Ready(Err((false, io::ErrorKind::WriteZero.into()))),
                Ok(n) => {
                    h.in_pipe -= n;
                    *active = true;
                    count(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err((false, e))),
            }
        }
        if h.eof {
            socket2::SockRef::from(to)
                .shutdown(std::net::Shutdown::Write)
                .map_err(|e| (false, e))?;
            h.done = true;
            return Poll::Ready(Ok(()));
        }
    }
}

impl Future for Splice<'_> {
    type Output = Result<(), CopyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let stats = this.stats;
        if !this.up.done
            && let Poll::Ready(Err((read, e))) = poll_half(
                cx,
                &mut this.up,
                &this.up_pipe,
                this.client,
                this.backend,
                &mut this.active,
                |n| stats.add_bytes_in(n),
            )
        {
            return Poll::Ready(Err(if read {
                CopyError::Client(e)
            } else {
                CopyError::Backend(e)
            }));
        }
        if !this.down.done
            && let Poll::Ready(Err((read, e))) = poll_half(
                cx,
                &mut this.down,
                &this.down_pipe,
                this.backend,
                this.client,
                &mut this.active,
                |n| stats.add_bytes_out(n),
            )
        {
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

impl Forward for Splice<'_> {
    fn take_activity(&mut self) -> bool {
        std::mem::take(&mut self.active)
    }
    fn reset_peer_of(&mut self, failed: &CopyError) {
        reset_peer_of(self.client, self.backend, failed);
    }
}
