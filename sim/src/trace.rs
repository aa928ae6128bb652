//! Reader for PlanetLab CPU traces as CloudSim ships them: one file per VM, one integer CPU
//! percentage per line, samples 300 s apart.
use crate::error::{Result, SimError};
use crate::workload::Workload;
use std::path::{Path, PathBuf};

pub const PLANETLAB_INTERVAL_S: f64 = 300.0;

/// One VM's trace.
#[derive(Debug, Clone)]
pub struct Trace {
    pub name: String,
    pub workload: Workload,
}

/// Reads one trace file: every non-empty line must be an integer 0..=100.
pub fn read_trace_file(path: &Path) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut samples = Vec::with_capacity(289);
    for (i, line) in text.lines().enumerate() {
        let s = line.trim();
        if s.is_empty() {
            continue;
        }
        let v: i64 = s.parse().map_err(|_| SimError::Trace {
            path: path.to_path_buf(),
            line: i + 1,
            msg: format!("expected an integer CPU percentage, found {s:?}"),
        })?;
        if !(0..=100).contains(&v) {
            return Err(SimError::Trace {
                path: path.to_path_buf(),
                line: i + 1,
                msg: format!("CPU percentage {v} is outside 0..=100"),
            });
        }
        samples.push(v as f64 / 100.0);
    }
    if samples.is_empty() {
        return Err(SimError::Trace {
            path: path.to_path_buf(),
            line: 0,
            msg: "trace file has no samples".into(),
        });
    }
    Ok(samples)
}

fn trace_from(path: &Path, name: String) -> Result<Trace> {
    let samples = read_trace_file(path)?;
    Ok(Trace {
        name,
        workload: Workload::Samples {
            samples: samples.into(),
            interval_s: PLANETLAB_INTERVAL_S,
        },
    })
}

/// Reads every file of `dir`, sorted by name (a stable order on any file system).
pub fn read_trace_dir(dir: &Path) -> Result<Vec<Trace>> {
    let entries = std::fs::read_dir(dir).map_err(|source| SimError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for e in entries {
        let e = e.map_err(|source| SimError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if e.path().is_file() {
            files.push(e.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(SimError::Config {
            path: dir.to_path_buf(),
            msg: "trace directory holds no files".into(),
        });
    }
    files.iter().map(|p| trace_from(p, file_name(p))).collect()
}

/// Reads the traces of `dir` in the order a VM-order TSV gives (columns: vm_index, file, ...;
/// one header line). Returns the traces and, per VM, the VM type column when present.
pub fn read_trace_dir_ordered(
    dir: &Path,
    order: &Path,
) -> Result<(Vec<Trace>, Vec<Option<usize>>)> {
    let text = std::fs::read_to_string(order).map_err(|source| SimError::Io {
        path: order.to_path_buf(),
        source,
    })?;
    let mut rows: Vec<(usize, String, Option<usize>)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if i == 0 || line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| SimError::Trace {
            path: order.to_path_buf(),
            line: i + 1,
            msg,
        };
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 2 {
            return Err(bad(
                "expected at least two tab-separated columns: vm_index, file".into(),
            ));
        }
        let idx: usize = cols[0]
            .trim()
            .parse()
            .map_err(|_| bad(format!("vm_index {:?} is not a number", cols[0])))?;
        let vm_type = match cols.get(2) {
            Some(c) => Some(
                c.trim()
                    .parse()
                    .map_err(|_| bad(format!("vm_type {c:?} is not a number")))?,
            ),
            None => None,
        };
        rows.push((idx, cols[1].to_string(), vm_type));
    }
    rows.sort_by_key(|r| r.0);
    for (want, r) in rows.iter().enumerate() {
        if r.0 != want {
            return Err(SimError::Config {
                path: order.to_path_buf(),
                msg: format!("vm_index {want} is missing or repeated"),
            });
        }
    }
    let mut traces = Vec::with_capacity(rows.len());
    let mut types = Vec::with_capacity(rows.len());
    for (_, file, t) in rows {
        traces.push(trace_from(&dir.join(&file), file)?);
        types.push(t);
    }
    Ok((traces, types))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(body.as_bytes()).unwrap();
        p
    }

    #[test]
    fn reads_good_files_in_name_order() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "b host", "10\n20\n");
        write(d.path(), "a", "0\n100\n");
        let t = read_trace_dir(d.path()).unwrap();
        assert_eq!(t[0].name, "a");
        assert_eq!(t[1].name, "b host");
        assert!((t[1].workload.at(150.0) - 0.15).abs() < 1e-6);
    }

    #[test]
    fn malformed_files_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "x", "10\n2.5\n");
        let e = read_trace_file(&p).unwrap_err().to_string();
        assert!(e.contains("x:2:"), "{e}");
        let p = write(d.path(), "y", "10\n20\n101\n");
        let e = read_trace_file(&p).unwrap_err().to_string();
        assert!(e.contains("y:3:") && e.contains("outside"), "{e}");
        let p = write(d.path(), "z", "\n\n");
        assert!(read_trace_file(&p)
            .unwrap_err()
            .to_string()
            .contains("no samples"));
        let p = write(d.path(), "w", "-5\n");
        assert!(read_trace_file(&p)
            .unwrap_err()
            .to_string()
            .contains("w:1:"));
        let bin = d.path().join("bin");
        std::fs::write(&bin, [0xff, 0xfe, 0x00]).unwrap();
        assert!(read_trace_file(&bin).is_err());
        assert!(read_trace_dir(&d.path().join("missing")).is_err());
    }

    #[test]
    fn order_file_sets_vm_order_and_type() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a", "10\n");
        write(d.path(), "b", "20\n");
        let o = write(
            d.path(),
            "order.tsv",
            "vm_index\tfile\tvm_type\n1\ta\t3\n0\tb\t0\n",
        );
        let (t, ty) = read_trace_dir_ordered(d.path(), &o).unwrap();
        assert_eq!(t[0].name, "b");
        assert_eq!(ty, vec![Some(0), Some(3)]);
        let o = write(d.path(), "bad.tsv", "h\nx\ta\n");
        let e = read_trace_dir_ordered(d.path(), &o)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.tsv:2:"), "{e}");
        let o = write(d.path(), "gap.tsv", "h\n0\ta\n2\tb\n");
        assert!(read_trace_dir_ordered(d.path(), &o).is_err());
    }
}
