//! The replicated cluster state and the commands that change it.
//!
//! `ClusterState::apply` is the only way state changes. It is deterministic: it never reads a
//! clock or any other input outside the command (time comes in the `Request` from the proposer),
//! and a rejected command leaves the state exactly as it was.
pub use imbl::{OrdMap, OrdSet, Vector};
use serde::{Deserialize, Serialize};

use crate::access::{AccessChange, AccessRole, AccessState};

pub type HostId = u64;
pub type TaskId = u64;

/// How many audit entries are kept; older ones are dropped (deterministically, by count).
pub const AUDIT_RETAIN: usize = 100_000;
/// The audit and the task history are trimmed back to their bound once they exceed it by this
/// many, so that most writes only append (trimming one entry per write would copy the head of
/// the persistent vector on every write).
pub const TRIM_BATCH: usize = 1_024;
/// A finished task stays in `tasks` (for `tern task list` and clients waiting on it) this long
/// after it finished, by the committed clock...
pub const FINISHED_TASK_RETAIN_MS: u64 = 3_600_000;
/// ...and at most this many finished tasks stay there; older ones move to `task_history`.
pub const FINISHED_TASK_RETAIN: usize = 1_000;
/// How many finished tasks `task_history` keeps; the oldest are dropped first.
pub const TASK_HISTORY_RETAIN: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    Connected,
    EnteringMaintenance,
    InMaintenance,
    /// The leader missed a few of its heartbeats: no placements or migrations to or from it.
    NotResponding,
    Down,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpus: u32,
    pub memory_mib: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: HostId,
    /// Address of the host's node API (also its Raft address).
    pub address: String,
    pub capacity: Capacity,
    pub cpu_features: Vec<String>,
    pub state: HostState,
    pub registered_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// CPU features the guest was started with; a destination must offer all of them.
    #[serde(default)]
    pub cpu_features: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Stopped,
    Running,
    Paused,
    Migrating,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub spec: VmSpec,
    pub pool: Option<String>,
    /// The one host allowed to run this VM's vCPUs.
    pub owner: HostId,
    /// Bumped on every ownership change; switchover commits compare-and-set on it.
    pub epoch: u64,
    pub state: VmState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourcePool {
    pub name: String,
    pub cpu_reservation_mhz: u64,
    pub cpu_limit_mhz: Option<u64>,
    pub memory_reservation_mib: u64,
    pub memory_limit_mib: Option<u64>,
    pub shares: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleKind {
    VmVmAffinity,
    VmVmAntiAffinity,
    VmHostAffinity,
    VmHostAntiAffinity,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub kind: RuleKind,
    /// `true`: must (hard), `false`: should (soft).
    pub mandatory: bool,
    pub vms: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<HostId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStats {
    pub downtime_us: u64,
    pub total_ms: u64,
    pub bytes: u64,
    pub rounds: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationTask {
    pub id: TaskId,
    pub vm: String,
    pub from: HostId,
    pub to: HostId,
    /// Higher runs first.
    pub priority: u8,
    pub state: TaskState,
    pub reason: String,
    pub requested_by: String,
    pub created_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub stats: TaskStats,
    pub error: Option<String>,
    /// Secret the destination requires from the source's stream for this task.
    #[serde(default)]
    pub token: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub name: String,
    /// Cron-like expression, interpreted by the component that owns the schedule.
    pub cron: String,
    pub action: String,
    pub enabled: bool,
    /// When it last fired (the minute for cron, the time for one-shot `@at MS` schedules).
    #[serde(default)]
    pub last_fired_ms: Option<u64>,
    /// Why the last firing created no task (e.g. the VM already had an active migration).
    #[serde(default)]
    pub last_error: Option<String>,
    /// Who committed the schedule (set by the state machine from the request's principal):
    /// the tasks it fires are requested by them.
    #[serde(default)]
    pub created_by: String,
}

/// The migration task a schedule's firing creates, in the same command as the firing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledTask {
    pub vm: String,
    pub to: HostId,
    pub priority: u8,
    pub reason: String,
    /// Who asked for the schedule (the task's requested_by).
    pub requested_by: String,
    /// Secret the destination will require from the source (generated by the proposer).
    pub token: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutomationLevel {
    Manual,
    PartiallyAutomated,
    FullyAutomated,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrsSettings {
    pub automation: AutomationLevel,
    /// 1 (conservative) ..= 5 (aggressive).
    pub migration_threshold: u8,
    pub interval_s: u32,
}

impl Default for DrsSettings {
    fn default() -> Self {
        DrsSettings {
            // Automatic placement, migrations only recommended: the safe start for a new cluster.
            automation: AutomationLevel::PartiallyAutomated,
            migration_threshold: 3,
            interval_s: 300,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Raft log index of the command, unique and ordered.
    pub index: u64,
    pub at_ms: u64,
    pub actor: String,
    pub action: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub roles: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub name: String,
    pub privileges: Vec<String>,
}

/// How many migrations may run at once: out of one host, into one host, in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotSettings {
    pub per_source: u32,
    pub per_destination: u32,
    pub per_cluster: u32,
}

impl Default for SlotSettings {
    fn default() -> Self {
        SlotSettings {
            per_source: 2,
            per_destination: 2,
            per_cluster: 4,
        }
    }
}

/// The whole replicated truth of the cluster.
///
/// The collections are persistent maps (`imbl`): cloning the state shares them, so the
/// published view and the next state differ only in the paths a command touched, and applying
/// a command costs O(log n) in the size of the state. They serialize exactly as the
/// `BTreeMap`s and `Vec`s of earlier versions did, so snapshots stay readable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub hosts: OrdMap<HostId, Host>,
    pub vms: OrdMap<String, Vm>,
    pub pools: OrdMap<String, ResourcePool>,
    pub rules: OrdMap<String, Rule>,
    /// Active tasks, and finished ones for a while (`FINISHED_TASK_RETAIN_MS`).
    pub tasks: OrdMap<TaskId, MigrationTask>,
    pub next_task_id: TaskId,
    pub schedules: OrdMap<String, Schedule>,
    pub drs: DrsSettings,
    pub audit: Vector<AuditEntry>,
    pub users: OrdMap<String, User>,
    pub roles: OrdMap<String, Role>,
    #[serde(default)]
    pub slots: SlotSettings,
    /// Operators' API tokens and join tokens (hashes only).
    #[serde(default)]
    pub access: AccessState,
    /// The audit trail of finished migration tasks that left `tasks`, oldest first (tokens
    /// cleared), bounded by `TASK_HISTORY_RETAIN`.
    #[serde(default)]
    pub task_history: Vector<MigrationTask>,
    #[serde(skip)]
    index: TaskIndex,
}

/// Lookups over `tasks` that `apply` needs in O(log n). Derived data: not serialized, rebuilt
/// on the first apply after a state is deserialized, and never part of equality.
#[derive(Clone, Default)]
struct TaskIndex {
    built: bool,
    /// The active (queued or running) task of each VM.
    active_by_vm: OrdMap<String, TaskId>,
    running: OrdSet<TaskId>,
    /// Finished tasks still in `tasks`, by (finish time, id).
    finished: OrdSet<(u64, TaskId)>,
}

impl PartialEq for TaskIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for TaskIndex {}

impl std::fmt::Debug for TaskIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskIndex")
    }
}

impl TaskIndex {
    fn add(&mut self, t: &MigrationTask) {
        match t.state {
            s if s.is_final() => {
                self.finished.insert((t.finished_at_ms.unwrap_or(0), t.id));
            }
            s => {
                self.active_by_vm.insert(t.vm.clone(), t.id);
                if s == TaskState::Running {
                    self.running.insert(t.id);
                }
            }
        }
    }

    fn remove(&mut self, t: &MigrationTask) {
        if t.state.is_final() {
            self.finished.remove(&(t.finished_at_ms.unwrap_or(0), t.id));
        } else {
            if self.active_by_vm.get(&t.vm) == Some(&t.id) {
                self.active_by_vm.remove(&t.vm);
            }
            self.running.remove(&t.id);
        }
    }
}

/// A command as proposed: who asks, when (the proposer's clock), and what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub actor: String,
    pub at_ms: u64,
    pub command: Command,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Register or update a host (re-registration keeps its state).
    RegisterHost {
        id: HostId,
        address: String,
        capacity: Capacity,
        cpu_features: Vec<String>,
    },
    SetHostState {
        id: HostId,
        state: HostState,
    },
    /// Remove a host; rejected while it owns VMs.
    RemoveHost {
        id: HostId,
    },
    CreateVm {
        spec: VmSpec,
        pool: Option<String>,
        owner: HostId,
    },
    SetVmState {
        vm: String,
        state: VmState,
    },
    DeleteVm {
        vm: String,
    },
    /// Compare-and-set ownership: applies only if `expected_owner`/`expected_epoch` match.
    TransferOwnership {
        vm: String,
        expected_owner: HostId,
        expected_epoch: u64,
        to: HostId,
    },
    /// Compare-and-set that keeps the owner and bumps the epoch: once committed, a transfer
    /// proposed at `expected_epoch` can never apply. A source whose switchover commit has an
    /// unknown outcome commits this to learn the outcome for certain (it fails with
    /// `OwnershipConflict` exactly when the transfer won).
    FenceVm {
        vm: String,
        expected_owner: HostId,
        expected_epoch: u64,
    },
    PutPool {
        pool: ResourcePool,
    },
    DeletePool {
        name: String,
    },
    PutRule {
        rule: Rule,
    },
    DeleteRule {
        name: String,
    },
    CreateTask {
        vm: String,
        to: HostId,
        priority: u8,
        reason: String,
        /// Secret the destination will require from the source (generated by the proposer).
        #[serde(default)]
        token: String,
    },
    UpdateTask {
        id: TaskId,
        state: TaskState,
        #[serde(default)]
        stats: Option<TaskStats>,
        #[serde(default)]
        error: Option<String>,
    },
    PutSchedule {
        schedule: Schedule,
    },
    DeleteSchedule {
        name: String,
    },
    SetDrs {
        settings: DrsSettings,
    },
    PutUser {
        user: User,
    },
    DeleteUser {
        name: String,
    },
    PutRole {
        role: Role,
    },
    /// Does nothing; used to measure commit latency and to check the leader can commit.
    /// Record that a schedule fired for slot `slot_ms` (a cron minute or an `@at` time) and
    /// create its migration task in the same log entry, so a fired schedule always has its task
    /// (or the recorded reason it could not be created). Rejected if it already fired for that
    /// slot or a later one, so it fires at most once per slot.
    FireSchedule {
        name: String,
        slot_ms: u64,
        #[serde(default)]
        task: Option<ScheduledTask>,
    },
    /// Migration concurrency limits (checked when a task is committed as running).
    SetSlots {
        slots: SlotSettings,
    },
    /// An operator's API token (`hash`: hex SHA-256 of its secret).
    CreateToken {
        name: String,
        role: AccessRole,
        hash: String,
        #[serde(default)]
        expires_at_ms: Option<u64>,
    },
    RevokeToken {
        name: String,
    },
    /// A token new hosts may join with until `expires_at_ms`.
    CreateJoinToken {
        hash: String,
        expires_at_ms: u64,
    },
    /// Record what happened to a VM on a host (its process died, it was restarted); changes
    /// nothing but the audit trail.
    RecordVmEvent {
        vm: String,
        host: HostId,
        event: String,
    },
    Noop,
}

/// What a successful command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Applied {
    Done,
    TaskCreated {
        id: TaskId,
    },
    OwnershipTransferred {
        vm: String,
        owner: HostId,
        epoch: u64,
    },
}

/// Why a command was rejected. Rejection changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum CommandError {
    #[error("unknown host {id}")]
    UnknownHost { id: HostId },
    #[error("unknown vm {name:?}")]
    UnknownVm { name: String },
    #[error("vm {name:?} already exists")]
    VmExists { name: String },
    #[error("unknown pool {name:?}")]
    UnknownPool { name: String },
    #[error("unknown rule {name:?}")]
    UnknownRule { name: String },
    #[error("unknown task {id}")]
    UnknownTask { id: TaskId },
    #[error("unknown schedule {name:?}")]
    UnknownSchedule { name: String },
    #[error("unknown user {name:?}")]
    UnknownUser { name: String },
    #[error("unknown role {name:?}")]
    UnknownRole { name: String },
    #[error("host {id} still owns {vms} vm(s)")]
    HostNotEmpty { id: HostId, vms: usize },
    #[error("host {id} is {state:?} and accepts no new vms")]
    HostUnavailable { id: HostId, state: HostState },
    #[error("ownership of {vm:?} is host {owner} epoch {epoch}, not host {expected_owner} epoch {expected_epoch}")]
    OwnershipConflict {
        vm: String,
        owner: HostId,
        epoch: u64,
        expected_owner: HostId,
        expected_epoch: u64,
    },
    #[error("task {id} is already {state:?}")]
    TaskFinal { id: TaskId, state: TaskState },
    #[error("invalid: {reason}")]
    Invalid { reason: String },
}

/// Drop the oldest entries down to `keep` once there are `TRIM_BATCH` too many.
fn trim_front<T: Clone>(v: &mut Vector<T>, keep: usize) {
    if v.len() >= keep + TRIM_BATCH {
        *v = v.skip(v.len() - keep);
    }
}

fn invalid(reason: impl Into<String>) -> CommandError {
    CommandError::Invalid {
        reason: reason.into(),
    }
}

impl ClusterState {
    /// Validate and apply one command at log position `index`. On error nothing changed.
    pub fn apply(&mut self, index: u64, req: &Request) -> Result<Applied, CommandError> {
        self.ensure_index();
        let applied = self.apply_command(req)?;
        if !matches!(req.command, Command::Noop) {
            self.audit.push_back(AuditEntry {
                index,
                at_ms: req.at_ms,
                actor: req.actor.clone(),
                action: describe(&req.command),
            });
            trim_front(&mut self.audit, AUDIT_RETAIN);
        }
        self.retire_finished_tasks(req.at_ms);
        Ok(applied)
    }

    /// A task by id, live or in the history.
    pub fn find_task(&self, id: TaskId) -> Option<&MigrationTask> {
        self.tasks
            .get(&id)
            .or_else(|| self.task_history.iter().rev().find(|t| t.id == id))
    }

    /// Every task the state knows, finished history first, then the live ones by id.
    pub fn all_tasks(&self) -> impl Iterator<Item = &MigrationTask> {
        self.task_history.iter().chain(self.tasks.values())
    }

    /// The same state without secrets (migration tokens), for answers that leave the nodes.
    pub fn without_secrets(&self) -> ClusterState {
        let mut state = self.clone();
        for (id, task) in &self.tasks {
            if !task.token.is_empty() {
                let mut t = task.clone();
                t.token.clear();
                state.tasks.insert(*id, t);
            }
        }
        state.access = self.access.redacted();
        state
    }

    fn ensure_index(&mut self) {
        if self.index.built {
            return;
        }
        let mut index = TaskIndex {
            built: true,
            ..TaskIndex::default()
        };
        for t in self.tasks.values() {
            index.add(t);
        }
        self.index = index;
    }

    /// Insert or replace a task, keeping the index in step.
    fn put_task(&mut self, task: MigrationTask) {
        if let Some(old) = self.tasks.get(&task.id) {
            self.index.remove(old);
        }
        self.index.add(&task);
        self.tasks.insert(task.id, task);
    }

    /// Move finished tasks past their retention from `tasks` to `task_history`.
    fn retire_finished_tasks(&mut self, now_ms: u64) {
        while let Some(&(finished_ms, id)) = self.index.finished.get_min() {
            let expired = finished_ms.saturating_add(FINISHED_TASK_RETAIN_MS) <= now_ms;
            if !expired && self.index.finished.len() <= FINISHED_TASK_RETAIN {
                break;
            }
            self.index.finished.remove(&(finished_ms, id));
            if let Some(mut task) = self.tasks.remove(&id) {
                task.token.clear();
                self.task_history.push_back(task);
            }
            trim_front(&mut self.task_history, TASK_HISTORY_RETAIN);
        }
    }

    /// Whether one more migration from `from` to `to` fits the slot limits; says why not.
    pub fn slot_free(&self, from: HostId, to: HostId) -> Result<(), String> {
        let running: Vec<&MigrationTask> = if self.index.built {
            let ids = self.index.running.iter();
            ids.filter_map(|id| self.tasks.get(id)).collect()
        } else {
            let all = self.tasks.values();
            all.filter(|t| t.state == TaskState::Running).collect()
        };
        let out = running.iter().filter(|t| t.from == from).count() as u32;
        let inb = running.iter().filter(|t| t.to == to).count() as u32;
        if out >= self.slots.per_source {
            return Err(format!("host {from} already sends {out} migrations"));
        }
        if inb >= self.slots.per_destination {
            return Err(format!("host {to} already receives {inb} migrations"));
        }
        if running.len() as u32 >= self.slots.per_cluster {
            return Err(format!(
                "{} migrations already run in the cluster",
                running.len()
            ));
        }
        Ok(())
    }

    fn host(&self, id: HostId) -> Result<&Host, CommandError> {
        self.hosts.get(&id).ok_or(CommandError::UnknownHost { id })
    }

    /// A host that may receive a new VM (by creation or migration).
    fn placeable_host(&self, id: HostId) -> Result<&Host, CommandError> {
        let host = self.host(id)?;
        match host.state {
            HostState::Connected => Ok(host),
            state => Err(CommandError::HostUnavailable { id, state }),
        }
    }

    /// Validate a new migration task and build it with the next id (the caller inserts it).
    fn new_task(&self, t: ScheduledTask, at_ms: u64) -> Result<MigrationTask, CommandError> {
        let from = self.vm(&t.vm)?.owner;
        if from == t.to {
            return Err(invalid(format!(
                "vm {:?} already runs on host {}",
                t.vm, t.to
            )));
        }
        let active = self.index.active_by_vm.get(&t.vm);
        if let Some(active) = active.and_then(|id| self.tasks.get(id)) {
            return Err(invalid(format!(
                "vm {:?} already has migration task {} ({:?})",
                t.vm, active.id, active.state
            )));
        }
        self.placeable_host(t.to)?;
        Ok(MigrationTask {
            id: self.next_task_id,
            vm: t.vm,
            from,
            to: t.to,
            priority: t.priority,
            state: TaskState::Queued,
            reason: t.reason,
            requested_by: t.requested_by,
            created_at_ms: at_ms,
            started_at_ms: None,
            finished_at_ms: None,
            stats: TaskStats::default(),
            error: None,
            token: t.token,
        })
    }

    fn vm(&self, name: &str) -> Result<&Vm, CommandError> {
        self.vms.get(name).ok_or_else(|| CommandError::UnknownVm {
            name: name.to_string(),
        })
    }

    // Each arm validates fully before its first mutation, so an error leaves state untouched.
    fn apply_command(&mut self, req: &Request) -> Result<Applied, CommandError> {
        match &req.command {
            Command::RegisterHost {
                id,
                address,
                capacity,
                cpu_features,
            } => {
                if address.is_empty() {
                    return Err(invalid("host address is empty"));
                }
                let state = self.hosts.get(id).map_or(HostState::Connected, |h| h.state);
                let registered_at_ms = self.hosts.get(id).map_or(req.at_ms, |h| h.registered_at_ms);
                self.hosts.insert(
                    *id,
                    Host {
                        id: *id,
                        address: address.clone(),
                        capacity: capacity.clone(),
                        cpu_features: cpu_features.clone(),
                        state,
                        registered_at_ms,
                    },
                );
            }
            Command::SetHostState { id, state } => {
                self.host(*id)?;
                if let Some(h) = self.hosts.get_mut(id) {
                    h.state = *state;
                }
            }
            Command::RemoveHost { id } => {
                self.host(*id)?;
                let vms = self.vms.values().filter(|vm| vm.owner == *id).count();
                if vms > 0 {
                    return Err(CommandError::HostNotEmpty { id: *id, vms });
                }
                self.hosts.remove(id);
            }
            Command::CreateVm { spec, pool, owner } => {
                if spec.name.is_empty() || spec.vcpus == 0 || spec.memory_mib == 0 {
                    return Err(invalid(
                        "vm needs a name, at least one vcpu and some memory",
                    ));
                }
                if self.vms.contains_key(&spec.name) {
                    return Err(CommandError::VmExists {
                        name: spec.name.clone(),
                    });
                }
                if let Some(p) = pool {
                    if !self.pools.contains_key(p) {
                        return Err(CommandError::UnknownPool { name: p.clone() });
                    }
                }
                self.placeable_host(*owner)?;
                self.vms.insert(
                    spec.name.clone(),
                    Vm {
                        spec: spec.clone(),
                        pool: pool.clone(),
                        owner: *owner,
                        epoch: 0,
                        state: VmState::Stopped,
                    },
                );
            }
            Command::SetVmState { vm, state } => {
                self.vm(vm)?;
                if let Some(v) = self.vms.get_mut(vm) {
                    v.state = *state;
                }
            }
            Command::DeleteVm { vm } => {
                self.vm(vm)?;
                self.vms.remove(vm);
            }
            Command::TransferOwnership {
                vm,
                expected_owner,
                expected_epoch,
                to,
            } => {
                let current = self.vm(vm)?;
                if current.owner != *expected_owner || current.epoch != *expected_epoch {
                    return Err(CommandError::OwnershipConflict {
                        vm: vm.clone(),
                        owner: current.owner,
                        epoch: current.epoch,
                        expected_owner: *expected_owner,
                        expected_epoch: *expected_epoch,
                    });
                }
                if to == expected_owner {
                    return Err(invalid("ownership transfer to the current owner"));
                }
                self.placeable_host(*to)?;
                let epoch = expected_epoch + 1;
                if let Some(v) = self.vms.get_mut(vm) {
                    v.owner = *to;
                    v.epoch = epoch;
                }
                return Ok(Applied::OwnershipTransferred {
                    vm: vm.clone(),
                    owner: *to,
                    epoch,
                });
            }
            Command::FenceVm {
                vm,
                expected_owner,
                expected_epoch,
            } => {
                let current = self.vm(vm)?;
                if current.owner != *expected_owner || current.epoch != *expected_epoch {
                    return Err(CommandError::OwnershipConflict {
                        vm: vm.clone(),
                        owner: current.owner,
                        epoch: current.epoch,
                        expected_owner: *expected_owner,
                        expected_epoch: *expected_epoch,
                    });
                }
                let epoch = expected_epoch + 1;
                if let Some(v) = self.vms.get_mut(vm) {
                    v.epoch = epoch;
                }
                return Ok(Applied::OwnershipTransferred {
                    vm: vm.clone(),
                    owner: *expected_owner,
                    epoch,
                });
            }
            Command::PutPool { pool } => {
                if pool.name.is_empty() || pool.shares == 0 {
                    return Err(invalid("pool needs a name and non-zero shares"));
                }
                if pool
                    .cpu_limit_mhz
                    .is_some_and(|l| l < pool.cpu_reservation_mhz)
                    || pool
                        .memory_limit_mib
                        .is_some_and(|l| l < pool.memory_reservation_mib)
                {
                    return Err(invalid("pool limit below its reservation"));
                }
                self.pools.insert(pool.name.clone(), pool.clone());
            }
            Command::DeletePool { name } => {
                if !self.pools.contains_key(name) {
                    return Err(CommandError::UnknownPool { name: name.clone() });
                }
                if self
                    .vms
                    .values()
                    .any(|vm| vm.pool.as_deref() == Some(name.as_str()))
                {
                    return Err(invalid(format!("pool {name:?} still holds vms")));
                }
                self.pools.remove(name);
            }
            Command::PutRule { rule } => {
                if rule.name.is_empty() || rule.vms.is_empty() {
                    return Err(invalid("rule needs a name and at least one vm"));
                }
                let host_rule = matches!(
                    rule.kind,
                    RuleKind::VmHostAffinity | RuleKind::VmHostAntiAffinity
                );
                if host_rule == rule.hosts.is_empty() {
                    return Err(invalid("vm-host rules name hosts, vm-vm rules do not"));
                }
                for vm in &rule.vms {
                    self.vm(vm)?;
                }
                for h in &rule.hosts {
                    self.host(*h)?;
                }
                self.rules.insert(rule.name.clone(), rule.clone());
            }
            Command::DeleteRule { name } => {
                if self.rules.remove(name).is_none() {
                    return Err(CommandError::UnknownRule { name: name.clone() });
                }
            }
            Command::CreateTask {
                vm,
                to,
                priority,
                reason,
                token,
            } => {
                let task = self.new_task(
                    ScheduledTask {
                        vm: vm.clone(),
                        to: *to,
                        priority: *priority,
                        reason: reason.clone(),
                        requested_by: req.actor.clone(),
                        token: token.clone(),
                    },
                    req.at_ms,
                )?;
                let id = task.id;
                self.next_task_id += 1;
                self.put_task(task);
                return Ok(Applied::TaskCreated { id });
            }
            Command::UpdateTask {
                id,
                state,
                stats,
                error,
            } => {
                let current = self
                    .tasks
                    .get(id)
                    .ok_or(CommandError::UnknownTask { id: *id })?;
                if *state == TaskState::Running && current.state == TaskState::Queued {
                    self.slot_free(current.from, current.to)
                        .map_err(|why| invalid(format!("no free migration slot: {why}")))?;
                }
                let mut task = current.clone();
                if task.state.is_final() {
                    return Err(CommandError::TaskFinal {
                        id: *id,
                        state: task.state,
                    });
                }
                if *state == TaskState::Queued {
                    return Err(invalid("a task cannot go back to queued"));
                }
                task.state = *state;
                if *state == TaskState::Running && task.started_at_ms.is_none() {
                    task.started_at_ms = Some(req.at_ms);
                }
                if state.is_final() {
                    task.finished_at_ms = Some(req.at_ms);
                }
                if let Some(s) = stats {
                    task.stats = s.clone();
                }
                if error.is_some() {
                    task.error = error.clone();
                }
                self.put_task(task);
            }
            Command::PutSchedule { schedule } => {
                if schedule.name.is_empty() || schedule.cron.is_empty() {
                    return Err(invalid("schedule needs a name and a cron expression"));
                }
                let mut schedule = schedule.clone();
                schedule.created_by = req.actor.clone();
                self.schedules.insert(schedule.name.clone(), schedule);
            }
            Command::DeleteSchedule { name } => {
                if self.schedules.remove(name).is_none() {
                    return Err(CommandError::UnknownSchedule { name: name.clone() });
                }
            }
            Command::SetDrs { settings } => {
                if !(1..=5).contains(&settings.migration_threshold) || settings.interval_s == 0 {
                    return Err(invalid(
                        "migration threshold must be 1..=5 and interval non-zero",
                    ));
                }
                self.drs = settings.clone();
            }
            Command::PutUser { user } => {
                if user.name.is_empty() {
                    return Err(invalid("user needs a name"));
                }
                if let Some(r) = user.roles.iter().find(|r| !self.roles.contains_key(*r)) {
                    return Err(CommandError::UnknownRole { name: r.clone() });
                }
                self.users.insert(user.name.clone(), user.clone());
            }
            Command::DeleteUser { name } => {
                if self.users.remove(name).is_none() {
                    return Err(CommandError::UnknownUser { name: name.clone() });
                }
            }
            Command::PutRole { role } => {
                if role.name.is_empty() {
                    return Err(invalid("role needs a name"));
                }
                self.roles.insert(role.name.clone(), role.clone());
            }
            Command::FireSchedule {
                name,
                slot_ms,
                task,
            } => {
                let sched = self
                    .schedules
                    .get(name)
                    .ok_or_else(|| CommandError::UnknownSchedule { name: name.clone() })?;
                if sched.last_fired_ms.is_some_and(|l| l >= *slot_ms) {
                    return Err(invalid(format!(
                        "schedule {name:?} already fired for {slot_ms}"
                    )));
                }
                // A task that cannot be created (VM gone, busy, destination unavailable) still
                // consumes the slot, with the reason kept on the schedule: retrying every tick
                // would fill the log, and a one-shot schedule would never settle.
                let created = task.as_ref().map(|t| self.new_task(t.clone(), req.at_ms));
                let mut applied = Applied::Done;
                let mut error = None;
                match created {
                    Some(Ok(t)) => {
                        applied = Applied::TaskCreated { id: t.id };
                        self.next_task_id += 1;
                        self.put_task(t);
                    }
                    Some(Err(e)) => error = Some(e.to_string()),
                    None => {}
                }
                if let Some(sched) = self.schedules.get_mut(name) {
                    sched.last_fired_ms = Some(*slot_ms);
                    sched.last_error = error;
                    if sched.cron.starts_with("@at ") {
                        sched.enabled = false;
                    }
                }
                return Ok(applied);
            }
            Command::SetSlots { slots } => {
                if slots.per_source == 0 || slots.per_destination == 0 || slots.per_cluster == 0 {
                    return Err(invalid("every slot limit must be at least 1"));
                }
                self.slots = slots.clone();
            }
            Command::CreateToken {
                name,
                role,
                hash,
                expires_at_ms,
            } => self.access.apply(
                AccessChange::CreateToken {
                    name,
                    role: *role,
                    hash,
                    expires_at_ms: *expires_at_ms,
                },
                &req.actor,
                req.at_ms,
            )?,
            Command::RevokeToken { name } => {
                self.access
                    .apply(AccessChange::RevokeToken { name }, &req.actor, req.at_ms)?
            }
            Command::CreateJoinToken {
                hash,
                expires_at_ms,
            } => self.access.apply(
                AccessChange::CreateJoinToken {
                    hash,
                    expires_at_ms: *expires_at_ms,
                },
                &req.actor,
                req.at_ms,
            )?,
            Command::RecordVmEvent { vm, event, .. } => {
                self.vm(vm)?;
                if event.is_empty() || event.len() > 1024 {
                    return Err(invalid("a vm event is 1-1024 bytes"));
                }
            }
            Command::Noop => {}
        }
        Ok(Applied::Done)
    }
}

/// One line for the audit trail.
fn describe(cmd: &Command) -> String {
    match cmd {
        Command::RegisterHost { id, address, .. } => format!("register host {id} at {address}"),
        Command::SetHostState { id, state } => format!("set host {id} state {state:?}"),
        Command::RemoveHost { id } => format!("remove host {id}"),
        Command::CreateVm { spec, owner, .. } => format!("create vm {} on host {owner}", spec.name),
        Command::SetVmState { vm, state } => format!("set vm {vm} state {state:?}"),
        Command::DeleteVm { vm } => format!("delete vm {vm}"),
        Command::TransferOwnership {
            vm,
            expected_owner,
            expected_epoch,
            to,
        } => {
            format!(
                "transfer vm {vm} from host {expected_owner} to host {to} (epoch {})",
                expected_epoch + 1
            )
        }
        Command::FenceVm {
            vm,
            expected_owner,
            expected_epoch,
        } => format!(
            "fence vm {vm} on host {expected_owner} (epoch {})",
            expected_epoch + 1
        ),
        Command::PutPool { pool } => format!("put pool {}", pool.name),
        Command::DeletePool { name } => format!("delete pool {name}"),
        Command::PutRule { rule } => format!("put rule {}", rule.name),
        Command::DeleteRule { name } => format!("delete rule {name}"),
        Command::CreateTask { vm, to, reason, .. } => {
            format!("create migration task vm {vm} to host {to} ({reason})")
        }
        Command::UpdateTask { id, state, .. } => format!("task {id} {state:?}"),
        Command::PutSchedule { schedule } => format!("put schedule {}", schedule.name),
        Command::DeleteSchedule { name } => format!("delete schedule {name}"),
        Command::SetDrs { settings } => format!(
            "set drs {:?} threshold {} interval {}s",
            settings.automation, settings.migration_threshold, settings.interval_s
        ),
        Command::PutUser { user } => format!("put user {}", user.name),
        Command::DeleteUser { name } => format!("delete user {name}"),
        Command::PutRole { role } => format!("put role {}", role.name),
        Command::FireSchedule {
            name,
            slot_ms,
            task,
        } => match task {
            Some(t) => format!(
                "fire schedule {name} ({slot_ms}): migrate vm {} to host {} ({})",
                t.vm, t.to, t.reason
            ),
            None => format!("fire schedule {name} ({slot_ms})"),
        },
        Command::SetSlots { slots } => format!(
            "set migration slots {}/{}/{} (source/destination/cluster)",
            slots.per_source, slots.per_destination, slots.per_cluster
        ),
        Command::CreateToken { name, role, .. } => format!("create {role} token {name}"),
        Command::RevokeToken { name } => format!("revoke token {name}"),
        Command::CreateJoinToken { expires_at_ms, .. } => {
            format!("create join token (expires {expires_at_ms})")
        }
        Command::RecordVmEvent { vm, host, event } => format!("vm {vm} on host {host}: {event}"),
        Command::Noop => "noop".to_string(),
    }
}

#[cfg(test)]
mod fence_tests {
    use super::*;

    fn req(command: Command) -> Request {
        Request {
            actor: "t".into(),
            at_ms: 1,
            command,
        }
    }

    fn two_hosts_one_vm() -> ClusterState {
        let mut s = ClusterState::default();
        for id in [1, 2] {
            s.apply(
                id,
                &req(Command::RegisterHost {
                    id,
                    address: "x".into(),
                    capacity: Capacity::default(),
                    cpu_features: vec![],
                }),
            )
            .expect("register");
        }
        let spec = VmSpec {
            name: "vm".into(),
            vcpus: 1,
            memory_mib: 64,
            cpu_features: vec![],
        };
        s.apply(
            3,
            &req(Command::CreateVm {
                spec,
                pool: None,
                owner: 1,
            }),
        )
        .expect("create");
        s
    }

    fn transfer() -> Command {
        Command::TransferOwnership {
            vm: "vm".into(),
            expected_owner: 1,
            expected_epoch: 0,
            to: 2,
        }
    }

    fn fence() -> Command {
        Command::FenceVm {
            vm: "vm".into(),
            expected_owner: 1,
            expected_epoch: 0,
        }
    }

    #[test]
    fn a_committed_fence_makes_the_pending_transfer_fail() {
        let mut s = two_hosts_one_vm();
        s.apply(4, &req(fence())).expect("fence");
        let before = s.clone();
        assert!(matches!(
            s.apply(5, &req(transfer())),
            Err(CommandError::OwnershipConflict {
                owner: 1,
                epoch: 1,
                ..
            })
        ));
        assert_eq!(s, before);
        assert_eq!((s.vms["vm"].owner, s.vms["vm"].epoch), (1, 1));
    }

    #[test]
    fn a_fence_after_the_transfer_reports_the_new_owner() {
        let mut s = two_hosts_one_vm();
        s.apply(4, &req(transfer())).expect("transfer");
        let before = s.clone();
        assert!(matches!(
            s.apply(5, &req(fence())),
            Err(CommandError::OwnershipConflict {
                owner: 2,
                epoch: 1,
                ..
            })
        ));
        assert_eq!(s, before);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(state: &mut ClusterState, cmd: Command) -> Result<Applied, CommandError> {
        let index = state.audit.len() as u64 + 1;
        state.apply(
            index,
            &Request {
                actor: "scheduler".into(),
                at_ms: 1_000,
                command: cmd,
            },
        )
    }

    #[test]
    fn a_vm_event_changes_nothing_but_the_audit_trail() {
        let mut s = cluster("0 2 * * *");
        let before = s.vms.clone();
        let n = s.audit.len();
        let event = |vm: &str, event: &str| Command::RecordVmEvent {
            vm: vm.into(),
            host: 1,
            event: event.into(),
        };
        apply(&mut s, event("a", "VMM pid 7 died (killed or crashed)")).unwrap();
        assert_eq!(s.vms, before);
        assert_eq!(s.audit.len(), n + 1);
        let last = &s.audit[s.audit.len() - 1].action;
        assert_eq!(last, "vm a on host 1: VMM pid 7 died (killed or crashed)");
        // An unknown VM or an empty or oversized event is refused and leaves no entry.
        assert!(apply(&mut s, event("zz", "x")).is_err());
        assert!(apply(&mut s, event("a", "")).is_err());
        assert!(apply(&mut s, event("a", &"x".repeat(2000))).is_err());
        assert_eq!(s.audit.len(), n + 1);
    }

    /// Two hosts, vm `a` on host 1, and a schedule `s` with the given cron.
    fn cluster(cron: &str) -> ClusterState {
        let mut s = ClusterState::default();
        for id in [1, 2] {
            let host = Command::RegisterHost {
                id,
                address: format!("h{id}"),
                capacity: Capacity {
                    cpus: 4,
                    memory_mib: 4096,
                },
                cpu_features: vec![],
            };
            apply(&mut s, host).expect("register host");
        }
        let vm = Command::CreateVm {
            spec: VmSpec {
                name: "a".into(),
                vcpus: 1,
                memory_mib: 64,
                cpu_features: vec![],
            },
            pool: None,
            owner: 1,
        };
        apply(&mut s, vm).expect("create vm");
        let schedule = Schedule {
            name: "s".into(),
            cron: cron.into(),
            action: "{}".into(),
            enabled: true,
            last_fired_ms: None,
            last_error: None,
            created_by: String::new(),
        };
        apply(&mut s, Command::PutSchedule { schedule }).expect("put schedule");
        s
    }

    fn fire(slot_ms: u64, to: HostId) -> Command {
        Command::FireSchedule {
            name: "s".into(),
            slot_ms,
            task: Some(ScheduledTask {
                vm: "a".into(),
                to,
                priority: 2,
                reason: "scheduled".into(),
                requested_by: "alice".into(),
                token: "t0k".into(),
            }),
        }
    }

    #[test]
    fn firing_a_schedule_creates_its_task_in_the_same_command() {
        let mut s = cluster("* * * * *");
        let applied = apply(&mut s, fire(60_000, 2)).expect("fire");
        let Applied::TaskCreated { id } = applied else {
            panic!("firing created no task: {applied:?}");
        };
        let task = &s.tasks[&id];
        assert_eq!((task.vm.as_str(), task.from, task.to), ("a", 1, 2));
        assert_eq!(task.state, TaskState::Queued);
        assert_eq!(task.requested_by, "alice");
        assert_eq!(task.reason, "scheduled");
        assert_eq!(task.token, "t0k");
        assert_eq!(s.schedules["s"].last_fired_ms, Some(60_000));
        assert!(s.schedules["s"].enabled, "a cron schedule stays enabled");
    }

    #[test]
    fn a_slot_fires_at_most_once_and_a_refused_firing_changes_nothing() {
        let mut s = cluster("* * * * *");
        apply(&mut s, fire(60_000, 2)).expect("first firing");
        let before = s.clone();
        // A second leader firing the same (or an earlier) slot is refused, task and all.
        assert!(apply(&mut s, fire(60_000, 2)).is_err());
        assert!(apply(&mut s, fire(0, 2)).is_err());
        assert_eq!(s, before);
        assert_eq!(s.tasks.len(), 1);
    }

    #[test]
    fn a_task_that_cannot_be_created_still_consumes_the_slot_with_the_reason() {
        let mut s = cluster("@at 5000");
        // The VM already runs on host 1: no task, but the one-shot schedule settles.
        let applied = apply(&mut s, fire(5_000, 1)).expect("fire");
        assert_eq!(applied, Applied::Done);
        assert!(s.tasks.is_empty());
        let sched = &s.schedules["s"];
        assert_eq!(sched.last_fired_ms, Some(5_000));
        assert!(!sched.enabled, "a one-shot schedule is disabled once fired");
        let why = sched.last_error.as_deref().unwrap_or_default();
        assert!(why.contains("already runs on host 1"), "{why}");
        assert!(
            apply(&mut s, fire(5_000, 2)).is_err(),
            "the slot is used up"
        );
    }

    #[test]
    fn an_unknown_schedule_does_not_fire_or_create_a_task() {
        let mut s = cluster("* * * * *");
        let cmd = match fire(60_000, 2) {
            Command::FireSchedule { slot_ms, task, .. } => Command::FireSchedule {
                name: "nope".into(),
                slot_ms,
                task,
            },
            other => other,
        };
        assert!(matches!(
            apply(&mut s, cmd),
            Err(CommandError::UnknownSchedule { .. })
        ));
        assert!(s.tasks.is_empty());
    }
}
