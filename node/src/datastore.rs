//! The shared datastore: one directory per VM with its config and virtual disk, the same path
//! on every node (like shared storage). The node running a VM holds an exclusive lock on it.
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::Context;
use fs2::FileExt;
use serde::{Deserialize, Serialize};

/// Size of each VM's (sparse) virtual disk file.
const DISK_BYTES: u64 = 64 << 20;

/// What a node needs to boot a VM; written once at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub workload: String,
}

#[derive(Clone, Debug)]
pub struct Datastore {
    root: PathBuf,
}

/// Held while a node runs the VM; dropping it releases the lock.
#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

impl Datastore {
    pub fn open(root: &Path) -> anyhow::Result<Datastore> {
        std::fs::create_dir_all(root.join("vms"))
            .with_context(|| format!("creating datastore {}", root.display()))?;
        Ok(Datastore {
            root: root.to_path_buf(),
        })
    }

    fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        anyhow::ensure!(
            valid_name(name),
            "vm name {name:?} must be 1-64 of [A-Za-z0-9._-], not starting with a dot"
        );
        Ok(self.root.join("vms").join(name))
    }

    /// Write the config and create the disk file for a new VM.
    pub fn create(&self, cfg: &VmConfig) -> anyhow::Result<()> {
        let dir = self.dir(&cfg.name)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join("config.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(cfg)?)?;
        std::fs::rename(&tmp, dir.join("config.json"))?;
        let disk = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("disk.img"))?;
        disk.set_len(DISK_BYTES)?;
        Ok(())
    }

    pub fn config(&self, name: &str) -> anyhow::Result<VmConfig> {
        let path = self.dir(name)?.join("config.json");
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Take the VM's exclusive lock, failing at once if another process holds it.
    pub fn lock(&self, name: &str) -> anyhow::Result<VmLock> {
        let path = self.dir(name)?.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.try_lock_exclusive()
            .with_context(|| format!("{name} is locked by another node"))?;
        Ok(VmLock { _file: file })
    }

    /// Take the lock, retrying for up to `wait` (the previous holder is letting go).
    pub fn lock_within(&self, name: &str, wait: std::time::Duration) -> anyhow::Result<VmLock> {
        let until = std::time::Instant::now() + wait;
        loop {
            match self.lock(name) {
                Ok(l) => return Ok(l),
                Err(e) if std::time::Instant::now() >= until => return Err(e),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }

    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        let dir = self.dir(name)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let cfg = VmConfig {
            name: "a".into(),
            memory_mib: 64,
            vcpus: 1,
            workload: "wss=8M".into(),
        };
        ds.create(&cfg).unwrap();
        assert_eq!(ds.config("a").unwrap(), cfg);
        let l = ds.lock("a").unwrap();
        assert!(ds.lock("a").is_err());
        drop(l);
        assert!(ds.lock("a").is_ok());
    }

    #[test]
    fn hostile_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        for bad in ["", "..", "../x", "a/b", ".hidden"] {
            assert!(ds.lock(bad).is_err(), "{bad:?}");
        }
    }
}
