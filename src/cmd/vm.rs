//! `tern vm ...`: run the built-in test guest on this host's KVM and watch it.
//!
//! `vm run` is split into reusable pieces: [`start_vm`] (create + boot from [`RunArgs`]),
//! [`Monitor`] (per-second progress lines and the final [`Summary`]), so other subcommands
//! (migration) can drive the same VM and printing.
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tern_hypervisor::devices::virtio::blk::create_image;
use tern_hypervisor::devices::virtio::DiskConfig;
use tern_hypervisor::workload::parse_size;
use tern_hypervisor::{signals, DiskStatus, GuestStatus, Vm, VmConfig, Workload};

#[derive(Args)]
pub struct VmArgs {
    #[command(subcommand)]
    pub command: VmCommand,
}

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot the test guest and print its progress once a second, then a summary.
    Run(RunArgs),
    /// Wait for one incoming live migration, then run the guest and print its progress.
    Receive(super::vm_migrate::ReceiveArgs),
    #[command(flatten)]
    Cluster(super::vms::ClusterVmCommand),
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Guest RAM (K/M/G suffix).
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// Guest workload: wss=SIZE,rate=PAGES_PER_S,pattern=seq|random|hotcold|once,duty=1..100,seed=N.
    #[arg(long, default_value = "wss=64M,rate=20000,pattern=random,duty=100")]
    pub workload: String,
    /// How long to run (e.g. 10s, 500ms, 2m; 0 = until Ctrl-C).
    #[arg(long = "for", default_value = "10s")]
    pub duration: String,
    /// Print JSON lines (one per second, then the summary) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Boot this multiboot image instead of the built-in test guest.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Append the guest's serial output to this file.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    #[command(flatten)]
    pub disk: DiskOpts,
    #[command(flatten)]
    pub migrate: Box<super::vm_migrate::MigrateOpts>,
}

/// The VM's disk: a raw image attached as virtio-blk (the workload's `disk=` uses it).
#[derive(Args, Clone, Debug, Default)]
pub struct DiskOpts {
    /// Raw disk image to attach as virtio-blk (on the shared datastore).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Create the image (sparse) with this size if it is missing or smaller (K/M/G suffix).
    #[arg(long, requires = "disk")]
    pub disk_size: Option<String>,
    /// Attach the disk read-only.
    #[arg(long, requires = "disk")]
    pub disk_read_only: bool,
}

impl DiskOpts {
    /// Creates the image if asked and attaches it to the fresh `vm`.
    pub fn attach(&self, vm: &mut Vm) -> anyhow::Result<()> {
        let Some(path) = &self.disk else {
            return Ok(());
        };
        if let Some(size) = &self.disk_size {
            let size = parse_size(size).context("--disk-size")?;
            create_image(path, size).context("--disk-size")?;
        }
        vm.attach_disk(&DiskConfig {
            path: path.clone(),
            read_only: self.disk_read_only,
        })
        .with_context(|| format!("--disk {}", path.display()))?;
        Ok(())
    }
}

pub fn run(args: VmArgs) -> anyhow::Result<()> {
    match args.command {
        VmCommand::Run(a) => run_vm(&a),
        VmCommand::Receive(a) => super::vm_migrate::run_receive(&a),
        VmCommand::Cluster(c) => super::vms::run(c),
    }
}

pub use tern_node::cron::parse_duration;

/// Validates the arguments and boots a VM running the workload.
pub fn start_vm(args: &RunArgs) -> anyhow::Result<(Vm, Workload)> {
    let memory = parse_size(&args.memory).context("--memory")?;
    let workload: Workload = args.workload.parse().context("--workload")?;
    if workload.min_memory() > memory {
        bail!(
            "--workload wss={} needs at least {} MiB of guest memory, --memory is {} MiB",
            tern_hypervisor::workload::format_size(workload.wss),
            workload.min_memory().div_ceil(1 << 20),
            memory >> 20
        );
    }
    let image = match &args.image {
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        None => tern_hypervisor::guest_image::IMAGE.to_vec(),
    };
    if workload.disk.enabled() && args.disk.disk.is_none() {
        bail!(
            "--workload disk=... needs a disk: add --disk FILE (and --disk-size SIZE to create it)"
        );
    }
    let mut vm = Vm::new(VmConfig {
        memory,
        vcpus: args.vcpus,
        serial_log: args.serial_log.clone(),
    })?;
    args.disk.attach(&mut vm)?;
    vm.boot(&image, &workload.cmdline())?;
    Ok((vm, workload))
}

/// One progress sample.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressLine {
    pub elapsed_s: f64,
    pub pages_per_s: f64,
    /// Average CPU use of the vCPU threads over the last interval, % of one host CPU each.
    pub cpu_percent: f64,
    pub status: Option<GuestStatus>,
}

/// The end-of-run summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub elapsed_s: f64,
    pub vcpus: usize,
    pub memory_mib: u64,
    pub workload: String,
    /// Time from boot to the first page written by the guest.
    pub boot_to_progress_ms: Option<f64>,
    pub pages_written: u64,
    pub pages_per_s: f64,
    pub pages_verified: u64,
    pub mismatches: u64,
    pub max_stall_us: Option<u64>,
    pub cpu_percent: f64,
    pub guest_error: Option<String>,
    pub vm_error: Option<String>,
    /// The guest's disk workload counters, when it runs one.
    pub disk: Option<DiskStatus>,
}

/// Samples a running VM and prints progress; reusable by other subcommands.
pub struct Monitor {
    json: bool,
    start: Instant,
    last_t: Instant,
    last_pages: u64,
    last_cpu: Duration,
    first_progress: Option<Duration>,
}

impl Monitor {
    pub fn new(json: bool) -> Self {
        let now = Instant::now();
        Self {
            json,
            start: now,
            last_t: now,
            last_pages: 0,
            last_cpu: Duration::ZERO,
            first_progress: None,
        }
    }

    fn cpu(vm: &Vm) -> Duration {
        vm.vcpu_cpu_times().iter().sum()
    }

    /// Notes whether the guest has made progress yet (call often for a precise boot time).
    pub fn poll(&mut self, vm: &Vm) -> Option<GuestStatus> {
        let st = vm.guest_status().ok();
        if self.first_progress.is_none() && st.as_ref().is_some_and(|s| s.pages_written > 0) {
            self.first_progress = Some(self.start.elapsed());
        }
        st
    }

    /// Takes a sample and prints it.
    pub fn sample(&mut self, vm: &Vm) -> anyhow::Result<ProgressLine> {
        let status = self.poll(vm);
        let now = Instant::now();
        let dt = (now - self.last_t).as_secs_f64().max(1e-6);
        let pages = status.as_ref().map_or(0, |s| s.pages_written);
        let cpu = Self::cpu(vm);
        let line = ProgressLine {
            elapsed_s: (now - self.start).as_secs_f64(),
            pages_per_s: pages.saturating_sub(self.last_pages) as f64 / dt,
            cpu_percent: (cpu - self.last_cpu).as_secs_f64() / dt * 100.0
                / vm.config().vcpus as f64,
            status,
        };
        self.last_t = now;
        self.last_pages = pages;
        self.last_cpu = cpu;
        if self.json {
            println!("{}", serde_json::to_string(&line)?);
        } else {
            match &line.status {
                Some(s) => println!(
                    "{:6.1}s  {:>9.0} pages/s  verified {:>10}  mismatches {}  max stall {}  vCPU CPU {:5.1}%",
                    line.elapsed_s,
                    line.pages_per_s,
                    s.pages_verified,
                    s.mismatches,
                    s.max_stall_us()
                        .map_or("?".into(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
                    line.cpu_percent
                ),
                None => println!("{:6.1}s  booting", line.elapsed_s),
            }
        }
        Ok(line)
    }

    /// Builds the summary from the final state of the VM.
    pub fn summary(&self, vm: &Vm, workload: &Workload) -> Summary {
        let elapsed = self.start.elapsed().as_secs_f64();
        let st = vm.guest_status().ok();
        let pages = st.as_ref().map_or(0, |s| s.pages_written);
        Summary {
            elapsed_s: elapsed,
            vcpus: vm.config().vcpus,
            memory_mib: vm.config().memory >> 20,
            workload: workload.to_string(),
            boot_to_progress_ms: self.first_progress.map(|d| d.as_secs_f64() * 1000.0),
            pages_written: pages,
            pages_per_s: pages as f64 / elapsed.max(1e-6),
            pages_verified: st.as_ref().map_or(0, |s| s.pages_verified),
            mismatches: st.as_ref().map_or(0, |s| s.mismatches),
            max_stall_us: st.as_ref().and_then(|s| s.max_stall_us()),
            cpu_percent: Self::cpu(vm).as_secs_f64() / elapsed.max(1e-6) * 100.0
                / vm.config().vcpus as f64,
            disk: st
                .as_ref()
                .filter(|_| workload.disk.enabled())
                .map(|s| s.disk.clone()),
            guest_error: st.and_then(|s| s.error),
            vm_error: vm.error(),
        }
    }

    pub fn print_summary(&self, s: &Summary) -> anyhow::Result<()> {
        if self.json {
            println!(
                "{}",
                serde_json::to_string(&serde_json::json!({ "summary": s }))?
            );
        } else {
            println!(
                "summary: {:.1}s, {} vCPU, {} MiB, {}: {} pages written ({:.0}/s), {} verified, {} mismatches, max stall {}, vCPU CPU {:.1}%, first progress after {}",
                s.elapsed_s,
                s.vcpus,
                s.memory_mib,
                s.workload,
                s.pages_written,
                s.pages_per_s,
                s.pages_verified,
                s.mismatches,
                s.max_stall_us.map_or("?".into(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
                s.cpu_percent,
                s.boot_to_progress_ms.map_or("-".into(), |ms| format!("{ms:.0} ms")),
            );
            if let Some(d) = &s.disk {
                println!(
                    "disk: {} blocks written, {} verified ({} from a previous boot), {} mismatches, {} I/O errors, flushed generation {}",
                    d.written, d.verified, d.boot_verified, d.mismatches, d.io_errors, d.flushed_gen
                );
            }
        }
        Ok(())
    }
}

/// Runs `vm` for `duration` (zero = until Ctrl-C), printing a line per second. Stops early
/// on Ctrl-C/SIGTERM or a VM error.
pub fn watch(vm: &Vm, monitor: &mut Monitor, duration: Duration) -> anyhow::Result<()> {
    let mut next = Instant::now() + Duration::from_secs(1);
    let end = (!duration.is_zero()).then(|| Instant::now() + duration);
    loop {
        std::thread::sleep(Duration::from_millis(10));
        monitor.poll(vm);
        if signals::stop_requested() || vm.error().is_some() {
            return Ok(());
        }
        let now = Instant::now();
        if end.is_some_and(|e| now >= e) {
            return Ok(());
        }
        if now >= next {
            monitor.sample(vm)?;
            next += Duration::from_secs(1);
        }
    }
}

fn run_vm(args: &RunArgs) -> anyhow::Result<()> {
    let duration = parse_duration(&args.duration).context("--for")?;
    if let Some(addr) = args.migrate.migrate_to {
        return super::vm_migrate::run_migrating(args, addr, duration);
    }
    signals::install_stop_handler();
    let mut monitor = Monitor::new(args.json);
    let (mut vm, workload) = start_vm(args)?;
    watch(&vm, &mut monitor, duration)?;
    vm.pause()?;
    let summary = monitor.summary(&vm, &workload);
    monitor.print_summary(&summary)?;
    vm.shutdown();
    if let Some(e) = &summary.vm_error {
        bail!("the VM failed: {e}");
    }
    if let Some(e) = &summary.guest_error {
        bail!("the guest reported an error: {e}");
    }
    if summary.mismatches > 0 {
        bail!("the guest found {} mismatching pages", summary.mismatches);
    }
    check_disk(&summary)?;
    if summary.pages_written == 0 && workload.rate != 0 || summary.boot_to_progress_ms.is_none() {
        bail!("the guest made no progress");
    }
    Ok(())
}

/// Fails on disk blocks that did not verify or requests the device failed.
pub fn check_disk(summary: &Summary) -> anyhow::Result<()> {
    if let Some(d) = &summary.disk {
        if d.mismatches > 0 {
            bail!(
                "the guest found {} mismatching disk blocks (first: {:?})",
                d.mismatches,
                d.first_mismatch
            );
        }
        if d.io_errors > 0 {
            bail!("the guest saw {} disk I/O errors", d.io_errors);
        }
    }
    Ok(())
}
