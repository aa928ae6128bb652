//! Load reporting: each node samples its VMs (vCPU-thread CPU time, touched memory, the
//! guest's write rate) every interval and reports them to the leader, which keeps a window.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::host::HostCtx;
use super::sched_view::VmLoad;

#[derive(serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub host: u64,
    pub vms: HashMap<String, VmLoad>,
}

/// Previous sample of one VM: (when, vCPU CPU seconds, pages written).
type Prev = HashMap<String, (Instant, f64, u64)>;

fn sample(ctx: &HostCtx, prev: &mut Prev) -> HashMap<String, VmLoad> {
    let now = Instant::now();
    let mut out = HashMap::new();
    let vms = ctx.vms();
    prev.retain(|name, _| vms.contains_key(name));
    for (name, local) in vms.iter().filter(|(_, l)| !l.migrating) {
        let vm = local.vm.lock();
        let cpu: f64 = vm.vcpu_cpu_times().iter().map(|d| d.as_secs_f64()).sum();
        let written = vm.guest_status().map_or(0, |s| s.pages_written);
        let touched = vm.memory().touched_pages().unwrap_or(0);
        if let Some((t, c, w)) = prev.get(name) {
            let dt = (now - *t).as_secs_f64().max(1e-3);
            out.insert(
                name.clone(),
                VmLoad {
                    cpu_percent: (cpu - c).max(0.0) / dt * 100.0,
                    active_mib: (touched * 4096) >> 20,
                    dirty_mib_s: written.saturating_sub(*w) as f64 * 4096.0 / dt / 1048576.0,
                },
            );
        }
        prev.insert(name.clone(), (now, cpu, written));
    }
    out
}

/// On the leader: keep a node's report in the load window the scheduler sees.
pub fn record(ctx: &HostCtx, report: LoadReport) -> serde_json::Value {
    let n = report.vms.len();
    ctx.leader.beat(report.host);
    ctx.leader.record(report.vms);
    serde_json::json!({ "recorded": n, "from": report.host })
}

pub async fn report_loop(ctx: Arc<HostCtx>, every: Duration) {
    let mut prev = Prev::new();
    loop {
        tokio::time::sleep(every).await;
        let c = ctx.clone();
        let (vms, p) = match tokio::task::spawn_blocking(move || {
            let v = sample(&c, &mut prev);
            (v, prev)
        })
        .await
        {
            Ok(r) => r,
            Err(_) => return,
        };
        prev = p;
        for (name, l) in &vms {
            metrics::gauge!("tern_vm_cpu_percent", "vm" => name.clone()).set(l.cpu_percent);
            metrics::gauge!("tern_vm_dirty_mib_s", "vm" => name.clone()).set(l.dirty_mib_s);
        }
        let report = LoadReport { host: ctx.id, vms };
        let Some((_, leader)) = ctx.cluster.leader_addr() else {
            continue;
        };
        if let Err(e) = ctx
            .cluster
            .post_json::<_, serde_json::Value>(&leader, "/v1/load", &report, true)
            .await
        {
            tracing::debug!("load report: {e}");
        }
    }
}
