//! Raft RPCs, cluster status and state, raw writes, membership.
use axum::extract::{DefaultBodyLimit, Json, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use std::sync::Arc;
use tern_consensus::network::{APPEND_PATH, SNAPSHOT_PATH, VOTE_PATH};
use tern_consensus::openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tern_consensus::state::Host;
use tern_consensus::{ClusterState, TypeConfig};

use super::{is_forwarded, Ctx};
use crate::auth::Principal;
use crate::cluster::{redacted, WriteBody, WriteReply};
use crate::error::ServiceError;
use crate::host::HostCtx;
use crate::members::{self, JoinBody, RemoveBody, Status};
use crate::raft_rpc;

/// Largest Raft request body: a snapshot chunk or an append batch, JSON-encoded.
pub const RAFT_BODY_LIMIT: usize = 64 << 20;

pub(super) fn router(ctx: Arc<HostCtx>) -> Router {
    Router::new()
        // Append batches and snapshot chunks are large; only member nodes get this far (the
        // auth middleware runs before any body is read).
        .route(
            APPEND_PATH,
            post(raft_append).layer(DefaultBodyLimit::max(RAFT_BODY_LIMIT)),
        )
        .route(VOTE_PATH, post(raft_vote))
        .route(
            SNAPSHOT_PATH,
            post(raft_snapshot).layer(DefaultBodyLimit::max(RAFT_BODY_LIMIT)),
        )
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
    Extension(who): Extension<Principal>,
    Json(rpc): Json<AppendEntriesRequest<TypeConfig>>,
) -> Result<Response, ServiceError> {
    raft_rpc::check_sender(&who, &rpc.vote)?;
    raft_rpc::check_append(&rpc).map_err(ServiceError::bad)?;
    Ok(Json(ctx.node.raft.append_entries(rpc).await).into_response())
}

async fn raft_vote(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Json(rpc): Json<VoteRequest<u64>>,
) -> Result<Response, ServiceError> {
    raft_rpc::check_sender(&who, &rpc.vote)?;
    Ok(Json(ctx.node.raft.vote(rpc).await).into_response())
}

async fn raft_snapshot(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Json(rpc): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Result<Response, ServiceError> {
    raft_rpc::check_sender(&who, &rpc.vote)?;
    Ok(Json(ctx.node.raft.install_snapshot(rpc).await).into_response())
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

/// Commit one command. Who did it is the authenticated caller (a member node forwarding an
/// operator's request names that operator); when is the leader's clock.
async fn write(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Json(body): Json<WriteBody>,
) -> Result<Json<WriteReply>, ServiceError> {
    who.may(&body.command)
        .map_err(|e| ServiceError::new(StatusCode::FORBIDDEN, e.to_string()))?;
    let actor = who.actor_for(body.actor);
    let applied = ctx
        .cluster
        .propose(actor, None, body.command, is_forwarded(&headers))
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
