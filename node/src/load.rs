//! Load reporting: each node reads its VMs' load from their VMMs (vCPU-thread CPU time,
//! touched memory, the guest's write rate) every interval and reports them to the leader, which keeps a window.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::host::HostCtx;
use super::sched_view::VmLoad;

#[derive(serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub host: u64,
    pub vms: HashMap<String, VmLoad>,
}

/// Each local VM's load as its VMM sampled it over the last second (VMs in the middle of a
/// migration are left out: their figures belong to the migration).
fn sample(ctx: &HostCtx) -> HashMap<String, VmLoad> {
    let names: Vec<String> = ctx
        .vms()
        .iter()
        .filter(|(_, l)| !l.migrating)
        .map(|(n, _)| n.clone())
        .collect();
    let mut out = HashMap::new();
    for name in names {
        match ctx.vmm_status(&name) {
            Ok(s) => {
                out.insert(
                    name,
                    VmLoad {
                        cpu_percent: s.load.cpu_percent,
                        active_mib: s.load.touched_bytes >> 20,
                        dirty_mib_s: s.load.dirty_bytes_per_s / 1048576.0,
                    },
                );
            }
            Err(e) => tracing::debug!(vm = %name, "no load sample: {e:#}"),
        }
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
    loop {
        tokio::time::sleep(every).await;
        let c = ctx.clone();
        let Ok(vms) = tokio::task::spawn_blocking(move || sample(&c)).await else {
            return;
        };
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
