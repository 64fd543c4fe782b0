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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::manifest::{Compression, Encryption};

/// Collects output into chunks of about `chunk` bytes and sends each down
/// a bounded channel, blocking while it is full.
pub struct ChunkSink {
    buf: BytesMut,
    chunk: usize,
    tx: mpsc::Sender<Bytes>,
}

impl ChunkSink {
    /// A sink sending chunks of `chunk` bytes to `tx`.
    pub fn new(tx: mpsc::Sender<Bytes>, chunk: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(chunk),
            chunk,
            tx,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let out = self.buf.split().freeze();
        self.buf.reserve(self.chunk);
        self.tx
            .blocking_send(out)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload stage stopped"))
    }

    /// Sends what is left.
    pub fn finish(mut self) -> io::Result<()> {
        self.send()
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.chunk {
            self.send()?;
        }
        Ok(data.len())
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

/// The whole write chain: zstd into age (optional) into `W`.
pub struct Encoder<W: Write> {
    zstd: zstd::stream::write::Encoder<'static, Sealer<W>>,
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
        let sealer = Sealer::new(out, recipient)?;
        let mut zstd = zstd::stream::write::Encoder::new(sealer, level)?;
        // Our own hashes cover integrity; zstd's checksum would only cost time.
        zstd.include_checksum(false)?;
        if workers > 0 {
            zstd.multithread(workers)?;
        }
        Ok(Self { zstd })
    }

    /// Ends the zstd frame and the age stream; returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        self.zstd.finish()?.finish()
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.zstd.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.zstd.flush()
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
        let (tx, mut rx) = mpsc::channel(1024);
        let sink = ChunkSink::new(tx, 1000);
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
        let (tx, rx) = mpsc::channel(1024);
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
