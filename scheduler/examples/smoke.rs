fn main() {
    let (h, v) = (
        std::env::args().nth(1).unwrap().parse().unwrap(),
        std::env::args().nth(2).unwrap().parse().unwrap(),
    );
    let t = std::time::Instant::now();
    let snap = tern_scheduler::example::example(h, v, 1);
    let c = tern_scheduler::Cluster::new(snap).unwrap();
    eprintln!("build {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let p = tern_scheduler::balance(&c, &tern_scheduler::Config::default()).unwrap();
    eprintln!(
        "plan {:?} moves {} before {:.4} after {:.4} stop {} unresolved {}",
        t.elapsed(),
        p.moves.len(),
        p.imbalance_before,
        p.imbalance_after,
        p.stop_reason,
        p.unresolved.len()
    );
    for m in p.moves.iter().take(8) {
        eprintln!("{:?}", m);
    }
    for u in p.unresolved.iter().take(5) {
        eprintln!("{:?}", u);
    }
}
