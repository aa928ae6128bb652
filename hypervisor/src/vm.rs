//! A VM: guest memory, in-kernel irqchip and PIT, vCPU threads, the serial port, pause and
//! resume, dirty logging, throttling and full state save/restore.
use crate::cpu::{self, CpuFeatures};
use crate::devices::virtio::{Blk, DiskConfig, VirtioMmio};
use crate::devices::MmioBus;
use crate::error::{kvm, Error, Result};
use crate::kick;
use crate::memory::GuestMemory;
use crate::multiboot;
use crate::serial::Serial;
use crate::state::{self, VcpuState, VmState, STATE_VERSION};
use crate::status::GuestStatus;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, CpuId,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::collections::HashSet;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where KVM keeps its real-mode TSS and identity page table (above RAM, below the LAPIC).
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Throttling window: a throttled vCPU stays out of the guest for `percent` of each.
pub const THROTTLE_WINDOW: Duration = Duration::from_millis(10);
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: usize = 64;
const MSR_IA32_TSC: u32 = 0x10;

/// What to build.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    pub vcpus: usize,
    /// Also append serial output to this file.
    pub serial_log: Option<PathBuf>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            memory: 512 << 20,
            vcpus: 1,
            serial_log: None,
        }
    }
}

/// Lifecycle of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs exist but never ran: ready for `boot` or `restore_state`.
    Created,
    Running,
    Paused,
    /// Shut down or failed; see [`Vm::error`].
    Stopped,
}

impl RunState {
    fn name(self) -> &'static str {
        match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopped => "stopped",
        }
    }
}

/// What the vCPU threads look at between KVM_RUNs.
#[derive(Default)]
struct Control {
    paused: bool,
    stop: bool,
    /// Threads waiting in the park loop.
    parked: usize,
    /// Threads that ended (fatal exit or stop).
    dead: usize,
    /// Per-vCPU: host thread id, for /proc/self/task/<tid>/schedstat.
    tids: Vec<i32>,
    /// Per-vCPU: the throttle thread asked this vCPU to sit out part of a window.
    throttle_due: Vec<bool>,
}

struct Shared {
    vm_fd: VmFd,
    mem: Arc<GuestMemory>,
    serial: Mutex<Serial>,
    ctl: Mutex<Control>,
    cv: Condvar,
    throttle: AtomicU8,
    error: Mutex<Option<String>>,
    warned_ports: Mutex<HashSet<u64>>,
    mmio: MmioBus,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking vCPU thread must not take the VMM down with poisoned locks.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct VcpuThread {
    handle: JoinHandle<()>,
    pthread: libc::pthread_t,
    cpu_clock: libc::clockid_t,
}

/// A virtual machine on this host's KVM.
pub struct Vm {
    config: VmConfig,
    shared: Arc<Shared>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Vec<VcpuThread>,
    throttler: Option<JoinHandle<()>>,
    cpuid: CpuId,
    msr_list: Vec<u32>,
    tsc_khz: u32,
    state: RunState,
    dirty_logging: bool,
}

impl Vm {
    /// Whether this host has a usable /dev/kvm.
    pub fn available() -> bool {
        Kvm::new().is_ok()
    }

    /// Creates the VM with memory and parked vCPUs; nothing runs until `boot`,
    /// `restore_state` + `resume`.
    pub fn new(config: VmConfig) -> Result<Self> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "{} vCPUs is outside 1..={MAX_VCPUS}",
                config.vcpus
            )));
        }
        let mem = Arc::new(GuestMemory::new(config.memory)?);
        let kvm_sys = Kvm::new().map_err(Error::NoKvm)?;
        let vm_fd = kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(TSS_ADDR)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;
        set_memory_region(&vm_fd, &mem, false)?;
        let serial_log = match &config.serial_log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => None,
        };
        let mut vcpus = Vec::with_capacity(config.vcpus);
        for id in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(id as u64)
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            vcpus.push(fd);
        }
        let tsc_khz = vcpus[0].get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
        let cpuid = cpu::guest_cpuid(&kvm_sys, tsc_khz)?;
        for (id, fd) in vcpus.iter().enumerate() {
            cpu::set_cpuid(fd, &cpuid, id as u32, config.vcpus as u32)?;
        }
        let msr_list = cpu::saveable_msrs(&kvm_sys, &vcpus[0])?;
        let shared = Arc::new(Shared {
            vm_fd,
            mem,
            serial: Mutex::new(Serial::new(serial_log)),
            ctl: Mutex::new(Control {
                paused: true,
                throttle_due: vec![false; config.vcpus],
                tids: vec![0; config.vcpus],
                ..Default::default()
            }),
            cv: Condvar::new(),
            throttle: AtomicU8::new(0),
            error: Mutex::new(None),
            warned_ports: Mutex::new(HashSet::new()),
            mmio: MmioBus::default(),
        });
        kick::install();
        let mut vm = Self {
            config,
            shared,
            vcpus: Vec::new(),
            threads: Vec::new(),
            throttler: None,
            cpuid,
            msr_list,
            tsc_khz,
            state: RunState::Created,
            dirty_logging: false,
        };
        for (idx, fd) in vcpus.into_iter().enumerate() {
            let fd = Arc::new(Mutex::new(fd));
            vm.vcpus.push(fd.clone());
            let shared = vm.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{idx}"))
                .spawn(move || vcpu_thread(idx, shared, fd))?;
            let pthread = handle.as_pthread_t();
            let mut cpu_clock: libc::clockid_t = 0;
            // SAFETY: `pthread` is a live thread we just spawned; `cpu_clock` is a valid out-pointer.
            let rc = unsafe { libc::pthread_getcpuclockid(pthread, &mut cpu_clock) };
            if rc != 0 {
                return Err(Error::Io(std::io::Error::from_raw_os_error(rc)));
            }
            vm.threads.push(VcpuThread {
                handle,
                pthread,
                cpu_clock,
            });
        }
        vm.wait_parked();
        Ok(vm)
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn run_state(&self) -> RunState {
        if self.state != RunState::Stopped && self.error().is_some() {
            return RunState::Stopped;
        }
        self.state
    }

    /// The first fatal error of any vCPU (triple fault, KVM failure), if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.shared.error).clone()
    }

    /// Guest memory, usable while the VM runs.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.mem
    }

    /// Guest TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The CPU features guests see on this host (for migration compatibility checks).
    pub fn cpu_features(&self) -> CpuFeatures {
        CpuFeatures::from_cpuid(&self.cpuid)
    }

    fn require(&self, op: &'static str, ok: &[RunState], needed: &'static str) -> Result<()> {
        let state = self.run_state();
        if ok.contains(&state) {
            Ok(())
        } else {
            Err(Error::WrongState {
                op,
                state: state.name(),
                needed,
            })
        }
    }

    /// Attaches a virtio-blk disk (a raw image, opened now) in the next MMIO slot; only
    /// before `boot` or `restore_state`. Returns its (MMIO base, interrupt line). A VM that
    /// is restored must have the same disks attached in the same order as the saved one.
    pub fn attach_disk(&mut self, disk: &DiskConfig) -> Result<(u64, u32)> {
        self.require("attach_disk", &[RunState::Created], "a fresh VM")?;
        let blk = Blk::open(disk)?;
        let dev = VirtioMmio::new(Box::new(blk), self.shared.mem.clone())?;
        self.shared.mmio.insert(Box::new(dev))
    }

    /// The kernel command-line words that announce this VM's devices
    /// (`virtio_mmio.device=4K@0xfd000000:5`, the form Linux reads); `boot` appends them.
    pub fn device_cmdline(&self) -> Vec<String> {
        self.shared.mmio.cmdline()
    }

    /// Loads a multiboot v1 image with `cmdline` (plus the device words of
    /// [`Self::device_cmdline`]) and starts the boot vCPU; the others wait for the guest's
    /// INIT-SIPI-SIPI.
    pub fn boot(&mut self, image: &[u8], cmdline: &str) -> Result<()> {
        self.require("boot", &[RunState::Created], "a fresh VM")?;
        let mut words = vec![cmdline.to_string()];
        words.extend(self.device_cmdline());
        let cmdline = words.join(" ");
        let loaded = multiboot::load(&self.shared.mem, image, &cmdline)?;
        cpu::set_multiboot_entry(&lock(&self.vcpus[0]), loaded.entry, loaded.mbi)?;
        self.state = RunState::Paused;
        self.resume().map(|_| ())
    }

    /// Stops every vCPU out of KVM_RUN and parks it (sleeping, not spinning). Returns how
    /// long that took.
    pub fn pause(&mut self) -> Result<Duration> {
        self.require("pause", &[RunState::Running, RunState::Paused], "running")?;
        let start = Instant::now();
        lock(&self.shared.ctl).paused = true;
        for t in &self.threads {
            kick::kick(t.pthread);
        }
        self.wait_parked();
        self.state = RunState::Paused;
        Ok(start.elapsed())
    }

    fn wait_parked(&self) {
        let n = self.threads.len();
        let mut c = lock(&self.shared.ctl);
        while c.parked + c.dead < n {
            c = self.shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Lets the parked vCPUs run again. Returns how long the wake-up took to issue.
    pub fn resume(&mut self) -> Result<Duration> {
        self.require("resume", &[RunState::Paused, RunState::Running], "paused")?;
        let start = Instant::now();
        lock(&self.shared.ctl).paused = false;
        self.shared.cv.notify_all();
        self.state = RunState::Running;
        Ok(start.elapsed())
    }

    /// Stops and joins the vCPU threads; the VM cannot run again.
    pub fn shutdown(&mut self) {
        if let Some(t) = self.throttler.take() {
            self.shared.throttle.store(0, Ordering::SeqCst);
            let _ = t.join();
        }
        {
            let mut c = lock(&self.shared.ctl);
            c.stop = true;
            c.paused = true;
        }
        self.shared.cv.notify_all();
        for t in &self.threads {
            kick::kick(t.pthread);
        }
        for t in self.threads.drain(..) {
            let _ = t.handle.join();
        }
        self.state = RunState::Stopped;
    }

    /// Turns KVM dirty page logging on or off for all of guest memory.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<()> {
        set_memory_region(&self.shared.vm_fd, &self.shared.mem, on)?;
        self.dirty_logging = on;
        // Start a fresh VMM-side record as well.
        let _ = self.shared.mem.take_vmm_dirty();
        Ok(())
    }

    /// Pages dirtied since the last call (or since logging was switched on): KVM's log
    /// (KVM_GET_DIRTY_LOG clears it) merged with pages the VMM wrote. One bit per page.
    pub fn take_dirty_bitmap(&self) -> Result<Vec<u64>> {
        if !self.dirty_logging {
            return Err(Error::WrongState {
                op: "take_dirty_bitmap",
                state: "dirty logging off",
                needed: "dirty logging on",
            });
        }
        let mut bits = self
            .shared
            .vm_fd
            .get_dirty_log(0, self.shared.mem.size() as usize)
            .map_err(kvm("KVM_GET_DIRTY_LOG"))?;
        for (b, v) in bits.iter_mut().zip(self.shared.mem.take_vmm_dirty()) {
            *b |= v;
        }
        Ok(bits)
    }

    /// Auto-converge: each vCPU stays out of KVM_RUN for `percent` (0..=99) of every
    /// [`THROTTLE_WINDOW`]. 0 turns throttling off.
    pub fn set_throttle(&mut self, percent: u8) -> Result<()> {
        if percent > 99 {
            return Err(Error::Config(format!("throttle {percent}% is above 99%")));
        }
        self.shared.throttle.store(percent, Ordering::SeqCst);
        if percent == 0 {
            if let Some(t) = self.throttler.take() {
                let _ = t.join();
            }
            return Ok(());
        }
        if self.throttler.is_none() {
            let shared = self.shared.clone();
            let pthreads: Vec<libc::pthread_t> = self.threads.iter().map(|t| t.pthread).collect();
            self.throttler = Some(
                std::thread::Builder::new()
                    .name("throttle".into())
                    .spawn(move || throttle_thread(shared, pthreads))?,
            );
        }
        Ok(())
    }

    pub fn throttle(&self) -> u8 {
        self.shared.throttle.load(Ordering::SeqCst)
    }

    /// The test guest's status page.
    pub fn guest_status(&self) -> Result<GuestStatus> {
        GuestStatus::read(&self.shared.mem)
    }

    /// The most recent serial output (up to 64 KiB).
    pub fn serial_output(&self) -> Vec<u8> {
        lock(&self.shared.serial).output().to_vec()
    }

    /// CPU time consumed by each vCPU thread so far.
    pub fn vcpu_cpu_times(&self) -> Vec<Duration> {
        self.threads
            .iter()
            .map(|t| {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: the clock id belongs to a thread that is not yet joined; `ts` is valid.
                let rc = unsafe { libc::clock_gettime(t.cpu_clock, &mut ts) };
                if rc != 0 {
                    return Duration::ZERO;
                }
                Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
            })
            .collect()
    }

    /// Per vCPU thread: (time on a host CPU, time runnable but waiting for one), from the
    /// scheduler's statistics. On a busy host, `on_cpu + waiting` is what the guest asked
    /// for, `on_cpu` what it got.
    pub fn vcpu_sched_times(&self) -> Vec<(Duration, Duration)> {
        let tids = lock(&self.shared.ctl).tids.clone();
        tids.iter()
            .map(|tid| {
                let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
                    .unwrap_or_default();
                let mut it = text
                    .split_whitespace()
                    .map(|w| w.parse::<u64>().unwrap_or(0));
                let run = it.next().unwrap_or(0);
                let wait = it.next().unwrap_or(0);
                (Duration::from_nanos(run), Duration::from_nanos(wait))
            })
            .collect()
    }

    /// Saves the full VM state. Requires a paused VM (memory is the caller's business).
    pub fn save_state(&self) -> Result<VmState> {
        self.require("save_state", &[RunState::Paused], "paused")?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for fd in &self.vcpus {
            vcpus.push(self.save_vcpu(&lock(fd))?);
        }
        let vm = &self.shared.vm_fd;
        let chip = |id| -> Result<kvm_irqchip> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmState {
            version: STATE_VERSION,
            memory_size: self.shared.mem.size(),
            vcpus,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
            serial: lock(&self.shared.serial).state(),
            tsc_khz: self.tsc_khz,
            saved_at_unix_ns: state::now_unix_ns(),
            cpu_features: self.cpu_features(),
            devices: self.shared.mmio.save()?,
        })
    }

    /// KVM's order: MP state first (it may flush pending events into the others), vcpu
    /// events last.
    fn save_vcpu(&self, fd: &VcpuFd) -> Result<VcpuState> {
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let msrs = cpu::read_msrs(fd, &self.msr_list)?;
        if msrs.len() != self.msr_list.len() {
            return Err(Error::State(format!(
                "could read only {} of {} MSRs",
                msrs.len(),
                self.msr_list.len()
            )));
        }
        let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
        })
    }

    /// Loads `state` into this fresh VM (memory already filled by the caller). The VM is
    /// left paused; `resume` continues exactly where the saved VM stopped. The guest TSC and
    /// kvmclock are advanced by the wall-clock time since the save.
    pub fn restore_state(&mut self, saved: &VmState) -> Result<()> {
        self.require("restore_state", &[RunState::Created], "a fresh VM")?;
        if saved.version != STATE_VERSION {
            return Err(Error::State(format!("state version {}", saved.version)));
        }
        if saved.memory_size != self.shared.mem.size() || saved.vcpus.len() != self.vcpus.len() {
            return Err(Error::State(format!(
                "state is for {} MiB / {} vCPUs, this VM has {} MiB / {}",
                saved.memory_size >> 20,
                saved.vcpus.len(),
                self.shared.mem.size() >> 20,
                self.vcpus.len()
            )));
        }
        let missing = saved.cpu_features.missing_on(&self.cpu_features());
        if !missing.is_empty() {
            return Err(Error::State(format!(
                "this host lacks CPU features of the saved VM: {}",
                missing.join(", ")
            )));
        }
        let elapsed_ns = state::now_unix_ns().saturating_sub(saved.saved_at_unix_ns);
        let tsc_advance = (u128::from(elapsed_ns) * u128::from(saved.tsc_khz) / 1_000_000) as u64;
        let vm = &self.shared.vm_fd;
        vm.set_pit2(&saved.pit).map_err(kvm("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: saved.clock.clock.saturating_add(elapsed_ns),
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for chip in [&saved.pic_master, &saved.pic_slave, &saved.ioapic] {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        // After the irqchip, so that the lines the devices drive land on the restored IOAPIC.
        self.shared.mmio.restore(&saved.devices, vm)?;
        for (fd, vs) in self.vcpus.iter().zip(&saved.vcpus) {
            restore_vcpu(&lock(fd), vs, tsc_advance)?;
        }
        lock(&self.shared.serial).set_state(&saved.serial);
        self.state = RunState::Paused;
        Ok(())
    }
}

/// KVM's order: regs before vcpu events, sregs before LAPIC before MSRs (the TSC deadline
/// needs the LAPIC mode; x2APIC MSRs need the APIC base), events last.
fn restore_vcpu(fd: &VcpuFd, vs: &VcpuState, tsc_advance: u64) -> Result<()> {
    fd.set_mp_state(vs.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&vs.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&vs.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: `vs.xsave` is a complete kvm_xsave of the legacy 4 KiB size that KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&vs.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&vs.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&vs.debug_regs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&vs.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let msrs: Vec<(u32, u64)> = vs
        .msrs
        .iter()
        .map(|&(i, v)| {
            if i == MSR_IA32_TSC {
                (i, v.wrapping_add(tsc_advance))
            } else {
                (i, v)
            }
        })
        .collect();
    cpu::write_msrs(fd, &msrs)?;
    fd.set_vcpu_events(&vs.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn set_memory_region(vm_fd: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<()> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: mem.size(),
        userspace_addr: mem.host_addr(),
    };
    // SAFETY: the region is the whole anonymous mapping owned by `mem`, which outlives the
    // VM fd (both live in `Shared`, memory is an Arc kept until the VM is dropped).
    unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))
}

fn throttle_thread(shared: Arc<Shared>, pthreads: Vec<libc::pthread_t>) {
    loop {
        std::thread::sleep(THROTTLE_WINDOW);
        if shared.throttle.load(Ordering::SeqCst) == 0 {
            return;
        }
        {
            let mut c = lock(&shared.ctl);
            if c.stop {
                return;
            }
            c.throttle_due.iter_mut().for_each(|d| *d = true);
        }
        for &p in &pthreads {
            kick::kick(p);
        }
    }
}

enum Next {
    Run,
    Stop,
}

/// Parks while paused, sits out the throttle share of a window, says whether to go on.
fn checkpoint(idx: usize, shared: &Shared) -> Next {
    let mut c = lock(&shared.ctl);
    loop {
        if c.stop {
            return Next::Stop;
        }
        if c.paused {
            c.parked += 1;
            shared.cv.notify_all();
            while c.paused && !c.stop {
                c = shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
            }
            c.parked -= 1;
            continue;
        }
        if std::mem::take(&mut c.throttle_due[idx]) {
            let pct = u32::from(shared.throttle.load(Ordering::SeqCst));
            let off = THROTTLE_WINDOW * pct / 100;
            let deadline = Instant::now() + off;
            // Sleep on the condvar so that a pause or stop is still noticed at once.
            loop {
                let now = Instant::now();
                if now >= deadline || c.paused || c.stop {
                    break;
                }
                c = shared
                    .cv
                    .wait_timeout(c, deadline - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            continue;
        }
        return Next::Run;
    }
}

fn vcpu_thread(idx: usize, shared: Arc<Shared>, fd: Arc<Mutex<VcpuFd>>) {
    // SAFETY: gettid has no preconditions.
    lock(&shared.ctl).tids[idx] = unsafe { libc::gettid() };
    let run_page: *mut kvm_bindings::kvm_run = lock(&fd).get_kvm_run();
    kick::register(run_page);
    let outcome = vcpu_loop(idx, &shared, &fd);
    kick::unregister();
    if let Err(reason) = outcome {
        tracing::error!(vcpu = idx, %reason, "vCPU stopped");
        let mut e = lock(&shared.error);
        if e.is_none() {
            *e = Some(format!("vCPU {idx}: {reason}"));
        }
    }
    let mut c = lock(&shared.ctl);
    c.dead += 1;
    shared.cv.notify_all();
}

fn vcpu_loop(idx: usize, shared: &Shared, fd: &Mutex<VcpuFd>) -> std::result::Result<(), String> {
    loop {
        if let Next::Stop = checkpoint(idx, shared) {
            return Ok(());
        }
        let mut vcpu = lock(fd);
        let exit = vcpu.run();
        let result = match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                if Serial::owns(port) {
                    lock(&shared.serial).write(port, data.first().copied().unwrap_or(0));
                } else {
                    warn_once(shared, "I/O write", u64::from(port));
                }
                Ok(())
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let v = if Serial::owns(port) {
                    lock(&shared.serial).read(port)
                } else {
                    warn_once(shared, "I/O read", u64::from(port));
                    0xff
                };
                data.iter_mut().for_each(|b| *b = v);
                Ok(())
            }
            Ok(VcpuExit::MmioRead(addr, data)) => match shared.mmio.read(addr, data, &shared.vm_fd)
            {
                Ok(true) => Ok(()),
                Ok(false) => {
                    warn_once(shared, "MMIO read", addr);
                    data.iter_mut().for_each(|b| *b = 0xff);
                    Ok(())
                }
                Err(e) => Err(format!("MMIO read at {addr:#x}: {e}")),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                match shared.mmio.write(addr, data, &shared.vm_fd) {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        warn_once(shared, "MMIO write", addr);
                        Ok(())
                    }
                    Err(e) => Err(format!("MMIO write at {addr:#x}: {e}")),
                }
            }
            Ok(VcpuExit::Intr) | Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) => Ok(()),
            Ok(VcpuExit::Shutdown) => Err("guest shut down (triple fault)".to_string()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(format!(
                "KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
            )),
            Ok(VcpuExit::InternalError) => Err("KVM internal error".to_string()),
            Ok(other) => Err(format!("unhandled exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(format!("KVM_RUN: {e}")),
        };
        // Clear a kick only after KVM_RUN returned; the control check follows, so no kick
        // is lost.
        vcpu.set_kvm_immediate_exit(0);
        drop(vcpu);
        result?;
    }
}

fn warn_once(shared: &Shared, what: &str, addr: u64) {
    if lock(&shared.warned_ports).insert(addr) {
        tracing::warn!("ignoring guest {what} at {addr:#x}");
    }
}
