//! Client-side encryption keys: age X25519 recipients and identities.
//!
//! Snapshots are encrypted with [age](https://age-encryption.org/v1) to one
//! X25519 recipient (a public key). Why age and not our own AES-256-GCM
//! framing (docs/BACKUP.md has the long form):
//!
//! - it is a reviewed, specified format whose payload is already a STREAM
//!   construction (ChaCha20-Poly1305 over 64 KiB chunks, the last chunk
//!   flagged), so truncation and reordering are detected, and memory stays
//!   at one chunk whatever the size;
//! - it is asymmetric: a node that only takes backups needs the public
//!   recipient, never the secret identity; only verification, drills and
//!   restores need an identity;
//! - an operator can decrypt a backup with the stock `age` CLI and
//!   decompress it with `zstd` on a machine that has neither bulwark nor
//!   network access: `age -d -i key.txt snapshot.db.zst.age | zstd -d`.
//!
//! Keys rotate by id: the manifest records the id of the recipient a
//! snapshot was encrypted to ([`KeyId`], a fingerprint of the public key),
//! and readers pick the identity with that id among all configured ones.
//! Configure the new recipient and keep the old identities until the last
//! snapshot encrypted to them has been deleted.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::x25519;

use crate::error::{BackupError, Result};
use crate::pipeline::hashing::Sha256;

/// Fingerprint of an age X25519 recipient: `age-x25519:` and the first 16
/// hex digits of the SHA-256 of its `age1…` text. Names a key without
/// revealing it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// The id of `recipient`.
    pub fn of(recipient: &x25519::Recipient) -> Self {
        let mut h = Sha256::new();
        h.update(recipient.to_string().as_bytes());
        let (hex, _) = h.finish_hex();
        KeyId(format!("age-x25519:{}", &hex[..16]))
    }

    /// The id as written in manifests.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The keys this instance has: at most one recipient to encrypt new
/// snapshots to, and any number of identities to read old ones.
#[derive(Clone, Default)]
pub struct Keyring {
    recipient: Option<(KeyId, x25519::Recipient)>,
    identities: Vec<(KeyId, x25519::Identity)>,
}

impl fmt::Debug for Keyring {
    // Never print secret keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("recipient", &self.recipient.as_ref().map(|(id, _)| id))
            .field(
                "identities",
                &self.identities.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One key line of a key file.
enum KeyLine {
    Recipient(x25519::Recipient),
    Identity(Box<x25519::Identity>),
}

fn read_key_file(field: &str, path: &Path) -> Result<Vec<KeyLine>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BackupError::Key(format!("{field}: cannot read {}: {e}", path.display())))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            BackupError::Key(format!(
                "{field}: {} line {}: invalid age {what}: {e}",
                path.display(),
                n + 1
            ))
        };
        if line.starts_with("AGE-SECRET-KEY-1") {
            let id = x25519::Identity::from_str(line).map_err(|e| invalid("identity", &e))?;
            keys.push(KeyLine::Identity(Box::new(id)));
        } else if line.starts_with("age1") {
            let r = x25519::Recipient::from_str(line).map_err(|e| invalid("recipient", &e))?;
            keys.push(KeyLine::Recipient(r));
        } else {
            return Err(BackupError::Key(format!(
                "{field}: {} line {}: expected an age X25519 recipient (age1…) or identity \
                 (AGE-SECRET-KEY-1…), as `age-keygen` writes them",
                path.display(),
                n + 1
            )));
        }
    }
    if keys.is_empty() {
        return Err(BackupError::Key(format!(
            "{field}: {} holds no age key",
            path.display()
        )));
    }
    Ok(keys)
}

impl Keyring {
    /// No encryption, no identities.
    pub fn none() -> Self {
        Self::default()
    }

    /// Loads the recipient file (an `age1…` public key, or an identity whose
    /// public key is used) and the identity files (`age-keygen` output, one
    /// or more `AGE-SECRET-KEY-1…` lines each). An identity in the recipient
    /// file is also usable for reading.
    pub fn load(recipient_file: Option<&Path>, identity_files: &[PathBuf]) -> Result<Self> {
        let mut ring = Keyring::default();
        if let Some(path) = recipient_file {
            let mut keys = read_key_file("encryption.recipientFile", path)?;
            if keys.len() != 1 {
                return Err(BackupError::Key(format!(
                    "encryption.recipientFile: {} holds {} keys; expected exactly one \
                     (new snapshots are encrypted to one recipient)",
                    path.display(),
                    keys.len()
                )));
            }
            let recipient = match keys.remove(0) {
                KeyLine::Recipient(r) => r,
                KeyLine::Identity(id) => {
                    let r = id.to_public();
                    ring.identities.push((KeyId::of(&r), *id));
                    r
                }
            };
            ring.recipient = Some((KeyId::of(&recipient), recipient));
        }
        for (i, path) in identity_files.iter().enumerate() {
            let field = format!("encryption.identityFiles[{i}]");
            for key in read_key_file(&field, path)? {
                match key {
                    KeyLine::Identity(id) => {
                        let key_id = KeyId::of(&id.to_public());
                        if !ring.identities.iter().any(|(k, _)| *k == key_id) {
                            ring.identities.push((key_id, *id));
                        }
                    }
                    KeyLine::Recipient(_) => {
                        return Err(BackupError::Key(format!(
                            "{field}: {} holds a public recipient (age1…); identity files \
                             must hold secret keys (AGE-SECRET-KEY-1…)",
                            path.display()
                        )));
                    }
                }
            }
        }
        Ok(ring)
    }

    /// The recipient new snapshots are encrypted to, when encryption is on.
    pub fn recipient(&self) -> Option<(&KeyId, &x25519::Recipient)> {
        self.recipient.as_ref().map(|(id, r)| (id, r))
    }

    /// Ids of the identities available for reading.
    pub fn identity_ids(&self) -> Vec<&KeyId> {
        self.identities.iter().map(|(id, _)| id).collect()
    }

    /// The identity with `key_id`, or a [`BackupError::Key`] naming the
    /// ids that are configured.
    pub fn identity(&self, key_id: &str) -> Result<&x25519::Identity> {
        self.identities
            .iter()
            .find(|(id, _)| id.as_str() == key_id)
            .map(|(_, identity)| identity)
            .ok_or_else(|| {
                let have: Vec<&str> = self.identities.iter().map(|(id, _)| id.as_str()).collect();
                BackupError::Key(format!(
                    "the snapshot is encrypted to key {key_id}, but no configured identity has \
                     that id (configured: {}); add the matching file to encryption.identityFiles",
                    if have.is_empty() {
                        "none".to_owned()
                    } else {
                        have.join(", ")
                    }
                ))
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};

    use age::secrecy::ExposeSecret;

    use super::*;

    /// Writes a fresh identity file (as `age-keygen` would) into `dir`.
    pub(crate) fn write_identity(dir: &Path, name: &str) -> PathBuf {
        let id = x25519::Identity::generate();
        let path = dir.join(name);
        let text = format!(
            "# created: test\n# public key: {}\n{}\n",
            id.to_public(),
            id.to_string().expose_secret()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn recipient_from_identity_file_can_also_read() {
        let dir = tempfile::tempdir().unwrap();
        let key = write_identity(dir.path(), "k.txt");
        let ring = Keyring::load(Some(&key), &[]).unwrap();
        let (id, recipient) = ring.recipient().unwrap();
        assert!(id.as_str().starts_with("age-x25519:"));
        assert_eq!(id.as_str().len(), "age-x25519:".len() + 16);

        // Round trip through age with the id-selected identity.
        let enc = age::Encryptor::with_recipients(std::iter::once(recipient as _)).unwrap();
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).unwrap();
        w.write_all(b"secret").unwrap();
        w.finish().unwrap();
        let identity = ring.identity(id.as_str()).unwrap();
        let dec = age::Decryptor::new(&out[..]).unwrap();
        let mut r = dec.decrypt(std::iter::once(identity as _)).unwrap();
        let mut plain = Vec::new();
        r.read_to_end(&mut plain).unwrap();
        assert_eq!(plain, b"secret");
    }

    #[test]
    fn public_only_recipient_cannot_read_and_says_which_key_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let key = write_identity(dir.path(), "k.txt");
        let other = write_identity(dir.path(), "other.txt");
        let public = dir.path().join("pub.txt");
        let full = Keyring::load(Some(&key), &[]).unwrap();
        let (id, r) = full.recipient().unwrap();
        std::fs::write(&public, format!("{r}\n")).unwrap();

        let ring = Keyring::load(Some(&public), &[other]).unwrap();
        assert_eq!(ring.recipient().unwrap().0, id);
        let err = match ring.identity(id.as_str()) {
            Ok(_) => panic!("a public-only keyring must not find an identity"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(id.as_str()), "{err}");
        assert!(err.contains("configured: age-x25519:"), "{err}");
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.txt");
        let err = Keyring::load(Some(&missing), &[]).unwrap_err().to_string();
        assert!(
            err.contains("encryption.recipientFile") && err.contains("missing.txt"),
            "{err}"
        );

        let junk = dir.path().join("junk.txt");
        std::fs::write(&junk, "hello\n").unwrap();
        let err = Keyring::load(None, &[junk]).unwrap_err().to_string();
        assert!(
            err.contains("identityFiles[0]") && err.contains("line 1"),
            "{err}"
        );

        let empty = dir.path().join("empty.txt");
        std::fs::write(&empty, "# nothing\n").unwrap();
        let err = Keyring::load(Some(&empty), &[]).unwrap_err().to_string();
        assert!(err.contains("holds no age key"), "{err}");
    }
}
