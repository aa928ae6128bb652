//! The VMM's state and operations: one VM, the requests of the control protocol, and both ends
//! of live migration (through `crate::migration`). I/O-free apart from the VM itself; the
//! socket lives in `server`.
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::guarded::{GuardedVm, LeaseGuard};
use super::protocol::{
    GateDecision, Load, MigrationSummary, MigrationView, Request, Response, Tuning, VmSpec,
    VmmState, VmmStatus,
};
use super::VmmError;
use crate::migration::{
    feature_words, migrate, receive, CancelToken, Hello, KvmMigratable, MigrationConfig,
    MigrationError, Phase, Progress, ReceiveConfig,
};
use crate::status::GuestStatus;
use crate::vm::{RunState, Vm, VmConfig};
use crate::workload::Workload;

/// How long a destination told to resume waits for its lease to reach its epoch.
const RESUME_WAIT: Duration = Duration::from_secs(30);
/// How long a receiving VMM waits for its source unless the request says otherwise.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);

/// What the migration handshake carries as the VM's config (the node's wire format too).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct WireSpec {
    pub vm: VmSpec,
    pub cpu_vendor: String,
}

/// How a VMM starts.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    pub name: String,
    /// Boot this VM; `None`: receive mode (wait for a `Receive` request).
    pub boot: Option<VmSpec>,
    pub owner: u64,
    pub epoch: u64,
    /// The VM's lease file; `None`: no lease is checked (a stand-alone VMM).
    pub lease: Option<std::path::PathBuf>,
    pub serial_log: Option<std::path::PathBuf>,
}

struct Inner {
    state: VmmState,
    vm: Option<Arc<GuardedVm>>,
    spec: Option<VmSpec>,
    migration: MigrationView,
    cancel: Option<CancelToken>,
    /// The supervisor's answer to the pending switchover gate.
    decision: Option<GateDecision>,
    receive_started: bool,
    load: Load,
    error: Option<String>,
    stopping: bool,
}

/// One VM and its control operations; cheap to clone (shared).
#[derive(Clone)]
pub struct Vmm {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    serial_log: Option<std::path::PathBuf>,
    guard: Arc<LeaseGuard>,
    inner: Mutex<Inner>,
    changed: Condvar,
}

fn to_string<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl Vmm {
    /// Create the VMM; in boot mode the VM is booted (after the lease check) and running.
    pub fn new(cfg: VmmConfig) -> Result<Vmm, VmmError> {
        super::protocol::validate_name(&cfg.name).map_err(|e| VmmError::Spec(e.to_string()))?;
        let guard = Arc::new(LeaseGuard::new(cfg.lease.clone(), cfg.owner, cfg.epoch));
        let mut inner = Inner {
            state: VmmState::Receiving,
            vm: None,
            spec: None,
            migration: MigrationView::default(),
            cancel: None,
            decision: None,
            receive_started: false,
            load: Load::default(),
            error: None,
            stopping: false,
        };
        if let Some(spec) = &cfg.boot {
            if spec.name != cfg.name {
                return Err(VmmError::Spec(format!(
                    "spec names vm {:?}, this VMM runs {:?}",
                    spec.name, cfg.name
                )));
            }
            guard.check(Duration::ZERO)?;
            inner.vm = Some(Arc::new(boot(spec, &guard, cfg.serial_log.clone())?));
            inner.spec = Some(spec.clone());
            inner.state = VmmState::Running;
        }
        let vmm = Vmm {
            shared: Arc::new(Shared {
                name: cfg.name,
                serial_log: cfg.serial_log,
                guard,
                inner: Mutex::new(inner),
                changed: Condvar::new(),
            }),
        };
        let sampler = vmm.clone();
        std::thread::Builder::new()
            .name("vmm-load".into())
            .spawn(move || sampler.sample_load())?;
        Ok(vmm)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.shared.changed.notify_all();
    }

    pub fn state(&self) -> VmmState {
        self.inner().state
    }

    pub fn last_error(&self) -> Option<String> {
        self.inner().error.clone()
    }

    /// Whether a `Stop` was handled (the process should end).
    pub fn stopping(&self) -> bool {
        self.inner().stopping
    }

    /// Answer one request. Errors are for the client; the VMM carries on.
    pub fn handle(&self, req: Request) -> Result<Response, String> {
        match req {
            Request::Status => Ok(Response::Status(Box::new(self.status()))),
            Request::Pause => self.pause(),
            Request::Resume => self.resume(),
            Request::Stop => {
                self.stop();
                Ok(Response::Done)
            }
            Request::MigrateOut {
                dest,
                token,
                tuning,
            } => self.migrate_out(dest, token, &tuning),
            Request::Receive {
                listen,
                token,
                expected,
                epoch,
                accept_timeout_ms,
            } => self.receive(
                listen,
                token,
                *expected,
                epoch,
                accept_timeout_ms.map_or(ACCEPT_TIMEOUT, Duration::from_millis),
            ),
            Request::Cancel => self.cancel(),
            Request::Progress => Ok(Response::Migration(self.inner().migration.clone())),
            Request::WaitGate { timeout_ms } => Ok(Response::Migration(
                self.wait_gate(Duration::from_millis(timeout_ms)),
            )),
            Request::Gate { decision } => self.decide(decision),
        }
    }

    pub fn status(&self) -> VmmStatus {
        let (vm, mut status) = {
            let i = self.inner();
            let status = VmmStatus {
                name: self.shared.name.clone(),
                pid: std::process::id(),
                state: i.state,
                epoch: self.shared.guard.epoch(),
                owner: self.shared.guard.owner,
                spec: i.spec.clone(),
                guest: None,
                load: i.load,
                error: i.error.clone(),
            };
            (i.vm.clone(), status)
        };
        if let Some(vm) = vm {
            let (mem, ns) = {
                let v = vm.lock();
                let ns: u128 = v.vcpu_cpu_times().iter().map(|d| d.as_nanos()).sum();
                (v.memory().clone(), ns as u64)
            };
            status.guest = GuestStatus::read(&mem).ok();
            // Live, so that a client can compute CPU use over its own interval.
            status.load.vcpu_cpu_ns = ns;
        }
        status
    }

    fn running_vm(&self, op: &str, want: VmmState) -> Result<Arc<GuardedVm>, String> {
        let i = self.inner();
        match (&i.vm, i.state) {
            (Some(vm), s) if s == want => Ok(vm.clone()),
            (_, s) => Err(format!("cannot {op}: the VMM is {s:?}, not {want:?}")),
        }
    }

    fn pause(&self) -> Result<Response, String> {
        let vm = self.running_vm("pause", VmmState::Running)?;
        vm.lock().pause().map_err(to_string)?;
        self.set_state(VmmState::Paused);
        Ok(Response::Done)
    }

    fn resume(&self) -> Result<Response, String> {
        use crate::migration::MigratableVm;
        let vm = self.running_vm("resume", VmmState::Paused)?;
        vm.resume().map_err(|e| e.0)?;
        self.set_state(VmmState::Running);
        Ok(Response::Done)
    }

    fn set_state(&self, s: VmmState) {
        self.inner().state = s;
        self.notify();
    }

    /// Shut the VM down; the process ends after answering.
    pub fn stop(&self) {
        let vm = {
            let mut i = self.inner();
            if let Some(c) = &i.cancel {
                c.cancel();
            }
            i.stopping = true;
            if i.state != VmmState::Failed {
                i.state = VmmState::Stopped;
            }
            i.vm.take()
        };
        self.notify();
        if let Some(vm) = vm {
            vm.lock().shutdown();
        }
    }

    fn cancel(&self) -> Result<Response, String> {
        let i = self.inner();
        if i.migration.gate_pending {
            return Err(
                "the switchover gate waits for the supervisor's decision; answer the gate instead"
                    .into(),
            );
        }
        match (&i.cancel, i.migration.finished) {
            (Some(c), false) => {
                c.cancel();
                Ok(Response::Done)
            }
            _ => Err("no outbound migration is running".into()),
        }
    }

    fn decide(&self, decision: GateDecision) -> Result<Response, String> {
        let mut i = self.inner();
        if !i.migration.gate_pending {
            return Err("no switchover is waiting for a decision".into());
        }
        i.decision = Some(decision);
        drop(i);
        self.notify();
        Ok(Response::Done)
    }

    /// Long-poll for the gate or the end of the migration.
    fn wait_gate(&self, timeout: Duration) -> MigrationView {
        let until = Instant::now() + timeout;
        let mut i = self.inner();
        loop {
            let idle = i.cancel.is_none() && !i.receive_started;
            if i.migration.gate_pending || i.migration.finished || idle {
                return i.migration.clone();
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return i.migration.clone();
            }
            i = self
                .shared
                .changed
                .wait_timeout(i, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn migrate_out(
        &self,
        dest: SocketAddr,
        token: String,
        tuning: &Tuning,
    ) -> Result<Response, String> {
        let vm = {
            let mut i = self.inner();
            let vm = match (&i.vm, i.state) {
                (Some(vm), VmmState::Running) => vm.clone(),
                (_, s) => return Err(format!("cannot migrate: the VMM is {s:?}, not Running")),
            };
            let cancel = CancelToken::new();
            i.cancel = Some(cancel);
            i.decision = None;
            i.state = VmmState::Migrating;
            i.migration = MigrationView {
                phase: "handshake".into(),
                ..Default::default()
            };
            vm
        };
        self.notify();
        let defaults = MigrationConfig::default();
        let cfg = MigrationConfig {
            token,
            downtime_target: match tuning.downtime_ms {
                0 => Duration::from_millis(20),
                ms => Duration::from_millis(ms),
            },
            bandwidth_limit: tuning.bandwidth,
            streams: if tuning.streams == 0 {
                defaults.streams
            } else {
                tuning.streams
            },
            io_timeout: match tuning.io_timeout_ms {
                0 => Duration::from_secs(10),
                ms => Duration::from_millis(ms),
            },
            ..defaults
        };
        let me = self.clone();
        std::thread::Builder::new()
            .name("vmm-migrate".into())
            .spawn(move || me.run_migration(&vm, dest, &cfg))
            .map_err(to_string)?;
        Ok(Response::Done)
    }

    fn run_migration(&self, vm: &Arc<GuardedVm>, dest: SocketAddr, cfg: &MigrationConfig) {
        let Some(cancel) = self.inner().cancel.clone() else {
            return;
        };
        let gate_vmm = self.clone();
        let gate_cancel = cancel.clone();
        let gate = Box::new(move || gate_vmm.at_gate(&gate_cancel));
        let mut on_progress = |p: &Progress| self.progress(p);
        let result = migrate(&**vm, dest, cfg, gate, &cancel, &mut on_progress);
        let mut drop_vm = false;
        {
            let mut i = self.inner();
            i.migration.finished = true;
            i.migration.gate_pending = false;
            i.cancel = None;
            match result {
                Ok(s) => {
                    i.migration.phase = "done".into();
                    i.migration.stats = Some(MigrationSummary {
                        downtime_us: s.downtime.as_micros() as u64,
                        total_ms: s.total.as_millis() as u64,
                        bytes: s.bytes_sent,
                        rounds: s.rounds,
                    });
                    i.state = VmmState::MigratedAway;
                    drop_vm = true;
                }
                Err(MigrationError::OutcomeUnknown(e)) => {
                    // Ownership was committed away: this paused copy must never run again.
                    i.migration.error = Some(format!("outcome unknown after the gate: {e}"));
                    i.state = VmmState::Handover;
                    drop_vm = true;
                }
                Err(e) => {
                    i.migration.error = Some(e.to_string());
                    if !i.stopping {
                        let running = vm.lock().run_state() == RunState::Running;
                        i.state = if running {
                            VmmState::Running
                        } else {
                            VmmState::Paused
                        };
                    }
                }
            }
            if drop_vm {
                i.vm = None;
            }
        }
        self.notify();
        if drop_vm {
            vm.lock().shutdown();
        }
    }

    fn progress(&self, p: &Progress) {
        let mut i = self.inner();
        i.migration.phase = phase_name(p.phase).into();
        i.migration.round = p.round;
        i.migration.bytes_sent = p.bytes_sent;
        i.migration.bytes_remaining = p.bytes_remaining;
        drop(i);
        self.notify();
    }

    /// The switchover gate: ask the supervisor (through `WaitGate` / `Gate`) and wait for a
    /// definite answer. `Unknown` keeps the VM paused and waits on.
    fn at_gate(&self, cancel: &CancelToken) -> Result<(), String> {
        let mut i = self.inner();
        if cancel.is_cancelled() {
            return Err("cancelled".into());
        }
        i.state = VmmState::AtGate;
        i.migration.gate_pending = true;
        i.decision = None;
        self.notify();
        loop {
            if i.stopping {
                i.migration.gate_pending = false;
                return Err("the VMM is stopping".into());
            }
            match i.decision.take() {
                Some(GateDecision::Committed) => {
                    i.migration.gate_pending = false;
                    return Ok(());
                }
                Some(GateDecision::Refused { reason, epoch }) => {
                    if let Some(e) = epoch {
                        self.shared.guard.set_epoch(e);
                    }
                    i.migration.gate_pending = false;
                    i.state = VmmState::Migrating;
                    return Err(reason);
                }
                Some(GateDecision::Unknown) | None => {}
            }
            i = self
                .shared
                .changed
                .wait(i)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn receive(
        &self,
        listen: SocketAddr,
        token: String,
        expected: VmSpec,
        epoch: u64,
        accept_timeout: Duration,
    ) -> Result<Response, String> {
        if expected.name != self.shared.name {
            return Err(format!(
                "this VMM runs vm {:?}, not {:?}",
                self.shared.name, expected.name
            ));
        }
        {
            let mut i = self.inner();
            if i.state != VmmState::Receiving || i.receive_started {
                return Err(format!(
                    "cannot receive: the VMM is {:?} (a VMM receives once, in receive mode)",
                    i.state
                ));
            }
            i.receive_started = true;
        }
        let started = (|| {
            let (features, vendor) = host_cpu()?;
            let listener =
                TcpListener::bind(listen).map_err(|e| format!("binding {listen}: {e}"))?;
            let addr = listener.local_addr().map_err(to_string)?;
            Ok::<_, String>((features, vendor, listener, addr))
        })();
        let (features, vendor, listener, addr) = match started {
            Ok(s) => s,
            Err(e) => {
                self.inner().receive_started = false;
                return Err(e);
            }
        };
        self.shared.guard.set_epoch(epoch);
        {
            let mut i = self.inner();
            i.migration = MigrationView {
                phase: "receiving".into(),
                ..Default::default()
            };
        }
        let cfg = ReceiveConfig {
            token,
            cpu_features: features,
            accept_timeout: Some(accept_timeout),
            ..Default::default()
        };
        let me = self.clone();
        std::thread::Builder::new()
            .name("vmm-receive".into())
            .spawn(move || me.run_receive(&listener, &cfg, &expected, &vendor))
            .map_err(to_string)?;
        Ok(Response::Listening { addr })
    }

    fn run_receive(
        &self,
        listener: &TcpListener,
        cfg: &ReceiveConfig,
        expected: &VmSpec,
        vendor: &str,
    ) {
        let guard = self.shared.guard.clone();
        let serial_log = self.shared.serial_log.clone();
        let result = receive(listener, cfg, |h: &Hello| {
            let wire: WireSpec = serde_json::from_str(&h.spec.config)
                .map_err(|e| format!("unreadable VM config: {e}"))?;
            if &wire.vm != expected {
                return Err(format!(
                    "the stream carries {:?}, this VMM expects {:?}",
                    wire.vm, expected
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
            // The disk is opened only under an epoch no newer lease has overtaken.
            guard.check_not_stale().map_err(to_string)?;
            let mut vm = Vm::new(VmConfig {
                memory: h.spec.memory_bytes,
                vcpus: h.spec.vcpus as usize,
                serial_log: serial_log.clone(),
            })
            .map_err(to_string)?;
            attach_disk(&mut vm, expected).map_err(to_string)?;
            Ok(GuardedVm::new(
                KvmMigratable::new(vm, h.spec.config.clone()),
                guard.clone(),
                RESUME_WAIT,
            ))
        });
        let mut i = self.inner();
        i.migration.finished = true;
        match result {
            Ok((vm, stats)) => {
                i.migration.phase = "done".into();
                i.migration.bytes_sent = stats.bytes_received;
                i.migration.stats = Some(MigrationSummary {
                    bytes: stats.bytes_received,
                    ..Default::default()
                });
                i.spec = Some(expected.clone());
                if i.stopping {
                    drop(i);
                    vm.lock().shutdown();
                    self.notify();
                    return;
                }
                i.vm = Some(Arc::new(vm));
                i.state = VmmState::Running;
            }
            Err(e) => {
                tracing::warn!("receiving the migration failed: {e}");
                i.migration.error = Some(e.to_string());
                i.error = Some(format!("receive failed: {e}"));
                if !i.stopping {
                    i.state = VmmState::Failed;
                }
            }
        }
        drop(i);
        self.notify();
    }

    /// Once a second: vCPU CPU time, touched memory and the guest's write rate.
    fn sample_load(&self) {
        let mut prev: Option<(Instant, u64, u64)> = None;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let Some(vm) = self.inner().vm.clone() else {
                prev = None;
                if self.stopping() {
                    return;
                }
                continue;
            };
            let (cpu_ns, mem, failed) = {
                let v = vm.lock();
                let ns: u128 = v.vcpu_cpu_times().iter().map(|d| d.as_nanos()).sum();
                (ns as u64, v.memory().clone(), v.error())
            };
            let written = GuestStatus::read(&mem).map_or(0, |s| s.pages_written);
            let touched = mem.touched_pages().unwrap_or(0) * crate::PAGE_SIZE;
            let now = Instant::now();
            let mut i = self.inner();
            if let Some((t, c, w)) = prev {
                let dt = (now - t).as_secs_f64().max(1e-3);
                i.load.cpu_percent = cpu_ns.saturating_sub(c) as f64 / 1e9 / dt * 100.0;
                i.load.dirty_bytes_per_s =
                    written.saturating_sub(w) as f64 * crate::PAGE_SIZE as f64 / dt;
            }
            i.load.touched_bytes = touched;
            i.load.vcpu_cpu_ns = cpu_ns;
            if let Some(e) = failed.filter(|_| i.state == VmmState::Running) {
                i.state = VmmState::Failed;
                i.error = Some(e);
            }
            prev = Some((now, cpu_ns, written));
        }
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Handshake => "handshake",
        Phase::FirstPass => "first_pass",
        Phase::DirtyRounds => "dirty_rounds",
        Phase::StopAndCopy => "stop_and_copy",
        Phase::Switchover => "switchover",
        Phase::Done => "done",
    }
}

/// CPU feature words and vendor a VM on this host sees (probed with a tiny VM).
fn host_cpu() -> Result<(Vec<u32>, String), String> {
    let probe = Vm::new(VmConfig {
        memory: 32 << 20,
        vcpus: 1,
        serial_log: None,
    })
    .map_err(to_string)?;
    let f = probe.cpu_features();
    Ok((feature_words(&f), f.vendor.clone()))
}

/// Attach the spec's disk, if it has one, for writing.
fn attach_disk(vm: &mut Vm, spec: &VmSpec) -> Result<(), VmmError> {
    if let Some(path) = &spec.disk {
        vm.attach_disk(&crate::devices::virtio::DiskConfig {
            path: path.clone(),
            read_only: false,
        })?;
    }
    Ok(())
}

/// Create and boot the test guest for `spec` (the lease was checked: the disk may be opened).
fn boot(
    spec: &VmSpec,
    guard: &Arc<LeaseGuard>,
    serial_log: Option<std::path::PathBuf>,
) -> Result<GuardedVm, VmmError> {
    let workload: Workload = spec
        .workload
        .parse()
        .map_err(|e| VmmError::Spec(format!("workload: {e}")))?;
    let memory = spec.memory_mib << 20;
    if workload.min_memory() > memory {
        return Err(VmmError::Spec(format!(
            "workload {} needs at least {} MiB of guest memory, the VM has {} MiB",
            spec.workload,
            workload.min_memory().div_ceil(1 << 20),
            spec.memory_mib
        )));
    }
    let mut vm = Vm::new(VmConfig {
        memory,
        vcpus: spec.vcpus as usize,
        serial_log,
    })?;
    attach_disk(&mut vm, spec)?;
    vm.boot(crate::guest_image::IMAGE, &workload.cmdline())?;
    let wire = serde_json::to_string(&WireSpec {
        vm: spec.clone(),
        cpu_vendor: vm.cpu_features().vendor,
    })
    .map_err(|e| VmmError::Spec(e.to_string()))?;
    Ok(GuardedVm::new(
        KvmMigratable::new(vm, wire),
        guard.clone(),
        Duration::ZERO,
    ))
}
