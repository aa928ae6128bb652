//! Prometheus metrics: Raft term, leader, log and apply positions, updated from openraft's
//! metrics channel (no polling).
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tern_consensus::ConsensusNode;

pub fn install(node: &ConsensusNode) -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    let mut rx = node.raft.metrics();
    let node = node.clone();
    tokio::spawn(async move {
        loop {
            {
                let m = rx.borrow_and_update();
                metrics::gauge!("tern_raft_term").set(m.current_term as f64);
                metrics::gauge!("tern_raft_leader")
                    .set(m.current_leader.map_or(-1.0, |l| l as f64));
                metrics::gauge!("tern_raft_is_leader")
                    .set(f64::from(u8::from(m.current_leader == Some(m.id))));
                metrics::gauge!("tern_raft_last_log_index")
                    .set(m.last_log_index.unwrap_or(0) as f64);
                metrics::gauge!("tern_raft_last_applied")
                    .set(m.last_applied.map_or(0, |l| l.index) as f64);
                metrics::gauge!("tern_raft_commit_index")
                    .set(node.committed_index().unwrap_or(0) as f64);
                metrics::gauge!("tern_raft_snapshot_index")
                    .set(m.snapshot.map_or(0, |l| l.index) as f64);
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(handle)
}
