//! SHA-256 on the fly: etcd's trailing hash and the stored object's hash.
//!
//! etcd's `Maintenance.Snapshot` stream ends with 32 bytes that are the
//! SHA-256 of every byte before them (`etcdutl snapshot restore` checks the
//! same trailer). The stream does not mark where the trailer starts, so
//! [`TrailerVerifier`] holds back the last 32 bytes seen and hashes the rest
//! as it goes; at the end, what it holds back must equal the digest. Memory
//! stays at 32 bytes whatever the snapshot size.

use ring::digest;

/// Length of a SHA-256 digest, and of etcd's snapshot trailer.
pub const SHA256_LEN: usize = 32;

/// Lowercase hex, as `sha256sum` prints digests.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// An incremental SHA-256 that also counts bytes.
#[derive(Clone)]
pub struct Sha256 {
    ctx: digest::Context,
    len: u64,
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    /// An empty hash.
    pub fn new() -> Self {
        Self {
            ctx: digest::Context::new(&digest::SHA256),
            len: 0,
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.ctx.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest as lowercase hex, and the byte count.
    pub fn finish_hex(self) -> (String, u64) {
        (hex(self.ctx.finish().as_ref()), self.len)
    }
}

/// What [`TrailerVerifier::finish`] found wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrailerError {
    /// Fewer than 32 bytes arrived: no trailer at all.
    #[error("stream ended after {0} bytes, too short to carry etcd's 32-byte SHA-256 trailer")]
    Short(u64),
    /// The trailer is not the SHA-256 of the data.
    #[error("etcd's trailer says {expected} but the data hashes to {actual}")]
    Mismatch {
        /// The trailer etcd sent.
        expected: String,
        /// The SHA-256 of the data before it.
        actual: String,
    },
}

/// Checks etcd's trailing SHA-256 while the stream passes through.
pub struct TrailerVerifier {
    hash: Sha256,
    held: [u8; SHA256_LEN],
    held_len: usize,
}

impl Default for TrailerVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl TrailerVerifier {
    /// A verifier at the start of a stream.
    pub fn new() -> Self {
        Self {
            hash: Sha256::new(),
            held: [0; SHA256_LEN],
            held_len: 0,
        }
    }

    /// Feeds the next chunk. Every byte is hashed except the last 32 seen
    /// so far, which are held back: they may be the trailer.
    pub fn update(&mut self, chunk: &[u8]) {
        if chunk.len() >= SHA256_LEN {
            // The previously held bytes are certainly data now.
            self.hash.update(&self.held[..self.held_len]);
            let (data, tail) = chunk.split_at(chunk.len() - SHA256_LEN);
            self.hash.update(data);
            self.held.copy_from_slice(tail);
            self.held_len = SHA256_LEN;
        } else {
            // Slide: the oldest held bytes that no longer fit are data.
            let total = self.held_len + chunk.len();
            let overflow = total.saturating_sub(SHA256_LEN);
            if overflow > 0 {
                self.hash.update(&self.held[..overflow]);
                self.held.copy_within(overflow..self.held_len, 0);
                self.held_len -= overflow;
            }
            self.held[self.held_len..self.held_len + chunk.len()].copy_from_slice(chunk);
            self.held_len += chunk.len();
        }
    }

    /// Total bytes fed, trailer included.
    pub fn total_len(&self) -> u64 {
        self.hash.len() + self.held_len as u64
    }

    /// Checks the trailer. Returns etcd's digest (hex) and the total length
    /// including the trailer.
    pub fn finish(self) -> Result<(String, u64), TrailerError> {
        let total = self.total_len();
        if self.held_len < SHA256_LEN {
            return Err(TrailerError::Short(total));
        }
        let expected = hex(&self.held);
        let (actual, _) = self.hash.finish_hex();
        if expected == actual {
            Ok((expected, total))
        } else {
            Err(TrailerError::Mismatch { expected, actual })
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn with_trailer(data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        out.extend_from_slice(digest::digest(&digest::SHA256, data).as_ref());
        out
    }

    fn feed(stream: &[u8], cuts: &[usize]) -> Result<(String, u64), TrailerError> {
        let mut v = TrailerVerifier::new();
        let mut at = 0;
        for &c in cuts {
            let end = (at + c).min(stream.len());
            v.update(&stream[at..end]);
            at = end;
        }
        v.update(&stream[at..]);
        v.finish()
    }

    #[test]
    fn hex_matches_sha256sum() {
        let (h, n) = Sha256::new().finish_hex();
        assert_eq!(
            h,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(n, 0);
    }

    #[test]
    fn short_and_empty_streams_fail() {
        assert_eq!(feed(&[], &[]), Err(TrailerError::Short(0)));
        assert_eq!(feed(&[1; 31], &[5, 5]), Err(TrailerError::Short(31)));
    }

    #[test]
    fn a_flipped_bit_is_a_mismatch() {
        let mut s = with_trailer(b"bbolt pages");
        s[3] ^= 1;
        assert!(matches!(feed(&s, &[4]), Err(TrailerError::Mismatch { .. })));
    }

    proptest! {
        // Whatever the chunking, a stream with a correct trailer verifies and
        // one with any single byte changed does not.
        #[test]
        fn any_chunking_verifies(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in proptest::collection::vec(0usize..70, 0..20),
            flip in any::<prop::sample::Index>(),
        ) {
            let stream = with_trailer(&data);
            let (h, n) = feed(&stream, &cuts).unwrap();
            prop_assert_eq!(n, stream.len() as u64);
            prop_assert_eq!(h, hex(&stream[data.len()..]));

            let mut bad = stream.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 0x80;
            let is_mismatch = matches!(feed(&bad, &cuts), Err(TrailerError::Mismatch { .. }));
            prop_assert!(is_mismatch);
        }
    }
}
