//! `bulwark.backup.v1.RestoreAgent`: the gRPC face of this node's
//! [`Agent`], called by the coordinating instance.

use std::pin::Pin;
use std::sync::Arc;

use bulwark_api::backup::v1 as pb;
use bulwark_common::shutdown::Shutdown;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::error::Result;
use crate::restore::agent::Agent;

type Stream_<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// `bulwark.backup.v1.RestoreAgent` over the local [`Agent`].
#[derive(Clone, Debug)]
pub struct AgentApi {
    agent: Arc<Agent>,
    shutdown: CancellationToken,
    /// The daemon's tracker: shutdown waits for a step under way.
    tasks: TaskTracker,
}

impl AgentApi {
    /// Handlers over `agent`; each streamed step is a task of `shutdown`'s
    /// tracker, under a child of its token.
    pub fn new(agent: Arc<Agent>, shutdown: &Shutdown) -> Self {
        Self {
            agent,
            shutdown: shutdown.token(),
            tasks: shutdown.tracker().clone(),
        }
    }

    /// The tonic service to register.
    pub fn into_server(self) -> pb::restore_agent_server::RestoreAgentServer<Self> {
        pb::restore_agent_server::RestoreAgentServer::new(self)
    }

    /// Runs `op` in a task, streaming its step events; an error ends the
    /// stream with its status. At shutdown the task's token is cancelled
    /// (a wait for health stops) and the daemon waits for the step within
    /// its grace period; a step cut off there is in the node's journal,
    /// which the restarted agent resumes or rolls back from.
    fn stream<F>(&self, op: F) -> Stream_<pb::NodeRestoreProgress>
    where
        F: for<'a> FnOnce(
                Arc<Agent>,
                &'a (dyn Fn(pb::NodeRestoreProgress) + Send + Sync),
                CancellationToken,
            ) -> futures::future::BoxFuture<'a, Result<()>>
            + Send
            + 'static,
    {
        let (tx, rx) = mpsc::channel(64);
        let agent = self.agent.clone();
        let cancel = self.shutdown.child_token();
        self.tasks.spawn(async move {
            let sink_tx = tx.clone();
            let sink = move |e: pb::NodeRestoreProgress| {
                let _ = sink_tx.try_send(Ok(e));
            };
            if let Err(e) = op(agent, &sink, cancel).await {
                let _ = tx.send(Err(Status::from(e))).await;
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl pb::restore_agent_server::RestoreAgent for AgentApi {
    async fn get_node_info(
        &self,
        _request: Request<pb::GetNodeInfoRequest>,
    ) -> std::result::Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(self.agent.node_info().await?))
    }

    async fn prepare_restore(
        &self,
        request: Request<pb::PrepareRestoreRequest>,
    ) -> std::result::Result<Response<pb::PrepareRestoreResponse>, Status> {
        Ok(Response::new(
            self.agent.prepare(request.into_inner()).await?,
        ))
    }

    type PrepareRestoreStreamStream = Stream_<pb::NodeRestoreProgress>;

    async fn prepare_restore_stream(
        &self,
        request: Request<pb::PrepareRestoreRequest>,
    ) -> std::result::Result<Response<Self::PrepareRestoreStreamStream>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.stream(move |agent, sink, _| {
            Box::pin(async move { agent.prepare_with(req, sink).await.map(drop) })
        })))
    }

    type RestoreMemberStream = Stream_<pb::NodeRestoreProgress>;

    async fn restore_member(
        &self,
        request: Request<pb::RestoreMemberRequest>,
    ) -> std::result::Result<Response<Self::RestoreMemberStream>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.stream(move |agent, sink, _| {
            Box::pin(async move { agent.restore_member(req, sink).await })
        })))
    }

    type StartMemberStream = Stream_<pb::NodeRestoreProgress>;

    async fn start_member(
        &self,
        request: Request<pb::StartMemberRequest>,
    ) -> std::result::Result<Response<Self::StartMemberStream>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.stream(move |agent, sink, cancel| {
            Box::pin(async move { agent.start_member(req, sink, &cancel).await.map(drop) })
        })))
    }

    type AbortRestoreStream = Stream_<pb::NodeRestoreProgress>;

    async fn abort_restore(
        &self,
        request: Request<pb::AbortRestoreRequest>,
    ) -> std::result::Result<Response<Self::AbortRestoreStream>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.stream(move |agent, sink, _| {
            Box::pin(async move { agent.abort(&req.restore_id, &req.reason, sink).await })
        })))
    }

    async fn check_restore(
        &self,
        request: Request<pb::CheckRestoreRequest>,
    ) -> std::result::Result<Response<pb::CheckRestoreResponse>, Status> {
        Ok(Response::new(self.agent.check(request.into_inner()).await?))
    }

    type FetchTargetStream = Stream_<pb::TargetChunk>;

    async fn fetch_target(
        &self,
        request: Request<pb::FetchTargetRequest>,
    ) -> std::result::Result<Response<Self::FetchTargetStream>, Status> {
        use futures::StreamExt as _;
        let chunks = self
            .agent
            .serve_target(&request.into_inner().restore_id)
            .await?;
        Ok(Response::new(Box::pin(chunks.map(|c| {
            c.map(|data| pb::TargetChunk { data }).map_err(Status::from)
        }))))
    }

    async fn get_restore_state(
        &self,
        request: Request<pb::GetRestoreStateRequest>,
    ) -> std::result::Result<Response<pb::NodeRestoreState>, Status> {
        Ok(Response::new(
            self.agent.state(&request.into_inner().restore_id).await?,
        ))
    }
}
