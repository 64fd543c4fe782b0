//! Where snapshot bytes live: the store a URL names, the layout of keys in
//! it, and the `file://` store.
//!
//! | module | owns |
//! |---|---|
//! | [`url`] | store URLs (`file://`, `s3://`, `gs://`, `az://`) and the [`Store`] handle |
//! | [`layout`] | object keys, snapshot ids, and a manifest's object path |
//! | [`file`](mod@file) | the `file://` store: streaming write-back and durable multipart uploads |
//!
//! The object store that fails on demand, for the pipeline and restore
//! tests, lives with those tests (`tests/common/faults.rs`).

pub mod file;
pub mod layout;
pub mod url;

pub use url::{Scheme, Store, StoreSpec};
