//! Power-aware best fit through the host index (buckets of planned load, O(1) LR test) picks
//! the host a scan of every host picks, on random fleets and through a run of placements.
use proptest::prelude::*;
use tern_sim::cluster::Cluster;
use tern_sim::fleet::{Fleet, HostSpec, VmSpec};
use tern_sim::migration::MigrationModel;
use tern_sim::policy::detect::Detector;
use tern_sim::policy::plan::Plan;
use tern_sim::power::PowerModel;
use tern_sim::workload::Workload;

fn fleet(hosts: usize, vm_mips: &[f64]) -> Fleet {
    Fleet {
        hosts: (0..hosts)
            .map(|h| HostSpec {
                pes: 2,
                pe_mips: if h % 2 == 0 { 1860.0 } else { 2660.0 },
                ram_mb: 4096,
                bw_mbps: 1000.0,
                power: if h % 2 == 0 {
                    PowerModel::ML110_G4
                } else {
                    PowerModel::ML110_G5
                },
            })
            .collect(),
        vms: vm_mips
            .iter()
            .map(|&mips| VmSpec {
                pes: 1,
                mips,
                ram_mb: 613,
                bw_mbps: 0.0,
                dirty_mb_s: 0.0,
                workload: Workload::Samples {
                    samples: vec![0.0; 2].into(),
                    interval_s: 300.0,
                },
            })
            .collect(),
        interval_s: 300.0,
        duration_s: 600.0,
        migration: MigrationModel::cloudsim(),
        events: Vec::new(),
        cloudsim_ram: false,
        cloudsim_engine: false,
        spread_initial: false,
        initial_placement: Default::default(),
    }
}

const MIPS: [f64; 4] = [2500.0, 2000.0, 1000.0, 500.0];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn indexed_best_fit_picks_the_host_a_full_scan_picks(
        hosts in 4usize..40,
        // Per VM: type, host (index mod hosts, or none), 12 demand samples in %.
        vms in proptest::collection::vec(
            (0usize..4, 0usize..64, proptest::collection::vec(0u8..=100, 12)), 1..120),
        excluded in proptest::collection::vec(any::<bool>(), 40),
        lr in any::<bool>(),
    ) {
        let mips: Vec<f64> = vms.iter().map(|v| MIPS[v.0]).collect();
        let f = fleet(hosts, &mips);
        let mut c = Cluster::new(&f, 30);
        for k in 0..12 {
            for (v, (_, _, samples)) in vms.iter().enumerate() {
                c.vms[v].req_mips = samples[k] as f64 / 100.0 * mips[v];
            }
            c.push_history();
        }
        for (v, (_, at, _)) in vms.iter().enumerate() {
            // Every third VM stays unplaced: those are what best fit places.
            if v % 3 != 0 && c.has_room(at % hosts, v) {
                c.attach(v, at % hosts);
                c.vms[v].host = Some(at % hosts);
            }
        }
        for h in 0..hosts {
            c.recompute_host(h);
        }
        let detector = if lr { Detector::Lr(1.2) } else { Detector::Mad(2.5) };
        let mut scan = Plan::new(&c);
        scan.detector = detector;
        let mut indexed = Plan::new(&c);
        indexed.detector = detector;
        indexed.index_by_load();
        let excluded: Vec<bool> = (0..hosts).map(|h| excluded[h] && h % 4 == 0).collect();
        for v in (0..vms.len()).filter(|v| v % 3 == 0) {
            let a = scan.find_host(v, &excluded);
            let b = indexed.find_host(v, &excluded);
            prop_assert_eq!(a, b, "vm {}", v);
            // Plan it, so later searches see hosts the plan changed.
            if let Some(h) = a {
                scan.create(h, v);
                indexed.create(h, v);
            }
        }
        // Take VMs off again (hosts become idle or lighter) and search once more.
        for v in (0..vms.len()).filter(|v| v % 3 == 1) {
            if let Some(h) = c.vms[v].host {
                scan.destroy(h, v);
                indexed.destroy(h, v);
                prop_assert_eq!(scan.find_host(v, &excluded), indexed.find_host(v, &excluded));
            }
        }
    }
}
