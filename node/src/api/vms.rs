//! The operator API for VMs, migrations, tasks, load reports, maintenance and DRS:
//! `/v1/vms...`, `/v1/migrations...`, `/v1/tasks...`, `/v1/load`, `/v1/hosts/{id}/...`,
//! `/v1/drs...`.
use std::sync::Arc;

use axum::extract::{Json, Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Extension, Router};
use tern_consensus::state::{TaskId, VmState};
use tern_consensus::Applied;

use super::{is_forwarded, Ctx};
use crate::auth::Principal;
use crate::datastore::VmConfig;
use crate::drs;
use crate::error::ServiceError;
use crate::host::{HostCtx, TaskProgress};
use crate::leader_state::DrsReport;
use crate::load::{self, LoadReport};
use crate::maintenance::{self, MaintenanceBody};
use crate::migrations::{self, CancelBody, MigrationBody, MigrationReply};
use crate::outbound::{PrepareBody, PrepareReply};
use crate::vms::{self, CreateVmBody, CreateVmReply, GuestReply, LocalInfo};

pub(super) fn router(ctx: Arc<HostCtx>) -> Router {
    Router::new()
        .route("/v1/vms", post(create_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/destroy", post(destroy_vm))
        .route("/v1/vms/{name}/guest", get(guest_status))
        .route("/v1/vms/{name}/config", get(vm_config))
        .route("/v1/vms/{name}/recommend", get(recommend))
        .route("/v1/local", get(local_vms))
        .route("/v1/migrations", post(create_migration))
        .route("/v1/migrations/prepare", post(prepare_inbound))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/tasks/{id}/progress", get(task_progress))
        .route("/v1/load", post(record_load))
        .route("/v1/hosts/{id}/maintenance", post(maintenance))
        .route("/v1/drs", get(drs_report))
        .route("/v1/drs/apply", post(drs_apply))
        .with_state(ctx)
}

// Who acts is the authenticated principal (`Principal::actor_for`): an `actor` in the body
// counts only when a member node forwards it for the operator it authenticated.

async fn create_vm(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Json(mut body): Json<CreateVmBody>,
) -> Result<Json<CreateVmReply>, ServiceError> {
    body.actor = Some(who.actor_for(body.actor));
    Ok(Json(vms::create(&ctx, body).await?))
}

async fn start_vm(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Applied>, ServiceError> {
    Ok(Json(
        vms::set_state(&ctx, who.actor(), name, VmState::Running).await?,
    ))
}

async fn stop_vm(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Applied>, ServiceError> {
    Ok(Json(
        vms::set_state(&ctx, who.actor(), name, VmState::Stopped).await?,
    ))
}

async fn destroy_vm(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Applied>, ServiceError> {
    Ok(Json(vms::destroy(&ctx, who.actor(), name).await?))
}

async fn guest_status(
    State(ctx): Ctx,
    Path(name): Path<String>,
) -> Result<Json<GuestReply>, ServiceError> {
    Ok(Json(vms::guest_status(&ctx, &name)?))
}

async fn vm_config(
    State(ctx): Ctx,
    Path(name): Path<String>,
) -> Result<Json<VmConfig>, ServiceError> {
    Ok(Json(vms::config(&ctx, &name)?))
}

async fn recommend(
    State(ctx): Ctx,
    Path(name): Path<String>,
) -> Result<Json<tern_scheduler::Ranking>, ServiceError> {
    Ok(Json(drs::recommend(&ctx, &name)?))
}

async fn local_vms(State(ctx): Ctx) -> Json<Vec<LocalInfo>> {
    Json(vms::local(&ctx))
}

async fn create_migration(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Json(mut body): Json<MigrationBody>,
) -> Result<Json<MigrationReply>, ServiceError> {
    body.actor = Some(who.actor_for(body.actor));
    Ok(Json(MigrationReply {
        task: migrations::queue_migration(&ctx, body).await?,
    }))
}

async fn prepare_inbound(
    State(ctx): Ctx,
    Json(body): Json<PrepareBody>,
) -> Result<Json<PrepareReply>, ServiceError> {
    Ok(Json(migrations::prepare_inbound(ctx, body).await?))
}

/// Cancel a task; the body (`{"actor": ...}`) is optional.
async fn cancel_task(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Path(id): Path<TaskId>,
    body: axum::body::Bytes,
) -> Result<Json<Applied>, ServiceError> {
    let body: Option<CancelBody> = if body.is_empty() {
        None
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ServiceError::bad(format!("bad cancel body: {e}")))?
    };
    let actor = who.actor_for(body.and_then(|b| b.actor));
    Ok(Json(migrations::cancel(&ctx, id, Some(actor)).await?))
}

async fn task_progress(
    State(ctx): Ctx,
    Path(id): Path<TaskId>,
) -> Result<Json<TaskProgress>, ServiceError> {
    Ok(Json(migrations::progress(&ctx, id)?))
}

async fn record_load(State(ctx): Ctx, Json(report): Json<LoadReport>) -> Json<serde_json::Value> {
    Json(load::record(&ctx, report))
}

async fn maintenance(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Path(id): Path<u64>,
    Json(mut body): Json<MaintenanceBody>,
) -> Result<Json<Applied>, ServiceError> {
    body.actor = Some(who.actor_for(body.actor));
    Ok(Json(maintenance::set(&ctx, id, body).await?))
}

async fn drs_report(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<DrsReport>, ServiceError> {
    Ok(Json(
        drs::report(&ctx, false, is_forwarded(&headers)).await?,
    ))
}

async fn drs_apply(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<DrsReport>, ServiceError> {
    Ok(Json(drs::report(&ctx, true, is_forwarded(&headers)).await?))
}
