//! Where snapshot bytes live: the store a URL names, the layout of keys in
//! it, and the `file://` store.
//!
//! | module | owns |
//! |---|---|
//! | [`url`] | store URLs (`file://`, `s3://`, `gs://`, `az://`) and the [`Store`] handle |
//! | [`layout`] | object keys, snapshot ids, and a manifest's object path |
//! | [`file`](mod@file) | the `file://` store: streaming write-back and durable multipart uploads |
//! | `faults` | (feature `faults`, and unit tests) an object store that fails on demand |

pub mod file;
pub mod layout;
pub mod url;

#[cfg(any(test, feature = "faults"))]
pub mod faults;

pub use url::{Scheme, Store, StoreSpec};
