//! The byte transformations between etcd's snapshot and the stored object:
//! zstd, then age, on the way in; age, then zstd, on the way out.
//!
//! Both directions are synchronous `Write`/`Read` chains run on a blocking
//! thread (compression and encryption are CPU work that must not stall the
//! async runtime), connected to async stages by bounded channels of
//! [`Bytes`]: the channel capacity is what bounds memory, and a full channel
//! is the backpressure that slows the etcd stream down to what the store
//! accepts.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use serde::{Deserialize, Serialize};

/// Compression of the stored object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "algorithm")]
pub enum Compression {
    /// Stored as etcd sent it.
    None,
    /// zstd: one or more concatenated frames, read as one stream
    /// (incompressible stretches are frames of raw blocks, see
    /// [`Adaptive`]).
    Zstd {
        /// zstd level used.
        level: i32,
    },
}

/// Encryption of the stored object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "scheme")]
pub enum Encryption {
    /// Not encrypted.
    None,
    /// age to one X25519 recipient.
    #[serde(rename = "age-x25519", rename_all = "camelCase")]
    AgeX25519 {
        /// Fingerprint of the recipient ([`crate::pipeline::encryption::KeyId`]).
        key_id: String,
    },
}

impl Encryption {
    /// The key id, when encrypted.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Encryption::None => None,
            Encryption::AgeX25519 { key_id } => Some(key_id),
        }
    }
}

/// Reusable byte buffers of one size.
///
/// Every byte of a snapshot passes through two buffers (a batch from etcd,
/// a chunk for the store). Allocating them fresh costs a page fault per
/// 4 KiB and, the buffers being mmapped (see [`crate::tune_allocator`]),
/// an munmap per buffer: measured, several hundred milliseconds of system
/// time per GB, more on a virtual machine whose freed memory goes back to
/// the host. The pipeline's buffers come from a pool instead and return to
/// it when their last reader is done, so the same few MiB are reused.
#[derive(Clone, Debug)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    free: Mutex<Vec<Vec<u8>>>,
    size: usize,
    keep: usize,
}

impl BufferPool {
    /// Buffers of `size` bytes; at most `keep` idle ones are kept.
    pub fn new(size: usize, keep: usize) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                free: Mutex::new(Vec::new()),
                size,
                keep,
            }),
        }
    }

    /// The buffers' size.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// An empty buffer with room for [`BufferPool::size`] bytes.
    pub fn take(&self) -> Vec<u8> {
        let reused = self
            .inner
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        reused.unwrap_or_else(|| Vec::with_capacity(self.inner.size))
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() < self.inner.size {
            return;
        }
        buf.clear();
        let mut free = self.inner.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.inner.keep {
            free.push(buf);
        }
    }

    /// `buf` as [`Bytes`] that go back to the pool when the last clone
    /// (including slices of it) is dropped.
    pub fn freeze(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// Collects output into chunks of the pool's buffer size and sends each
/// down a bounded channel, blocking while it is full.
pub struct ChunkSink {
    buf: Vec<u8>,
    pool: BufferPool,
    tx: mpsc::Sender<Bytes>,
}

impl ChunkSink {
    /// A sink sending chunks from `pool` to `tx`.
    pub fn new(tx: mpsc::Sender<Bytes>, pool: BufferPool) -> Self {
        Self {
            buf: pool.take(),
            pool,
            tx,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, self.pool.take());
        self.tx
            .blocking_send(self.pool.freeze(full))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload stage stopped"))
    }

    /// Sends what is left.
    pub fn finish(mut self) -> io::Result<()> {
        self.send()
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // Fill up to the chunk size and no further, so the buffer never
        // grows (a grown buffer is a fresh allocation).
        let room = self.pool.size() - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.pool.size() {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The encryption layer of the write chain.
pub enum Sealer<W: Write> {
    /// No encryption.
    Plain(W),
    /// age to one recipient.
    Age(age::stream::StreamWriter<W>),
}

impl<W: Write> Sealer<W> {
    /// Wraps `out`, encrypting to `recipient` when given.
    pub fn new(out: W, recipient: Option<&age::x25519::Recipient>) -> io::Result<Self> {
        match recipient {
            None => Ok(Sealer::Plain(out)),
            Some(r) => {
                let enc =
                    age::Encryptor::with_recipients(std::iter::once(r as &dyn age::Recipient))
                        .map_err(|e| io::Error::other(format!("age: {e}")))?;
                Ok(Sealer::Age(enc.wrap_output(out)?))
            }
        }
    }

    /// Writes age's final chunk; returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Sealer::Plain(w) => Ok(w),
            Sealer::Age(w) => w.finish(),
        }
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Sealer::Plain(w) => w.write(data),
            Sealer::Age(w) => w.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealer::Plain(w) => w.flush(),
            Sealer::Age(w) => w.flush(),
        }
    }
}

/// How much input one decision of [`Adaptive`] covers while compressing.
const WINDOW: u64 = 1 << 20;
/// The first stretch stored raw after an incompressible window.
const MIN_SKIP: u64 = 4 << 20;
/// The longest stretch stored raw before zstd is tried again.
const MAX_SKIP: u64 = 32 << 20;
/// A window whose zstd output exceeds this share of its input (in
/// percent) is incompressible: zstd saves too little to pay for its CPU.
const INCOMPRESSIBLE_PERCENT: u64 = 97;

/// What to do with the next bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Through zstd.
    Compress,
    /// As raw zstd blocks (a copy with a 3-byte header per 128 KiB).
    Store,
}

/// Decides, window by window, whether zstd is worth its CPU.
///
/// zstd on incompressible data (random values, already compressed or
/// encrypted content) still searches for matches and builds literal
/// statistics before it gives up and stores a raw block: about 0.35 s of
/// CPU per GiB at level 1, on a machine where etcd needs the same cores to
/// send the snapshot. So the encoder measures what zstd makes of each
/// [`WINDOW`] of input; a window that does not shrink below
/// [`INCOMPRESSIBLE_PERCENT`] switches to storing for [`MIN_SKIP`] bytes,
/// after which one window is compressed again as a probe. A probe that is
/// incompressible too doubles the stretch (up to [`MAX_SKIP`]); one that
/// compresses switches back for good. On random data zstd then sees about
/// one MiB in 33; compressible data never leaves zstd. The worst case,
/// compressible data right behind an incompressible window, is stored raw
/// for at most one stretch.
#[derive(Clone, Debug)]
pub struct Adaptive {
    mode: Mode,
    /// Bytes until the next decision.
    left: u64,
    /// Length of the next raw stretch.
    skip: u64,
    /// The current compress window is a probe after a raw stretch.
    probing: bool,
}

impl Default for Adaptive {
    fn default() -> Self {
        Self {
            mode: Mode::Compress,
            left: WINDOW,
            skip: MIN_SKIP,
            probing: false,
        }
    }
}

impl Adaptive {
    /// The mode for the next bytes and how many of `want` it covers
    /// before a decision is due.
    pub fn span(&self, want: usize) -> (Mode, usize) {
        let n = usize::try_from(self.left).unwrap_or(usize::MAX).min(want);
        (self.mode, n)
    }

    /// Counts `n` bytes done in the current mode; true when a decision is
    /// due.
    pub fn advance(&mut self, n: usize) -> bool {
        self.left -= n as u64;
        self.left == 0
    }

    /// Decides at the end of a window or stretch. `window_in` and
    /// `window_out` are what zstd was given and produced for a compress
    /// window (ignored after a raw stretch). Returns the next mode.
    pub fn decide(&mut self, window_in: u64, window_out: u64) -> Mode {
        match self.mode {
            Mode::Compress if window_out * 100 > window_in * INCOMPRESSIBLE_PERCENT => {
                self.skip = if self.probing {
                    (self.skip * 2).min(MAX_SKIP)
                } else {
                    MIN_SKIP
                };
                self.mode = Mode::Store;
                self.left = self.skip;
            }
            Mode::Compress => {
                self.probing = false;
                self.skip = MIN_SKIP;
                self.left = WINDOW;
            }
            Mode::Store => {
                self.mode = Mode::Compress;
                self.probing = true;
                self.left = WINDOW;
            }
        }
        self.mode
    }
}

/// A raw frame's header: zstd's magic number, then a frame header without content size, checksum or dictionary
/// (descriptor 0), and a 128 KiB window (exponent 7, mantissa 0): enough
/// for raw blocks, which reference nothing.
const RAW_FRAME_HEADER: [u8; 6] = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3];
/// The largest block zstd allows (and the raw frame's window).
const MAX_BLOCK: usize = 128 * 1024;
/// An empty raw block flagged last: how zstd itself ends a frame.
const LAST_EMPTY_RAW_BLOCK: [u8; 3] = [1, 0, 0];

/// The header of a raw block of `len` bytes (not the last one).
fn raw_block_header(len: usize) -> [u8; 3] {
    // Bit 0: last block (no); bits 1-2: block type (0, raw); bits 3-23: size.
    let h = u32::try_from(len).unwrap_or(0) << 3;
    let b = h.to_le_bytes();
    [b[0], b[1], b[2]]
}

/// Which frame the encoder is in the middle of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    None,
    Zstd,
    Raw,
}

/// The whole write chain: zstd into age (optional) into `W`.
///
/// The output is a sequence of zstd frames, which every zstd decoder reads
/// as one stream (`zstd -d` included): frames compressed by zstd, and,
/// where [`Adaptive`] finds the data incompressible, frames of raw blocks
/// written here directly, which cost a copy instead of a compression
/// attempt.
pub struct Encoder<W: Write> {
    zstd: zstd::stream::raw::Encoder<'static>,
    out: Sealer<W>,
    /// zstd's output before it goes to `out`, or, in a raw frame, input
    /// gathered into a full block (reused).
    staging: Vec<u8>,
    adaptive: Adaptive,
    frame: Frame,
    /// Input and output of the current compress window.
    window_in: u64,
    window_out: u64,
}

impl<W: Write> Encoder<W> {
    /// zstd at `level` with `workers` threads (0: this thread), sealing to
    /// `recipient` when given.
    pub fn new(
        out: W,
        level: i32,
        workers: u32,
        recipient: Option<&age::x25519::Recipient>,
    ) -> io::Result<Self> {
        use zstd::zstd_safe::CParameter;
        let out = Sealer::new(out, recipient)?;
        let mut zstd = zstd::stream::raw::Encoder::new(level)?;
        // Our own hashes cover integrity; zstd's checksum would only cost time.
        zstd.set_parameter(CParameter::ChecksumFlag(false))?;
        if workers > 0 {
            zstd.set_parameter(CParameter::NbWorkers(workers))?;
        }
        Ok(Self {
            zstd,
            out,
            staging: Vec::with_capacity(zstd::zstd_safe::CCtx::out_size()),
            adaptive: Adaptive::default(),
            frame: Frame::None,
            window_in: 0,
            window_out: 0,
        })
    }

    /// Writes what zstd put in `staging` to `out`.
    fn drain(&mut self) -> io::Result<()> {
        self.out.write_all(&self.staging)?;
        self.window_out += self.staging.len() as u64;
        self.staging.clear();
        Ok(())
    }

    /// Runs one zstd step that only produces output (flush or end) until
    /// zstd has nothing left.
    fn drive(&mut self, end: bool) -> io::Result<()> {
        use zstd::stream::raw::{Operation as _, OutBuffer};
        loop {
            let mut ob = OutBuffer::around(&mut self.staging);
            let left = if end {
                self.zstd.finish(&mut ob, true)?
            } else {
                self.zstd.flush(&mut ob)?
            };
            self.drain()?;
            if left == 0 {
                return Ok(());
            }
        }
    }

    fn end_frame(&mut self) -> io::Result<()> {
        match self.frame {
            Frame::None => {}
            Frame::Zstd => self.drive(true)?,
            Frame::Raw => {
                self.flush_raw()?;
                self.out.write_all(&LAST_EMPTY_RAW_BLOCK)?;
            }
        }
        self.frame = Frame::None;
        Ok(())
    }

    fn compress(&mut self, mut data: &[u8]) -> io::Result<()> {
        use zstd::stream::raw::{InBuffer, Operation as _, OutBuffer};
        if self.frame != Frame::Zstd {
            self.end_frame()?;
            self.frame = Frame::Zstd;
        }
        self.window_in += data.len() as u64;
        while !data.is_empty() {
            let mut ib = InBuffer::around(data);
            let mut ob = OutBuffer::around(&mut self.staging);
            self.zstd.run(&mut ib, &mut ob)?;
            let used = ib.pos();
            self.drain()?;
            data = &data[used..];
        }
        Ok(())
    }

    fn store(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.frame != Frame::Raw {
            self.end_frame()?;
            self.out.write_all(&RAW_FRAME_HEADER)?;
            self.frame = Frame::Raw;
        }
        // Full blocks go straight from the input (the pipeline writes
        // 256 KiB batches); smaller writes gather in `staging`, so that they
        // still make full-size blocks rather than a header per write.
        while !data.is_empty() {
            if self.staging.is_empty() && data.len() >= MAX_BLOCK {
                let (block, rest) = data.split_at(MAX_BLOCK);
                self.raw_block(block)?;
                data = rest;
            } else {
                let n = (MAX_BLOCK - self.staging.len()).min(data.len());
                self.staging.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.staging.len() == MAX_BLOCK {
                    self.flush_raw()?;
                }
            }
        }
        Ok(())
    }

    fn raw_block(&mut self, block: &[u8]) -> io::Result<()> {
        self.out.write_all(&raw_block_header(block.len()))?;
        self.out.write_all(block)
    }

    /// Writes the bytes gathered in `staging` as one raw block.
    fn flush_raw(&mut self) -> io::Result<()> {
        if self.staging.is_empty() {
            return Ok(());
        }
        let block = std::mem::take(&mut self.staging);
        let written = self.raw_block(&block);
        self.staging = block;
        self.staging.clear();
        written
    }

    /// The end of a compress window or raw stretch: measure and decide.
    fn decide(&mut self) -> io::Result<()> {
        if self.adaptive.mode == Mode::Compress {
            // Flush so that the window's output is all counted (zstd
            // otherwise holds up to a block back).
            self.drive(false)?;
        }
        self.adaptive.decide(self.window_in, self.window_out);
        self.window_in = 0;
        self.window_out = 0;
        Ok(())
    }

    /// Ends the last frame and the age stream; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if self.frame == Frame::None {
            // No input at all: still one (empty) zstd frame.
            self.frame = Frame::Zstd;
        }
        self.end_frame()?;
        self.out.finish()
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            let (mode, n) = self.adaptive.span(rest.len());
            match mode {
                Mode::Compress => self.compress(&rest[..n])?,
                Mode::Store => self.store(&rest[..n])?,
            }
            rest = &rest[n..];
            if self.adaptive.advance(n) {
                self.decide()?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.frame {
            Frame::None => {}
            Frame::Zstd => self.drive(false)?,
            Frame::Raw => self.flush_raw()?,
        }
        self.out.flush()
    }
}

/// Reads `Bytes` from a bounded channel as a byte stream. An `Err` item is
/// the download failing; the channel closing without [`Item::End`] is the
/// producer giving up.
pub struct ChannelReader {
    rx: mpsc::Receiver<Item>,
    current: Bytes,
    done: bool,
}

/// One message to a [`ChannelReader`].
pub enum Item {
    /// More bytes.
    Data(Bytes),
    /// The source failed.
    Error(String),
    /// The source is complete.
    End,
}

impl ChannelReader {
    /// A reader over `rx`.
    pub fn new(rx: mpsc::Receiver<Item>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
            done: false,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Item::Data(b)) => self.current = b,
                Some(Item::End) => self.done = true,
                Some(Item::Error(e)) => return Err(io::Error::other(SourceError(e))),
                None => {
                    return Err(io::Error::other(SourceError(
                        "the source stopped before the end".into(),
                    )));
                }
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        bytes::Buf::advance(&mut self.current, n);
        Ok(n)
    }
}

/// An error of the byte source (download), as opposed to decoding.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Which layer of the read chain failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// Reading the stored bytes.
    Source,
    /// age.
    Decrypt,
    /// zstd.
    Decompress,
}

/// Notes whether an error came out of the wrapped reader, so that an error
/// surfacing through zstd can be attributed to the layer that caused it.
struct Tagged<R> {
    inner: R,
    failed: Arc<AtomicBool>,
}

impl<R: Read> Read for Tagged<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.inner.read(out).inspect_err(|_| {
            self.failed.store(true, Ordering::Relaxed);
        })
    }
}

/// The read chain: stored bytes → age (when encrypted) → zstd (when
/// compressed) → etcd's bytes, with errors attributed to their layer.
pub struct Decoder {
    inner: Box<dyn Read + Send>,
    source_failed: Arc<AtomicBool>,
    decrypt_failed: Arc<AtomicBool>,
}

/// A read-chain error and the layer it came from.
#[derive(Debug)]
pub struct DecodeError {
    /// The failing layer.
    pub layer: Layer,
    /// What it said.
    pub error: io::Error,
}

impl Decoder {
    /// Opens the chain. Fails when the age header cannot be read or opened
    /// with `identity`.
    pub fn new(
        source: ChannelReader,
        compression: Compression,
        encryption: &Encryption,
        identity: Option<&age::x25519::Identity>,
    ) -> Result<Self, DecodeError> {
        let source_failed = Arc::new(AtomicBool::new(false));
        let decrypt_failed = Arc::new(AtomicBool::new(false));
        let src = Tagged {
            inner: source,
            failed: source_failed.clone(),
        };
        let classify = |e: io::Error, sf: &AtomicBool| DecodeError {
            layer: if sf.load(Ordering::Relaxed) {
                Layer::Source
            } else {
                Layer::Decrypt
            },
            error: e,
        };
        let plain: Box<dyn Read + Send> = match (encryption, identity) {
            (Encryption::None, _) => Box::new(src),
            (Encryption::AgeX25519 { .. }, Some(id)) => {
                let d = age::Decryptor::new(src).map_err(|e| {
                    classify(
                        io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                        &source_failed,
                    )
                })?;
                let r = d
                    .decrypt(std::iter::once(id as &dyn age::Identity))
                    .map_err(|e| {
                        classify(
                            io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                            &source_failed,
                        )
                    })?;
                Box::new(Tagged {
                    inner: r,
                    failed: decrypt_failed.clone(),
                })
            }
            (Encryption::AgeX25519 { key_id }, None) => {
                return Err(DecodeError {
                    layer: Layer::Decrypt,
                    error: io::Error::other(format!("no identity for key {key_id}")),
                });
            }
        };
        let inner: Box<dyn Read + Send> = match compression {
            Compression::None => plain,
            Compression::Zstd { .. } => Box::new(zstd::stream::read::Decoder::new(plain).map_err(
                |e| DecodeError {
                    layer: Layer::Decompress,
                    error: e,
                },
            )?),
        };
        Ok(Self {
            inner,
            source_failed,
            decrypt_failed,
        })
    }

    /// Reads decoded bytes; an error names its layer.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, DecodeError> {
        self.inner.read(out).map_err(|error| DecodeError {
            layer: if self.source_failed.load(Ordering::Relaxed) {
                Layer::Source
            } else if self.decrypt_failed.load(Ordering::Relaxed) {
                Layer::Decrypt
            } else {
                Layer::Decompress
            },
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes `data` on a blocking thread and collects the output.
    fn encode(data: &[u8], recipient: Option<&age::x25519::Recipient>) -> Vec<u8> {
        let (tx, mut rx) = mpsc::channel(100_000);
        let sink = ChunkSink::new(tx, BufferPool::new(1000, 4));
        let mut enc = Encoder::new(sink, 3, 0, recipient).unwrap();
        for piece in data.chunks(777) {
            enc.write_all(piece).unwrap();
        }
        enc.finish().unwrap().finish().unwrap();
        let mut out = Vec::new();
        while let Ok(b) = rx.try_recv() {
            out.extend_from_slice(&b);
        }
        out
    }

    fn decode(
        stored: &[u8],
        compression: Compression,
        encryption: &Encryption,
        identity: Option<&age::x25519::Identity>,
    ) -> Result<Vec<u8>, DecodeError> {
        let (tx, rx) = mpsc::channel(stored.len() / 500 + 2);
        for piece in stored.chunks(500) {
            tx.try_send(Item::Data(Bytes::copy_from_slice(piece)))
                .unwrap();
        }
        tx.try_send(Item::End).unwrap();
        let mut d = Decoder::new(ChannelReader::new(rx), compression, encryption, identity)?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = d.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    fn decode_plain(stored: &[u8]) -> Vec<u8> {
        decode(
            stored,
            Compression::Zstd { level: 1 },
            &Encryption::None,
            None,
        )
        .unwrap()
    }

    /// Deterministic incompressible bytes (xorshift).
    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// JSON-like lines: compress several times.
    fn text(n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 100);
        let mut i = 0u64;
        while out.len() < n {
            out.extend_from_slice(
                format!(
                    "{{\"kind\":\"ConfigMap\",\"name\":\"cm-{i}\",\"rv\":\"{}\"}}\n",
                    i * 7919 % 100_003
                )
                .as_bytes(),
            );
            i += 1;
        }
        out.truncate(n);
        out
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn adaptive_stores_incompressible_stretches_and_backs_off() {
        let mut a = Adaptive::default();
        assert_eq!(a.span(10 << 20), (Mode::Compress, WINDOW as usize));
        // A window that does not shrink: store MIN_SKIP bytes.
        assert!(a.advance(WINDOW as usize));
        assert_eq!(a.decide(WINDOW, WINDOW + 40), Mode::Store);
        assert_eq!(a.span(usize::MAX), (Mode::Store, MIN_SKIP as usize));
        // Spans stop at the decision point, whatever the write sizes.
        assert!(!a.advance(1000));
        assert_eq!(a.span(usize::MAX), (Mode::Store, MIN_SKIP as usize - 1000));
        assert!(a.advance(MIN_SKIP as usize - 1000));
        // After the stretch, one probe window through zstd.
        assert_eq!(a.decide(0, 0), Mode::Compress);
        assert_eq!(a.span(usize::MAX), (Mode::Compress, WINDOW as usize));
        // Failed probes double the stretch up to MAX_SKIP.
        let mut stretches = Vec::new();
        for _ in 0..8 {
            a.advance(WINDOW as usize);
            assert_eq!(a.decide(WINDOW, WINDOW), Mode::Store);
            stretches.push(a.span(usize::MAX).1 as u64 >> 20);
            a.advance(a.span(usize::MAX).1);
            assert_eq!(a.decide(0, 0), Mode::Compress);
        }
        assert_eq!(stretches, [8, 16, 32, 32, 32, 32, 32, 32]);
        // A probe that compresses ends it: compress window after window.
        a.advance(WINDOW as usize);
        assert_eq!(a.decide(WINDOW, WINDOW / 4), Mode::Compress);
        a.advance(WINDOW as usize);
        assert_eq!(a.decide(WINDOW, WINDOW / 3), Mode::Compress);
        // The next incompressible window starts again at MIN_SKIP.
        a.advance(WINDOW as usize);
        assert_eq!(a.decide(WINDOW, WINDOW), Mode::Store);
        assert_eq!(a.span(usize::MAX).1 as u64, MIN_SKIP);
        // The threshold: 97 % still stores, 96 % compresses.
        let mut b = Adaptive::default();
        b.advance(WINDOW as usize);
        assert_eq!(b.decide(100, 97), Mode::Compress);
        let mut c = Adaptive::default();
        c.advance(WINDOW as usize);
        assert_eq!(c.decide(100, 98), Mode::Store);
    }

    #[test]
    fn raw_block_headers_follow_the_zstd_format() {
        // Size 0x1_2345 in bits 3..24, type raw (0), not last.
        let h = raw_block_header(0x1_2345);
        let v = u32::from_le_bytes([h[0], h[1], h[2], 0]);
        assert_eq!(v & 1, 0);
        assert_eq!((v >> 1) & 3, 0);
        assert_eq!(v >> 3, 0x1_2345);
        assert_eq!(raw_block_header(MAX_BLOCK), [0, 0, 0x10]);
    }

    #[test]
    fn incompressible_data_is_stored_raw_and_round_trips() {
        let input = random(12 << 20, 7);
        let stored = encode(&input, None);
        // Stored raw except the first window and one probe: barely larger
        // than the input, and most of it in raw frames.
        assert!(stored.len() < input.len() + 4096, "{}", stored.len());
        assert!(count(&stored, &RAW_FRAME_HEADER) >= 2);
        assert_eq!(decode_plain(&stored), input);
        // With age, the same bytes come back (6 MiB: one window, then a
        // raw stretch; age is slow in debug builds).
        let input = &input[..6 << 20];
        let id = age::x25519::Identity::generate();
        let sealed = encode(input, Some(&id.to_public()));
        let enc = Encryption::AgeX25519 { key_id: "k".into() };
        let z = Compression::Zstd { level: 1 };
        assert_eq!(decode(&sealed, z, &enc, Some(&id)).unwrap(), input);
    }

    #[test]
    fn compressible_data_stays_in_one_zstd_frame() {
        let input = text(12 << 20);
        let stored = encode(&input, None);
        assert!(stored.len() < input.len() / 4, "{}", stored.len());
        assert_eq!(count(&stored, &RAW_FRAME_HEADER), 0);
        assert_eq!(decode_plain(&stored), input);
    }

    #[test]
    fn mixed_data_switches_both_ways_and_round_trips() {
        // Random, then text, then random, then text: frames of both kinds.
        // Windows: random 0-1 compressed, 1-5 raw, 5-6 probe, 6-14 raw
        // (text, the worst case: stored for one stretch), 14-22 text
        // compressed, 22-23 random, 23-27 raw, 27-34 text compressed.
        let mut input = random(6 << 20, 1);
        input.extend(text(16 << 20));
        input.extend(random(3 << 20, 2));
        input.extend(text(9 << 20));
        let stored = encode(&input, None);
        assert_eq!(count(&stored, &RAW_FRAME_HEADER), 3);
        // 19 MiB raw or random, 15 MiB of text compressed.
        assert!(stored.len() < 24 << 20, "{}", stored.len());
        assert!(stored.len() > 19 << 20, "{}", stored.len());
        assert_eq!(decode_plain(&stored), input);
        // Empty input is still a valid (empty) stream.
        assert_eq!(decode_plain(&encode(&[], None)), Vec::<u8>::new());
    }

    #[test]
    fn pooled_buffers_come_back_when_their_bytes_are_dropped() {
        let pool = BufferPool::new(64, 2);
        let mut a = pool.take();
        a.extend_from_slice(b"hello");
        let ptr = a.as_ptr();
        let bytes = pool.freeze(a);
        let slice = bytes.slice(1..3);
        drop(bytes);
        assert_eq!(&slice[..], b"el");
        // Still referenced by the slice: not back yet.
        let fresh = pool.take();
        assert_ne!(fresh.as_ptr(), ptr);
        drop(fresh);
        drop(slice);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty() && again.capacity() >= 64);
        // At most `keep` idle buffers are kept.
        for _ in 0..5 {
            pool.give(Vec::with_capacity(64));
        }
        assert_eq!(pool.inner.free.lock().unwrap().len(), 2);
    }

    fn data() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trip_plain_and_encrypted() {
        let z = Compression::Zstd { level: 3 };
        let plain = encode(&data(), None);
        assert_eq!(&plain[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        assert_eq!(decode(&plain, z, &Encryption::None, None).unwrap(), data());

        let id = age::x25519::Identity::generate();
        let sealed = encode(&data(), Some(&id.to_public()));
        assert!(sealed.starts_with(b"age-encryption.org/v1\n"));
        assert!(!sealed.windows(4).any(|w| w == [0x28, 0xb5, 0x2f, 0xfd]));
        let enc = Encryption::AgeX25519 { key_id: "k".into() };
        assert_eq!(decode(&sealed, z, &enc, Some(&id)).unwrap(), data());
    }

    #[test]
    fn errors_name_their_layer() {
        let z = Compression::Zstd { level: 3 };
        let id = age::x25519::Identity::generate();
        let enc = Encryption::AgeX25519 { key_id: "k".into() };
        let sealed = encode(&data(), Some(&id.to_public()));

        // The wrong identity fails when opening the header.
        let other = age::x25519::Identity::generate();
        let e = decode(&sealed, z, &enc, Some(&other)).unwrap_err();
        assert_eq!(e.layer, Layer::Decrypt);

        // A flipped ciphertext byte fails authentication.
        let mut bad = sealed.clone();
        let i = bad.len() / 2;
        bad[i] ^= 1;
        assert_eq!(
            decode(&bad, z, &enc, Some(&id)).unwrap_err().layer,
            Layer::Decrypt
        );

        // Truncated ciphertext: the last chunk is missing.
        let cut = &sealed[..sealed.len() - 100];
        assert_eq!(
            decode(cut, z, &enc, Some(&id)).unwrap_err().layer,
            Layer::Decrypt
        );

        // Unencrypted: a truncated zstd frame is a decompression error.
        let plain = encode(&data(), None);
        let cut = &plain[..plain.len() / 2];
        assert_eq!(
            decode(cut, z, &Encryption::None, None).unwrap_err().layer,
            Layer::Decompress
        );

        // The source failing is the source's fault.
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Item::Data(Bytes::copy_from_slice(&plain[..100])))
            .unwrap();
        tx.try_send(Item::Error("connection reset".into())).unwrap();
        let mut d = Decoder::new(ChannelReader::new(rx), z, &Encryption::None, None).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let err = loop {
            match d.read(&mut buf) {
                Ok(0) => panic!("must fail"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.layer, Layer::Source);
    }
}
