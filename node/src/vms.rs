//! VMs: create (validated, placed by the scheduler unless a host is named, recorded in the
//! datastore, committed), start, stop, destroy, and what runs on this host.
use serde::{Deserialize, Serialize};
use tern_consensus::state::{AutomationLevel, Command, VmSpec, VmState};
use tern_consensus::{Applied, ClusterState};
use tern_hypervisor::vmm::VmmState;
use tern_hypervisor::{GuestStatus, Workload};

use super::admission;
use super::datastore::{DirExists, RestartPolicy, VmConfig, DEFAULT_DISK_MIB, MAX_DISK_MIB};
use super::error::ServiceError;
use super::host::HostCtx;
use super::sched_view;

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
    /// Size of the VM's disk on the datastore, MiB (default 1 GiB).
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// What happens when the VM's process dies (default `always`).
    #[serde(default)]
    pub restart: Option<RestartPolicy>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateVmReply {
    pub name: String,
    pub host: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GuestReply {
    pub host: u64,
    pub epoch: u64,
    pub status: GuestStatus,
    /// vCPU-thread CPU time so far, seconds.
    pub cpu_s: f64,
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

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub async fn create(ctx: &HostCtx, body: CreateVmBody) -> Result<CreateVmReply, ServiceError> {
    let workload: Workload = body
        .workload
        .parse()
        .map_err(|e| ServiceError::bad(format!("workload: {e}")))?;
    if body.vcpus == 0 || body.vcpus > 64 || body.memory_mib < 32 || body.memory_mib > 3072 {
        return Err(ServiceError::bad(
            "vcpus must be 1..=64 and memory 32..=3072 MiB",
        ));
    }
    let disk_mib = body.disk_mib.unwrap_or(DEFAULT_DISK_MIB);
    if !(1..=MAX_DISK_MIB).contains(&disk_mib) {
        return Err(ServiceError::bad(format!(
            "disk size {disk_mib} MiB is out of range (1 MiB to 16 TiB)"
        )));
    }
    if workload.min_memory() > body.memory_mib << 20 {
        return Err(ServiceError::bad(format!(
            "workload needs at least {} MiB of memory",
            workload.min_memory().div_ceil(1 << 20)
        )));
    }
    let ds = ctx
        .datastore()
        .map_err(|e| ServiceError::unavailable(e.to_string()))?;
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
        disk_mib,
        restart: body.restart.unwrap_or_default(),
    };
    if state.vms.contains_key(&body.name) {
        return Err(ServiceError::conflict(format!("vm {:?} exists", body.name)));
    }
    admission::check(&state, host, &body.name, body.pool.as_deref())
        .map_err(ServiceError::conflict)?;
    ds.create(&cfg).map_err(|e| {
        if e.is::<DirExists>() {
            ServiceError::conflict(format!("vm {:?}: {e}", body.name))
        } else {
            ServiceError::bad(format!("{e:#}"))
        }
    })?;
    let actor = body.actor.clone().unwrap_or_else(|| "api".into());
    let spec = VmSpec {
        name: body.name.clone(),
        vcpus: body.vcpus,
        memory_mib: body.memory_mib,
        cpu_features: Vec::new(),
    };
    let created = ctx
        .cluster
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
        // The files are this request's own (created exclusively above). Remove them only when
        // the command was certainly refused: an unknown outcome may still commit the VM.
        if e.rejected.is_some() {
            let _ = ds.remove(&body.name);
        }
        return Err(e);
    }
    ctx.cluster
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
    Ok(CreateVmReply {
        name: body.name,
        host,
    })
}

/// Power-on placement by the scheduler.
fn place(state: &ClusterState, body: &CreateVmBody) -> Result<u64, ServiceError> {
    let cluster = sched_view::cluster(state, &Default::default(), now_s())
        .map_err(|e| ServiceError::bad(format!("{e:#}")))?;
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
        .map_err(|e| ServiceError::bad(format!("placement: {e}")))?;
    if state.drs.automation == AutomationLevel::Manual {
        // Like DRS in manual mode: recommend, never choose; the operator picks with --host.
        return Err(ServiceError::conflict(manual_placement_refusal(
            &body.name, &p.ranking,
        )));
    }
    p.host
        .as_deref()
        .and_then(sched_view::parse_host)
        .ok_or_else(|| ServiceError::conflict("no host can take this vm"))
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

/// A VM's config as recorded on the datastore (memory, vCPUs, workload, disk size).
pub fn config(ctx: &HostCtx, name: &str) -> Result<VmConfig, ServiceError> {
    let ds = ctx
        .datastore()
        .map_err(|e| ServiceError::unavailable(e.to_string()))?;
    if !ctx.state().vms.contains_key(name) {
        return Err(ServiceError::not_found(format!("no vm {name:?}")));
    }
    ds.config(name)
        .map_err(|e| ServiceError::not_found(format!("{e:#}")))
}

/// Commit a VM's wanted power state (its owner reacts).
pub async fn set_state(
    ctx: &HostCtx,
    actor: String,
    name: String,
    state: VmState,
) -> Result<Applied, ServiceError> {
    ctx.cluster
        .propose(actor, None, Command::SetVmState { vm: name, state }, false)
        .await
}

/// Delete a VM from the cluster, then its datastore files.
pub async fn destroy(ctx: &HostCtx, actor: String, name: String) -> Result<Applied, ServiceError> {
    let applied = ctx
        .cluster
        .propose(actor, None, Command::DeleteVm { vm: name.clone() }, false)
        .await?;
    if let Ok(ds) = ctx.datastore() {
        if let Err(e) = ds.remove(&name) {
            tracing::warn!("removing {name} from the datastore: {e:#}");
        }
    }
    Ok(applied)
}

/// The guest's status page and vCPU time, for a VM running here (asked of its VMM).
pub fn guest_status(ctx: &HostCtx, name: &str) -> Result<GuestReply, ServiceError> {
    let epoch = ctx
        .vms()
        .get(name)
        .map(|l| l.epoch)
        .ok_or_else(|| ServiceError::not_found(format!("{name} is not running here")))?;
    let st = ctx
        .vmm_status(name)
        .map_err(|e| ServiceError::unavailable(format!("{e:#}")))?;
    let status = st
        .guest
        .ok_or_else(|| ServiceError::unavailable(format!("{name} has no guest status now")))?;
    Ok(GuestReply {
        host: ctx.id,
        epoch,
        status,
        cpu_s: st.load.vcpu_cpu_ns as f64 / 1e9,
    })
}

/// The VMs this node holds right now: the ground truth for "runs on at most one host".
pub fn local(ctx: &HostCtx) -> Vec<LocalInfo> {
    let held: Vec<LocalInfo> = ctx
        .vms()
        .iter()
        .map(|(name, l)| LocalInfo {
            name: name.clone(),
            epoch: l.epoch,
            running: false,
            migrating: l.migrating,
            memory_mib: l.cfg.memory_mib,
            workload: l.cfg.workload.clone(),
        })
        .collect();
    held.into_iter()
        .map(|mut info| {
            info.running = ctx
                .vmm_status(&info.name)
                .is_ok_and(|s| s.state == VmmState::Running || s.state == VmmState::Migrating);
            info
        })
        .collect()
}
