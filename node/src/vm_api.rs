//! The operator API for VMs and migrations: `/v1/vms...`, `/v1/migrations...`, `/v1/tasks...`.
//! Every change is a Raft command; the owner node reacts to the commit.
use std::sync::Arc;

use axum::extract::{Json, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};
use tern_consensus::state::{
    AutomationLevel, Command, HostState, TaskId, TaskState, VmSpec, VmState,
};
use tern_consensus::Applied;
use tern_hypervisor::{GuestStatus, Workload};

use super::api::ApiError;
use super::auth::Principal;
use super::controller::{drs, queue_moves, DrsReport};
use super::datastore::VmConfig;
use super::host::{HostCtx, TaskProgress};
use super::inbound::{prepare, Refusal};
use super::load::LoadReport;
use super::outbound::{PrepareBody, PrepareReply};
use super::sched_view;

type Ctx = State<Arc<HostCtx>>;

pub fn router(ctx: Arc<HostCtx>) -> Router {
    Router::new()
        .route("/v1/vms", post(create_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/destroy", post(destroy_vm))
        .route("/v1/vms/{name}/guest", get(guest_status))
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

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: msg.into(),
        rejected: None,
    }
}

fn with_status(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError {
        status,
        message: msg.into(),
        rejected: None,
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateVmBody {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub workload: String,
    #[serde(default)]
    pub pool: Option<String>,
    /// None: the scheduler places it.
    #[serde(default)]
    pub host: Option<u64>,
    #[serde(default)]
    pub actor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateVmReply {
    pub name: String,
    pub host: u64,
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn create_vm(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Json(mut body): Json<CreateVmBody>,
) -> Result<Json<CreateVmReply>, ApiError> {
    body.actor = Some(who.actor_for(body.actor));
    let workload: Workload = body
        .workload
        .parse()
        .map_err(|e| bad(format!("workload: {e}")))?;
    if body.vcpus == 0 || body.vcpus > 64 || body.memory_mib < 32 || body.memory_mib > 3072 {
        return Err(bad("vcpus must be 1..=64 and memory 32..=3072 MiB"));
    }
    if workload.min_memory() > body.memory_mib << 20 {
        return Err(bad(format!(
            "workload needs at least {} MiB of memory",
            workload.min_memory().div_ceil(1 << 20)
        )));
    }
    let ds = ctx
        .datastore()
        .map_err(|e| with_status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let state = ctx.state();
    let host = match body.host {
        Some(h) => h,
        None => place(&state, &body)?,
    };
    let cfg = VmConfig {
        name: body.name.clone(),
        memory_mib: body.memory_mib,
        vcpus: body.vcpus,
        workload: workload.to_string(),
    };
    if state.vms.contains_key(&body.name) {
        return Err(with_status(
            StatusCode::CONFLICT,
            format!("vm {:?} exists", body.name),
        ));
    }
    ds.create(&cfg).map_err(|e| bad(format!("{e:#}")))?;
    let actor = body.actor.clone().unwrap_or_else(|| "api".into());
    let spec = VmSpec {
        name: body.name.clone(),
        vcpus: body.vcpus,
        memory_mib: body.memory_mib,
        cpu_features: Vec::new(),
    };
    let created = ctx
        .api
        .propose(
            actor.clone(),
            None,
            Command::CreateVm {
                spec,
                pool: body.pool.clone(),
                owner: host,
            },
            false,
        )
        .await;
    if let Err(e) = created {
        let _ = ds.remove(&body.name);
        return Err(e);
    }
    ctx.api
        .propose(
            actor,
            None,
            Command::SetVmState {
                vm: body.name.clone(),
                state: VmState::Running,
            },
            false,
        )
        .await?;
    Ok(Json(CreateVmReply {
        name: body.name,
        host,
    }))
}

/// Power-on placement by the scheduler.
fn place(state: &tern_consensus::ClusterState, body: &CreateVmBody) -> Result<u64, ApiError> {
    let cluster = sched_view::cluster(state, &Default::default(), now_s())
        .map_err(|e| bad(format!("{e:#}")))?;
    let vm = tern_scheduler::Vm {
        id: body.name.clone(),
        host: String::new(),
        vcpus: body.vcpus,
        memory_mib: body.memory_mib as f64,
        cpu_demand_mhz: 0.0,
        active_memory_mib: body.memory_mib as f64 / 4.0,
        dirty_rate_mib_s: 0.0,
        cpu: Default::default(),
        memory: Default::default(),
        pool: body.pool.clone().filter(|p| state.pools.contains_key(p)),
        cpu_baseline: Default::default(),
        do_not_migrate: false,
        last_migrated_s: None,
    };
    let p = tern_scheduler::place(&cluster, &vm, &tern_scheduler::Config::default())
        .map_err(|e| bad(format!("placement: {e}")))?;
    if state.drs.automation == AutomationLevel::Manual {
        // Like DRS in manual mode: recommend, never choose; the operator picks with --host.
        return Err(with_status(
            StatusCode::CONFLICT,
            manual_placement_refusal(&body.name, &p.ranking),
        ));
    }
    p.host
        .as_deref()
        .and_then(sched_view::parse_host)
        .ok_or_else(|| with_status(StatusCode::CONFLICT, "no host can take this vm"))
}

/// The error for a placement request under manual DRS: the ranked hosts to choose from.
fn manual_placement_refusal(vm: &str, ranking: &tern_scheduler::Ranking) -> String {
    let mut msg = format!(
        "DRS automation is manual: vm {vm:?} is not placed automatically; choose a host with \
         --host. Recommended hosts, best first:"
    );
    if ranking.candidates.is_empty() {
        msg.push_str(" none");
    }
    for (i, c) in ranking.candidates.iter().enumerate() {
        msg.push_str(&format!(
            "\n  {}. host {} (score {:.1}: {})",
            i + 1,
            c.host,
            c.score,
            c.reasons.join("; ")
        ));
    }
    for x in &ranking.excluded {
        msg.push_str(&format!(
            "\n  excluded: host {} ({})",
            x.host,
            x.reasons.join("; ")
        ));
    }
    msg
}

async fn set_state(
    ctx: &HostCtx,
    who: &Principal,
    name: String,
    state: VmState,
) -> Result<Applied, ApiError> {
    ctx.api
        .propose(
            who.actor(),
            None,
            Command::SetVmState { vm: name, state },
            false,
        )
        .await
}

async fn start_vm(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Applied>, ApiError> {
    Ok(Json(set_state(&ctx, &who, name, VmState::Running).await?))
}

async fn stop_vm(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Applied>, ApiError> {
    Ok(Json(set_state(&ctx, &who, name, VmState::Stopped).await?))
}

async fn destroy_vm(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Applied>, ApiError> {
    let applied = ctx
        .api
        .propose(
            who.actor(),
            None,
            Command::DeleteVm { vm: name.clone() },
            false,
        )
        .await?;
    if let Ok(ds) = ctx.datastore() {
        if let Err(e) = ds.remove(&name) {
            tracing::warn!("removing {name} from the datastore: {e:#}");
        }
    }
    Ok(Json(applied))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GuestReply {
    pub host: u64,
    pub epoch: u64,
    pub status: GuestStatus,
    /// vCPU-thread CPU time so far, seconds.
    pub cpu_s: f64,
}

async fn guest_status(
    State(ctx): Ctx,
    Path(name): Path<String>,
) -> Result<Json<GuestReply>, ApiError> {
    let vms = ctx.vms();
    let local = vms
        .get(&name)
        .ok_or_else(|| with_status(StatusCode::NOT_FOUND, format!("{name} is not running here")))?;
    let vm = local.vm.lock();
    let status = vm
        .guest_status()
        .map_err(|e| with_status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let cpu_s = vm.vcpu_cpu_times().iter().map(|d| d.as_secs_f64()).sum();
    Ok(Json(GuestReply {
        host: ctx.id,
        epoch: local.epoch,
        status,
        cpu_s,
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MigrationBody {
    pub vm: String,
    pub to: u64,
    #[serde(default = "default_priority")]
    pub priority: u8,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub actor: Option<String>,
}

fn default_priority() -> u8 {
    PRIORITY_NORMAL
}

pub const PRIORITY_LOW: u8 = 1;
pub const PRIORITY_NORMAL: u8 = 2;
pub const PRIORITY_HIGH: u8 = 3;

#[derive(Debug, Serialize, Deserialize)]
pub struct MigrationReply {
    pub task: TaskId,
}

/// 128 random bits from the kernel, hex.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Queue a migration task (the source node's executor runs it).
pub async fn queue_migration(ctx: &HostCtx, body: MigrationBody) -> Result<TaskId, ApiError> {
    if body.priority >= PRIORITY_HIGH {
        let state = ctx.state();
        let from = state
            .vms
            .get(&body.vm)
            .map(|v| v.owner)
            .ok_or_else(|| with_status(StatusCode::NOT_FOUND, format!("no vm {}", body.vm)))?;
        super::queue_view::admit_high(&state, &body.vm, from, body.to)
            .map_err(|reason| with_status(StatusCode::CONFLICT, reason))?;
    }
    let token =
        new_token().map_err(|e| with_status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let applied = ctx
        .api
        .propose(
            body.actor.unwrap_or_else(|| "api".into()),
            None,
            Command::CreateTask {
                vm: body.vm,
                to: body.to,
                priority: body.priority,
                reason: body.reason.unwrap_or_else(|| "manual".into()),
                token,
            },
            false,
        )
        .await?;
    match applied {
        Applied::TaskCreated { id } => Ok(id),
        other => Err(with_status(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected result {other:?}"),
        )),
    }
}

async fn create_migration(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Json(mut body): Json<MigrationBody>,
) -> Result<Json<MigrationReply>, ApiError> {
    body.actor = Some(who.actor_for(body.actor));
    Ok(Json(MigrationReply {
        task: queue_migration(&ctx, body).await?,
    }))
}

async fn prepare_inbound(
    State(ctx): Ctx,
    Json(body): Json<PrepareBody>,
) -> Result<Json<PrepareReply>, ApiError> {
    match prepare(ctx, body.task).await {
        Ok(listen) => Ok(Json(PrepareReply { listen })),
        Err(Refusal::NoTask(id)) => Err(with_status(
            StatusCode::NOT_FOUND,
            format!("no committed task {id}"),
        )),
        Err(Refusal::Invalid(m)) => Err(with_status(StatusCode::CONFLICT, m)),
        Err(Refusal::Unavailable(m)) => Err(with_status(StatusCode::SERVICE_UNAVAILABLE, m)),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CancelBody {
    #[serde(default)]
    pub actor: Option<String>,
}

/// Cancel a task; the body (`{"actor": ...}`) is optional.
async fn cancel_task(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Path(id): Path<TaskId>,
    body: axum::body::Bytes,
) -> Result<Json<Applied>, ApiError> {
    let body: Option<CancelBody> = if body.is_empty() {
        None
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(format!("bad cancel body: {e}")))?
    };
    let actor = who.actor_for(body.and_then(|b| b.actor));
    let applied = ctx
        .api
        .propose(
            actor.clone(),
            None,
            Command::UpdateTask {
                id,
                state: TaskState::Cancelled,
                stats: None,
                error: Some(format!("cancelled by {actor}")),
            },
            false,
        )
        .await?;
    Ok(Json(applied))
}

async fn task_progress(
    State(ctx): Ctx,
    Path(id): Path<TaskId>,
) -> Result<Json<TaskProgress>, ApiError> {
    ctx.progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| {
            with_status(
                StatusCode::NOT_FOUND,
                format!("task {id} is not running here"),
            )
        })
}

async fn record_load(State(ctx): Ctx, Json(report): Json<LoadReport>) -> Json<serde_json::Value> {
    let n = report.vms.len();
    ctx.controller.record(report.vms);
    Json(serde_json::json!({ "recorded": n, "from": report.host }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MaintenanceBody {
    pub enter: bool,
    #[serde(default)]
    pub actor: Option<String>,
}

/// Enter: the host stops taking VMs and the leader evacuates it. Exit: back to connected.
async fn maintenance(
    State(ctx): Ctx,
    Extension(who): Extension<Principal>,
    Path(id): Path<u64>,
    Json(body): Json<MaintenanceBody>,
) -> Result<Json<Applied>, ApiError> {
    let state = ctx.state();
    let host = state
        .hosts
        .get(&id)
        .ok_or_else(|| with_status(StatusCode::NOT_FOUND, format!("no host {id}")))?;
    let target = if body.enter {
        if host.state == HostState::InMaintenance {
            HostState::InMaintenance
        } else {
            HostState::EnteringMaintenance
        }
    } else {
        HostState::Connected
    };
    let actor = who.actor_for(body.actor);
    let applied = ctx
        .api
        .propose(
            actor,
            None,
            Command::SetHostState { id, state: target },
            false,
        )
        .await?;
    Ok(Json(applied))
}

/// Ask the leader (forwarding once) for a DRS pass; `apply` queues its recommendations.
async fn leader_drs(ctx: &HostCtx, apply: bool, forwarded: bool) -> Result<DrsReport, ApiError> {
    if ctx.node.raft.current_leader().await == Some(ctx.id) {
        let state = ctx.state();
        let report = drs(ctx, &state, true)
            .await
            .ok_or_else(|| with_status(StatusCode::SERVICE_UNAVAILABLE, "drs pass failed"))?;
        if apply {
            queue_moves(ctx, &report.recommendations, "drs", "drs").await;
        }
        return Ok(report);
    }
    if forwarded {
        return Err(with_status(
            StatusCode::SERVICE_UNAVAILABLE,
            "not the leader",
        ));
    }
    let (_, leader) = ctx
        .api
        .leader_addr()
        .ok_or_else(|| with_status(StatusCode::SERVICE_UNAVAILABLE, "no leader known"))?;
    let path = if apply { "/v1/drs/apply" } else { "/v1/drs" };
    if apply {
        ctx.api.post_json(&leader, path, &(), true).await
    } else {
        ctx.api.get_json(&leader, path).await
    }
}

async fn drs_report(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<DrsReport>, ApiError> {
    Ok(Json(
        leader_drs(&ctx, false, headers.contains_key("x-tern-forwarded")).await?,
    ))
}

async fn drs_apply(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<DrsReport>, ApiError> {
    Ok(Json(
        leader_drs(&ctx, true, headers.contains_key("x-tern-forwarded")).await?,
    ))
}

/// Ranked destinations for one VM (the migration wizard), with reasons.
async fn recommend(
    State(ctx): Ctx,
    Path(name): Path<String>,
) -> Result<Json<tern_scheduler::Ranking>, ApiError> {
    let state = ctx.state();
    let loads = ctx.controller.loads(&state);
    let cluster =
        sched_view::cluster(&state, &loads, now_s()).map_err(|e| bad(format!("{e:#}")))?;
    tern_scheduler::rank_destinations(&cluster, &name, &tern_scheduler::Config::default())
        .map(Json)
        .map_err(|e| with_status(StatusCode::NOT_FOUND, e.to_string()))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LocalInfo {
    pub name: String,
    pub epoch: u64,
    /// vCPUs are running (not paused, not stopped).
    pub running: bool,
    pub migrating: bool,
    pub memory_mib: u64,
    pub workload: String,
}

/// The VMs this node holds right now: the ground truth for "runs on at most one host".
async fn local_vms(State(ctx): Ctx) -> Json<Vec<LocalInfo>> {
    let vms = ctx.vms();
    Json(
        vms.iter()
            .map(|(name, l)| LocalInfo {
                name: name.clone(),
                epoch: l.epoch,
                running: l.vm.lock().run_state() == tern_hypervisor::RunState::Running,
                migrating: l.migrating,
                memory_mib: l.cfg.memory_mib,
                workload: l.cfg.workload.clone(),
            })
            .collect(),
    )
}
