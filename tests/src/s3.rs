//! An S3-compatible server: `moto_server` (PyPI `moto[server]`) with a
//! bucket, ready for `object_store`.
//!
//! moto binds port 0 itself and prints the port it got, so there is no
//! port race here. It keeps everything in memory: a restarted server is
//! empty. It accepts any credentials; the harness hands out fixed ones so
//! signing (SigV4) still runs end to end.

use std::time::Duration;

use anyhow::Context as _;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};

use crate::process::{Process, ProcessBuilder};
use crate::tools;

/// The region the harness configures (moto accepts any).
pub const REGION: &str = "us-east-1";
/// The access key id the harness hands out.
pub const ACCESS_KEY_ID: &str = "bulwark-test-key";
/// The secret access key the harness hands out.
pub const SECRET_ACCESS_KEY: &str = "bulwark-test-secret";
/// The bucket created by [`S3Server::start`].
pub const DEFAULT_BUCKET: &str = "bulwark-backups";

// moto imports a lot of Python before it listens; a loaded CI machine needs
// the margin.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `moto_server` on 127.0.0.1 with one bucket; dropping it kills
/// the server.
#[derive(Debug)]
pub struct S3Server {
    process: Process,
    endpoint: String,
    bucket: String,
}

impl S3Server {
    /// Starts moto and creates [`DEFAULT_BUCKET`].
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_bucket(DEFAULT_BUCKET).await
    }

    /// Starts moto and creates `bucket`.
    pub async fn start_with_bucket(bucket: &str) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let process = ProcessBuilder::new("moto", tools::moto_server()?)
            .args(["-H", "127.0.0.1", "-p", "0"])
            // Without this Python buffers the "Running on" line in a pipe.
            .env("PYTHONUNBUFFERED", "1")
            .spawn()?;
        let line = process
            .wait_for_log("Running on http://", READY_TIMEOUT)
            .await?;
        let endpoint = line
            .split_once("Running on ")
            .map(|(_, url)| url.trim().trim_end_matches('/').to_owned())
            .with_context(|| format!("parsing moto's address from {line:?}"))?;
        let addr = endpoint
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("parsing moto's address from {line:?}"))?;
        process.wait_for_port(addr, READY_TIMEOUT).await?;
        let server = Self {
            process,
            endpoint,
            bucket: bucket.to_owned(),
        };
        server.create_bucket(bucket).await?;
        Ok(server)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// [`REGION`].
    pub fn region(&self) -> &str {
        REGION
    }

    /// [`ACCESS_KEY_ID`].
    pub fn access_key_id(&self) -> &str {
        ACCESS_KEY_ID
    }

    /// [`SECRET_ACCESS_KEY`].
    pub fn secret_access_key(&self) -> &str {
        SECRET_ACCESS_KEY
    }

    /// The bucket created at start.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `s3://<bucket>`, the URL form services take in their config.
    pub fn url(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    /// Its process (log, kill).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Its process, to kill or stop it (a restarted moto is empty).
    pub fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Creates another bucket. moto accepts an unsigned `PUT /<bucket>`.
    pub async fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        crate::install_crypto_provider();
        let url = format!("{}/{bucket}", self.endpoint);
        let response = reqwest::Client::new()
            .put(&url)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("PUT {url}"))?;
        let status = response.status();
        anyhow::ensure!(
            status.is_success(),
            "creating bucket {bucket}: PUT {url} answered {status}: {}",
            response.text().await.unwrap_or_default()
        );
        Ok(())
    }

    /// The object_store options for this server as `(key, value)` pairs,
    /// for services that build their store from config (each key parses as
    /// an [`AmazonS3ConfigKey`]): endpoint, region, credentials, bucket,
    /// path-style requests and plain HTTP allowed.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            (AmazonS3ConfigKey::Endpoint.as_ref(), self.endpoint.as_str()),
            (AmazonS3ConfigKey::Region.as_ref(), REGION),
            (AmazonS3ConfigKey::AccessKeyId.as_ref(), ACCESS_KEY_ID),
            (
                AmazonS3ConfigKey::SecretAccessKey.as_ref(),
                SECRET_ACCESS_KEY,
            ),
            (AmazonS3ConfigKey::Bucket.as_ref(), self.bucket.as_str()),
            (
                AmazonS3ConfigKey::VirtualHostedStyleRequest.as_ref(),
                "false",
            ),
            ("aws_allow_http", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// A ready `AmazonS3` store on the bucket.
    pub fn store(&self) -> anyhow::Result<AmazonS3> {
        self.store_for(&self.bucket)
    }

    /// A ready `AmazonS3` store on another bucket of this server.
    pub fn store_for(&self, bucket: &str) -> anyhow::Result<AmazonS3> {
        crate::install_crypto_provider();
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_region(REGION)
            .with_access_key_id(ACCESS_KEY_ID)
            .with_secret_access_key(SECRET_ACCESS_KEY)
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(true)
            .build()
            .with_context(|| format!("building an S3 store for {}/{bucket}", self.endpoint))
    }
}
