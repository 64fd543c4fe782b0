//! The object store behind a URL: `file://`, `s3://`, `gs://`, `az://`.
//!
//! Cloud stores are configured the way object_store documents them: the
//! builder first reads its environment variables (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`), then `store.options` from the config override them. Every
//! option key is checked against the scheme's known keys when the config
//! is validated, so a typo fails `--check-config` instead of being ignored.
//! Signing and TLS use ring (object_store's `ring` feature, reqwest with the
//! process-default rustls provider), the one crypto provider of the build.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use url::Url;

use crate::error::{BackupError, Result};
use crate::store::file::FileStore;

/// Which kind of store a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// A local directory (or a mounted file system).
    File,
    /// Amazon S3 or an S3-compatible server.
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
}

/// A validated store URL with its options; [`StoreSpec::build`] connects.
#[derive(Clone, Debug)]
pub struct StoreSpec {
    scheme: Scheme,
    url: Url,
    prefix: Path,
    local_dir: Option<PathBuf>,
    options: BTreeMap<String, String>,
}

impl StoreSpec {
    /// Parses and checks `url` and the option keys for its scheme.
    pub fn parse(url: &str, options: &BTreeMap<String, String>) -> Result<Self, String> {
        let parsed = Url::parse(url).map_err(|e| {
            format!("invalid store URL {url:?} ({e}): expected e.g. file:///var/lib/bulwark/backups or s3://bucket/prefix")
        })?;
        let scheme = match parsed.scheme() {
            "file" => Scheme::File,
            "s3" => Scheme::S3,
            "gs" => Scheme::Gcs,
            "az" => Scheme::Azure,
            other => {
                return Err(format!(
                    "unsupported store URL scheme {other:?} in {url:?}: expected file, s3, gs or az"
                ));
            }
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(format!(
                "store URL {url:?} must not carry credentials: use store.options or the environment"
            ));
        }
        let (prefix, local_dir) = if scheme == Scheme::File {
            if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(format!(
                    "file URL {url:?} has a host: expected file:///absolute/path (three slashes)"
                ));
            }
            let dir = parsed
                .to_file_path()
                .map_err(|()| format!("file URL {url:?} is not an absolute path"))?;
            if !options.is_empty() {
                return Err("store.options are not used by file:// stores; remove them".into());
            }
            (Path::default(), Some(dir))
        } else {
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(format!(
                    "store URL {url:?} names no bucket or container: expected {}://NAME/prefix",
                    parsed.scheme()
                ));
            }
            let prefix = Path::parse(parsed.path().trim_matches('/'))
                .map_err(|e| format!("invalid prefix in store URL {url:?}: {e}"))?;
            for key in options.keys() {
                let known = match scheme {
                    Scheme::S3 => AmazonS3ConfigKey::from_str(key).is_ok(),
                    Scheme::Gcs => GoogleConfigKey::from_str(key).is_ok(),
                    Scheme::Azure => AzureConfigKey::from_str(key).is_ok(),
                    Scheme::File => false,
                };
                if !known {
                    return Err(format!(
                        "unknown option {key:?} for {}:// stores (see object_store's {} keys)",
                        parsed.scheme(),
                        match scheme {
                            Scheme::S3 => "AmazonS3ConfigKey",
                            Scheme::Gcs => "GoogleConfigKey",
                            _ => "AzureConfigKey",
                        }
                    ));
                }
            }
            (prefix, None)
        };
        Ok(Self {
            scheme,
            url: parsed,
            prefix,
            local_dir,
            options: options.clone(),
        })
    }

    /// The scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Builds the store. For `file://` the directory is created if missing.
    pub fn build(&self) -> Result<Store> {
        let display = self.display();
        let fail = |e: object_store::Error| BackupError::StoreUnavailable {
            location: display.clone(),
            detail: e.to_string(),
        };
        let inner: Arc<dyn ObjectStore> = match self.scheme {
            Scheme::File => {
                let dir = self.local_dir.clone().unwrap_or_default();
                std::fs::create_dir_all(&dir).map_err(|e| {
                    BackupError::local(format!("creating store directory {}", dir.display()), e)
                })?;
                Arc::new(FileStore::new(
                    LocalFileSystem::new_with_prefix(&dir)
                        .map_err(fail)?
                        .with_automatic_cleanup(true),
                ))
            }
            Scheme::S3 => {
                let mut b = AmazonS3Builder::from_env().with_url(self.url.as_str());
                for (k, v) in &self.options {
                    if let Ok(key) = AmazonS3ConfigKey::from_str(k) {
                        b = b.with_config(key, v);
                    }
                }
                Arc::new(b.build().map_err(fail)?)
            }
            Scheme::Gcs => {
                let mut b = GoogleCloudStorageBuilder::from_env().with_url(self.url.as_str());
                for (k, v) in &self.options {
                    if let Ok(key) = GoogleConfigKey::from_str(k) {
                        b = b.with_config(key, v);
                    }
                }
                Arc::new(b.build().map_err(fail)?)
            }
            Scheme::Azure => {
                let mut b = MicrosoftAzureBuilder::from_env().with_url(self.url.as_str());
                for (k, v) in &self.options {
                    if let Ok(key) = AzureConfigKey::from_str(k) {
                        b = b.with_config(key, v);
                    }
                }
                Arc::new(b.build().map_err(fail)?)
            }
        };
        Ok(Store {
            inner,
            prefix: self.prefix.clone(),
            display,
            local_dir: self.local_dir.clone(),
        })
    }

    /// The URL without query or fragment, for status and logs.
    pub fn display(&self) -> String {
        let mut u = self.url.clone();
        u.set_query(None);
        u.set_fragment(None);
        u.to_string()
    }
}

/// An object store and the prefix inside it that the URL names.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: Path,
    display: String,
    local_dir: Option<PathBuf>,
}

impl Store {
    /// Wraps an existing store (tests wrap stores in fault injectors).
    pub fn new(inner: Arc<dyn ObjectStore>, prefix: Path, display: impl Into<String>) -> Self {
        Self {
            inner,
            prefix,
            display: display.into(),
            local_dir: None,
        }
    }

    /// The same store seen through `wrap` (e.g. a fault injector).
    pub fn wrapped(&self, wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>) -> Self {
        Self {
            inner: wrap(self.inner.clone()),
            ..self.clone()
        }
    }

    /// The object store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// The URL's path inside the store.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The URL, for status and logs.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// For `file://` stores, the directory.
    pub fn local_dir(&self) -> Option<&std::path::Path> {
        self.local_dir.as_deref()
    }

    /// Every object below `dir`, listed to the end.
    pub async fn list_all(&self, dir: &Path) -> Result<Vec<object_store::ObjectMeta>> {
        use futures::TryStreamExt as _;
        self.inner
            .list(Some(dir))
            .try_collect()
            .await
            .map_err(|e| BackupError::store(self.describe(dir), e))
    }

    /// `<url>/<path>` for error messages.
    pub fn describe(&self, path: &Path) -> String {
        let rel = path
            .prefix_match(&self.prefix)
            .map(|p| {
                p.map(|s| s.as_ref().to_owned())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_else(|| path.to_string());
        format!("{}/{rel}", self.display.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn urls_parse_with_prefixes() {
        let s =
            StoreSpec::parse("s3://bucket/a/b/", &opts(&[("aws_endpoint", "http://x")])).unwrap();
        assert_eq!(s.scheme(), Scheme::S3);
        assert_eq!(s.prefix.as_ref(), "a/b");
        let f = StoreSpec::parse("file:///var/backups", &BTreeMap::new()).unwrap();
        assert_eq!(
            f.local_dir.as_deref(),
            Some(std::path::Path::new("/var/backups"))
        );
        assert_eq!(
            StoreSpec::parse("gs://b", &BTreeMap::new())
                .unwrap()
                .scheme(),
            Scheme::Gcs
        );
        assert_eq!(
            StoreSpec::parse("az://container/p", &BTreeMap::new())
                .unwrap()
                .scheme(),
            Scheme::Azure
        );
    }

    #[test]
    fn bad_urls_and_options_say_what_is_expected() {
        let e = StoreSpec::parse("ftp://x/y", &BTreeMap::new()).unwrap_err();
        assert!(e.contains("expected file, s3, gs or az"), "{e}");
        let e = StoreSpec::parse("file://host/x", &BTreeMap::new()).unwrap_err();
        assert!(e.contains("three slashes"), "{e}");
        let e = StoreSpec::parse("s3://b/p", &opts(&[("aws_endpiont", "x")])).unwrap_err();
        assert!(e.contains("unknown option \"aws_endpiont\""), "{e}");
        let e = StoreSpec::parse("s3://key:secret@b/p", &BTreeMap::new()).unwrap_err();
        assert!(e.contains("must not carry credentials"), "{e}");
        let e = StoreSpec::parse("s3:///p", &BTreeMap::new()).unwrap_err();
        assert!(e.contains("names no bucket"), "{e}");
    }

    #[test]
    fn cloud_builders_work_without_aws_lc() {
        // Building (not connecting) exercises each builder's crypto setup.
        bulwark_common::tls::install_crypto_provider();
        for (url, o) in [
            (
                "s3://bucket/p",
                opts(&[
                    ("aws_region", "eu-west-1"),
                    ("aws_access_key_id", "a"),
                    ("aws_secret_access_key", "b"),
                ]),
            ),
            ("gs://bucket/p", opts(&[])),
            (
                "az://container/p",
                opts(&[
                    ("azure_storage_account_name", "acct"),
                    ("azure_storage_account_key", "a2V5"),
                ]),
            ),
        ] {
            let spec = StoreSpec::parse(url, &o).unwrap();
            let store = spec.build().unwrap();
            assert_eq!(store.prefix().as_ref(), "p");
        }
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/nested", dir.path().display());
        let store = StoreSpec::parse(&url, &BTreeMap::new())
            .unwrap()
            .build()
            .unwrap();
        assert!(dir.path().join("nested").is_dir());
        assert_eq!(store.describe(&Path::from("x/y")), format!("{url}/x/y"));
    }
}
