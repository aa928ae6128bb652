//! `tern vmm`: one VM as its own process, driven through its control socket. A thin CLI over
//! `tern_hypervisor::vmm` (which documents the protocol); `tern node` starts one per VM.
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use tern_hypervisor::vmm::{self, VmSpec, VmmConfig};
use tern_hypervisor::workload::parse_size;

#[derive(Args, Debug)]
pub struct VmmArgs {
    /// The VM's name.
    #[arg(long)]
    pub name: String,
    /// Run directory: control socket `ctl.sock` (mode 0600), `pid`, and `exit.json`.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// Guest RAM (K/M/G suffix, whole MiB).
    #[arg(long, default_value = "512M")]
    pub memory: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest workload, as for `tern vm run`.
    #[arg(long, default_value = "wss=64M,rate=20000,pattern=random,duty=100")]
    pub workload: String,
    /// Raw disk image attached as virtio-blk, opened for writing only under a valid lease.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Start without a VM and wait for a `receive` request (a migration's destination).
    #[arg(long)]
    pub receive: bool,
    /// Host id this VMM runs the VM for (what the lease must name).
    #[arg(long, default_value_t = 0)]
    pub owner: u64,
    /// Ownership epoch this VMM runs the VM under.
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    /// The VM's lease file: boot and every resume need it to name --owner at --epoch.
    #[arg(long)]
    pub lease: Option<PathBuf>,
    /// Append the guest's serial output to this file.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Stay in the parent's session (by default the VMM starts its own, so that it outlives
    /// its supervisor and signals to the supervisor's process group).
    #[arg(long)]
    pub no_detach: bool,
}

pub fn run(args: VmmArgs) -> anyhow::Result<()> {
    if !args.no_detach {
        vmm::detach().context("leaving the parent's session")?;
    }
    tern_hypervisor::signals::install_stop_handler();
    let memory = parse_size(&args.memory).context("--memory")?;
    if memory == 0 || memory % (1 << 20) != 0 {
        bail!("--memory must be a positive whole number of MiB");
    }
    let boot = (!args.receive).then(|| VmSpec {
        name: args.name.clone(),
        memory_mib: memory >> 20,
        vcpus: args.vcpus,
        workload: args.workload.clone(),
        disk: args.disk.clone(),
    });
    if let Some(spec) = &boot {
        vmm::protocol::validate_spec(spec).context("VM spec")?;
    }
    let cfg = VmmConfig {
        name: args.name,
        boot,
        owner: args.owner,
        epoch: args.epoch,
        lease: args.lease,
        serial_log: args.serial_log,
    };
    let record = vmm::run(cfg, &args.run_dir)?;
    tracing::info!(state = ?record.state, "VMM exits");
    if let Some(e) = record
        .error
        .filter(|_| record.state == vmm::VmmState::Failed)
    {
        bail!("the VM failed: {e}");
    }
    Ok(())
}
