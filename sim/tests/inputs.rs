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
