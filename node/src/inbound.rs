//! The destination side: a migration stream is accepted only for a committed, running task that
//! names this host, on a listener opened for that task, authenticated by the task's token. The
//! received VM resumes only once this node has applied the ownership commit that gives it the VM.
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_consensus::state::{MigrationTask, TaskId, TaskState};
use tern_hypervisor::migration::{
    receive, Hello, KvmMigratable, MigratableVm, PageBitmap, ReceiveConfig, VmResult,
};
use tern_hypervisor::Vm;

use super::datastore::VmLock;
use super::host::{HostCtx, LocalVm, WireConfig};

/// How long a prepared listener waits for its source.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the destination waits, told to resume, for the ownership commit to be applied here.
/// The source sends `Resume` only after the commit, so the commit does exist and this node will
/// apply it once it hears from the majority again (it may be cut off right now): giving up early
/// would leave the committed owner without the VM's state, so wait long.
const COMMIT_WAIT: Duration = Duration::from_secs(600);

/// Why a prepare request is refused (HTTP 409 / 404 / 503).
#[derive(Debug)]
pub enum Refusal {
    NoTask(TaskId),
    Invalid(String),
    Unavailable(String),
}

/// Wait briefly until this node has applied task `id` (the source commits it before asking).
async fn committed_task(ctx: &HostCtx, id: TaskId) -> Option<MigrationTask> {
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let state = ctx.state();
        if let Some(t) = state.tasks.get(&id) {
            if t.state != TaskState::Queued || Instant::now() >= until {
                return Some(t.clone());
            }
        } else if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Open a listener for task `id` and receive its VM in the background; returns the address.
pub async fn prepare(ctx: Arc<HostCtx>, id: TaskId) -> Result<String, Refusal> {
    let task = committed_task(&ctx, id).await.ok_or(Refusal::NoTask(id))?;
    if task.to != ctx.id {
        return Err(Refusal::Invalid(format!(
            "task {id} migrates to host {}, not this host ({})",
            task.to, ctx.id
        )));
    }
    if task.state != TaskState::Running {
        return Err(Refusal::Invalid(format!(
            "task {id} is {:?}, not running",
            task.state
        )));
    }
    let state = ctx.state();
    let vm = state
        .vms
        .get(&task.vm)
        .ok_or_else(|| Refusal::Invalid(format!("vm {} no longer exists", task.vm)))?;
    if vm.owner != task.from {
        return Err(Refusal::Invalid(format!(
            "vm {} is owned by host {}, not the task's source {}",
            task.vm, vm.owner, task.from
        )));
    }
    let (features, vendor) = ctx
        .cpu()
        .ok_or_else(|| Refusal::Unavailable("this host cannot run VMs (no KVM)".into()))?;
    ctx.datastore()
        .map_err(|e| Refusal::Unavailable(e.to_string()))?;
    if ctx.vms().contains_key(&task.vm) || !ctx.arriving_insert(&task.vm) {
        return Err(Refusal::Invalid(format!(
            "vm {} is already here or arriving",
            task.vm
        )));
    }
    let listener = match TcpListener::bind((ctx.ip.as_str(), 0)).and_then(|l| {
        let addr = l.local_addr()?;
        Ok((l, addr))
    }) {
        Ok(l) => l,
        Err(e) => {
            ctx.arriving_remove(&task.vm);
            return Err(Refusal::Unavailable(format!("binding a listener: {e}")));
        }
    };
    let (listener, addr) = listener;
    let epoch = vm.epoch + 1;
    let ctx2 = ctx.clone();
    std::thread::spawn(move || {
        let name = task.vm.clone();
        if let Err(e) = receive_task(&ctx2, &listener, &task, epoch, features, vendor) {
            tracing::warn!(task = task.id, vm = %name, "inbound migration failed: {e}");
        }
        ctx2.arriving_remove(&name);
        let state = ctx2.state();
        ctx2.reconcile_now(&state);
    });
    Ok(addr.to_string())
}

fn receive_task(
    ctx: &Arc<HostCtx>,
    listener: &TcpListener,
    task: &MigrationTask,
    epoch: u64,
    features: Vec<u32>,
    vendor: String,
) -> Result<(), String> {
    let cfg = ReceiveConfig {
        token: task.token.clone(),
        cpu_features: features,
        accept_timeout: Some(ACCEPT_TIMEOUT),
        ..Default::default()
    };
    let mut vm_cfg = None;
    let (vm, _stats) = receive(listener, &cfg, |h: &Hello| {
        let wire: WireConfig = serde_json::from_str(&h.spec.config)
            .map_err(|e| format!("unreadable VM config: {e}"))?;
        if wire.vm.name != task.vm {
            return Err(format!(
                "stream carries vm {:?}, task {} moves {:?}",
                wire.vm.name, task.id, task.vm
            ));
        }
        if wire.cpu_vendor != vendor {
            return Err(format!(
                "CPU vendor {} differs from this host's {vendor}",
                wire.cpu_vendor
            ));
        }
        if wire.vm.memory_mib << 20 != h.spec.memory_bytes || wire.vm.vcpus != h.spec.vcpus {
            return Err("VM config disagrees with the memory layout".into());
        }
        let vm = Vm::new(tern_hypervisor::VmConfig {
            memory: h.spec.memory_bytes,
            vcpus: h.spec.vcpus as usize,
            serial_log: None,
        })
        .map_err(|e| e.to_string())?;
        vm_cfg = Some(wire.vm.clone());
        Ok(GatedVm {
            inner: KvmMigratable::new(vm, h.spec.config.clone()),
            ctx: ctx.clone(),
            vm: task.vm.clone(),
            epoch,
            lock: std::sync::Mutex::new(None),
        })
    })
    .map_err(|e| e.to_string())?;
    let cfg = vm_cfg.ok_or("no VM config received")?;
    let lock = vm.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    ctx.vms().insert(
        task.vm.clone(),
        LocalVm {
            vm: Arc::new(vm.inner),
            cfg,
            epoch,
            lock,
            migrating: false,
            cgroup: None,
        },
    );
    tracing::info!(task = task.id, vm = %task.vm, "migration received, running here");
    Ok(())
}

/// The received VM: resuming waits for the committed ownership (and takes the datastore lock).
struct GatedVm {
    inner: KvmMigratable,
    ctx: Arc<HostCtx>,
    vm: String,
    epoch: u64,
    lock: std::sync::Mutex<Option<VmLock>>,
}

impl GatedVm {
    fn wait_for_ownership(&self) -> VmResult<()> {
        let until = Instant::now() + COMMIT_WAIT;
        loop {
            let state = self.ctx.state();
            match state.vms.get(&self.vm) {
                Some(v) if v.owner == self.ctx.id && v.epoch == self.epoch => return Ok(()),
                Some(v) if v.epoch >= self.epoch => {
                    return Err(vm_err(format!(
                        "vm {} went to host {} at epoch {}",
                        self.vm, v.owner, v.epoch
                    )))
                }
                None => return Err(vm_err(format!("vm {} was deleted", self.vm))),
                _ => {}
            }
            if Instant::now() >= until {
                return Err(vm_err("ownership commit not applied here in time"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn vm_err(s: impl Into<String>) -> tern_hypervisor::migration::VmOpError {
    tern_hypervisor::migration::VmOpError(s.into())
}

impl MigratableVm for GatedVm {
    fn memory_bytes(&self) -> u64 {
        self.inner.memory_bytes()
    }
    fn vcpus(&self) -> u32 {
        self.inner.vcpus()
    }
    fn config(&self) -> String {
        self.inner.config()
    }
    fn cpu_features(&self) -> Vec<u32> {
        self.inner.cpu_features()
    }
    fn read_page(&self, pfn: u64, out: &mut [u8]) -> VmResult<()> {
        self.inner.read_page(pfn, out)
    }
    fn write_page(&self, pfn: u64, data: &[u8]) -> VmResult<()> {
        self.inner.write_page(pfn, data)
    }
    fn touched_pages(&self) -> VmResult<PageBitmap> {
        self.inner.touched_pages()
    }
    fn start_dirty_log(&self) -> VmResult<()> {
        self.inner.start_dirty_log()
    }
    fn take_dirty_bitmap(&self) -> VmResult<PageBitmap> {
        self.inner.take_dirty_bitmap()
    }
    fn stop_dirty_log(&self) -> VmResult<()> {
        self.inner.stop_dirty_log()
    }
    fn set_throttle(&self, percent: u8) -> VmResult<()> {
        self.inner.set_throttle(percent)
    }
    fn pause(&self) -> VmResult<()> {
        self.inner.pause()
    }
    /// The switchover point on this side: never run before the commit names this host.
    fn resume(&self) -> VmResult<()> {
        self.wait_for_ownership()?;
        let ds = self.ctx.datastore().map_err(|e| vm_err(e.to_string()))?;
        let lock = ds
            .lock_within(&self.vm, Duration::from_secs(5))
            .map_err(|e| vm_err(format!("{e:#}")))?;
        *self.lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
        self.inner.resume()
    }
    fn save_state(&self) -> VmResult<Vec<u8>> {
        self.inner.save_state()
    }
    fn restore_state(&self, state: &[u8]) -> VmResult<()> {
        self.inner.restore_state(state)
    }
    fn guest_max_stall_us(&self) -> Option<u64> {
        self.inner.guest_max_stall_us()
    }
}
