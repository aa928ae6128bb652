//! Plan time of one DRS pass on example clusters: a vSphere 6 cluster's maximum (64 hosts /
//! 8,000 VMs), 1,000 / 50,000 and 10,000 / 200,000. Also the time to validate a snapshot and
//! compute entitlements (`build`), and a full evacuation of the busiest host.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use std::time::Duration;
use tern_scheduler::{balance, evacuate, example::example, Cluster, Config};

const SIZES: [(usize, usize, usize); 3] =
    [(64, 8_000, 20), (1_000, 50_000, 10), (10_000, 200_000, 10)];

fn plan(c: &mut Criterion) {
    let mut g = c.benchmark_group("drs");
    g.warm_up_time(Duration::from_millis(500));
    for (hosts, vms, samples) in SIZES {
        let snap = example(hosts, vms, 1);
        let cluster = Cluster::new(snap.clone()).expect("example is valid");
        let label = format!("{hosts}x{vms}");
        g.sample_size(samples);
        g.measurement_time(Duration::from_secs(if hosts >= 10_000 { 20 } else { 3 }));
        let cfg = Config::default();
        let p = balance(&cluster, &cfg).expect("plan");
        eprintln!(
            "{label}: {} moves, imbalance {:.4} -> {:.4} ({})",
            p.moves.len(),
            p.imbalance_before,
            p.imbalance_after,
            p.stop_reason
        );
        g.bench_with_input(BenchmarkId::new("plan", &label), &cluster, |b, cl| {
            b.iter(|| balance(black_box(cl), &cfg).expect("plan"))
        });
        let host = cluster.snapshot().hosts[0].id.clone();
        g.bench_with_input(BenchmarkId::new("evacuate", &label), &cluster, |b, cl| {
            b.iter(|| evacuate(black_box(cl), &host, &cfg).expect("evacuate"))
        });
        g.bench_with_input(BenchmarkId::new("build", &label), &snap, |b, s| {
            b.iter(|| Cluster::new(black_box(s.clone())).expect("valid"))
        });
    }
    g.finish();
}

criterion_group!(benches, plan);
criterion_main!(benches);
