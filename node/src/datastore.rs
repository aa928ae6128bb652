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

/// `Datastore::create` found the VM's directory already there.
#[derive(Debug)]
pub struct DirExists {
    pub dir: PathBuf,
}

impl std::fmt::Display for DirExists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "datastore directory {} already exists (another create of this name is in progress, \
             or one was interrupted: if the vm is not in `tern vm list`, remove the directory)",
            self.dir.display()
        )
    }
}

impl std::error::Error for DirExists {}

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

    /// Create a new VM's directory, config and disk file. The directory is created
    /// exclusively: when it already exists (another create of the same name, or files left by
    /// an interrupted one) this fails with `DirExists` and touches nothing, so a create that
    /// loses a race never removes the winner's files.
    pub fn create(&self, cfg: &VmConfig) -> anyhow::Result<()> {
        let dir = self.dir(&cfg.name)?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DirExists { dir }.into());
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
        let written = self.write_new(&dir, cfg);
        if written.is_err() {
            // The directory is this call's own: nothing else can have used it yet.
            let _ = std::fs::remove_dir_all(&dir);
        }
        written
    }

    fn write_new(&self, dir: &Path, cfg: &VmConfig) -> anyhow::Result<()> {
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
    fn a_second_create_of_a_name_fails_and_leaves_the_first_ones_files() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path()).unwrap();
        let first = VmConfig {
            name: "a".into(),
            memory_mib: 64,
            vcpus: 1,
            workload: "wss=8M".into(),
        };
        ds.create(&first).unwrap();
        let second = VmConfig {
            memory_mib: 128,
            ..first.clone()
        };
        let err = ds.create(&second).unwrap_err();
        assert!(err.is::<DirExists>(), "{err:#}");
        assert_eq!(ds.config("a").unwrap(), first);
        assert!(dir.path().join("vms/a/disk.img").exists());
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
