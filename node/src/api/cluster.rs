//! Raft RPCs, cluster status and state, raw writes, membership.
use axum::extract::{Json, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use tern_consensus::network::{APPEND_PATH, SNAPSHOT_PATH, VOTE_PATH};
use tern_consensus::openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tern_consensus::state::Host;
use tern_consensus::{ClusterState, TypeConfig};

use super::{is_forwarded, Ctx};
use crate::cluster::{redacted, WriteBody, WriteReply};
use crate::error::ServiceError;
use crate::host::HostCtx;
use crate::members::{self, JoinBody, RemoveBody, Status};

pub(super) fn router(ctx: Arc<HostCtx>) -> Router {
    Router::new()
        .route(APPEND_PATH, post(raft_append))
        .route(VOTE_PATH, post(raft_vote))
        .route(SNAPSHOT_PATH, post(raft_snapshot))
        .route("/v1/status", get(status))
        .route("/v1/state", get(read_state))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/write", post(write))
        .route("/v1/members/join", post(join))
        .route("/v1/members/remove", post(remove))
        .with_state(ctx)
}

async fn raft_append(
    State(ctx): Ctx,
    Json(rpc): Json<AppendEntriesRequest<TypeConfig>>,
) -> impl IntoResponse {
    Json(ctx.node.raft.append_entries(rpc).await)
}

async fn raft_vote(State(ctx): Ctx, Json(rpc): Json<VoteRequest<u64>>) -> impl IntoResponse {
    Json(ctx.node.raft.vote(rpc).await)
}

async fn raft_snapshot(
    State(ctx): Ctx,
    Json(rpc): Json<InstallSnapshotRequest<TypeConfig>>,
) -> impl IntoResponse {
    Json(ctx.node.raft.install_snapshot(rpc).await)
}

async fn status(State(ctx): Ctx) -> Json<Status> {
    Json(members::status(&ctx.cluster))
}

async fn read_state(
    State(ctx): Ctx,
    headers: HeaderMap,
) -> Result<Json<ClusterState>, ServiceError> {
    let state = ctx.cluster.read(is_forwarded(&headers)).await?;
    Ok(Json(redacted(&state)))
}

async fn list_hosts(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<Vec<Host>>, ServiceError> {
    let state = ctx.cluster.read(is_forwarded(&headers)).await?;
    Ok(Json(state.hosts.values().cloned().collect()))
}

async fn write(
    State(ctx): Ctx,
    headers: HeaderMap,
    Json(body): Json<WriteBody>,
) -> Result<Json<WriteReply>, ServiceError> {
    let actor = body.actor.unwrap_or_else(|| "api".to_string());
    let applied = ctx
        .cluster
        .propose(actor, body.at_ms, body.command, is_forwarded(&headers))
        .await?;
    Ok(Json(WriteReply { applied }))
}

async fn join(
    State(ctx): Ctx,
    headers: HeaderMap,
    Json(body): Json<JoinBody>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    Ok(Json(
        members::join(&ctx.cluster, body, is_forwarded(&headers)).await?,
    ))
}

async fn remove(
    State(ctx): Ctx,
    headers: HeaderMap,
    Json(body): Json<RemoveBody>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    Ok(Json(
        members::remove(&ctx.cluster, body, is_forwarded(&headers)).await?,
    ))
}
