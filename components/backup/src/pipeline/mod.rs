//! The byte chain between etcd and the store, both ways.
//!
//! Out (a snapshot or a delta segment): etcd bytes → [`hashing`] (etcd's
//! trailer, SHA-256) → [`codec`] (zstd, then age with keys from
//! [`encryption`]) → [`upload`] (multipart, bounded). Back (verification,
//! drills, restore): [`crate::snapshot::read`] streams the object through
//! the same stages in reverse, checking every hash on the way.
//!
//! | module | owns |
//! |---|---|
//! | [`hashing`] | SHA-256 and etcd's trailing-hash verifier |
//! | [`encryption`] | age recipients, identities and key ids |
//! | [`codec`] | the zstd/age write and read chains and the channel adapters between stages |
//! | [`upload`] | multipart upload with bounded parallelism and a guaranteed abort |
//!
pub mod codec;
pub mod encryption;
pub mod hashing;
pub mod upload;
