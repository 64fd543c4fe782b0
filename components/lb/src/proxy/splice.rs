//! Zero-copy primitives for Linux: a non-blocking pipe and `splice(2)`, so
//! bulk payload moves socket → pipe → socket without entering user space.
//! [`super::copy`] switches a direction to them once it carries bulk data.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes one splice into the pipe may move: the default pipe capacity
/// (16 pages), so a splice into an empty pipe never finds it full.
pub(crate) const PIPE_CHUNK: usize = 64 * 1024;

/// One direction's pipe.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Self> {
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

    /// Moves up to [`PIPE_CHUNK`] bytes from socket `from` into the pipe.
    pub(crate) fn fill_from(&self, from: &impl AsRawFd) -> io::Result<usize> {
        splice(from.as_raw_fd(), self.write.as_raw_fd(), PIPE_CHUNK)
    }

    /// Moves up to `len` bytes from the pipe into socket `to`.
    pub(crate) fn drain_into(&self, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), to.as_raw_fd(), len)
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
