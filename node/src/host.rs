//! This host's VMs: which run here, booting and stopping them as the committed state says.
//!
//! The reconciler reacts to every applied change (watch subscription): a VM the committed state
//! gives this host and marks running is booted from its datastore config; a local VM the state
//! no longer gives this host (or marks stopped) is shut down. VMs in the middle of a migration
//! are left to the migration code.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use tern_consensus::state::{TaskId, VmState};
use tern_consensus::{ClusterState, ConsensusNode};
use tern_hypervisor::migration::{feature_words, CancelToken, KvmMigratable};
use tern_hypervisor::{Vm, Workload};

use super::admission;
use super::cgroup::{self, Cgroups, PoolLimits, VmCgroup};
use super::cluster::Cluster;
use super::datastore::{Datastore, VmConfig, VmLock};
use super::leader_state::LeaderState;

/// A VM running (or paused for migration) on this host.
pub struct LocalVm {
    pub vm: Arc<KvmMigratable>,
    pub cfg: VmConfig,
    /// Ownership epoch this host runs it under.
    pub epoch: u64,
    pub lock: Option<VmLock>,
    /// An outbound migration is running; the reconciler leaves it alone.
    pub migrating: bool,
    /// The pool cgroup its vCPU threads run in (declared after `vm`: dropped once they end).
    pub cgroup: Option<VmCgroup>,
}

/// What migration sends as the handshake's config string.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct WireConfig {
    pub vm: VmConfig,
    pub cpu_vendor: String,
}

/// Progress of an outbound migration, for `tern migrate --wait`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TaskProgress {
    pub phase: String,
    pub round: u32,
    pub bytes_sent: u64,
    pub bytes_remaining: u64,
}

pub struct HostCtx {
    pub id: u64,
    pub cluster: Cluster,
    pub node: ConsensusNode,
    pub datastore: Option<Datastore>,
    pub handle: tokio::runtime::Handle,
    /// IP this node listens on; inbound migration listeners bind it too.
    pub ip: String,
    vms: Mutex<HashMap<String, LocalVm>>,
    /// VMs being received or booted here (not yet in `vms`).
    arriving: Mutex<HashSet<String>>,
    pub cancels: Mutex<HashMap<TaskId, CancelToken>>,
    pub progress: Mutex<HashMap<TaskId, TaskProgress>>,
    cpu: std::sync::OnceLock<Option<(Vec<u32>, String)>>,
    /// The leader's load window and last DRS pass (used while this node leads).
    pub leader: LeaderState,
    /// Bandwidth cap per outbound migration in bytes/s (0 = none).
    pub migrate_bandwidth: std::sync::atomic::AtomicU64,
    /// This node's pool cgroups (unset where cgroups cannot be used).
    pub cgroups: std::sync::OnceLock<Cgroups>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HostCtx {
    pub fn new(
        id: u64,
        cluster: Cluster,
        node: ConsensusNode,
        datastore: Option<Datastore>,
        ip: String,
    ) -> Arc<HostCtx> {
        Arc::new(HostCtx {
            id,
            cluster,
            node,
            datastore,
            handle: tokio::runtime::Handle::current(),
            ip,
            vms: Mutex::new(HashMap::new()),
            arriving: Mutex::new(HashSet::new()),
            cancels: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            cpu: std::sync::OnceLock::new(),
            leader: Default::default(),
            migrate_bandwidth: Default::default(),
            cgroups: std::sync::OnceLock::new(),
        })
    }

    /// Mark `name` as arriving; false if it already was.
    pub fn arriving_insert(&self, name: &str) -> bool {
        guard(&self.arriving).insert(name.to_string())
    }

    pub fn arriving_remove(&self, name: &str) {
        guard(&self.arriving).remove(name);
    }

    pub fn reconcile_now(self: &Arc<Self>, state: &ClusterState) {
        self.reconcile(state)
    }

    pub fn vms(&self) -> MutexGuard<'_, HashMap<String, LocalVm>> {
        guard(&self.vms)
    }

    pub fn datastore(&self) -> anyhow::Result<&Datastore> {
        self.datastore
            .as_ref()
            .context("this node has no --datastore, so it runs no VMs")
    }

    pub fn state(&self) -> Arc<ClusterState> {
        self.node.local_view().state
    }

    /// CPU feature words and vendor a VM on this host sees (probed once with a tiny VM).
    pub fn cpu(&self) -> Option<(Vec<u32>, String)> {
        self.cpu
            .get_or_init(|| {
                let probe = Vm::new(tern_hypervisor::VmConfig {
                    memory: 32 << 20,
                    vcpus: 1,
                    serial_log: None,
                });
                match probe {
                    Ok(vm) => {
                        let f = vm.cpu_features();
                        Some((feature_words(&f), f.vendor.clone()))
                    }
                    Err(e) => {
                        tracing::warn!("no KVM on this host: {e}");
                        None
                    }
                }
            })
            .clone()
    }

    /// Boot `name` fresh from its datastore config (blocking).
    fn boot(&self, name: &str, epoch: u64) -> anyhow::Result<()> {
        let ds = self.datastore()?;
        let cfg = ds.config(name)?;
        let state = self.state();
        let pool = state.vms.get(name).and_then(|v| v.pool.as_deref());
        if let Err(why) = admission::check(&state, self.id, name, pool) {
            metrics::counter!("tern_vm_admission_refused_total").increment(1);
            anyhow::bail!("not started: {why}");
        }
        let lock = ds.lock_within(name, Duration::from_secs(5))?;
        let workload: Workload = cfg.workload.parse().context("workload")?;
        let vendor = self.cpu().map(|c| c.1).unwrap_or_default();
        let (vm, vcpus) = cgroup::with_new_vcpu_threads(|| {
            Vm::new(tern_hypervisor::VmConfig {
                memory: cfg.memory_mib << 20,
                vcpus: cfg.vcpus as usize,
                serial_log: None,
            })
        });
        let mut vm = vm?;
        // VMs in no pool stay as they were: nothing to enforce, and no change to how they
        // compete with the node's own threads.
        let cgroups = self.cgroups.get().filter(|_| pool.is_some());
        let cgroup = cgroups.and_then(|cg| {
            cg.place_threads(name, &vcpus, &PoolLimits::of_vm(&state, name))
                .inspect_err(|e| tracing::warn!(vm = name, "pool limits not applied: {e}"))
                .ok()
        });
        vm.boot(tern_hypervisor::guest_image::IMAGE, &workload.cmdline())?;
        let wire = serde_json::to_string(&WireConfig {
            vm: cfg.clone(),
            cpu_vendor: vendor,
        })?;
        self.vms().insert(
            name.to_string(),
            LocalVm {
                vm: Arc::new(KvmMigratable::new(vm, wire)),
                cfg,
                epoch,
                lock: Some(lock),
                migrating: false,
                cgroup,
            },
        );
        tracing::info!(vm = name, "booted");
        Ok(())
    }

    /// Stop and drop a local VM (releasing its lock).
    pub fn stop_local(&self, name: &str) {
        let Some(local) = self.vms().remove(name) else {
            return;
        };
        local.vm.lock().shutdown();
        tracing::info!(vm = name, "stopped");
    }

    /// Bring local VMs in line with the committed state.
    fn reconcile(self: &Arc<Self>, state: &ClusterState) {
        let arriving = guard(&self.arriving).clone();
        let to_stop: Vec<String> = self
            .vms()
            .iter()
            .filter(|(name, local)| {
                !local.migrating
                    && state.vms.get(*name).is_none_or(|vm| {
                        vm.owner != self.id
                            || vm.epoch != local.epoch
                            || vm.state == VmState::Stopped
                    })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in to_stop {
            self.stop_local(&name);
        }
        if self.datastore.is_none() {
            return;
        }
        for (name, vm) in &state.vms {
            let wanted = vm.owner == self.id && vm.state == VmState::Running;
            if !wanted || arriving.contains(name) || self.vms().contains_key(name) {
                continue;
            }
            guard(&self.arriving).insert(name.clone());
            let (ctx, name, epoch) = (self.clone(), name.clone(), vm.epoch);
            std::thread::spawn(move || {
                if let Err(e) = ctx.boot(&name, epoch) {
                    tracing::warn!(vm = %name, "boot failed: {e:#}");
                    std::thread::sleep(Duration::from_secs(1));
                }
                guard(&ctx.arriving).remove(&name);
                // Re-check: the state may have moved on while booting.
                let state = ctx.state();
                ctx.reconcile(&state);
            });
        }
    }
}

/// React to every committed change for the life of the node.
pub async fn reconcile_loop(ctx: Arc<HostCtx>) {
    let mut rx = ctx.node.machine.subscribe();
    loop {
        let state = rx.borrow_and_update().state.clone();
        let c = ctx.clone();
        let _ = tokio::task::spawn_blocking(move || c.reconcile(&state)).await;
        if rx.changed().await.is_err() {
            return;
        }
    }
}
