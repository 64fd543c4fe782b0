//! bulwark-backup: etcd snapshots streamed to object storage — verified on
//! the fly, compressed, optionally encrypted, committed by a manifest,
//! scheduled by one elected instance, retained by policy, and checked by
//! restore drills.
//!
//! | module | owns |
//! |---|---|
//! | [`snapshot`] | the pipeline: etcd stream → trailer check → zstd → age → multipart upload → manifest |
//! | [`codec`] | the zstd/age write and read chains and the channel adapters between stages |
//! | [`hashing`] | SHA-256 and etcd's trailing-hash verifier |
//! | [`upload`] | multipart upload with bounded parallelism and a guaranteed abort |
//! | [`manifest`] | `manifest.json` (the commit point) and `verify/*.json` records |
//! | [`layout`] | object keys and snapshot ids |
//! | [`store`] | store URLs (`file://`, `s3://`, `gs://`, `az://`) |
//! | [`encryption`] | age recipients, identities and key ids |
//! | [`etcd`] | etcd clients, member choice, error classification |
//! | [`engine`] | the shared dependencies of every operation |
//! | [`config`] | `BackupConfiguration` |
//! | [`schedule`] | interval and cron ticks |
//! | [`retention`] | the pure keep/delete policy |
pub mod codec;
pub mod config;
pub mod encryption;
pub mod engine;
pub mod error;
pub mod etcd;
pub mod hashing;
pub mod layout;
pub mod manifest;
pub mod retention;
pub mod schedule;
pub mod snapshot;
pub mod store;
pub mod upload;
