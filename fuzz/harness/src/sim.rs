//! The simulator's input files: PlanetLab CPU traces, the VM-order TSV that goes with them,
//! and fleet TOML files (sim/).
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use crate::{refuse, Outcome};
use tern_sim::fleet::{Fleet, MAX_DAYS, MAX_MACHINES};
use tern_sim::trace::{read_trace_dir_ordered, read_trace_file};

/// A directory with two good trace files for the order files to name.
fn trace_dir() -> &'static Path {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("a"), "10\n20\n30\n").expect("trace file");
        std::fs::write(dir.path().join("b"), "0\n100\n").expect("trace file");
        dir
    })
    .path()
}

/// `data` in a fresh temporary file (the parsers read paths).
fn temp_file(data: &[u8]) -> Result<tempfile::NamedTempFile, String> {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(crate::scratch_dir);
    let mut f = tempfile::NamedTempFile::new_in(dir.path()).map_err(refuse)?;
    f.write_all(data).map_err(refuse)?;
    f.flush().map_err(refuse)?;
    Ok(f)
}

/// A trace file (first byte even) or a VM-order TSV over [`trace_dir`] (odd).
pub fn trace(data: &[u8]) -> Outcome {
    let (&pick, rest) = data.split_first().ok_or("empty input")?;
    let file = temp_file(rest)?;
    if pick % 2 == 0 {
        let samples = read_trace_file(file.path()).map_err(refuse)?;
        assert!(
            samples.iter().all(|s| (0.0..=1.0).contains(s)),
            "a trace sample outside 0..=1 was accepted"
        );
    } else {
        let (traces, types) = read_trace_dir_ordered(trace_dir(), file.path()).map_err(refuse)?;
        assert_eq!(traces.len(), types.len());
    }
    Ok(())
}

/// Fleets larger than this (machines, days) but within the simulator's limits are valid and
/// only slow: the target skips them, so that each run stays short.
const BUDGET_MACHINES: f64 = 2_000.0;
const BUDGET_DAYS: f64 = 30.0;

/// Whether a valid fleet file would take too long to build for a fuzz run (`count`s and
/// `days` between the fuzzing budget and the simulator's own limits).
fn over_budget(data: &[u8]) -> bool {
    let Some(v) = std::str::from_utf8(data)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
    else {
        return false;
    };
    let num = |v: Option<&toml::Value>| {
        v.and_then(|x| x.as_integer().map(|i| i as f64).or_else(|| x.as_float()))
    };
    let days = num(v.get("days")).unwrap_or(0.0);
    if days > BUDGET_DAYS && days <= MAX_DAYS {
        return true;
    }
    ["host", "vm"].iter().any(|group| {
        let n: f64 = v
            .get(*group)
            .and_then(toml::Value::as_array)
            .map(|a| a.iter().filter_map(|g| num(g.get("count"))).sum())
            .unwrap_or(0.0);
        n > BUDGET_MACHINES && n <= MAX_MACHINES as f64
    })
}

/// A fleet TOML file, built into a fleet as `tern sim --config` does.
pub fn fleet_toml(data: &[u8]) -> Outcome {
    if over_budget(data) {
        return Err("valid but over the fuzzing budget (machines, days)".into());
    }
    let file = temp_file(data)?;
    Fleet::from_toml(file.path(), 1).map_err(refuse)?;
    Ok(())
}
