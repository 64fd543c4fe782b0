//! Copy buffers lent by the data-path thread, for as long as a direction
//! holds bytes.
//!
//! A connection that waits for its peer (an idle watch, a keep-alive
//! client between requests) holds no buffer: [`super::copy`] borrows one
//! when a socket becomes readable and gives it back once everything it
//! read is written and the next read would block. So memory follows the
//! bytes in flight, not the connections open (two buffers of
//! `proxy.bufferSize` per connection for its whole life before: 32 MiB
//! per thousand idle watches with the default 16 KiB), a new connection
//! neither allocates nor zeroes its buffers, and each thread cycles
//! through the few buffers that are warm in its cache.
//!
//! Each data-path thread runs one single-threaded runtime and a
//! connection lives its whole life on it ([`super::workers`]), so the pool
//! is thread-local and needs no lock. A buffer dropped on another thread
//! only joins that thread's pool.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Free buffers a thread keeps for reuse; more are freed.
const KEPT: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of one size, back in this thread's pool when dropped.
pub(crate) struct Buffer(Box<[u8]>);

impl Buffer {
    /// A buffer of `size` bytes: the thread's most recently freed one of
    /// that size, else a new one.
    pub(crate) fn take(size: usize) -> Self {
        let reused = FREE.with(|free| {
            let mut free = free.borrow_mut();
            match free.last() {
                Some(b) if b.len() == size => free.pop(),
                _ => None,
            }
        });
        Self(reused.unwrap_or_else(|| vec![0u8; size].into_boxed_slice()))
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        // A buffer dropped while the thread's pool is being torn down (the
        // thread is ending) is simply freed.
        let _ = FREE.try_with(|free| {
            let mut free = free.borrow_mut();
            // One size per pool (a thread serves one listener): a buffer of
            // another size, or one beyond the bound, is freed.
            if free.len() < KEPT && free.first().is_none_or(|b| b.len() == buf.len()) {
                free.push(buf);
            }
        });
    }
}

impl Deref for Buffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// Free buffers in this thread's pool.
#[cfg(test)]
pub(crate) fn pooled() -> usize {
    FREE.with(|f| f.borrow().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_lent_again() {
        let mut first = Buffer::take(1024);
        first[0] = 7;
        let address = first.as_ptr();
        drop(first);
        assert_eq!(pooled(), 1);
        let again = Buffer::take(1024);
        assert_eq!(again.as_ptr(), address, "the freed buffer is reused");
        assert_eq!(again.len(), 1024);
        assert_eq!(pooled(), 0);
    }

    #[test]
    fn another_size_is_allocated_and_not_kept() {
        drop(Buffer::take(1024));
        let other = Buffer::take(2048);
        assert_eq!(other.len(), 2048);
        assert_eq!(pooled(), 1, "the 1 KiB buffer stays for its size");
        drop(other);
        assert_eq!(pooled(), 1, "a 2 KiB buffer does not join a 1 KiB pool");
    }

    #[test]
    fn the_pool_keeps_a_bounded_number() {
        let many: Vec<Buffer> = (0..KEPT + 10).map(|_| Buffer::take(512)).collect();
        drop(many);
        assert_eq!(pooled(), KEPT);
    }
}
