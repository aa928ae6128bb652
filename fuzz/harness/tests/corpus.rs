//! Replays every committed fuzz input through the target functions the fuzzers run
//! (fuzz/harness/src), on stable, in `cargo test --workspace`:
//! - `fuzz/corpus/<target>/seed-*`: written by the real encoders (examples/gen_corpus.rs);
//!   each must be accepted, so a format change that breaks a seed is caught here.
//! - `fuzz/corpus/<target>/*` (other names): inputs the fuzzer found interesting; none may
//!   panic.
//! - `fuzz/regressions/<target>/<ok|err>-*`: inputs that once crashed a decoder; none may
//!   panic, and each must be accepted (`ok-`) or refused with an error (`err-`).
use std::path::{Path, PathBuf};

use tern_fuzz_harness::{Outcome, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// Run `input` through `run`; a panic becomes an error naming the file.
fn replay(run: fn(&[u8]) -> Outcome, path: &Path) -> Result<Outcome, String> {
    let data = std::fs::read(path).expect("read corpus file");
    std::panic::catch_unwind(|| run(&data)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{}: panicked: {msg}", path.display())
    })
}

#[test]
fn every_target_has_seeds_and_every_seed_is_accepted() {
    let mut failures = Vec::new();
    for t in TARGETS {
        let seeds: Vec<PathBuf> = files(&fuzz_dir().join("corpus").join(t.name))
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            })
            .collect();
        if seeds.is_empty() {
            failures.push(format!("{}: no seeds in fuzz/corpus/{0}", t.name));
        }
        for p in seeds {
            match replay(t.run, &p) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("{}: refused: {e}", p.display())),
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn found_inputs_never_panic() {
    let mut failures = Vec::new();
    let mut n = 0;
    for t in TARGETS {
        for p in files(&fuzz_dir().join("corpus").join(t.name)) {
            n += 1;
            if let Err(e) = replay(t.run, &p) {
                failures.push(e);
            }
        }
    }
    assert!(n > 0, "no corpus files found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn crash_regressions_are_handled() {
    let mut failures = Vec::new();
    let root = fuzz_dir().join("regressions");
    for dir in files_and_dirs(&root) {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let Some(t) = tern_fuzz_harness::target(&name) else {
            failures.push(format!("fuzz/regressions/{name}: no such target"));
            continue;
        };
        for p in files(&dir) {
            let file = p.file_name().unwrap().to_string_lossy().into_owned();
            let want_ok = if file.starts_with("ok-") {
                true
            } else if file.starts_with("err-") {
                false
            } else {
                failures.push(format!("{}: name must start with ok- or err-", p.display()));
                continue;
            };
            match replay(t.run, &p) {
                Ok(Ok(())) if want_ok => {}
                Ok(Err(_)) if !want_ok => {}
                Ok(got) => failures.push(format!("{}: got {got:?}", p.display())),
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn files_and_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_dir())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}
