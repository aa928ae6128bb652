//! The simulator's input files: PlanetLab CPU traces, the VM-order TSV that goes with them,
//! and fleet TOML files (sim/).
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use crate::{refuse, Outcome};
use tern_sim::fleet::Fleet;
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
    let mut f = tempfile::NamedTempFile::new().map_err(refuse)?;
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

/// A fleet TOML file, built into a fleet as `tern sim --fleet` does.
pub fn fleet_toml(data: &[u8]) -> Outcome {
    let file = temp_file(data)?;
    Fleet::from_toml(file.path(), 1).map_err(refuse)?;
    Ok(())
}
