//! Load reporting: each node reads its VMs' load from their VMMs (vCPU-thread CPU time,
//! touched memory, the guest's write rate) every interval and reports them to the leader, which keeps a window.
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

/// Previous sample of one VM: (when, vCPU CPU ns, pages written).
type Prev = HashMap<String, (Instant, u64, u64)>;

/// Each local VM's load over the interval since the previous sample, from its VMM's status
/// (VMs in the middle of a migration are left out: their figures belong to the migration).
fn sample(ctx: &HostCtx, prev: &mut Prev) -> HashMap<String, VmLoad> {
    let names: Vec<String> = ctx
        .vms()
        .iter()
        .filter(|(_, l)| !l.migrating)
        .map(|(n, _)| n.clone())
        .collect();
    prev.retain(|name, _| names.contains(name));
    let mut out = HashMap::new();
    for name in names {
        let s = match ctx.vmm_status(&name) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(vm = %name, "no load sample: {e:#}");
                continue;
            }
        };
        let now = Instant::now();
        let cpu = s.load.vcpu_cpu_ns;
        let written = s.guest.as_ref().map_or(0, |g| g.pages_written);
        if let Some((t, c, w)) = prev.get(&name) {
            let dt = (now - *t).as_secs_f64().max(1e-3);
            out.insert(
                name.clone(),
                VmLoad {
                    cpu_percent: cpu.saturating_sub(*c) as f64 / 1e9 / dt * 100.0,
                    active_mib: s.load.touched_bytes >> 20,
                    dirty_mib_s: written.saturating_sub(*w) as f64 * 4096.0 / dt / 1048576.0,
                },
            );
        }
        prev.insert(name, (now, cpu, written));
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
        let Ok((vms, p)) = tokio::task::spawn_blocking(move || {
            let v = sample(&c, &mut prev);
            (v, prev)
        })
        .await
        else {
            return;
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
