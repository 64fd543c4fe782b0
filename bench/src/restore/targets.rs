//! Where a built point-in-time target goes: measured both ways in one run,
//! onto three nodes' staging files (PREPARE on every node at once, the
//! SHA-256 and size checked on the way in), so "gRPC or the store,
//! whichever measures faster" is a figure, not a guess:
//!
//! - **through the store**: the coordinator uploads the target as one
//!   object, then every node downloads it (the path before `FetchTarget`,
//!   which an older coordinator still takes);
//! - **served**: the coordinator's node copies its own file, the others
//!   stream it from its agent's `FetchTarget` over mutual TLS (today's
//!   path).
//!
//! The store is the bench's file store on the same disk, so the store
//! path's figure is its best case: a remote S3 bucket adds the network
//! both ways.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use bulwark_api::backup::v1 as pb;
use bulwark_backup::engine::Engine;
use bulwark_backup::pipeline::upload::PartUploader;
use bulwark_backup::restore::AgentApi;
use bulwark_backup::restore::agent::Agent;
use bulwark_backup::restore::pitr::BuiltTarget;
use bulwark_backup::store::layout::object_path;
use bulwark_common::authz::AccessPolicy;
use bulwark_common::grpc::GrpcServer;
use bulwark_common::shutdown::Shutdown;
use bulwark_common::tls::TlsMaterial;
use bulwark_testkit::{Pki, config};
use object_store::ObjectStoreExt as _;
use serde::Serialize;
use tokio::io::AsyncReadExt as _;

use super::members::{self, Node};

/// Nodes the target goes to.
const NODES: usize = 3;

/// Seconds of each way, all nodes at once.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(super) struct TargetTimes {
    /// The target's size.
    pub(super) bytes: u64,
    /// Uploading the target as one object.
    pub(super) store_upload: f64,
    /// Every node downloading it.
    pub(super) store_fetch: f64,
    /// Both.
    pub(super) store_total: f64,
    /// Every node fetching it from the coordinator's node.
    pub(super) served: f64,
}

/// Moves `built` to three nodes under `root` through the store, then
/// served by the first node's agent; each node is released in between.
pub(super) async fn distribute(
    engine: &Arc<Engine>,
    root: &Path,
    built: &BuiltTarget,
) -> anyhow::Result<TargetTimes> {
    let pki = Pki::new()?;
    let cert = pki.peer("backup", &["bulwark:backup"], &["127.0.0.1", "localhost"])?;
    let tls = config::tls(&cert)
        .load()
        .context("loading the bench's TLS")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let agent = |i: usize, restore| {
        let advertised = if i == 0 { &address } else { "127.0.0.1:1" };
        Agent::new(engine.clone(), restore, advertised.to_owned()).with_client_tls(tls.clone())
    };
    let nodes = members::start_nodes(root, NODES, &agent).await?;
    let shutdown = Shutdown::new();
    serve_first_agent(&nodes, listener, tls, &shutdown);

    let key = "restore/bench-store/target.db";
    let started = Instant::now();
    upload(engine, &built.path, key).await?;
    let store_upload = started.elapsed().as_secs_f64();
    let source = pb::SnapshotSource {
        object_key: key.into(),
        sha256: built.sha256.clone(),
        size_bytes: built.size,
        snapshot_id: String::new(),
        raw_size_bytes: built.size,
        served_by: String::new(),
    };
    let store_fetch = fetch_everywhere(&nodes, &source, "bench-store").await?;
    engine
        .store
        .inner()
        .delete(&object_path(engine.store.prefix(), key))
        .await?;

    let rid = "bench-served";
    let (offer, source) = nodes[0].agent.offer_target(
        rid,
        &built.path,
        (built.sha256.clone(), built.size),
        address,
    );
    let served = fetch_everywhere(&nodes, &source, rid).await?;
    drop(offer);
    shutdown.token().cancel();
    Ok(TargetTimes {
        bytes: built.size,
        store_upload,
        store_fetch,
        store_total: store_upload + store_fetch,
        served,
    })
}

/// The first node's `RestoreAgent` on `listener`, as bulwark-backup serves
/// it (mutual TLS, peers only), until `shutdown`.
fn serve_first_agent(
    nodes: &[Node],
    listener: tokio::net::TcpListener,
    tls: TlsMaterial,
    shutdown: &Shutdown,
) {
    let server = GrpcServer::new()
        .add_service(AgentApi::new(nodes[0].agent.clone(), shutdown).into_server());
    let policy = AccessPolicy {
        peers: Some(config::orgs(&["bulwark:backup"])),
        ..AccessPolicy::default()
    };
    let token = shutdown.token();
    tokio::spawn(async move {
        if let Err(e) = server.serve(listener, &tls, policy, token).await {
            eprintln!("the bench's agent server ended: {e}");
        }
    });
}

/// PREPARE from `source` on every node at once (the seconds it took), then
/// every node released with its staging file removed.
async fn fetch_everywhere(
    nodes: &[Node],
    source: &pb::SnapshotSource,
    rid: &str,
) -> anyhow::Result<f64> {
    let specs = members::specs(nodes, source);
    let started = Instant::now();
    members::prepare_all(nodes, &specs, rid).await?;
    let seconds = started.elapsed().as_secs_f64();
    for node in nodes {
        node.agent
            .abort(rid, "bench: fetched", &|_| {})
            .await
            .context("releasing a node")?;
    }
    eprintln!("target to {} nodes ({rid}): {seconds:.2} s", nodes.len());
    Ok(seconds)
}

/// The coordinator's old upload: the file as one multipart object, 8 MiB
/// parts, two in flight (the pipeline's defaults here).
async fn upload(engine: &Engine, file: &Path, key: &str) -> anyhow::Result<()> {
    let path = object_path(engine.store.prefix(), key);
    let mut up = PartUploader::new(engine.store.inner().put_multipart(&path).await?, 8 << 20, 2);
    let mut f = tokio::fs::File::open(file).await?;
    loop {
        let mut buf = vec![0; 8 << 20];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        up.put(buf.into());
        up.wait_for_capacity().await?;
    }
    up.finish().await?;
    Ok(())
}
