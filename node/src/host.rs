//! This host's VMs: which run here, as one `tern vmm` process each, started and stopped as the
//! committed state says.
//!
//! The reconciler reacts to every applied change (watch subscription): a VM the committed state
//! gives this host and marks running gets a VMM booted from its datastore files, under a lease
//! naming this host at the committed epoch; a local VM the state no longer gives this host (or
//! marks stopped) has its VMM stopped. VMs in the middle of a migration are left to the
//! migration code. The VMMs outlive the node: a restarted node adopts them (`adopt`).
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use tern_consensus::state::{TaskId, VmState};
use tern_consensus::{ClusterState, ConsensusNode};
use tern_hypervisor::migration::CancelToken;
use tern_hypervisor::vmm::{Client, VmSpec, VmmStatus};

use super::admission;
use super::cgroup::{Cgroups, PoolLimits, VmCgroup};
use super::cluster::Cluster;
use super::datastore::{Datastore, VmConfig};
use super::leader_state::LeaderState;
use super::supervisor::{Launch, Supervisor};

/// A VM whose VMM runs (or is paused for migration) on this host.
pub struct LocalVm {
    pub cfg: VmConfig,
    /// Ownership epoch this host runs it under.
    pub epoch: u64,
    /// The VMM's process id.
    pub pid: u32,
    /// An outbound migration is running; the reconciler leaves it alone.
    pub migrating: bool,
    /// The pool cgroup its VMM runs in (removed once the process has gone).
    pub cgroup: Option<VmCgroup>,
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
    /// The VMM processes of this host.
    pub supervisor: Supervisor,
    vms: Mutex<HashMap<String, LocalVm>>,
    /// VMs being received or booted here (not yet in `vms`).
    arriving: Mutex<HashSet<String>>,
    pub cancels: Mutex<HashMap<TaskId, CancelToken>>,
    pub progress: Mutex<HashMap<TaskId, TaskProgress>>,
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

/// What the VMM of a VM is told to run: its config, with the disk on the datastore.
pub fn vmm_spec(ds: &Datastore, cfg: &VmConfig) -> anyhow::Result<VmSpec> {
    Ok(VmSpec {
        name: cfg.name.clone(),
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
        workload: cfg.workload.clone(),
        disk: Some(ds.disk_path(&cfg.name)?),
    })
}

impl HostCtx {
    pub fn new(
        id: u64,
        cluster: Cluster,
        node: ConsensusNode,
        datastore: Option<Datastore>,
        ip: String,
        supervisor: Supervisor,
    ) -> Arc<HostCtx> {
        Arc::new(HostCtx {
            id,
            cluster,
            node,
            datastore,
            handle: tokio::runtime::Handle::current(),
            ip,
            supervisor,
            vms: Mutex::new(HashMap::new()),
            arriving: Mutex::new(HashSet::new()),
            cancels: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
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

    /// A client of a local VM's control socket.
    pub fn vmm(&self, name: &str) -> anyhow::Result<Client> {
        self.supervisor.client(name)
    }

    /// The status of a local VM's VMM.
    pub fn vmm_status(&self, name: &str) -> anyhow::Result<VmmStatus> {
        Ok(self.vmm(name)?.status()?)
    }

    pub fn datastore(&self) -> anyhow::Result<&Datastore> {
        self.datastore
            .as_ref()
            .context("this node has no --datastore, so it runs no VMs")
    }

    pub fn state(&self) -> Arc<ClusterState> {
        self.node.local_view().state
    }

    /// Put a VMM process in its pool's cgroups (VMs in no pool stay as they were).
    pub fn place(&self, name: &str, pid: u32, vcpus: u32) -> Option<VmCgroup> {
        let state = self.state();
        let pool = state.vms.get(name).and_then(|v| v.pool.as_deref());
        let cg = self.cgroups.get().filter(|_| pool.is_some())?;
        cg.place(name, pid, vcpus, &PoolLimits::of_vm(&state, name))
            .inspect_err(|e| tracing::warn!(vm = name, "pool limits not applied: {e}"))
            .ok()
    }

    /// Boot `name` fresh from its datastore files in a new VMM (blocking).
    fn boot(&self, name: &str, epoch: u64) -> anyhow::Result<()> {
        let ds = self.datastore()?;
        let cfg = ds.config(name)?;
        let state = self.state();
        let pool = state.vms.get(name).and_then(|v| v.pool.as_deref());
        if let Err(why) = admission::check(&state, self.id, name, pool) {
            metrics::counter!("tern_vm_admission_refused_total").increment(1);
            anyhow::bail!("not started: {why}");
        }
        ds.write_lease(name, self.id, epoch)?;
        let pid = self.supervisor.start(&Launch {
            spec: vmm_spec(ds, &cfg)?,
            epoch,
            lease: Some(ds.lease_path(name)?),
            receive: false,
        })?;
        let cgroup = self.place(name, pid, cfg.vcpus);
        self.vms().insert(
            name.to_string(),
            LocalVm {
                cfg,
                epoch,
                pid,
                migrating: false,
                cgroup,
            },
        );
        tracing::info!(vm = name, pid, epoch, "booted");
        Ok(())
    }

    /// Stop a local VM's VMM and forget it.
    pub fn stop_local(&self, name: &str) {
        let local = self.vms().remove(name);
        if let Err(e) = self.supervisor.stop(name) {
            tracing::warn!(vm = name, "stopping its VMM: {e:#}");
        }
        if let Some(cg) = local.and_then(|l| l.cgroup) {
            let _ = cg.release();
        }
        tracing::info!(vm = name, "stopped");
    }

    /// Bring local VMs in line with the committed state.
    fn reconcile(self: &Arc<Self>, state: &ClusterState) {
        let arriving = guard(&self.arriving).clone();
        // A VM whose local epoch is ahead of this node's view arrived through a commit this
        // node has not applied yet: keep it.
        let to_stop: Vec<String> = self
            .vms()
            .iter()
            .filter(|(name, local)| {
                !local.migrating
                    && state.vms.get(*name).is_none_or(|vm| {
                        vm.epoch >= local.epoch
                            && (vm.owner != self.id
                                || vm.epoch != local.epoch
                                || vm.state == VmState::Stopped)
                    })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in to_stop {
            self.stop_local(&name);
        }
        let Some(ds) = &self.datastore else {
            return;
        };
        for (name, vm) in &state.vms {
            let wanted = vm.owner == self.id && vm.state == VmState::Running;
            if !wanted {
                continue;
            }
            // The committed owner holds the lease even when its source could not write it.
            if let Err(e) = ds.write_lease(name, self.id, vm.epoch) {
                tracing::debug!(vm = %name, "lease: {e:#}");
            }
            if arriving.contains(name) || self.vms().contains_key(name) {
                continue;
            }
            // Claim the boot (reconciles run concurrently): exactly one of them boots it.
            if !self.arriving_insert(name) {
                continue;
            }
            if self.vms().contains_key(name) {
                self.arriving_remove(name);
                continue;
            }
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
