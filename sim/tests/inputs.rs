//! Bad input never panics: trace files and fleet configs get an error naming the file.
use proptest::prelude::*;
use std::io::Write;
use tern_sim::fleet::Fleet;
use tern_sim::trace::read_trace_file;

proptest! {
    #[test]
    fn trace_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        std::fs::write(&p, &bytes).unwrap();
        if let Err(e) = read_trace_file(&p) {
            prop_assert!(e.to_string().contains(&*p.to_string_lossy()));
        }
    }

    #[test]
    fn valid_traces_read_back(values in proptest::collection::vec(0u8..=100, 1..300)) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        let mut f = std::fs::File::create(&p).unwrap();
        for v in &values {
            writeln!(f, "{v}").unwrap();
        }
        let got = read_trace_file(&p).unwrap();
        prop_assert_eq!(got.len(), values.len());
        for (g, v) in got.iter().zip(&values) {
            prop_assert_eq!(*g, *v as f64 / 100.0);
        }
    }
}

const GOOD: &str = r#"
days = 0.1
[[host]]
count = 3
pes = 4
pe_mips = 2000
ram_mb = 8192
bw_mbps = 1000
power_w = [90, 95, 100, 105, 110, 115, 120, 125, 130, 135, 140]
[[vm]]
count = 6
mips = 1000
ram_mb = 1024
workload = "bursty"
[[event]]
at_s = 600
host = 2
kind = "maintenance_enter"
"#;

#[test]
fn toml_fleet_loads_and_runs() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("fleet.toml");
    std::fs::write(&p, GOOD).unwrap();
    let f = Fleet::from_toml(&p, 1).unwrap();
    assert_eq!((f.hosts.len(), f.vms.len(), f.events.len()), (3, 6, 1));
    let mut pol = tern_sim::policy::by_name("drs").unwrap();
    let r = tern_sim::run(&f, pol.as_mut(), 1, &mut |_, _| {}).unwrap();
    assert!(r.peak_ram_ratio <= 1.0);
}

#[test]
fn bad_toml_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    for (i, bad) in [
        "days = 1\n",
        &GOOD.replace("workload = \"bursty\"", "workload = \"chaos\""),
        &GOOD.replace("host = 2", "host = 9"),
        &GOOD.replace("pe_mips = 2000", "pe_mips = -1"),
        "not toml at all [",
    ]
    .iter()
    .enumerate()
    {
        let p = d.path().join(format!("bad{i}.toml"));
        std::fs::write(&p, bad).unwrap();
        let e = Fleet::from_toml(&p, 1).unwrap_err().to_string();
        assert!(e.contains(&format!("bad{i}.toml")), "{e}");
    }
}

#[test]
fn shape_file_is_scaled_to_the_totals_asked_for() {
    // The example shipped in the repository, scaled to 40 hosts and 700 VMs.
    let shape = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fleets/datacentre.toml");
    let f = Fleet::from_shape(&shape, 7, 40, 700, 0.5).unwrap();
    assert_eq!((f.hosts.len(), f.vms.len()), (40, 700));
    assert_eq!(f.duration_s, 43_200.0);
    // Shares 0.5 / 0.4 / 0.1 of 40 hosts, 0.45 / 0.35 / 0.15 / 0.05 of 700 VMs.
    let count = |pes: u32| f.hosts.iter().filter(|h| h.pes == pes).count();
    assert_eq!((count(16), count(32), count(64)), (20, 16, 4));
    let vms = |pes: u32| f.vms.iter().filter(|v| v.pes == pes).count();
    assert_eq!((vms(1), vms(2), vms(4), vms(8)), (315, 245, 105, 35));
    // Shares that do not divide evenly still add up to the total.
    let g = Fleet::from_shape(&shape, 7, 7, 13, 0.1).unwrap();
    assert_eq!((g.hosts.len(), g.vms.len()), (7, 13));
    // The same shape under another seed draws other loads.
    let h = Fleet::from_shape(&shape, 8, 40, 700, 0.5).unwrap();
    let demand = |f: &Fleet| f.vms.iter().map(|v| v.workload.at(3600.0)).sum::<f64>();
    assert_ne!(demand(&f), demand(&h));
    // And --config needs counts, not shares.
    let e = Fleet::from_toml(&shape, 1).unwrap_err().to_string();
    assert!(e.contains("needs a count"), "{e}");
}

#[test]
fn bad_shapes_are_refused_with_the_file_named() {
    let d = tempfile::tempdir().unwrap();
    let good = GOOD
        .replace("count = 3", "share = 1")
        .replace("count = 6", "share = 2");
    for (i, bad) in [
        good.replace("share = 1", "share = -1"),
        good.replace("share = 2", "share = 0"),
        good.replace(
            "workload = \"bursty\"",
            "mix = { diurnal = 1, chaos = 0 }\nworkload = \"bursty\"",
        ),
        good.replace("workload = \"bursty\"", "mix = { diurnal = -1 }"),
    ]
    .iter()
    .enumerate()
    {
        let p = d.path().join(format!("shape{i}.toml"));
        std::fs::write(&p, bad).unwrap();
        let e = Fleet::from_shape(&p, 1, 10, 100, 0.1)
            .err()
            .unwrap_or_else(|| panic!("shape {i} was accepted"));
        assert!(e.to_string().contains(&format!("shape{i}.toml")), "{e}");
    }
}
