//! CLI glue for live migration: `vm run --migrate-to` options, `vm receive`, the progress bar
//! and the printed statistics. The protocol itself lives in `tern_hypervisor::migration`.
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tern_hypervisor::migration::{
    migrate, receive, CancelToken, Compression, Hello, MigratableVm, MigrationConfig,
    MigrationStats, Phase, Progress, ReceiveConfig, ReceiveStats,
};

/// Options `tern vm run` takes to migrate its VM away while it runs.
#[derive(Args, Debug, Clone)]
pub struct MigrateOpts {
    /// Migrate the running VM to the `tern vm receive` listening here.
    #[arg(long)]
    pub migrate_to: Option<SocketAddr>,
    /// Start migrating this long after the guest started (e.g. 500ms, 2s).
    #[arg(long, value_parser = duration_arg, default_value = "0s")]
    pub migrate_after: Duration,
    /// Target for the pause at switchover, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub downtime_target: u64,
    /// Bandwidth cap in MiB/s (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub bandwidth: u64,
    /// Parallel data streams.
    #[arg(long, default_value_t = 2)]
    pub streams: u16,
    /// Authentication token the destination expects.
    #[arg(long, default_value = "")]
    pub migrate_token: String,
    /// Compare a hash of all guest memory on both sides at switchover (adds to downtime).
    #[arg(long)]
    pub verify_memory: bool,
    /// Cancel the migration if it has not finished this long after it started (the VM keeps
    /// running here).
    #[arg(long, value_parser = duration_arg)]
    pub migrate_deadline: Option<Duration>,
    /// zstd compression of page data: auto (only where it makes sending faster: slow or
    /// capped links, compressible memory), on (whatever shrinks), off (protocol version 1).
    #[arg(long, default_value = "auto")]
    pub compress: Compression,
}

impl MigrateOpts {
    pub fn config(&self) -> MigrationConfig {
        MigrationConfig {
            downtime_target: Duration::from_millis(self.downtime_target),
            bandwidth_limit: self.bandwidth.saturating_mul(1 << 20),
            streams: self.streams,
            token: self.migrate_token.clone(),
            verify_hash: self.verify_memory,
            compression: self.compress,
            ..Default::default()
        }
    }
}

/// `tern vm receive` arguments.
#[derive(Args, Debug, Clone)]
pub struct ReceiveArgs {
    /// Address to wait on for one incoming migration.
    #[arg(long)]
    pub listen: SocketAddr,
    /// After the migration, run the guest this long (e.g. 5s), printing its progress.
    #[arg(long = "for", value_parser = duration_arg)]
    pub run_for: Option<Duration>,
    /// Give up if no migration arrives within this long.
    #[arg(long, value_parser = duration_arg)]
    pub accept_timeout: Option<Duration>,
    /// Token a source must present.
    #[arg(long, default_value = "")]
    pub token: String,
    /// Print machine-readable JSON lines.
    #[arg(long)]
    pub json: bool,
    /// The VM's disk, the same image the source has open (shared datastore).
    #[command(flatten)]
    pub disk: super::vm::DiskOpts,
}

/// Migrate `vm` as `opts` say, with a progress bar on stderr; `cancel` may be fired by a
/// signal handler. On error the VM is still running here.
pub fn migrate_with_progress<V: MigratableVm>(
    vm: &V,
    addr: SocketAddr,
    opts: &MigrateOpts,
    cancel: &CancelToken,
) -> anyhow::Result<MigrationStats> {
    let bar = ProgressBar::new(vm.memory_bytes());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:40} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut on_progress = |p: &Progress| {
        bar.set_length(p.bytes_sent + p.bytes_remaining.max(1));
        bar.set_position(p.bytes_sent);
        bar.set_message(progress_message(p));
    };
    let result = migrate(
        vm,
        addr,
        &opts.config(),
        Box::new(|| Ok(())),
        cancel,
        &mut on_progress,
    );
    bar.finish_and_clear();
    result.with_context(|| format!("migration to {addr} failed; the VM keeps running here"))
}

fn progress_message(p: &Progress) -> String {
    match p.phase {
        Phase::Handshake => "handshake".into(),
        Phase::FirstPass => "first pass".into(),
        Phase::DirtyRounds => format!(
            "round {} dirty {:.0} MiB/s thr {}% ~{:.1}ms",
            p.round,
            p.dirty_rate / 1048576.0,
            p.throttle,
            p.expected_downtime.as_secs_f64().min(1e6) * 1e3
        ),
        Phase::StopAndCopy => "stop-and-copy".into(),
        Phase::Switchover => "switchover".into(),
        Phase::Done => "done".into(),
    }
}

/// Stats as one JSON object (also what the tests and the benchmark parse).
pub fn stats_json(s: &MigrationStats, guest_max_stall_us: Option<u64>) -> serde_json::Value {
    serde_json::json!({
        "event": "migrated",
        "total_ms": s.total.as_secs_f64() * 1e3,
        "handshake_ms": ms(s.handshake),
        "first_pass_ms": ms(s.first_pass),
        "downtime_ms": s.downtime.as_secs_f64() * 1e3,
        "guest_max_stall_us": guest_max_stall_us,
        "bytes_sent": s.bytes_sent,
        "pages_sent": s.pages_sent,
        "zero_pages": s.zero_pages,
        "untouched_pages": s.untouched_pages,
        "rounds": s.rounds,
        "max_throttle": s.max_throttle,
        "final_throttle": s.final_throttle,
        "bandwidth_mib_s": s.bandwidth / 1048576.0,
        "compressed_pages": s.compressed_pages,
        "compression_saved_bytes": s.compression_saved_bytes,
        "memory_hash": s.memory_hash.map(|h| format!("{h:016x}")),
        "switchover_ms": {
            "pause": ms(s.switchover.pause),
            "final_bitmap": ms(s.switchover.final_bitmap),
            "final_send": ms(s.switchover.final_send),
            "final_pages": s.switchover.final_pages,
            "state_save": ms(s.switchover.state_save),
            "state_bytes": s.switchover.state_bytes,
            "state_transfer": ms(s.switchover.state_transfer),
            "gate": ms(s.switchover.gate),
            "resume_ack": ms(s.switchover.resume_ack),
        },
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn print_stats(s: &MigrationStats, guest_max_stall_us: Option<u64>, json: bool) {
    if json {
        println!("{}", stats_json(s, guest_max_stall_us));
        return;
    }
    println!("migration complete");
    println!("  total time      {:>10.1} ms", s.total.as_secs_f64() * 1e3);
    println!(
        "  downtime        {:>10.3} ms",
        s.downtime.as_secs_f64() * 1e3
    );
    if let Some(us) = guest_max_stall_us {
        println!("  guest max stall {:>10.3} ms", us as f64 / 1e3);
    }
    println!(
        "  bytes sent      {:>10.1} MiB",
        s.bytes_sent as f64 / 1048576.0
    );
    println!("  pages sent      {:>10}", s.pages_sent);
    println!("  zero pages      {:>10}", s.zero_pages);
    println!(
        "  compressed      {:>10} pages, {:.1} MiB saved",
        s.compressed_pages,
        s.compression_saved_bytes as f64 / 1048576.0
    );
    println!("  never touched   {:>10}", s.untouched_pages);
    println!("  rounds          {:>10}", s.rounds);
    println!("  throttle (max)  {:>9}%", s.max_throttle);
}

/// Wait on `args.listen` for one migration; `make_vm` builds the paused, pre-faulted VM for
/// the source's spec and says which CPU features this host offers through `cpu_features`.
pub fn receive_one<V, F>(
    args: &ReceiveArgs,
    cpu_features: Vec<u32>,
    make_vm: F,
) -> anyhow::Result<(V, ReceiveStats)>
where
    V: MigratableVm,
    F: FnMut(&Hello) -> Result<V, String>,
{
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let cfg = ReceiveConfig {
        token: args.token.clone(),
        cpu_features,
        accept_timeout: args.accept_timeout,
        ..Default::default()
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({"event": "listening", "addr": listener.local_addr()?.to_string()})
        );
    } else {
        eprintln!("waiting for a migration on {}", listener.local_addr()?);
    }
    let (vm, stats) = receive(&listener, &cfg, make_vm).context("receiving the migration")?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "event": "received",
                "pages": stats.pages_received,
                "zero_pages": stats.zero_pages,
                "bytes": stats.bytes_received,
                "image_ready_after_ms": stats.image_ready_after.as_secs_f64() * 1e3,
                "resume_took_ms": ms(stats.resume_took),
                "restore_took_ms": ms(stats.restore_took),
                "stage_took_ms": ms(stats.stage_took),
            })
        );
    } else {
        eprintln!(
            "migration received ({} pages); the guest runs here",
            stats.pages_received
        );
    }
    Ok((vm, stats))
}

/// clap adapter for [`super::vm::parse_duration`] (`500ms`, `2s`, `1.5s`, `3m`, `1h`, or a
/// bare number of seconds).
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    super::vm::parse_duration(s).map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_arg("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(duration_arg("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration_arg("1m").unwrap(), Duration::from_secs(60));
        assert!(duration_arg("-1s").is_err());
        assert!(duration_arg("soon").is_err());
    }
}

/// What a destination needs to rebuild the VM, carried as the handshake's config string.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireConfig {
    memory: u64,
    vcpus: usize,
    workload: String,
    cpu_vendor: String,
    /// Whether the VM has a disk (the destination must attach the same image).
    #[serde(default)]
    disk: bool,
}

/// `tern vm run ... --migrate-to ADDR`: run the guest, migrate it after `--migrate-after`,
/// print the stats. On failure the guest keeps running here until `--for` ends.
pub fn run_migrating(
    args: &super::vm::RunArgs,
    addr: SocketAddr,
    duration: Duration,
) -> anyhow::Result<()> {
    use super::vm::{start_vm, watch, Monitor};
    use tern_hypervisor::migration::KvmMigratable;
    use tern_hypervisor::signals;
    signals::install_stop_handler();
    let started = std::time::Instant::now();
    let mut monitor = Monitor::new(args.json);
    let (vm, workload) = start_vm(args)?;
    watch(&vm, &mut monitor, args.migrate.migrate_after)?;
    let wire = WireConfig {
        memory: vm.config().memory,
        vcpus: vm.config().vcpus,
        workload: workload.to_string(),
        cpu_vendor: vm.cpu_features().vendor,
        disk: !vm.device_cmdline().is_empty(),
    };
    let vm = KvmMigratable::new(vm, serde_json::to_string(&wire)?);
    let cancel = CancelToken::new();
    let canceller = {
        let cancel = cancel.clone();
        let deadline = args
            .migrate
            .migrate_deadline
            .map(|d| std::time::Instant::now() + d);
        std::thread::spawn(move || {
            while !cancel.is_cancelled() {
                let overdue = deadline.is_some_and(|d| std::time::Instant::now() >= d);
                if signals::stop_requested() || overdue {
                    cancel.cancel();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let result = migrate_with_progress(&vm, addr, &args.migrate, &cancel);
    cancel.cancel();
    let _ = canceller.join();
    let mut vm = vm.into_inner();
    match result {
        Ok(stats) => {
            print_stats(&stats, None, args.json);
            vm.shutdown();
            Ok(())
        }
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"event": "migration_failed", "error": format!("{e:#}")})
                );
            } else {
                eprintln!("{e:#}");
            }
            let rest = duration.saturating_sub(started.elapsed());
            if !rest.is_zero() {
                watch(&vm, &mut monitor, rest)?;
            }
            vm.pause()?;
            let summary = monitor.summary(&vm, &workload);
            monitor.print_summary(&summary)?;
            vm.shutdown();
            Err(e)
        }
    }
}

/// `tern vm receive --listen ADDR`: wait for one migration, then run the guest (printing its
/// progress) for `--for`, and fail if the guest found mismatching pages.
pub fn run_receive(args: &ReceiveArgs) -> anyhow::Result<()> {
    use super::vm::{watch, Monitor};
    use tern_hypervisor::migration::feature_words;
    use tern_hypervisor::migration::KvmMigratable;
    use tern_hypervisor::{signals, Vm, VmConfig, Workload};
    signals::install_stop_handler();
    // The host's CPU features as a VM here would see them.
    let probe = Vm::new(VmConfig {
        memory: 32 << 20,
        vcpus: 1,
        serial_log: None,
    })?;
    let host = probe.cpu_features();
    drop(probe);
    let mut workload = None;
    let (vm, _) = receive_one(args, feature_words(&host), |h: &Hello| {
        let wire: WireConfig = serde_json::from_str(&h.spec.config)
            .map_err(|e| format!("unreadable VM config: {e}"))?;
        if wire.cpu_vendor != host.vendor {
            return Err(format!(
                "CPU vendor {} differs from this host's {}",
                wire.cpu_vendor, host.vendor
            ));
        }
        if wire.memory != h.spec.memory_bytes || wire.vcpus as u32 != h.spec.vcpus {
            return Err("VM config disagrees with the memory layout".into());
        }
        if wire.disk != args.disk.disk.is_some() {
            return Err(format!(
                "the VM {} a disk, this destination {} (--disk)",
                if wire.disk { "has" } else { "has no" },
                if args.disk.disk.is_some() {
                    "has one"
                } else {
                    "has none"
                }
            ));
        }
        workload = Some(
            wire.workload
                .parse::<Workload>()
                .map_err(|e| e.to_string())?,
        );
        let mut vm = Vm::new(VmConfig {
            memory: wire.memory,
            vcpus: wire.vcpus,
            serial_log: None,
        })
        .map_err(|e| e.to_string())?;
        args.disk.attach(&mut vm).map_err(|e| format!("{e:#}"))?;
        Ok(KvmMigratable::new(vm, h.spec.config.clone()))
    })?;
    let mut vm = vm.into_inner();
    let workload = workload.context("no workload received")?;
    let mut monitor = Monitor::new(args.json);
    watch(&vm, &mut monitor, args.run_for.unwrap_or(Duration::ZERO))?;
    vm.pause()?;
    let summary = monitor.summary(&vm, &workload);
    monitor.print_summary(&summary)?;
    vm.shutdown();
    if let Some(e) = &summary.vm_error {
        anyhow::bail!("the VM failed after migration: {e}");
    }
    if summary.mismatches > 0 {
        anyhow::bail!(
            "the guest found {} mismatching pages after migration",
            summary.mismatches
        );
    }
    super::vm::check_disk(&summary)
}
