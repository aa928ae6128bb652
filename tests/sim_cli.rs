//! `tern sim` end to end: the real binary on traces the test writes.
use std::io::Write;
use std::process::Command;

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

fn write_traces(dir: &std::path::Path, n: usize) {
    for i in 0..n {
        let mut f = std::fs::File::create(dir.join(format!("node {i}"))).unwrap();
        for k in 0..288 {
            writeln!(f, "{}", (k * 13 + i * 7) % 70).unwrap();
        }
    }
}

#[test]
fn json_report_and_plot_from_a_trace_dir() {
    let d = tempfile::tempdir().unwrap();
    let traces = d.path().join("day");
    std::fs::create_dir(&traces).unwrap();
    write_traces(&traces, 16);
    let plot = d.path().join("run.svg");
    let out = tern()
        .args([
            "sim", "--policy", "lr-mmt", "--hosts", "16", "--json", "--quiet", "--trace",
        ])
        .arg(&traces)
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["policy"], "lr-mmt");
    assert_eq!(r["vms"], 16);
    assert!(r["energy_kwh"].as_f64().unwrap() > 0.0);
    assert_eq!(r["timeline"].as_array().unwrap().len(), 287);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
}

#[test]
fn malformed_trace_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    write_traces(d.path(), 2);
    std::fs::write(d.path().join("broken"), "10\n20\nlots\n").unwrap();
    let out = tern()
        .args(["sim", "--quiet", "--trace"])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken:3:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn synthetic_run_and_unknown_policy() {
    let out = tern()
        .args([
            "sim",
            "--synthetic",
            "--hosts",
            "6",
            "--vms",
            "30",
            "--days",
            "0.2",
            "--policy",
            "drs+dpm",
            "--json",
            "--seed",
            "3",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["policy"], "drs+dpm");
    assert!(r["peak_ram_ratio"].as_f64().unwrap() <= 1.0);
    let out = tern()
        .args(["sim", "--synthetic", "--policy", "magic"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown policy"));
}

#[test]
fn initial_placement_flag_is_parsed_and_bad_values_refused() {
    let d = tempfile::tempdir().unwrap();
    write_traces(d.path(), 16);
    let run = |ip: &str| {
        tern()
            .args([
                "sim", "--policy", "none", "--hosts", "16", "--json", "--quiet",
            ])
            .args(["--initial-placement", ip, "--trace"])
            .arg(d.path())
            .output()
            .unwrap()
    };
    let full = run("full");
    let demand = run("demand");
    assert!(full.status.success() && demand.status.success());
    let f: serde_json::Value = serde_json::from_slice(&full.stdout).unwrap();
    let dm: serde_json::Value = serde_json::from_slice(&demand.stdout).unwrap();
    // Demand-sized VMs pack onto fewer hosts than full-size ones.
    assert!(
        dm["mean_active_hosts"].as_f64().unwrap() < f["mean_active_hosts"].as_f64().unwrap(),
        "{} vs {}",
        dm["mean_active_hosts"],
        f["mean_active_hosts"]
    );
    let bad = run("half");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("half"));
}

#[test]
fn shaped_fleet_says_whether_it_is_over_committed_before_it_runs() {
    let shape = concat!(env!("CARGO_MANIFEST_DIR"), "/sim/fleets/datacentre.toml");
    let run = |hosts: &str, vms: &str| {
        tern()
            .args(["sim", "--synthetic", "--shape", shape, "--policy", "thr-mc"])
            .args([
                "--hosts", hosts, "--vms", vms, "--days", "0.1", "--json", "--quiet",
            ])
            .output()
            .unwrap()
    };
    let roomy = run("40", "200");
    assert!(
        roomy.status.success(),
        "{}",
        String::from_utf8_lossy(&roomy.stderr)
    );
    let err = String::from_utf8_lossy(&roomy.stderr);
    assert!(err.contains("fleet demand vs capacity"), "{err}");
    assert!(!err.contains("OVER-COMMITTED"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&roomy.stdout).unwrap();
    assert_eq!(r["policy"], "thr-mc");
    assert_eq!(
        (r["hosts"].as_u64(), r["vms"].as_u64()),
        (Some(40), Some(200))
    );
    assert!(r["commitment"]["peak_demand_ratio"].as_f64().unwrap() < 1.0);
    // Ten times the VMs on a quarter of the hosts: demand exceeds capacity, and it is said.
    let crowded = run("10", "2000");
    let err = String::from_utf8_lossy(&crowded.stderr);
    assert!(err.contains("OVER-COMMITTED"), "{err}");
}

#[test]
fn sweep_writes_one_table_and_one_chart_per_metric() {
    let d = tempfile::tempdir().unwrap();
    for day in ["day1", "day2"] {
        let dir = d.path().join(day);
        std::fs::create_dir(&dir).unwrap();
        write_traces(&dir, 8);
    }
    let out = d.path().join("out");
    let run = tern()
        .args([
            "sim",
            "sweep",
            "--hosts",
            "8",
            "--policies",
            "none,lr-mmt,mad-mc",
        ])
        .arg("--trace")
        .arg(d.path().join("day1"))
        .arg("--trace")
        .arg(d.path().join("day2"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 3, "{csv}");
    assert!(csv.contains("day2,mad-mc,1,"), "{csv}");
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert!(md.contains("| day1 | lr-mmt | 1 |"), "{md}");
    for m in [
        "energy_kwh",
        "slatah_pct",
        "pdm_pct",
        "esv",
        "migrations",
        "active_hosts",
    ] {
        let svg = std::fs::read_to_string(out.join(format!("{m}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("mad-mc"), "{m}");
    }
    let bad = tern()
        .args(["sim", "sweep", "--policies", "magic", "--out"])
        .arg(d.path().join("o2"))
        .arg("--trace")
        .arg(d.path().join("day1"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("magic"));
}
